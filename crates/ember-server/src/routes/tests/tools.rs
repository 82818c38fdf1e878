//! Tool calls and reasoning through the chat route, against a fake engine that "writes" them.

use super::*;
use crate::testing::{test_state, test_state_with_parsers, IM_END};

fn parsing_app(engine: &Arc<FakeEngine>) -> Router {
    router(test_state_with_parsers(engine))
}

async fn chat(engine: &Arc<FakeEngine>, extra: Value) -> (StatusCode, Value) {
    let mut body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    send(parsing_app(engine), post_json("/v1/chat/completions", body)).await
}

/// The SSE chunks of a streamed chat request.
async fn chat_chunks(engine: &Arc<FakeEngine>, extra: Value) -> Vec<Value> {
    let mut body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 400, "stream": true});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let response = parsing_app(engine)
        .oneshot(post_json("/v1/chat/completions", body))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec())
        .unwrap()
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
}

/// What a scripted reply says: a thought, a sentence and two calls, then the eos.
fn reply_script() -> Vec<u32> {
    let mut ids = script(concat!(
        "<think>\nrain?\n</think>\n\nChecking.\n",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>"
    ));
    ids.push(IM_END);
    ids
}

#[tokio::test]
async fn a_reply_with_calls_returns_tool_calls_reasoning_and_content() {
    let engine = FakeEngine::with_context(reply_script(), 1024);
    let (status, body) = chat(&engine, json!({"tools": [weather_tool()]})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let message = &choice["message"];
    assert_eq!(message["reasoning_content"], "rain?");
    assert_eq!(
        message["content"].as_str().map(str::trim),
        Some("Checking.")
    );
    let calls = message["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(calls[0]["function"]["arguments"], r#"{"city":"Paris"}"#);
    assert_eq!(calls[1]["function"]["arguments"], r#"{"city":"Oslo"}"#);
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    assert_ne!(calls[0]["id"], calls[1]["id"]);
    // "<think>\nrain?\n</think>" is 22 byte tokens.
    assert_eq!(
        body["usage"]["completion_tokens_details"]["reasoning_tokens"],
        22
    );
    // parallel_tool_calls: false keeps the first call only.
    let (_, body) = chat(
        &engine,
        json!({"tools": [weather_tool()], "parallel_tool_calls": false}),
    )
    .await;
    assert_eq!(
        body["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn a_streamed_reply_sends_the_name_first_then_argument_pieces() {
    let engine = FakeEngine::with_context(reply_script(), 1024);
    let chunks = chat_chunks(
        &engine,
        json!({"tools": [weather_tool()], "stream_options": {"include_usage": true}}),
    )
    .await;
    let (mut reasoning, mut content) = (String::new(), String::new());
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = None;
    for chunk in &chunks {
        let Some(choice) = chunk["choices"].get(0) else {
            assert_eq!(
                chunk["usage"]["completion_tokens_details"]["reasoning_tokens"],
                22
            );
            continue;
        };
        let delta = &choice["delta"];
        reasoning += delta["reasoning_content"].as_str().unwrap_or("");
        content += delta["content"].as_str().unwrap_or("");
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = call["index"].as_u64().unwrap() as usize;
            if let Some(id) = call["id"].as_str() {
                assert_eq!(index, calls.len());
                assert_eq!(call["type"], "function");
                let name = call["function"]["name"].as_str().unwrap().to_string();
                calls.push((id.to_string(), name, String::new()));
            } else {
                assert!(
                    call["function"].get("name").is_none(),
                    "the name comes once"
                );
            }
            calls[index].2 += call["function"]["arguments"].as_str().unwrap_or("");
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    assert_eq!(reasoning, "rain?");
    assert_eq!(content.trim(), "Checking.");
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(calls.len(), 2);
    let args: Value = serde_json::from_str(&calls[1].2).unwrap();
    assert_eq!(args, json!({"city": "Oslo"}));
    assert_eq!(calls[0].1, "get_weather");
}

#[tokio::test]
async fn malformed_calls_come_back_as_content() {
    let text =
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": Par}}\n</tool_call>";
    let mut ids = script(text);
    ids.push(IM_END);
    let engine = FakeEngine::with_context(ids, 1024);
    let (status, body) = chat(&engine, json!({"tools": [weather_tool()]})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["content"], text);
    assert!(choice["message"].get("tool_calls").is_none());
    assert_ne!(choice["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn a_required_call_is_constrained_and_tool_requests_are_checked() {
    let engine = FakeEngine::with_context(reply_script(), 1024);
    let (status, body) = chat(
        &engine,
        json!({"tools": [weather_tool()], "tool_choice": "required"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, params) = engine.requests().pop().unwrap();
    let constraint = params.constraint.expect("a forced call is constrained");
    assert_eq!(constraint.0.describe(), "grammar");
    // Auto leaves decoding free.
    chat(&engine, json!({"tools": [weather_tool()]})).await;
    assert!(engine.requests().pop().unwrap().1.constraint.is_none());

    for (extra, param) in [
        (
            json!({"tools": [weather_tool()], "tool_choice": "required", "response_format": {"type": "json_object"}}),
            "tool_choice",
        ),
        (
            json!({"tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "other"}}}),
            "tool_choice",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "has space"}}]}),
            "tools",
        ),
        (json!({"reasoning_effort": "extreme"}), "reasoning_effort"),
    ] {
        let (status, body) = chat(&engine, extra.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {body}");
        assert_eq!(body["error"]["param"], param, "{body}");
    }
    // A server without a tool-call format refuses tools by name, but not tool_choice none.
    let (status, body) = send(
        router(test_state(&engine)),
        post_json(
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [weather_tool()]}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "tools");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--tool-call-parser"));
    let (status, body) = send(
        router(test_state(&engine)),
        post_json(
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                   "tools": [weather_tool()], "tool_choice": "none"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
