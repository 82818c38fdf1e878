//! `ember bench throughput` and `ember bench latency` end to end: the binary runs the demo model
//! in-process and writes vLLM-shaped JSON whose figures add up.

mod common;

use std::process::Command;

use serde_json::Value;

/// Runs `ember bench <args> --output-json <tmp>` and returns the JSON it wrote.
fn bench(args: &[&str]) -> Value {
    // One file per call: the tests run in parallel threads of one process, several of them the
    // same subcommand.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "ember-bench-{}-{}-{call}.json",
        args[0],
        std::process::id()
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .arg("bench")
        .args(args)
        .arg("--model")
        .arg(common::model_dir("qwen3-moe-tiny"))
        .arg("--output-json")
        .arg(&path)
        .output()
        .expect("run ember bench");
    assert!(
        out.status.success(),
        "ember bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = std::fs::read_to_string(&path).expect("the JSON result");
    std::fs::remove_file(&path).ok();
    serde_json::from_str(&json).unwrap()
}

#[test]
fn throughput_counts_every_token_and_splits_the_step_time() {
    let r = bench(&[
        "throughput",
        "--num-prompts",
        "24",
        "--input-len",
        "20",
        "--output-len",
        "6",
        "--max-num-seqs",
        "8",
    ]);
    assert_eq!(r["num_requests"], 24);
    // ignore_eos: every request runs to its length.
    assert_eq!(r["total_output_tokens"], 24 * 6);
    assert_eq!(r["total_num_tokens"], 24 * (20 + 6));
    let elapsed = r["elapsed_time"].as_f64().unwrap();
    let rps = r["requests_per_second"].as_f64().unwrap();
    assert!((rps * elapsed - 24.0).abs() < 1e-6, "{r}");
    // With 8 sequences at a time the 24 requests need at least 3 rounds of 6 tokens.
    assert!(r["num_steps"].as_u64().unwrap() >= 18, "{r}");
    let phases = r["step_phase_ms"].as_object().unwrap();
    for phase in ["schedule", "prepare", "forward", "sample", "other"] {
        assert!(phases[phase].as_f64().unwrap() >= 0.0, "{phase}: {r}");
    }
    let sum: f64 = phases.values().map(|v| v.as_f64().unwrap()).sum();
    let mean = r["mean_step_ms"].as_f64().unwrap();
    assert!((sum - mean).abs() < 1e-6 * mean.max(1.0), "{r}");
    let overhead = r["overhead_fraction"].as_f64().unwrap();
    assert!((0.0..1.0).contains(&overhead), "{r}");
}

#[test]
fn latency_reports_prefill_and_decode_per_iteration() {
    let r = bench(&[
        "latency",
        "--batch-size",
        "3",
        "--input-len",
        "12",
        "--output-len",
        "5",
        "--num-iters",
        "3",
        "--num-iters-warmup",
        "1",
    ]);
    let latencies = r["latencies"].as_array().unwrap();
    assert_eq!(latencies.len(), 3);
    assert_eq!(r["prefill_latencies"].as_array().unwrap().len(), 3);
    let avg = r["avg_latency"].as_f64().unwrap();
    let prefill = r["avg_prefill_latency"].as_f64().unwrap();
    let step = r["avg_decode_step_latency"].as_f64().unwrap();
    // One prefill plus four decode steps make up an iteration.
    assert!(
        (avg - (prefill + 4.0 * step)).abs() < 1e-9 * avg.max(1.0) + 1e-12,
        "{r}"
    );
    assert!(prefill > 0.0 && step > 0.0, "{r}");
    for p in ["10", "50", "99"] {
        assert!(r["percentiles"][p].as_f64().unwrap() > 0.0, "{p}: {r}");
    }
    // The CPU has no CUDA graphs.
    assert_eq!(r["cuda_graph_steps"], 0, "{r}");
}

/// Runs `ember bench <args>`, which must fail, and returns what it printed on stderr.
fn bench_error(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .arg("bench")
        .args(args)
        .arg("--model")
        .arg(common::model_dir("qwen3-moe-tiny"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "ember bench {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn latency_refuses_a_batch_longer_than_the_context() {
    let err = bench_error(&["latency", "--input-len", "100000", "--output-len", "8"]);
    assert!(err.contains("--input-len"), "{err}");
}

#[test]
fn throughput_with_a_response_format_constrains_every_request_to_its_length() {
    // A grammar that never completes, so ignore_eos runs every request to --output-len.
    let r = bench(&[
        "throughput",
        "--num-prompts",
        "4",
        "--input-len",
        "8",
        "--output-len",
        "12",
        "--response-format",
        "grammar:root ::= [a-z ]*",
    ]);
    assert_eq!(
        r["response_format"],
        serde_json::json!({"type": "grammar", "grammar": "root ::= [a-z ]*"})
    );
    assert_eq!(r["total_output_tokens"], 4 * 12, "{r}");
    assert_eq!(r["num_stopped_early"], 0, "{r}");
    let plain = bench(&["throughput", "--num-prompts", "2", "--output-len", "3"]);
    assert!(plain["response_format"].is_null(), "{plain}");
}

#[test]
fn throughput_refuses_a_grammar_the_server_would_refuse() {
    let err = bench_error(&[
        "throughput",
        "--num-prompts",
        "1",
        "--response-format",
        "grammar:root ::= missing",
    ]);
    assert!(
        err.contains("--response-format: Invalid 'response_format.grammar'"),
        "{err}"
    );
}
