//! Router tests against the fake engine: each request goes through the whole axum stack.

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::*;
use crate::testing::{
    byte_level_tokenizer, script, test_state_with_key, FakeEngine, EMOJI_HEAD, EMOJI_TAIL, HELLO,
    IM_END,
};

mod extras;
mod lora;
mod streaming;
mod tools;

fn app(engine: &Arc<FakeEngine>, api_key: Option<&str>) -> Router {
    router(test_state_with_key(engine, api_key))
}

async fn send(app: Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (status, body)
}

fn post_json(path: &str, body: Value) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn post(engine: &Arc<FakeEngine>, path: &str, body: Value) -> (StatusCode, Value) {
    send(app(engine, None), post_json(path, body)).await
}

/// [`post`], with the response headers.
async fn post_with_headers(
    engine: &Arc<FakeEngine>,
    path: &str,
    body: Value,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let response = app(engine, None)
        .oneshot(post_json(path, body))
        .await
        .unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, headers, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn completion_with_defaults() {
    let engine = FakeEngine::new(script("abcdefghijklmnopqrstuvwxyz"));
    let (status, body) = post(
        &engine,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "hello"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["model"], "tiny");
    assert_eq!(
        body["choices"],
        json!([{"text": "abcdefghijklmnop", "index": 0, "logprobs": null, "finish_reason": "length"}])
    );
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 1, "completion_tokens": 16, "total_tokens": 17, "prompt_tokens_details": {"cached_tokens": 1}})
    );
    let (prompt, params) = &engine.requests()[0];
    assert_eq!(prompt, &[HELLO]);
    assert_eq!(params.max_tokens, 16);
}

#[tokio::test]
async fn completion_echo_with_logprobs_scores_the_prompt_with_max_tokens_zero() {
    let engine = FakeEngine::new(script("zzz"));
    let (status, body) = post(
        &engine,
        "/inference/v1/completions",
        json!({"model": "tiny", "prompt": [104, 105], "echo": true, "logprobs": 1, "max_tokens": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["text"], "hi");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(
        choice["logprobs"],
        json!({"tokens": ["h", "i"], "token_logprobs": [null, -0.25], "top_logprobs": [null, {"i": -0.25}],
               "text_offset": [0, 1]})
    );
    assert_eq!(body["usage"]["completion_tokens"], 0);
    // The engine was asked for one token (dropped) and for the prompt's logprobs.
    let (_, params) = &engine.requests()[0];
    assert_eq!(
        (params.max_tokens, params.prompt_logprobs, params.logprobs),
        (1, Some(1), Some(1))
    );
}

#[tokio::test]
async fn completion_logprobs_list_the_sampled_token_and_alternatives() {
    let engine = FakeEngine::new(script("ab"));
    let (_, body) = post(
        &engine,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "q", "max_tokens": 2, "logprobs": 2, "echo": true}),
    )
    .await;
    let logprobs = &body["choices"][0]["logprobs"];
    assert_eq!(body["choices"][0]["text"], "qab");
    assert_eq!(logprobs["tokens"], json!(["q", "a", "b"]));
    assert_eq!(logprobs["top_logprobs"][1], json!({"a": -0.25, "x": -2.0}));
    assert_eq!(logprobs["text_offset"], json!([0, 1, 2]));
}

