//! End to end: tool calls and reasoning over HTTP on the tiny checkpoints of every family, each
//! with its real chat template and tool-call markers (DeepSeek's and Kimi's are special tokens).
//! Random weights never call a tool by themselves, so every forced call below is the grammar's
//! doing, and it must read back through the family's parser.

mod common;

use common::{model_dir, Server};
use serde_json::{json, Value};

const NAME: &str = "m";

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city", "strict": true,
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 8},
            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"], "additionalProperties": false}}})
}

fn time_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"], "additionalProperties": false}}})
}

/// The test's own check of a call against its tool's schema.
fn valid_call(name: &str, arguments: &str) -> Result<(), String> {
    let args: Value = serde_json::from_str(arguments).map_err(|e| format!("{e}: {arguments}"))?;
    let o = args.as_object().ok_or("arguments are not an object")?;
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    match name {
        "get_weather" => {
            if keys != ["city", "days"] {
                return Err(format!("keys {keys:?}"));
            }
            let city = o["city"].as_str().ok_or("city is not a string")?;
            if city.chars().count() > 8 {
                return Err(format!("city {city:?} too long"));
            }
            let days = o["days"].as_i64().ok_or("days is not an integer")?;
            if !(1..=7).contains(&days) {
                return Err(format!("days {days}"));
            }
        }
        "get_time" => {
            if keys != ["zone"] || !(o["zone"] == "UTC" || o["zone"] == "CET") {
                return Err(format!("{args}"));
            }
        }
        other => return Err(format!("unknown tool {other:?}")),
    }
    Ok(())
}

