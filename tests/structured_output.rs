//! End to end: structured output on the demo model over HTTP. Its random weights would never
//! write JSON by themselves, so every valid answer below is the grammar's doing.

mod common;

use common::{Server, MODEL};
use serde_json::{json, Value};

/// The schema of the sampled requests, and a validator for exactly it (the test's own check,
/// independent of the grammar engine).
fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "count": {"type": "integer", "minimum": 0, "maximum": 99},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            "ok": {"type": "boolean"}
        },
        "required": ["name", "count", "tags", "ok"],
        "additionalProperties": false
    })
}

fn valid(v: &Value) -> Result<(), String> {
    let o = v.as_object().ok_or("not an object")?;
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != ["count", "name", "ok", "tags"] {
        return Err(format!("keys {keys:?}"));
    }
    let name = o["name"].as_str().ok_or("name is not a string")?;
    if name.chars().count() > 6 {
        return Err(format!("name {name:?} is longer than 6"));
    }
    let count = o["count"].as_i64().ok_or("count is not an integer")?;
    if !(0..=99).contains(&count) {
        return Err(format!("count {count} out of range"));
    }
    let tags = o["tags"].as_array().ok_or("tags is not an array")?;
    if tags.len() > 3 || !tags.iter().all(|t| ["a", "b", "c"].iter().any(|e| t == e)) {
        return Err(format!("tags {tags:?}"));
    }
    o["ok"].as_bool().ok_or("ok is not a boolean")?;
    Ok(())
}

fn chat(format: Value, seed: u64) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "Answer in JSON."}],
           "chat_template_kwargs": {"enable_thinking": false},
           "temperature": 1.0, "seed": seed, "max_tokens": 120, "response_format": format})
}

#[test]
fn json_schema_json_object_and_gbnf_outputs_always_follow_their_grammar() {
    let server = Server::start(&[]);

    // 100 sampled requests at temperature 1 under a schema: every one validates.
    let format = json!({"type": "json_schema", "json_schema": {"name": "item", "schema": schema(), "strict": true}});
    let responses: Vec<_> = (0..100u64)
        .map(|seed| server.send("/v1/chat/completions", &chat(format.clone(), seed)))
        .collect();
    let mut invalid = Vec::new();
    for (seed, response) in responses.into_iter().enumerate() {
        let body: Value = response.json().unwrap();
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "stop", "seed {seed}: {body}");
        let content = choice["message"]["content"].as_str().unwrap();
        match serde_json::from_str::<Value>(content) {
            Ok(v) => {
                if let Err(e) = valid(&v) {
                    invalid.push(format!("seed {seed}: {e}: {content}"));
                }
            }
            Err(e) => invalid.push(format!("seed {seed}: {e}: {content}")),
        }
    }
    assert!(
        invalid.is_empty(),
        "{} invalid: {invalid:#?}",
        invalid.len()
    );

    // json_object: always an object that parses, on both endpoints and when streamed.
    for seed in 0..10 {
        let (status, body) = server.post(
            "/v1/chat/completions",
            &chat(json!({"type": "json_object"}), seed),
        );
        assert_eq!(status, 200, "{body}");
        let content = body["choices"][0]["message"]["content"].as_str().unwrap();
        if body["choices"][0]["finish_reason"] == "stop" {
            let v: Value =
                serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content}"));
            assert!(v.is_object(), "{content}");
        }
    }
    let (status, body) = server.post(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "x", "max_tokens": 60, "temperature": 1.0, "seed": 1,
                "response_format": {"type": "json_schema", "json_schema": {"name": "i", "schema": schema()}}}),
    );
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["text"].as_str().unwrap();
    valid(&serde_json::from_str(text).unwrap()).unwrap();
    let mut body = chat(format.clone(), 5);
    body["stream"] = json!(true);
    let streamed: String = server
        .stream("/v1/chat/completions", &body)
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    let whole = server
        .post("/v1/chat/completions", &chat(format.clone(), 5))
        .1;
    assert_eq!(
        streamed,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );

    // A GBNF grammar: only its sentences.
    for seed in 0..20 {
        let (status, body) = server.post(
            "/v1/chat/completions",
            &chat(
                json!({"type": "grammar", "grammar": "root ::= \"yes\" | \"no\""}),
                seed,
            ),
        );
        assert_eq!(status, 200, "{body}");
        let content = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(content == "yes" || content == "no", "{content:?}");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
    }

    // Bad schemas and grammars are a 400 naming the problem; the server goes on.
    for (format, needle) in [
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/missing"}}}),
            "missing",
        ),
        (
            json!({"type": "grammar", "grammar": "root ::= item"}),
            "item",
        ),
        (json!({"type": "grammar", "grammar": "root = \"a\""}), "::="),
    ] {
        let (status, body) = server.post("/v1/chat/completions", &chat(format, 0));
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], "response_format", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
    }
    let (status, _) = server.post(
        "/v1/chat/completions",
        &chat(json!({"type": "json_object"}), 1),
    );
    assert_eq!(status, 200);
}
