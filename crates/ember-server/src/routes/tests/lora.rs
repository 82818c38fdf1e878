//! LoRA adapters through the router: load and unload, listing, selection by `model`, errors,
//! per-adapter metrics. The fake engine reads and checks adapters for real (over qwen3-tiny's
//! projections) and records which one each request ran with.

use ember_engine::LoraConfig;

use super::*;
use crate::state::AppState;
use crate::testing::{fixture_dir, test_state, test_state_with_key};

/// An engine serving adapters up to rank 8, like `--enable-lora --max-lora-rank 8`.
fn lora_engine() -> Arc<FakeEngine> {
    FakeEngine::serving_adapters(
        script("abc"),
        LoraConfig {
            max_lora_rank: 8,
            ..LoraConfig::default()
        },
    )
}

fn adapter_path(name: &str) -> String {
    fixture_dir("lora").join(name).display().to_string()
}

/// Sends `request` to `state`'s router; the status and the body as text.
async fn call(state: &AppState, request: Request<Body>) -> (StatusCode, String) {
    let response = router(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn call_json(state: &AppState, request: Request<Body>) -> (StatusCode, Value) {
    let (status, text) = call(state, request).await;
    (status, serde_json::from_str(&text).unwrap())
}

async fn load(state: &AppState, body: Value) -> (StatusCode, String) {
    call(state, post_json("/v1/load_lora_adapter", body)).await
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

#[tokio::test]
async fn an_adapter_loads_lists_answers_by_name_and_unloads() {
    let engine = lora_engine();
    let state = test_state(&engine);
    let (status, text) = load(
        &state,
        json!({"lora_name": "attn", "lora_path": adapter_path("qwen3-tiny-attn-r8")}),
    )
    .await;
    assert_eq!(
        (status, text.as_str()),
        (
            StatusCode::OK,
            "Success: LoRA adapter 'attn' added successfully."
        )
    );

    let (_, models) = call_json(&state, get("/v1/models")).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "attn"]);
    let card = &models["data"][1];
    let root = std::fs::canonicalize(adapter_path("qwen3-tiny-attn-r8")).unwrap();
    assert_eq!(
        (&card["parent"], &card["root"], &card["owned_by"]),
        (
            &json!("tiny"),
            &json!(root.display().to_string()),
            &json!("ember")
        )
    );
    assert_eq!(models["data"][0]["parent"], Value::Null);
    let (status, card) = call_json(
        &state,
        get("/inference/v1/models/accounts%2Ffireworks%2Fmodels%2Fattn"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{card}");
    assert_eq!(
        (&card["id"], &card["parent"]),
        (&json!("accounts/fireworks/models/attn"), &json!("tiny"))
    );

    // By plain name, in Fireworks' form, and the base model: each request runs with its adapter
    // and the answer names the model as asked.
    for (path, model, body) in [
        (
            "/v1/completions",
            "attn",
            json!({"prompt": "hello", "max_tokens": 3}),
        ),
        (
            "/inference/v1/chat/completions",
            "accounts/fireworks/models/attn#accounts/fireworks/deployments/d1",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        ),
        (
            "/v1/completions",
            "tiny",
            json!({"prompt": "hello", "max_tokens": 1}),
        ),
    ] {
        let mut body = body;
        body["model"] = json!(model);
        let (status, answer) = call_json(&state, post_json(path, body)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["model"], model);
    }
    assert_eq!(
        engine.adapters(),
        [Some("attn".to_string()), Some("attn".to_string()), None]
    );

    let (status, text) = call(&state, get("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    let chat_prompt_tokens = engine.requests()[1].0.len();
    for line in [
        "ember:lora_requests_total{lora_name=\"attn\"} 2".to_string(),
        format!(
            "ember:lora_prompt_tokens_total{{lora_name=\"attn\"}} {}",
            1 + chat_prompt_tokens
        ),
        "ember:lora_generation_tokens_total{lora_name=\"attn\"} 5".to_string(),
        "ember:lora_adapters_registered 1".to_string(),
        "ember:lora_adapters_resident 1".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }

    let unload = || post_json("/v1/unload_lora_adapter", json!({"lora_name": "attn"}));
    let (status, text) = call(&state, unload()).await;
    assert_eq!(
        (status, text.as_str()),
        (
            StatusCode::OK,
            "Success: LoRA adapter 'attn' removed successfully."
        )
    );
    let (status, body) = call_json(
        &state,
        post_json(
            "/v1/completions",
            json!({"model": "attn", "prompt": "hello"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "model_not_found");
    let (status, body) = call_json(&state, unload()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body,
        json!({"error": {"message": "The lora adapter 'attn' cannot be found.",
                         "type": "invalid_request_error", "param": null, "code": "model_not_found"}})
    );
    let (_, models) = call_json(&state, get("/v1/models")).await;
    assert_eq!(models["data"].as_array().unwrap().len(), 1);
    let (_, text) = call(&state, get("/metrics")).await;
    assert!(text
        .lines()
        .any(|l| l == "ember:lora_adapters_registered 0"));
    // Counters outlive the adapter.
    assert!(text
        .lines()
        .any(|l| l == "ember:lora_requests_total{lora_name=\"attn\"} 2"));
}

#[tokio::test]
async fn bad_loads_are_400_and_failed_loads_412_naming_the_fault() {
    let engine = lora_engine();
    let state = test_state(&engine);
    let attn = adapter_path("qwen3-tiny-attn-r8");
    assert_eq!(
        load(&state, json!({"lora_name": "attn", "lora_path": attn}))
            .await
            .0,
        StatusCode::OK
    );
    let cases = [
        (json!({"lora_path": attn}), "lora_name", "must be provided"),
        (
            json!({"lora_name": "x", "lora_path": ""}),
            "lora_path",
            "must be provided",
        ),
        (
            json!({"lora_name": 3, "lora_path": attn}),
            "lora_name",
            "Invalid 'lora_name'",
        ),
        (
            json!({"lora_name": "x", "lora_path": attn, "load_inplace": true}),
            "load_inplace",
            "not supported",
        ),
    ];
    for (body, param, message) in cases {
        let (status, error) =
            call_json(&state, post_json("/v1/load_lora_adapter", body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error["error"]["param"], param, "{body}");
        let text = error["error"]["message"].as_str().unwrap();
        assert!(text.contains(message), "{body}: {text}");
    }
    let cases = [
        (
            json!({"lora_name": "attn", "lora_path": attn}),
            "The lora adapter 'attn' has already been loaded.",
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"lora_name": "tiny", "lora_path": attn}),
            "conflicts with a served base model",
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"lora_name": "accounts/me/models/tiny", "lora_path": attn}),
            "conflicts with a served base model",
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"lora_name": "a#b", "lora_path": attn}),
            "'#'",
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"lora_name": "x", "lora_path": adapter_path("missing")}),
            "is not a directory",
            StatusCode::PRECONDITION_FAILED,
        ),
        (
            json!({"lora_name": "x", "lora_path": fixture_dir("qwen3-tiny")}),
            "adapter_config.json",
            StatusCode::PRECONDITION_FAILED,
        ),
        (
            json!({"lora_name": "all", "lora_path": adapter_path("qwen3-tiny-all-r16")}),
            "rank 16, above --max-lora-rank 8",
            StatusCode::PRECONDITION_FAILED,
        ),
        (
            json!({"lora_name": "ds", "lora_path": adapter_path("deepseek-v3-tiny-mla")}),
            "is not a projection of this model",
            StatusCode::PRECONDITION_FAILED,
        ),
    ];
    for (body, message, code) in cases {
        let (status, error) =
            call_json(&state, post_json("/v1/load_lora_adapter", body.clone())).await;
        assert_eq!(status, code, "{body}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
        let text = error["error"]["message"].as_str().unwrap();
        assert!(text.contains(message), "{body}: {text}");
    }
    let (status, error) = call_json(&state, post_json("/v1/unload_lora_adapter", json!({}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["param"], "lora_name");
    // Only the first load took.
    let (_, models) = call_json(&state, get("/v1/models")).await;
    assert_eq!(models["data"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn without_lora_the_adapter_routes_are_400_and_unknown_models_404() {
    let engine = FakeEngine::new(script("a"));
    let state = test_state(&engine);
    for (path, body) in [
        (
            "/v1/load_lora_adapter",
            json!({"lora_name": "attn", "lora_path": adapter_path("qwen3-tiny-attn-r8")}),
        ),
        (
            "/inference/v1/unload_lora_adapter",
            json!({"lora_name": "attn"}),
        ),
    ] {
        let (status, error) = call_json(&state, post_json(path, body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--enable-lora"),
            "{error}"
        );
    }
    let (status, _) = call_json(
        &state,
        post_json("/v1/completions", json!({"model": "attn", "prompt": "a"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_adapter_routes_need_the_api_key() {
    let engine = lora_engine();
    let state = test_state_with_key(&engine, Some("sekrit"));
    let body = json!({"lora_name": "attn", "lora_path": adapter_path("qwen3-tiny-attn-r8")});
    let (status, error) = call_json(&state, post_json("/v1/load_lora_adapter", body.clone())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error["error"]["code"], "invalid_api_key");
    let mut request = post_json("/v1/load_lora_adapter", body);
    request
        .headers_mut()
        .insert("authorization", "Bearer sekrit".parse().unwrap());
    assert_eq!(call(&state, request).await.0, StatusCode::OK);
    let (status, _) = call(
        &state,
        post_json("/v1/unload_lora_adapter", json!({"lora_name": "attn"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
