//! End to end: LoRA adapters on the real `ember serve` (qwen3-tiny, fp32). Adapters from
//! `--lora-modules` and from `POST /v1/load_lora_adapter` are listed, answer by name with the
//! transformers+peft greedy tokens of `models/lora/*/reference.json`, unload to a 404 while
//! other requests keep running, are refused with a 4xx when they cannot be served, and are
//! counted in `/metrics`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{model_dir, reference_of, serve_error, Data, Server};
use serde_json::{json, Value};

/// The base model the qwen3-tiny adapters were trained on, also its served name.
const BASE: &str = "qwen3-tiny";

/// `models/lora/<name>` as a string for flags and request bodies.
fn adapter_dir(name: &str) -> String {
    model_dir(&format!("lora/{name}")).display().to_string()
}

/// The transformers+peft references of adapter `name`.
fn adapter_reference(name: &str) -> Value {
    reference_of(&format!("lora/{name}"))
}

/// `ember serve` on qwen3-tiny with LoRA enabled up to rank 8 and adapter `attn` loaded.
fn lora_server(extra: &[&str]) -> Server {
    let attn = format!("attn={}", adapter_dir("qwen3-tiny-attn-r8"));
    let mut flags = vec![
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--lora-modules",
        &attn,
    ];
    flags.extend_from_slice(extra);
    Server::start_model(BASE, &flags)
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

/// The body of a greedy completion of `prompt` (token ids) by `model`, `steps` tokens long.
fn greedy_request(model: &str, prompt: &Value, steps: usize) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": steps, "temperature": 0,
           "ignore_eos": true, "return_token_ids": true})
}

/// The greedy token ids `model` answers for `prompt`, and the answer; panics unless 200.
fn greedy(server: &Server, model: &str, prompt: &Value, steps: usize) -> (Vec<u64>, Value) {
    let (status, body) = server.post("/v1/completions", &greedy_request(model, prompt, steps));
    assert_eq!(status, 200, "{model}: {body}");
    assert_eq!(body["model"], model);
    (ids(&body["choices"][0]["token_ids"]), body)
}

/// The same, streamed: the token ids of every chunk, each chunk checked to name `model`.
fn greedy_streamed(server: &Server, model: &str, prompt: &Value, steps: usize) -> Vec<u64> {
    let mut request = greedy_request(model, prompt, steps);
    request["stream"] = json!(true);
    let chunks = server.stream("/v1/completions", &request);
    assert!(chunks.iter().all(|c| c["model"] == model), "{chunks:?}");
    chunks
        .iter()
        .flat_map(|c| ids(&c["choices"][0]["token_ids"]))
        .collect()
}

