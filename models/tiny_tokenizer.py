#!/usr/bin/env python3
"""The tokenizer of ember's tiny fixtures: a byte-level BPE, Qwen2/3-style, trained here on license
texts of this machine plus a little code and chat text; its tokenizer_config.json (with Qwen3's chat
template), and generation_config.json. Used by make_tiny_models.py, which the other fixture scripts
build on.
"""
import hashlib
import json
import shutil
from pathlib import Path

# The Qwen3 chat template, verbatim as shipped in Qwen/Qwen3-* tokenizer_config.json ("chat_template"),
# Apache-2.0, (c) Alibaba Cloud / Qwen team. Needed byte-for-byte for chat-template compatibility tests.
QWEN3_CHAT_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}'''

HERE = Path(__file__).resolve().parent
LICENSE_DIR = Path("/usr/share/common-licenses")
# Distinct license texts (GPL == GPL-3, LGPL == LGPL-3, GFDL == GFDL-1.3 on Debian/Ubuntu).
LICENSE_FILES = [
    "Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.2", "GFDL-1.3", "GPL-1", "GPL-2",
    "GPL-3", "LGPL-2", "LGPL-2.1", "LGPL-3", "MPL-1.1", "MPL-2.0",
]
# A little extra text so that code, JSON and chat-ish strings get some merges too.
EXTRA_CORPUS = '''
def greet(name: str) -> str:
    """Return a friendly greeting for the given name."""
    return f"Hello, {name}! How are you today?"

class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, step=1):
        self.value += step
        return self.value

for i in range(10):
    if i % 2 == 0:
        print(i, "is even")
    else:
        print(i, "is odd")

{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}
{"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
The user asked a question. The assistant thinks step by step and then answers.
What is the capital of France? The capital of France is Paris.
How many legs does a spider have? A spider has eight legs.
Please summarize the following text in one sentence.
You are a helpful assistant. Answer briefly and accurately.
'''

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]            # special=True
EXTRA_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                      "<think>", "</think>"]                                  # special=False (like Qwen3)
TOKENIZER_TOTAL = 2000          # base BPE vocab + 9 added tokens
QWEN2_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

def log(*a):
    print(*a, flush=True)


def write_json(path, obj, indent=2):
    path = Path(path)
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def corpus_texts():
    texts = []
    for name in LICENSE_FILES:
        p = LICENSE_DIR / name
        if not p.exists():
            raise SystemExit(f"missing corpus file {p}")
        texts.append(p.read_text(encoding="utf-8", errors="replace"))
    texts.append(EXTRA_CORPUS)
    return texts


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

def build_tokenizer(out_dir: Path, prompts):
    """Trains the tokenizer into out_dir; `prompts` must encode the same after its JSON round trip."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                            processors, trainers)

    texts = corpus_texts()
    h = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    log(f"tokenizer corpus: {sum(len(t) for t in texts)} chars, sha256 {h}")

    tok = Tokenizer(models.BPE(dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    n_added = len(SPECIAL_TOKENS) + len(EXTRA_ADDED_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_TOTAL - n_added, min_frequency=2, show_progress=False,
                                  special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    base = tok.get_vocab_size(with_added_tokens=False)
    if base != TOKENIZER_TOTAL - n_added:
        raise SystemExit(f"BPE training produced {base} tokens, expected {TOKENIZER_TOTAL - n_added}")
    tok.add_special_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                       special=True) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=False)
                    for t in EXTRA_ADDED_TOKENS])
    assert tok.get_vocab_size(with_added_tokens=True) == TOKENIZER_TOTAL
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    # Make the file look like Qwen2.5/Qwen3's tokenizer.json: the Python ByteLevel decoder constructor ignores its
    # options, BPE prefix/suffix are "" rather than null, and merges are "a b" strings (the older, still most common
    # serialisation; byte-level tokens never contain a literal space).
    tj = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tj["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tj["model"]["continuing_subword_prefix"] = ""
    tj["model"]["end_of_word_suffix"] = ""
    assert all(" " not in a and " " not in b for a, b in tj["model"]["merges"])
    tj["model"]["merges"] = [f"{a} {b}" for a, b in tj["model"]["merges"]]
    write_json(out_dir / "tokenizer.json", tj)
    before = [tok.encode(t).ids for t in texts[:3] + prompts]
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    assert [tok.encode(t).ids for t in texts[:3] + prompts] == before
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + EXTRA_ADDED_TOKENS}
    return tok, ids, h


def tokenizer_config(ids, with_template: bool):
    added = {}
    for t in SPECIAL_TOKENS + EXTRA_ADDED_TOKENS:
        added[str(ids[t])] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": t in SPECIAL_TOKENS}
    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
    }
    if with_template:
        cfg["chat_template"] = QWEN3_CHAT_TEMPLATE
    cfg.update({
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    return cfg


def write_tokenizer_files(model_dir: Path, tok_json_src: Path, ids, jinja_file: bool):
    shutil.copyfile(tok_json_src, model_dir / "tokenizer.json")
    write_json(model_dir / "tokenizer_config.json", tokenizer_config(ids, with_template=not jinja_file))
    jinja = model_dir / "chat_template.jinja"
    if jinja_file:
        jinja.write_text(QWEN3_CHAT_TEMPLATE, encoding="utf-8")
    elif jinja.exists():
        jinja.unlink()


def generation_config(ids):
    import transformers
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
        "transformers_version": transformers.__version__,
    }