#[tokio::test]
async fn multiple_prompts_and_n_give_prompt_major_choices_with_derived_seeds() {
    let engine = FakeEngine::new(script("abc"));
    let (status, body) = post(
        &engine,
        "/v1/completions",
        json!({"model": "tiny", "prompt": ["a", "bb"], "n": 2, "seed": 10, "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let indexes: Vec<u64> = body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [0, 1, 2, 3]);
    assert_eq!(body["usage"]["prompt_tokens"], 3);
    assert_eq!(body["usage"]["completion_tokens"], 4);
    let seeds: Vec<Option<u64>> = engine.requests().iter().map(|(_, p)| p.seed).collect();
    assert_eq!(seeds, [Some(10), Some(11), Some(10), Some(11)]);
}

#[tokio::test]
async fn chat_reply_with_stop_string_and_logprobs() {
    let engine = FakeEngine::new(script("Paris. Next"));
    let (status, body) = post(
        &engine,
        "/v1/chat/completions",
        json!({"model": "accounts/fireworks/models/tiny", "messages": [{"role": "user", "content": "hi"}],
               "stop": ". ", "logprobs": true, "top_logprobs": 1, "unknown_field": {"x": 1}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "accounts/fireworks/models/tiny");
    let choice = &body["choices"][0];
    assert_eq!(
        choice["message"],
        json!({"role": "assistant", "content": "Paris", "refusal": null})
    );
    assert_eq!(choice["finish_reason"], "stop");
    let content = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), "Paris. ".len());
    assert_eq!(
        content[0],
        json!({"token": "P", "logprob": -0.25, "bytes": [80],
                                  "top_logprobs": [{"token": "P", "logprob": -0.25, "bytes": [80]}]})
    );
    assert_eq!(choice["logprobs"]["refusal"], Value::Null);
    // The template rendered the conversation; the default max_tokens is the room left.
    let (prompt, params) = &engine.requests()[0];
    let tokenizer = byte_level_tokenizer();
    assert_eq!(
        tokenizer.decode(prompt, false).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(params.max_tokens, 64 - prompt.len());
}

#[tokio::test]
async fn chat_eos_ends_the_reply_and_multibyte_text_survives() {
    let engine = FakeEngine::new(vec![HELLO, EMOJI_HEAD, EMOJI_TAIL, IM_END]);
    let (_, body) = post(
        &engine,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10,
               "chat_template_kwargs": {"enable_thinking": false}}),
    )
    .await;
    assert_eq!(body["choices"][0]["message"]["content"], "hello😀");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 4);
}

#[tokio::test]
async fn context_overflow_is_context_length_exceeded() {
    let engine = FakeEngine::new(script("a"));
    let long = "x ".repeat(40);
    let (status, body) = post(
        &engine,
        "/v1/completions",
        json!({"model": "tiny", "prompt": long}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error"],
        json!({"message": "The prompt is too long: 80, model maximum context length: 64",
               "type": "invalid_request_error", "param": "prompt", "code": "context_length_exceeded"})
    );
    let (status, body) = post(
        &engine,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "user", "content": long}]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["param"], "messages");
    assert!(engine.requests().is_empty());
}

#[tokio::test]
async fn client_faults_are_openai_shaped_4xx() {
    let engine = FakeEngine::new(script("a"));
    let (status, body) = post(
        &engine,
        "/v1/completions",
        json!({"model": "other", "prompt": "x"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "model_not_found");

    let (status, body) = post(
        &engine,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "x", "temperature": 3}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["param"], "temperature");

    let malformed = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from("{\"model\": "))
        .unwrap();
    let (status, body) = send(app(&engine, None), malformed).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let form = Request::post("/v1/completions")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from("model=tiny"))
        .unwrap();
    let (status, body) = send(app(&engine, None), form).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("application/json"));

    let huge = Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(vec![b' '; MAX_BODY_BYTES + 1]))
        .unwrap();
    let (status, body) = send(app(&engine, None), huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let (status, body) = send(
        app(&engine, None),
        Request::get("/v1/nothing").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "unknown_url");

    let (status, body) = send(
        app(&engine, None),
        Request::get("/v1/completions").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(body["error"]["message"].as_str().unwrap().contains("GET"));

    assert!(engine.requests().is_empty());
}

#[tokio::test]
async fn api_key_guards_the_api_but_not_health() {
    let engine = FakeEngine::new(script("a"));
    let models = |auth: Option<&str>| {
        let mut request = Request::get("/v1/models");
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.body(Body::empty()).unwrap()
    };
    let (status, body) = send(app(&engine, Some("sekret")), models(None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let (status, _) = send(app(&engine, Some("sekret")), models(Some("Bearer wrong"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = send(app(&engine, Some("sekret")), models(Some("Bearer sekret"))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(
        app(&engine, Some("sekret")),
        Request::get("/health").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn models_list_retrieve_and_version() {
    let engine = FakeEngine::new(script("a"));
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    let (status, body) = send(app(&engine, None), get("/v1/models")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["object"], "list");
    let card = &body["data"][0];
    assert_eq!(
        (
            card["id"].as_str(),
            card["object"].as_str(),
            card["owned_by"].as_str(),
            card["root"].as_str()
        ),
        (
            Some("tiny"),
            Some("model"),
            Some("ember"),
            Some("/models/tiny")
        )
    );
    assert_eq!(
        (card["parent"].clone(), card["max_model_len"].as_u64()),
        (Value::Null, Some(64))
    );

    let (status, body) = send(
        app(&engine, None),
        get("/inference/v1/models/accounts%2Ffireworks%2Fmodels%2Ftiny"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["id"], "accounts/fireworks/models/tiny");
    let (status, _) = send(
        app(&engine, None),
        get("/v1/models/accounts/fireworks/models/tiny"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = send(app(&engine, None), get("/v1/models/nope")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("model_not_found"))
    );

    let (status, body) = send(app(&engine, None), get("/version")).await;
    assert_eq!(
        (status, body["version"].as_str()),
        (StatusCode::OK, Some(env!("CARGO_PKG_VERSION")))
    );
}
