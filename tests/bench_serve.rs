//! End to end: `ember bench serve` against the real `ember serve` on the demo model. Its
//! figures must be complete and self-consistent, and agree with the server's own Prometheus
//! histograms: token counts exactly, latencies within the client's overhead.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{model_dir, Server, MODEL};
use serde_json::Value;

const PROMPTS: usize = 20;
const OUTPUT_LEN: usize = 16;

/// How much later than the server the client may see a mean latency. The server clocks a
/// request from its arrival (after the HTTP body is read) to its last token leaving the engine;
/// the client adds connection set-up, request serialisation, the SSE hop over loopback and its
/// own scheduling on the same two shared cores: 20 ms plus 15% of the server's figure bounds
/// that in debug builds (measured: TTFT 21.6 vs 20.5 ms, E2E 128.6 vs 128.0 ms). The client can never see less than the server (1 ms of slack for clock
/// reads taken at slightly different points).
const ABS_TOL_S: f64 = 0.020;
const REL_TOL: f64 = 0.15;

/// A fresh directory for one run's result file.
fn result_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-bench-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `ember bench serve` against `server` on 32-token random prompts, reporting every metric,
/// with no progress bar and no result file.
fn bench_command(server: &Server) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ember"));
    command
        .args(["bench", "serve", "--base-url", &server.base, "--tokenizer"])
        .arg(model_dir(MODEL))
        .args(["--dataset-name", "random", "--random-input-len", "32"])
        .args([
            "--random-output-len",
            &OUTPUT_LEN.to_string(),
            "--ignore-eos",
        ])
        .args([
            "--percentile-metrics",
            "ttft,tpot,itl,e2el",
            "--metric-percentiles",
            "50,90,99",
            "--disable-tqdm",
        ]);
    command
}

/// Runs `ember bench serve` against `server` with `extra` flags; its output and its result,
/// saved with the per-request lists.
fn bench(server: &Server, dir: &Path, extra: &[&str]) -> (Output, Option<Value>) {
    let output = bench_command(server)
        .args([
            "--save-result",
            "--save-detailed",
            "--result-filename",
            "result.json",
        ])
        .arg("--result-dir")
        .arg(dir)
        .args(extra)
        .output()
        .expect("run ember bench serve");
    let saved = std::fs::read_to_string(dir.join("result.json"))
        .ok()
        .map(|text| serde_json::from_str(&text).expect("the result file is JSON"));
    (output, saved)
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing or not a number"))
}

fn usizes(v: &Value, key: &str) -> Vec<usize> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// Server counters and histogram sums that the comparisons read.
struct ServerFigures {
    generation_tokens: f64,
    ttft: (f64, f64),
    tpot: (f64, f64),
    e2e: (f64, f64),
    generation_tokens_sum: f64,
}

impl ServerFigures {
    fn read(server: &Server) -> Self {
        let m = server.metrics();
        let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("{k} is not in /metrics"));
        let hist = |name: &str| (get(&format!("{name}_sum")), get(&format!("{name}_count")));
        Self {
            generation_tokens: get("ember:generation_tokens_total"),
            ttft: hist("ember:time_to_first_token_seconds"),
            tpot: hist("ember:time_per_output_token_seconds"),
            e2e: hist("ember:e2e_request_latency_seconds"),
            generation_tokens_sum: get("ember:request_generation_tokens_sum"),
        }
    }

    /// Mean of histogram `pick` over the requests between `before` and `self`.
    fn mean_since(&self, before: &Self, pick: fn(&Self) -> (f64, f64)) -> f64 {
        let ((s1, c1), (s0, c0)) = (pick(self), pick(before));
        (s1 - s0) / (c1 - c0)
    }
}

