//! Embeddings against transformers: the tiny Qwen3-Embedding checkpoint (prefix-less `Qwen3Model`
//! keys, sentence-transformers last-token pooling) must reproduce the float32 embeddings that
//! `models/make_tiny_qwen3_embedding.py` recorded, through the real engine (scheduler, paged KV
//! cache, chunked prefill), alone and batched with requests of other lengths.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ember_core::{ModelTask, RequestOutput, SamplingParams};
use ember_engine::{EngineConfig, EngineHandle};
use tokio::sync::mpsc::UnboundedReceiver;

const MODEL: &str = "qwen3-embedding-tiny";
/// Largest |ember − transformers| allowed on a component of an L2-normalised embedding (fp32
/// both sides; measured differences are ~1e-6).
const EMBEDDING_TOL: f64 = 1e-4;

fn l2_normalised(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

/// The raw embedding of one request (its last output's hidden state), checking the counts.
fn embedding(mut rx: UnboundedReceiver<RequestOutput>, prompt_len: usize) -> Vec<f32> {
    let out = rx.blocking_recv().expect("the engine sends one output");
    assert!(out.error.is_none(), "{:?}", out.error);
    assert!(out.finish_reason.is_some() && out.new_token_ids.is_empty());
    assert_eq!((out.prompt_tokens, out.completion_tokens), (prompt_len, 0));
    out.embedding
        .expect("an embedding request returns its embedding")
}

/// Every reference case: (token ids, expected normalised embedding, dimensions).
fn cases() -> Vec<(Vec<u32>, Vec<f64>, Option<usize>)> {
    let reference = reference(MODEL);
    let inputs = reference["inputs"].as_array().unwrap();
    let mut cases: Vec<_> = inputs
        .iter()
        .chain(reference["token_inputs"].as_array().unwrap())
        .map(|c| (ids(&c["token_ids"]), floats(&c["embedding"]), None))
        .collect();
    for c in reference["dimensions"].as_array().unwrap() {
        let input = &inputs[c["input"].as_u64().unwrap() as usize];
        let dims = c["dimensions"].as_u64().unwrap() as usize;
        cases.push((
            ids(&input["token_ids"]),
            floats(&c["embedding"]),
            Some(dims),
        ));
    }
    cases
}

fn check(engine: &EngineHandle, batched: bool) {
    let cases = cases();
    let submit = |(ids, _, _): &(Vec<u32>, Vec<f64>, Option<usize>)| {
        engine
            .submit(ids.clone(), SamplingParams::embedding())
            .unwrap()
    };
    // Batched: every request is submitted before any output is read, so they share steps.
    let raw: Vec<Vec<f32>> = if batched {
        let receivers: Vec<_> = cases.iter().map(submit).collect();
        receivers
            .into_iter()
            .zip(&cases)
            .map(|(rx, c)| embedding(rx, c.0.len()))
            .collect()
    } else {
        cases
            .iter()
            .map(|c| embedding(submit(c), c.0.len()))
            .collect()
    };
    let hidden = engine.info().hidden_size;
    for (i, ((_, want, dims), got)) in cases.iter().zip(raw).enumerate() {
        assert_eq!(got.len(), hidden, "case {i}: embedding length");
        let got = l2_normalised(&got[..dims.unwrap_or(hidden)]);
        assert_close(
            &format!("case {i} (dims {dims:?})"),
            &got,
            want,
            EMBEDDING_TOL,
        );
    }
}

#[test]
fn the_checkpoint_is_detected_as_an_embedding_model() {
    let engine = start(MODEL, EngineConfig::default());
    assert_eq!(engine.info().task, ModelTask::Embed);
    assert_eq!(engine.info().hidden_size, 64);
    // It serves embeddings only, and a generation model serves none.
    let err = engine
        .submit(vec![1, 2], SamplingParams::greedy(4))
        .unwrap_err();
    assert!(err.to_string().contains("embeddings only"), "{err}");
    let chat = start("qwen3-tiny", EngineConfig::default());
    assert_eq!(chat.info().task, ModelTask::Generate);
    let err = chat
        .submit(vec![1, 2], SamplingParams::embedding())
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("This model does not support embeddings"),
        "{err}"
    );
}

#[test]
fn embeddings_match_transformers_alone() {
    check(&start(MODEL, EngineConfig::default()), false);
}

#[test]
fn embeddings_match_transformers_batched_and_chunked() {
    // Small budget and blocks: long prompts are prefilled in chunks beside shorter requests.
    let cfg = EngineConfig {
        max_num_batched_tokens: 24,
        block_size: 4,
        ..EngineConfig::default()
    };
    check(&start(MODEL, cfg), true);
}

#[test]
fn a_prefix_cache_hit_gives_the_same_embedding() {
    let engine = start(
        MODEL,
        EngineConfig {
            block_size: 8,
            ..EngineConfig::default()
        },
    );
    let (prompt, want, _) = cases().swap_remove(4);
    let first = embedding(
        engine
            .submit(prompt.clone(), SamplingParams::embedding())
            .unwrap(),
        prompt.len(),
    );
    let mut rx = engine
        .submit(prompt.clone(), SamplingParams::embedding())
        .unwrap();
    let second = rx.blocking_recv().unwrap();
    assert_eq!(second.cached_prompt_tokens, (prompt.len() - 1) / 8 * 8);
    for got in [first, second.embedding.unwrap()] {
        assert_close("prefix-cached", &l2_normalised(&got), &want, EMBEDDING_TOL);
    }
}

#[test]
fn a_dropped_embedding_request_is_aborted_and_frees_its_blocks() {
    // Two tokens per step: the long prompt is still prefilling when its receiver goes.
    let engine = start(
        MODEL,
        EngineConfig {
            max_num_batched_tokens: 2,
            block_size: 4,
            enable_prefix_caching: false,
            ..EngineConfig::default()
        },
    );
    let (prompt, _, _) = cases().swap_remove(4);
    let rx = engine.submit(prompt, SamplingParams::embedding()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.stats().running == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(rx);
    let settled =
        |s: &ember_engine::StatsSnapshot| s.aborted_requests == 1 && s.kv_blocks_used == 0;
    while !settled(&engine.stats()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = engine.stats();
    assert_eq!(stats.aborted_requests, 1, "{stats:?}");
    assert_eq!(stats.kv_blocks_used, 0, "{stats:?}");
    // The engine goes on serving.
    let (prompt, want, _) = cases().swap_remove(1);
    let got = embedding(
        engine
            .submit(prompt.clone(), SamplingParams::embedding())
            .unwrap(),
        prompt.len(),
    );
    assert_close("after an abort", &l2_normalised(&got), &want, EMBEDDING_TOL);
}
