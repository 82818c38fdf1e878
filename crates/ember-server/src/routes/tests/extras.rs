//! Fireworks/OpenAI extras, refusals of what is not supported yet, `/metrics`, and shutdown.

use std::time::Duration;

use super::*;
use crate::testing::test_state;

fn user(content: &str) -> Value {
    json!({"role": "user", "content": content})
}

#[tokio::test]
async fn perf_metrics_go_in_headers_and_on_request_in_the_body() {
    let engine = FakeEngine::new(script("abc"));
    let (status, headers, body) = post_with_headers(
        &engine,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "hi", "max_tokens": 3, "perf_metrics_in_response": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["fireworks-prompt-tokens"], "2");
    assert_eq!(headers["fireworks-cached-prompt-tokens"], "2");
    let ttft: f64 = headers["fireworks-server-time-to-first-token"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let perf = &body["perf_metrics"];
    assert_eq!(
        (
            perf["prompt-tokens"].as_u64(),
            perf["cached-prompt-tokens"].as_u64()
        ),
        (Some(2), Some(2))
    );
    let (first, total) = (
        perf["server-time-to-first-token"].as_f64().unwrap(),
        perf["server-processing-time"].as_f64().unwrap(),
    );
    assert!(0.0 <= first && first <= total && ttft >= 0.0, "{perf}");
    // Without the flag: headers only.
    let (_, headers, body) = post_with_headers(
        &engine,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [user("hi")], "max_tokens": 3}),
    )
    .await;
    assert!(body.get("perf_metrics").is_none());
    assert!(headers.contains_key("fireworks-server-time-to-first-token"));
}

#[tokio::test]
async fn token_ids_and_raw_output_on_request() {
    let engine = FakeEngine::new(vec![HELLO, IM_END]);
    let (status, body) = post(
        &engine,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [user("hi")], "return_token_ids": true, "raw_output": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (prompt, _) = &engine.requests()[0];
    assert_eq!(body["prompt_token_ids"], json!(prompt));
    let choice = &body["choices"][0];
    assert_eq!(choice["token_ids"], json!([HELLO, IM_END]));
    assert_eq!(
        choice["raw_output"],
        json!({"prompt_fragments": ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"],
               "prompt_token_ids": prompt, "completion": "hello<|im_end|>",
               "completion_token_ids": [HELLO, IM_END]})
    );
    let (_, body) = post(
        &engine,
        "/v1/completions",
        json!({"model": "tiny", "prompt": ["hi", [1, 2]], "max_tokens": 1, "return_token_ids": true}),
    )
    .await;
    assert_eq!(body["choices"][0]["prompt_token_ids"], json!([104, 105]));
    assert_eq!(body["choices"][1]["prompt_token_ids"], json!([1, 2]));
    assert_eq!(body["choices"][1]["token_ids"], json!([HELLO]));
    assert!(body.get("prompt_token_ids").is_none());
}

#[tokio::test]
async fn chat_echo_and_echo_last_prepend_the_prompt() {
    let engine = FakeEngine::new(vec![HELLO, IM_END]);
    let (_, body) = post(
        &engine,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [user("hi")], "echo": true}),
    )
    .await;
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello"
    );
    // The last 3 prompt tokens ("n", "t", "\n"), with their logprobs in the legacy format
    // (Fireworks' integer `logprobs`).
    let (_, body) = post(
        &engine,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [user("hi")], "echo_last": 3, "logprobs": 1}),
    )
    .await;
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["content"], "nt\nhello");
    assert_eq!(
        choice["logprobs"]["tokens"],
        json!(["n", "t", "\n", "hello", "<|im_end|>"])
    );
    assert_eq!(choice["logprobs"]["token_logprobs"][0], -0.25);
    let (_, params) = &engine.requests()[1];
    assert_eq!(params.prompt_logprobs, Some(1));
}

#[tokio::test]
async fn best_of_generates_more_and_returns_n() {
    let engine = FakeEngine::new(script("ab"));
    let (status, body) = post(
        &engine,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "hi", "max_tokens": 2, "best_of": 3}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"].as_array().unwrap().len(), 1);
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["choices"][0]["logprobs"], Value::Null);
    // Three candidates ran, scored by their logprobs, and all count in the usage.
    let requests = engine.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests.iter().all(|(_, p)| p.logprobs == Some(0)));
    assert_eq!(body["usage"]["completion_tokens"], 6);
    let (status, body) = post(
        &engine,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "hi", "n": 2, "best_of": 1}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("best_of"))
    );
}