/// The client's mean (ms in the result) against the server's (s), within the stated tolerance
/// plus `extra` seconds.
fn assert_client_encloses_server(what: &str, client_ms: f64, server_s: f64) {
    let client = client_ms / 1e3;
    assert!(
        client >= server_s - 0.001 && client <= server_s * (1.0 + REL_TOL) + ABS_TOL_S,
        "{what}: client mean {client:.4} s vs server mean {server_s:.4} s"
    );
}

/// Every metric present, finite and ordered as statistics must be.
fn assert_complete(r: &Value) {
    for metric in ["ttft", "tpot", "itl", "e2el"] {
        let get = |stat: &str| f(r, &format!("{stat}_{metric}_ms"));
        let (mean, median, std) = (get("mean"), get("median"), get("std"));
        let (p50, p90, p99) = (get("p50"), get("p90"), get("p99"));
        assert!(mean > 0.0 && std >= 0.0, "{metric}: mean {mean} std {std}");
        assert_eq!(median, p50, "{metric}: the median is p50");
        assert!(p50 <= p90 && p90 <= p99, "{metric}: {p50} {p90} {p99}");
    }
    for key in [
        "duration",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "burstiness",
        "max_output_tokens_per_s",
    ] {
        assert!(f(r, key) > 0.0, "{key}");
    }
    for key in [
        "date",
        "backend",
        "endpoint_type",
        "model_id",
        "tokenizer_id",
    ] {
        assert!(r[key].is_string(), "{key}");
    }
    assert_eq!(r["request_rate"], "inf");
    assert!(r["label"].is_null());
}

