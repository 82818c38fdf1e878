//! End to end: start the real `ember serve` on a free loopback port with the demo model in fp32
//! and check its HTTP answers against the transformers references in `models/`.

mod common;

use common::{reference, reference_of, Server, MODEL};
use serde_json::{json, Value};

/// Largest |ember − transformers| allowed on a logprob seen through the API (fp32).
const LOGPROB_TOL: f64 = 1e-3;

fn floats(v: &Value) -> Vec<Option<f64>> {
    v.as_array().unwrap().iter().map(Value::as_f64).collect()
}

fn assert_close(what: &str, ours: &[Option<f64>], theirs: &[Option<f64>]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        match (a, b) {
            (None, None) => {}
            (Some(a), Some(b)) => assert!((a - b).abs() <= LOGPROB_TOL, "{what}[{i}]: {a} vs {b}"),
            _ => panic!("{what}[{i}]: {a:?} vs {b:?}"),
        }
    }
}

#[test]
fn completions_chat_and_errors_over_http() {
    let server = Server::start(&[]);
    let reference = reference();
    let p = &reference["prompts"][2];

    // Scoring a prompt: echo + logprobs + max_tokens 0 returns the prompt's logprobs.
    let (status, body) = server.post(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": p["text"], "echo": true, "logprobs": 1, "max_tokens": 0}),
    );
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["text"], p["text"]);
    assert_close(
        "echoed prompt",
        &floats(&choice["logprobs"]["token_logprobs"]),
        &floats(&p["prompt_logprobs"]),
    );
    assert_eq!(
        body["usage"]["prompt_tokens"],
        p["token_ids"].as_array().unwrap().len()
    );
    assert_eq!(body["usage"]["completion_tokens"], 0);

    // Greedy continuation with logprobs, as token ids in.
    let steps = p["greedy"]["token_ids"].as_array().unwrap().len();
    let (status, body) = server.post(
        "/inference/v1/completions",
        &json!({"model": MODEL, "prompt": p["token_ids"], "temperature": 0, "ignore_eos": true,
                "logprobs": 1, "max_tokens": steps}),
    );
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["text"], p["greedy"]["text"]);
    let greedy: Vec<Option<f64>> = floats(&p["greedy"]["logprobs"]);
    assert_close(
        "greedy",
        &floats(&choice["logprobs"]["token_logprobs"]),
        &greedy,
    );
    assert_eq!(body["usage"]["completion_tokens"], steps);

    // Chat: the rendered prompt matches transformers' tokens, and the answer equals a
    // completion of those tokens.
    let case = reference["chat"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kwargs"]["enable_thinking"] == json!(false))
        .expect("a chat case with enable_thinking false");
    let (status, chat) = server.post(
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": case["messages"], "chat_template_kwargs": case["kwargs"],
                "temperature": 0, "max_tokens": 8, "ignore_eos": true, "logprobs": true, "top_logprobs": 2}),
    );
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(
        chat["usage"]["prompt_tokens"],
        case["token_ids"].as_array().unwrap().len()
    );
    let (status, plain) = server.post(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": case["token_ids"], "temperature": 0, "max_tokens": 8,
                "ignore_eos": true, "logprobs": 1}),
    );
    assert_eq!(status, 200, "{plain}");
    let message = &chat["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["content"], plain["choices"][0]["text"]);
    let chat_lps: Vec<Option<f64>> = chat["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 2);
            t["logprob"].as_f64()
        })
        .collect();
    assert_close(
        "chat vs completion",
        &chat_lps,
        &floats(&plain["choices"][0]["logprobs"]["token_logprobs"]),
    );

    // Client faults are OpenAI-shaped 4xx and leave the server serving.
    let (status, body) = server.post("/v1/completions", &json!({"model": "nope", "prompt": "x"}));
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
    let (status, body) = server.post(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "x", "temperature": 9}),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "temperature");
    let long: Vec<u32> = vec![5; 5000];
    let (status, body) = server.post("/v1/completions", &json!({"model": MODEL, "prompt": long}));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    let r = server
        .http
        .post(format!("{}/v1/chat/completions", server.base))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");

    let models: Value = server
        .http
        .get(format!("{}/v1/models", server.base))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(
        server
            .http
            .get(format!("{}/health", server.base))
            .send()
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn api_key_is_required_when_set() {
    let server = Server::start(&["--api-key", "sekrit"]);
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 1});
    let r = server
        .http
        .post(format!("{}/v1/completions", server.base))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = server
        .http
        .post(format!("{}/v1/completions", server.base))
        .bearer_auth("sekrit")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[test]
