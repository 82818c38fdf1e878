//! End to end: many clients at once against the real server — every request answered, greedy
//! output independent of what else is batched (chunked prefill and prefix-cache hits included),
//! and a bounded load test that leaves no blocks, requests or memory behind.

mod common;

use std::time::{Duration, Instant};

use common::{prompt, Server};
use serde_json::Value;

/// Sends every prompt at once, one thread each; returns the responses in order.
fn concurrently(server: &Server, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Value> {
    std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(move || server.complete(p, max_tokens)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn answer(v: &Value) -> (String, Vec<f64>) {
    let choice = &v["choices"][0];
    let lps = choice["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    (choice["text"].as_str().unwrap().to_string(), lps)
}

#[test]
fn sixty_four_concurrent_requests_are_all_answered() {
    let server = Server::start(&[]);
    let prompts: Vec<Vec<u32>> = (0..64)
        .map(|i| prompt(i, 5 + (i as usize * 7) % 90))
        .collect();
    let answers = concurrently(&server, &prompts, 12);
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a["usage"]["completion_tokens"], 12, "request {i}");
        assert_eq!(a["usage"]["prompt_tokens"], prompts[i].len(), "request {i}");
    }
}

#[test]
fn greedy_output_does_not_depend_on_the_batch() {
    let target = prompt(999, 70);
    let alone_server = Server::start(&["--no-enable-prefix-caching"]);
    let alone = answer(&alone_server.complete(&target, 24));
    drop(alone_server);
    let others: Vec<Vec<u32>> = (0..31)
        .map(|i| prompt(i, 3 + (i as usize * 11) % 120))
        .collect();
    // Default budget; a 16-token budget that chunks every prompt; and prefix-cache hits on a
    // second round of the same requests.
    for flags in [&[][..], &["--max-num-batched-tokens", "16"][..]] {
        let server = Server::start(flags);
        for round in 0..2 {
            let mut prompts = others.clone();
            prompts.insert(round * 7, target.clone());
            let answers = concurrently(&server, &prompts, 24);
            let got = answer(&answers[round * 7]);
            assert_eq!(got.0, alone.0, "text with {flags:?}, round {round}");
            for (a, b) in got.1.iter().zip(&alone.1) {
                assert!(
                    (a - b).abs() < 1e-4,
                    "logprob {a} vs {b} with {flags:?}, round {round}"
                );
            }
        }
        assert!(
            server.metric("ember:prefix_cache_hits_total") > 0.0,
            "round 2 should hit the prefix cache"
        );
    }
}

#[test]
fn a_bounded_load_test_leaves_nothing_behind() {
    // A pool of 256 blocks: the warm-up cycles through all of it, so the pages the KV cache
    // touches are resident before the measurement starts.
    let server = Server::start(&["--num-gpu-blocks-override", "256"]);
    let total = 1500;
    let concurrency = 48;
    for round in 0..8 {
        let warmup: Vec<Vec<u32>> = (0..concurrency)
            .map(|i| prompt(10_000 + round * 64 + i, 20))
            .collect();
        concurrently(&server, &warmup, 4);
    }
    let rss_before = server.rss_kib();
    let started = Instant::now();
    std::thread::scope(|s| {
        for worker in 0..concurrency {
            let server = &server;
            s.spawn(move || {
                for k in (worker..total).step_by(concurrency as usize) {
                    let a = server.complete(&prompt(k, 4 + k as usize % 24), 4);
                    assert_eq!(a["usage"]["completion_tokens"], 4);
                }
            });
        }
    });
    assert!(
        started.elapsed() < Duration::from_secs(600),
        "load test took {:?}",
        started.elapsed()
    );
    let rss_after = server.rss_kib();
    // Every request finished: nothing running, no block held (cached blocks count as free).
    assert_eq!(server.metric("ember:num_requests_running"), 0.0);
    assert_eq!(server.metric("ember:num_requests_waiting"), 0.0);
    assert_eq!(server.metric("ember:kv_cache_blocks_used"), 0.0);
    // The engine's time is split by phase, and the forward pass got some of it.
    let phase =
        |p: &str| server.metric(&format!("ember:engine_step_seconds_total{{phase=\"{p}\"}}"));
    let phases: Vec<f64> = ["schedule", "forward", "sample", "other"]
        .map(phase)
        .to_vec();
    assert!(phases.iter().all(|&t| t > 0.0), "{phases:?}");
    // Memory stays flat: 1500 requests may not grow the server by more than 64 MiB.
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

#[test]
fn a_client_that_hangs_up_frees_its_blocks() {
    let server = Server::start(&[]);
    let impatient = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let body = serde_json::json!({"model": common::MODEL, "prompt": prompt(5, 40), "max_tokens": 3000,
                                  "temperature": 0, "ignore_eos": true});
    let r = impatient
        .post(format!("{}/v1/completions", server.base))
        .json(&body)
        .send();
    assert!(r.is_err(), "3000 tokens cannot finish in 300 ms");
    // The engine notices on its next step; give it a moment, far less than the 3000 tokens take.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.metric("ember:request_aborted_total") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the abandoned request was not aborted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.metric("ember:num_requests_running"), 0.0);
    assert_eq!(server.metric("ember:kv_cache_blocks_used"), 0.0);
}