#[tokio::test]
async fn unsupported_features_and_malformed_formats_are_refused_by_name() {
    let engine = FakeEngine::new(script("a"));
    for (path, extra, param) in [
        (
            "/v1/chat/completions",
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": "{not json"}}}),
            "response_format",
        ),
        (
            "/v1/completions",
            json!({"response_format": {"type": "json_schema", "json_schema": {}}}),
            "response_format",
        ),
        (
            "/v1/chat/completions",
            json!({"response_format": {"type": "grammar", "grammar": "x"}}),
            "response_format",
        ),
        (
            "/v1/chat/completions",
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}),
            "tools",
        ),
        ("/v1/completions", json!({"suffix": "end"}), "suffix"),
    ] {
        let mut body = json!({"model": "tiny", "messages": [user("hi")], "prompt": "hi"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, body) = post(&engine, path, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"]["param"], param, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(param),
            "{body}"
        );
    }
    assert!(engine.requests().is_empty());
    // Plain text, user and metadata are fine.
    let (status, body) = post(
        &engine,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [user("hi")], "max_tokens": 1, "response_format": {"type": "text"},
               "user": "u-1", "metadata": {"team": "a"}, "tools": [], "tool_choice": "auto"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn prompt_truncate_len_drops_early_turns_and_keeps_the_system_prompt() {
    let engine = FakeEngine::new(script("a"));
    let (status, body) = post(
        &engine,
        "/v1/chat/completions",
        json!({"model": "tiny", "max_tokens": 1, "prompt_truncate_len": 40, "messages": [
            {"role": "system", "content": "S"}, user("first question"),
            {"role": "assistant", "content": "answer"}, user("q")]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (prompt, _) = &engine.requests()[0];
    assert_eq!(
        byte_level_tokenizer().decode(prompt, false).unwrap(),
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(body["usage"]["prompt_tokens"], prompt.len());
}

#[tokio::test]
async fn metrics_export_engine_and_server_numbers() {
    let engine = FakeEngine::new(script("abc"));
    if let Ok(mut stats) = engine.stats.lock() {
        stats.running = 3;
        stats.waiting = 1;
        stats.kv_blocks_total = 8;
        stats.kv_blocks_used = 2;
        stats.aborted_requests = 5;
        stats.prefix_cache_hits = 7;
    }
    let state = test_state(&engine);
    let call = |request: Request<Body>| router(state.clone()).oneshot(request);
    let response = call(post_json(
        "/v1/completions",
        json!({"model": "tiny", "prompt": "hi", "max_tokens": 3}),
    ))
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    call(Request::get("/v1/nowhere").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let response = call(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = String::from_utf8(
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    for line in [
        "ember:num_requests_running 3",
        "ember:num_requests_waiting 1",
        "ember:kv_cache_usage_perc 0.25",
        "ember:kv_cache_blocks_used 2",
        "ember:kv_cache_blocks_total 8",
        "ember:prefix_cache_queries_total 0",
        "ember:prefix_cache_hits_total 7",
        "ember:num_preemptions_total 0",
        "ember:request_aborted_total 5",
        "ember:prompt_tokens_total 0",
        "ember:generation_tokens_total 0",
        "ember:request_success_total{finished_reason=\"length\"} 1",
        "ember:http_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1",
        "ember:http_requests_total{endpoint=\"unmatched\",status=\"404\"} 1",
        "ember:time_to_first_token_seconds_count 1",
        "ember:time_per_output_token_seconds_count 1",
        "ember:e2e_request_latency_seconds_count 1",
        "ember:request_prompt_tokens_sum 2.0",
        "ember:request_generation_tokens_sum 3.0",
        "ember:request_generation_tokens_bucket{le=\"5.0\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

#[tokio::test]
async fn draining_reports_unhealthy_and_refuses_new_generations() {
    let engine = FakeEngine::new(script("a"));
    let state = test_state(&engine);
    state.shared().lifecycle.begin_drain();
    let call = |request: Request<Body>| router(state.clone()).oneshot(request);
    let health = call(Request::get("/health").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
    let refused = call(post_json(
        "/v1/completions",
        json!({"model": "tiny", "prompt": "hi"}),
    ))
    .await
    .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["retry-after"], "1");
    let models = call(Request::get("/v1/models").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(models.status(), StatusCode::OK);
    assert!(engine.requests().is_empty());
}

#[tokio::test]
async fn the_server_stops_once_running_requests_finish_after_the_signal() {
    let engine = FakeEngine::new(script("a"));
    let state = test_state(&engine);
    let running = state.shared().lifecycle.enter().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (signal_tx, signal_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_until(
        listener,
        state.clone(),
        async move {
            let _ = signal_rx.await;
        },
        Duration::from_secs(10),
    ));
    signal_tx.send(()).unwrap();
    state.shared().lifecycle.draining_started().await;
    // A running request holds the server open...
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!server.is_finished());
    // ...until it ends.
    drop(running);
    let stopped = tokio::time::timeout(Duration::from_secs(5), server).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
}
