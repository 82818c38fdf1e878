//! `/v1/embeddings` through the real `ember serve` on the tiny Qwen3-Embedding checkpoint
//! (detected as an embedding model from its sentence-transformers files): float and base64
//! vectors against transformers' float32 references, `dimensions`, token-id inputs, usage,
//! OpenAI-shaped errors, a client that hangs up; and a chat model that serves no embeddings.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{prompt, reference_of, Server};
use serde_json::{json, Value};

const EMBEDDING_MODEL: &str = "qwen3-embedding-tiny";
/// Largest |ember − transformers| allowed on a component of a normalised embedding (fp32 both
/// sides).
const TOL: f64 = 1e-4;

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn assert_close(what: &str, ours: &[f64], theirs: &[f64]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let worst = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        worst <= TOL,
        "{what}: max |ember - transformers| {worst} > {TOL}"
    );
}

/// The float32 values of a base64 embedding, decoded as openai-python does (numpy.frombuffer).
fn decode_base64(s: &str) -> Vec<f64> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
    bytes
        .chunks_exact(4)
        .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        .collect()
}

fn embed(server: &Server, body: Value) -> Value {
    let (status, answer) = server.post("/v1/embeddings", &body);
    assert_eq!(status, 200, "{answer}");
    answer
}

fn error_of(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let (status, answer) = server.post(path, &body);
    (status, answer["error"].clone())
}

#[test]
fn embeddings_match_transformers_in_every_input_form() {
    let server = Server::start_model(EMBEDDING_MODEL, &[]);
    let reference = reference_of(EMBEDDING_MODEL);
    let inputs = reference["inputs"].as_array().unwrap();
    let texts: Vec<&str> = inputs.iter().map(|i| i["text"].as_str().unwrap()).collect();

    // A list of strings, float (the default): one vector per input, in order.
    let answer = embed(&server, json!({"model": EMBEDDING_MODEL, "input": texts}));
    assert_eq!(answer["object"], "list");
    assert_eq!(answer["model"], EMBEDDING_MODEL);
    let data = answer["data"].as_array().unwrap();
    assert_eq!(data.len(), inputs.len());
    for (i, (d, want)) in data.iter().zip(inputs).enumerate() {
        assert_eq!(
            (d["object"].as_str(), d["index"].as_u64()),
            (Some("embedding"), Some(i as u64))
        );
        assert_close(
            &format!("input {i}"),
            &floats(&d["embedding"]),
            &floats(&want["embedding"]),
        );
    }
    // Usage counts every input's tokens, the appended <|endoftext|> included.
    let tokens: u64 = inputs
        .iter()
        .map(|i| i["token_ids"].as_array().unwrap().len() as u64)
        .sum();
    assert_eq!(
        answer["usage"],
        json!({"prompt_tokens": tokens, "total_tokens": tokens})
    );

    // base64: little-endian float32 bytes, the same vectors.
    let answer = embed(
        &server,
        json!({"model": EMBEDDING_MODEL, "input": texts[3], "encoding_format": "base64", "user": "u-1"}),
    );
    let b64 = answer["data"][0]["embedding"]
        .as_str()
        .expect("a base64 string");
    assert_close(
        "base64",
        &decode_base64(b64),
        &floats(&inputs[3]["embedding"]),
    );

    // dimensions: truncated, then normalised again.
    for case in reference["dimensions"].as_array().unwrap() {
        let text = texts[case["input"].as_u64().unwrap() as usize];
        let dims = case["dimensions"].as_u64().unwrap();
        let answer = embed(
            &server,
            json!({"model": EMBEDDING_MODEL, "input": text, "dimensions": dims}),
        );
        let got = floats(&answer["data"][0]["embedding"]);
        assert_eq!(got.len() as u64, dims);
        assert_close(
            &format!("dimensions {dims}"),
            &got,
            &floats(&case["embedding"]),
        );
    }

    // Token ids are used as given (no <|endoftext|> appended): one list, or a list of lists.
    let token_inputs = reference["token_inputs"].as_array().unwrap();
    let first = &token_inputs[0];
    let answer = embed(
        &server,
        json!({"model": EMBEDDING_MODEL, "input": first["token_ids"]}),
    );
    assert_close(
        "token ids",
        &floats(&answer["data"][0]["embedding"]),
        &floats(&first["embedding"]),
    );
    let lists: Vec<&Value> = token_inputs.iter().map(|t| &t["token_ids"]).collect();
    let answer = embed(&server, json!({"model": EMBEDDING_MODEL, "input": lists}));
    for (i, (d, want)) in answer["data"]
        .as_array()
        .unwrap()
        .iter()
        .zip(token_inputs)
        .enumerate()
    {
        assert_close(
            &format!("token list {i}"),
            &floats(&d["embedding"]),
            &floats(&want["embedding"]),
        );
    }
    let tokens: usize = token_inputs
        .iter()
        .map(|t| t["token_ids"].as_array().unwrap().len())
        .sum();
    assert_eq!(answer["usage"]["prompt_tokens"], tokens);

    // The Fireworks prefix serves the same.
    let (status, answer) = server.post(
        "/inference/v1/embeddings",
        &json!({"model": EMBEDDING_MODEL, "input": texts[1]}),
    );
    assert_eq!(status, 200, "{answer}");
    assert_close(
        "/inference/v1",
        &floats(&answer["data"][0]["embedding"]),
        &floats(&inputs[1]["embedding"]),
    );
}