/// Each reference prompt with its greedy tokens.
fn reference_cases(reference: &Value) -> Vec<(Value, Vec<u64>)> {
    reference["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["token_ids"].clone(), ids(&p["greedy"]["token_ids"])))
        .collect()
}

fn model_ids(server: &Server) -> Vec<String> {
    let (status, text) = server.get("/v1/models");
    assert_eq!(status, 200);
    let list: Value = serde_json::from_str(&text).unwrap();
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn an_adapter_from_the_command_line_is_listed_answers_its_reference_and_is_counted() {
    let server = lora_server(&[]);

    let (status, text) = server.get("/v1/models");
    assert_eq!(status, 200);
    let list: Value = serde_json::from_str(&text).unwrap();
    let cards = list["data"].as_array().unwrap();
    assert_eq!(cards.len(), 2, "{list}");
    assert_eq!(
        (&cards[0]["id"], &cards[0]["parent"]),
        (&json!(BASE), &Value::Null)
    );
    let root = std::fs::canonicalize(adapter_dir("qwen3-tiny-attn-r8")).unwrap();
    assert_eq!(cards[1]["id"], "attn");
    assert_eq!(cards[1]["parent"], BASE);
    assert_eq!(cards[1]["root"], root.display().to_string());
    assert_eq!(cards[1]["owned_by"], cards[0]["owned_by"]);

    // Every reference prompt: the adapter's greedy tokens, unlike the base model's.
    let cases = reference_cases(&adapter_reference("qwen3-tiny-attn-r8"));
    let (mut prompt_tokens, mut generated) = (0, 0);
    for (prompt, expected) in &cases {
        let (tokens, body) = greedy(&server, "attn", prompt, expected.len());
        assert_eq!(&tokens, expected, "prompt {prompt}");
        prompt_tokens += body["usage"]["prompt_tokens"].as_u64().unwrap();
        generated += body["usage"]["completion_tokens"].as_u64().unwrap();
    }
    let (prompt, expected) = &cases[0];
    let (base, _) = greedy(&server, BASE, prompt, expected.len());
    assert_ne!(&base, expected, "the adapter changes nothing");
    // Fireworks' name form, with a deployment suffix, selects the same adapter.
    for model in [
        "accounts/fireworks/models/attn",
        "accounts/me/models/attn#accounts/me/deployments/d1",
    ] {
        let (tokens, body) = greedy(&server, model, prompt, expected.len());
        assert_eq!(&tokens, expected, "{model}");
        prompt_tokens += body["usage"]["prompt_tokens"].as_u64().unwrap();
        generated += body["usage"]["completion_tokens"].as_u64().unwrap();
    }
    let requests = cases.len() as f64 + 2.0;

    let metrics = server.metrics();
    let lora = |name: &str| metrics[&format!("ember:{name}{{lora_name=\"attn\"}}")];
    assert_eq!(lora("lora_requests_total"), requests);
    assert_eq!(lora("lora_prompt_tokens_total"), prompt_tokens as f64);
    assert_eq!(lora("lora_generation_tokens_total"), generated as f64);
    assert_eq!(metrics["ember:lora_adapters_registered"], 1.0);
    // The base model's request is not the adapter's.
    assert_eq!(
        metrics["ember:request_success_total{finished_reason=\"length\"}"],
        requests + 1.0
    );

    // Streams: the same tokens, chunk by chunk; chat through the template too.
    let streamed = greedy_streamed(&server, "attn", prompt, expected.len());
    assert_eq!(&streamed, expected);
    let chat = json!({"model": "attn", "messages": [{"role": "user", "content": "Hello"}],
                      "max_tokens": 8, "temperature": 0});
    let (status, whole) = server.post("/inference/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["model"], "attn");
    let mut request = chat.clone();
    request["stream"] = json!(true);
    let chunks = server.stream("/inference/v1/chat/completions", &request);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let mut base_chat = chat;
    base_chat["model"] = json!(BASE);
    let (_, base_whole) = server.post("/v1/chat/completions", &base_chat);
    assert_ne!(
        base_whole["choices"][0]["message"],
        whole["choices"][0]["message"]
    );
}

/// A request that must succeed with `expected` tokens, streamed or not.
struct Probe {
    model: &'static str,
    stream: bool,
    expected: Vec<u64>,
}

impl Probe {
    /// Sends it once; what went wrong, if anything.
    fn check(&self, server: &Server, prompt: &Value) -> Result<(), String> {
        let steps = self.expected.len();
        let tokens = if self.stream {
            // A refused stream panics inside the helper: report it as a failure.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                greedy_streamed(server, self.model, prompt, steps)
            }))
            .map_err(|_| format!("{}: the stream failed", self.model))?
        } else {
            let request = greedy_request(self.model, prompt, steps);
            let (status, body) = server.post("/v1/completions", &request);
            if status != 200 {
                return Err(format!("{}: {status} {body}", self.model));
            }
            ids(&body["choices"][0]["token_ids"])
        };
        if tokens == self.expected {
            Ok(())
        } else {
            Err(format!("{}: {tokens:?}", self.model))
        }
    }
}

/// Sets the flag when dropped, so that clients stop even when the test fails mid-way.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Tokens of the stream that outlives its adapter's unloading: long enough to be running then.
const LONG_STREAM: usize = 1000;

