//! Tensor and expert parallelism through the real `ember serve` (ranks are threads over the
//! in-process collectives backend): for every family's tiny checkpoint, TP 2 and 4 and EP 2
//! and 4 give the logprobs of one rank (fp32, 1e-4) and of transformers, prompt and greedy,
//! with requests batched together; layouts a model cannot take are one-line errors.

mod common;

use common::{reference_of, serve_error, Server};
use serde_json::{json, Value};

/// Largest |sharded − one rank| on a logprob (fp32).
const RANK_TOL: f64 = 1e-4;
/// Largest |ember − transformers| on a logprob, as in http_api.rs.
const REFERENCE_TOL: f64 = 1e-3;

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN))
        .collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .filter(|(x, y)| !(x.is_nan() && y.is_nan()))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Per reference prompt: echoed prompt logprobs, then greedy token ids and logprobs; the
/// greedy requests are sent together so the engine batches them.
fn answers(server: &Server, name: &str) -> Vec<(Vec<f64>, Value, Vec<f64>)> {
    let reference = reference_of(name);
    let prompts: Vec<Value> = reference["prompts"].as_array().unwrap()[1..4].to_vec();
    std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                scope.spawn(move || {
                    let (status, echo) = server.post(
                        "/v1/completions",
                        &json!({"model": name, "prompt": p["token_ids"], "echo": true,
                                "logprobs": 1, "max_tokens": 0}),
                    );
                    assert_eq!(status, 200, "{echo}");
                    let steps = p["greedy"]["token_ids"].as_array().unwrap().len();
                    let (status, greedy) = server.post(
                        "/v1/completions",
                        &json!({"model": name, "prompt": p["token_ids"], "temperature": 0,
                                "ignore_eos": true, "logprobs": 1, "max_tokens": steps,
                                "return_token_ids": true}),
                    );
                    assert_eq!(status, 200, "{greedy}");
                    let c = &greedy["choices"][0];
                    (
                        floats(&echo["choices"][0]["logprobs"]["token_logprobs"]),
                        c["token_ids"].clone(),
                        floats(&c["logprobs"]["token_logprobs"]),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn check_family(name: &str, layouts: &[&[&str]]) {
    let reference = reference_of(name);
    let one = answers(&Server::start_model(name, &[]), name);
    for (i, (prompt, ids, greedy)) in one.iter().enumerate() {
        let p = &reference["prompts"][i + 1];
        assert!(max_diff(prompt, &floats(&p["prompt_logprobs"])) <= REFERENCE_TOL);
        assert_eq!(ids, &p["greedy"]["token_ids"], "{name}");
        assert!(max_diff(greedy, &floats(&p["greedy"]["logprobs"])) <= REFERENCE_TOL);
    }
    for flags in layouts {
        let sharded = answers(&Server::start_model(name, flags), name);
        for ((p1, ids1, g1), (pn, idsn, gn)) in one.iter().zip(&sharded) {
            assert_eq!(ids1, idsn, "{name} {flags:?}: greedy tokens");
            let diff = max_diff(p1, pn).max(max_diff(g1, gn));
            assert!(diff <= RANK_TOL, "{name} {flags:?}: max |Δ logprob| {diff}");
        }
    }
}

const TP: [&[&str]; 2] = [
    &["--tensor-parallel-size", "2"],
    &["--tensor-parallel-size", "4"],
];
const TP_AND_EP: [&[&str]; 4] = [
    &["--tensor-parallel-size", "2"],
    &["--tensor-parallel-size", "4"],
    &["--tensor-parallel-size", "2", "--enable-expert-parallel"],
    &["--tensor-parallel-size", "4", "--enable-expert-parallel"],
];

#[test]
fn qwen3_dense_tensor_parallel_matches_one_rank() {
    check_family("qwen3-tiny", &TP);
}

#[test]
fn qwen3_moe_tensor_and_expert_parallel_match_one_rank() {
    check_family("qwen3-moe-tiny", &TP_AND_EP);
}

#[test]
fn deepseek_v3_tensor_and_expert_parallel_match_one_rank() {
    check_family("deepseek-v3-tiny", &TP_AND_EP);
}

#[test]
fn kimi_k2_tensor_and_expert_parallel_match_one_rank() {
    check_family("kimi-k2-tiny", &TP_AND_EP);
}

#[test]
fn layouts_a_model_cannot_take_are_clear_errors() {
    // 4 attention heads do not split over 3 ranks.
    let err = serve_error("qwen3-tiny", &["--tensor-parallel-size", "3"]);
    assert!(err.contains("does not split evenly over 3 ranks"), "{err}");
    let err = serve_error(
        "qwen3-tiny",
        &["--tensor-parallel-size", "2", "--enable-lora"],
    );
    assert!(err.contains("--enable-lora"), "{err}");
    let err = serve_error("qwen3-tiny", &["--tensor-parallel-size", "0"]);
    assert!(err.contains("at least 1"), "{err}");
}