#[test]
fn bad_embedding_requests_are_openai_400s_naming_the_parameter() {
    let server = Server::start_model(EMBEDDING_MODEL, &["--max-model-len", "64"]);
    let m = EMBEDDING_MODEL;
    let cases = [
        (json!({"model": m}), "input"),
        (json!({"model": m, "input": ""}), "input"),
        (json!({"model": m, "input": []}), "input"),
        (json!({"model": m, "input": [[]]}), "input"),
        (json!({"model": m, "input": [1, -2]}), "input"),
        (json!({"model": m, "input": [5000]}), "input"),
        (json!({"model": m, "input": {"text": "a"}}), "input"),
        (json!({"model": m, "input": prompt(1, 65)}), "input"),
        (
            json!({"model": m, "input": "a", "dimensions": 0}),
            "dimensions",
        ),
        (
            json!({"model": m, "input": "a", "dimensions": 65}),
            "dimensions",
        ),
        (
            json!({"model": m, "input": "a", "encoding_format": "int8"}),
            "encoding_format",
        ),
    ];
    for (body, param) in cases {
        let (status, error) = error_of(&server, "/v1/embeddings", body.clone());
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["param"], param, "{body}: {error}");
        assert_eq!(error["type"], "invalid_request_error", "{body}");
    }
    let (status, error) = error_of(
        &server,
        "/v1/embeddings",
        json!({"model": m, "input": prompt(1, 65)}),
    );
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("context_length_exceeded")),
        "{error}"
    );
    let (status, _) = error_of(
        &server,
        "/v1/embeddings",
        json!({"model": "nope", "input": "a"}),
    );
    assert_eq!(status, 404);
    // An input of exactly max-model-len tokens is fine.
    let answer = embed(&server, json!({"model": m, "input": prompt(1, 64)}));
    assert_eq!(answer["usage"]["prompt_tokens"], 64);

    // An embedding model generates nothing.
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": m, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "hi", "max_tokens": 2}),
        ),
    ] {
        let (status, error) = error_of(&server, path, body);
        assert_eq!(status, 400, "{path}: {error}");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("embeddings only"),
            "{path}: {error}"
        );
    }
}

#[test]
fn a_chat_model_serves_no_embeddings() {
    let server = Server::start(&[]);
    let (status, error) = error_of(
        &server,
        "/v1/embeddings",
        json!({"model": common::MODEL, "input": "hello"}),
    );
    assert_eq!(status, 400, "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.starts_with("This model does not support embeddings"),
        "{message}"
    );
    assert!(message.contains("--task embed"), "{message}");
}

#[test]
fn forced_tasks_override_detection() {
    // --task embed on the chat model's own checkpoint: its body (under `model.`) embeds.
    let server = Server::start_model("qwen3-tiny", &["--task", "embed"]);
    let answer = embed(&server, json!({"model": "qwen3-tiny", "input": "License"}));
    let v = floats(&answer["data"][0]["embedding"]);
    assert_eq!(v.len(), 64);
    let norm: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "{norm}");
}

#[test]
fn a_client_that_hangs_up_cancels_its_embeddings() {
    // 32 different inputs of 2000 tokens at 16 tokens a step: far more than 300 ms of work.
    let server = Server::start_model(EMBEDDING_MODEL, &["--max-num-batched-tokens", "16"]);
    let inputs: Vec<Vec<u32>> = (0..32).map(|seed| prompt(seed, 2000)).collect();
    let impatient = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let r = impatient
        .post(format!("{}/v1/embeddings", server.base))
        .json(&json!({"model": EMBEDDING_MODEL, "input": inputs}))
        .send();
    assert!(r.is_err(), "64000 tokens cannot be embedded in 300 ms");
    let deadline = Instant::now() + Duration::from_secs(10);
    // Inputs still waiting or running are aborted (the first few may have finished).
    while server.metric("ember:request_aborted_total") < 1.0
        || server.metric("ember:num_requests_running") > 0.0
        || server.metric("ember:kv_cache_blocks_used") > 0.0
    {
        assert!(
            Instant::now() < deadline,
            "the abandoned embeddings were not aborted: {} aborted, {} blocks used",
            server.metric("ember:request_aborted_total"),
            server.metric("ember:kv_cache_blocks_used")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.metric("ember:num_requests_waiting"), 0.0);
}