#[test]
fn an_adapter_loads_answers_and_unloads_while_other_requests_run() {
    let server = lora_server(&[]);
    let attn = reference_cases(&adapter_reference("qwen3-tiny-attn-r8"));
    let (prompt, attn_tokens) = attn[1].clone();
    let steps = attn_tokens.len();
    let (base_tokens, _) = greedy(&server, BASE, &prompt, steps);

    // 16 clients, base model and `attn`, streamed and not, each checking every answer.
    let stop = AtomicBool::new(false);
    let answered = AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::<String>::new());
    std::thread::scope(|scope| {
        for i in 0..16 {
            let probe = Probe {
                model: if i % 2 == 0 { BASE } else { "attn" },
                stream: i % 4 < 2,
                expected: if i % 2 == 0 {
                    base_tokens.clone()
                } else {
                    attn_tokens.clone()
                },
            };
            let (server, prompt, stop, answered, failures) =
                (&server, &prompt, &stop, &answered, &failures);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Err(failure) = probe.check(server, prompt) {
                        failures.lock().unwrap().push(failure);
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let _stop = StopOnDrop(&stop);
        let wait_for = |count: usize| {
            let deadline = Instant::now() + Duration::from_secs(120);
            while answered.load(Ordering::Relaxed) < count {
                assert!(Instant::now() < deadline, "the clients stalled");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        wait_for(16);

        // Load, listed, answers its own reference, unload, 404.
        let mlp_dir = adapter_dir("qwen3-tiny-mlp-r4-rslora");
        let (status, text) = server.post_text(
            "/v1/load_lora_adapter",
            &json!({"lora_name": "mlp", "lora_path": mlp_dir}),
        );
        assert_eq!(
            (status, text.as_str()),
            (200, "Success: LoRA adapter 'mlp' added successfully.")
        );
        assert_eq!(model_ids(&server), [BASE, "attn", "mlp"]);
        let mlp = reference_cases(&adapter_reference("qwen3-tiny-mlp-r4-rslora"));
        for (prompt, expected) in &mlp {
            assert_eq!(&greedy(&server, "mlp", prompt, expected.len()).0, expected);
        }
        // A long stream is running with the adapter when it is unloaded: it goes on to its end.
        let (mlp_prompt, mlp_expected) = &mlp[0];
        let mut request = greedy_request("mlp", mlp_prompt, LONG_STREAM);
        request["stream"] = json!(true);
        let mut running = server.open_stream("/v1/completions", &request);
        let mut streamed = Vec::new();
        let mut finish = Value::Null;
        let mut read = |event: Option<Data>| match event {
            Some(Data::Json(chunk)) => {
                streamed.extend(ids(&chunk["choices"][0]["token_ids"]));
                finish = chunk["choices"][0]["finish_reason"].clone();
                true
            }
            Some(Data::Done) => false,
            None => panic!("the stream ended without [DONE]"),
        };
        assert!(read(running.next_data()));
        let before_unload = answered.load(Ordering::Relaxed);
        let (status, text) = server.post_text(
            "/inference/v1/unload_lora_adapter",
            &json!({"lora_name": "mlp"}),
        );
        assert_eq!(
            (status, text.as_str()),
            (200, "Success: LoRA adapter 'mlp' removed successfully.")
        );
        assert_eq!(model_ids(&server), [BASE, "attn"]);
        let (status, body) = server.post("/v1/completions", &greedy_request("mlp", &prompt, 2));
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["code"], "model_not_found");
        let (status, body) = server.post("/v1/unload_lora_adapter", &json!({"lora_name": "mlp"}));
        assert_eq!(status, 404, "{body}");
        assert_eq!(
            body["error"]["message"],
            "The lora adapter 'mlp' cannot be found."
        );
        while read(running.next_data()) {}
        assert_eq!(streamed.len(), LONG_STREAM);
        assert_eq!(&streamed[..mlp_expected.len()], &mlp_expected[..]);
        assert_eq!(finish, "length");
        // Traffic went on through the unload too.
        wait_for(before_unload + 16);
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(answered.into_inner() >= 32);
}

#[test]
/// Bad requests are 400; adapters that fail to load are 412, as Fireworks answers (API.md).
fn adapters_that_cannot_be_served_are_refused_with_400_or_412() {
    let server = lora_server(&[]);
    let cases = [
        (
            json!({"lora_name": "attn", "lora_path": adapter_dir("qwen3-tiny-mlp-r4-rslora")}),
            "The lora adapter 'attn' has already been loaded.",
            400,
        ),
        (
            json!({"lora_name": BASE, "lora_path": adapter_dir("qwen3-tiny-mlp-r4-rslora")}),
            "conflicts with a served base model",
            400,
        ),
        (
            json!({"lora_name": "x", "lora_path": adapter_dir("no-such-adapter")}),
            "is not a directory",
            412,
        ),
        (
            json!({"lora_name": "x", "lora_path": model_dir(BASE)}),
            "adapter_config.json",
            412,
        ),
        (
            json!({"lora_name": "all", "lora_path": adapter_dir("qwen3-tiny-all-r16")}),
            "rank 16, above --max-lora-rank 8",
            412,
        ),
        (
            json!({"lora_name": "ds", "lora_path": adapter_dir("deepseek-v3-tiny-mla")}),
            "is not a projection of this model",
            412,
        ),
        (
            json!({"lora_name": "x"}),
            "Both 'lora_name' and 'lora_path' must be provided.",
            400,
        ),
    ];
    for (body, message, code) in cases {
        for prefix in ["/v1", "/inference/v1"] {
            let (status, error) = server.post(&format!("{prefix}/load_lora_adapter"), &body);
            assert_eq!(status, code, "{body}: {error}");
            let text = error["error"]["message"].as_str().unwrap();
            assert!(text.contains(message), "{body}: {text}");
        }
    }
    let (status, error) = server.post(
        "/v1/load_lora_adapter",
        &json!({"lora_name": "ds", "lora_path": adapter_dir("deepseek-v3-tiny-mla")}),
    );
    assert_eq!(status, 412);
    assert_eq!(error["error"]["code"], "lora_load_failed");
    let text = error["error"]["message"].as_str().unwrap();
    assert!(
        text.contains("q_a_proj") || text.contains("kv_a_proj_with_mqa"),
        "the message names no module: {text}"
    );
    // Nothing was registered, and `attn` still answers.
    assert_eq!(model_ids(&server), [BASE, "attn"]);
    let (prompt, expected) = reference_cases(&adapter_reference("qwen3-tiny-attn-r8")).remove(0);
    assert_eq!(greedy(&server, "attn", &prompt, expected.len()).0, expected);
}

#[test]
fn without_enable_lora_the_adapter_routes_are_400_behind_the_api_key() {
    let server = Server::start_model(BASE, &["--api-key", "sekrit"]);
    let load = json!({"lora_name": "attn", "lora_path": adapter_dir("qwen3-tiny-attn-r8")});
    let (status, error) = server.post("/v1/load_lora_adapter", &load);
    assert_eq!(status, 401, "{error}");
    assert_eq!(error["error"]["code"], "invalid_api_key");
    for (path, body) in [
        ("/v1/load_lora_adapter", load),
        (
            "/inference/v1/unload_lora_adapter",
            json!({"lora_name": "attn"}),
        ),
    ] {
        let response = server
            .http
            .post(format!("{}{path}", server.base))
            .bearer_auth("sekrit")
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 400, "{path}");
        let error: Value = response.json().unwrap();
        let text = error["error"]["message"].as_str().unwrap();
        assert!(text.contains("--enable-lora"), "{path}: {text}");
    }
}

#[test]
fn a_bad_lora_flag_stops_the_start_naming_the_adapter() {
    let error = serve_error(BASE, &["--lora-modules", "attn=/nowhere"]);
    assert!(
        error.contains("--lora-modules needs --enable-lora"),
        "{error}"
    );
    let ds = format!("ds={}", adapter_dir("deepseek-v3-tiny-mla"));
    let error = serve_error(BASE, &["--enable-lora", "--lora-modules", &ds]);
    assert!(
        error.contains("--lora-modules \"ds\"") && error.contains("is not a projection"),
        "{error}"
    );
    let all = format!(
        r#"{{"name": "all", "path": "{}", "base_model_name": "{BASE}"}}"#,
        adapter_dir("qwen3-tiny-all-r16")
    );
    let error = serve_error(
        BASE,
        &[
            "--enable-lora",
            "--max-lora-rank",
            "8",
            "--lora-modules",
            &all,
        ],
    );
    assert!(
        error.contains("--lora-modules \"all\"") && error.contains("rank 16"),
        "{error}"
    );
    let error = serve_error(BASE, &["--enable-lora", "--lora-modules", "attn"]);
    assert!(error.contains("expected name=path"), "{error}");
}