#[test]
fn completions_and_chat_agree_with_the_servers_own_metrics() {
    let server = Server::start(&[]);
    let before = ServerFigures::read(&server);

    let dir = result_dir("completions");
    let (out, r) = bench(
        &server,
        &dir,
        &[
            "--model",
            MODEL,
            "--num-prompts",
            &PROMPTS.to_string(),
            "--max-concurrency",
            "4",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("============ Serving Benchmark Result ============"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Mean TTFT (ms):") && stdout.contains("P99 E2EL (ms):"),
        "{stdout}"
    );
    let r = r.expect("--save-result wrote the result");
    assert_complete(&r);
    assert_eq!(r["backend"], "openai");
    assert_eq!(r["num_prompts"], PROMPTS);
    assert_eq!(r["max_concurrency"], 4);
    assert_eq!(
        (r["completed"].as_u64(), r["failed"].as_u64()),
        (Some(PROMPTS as u64), Some(0))
    );
    assert!(r["errors"].as_array().unwrap().iter().all(|e| e == ""));
    assert_eq!(
        r["total_output_tokens"],
        PROMPTS * OUTPUT_LEN,
        "ignore_eos runs every answer to its length"
    );
    assert_eq!(usizes(&r, "output_lens"), vec![OUTPUT_LEN; PROMPTS]);
    let input_lens = usizes(&r, "input_lens");
    assert_eq!(
        input_lens.iter().sum::<usize>(),
        r["total_input_tokens"].as_u64().unwrap() as usize
    );
    assert!(
        input_lens.iter().all(|&n| (30..=34).contains(&n)),
        "{input_lens:?}"
    );
    let duration = f(&r, "duration");
    assert!((f(&r, "request_throughput") - PROMPTS as f64 / duration).abs() < 1e-9);
    assert!((f(&r, "output_throughput") - (PROMPTS * OUTPUT_LEN) as f64 / duration).abs() < 1e-9);
    let peak = r["max_concurrent_requests"].as_u64().unwrap();
    assert!(
        (1..=4).contains(&peak),
        "at most --max-concurrency in flight: {peak}"
    );
    let ttfts = r["ttfts"].as_array().unwrap();
    let latencies = r["latencies"].as_array().unwrap();
    let mut itl_count = 0;
    for (i, itl) in r["itls"].as_array().unwrap().iter().enumerate() {
        let (ttft, latency) = (ttfts[i].as_f64().unwrap(), latencies[i].as_f64().unwrap());
        let gaps: Vec<f64> = itl
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_f64().unwrap())
            .collect();
        assert!(
            ttft > 0.0 && ttft < latency,
            "request {i}: ttft {ttft} latency {latency}"
        );
        // A gap per chunk after the first, summing to the decode time. The server may pack
        // several tokens into one chunk when the client reads slower than the engine steps,
        // so there are at most 15, and usage (not the chunk count) gives the token count.
        assert!(
            (1..OUTPUT_LEN).contains(&gaps.len()),
            "request {i}: {} gaps",
            gaps.len()
        );
        assert!(
            (ttft + gaps.iter().sum::<f64>() - latency).abs() < 1e-6,
            "request {i}"
        );
        itl_count += gaps.len();
    }
    eprintln!(
        "{itl_count} inter-chunk gaps for {} decoded tokens",
        PROMPTS * (OUTPUT_LEN - 1)
    );
    assert!(itl_count <= PROMPTS * (OUTPUT_LEN - 1));
    assert!(r["generated_texts"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t.as_str().is_some_and(|t| !t.is_empty())));

    let after = ServerFigures::read(&server);
    let generated = after.generation_tokens - before.generation_tokens;
    assert_eq!(
        generated,
        (PROMPTS * OUTPUT_LEN) as f64,
        "the engine generated what the client counted"
    );
    assert_eq!(
        after.generation_tokens_sum - before.generation_tokens_sum,
        generated
    );
    assert_eq!(after.ttft.1 - before.ttft.1, PROMPTS as f64);
    let server_ttft = after.mean_since(&before, |s| s.ttft);
    let server_e2e = after.mean_since(&before, |s| s.e2e);
    let server_tpot = after.mean_since(&before, |s| s.tpot);
    eprintln!(
        "client vs server means (s): ttft {:.4} / {server_ttft:.4}, e2el {:.4} / {server_e2e:.4}, \
         tpot {:.5} / {server_tpot:.5}",
        f(&r, "mean_ttft_ms") / 1e3,
        f(&r, "mean_e2el_ms") / 1e3,
        f(&r, "mean_tpot_ms") / 1e3,
    );
    assert_client_encloses_server("TTFT", f(&r, "mean_ttft_ms"), server_ttft);
    assert_client_encloses_server("E2E latency", f(&r, "mean_e2el_ms"), server_e2e);
    // TPOT is a difference of two enclosing intervals, so it may sit on either side of the
    // server's; the latency slack spread over the 15 decode gaps bounds it.
    let client_tpot = f(&r, "mean_tpot_ms") / 1e3;
    assert!(
        (client_tpot - server_tpot).abs()
            <= server_tpot * REL_TOL + ABS_TOL_S / (OUTPUT_LEN - 1) as f64,
        "TPOT: client {client_tpot:.5} s vs server {server_tpot:.5} s"
    );

    // Chat, with warm-ups the server sees but the metrics leave out.
    let before = after;
    let dir = result_dir("chat");
    let (out, r) = bench(
        &server,
        &dir,
        &[
            "--model",
            MODEL,
            "--backend",
            "openai-chat",
            "--num-prompts",
            "6",
            "--num-warmups",
            "2",
            "--max-concurrency",
            "2",
            "--request-rate",
            "20",
            "--burstiness",
            "0.5",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = r.expect("--save-result wrote the result");
    assert_eq!(
        (r["backend"].as_str(), r["completed"].as_u64()),
        (Some("openai-chat"), Some(6))
    );
    assert_eq!(
        (r["request_rate"].as_f64(), r["burstiness"].as_f64()),
        (Some(20.0), Some(0.5))
    );
    assert_eq!(r["total_output_tokens"], 6 * OUTPUT_LEN);
    assert!(f(&r, "mean_ttft_ms") > 0.0 && f(&r, "mean_itl_ms") > 0.0);
    // The server counts the chat template's tokens too, and the result takes its count.
    assert!(usizes(&r, "input_lens").iter().all(|&n| n > 34));
    let after = ServerFigures::read(&server);
    assert_eq!(
        after.generation_tokens - before.generation_tokens,
        (8 * OUTPUT_LEN) as f64
    );
}

#[test]
fn a_wrong_model_fails_every_request_with_its_reason() {
    let server = Server::start(&[]);
    let dir = result_dir("wrong-model");
    let (out, r) = bench(
        &server,
        &dir,
        &["--model", "no-such-model", "--num-prompts", "3"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a run with no successful request fails"
    );
    assert!(stderr.contains("all 3 requests failed"), "{stderr}");
    assert!(
        stderr.contains("404") && stderr.contains("no-such-model"),
        "{stderr}"
    );
    let r = r.expect("the result is saved even when every request failed");
    assert_eq!(
        (r["completed"].as_u64(), r["failed"].as_u64()),
        (Some(0), Some(3))
    );
    assert_eq!(r["total_output_tokens"], 0);
    assert_eq!(f(&r, "mean_ttft_ms"), 0.0);
    for e in r["errors"].as_array().unwrap() {
        assert!(e.as_str().unwrap().contains("does not exist"), "{e}");
    }
}

#[test]
fn appended_runs_carry_metadata_ramp_up_and_no_per_request_lists() {
    let server = Server::start(&[]);
    let dir = result_dir("append");
    let run = |extra: &[&str]| {
        let out = bench_command(&server)
            .args(["--model", MODEL, "--num-prompts", "4", "--append-result"])
            .args([
                "--result-filename",
                "runs.jsonl",
                "--metadata",
                "tp=1",
                "run=a b",
            ])
            .args(["--header", "x-bench-run=e2e", "--request-id-prefix", "e2e-"])
            .arg("--result-dir")
            .arg(&dir)
            .args(extra)
            .output()
            .expect("run ember bench serve");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    run(&["--temperature", "0", "--top-k", "1"]);
    let out = run(&[
        "--ramp-up-strategy",
        "linear",
        "--ramp-up-start-rps",
        "20",
        "--ramp-up-end-rps",
        "40",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Traffic ramp-up strategy: linear."),
        "{stderr}"
    );

    let text = std::fs::read_to_string(dir.join("runs.jsonl")).unwrap();
    let runs: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(runs.len(), 2, "--append-result adds a line per run");
    for r in &runs {
        assert_eq!(
            (r["completed"].as_u64(), r["failed"].as_u64()),
            (Some(4), Some(0))
        );
        assert_eq!(
            (r["tp"].as_str(), r["run"].as_str()),
            (Some("1"), Some("a b"))
        );
        for key in [
            "ttfts",
            "itls",
            "input_lens",
            "output_lens",
            "start_times",
            "generated_texts",
            "errors",
        ] {
            assert!(
                r.get(key).is_none(),
                "{key} is saved only with --save-detailed"
            );
        }
        assert_eq!(r["latencies"].as_array().map(Vec::len), Some(4));
        assert!(f(r, "mean_ttft_ms") > 0.0);
    }
    assert!(runs[0].get("ramp_up_strategy").is_none());
    let ramp = &runs[1];
    assert_eq!(
        (
            ramp["ramp_up_strategy"].as_str(),
            ramp["ramp_up_start_rps"].as_u64(),
            ramp["ramp_up_end_rps"].as_u64()
        ),
        (Some("linear"), Some(20), Some(40))
    );
    assert_eq!(ramp["request_rate"], "inf");
    let events = ramp["rps_change_events"].as_array().unwrap();
    let rates: Vec<u64> = events.iter().map(|e| e["rps"].as_u64().unwrap()).collect();
    assert_eq!(rates, (20..=40).collect::<Vec<_>>());
    assert!(events.iter().all(|e| e["timestamp"].is_string()));
}