fn chat(extra: Value) -> Value {
    // Thinking off: a forced reply of a thinking model may think first, and random weights
    // would think until max_tokens (the thinking prefix is covered by chat_tools' unit tests).
    let mut body = json!({"model": NAME, "messages": [{"role": "user", "content": "Weather in Paris?"}],
                          "max_tokens": 120, "tools": [weather_tool(), time_tool()],
                          "reasoning_effort": "none"});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

/// (name, arguments) of each call in a whole response, checked for shape.
fn calls_of(body: &Value) -> Vec<(String, String)> {
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    assert!(choice["message"]["content"].is_null(), "{body}");
    choice["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls: {body}"))
        .iter()
        .map(|call| {
            assert_eq!(call["type"], "function");
            assert!(call["id"].as_str().is_some_and(|id| !id.is_empty()));
            (
                call["function"]["name"].as_str().unwrap().to_string(),
                call["function"]["arguments"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// (name, arguments) of each call of a stream, from the deltas as a client adds them up.
fn streamed_calls(chunks: &[Value]) -> (Vec<(String, String)>, Option<String>) {
    let mut calls: Vec<(String, String)> = Vec::new();
    let mut finish = None;
    for chunk in chunks {
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        for call in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let index = call["index"].as_u64().unwrap() as usize;
            if let Some(name) = call["function"]["name"].as_str() {
                assert_eq!(index, calls.len(), "calls open in order");
                assert!(call["id"].is_string() && call["type"] == "function");
                calls.push((name.to_string(), String::new()));
            }
            calls[index].1 += call["function"]["arguments"].as_str().unwrap_or("");
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    (calls, finish)
}

fn same_calls(a: &[(String, String)], b: &[(String, String)]) -> bool {
    let parse = |s: &str| serde_json::from_str::<Value>(s).ok();
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.0 == y.0 && parse(&x.1).is_some() && parse(&x.1) == parse(&y.1))
}

/// Forced calls on one server: sampled `required` calls all parse and validate, a named
/// choice calls that tool, and the streamed form adds up to the whole one.
fn forced_calls_parse(server: &Server, family: &str) {
    let mut invalid = Vec::new();
    for seed in 0..12u64 {
        // One call per reply: random weights, free to add calls, may not stop adding them.
        let body = chat(
            json!({"tool_choice": "required", "parallel_tool_calls": false,
                               "temperature": 1.0, "seed": seed}),
        );
        let (status, whole) = server.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{family}: {whole}");
        let calls = calls_of(&whole);
        assert!(!calls.is_empty(), "{family}");
        for (name, arguments) in &calls {
            if let Err(e) = valid_call(name, arguments) {
                invalid.push(format!("{family} seed {seed}: {e}"));
            }
        }
        let mut streaming = body.clone();
        streaming["stream"] = json!(true);
        let (streamed, finish) = streamed_calls(&server.stream("/v1/chat/completions", &streaming));
        assert_eq!(
            finish.as_deref(),
            Some("tool_calls"),
            "{family} seed {seed}"
        );
        assert!(
            same_calls(&streamed, &calls),
            "{family} seed {seed}: streamed {streamed:?} vs whole {calls:?}"
        );
    }
    assert!(invalid.is_empty(), "{invalid:#?}");

    let named = chat(
        json!({"tool_choice": {"type": "function", "function": {"name": "get_time"}},
                            "parallel_tool_calls": false, "temperature": 1.0, "seed": 7}),
    );
    let (status, body) = server.post("/v1/chat/completions", &named);
    assert_eq!(status, 200, "{family}: {body}");
    let calls = calls_of(&body);
    assert_eq!(calls.len(), 1, "{family}: {body}");
    assert_eq!(calls[0].0, "get_time");
    valid_call(&calls[0].0, &calls[0].1).unwrap();
}

#[test]
fn forced_tool_calls_parse_in_every_family() {
    let v31_template = model_dir("deepseek-v3.1-template");
    for (family, model, extra) in [
        ("qwen3", "qwen3-moe-tiny", vec![]),
        ("deepseek_v3", "deepseek-v3-tiny", vec![]),
        (
            "deepseek_v31",
            "deepseek-v3-tiny",
            vec!["--tokenizer", v31_template.to_str().unwrap()],
        ),
        ("kimi_k2", "kimi-k2-tiny", vec![]),
    ] {
        let mut flags = vec!["--served-model-name", NAME];
        flags.extend(extra.iter().copied());
        let server = Server::start_model(model, &flags);
        forced_calls_parse(&server, family);
    }
}

#[test]
fn the_tool_result_turn_renders_and_answers() {
    let server = Server::start(&["--served-model-name", NAME]);
    let body = json!({"model": NAME, "max_tokens": 8, "raw_output": true, "tools": [weather_tool()],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}
    ]});
    let (status, body) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{body}");
    let prompt = body["choices"][0]["raw_output"]["prompt_fragments"]
        .as_array()
        .map(|parts| parts.iter().filter_map(Value::as_str).collect::<String>())
        .or_else(|| {
            body["choices"][0]["raw_output"]["prompt"]
                .as_str()
                .map(str::to_string)
        })
        .unwrap_or_default();
    // The template rendered the earlier call and its result, as in training.
    assert!(
        prompt.contains("<tool_response>\nsunny, 21C\n</tool_response>"),
        "{body}"
    );
    let call = prompt
        .find("<tool_call>")
        .map(|at| &prompt[at..])
        .unwrap_or("");
    assert!(
        call.contains("get_weather") && call.contains("Paris"),
        "{body}"
    );
    assert!(
        body["choices"][0]["message"]["content"].is_string(),
        "{body}"
    );
}

#[test]
fn thinking_goes_to_reasoning_content() {
    // DeepSeek V3.1 in thinking mode ends the prompt with <think>: the reply starts inside the
    // thinking, and random weights seldom close it.
    let v31_template = model_dir("deepseek-v3.1-template");
    let server = Server::start_model(
        "deepseek-v3-tiny",
        &[
            "--served-model-name",
            NAME,
            "--tokenizer",
            v31_template.to_str().unwrap(),
        ],
    );
    let body = json!({"model": NAME, "messages": [{"role": "user", "content": "Why?"}],
                      "max_tokens": 16, "temperature": 0, "reasoning_effort": "high"});
    let (status, thinking) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{thinking}");
    let message = &thinking["choices"][0]["message"];
    let reasoning = message["reasoning_content"].as_str().unwrap_or("");
    assert!(!reasoning.is_empty(), "{thinking}");
    assert!(!reasoning.contains("</think>"), "{thinking}");
    let reasoning_tokens = thinking["usage"]["completion_tokens_details"]["reasoning_tokens"]
        .as_u64()
        .unwrap();
    assert!(reasoning_tokens >= 1, "{thinking}");
    // The same request streamed adds up to the same split.
    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    let chunks = server.stream("/v1/chat/completions", &streaming);
    let field = |name: &str| -> String {
        chunks
            .iter()
            .filter_map(|c| c["choices"].get(0)?["delta"][name].as_str())
            .collect()
    };
    assert_eq!(field("reasoning_content"), reasoning);
    assert_eq!(
        field("content"),
        message["content"].as_str().unwrap_or(""),
        "{thinking}"
    );
    // reasoning_effort none closes the thinking in the prompt: nothing is reasoning.
    let mut off = body.clone();
    off["reasoning_effort"] = json!("none");
    let (status, plain) = server.post("/v1/chat/completions", &off);
    assert_eq!(status, 200, "{plain}");
    assert!(
        plain["choices"][0]["message"]
            .get("reasoning_content")
            .is_none(),
        "{plain}"
    );
    assert_eq!(
        plain["usage"]["completion_tokens_details"]["reasoning_tokens"],
        0
    );
}