fn stop_strings_n_usage_and_limits_over_http() {
    let server = Server::start(&["--max-waiting-requests", "0"]);
    let reference = reference();
    let p = &reference["prompts"][2];
    let steps = p["greedy"]["token_ids"].as_array().unwrap().len();
    let greedy = json!({"model": MODEL, "prompt": p["token_ids"], "temperature": 0,
                        "ignore_eos": true, "max_tokens": steps, "logprobs": 0});
    // --max-waiting-requests 0 refuses everything: a 429 with Retry-After, server unharmed.
    let r = server
        .http
        .post(format!("{}/v1/completions", server.base))
        .json(&greedy)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    drop(server);

    let server = Server::start(&[]);
    let (status, full) = server.post("/v1/completions", &greedy);
    assert_eq!(status, 200, "{full}");
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    let tokens: Vec<String> = full["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    // A stop string made of the end of one token and the start of the next.
    let i = (2..tokens.len() - 1)
        .find(|&i| tokens[i].chars().count() >= 2 && tokens[i + 1].chars().count() >= 2)
        .expect("two adjacent multi-character tokens");
    let tail: String = tokens[i]
        .chars()
        .rev()
        .take(2)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let head: String = tokens[i + 1].chars().take(2).collect();
    let stop = format!("{tail}{head}");
    let cut = text.find(&stop).unwrap();
    let mut with_stop = greedy.clone();
    with_stop["stop"] = json!([stop]);
    let (status, stopped) = server.post("/v1/completions", &with_stop);
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(stopped["choices"][0]["text"], text[..cut]);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

    // n choices: greedy ones are identical, usage counts all of them.
    let mut two = greedy.clone();
    two["n"] = json!(2);
    let (status, both) = server.post("/v1/completions", &two);
    assert_eq!(status, 200, "{both}");
    let choices = both["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["text"], choices[1]["text"]);
    assert_eq!(both["usage"]["completion_tokens"], 2 * steps);
    assert_eq!(
        both["usage"]["prompt_tokens"],
        p["token_ids"].as_array().unwrap().len()
    );

    // A percent-encoded Fireworks model id, and a body over the size limit.
    let id = format!("accounts%2Ffireworks%2Fmodels%2F{MODEL}");
    let card: Value = server
        .http
        .get(format!("{}/v1/models/{id}", server.base))
        .send()
        .unwrap()
        .json()
        .unwrap();
    // The card answers under the id the client asked for.
    assert_eq!(card["id"], format!("accounts/fireworks/models/{MODEL}"));
    assert_eq!(card["object"], "model");
    let huge = "x".repeat(33 << 20);
    let r = server
        .http
        .post(format!("{}/v1/completions", server.base))
        .header("content-type", "application/json")
        .body(format!("{{\"model\":\"{MODEL}\",\"prompt\":\"{huge}\"}}"))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
}

#[test]
fn deepseek_and_kimi_checkpoints_match_transformers_over_http() {
    for name in [
        "deepseek-v3-tiny",
        "kimi-k2-tiny",
        "deepseek-v3-fp8-tiny",
        "deepseek-v2-lite-tiny",
        "kimi-k2-int4-tiny",
        "kimi-k2-nvfp4-tiny",
        "kimi-k2-gptq-tiny",
        "kimi-k2-awq-tiny",
    ] {
        check_against_reference(&Server::start_model(name, &[]), name);
    }
}

/// ember's kernels selected from the command line (`--attention-backend ember`: MLA's decodes;
/// `--moe-backend fused`; `--layer-kernels ember`), run here through their CPU references: the
/// server still gives transformers' logprobs and greedy tokens.
#[test]
fn embers_kernels_selected_by_flag_match_transformers_over_http() {
    let flags = [
        "--attention-backend",
        "ember",
        "--moe-backend",
        "fused",
        "--layer-kernels",
        "ember",
    ];
    for name in ["kimi-k2-tiny", "qwen3-moe-tiny", "deepseek-v2-lite-tiny"] {
        check_against_reference(&Server::start_model(name, &flags), name);
    }
}

/// Prompt logprobs (echo) and greedy tokens with logprobs of three of `name`'s reference prompts.
fn check_against_reference(server: &Server, name: &str) {
    let reference = reference_of(name);
    for p in reference["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .take(3)
    {
        let (status, body) = server.post(
            "/v1/completions",
            &json!({"model": name, "prompt": p["token_ids"], "echo": true, "logprobs": 1,
                    "max_tokens": 0}),
        );
        assert_eq!(status, 200, "{body}");
        let lps = floats(&body["choices"][0]["logprobs"]["token_logprobs"]);
        assert_close(
            &format!("{name} prompt"),
            &lps,
            &floats(&p["prompt_logprobs"]),
        );
        let steps = p["greedy"]["token_ids"].as_array().unwrap().len();
        let (status, body) = server.post(
            "/v1/completions",
            &json!({"model": name, "prompt": p["token_ids"], "temperature": 0, "ignore_eos": true,
                    "logprobs": 1, "max_tokens": steps, "return_token_ids": true}),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["choices"][0]["token_ids"], p["greedy"]["token_ids"],
            "{name}"
        );
        let lps = floats(&body["choices"][0]["logprobs"]["token_logprobs"]);
        assert_close(
            &format!("{name} greedy"),
            &lps,
            &floats(&p["greedy"]["logprobs"]),
        );
    }
}
