"""End to end through the official `openai` Python SDK against a running `ember serve` on the
demo model: `chat.completions.parse` with Pydantic models (structured output and strict tools),
forced tool calls whole and streamed, the tool-result turn, and JSON mode.

Usage: python openai_sdk.py BASE_URL MODEL [EMBED_BASE_URL EMBED_MODEL REFERENCE_JSON]
(with the embedding server: `embeddings.create`, which asks for base64 and decodes it, against
the transformers reference of the tiny Qwen3-Embedding checkpoint).
"""

import json
import sys
from typing import List, Literal

import openai
from pydantic import BaseModel, Field

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
messages = [{"role": "user", "content": "Weather in Paris? Answer in JSON."}]
no_thinking = {"chat_template_kwargs": {"enable_thinking": False}}
failures = []


def check(condition, what):
    if not condition:
        failures.append(what)
        print("FAIL:", what)


class Item(BaseModel):
    name: str = Field(max_length=6)
    count: int = Field(ge=0, le=99)
    tags: List[Literal["a", "b", "c"]] = Field(max_length=3)
    ok: bool


class GetWeather(BaseModel):
    """Weather of a city."""

    city: str = Field(max_length=8)
    unit: Literal["C", "F"]


# 1. chat.completions.parse with a Pydantic response_format: every sampled reply parses.
for seed in range(20):
    completion = client.chat.completions.parse(
        model=model, messages=messages, response_format=Item,
        temperature=1.0, seed=seed, max_tokens=200, extra_body=no_thinking,
    )
    parsed = completion.choices[0].message.parsed
    check(isinstance(parsed, Item), f"parse seed {seed}: {completion.choices[0].message.content!r}")

# 2. A strict Pydantic tool, forced: parsed_arguments is the model.
tool = openai.pydantic_function_tool(GetWeather)
for seed in range(10):
    completion = client.chat.completions.parse(
        model=model, messages=messages, tools=[tool], tool_choice="required",
        parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=200, extra_body=no_thinking,
    )
    choice = completion.choices[0]
    check(choice.finish_reason == "tool_calls", f"tool seed {seed}: finish {choice.finish_reason}")
    calls = choice.message.tool_calls or []
    check(len(calls) >= 1, f"tool seed {seed}: no calls")
    for call in calls:
        check(call.function.name == "GetWeather", f"tool seed {seed}: name {call.function.name}")
        check(isinstance(call.function.parsed_arguments, GetWeather),
              f"tool seed {seed}: arguments {call.function.arguments!r}")

# 3. The same forced call streamed: the SDK's accumulated deltas give the same call.
named = {"type": "function", "function": {"name": "GetWeather"}}
whole = client.chat.completions.create(
    model=model, messages=messages, tools=[tool], tool_choice=named, temperature=0, max_tokens=200,
    extra_body=no_thinking,
)
with client.chat.completions.stream(
    model=model, messages=messages, tools=[tool], tool_choice=named, temperature=0, max_tokens=200,
    extra_body=no_thinking,
) as stream:
    for _ in stream:
        pass
    final = stream.get_final_completion()
w, s = whole.choices[0].message.tool_calls[0], final.choices[0].message.tool_calls[0]
check(w.function.name == s.function.name == "GetWeather", "stream: names")
check(json.loads(w.function.arguments) == json.loads(s.function.arguments),
      f"stream: {w.function.arguments!r} vs {s.function.arguments!r}")
check(final.choices[0].finish_reason == "tool_calls", "stream: finish reason")

# 4. The tool-result turn answers.
history = messages + [
    whole.choices[0].message.model_dump(exclude_none=True),
    {"role": "tool", "tool_call_id": w.id, "content": "sunny, 21C"},
]
answer = client.chat.completions.create(model=model, messages=history, tools=[tool], max_tokens=16)
check(answer.choices[0].message.content is not None, "tool result turn: no content")

# 5. JSON mode always parses (random weights may write one string until max_tokens: a reply
# cut off by the length limit is not complete JSON, as on any server).
finished = 0
for seed in range(10):
    completion = client.chat.completions.create(
        model=model, messages=messages, response_format={"type": "json_object"},
        temperature=1.0, seed=seed, max_tokens=200, extra_body=no_thinking,
    )
    content = completion.choices[0].message.content
    if completion.choices[0].finish_reason == "length":
        continue
    finished += 1
    try:
        check(isinstance(json.loads(content), dict), f"json_object seed {seed}: {content!r}")
    except ValueError:
        check(False, f"json_object seed {seed}: {content!r}")
check(finished > 0, "json_object: no reply finished within max_tokens")

# 6. Bad requests are 400s the SDK raises as BadRequestError, naming the parameter.
try:
    client.chat.completions.create(model=model, messages=messages, tool_choice="required")
    check(False, "tool_choice without tools was accepted")
except openai.BadRequestError as e:
    check(e.param == "tool_choice", f"400 param {e.param}")

# 7. Embeddings through the SDK (base64 on the wire by default), against transformers.
if len(sys.argv) > 5:
    embed_client = openai.OpenAI(base_url=sys.argv[3], api_key="unused", max_retries=0)
    reference = json.load(open(sys.argv[5]))
    texts = [item["text"] for item in reference["inputs"]]
    result = embed_client.embeddings.create(model=sys.argv[4], input=texts)
    check(len(result.data) == len(texts), "embeddings: count")
    for item, got in zip(reference["inputs"], result.data):
        diff = max(abs(a - b) for a, b in zip(item["embedding"], got.embedding))
        check(len(got.embedding) == len(item["embedding"]) and diff < 1e-4,
              f"embeddings: {item['text'][:20]!r} differs by {diff}")
    check(result.usage.prompt_tokens == sum(len(i["token_ids"]) for i in reference["inputs"]),
          f"embeddings: usage {result.usage}")
    case = reference["dimensions"][0]
    short = embed_client.embeddings.create(
        model=sys.argv[4], input=texts[case["input"]], dimensions=case["dimensions"],
    ).data[0].embedding
    diff = max(abs(a - b) for a, b in zip(case["embedding"], short))
    check(len(short) == case["dimensions"] and diff < 1e-4, f"embeddings: dimensions differ by {diff}")

print(f"openai {openai.__version__}: {len(failures)} failures")
sys.exit(1 if failures else 0)
