//! Helpers shared by the tests that compare the engine with transformers' reference outputs.
#![allow(dead_code)]

use ember_models::device::calls::KernelCalls;
use std::path::PathBuf;

use ember_core::{FinishReason, RequestOutput, SamplingParams};
use ember_engine::{Engine, EngineConfig, EngineHandle};
use ember_models::{load_model, LoadOptions};
use serde_json::Value;

/// Every tiny generating checkpoint with a transformers reference.
pub const MODELS: [&str; 16] = [
    "qwen3-tiny",
    "qwen3-moe-tiny",
    "qwen3-moe-mixed-tiny",
    "deepseek-v3-tiny",
    "kimi-k2-tiny",
    "deepseek-v3-fp8-tiny",
    "deepseek-v3-fp8-ue8m0-tiny",
    // hidden 320: real 128x128 blocks with ragged edges.
    "deepseek-v3-fp8-256-tiny",
    // DeepSeek-V2 routing: softmax greedy (V2-Lite shape, YaRN mscale 0.707) and group-limited greedy.
    "deepseek-v2-lite-tiny",
    "deepseek-v2-tiny",
    // Routed experts in compressed-tensors pack-quantized INT4 (group 32), as Kimi K2 Thinking.
    "kimi-k2-int4-tiny",
    // The same with GPTQ's activation order: a weight_g_idx column-to-group map per expert weight.
    "kimi-k2-int4-actorder-tiny",
    // Routed experts in compressed-tensors NVFP4 (e4m3 per 16 + global) and MXFP4 (e8m0 per 32).
    "kimi-k2-nvfp4-tiny",
    "kimi-k2-mxfp4-tiny",
    // Routed experts in GPTQ's own layout (v1, act order, asymmetric) and AWQ's (GEMM); held
    // packed for the W4A16 kernels.
    "kimi-k2-gptq-tiny",
    "kimi-k2-awq-tiny",
];

/// The checkpoints of [`MODELS`] that store quantized projections (held packed by default).
pub const QUANTIZED: [&str; 9] = [
    "deepseek-v3-fp8-tiny",
    "deepseek-v3-fp8-ue8m0-tiny",
    "deepseek-v3-fp8-256-tiny",
    "kimi-k2-int4-tiny",
    "kimi-k2-int4-actorder-tiny",
    "kimi-k2-nvfp4-tiny",
    "kimi-k2-mxfp4-tiny",
    "kimi-k2-gptq-tiny",
    "kimi-k2-awq-tiny",
];

/// Largest |ember − transformers| allowed on a log-probability (fp32 both sides).
pub const LOGPROB_TOL: f64 = 1e-3;
/// Largest difference allowed between a request run alone and run in a batch.
pub const BATCH_TOL: f64 = 1e-4;

pub fn model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name)
}

pub fn reference(name: &str) -> Value {
    let path = model_dir(name).join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Starts an fp32 engine on the tiny checkpoint `name`.
pub fn start(name: &str, cfg: EngineConfig) -> EngineHandle {
    start_on(name, cfg, candle_core::Device::Cpu, candle_core::DType::F32)
}

/// Starts an engine on the tiny checkpoint `name`, computing in `dtype` on `device`.
pub fn start_on(
    name: &str,
    cfg: EngineConfig,
    device: candle_core::Device,
    dtype: candle_core::DType,
) -> EngineHandle {
    start_with(name, cfg, |opts| {
        opts.dtype = Some(dtype);
        opts.device = device;
    })
}

/// Starts an engine on the tiny checkpoint `name` with load options `set` adjusts.
pub fn start_with(
    name: &str,
    cfg: EngineConfig,
    set: impl FnOnce(&mut LoadOptions),
) -> EngineHandle {
    start_counting(name, cfg, set).0
}

/// [`start_with`], and the calls the model's kernel paths serve (see [`KernelCalls`]).
pub fn start_counting(
    name: &str,
    cfg: EngineConfig,
    set: impl FnOnce(&mut LoadOptions),
) -> (EngineHandle, std::sync::Arc<KernelCalls>) {
    // A context that any cache of the tests can hold whole, however small.
    let max_model_len = cfg.num_blocks.map(|n| n * cfg.block_size);
    let mut opts = LoadOptions::new(model_dir(name).to_string_lossy());
    // The references are fp32 (the checkpoints store bf16, which `auto` would keep on the CPU).
    opts.dtype = Some(candle_core::DType::F32);
    set(&mut opts);
    opts.max_model_len = max_model_len;
    let loaded = load_model(&opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    let calls = loaded.kernel_calls.clone();
    let engine = Engine::start(loaded, cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
    (engine, calls)
}

pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Collects every output of a request until it finishes.
pub struct Finished {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub prompt_logprobs: Vec<Option<f32>>,
    pub cached_prompt_tokens: usize,
    pub finish: FinishReason,
}

pub fn collect(mut rx: tokio::sync::mpsc::UnboundedReceiver<RequestOutput>) -> Finished {
    let mut done = Finished {
        tokens: vec![],
        logprobs: vec![],
        prompt_logprobs: vec![],
        cached_prompt_tokens: 0,
        finish: FinishReason::Error,
    };
    while let Some(out) = rx.blocking_recv() {
        done.tokens.extend(&out.new_token_ids);
        done.cached_prompt_tokens = out.cached_prompt_tokens;
        done.logprobs
            .extend(out.new_logprobs.iter().map(|l| l.logprob));
        if let Some(p) = out.prompt_logprobs {
            done.prompt_logprobs = p.iter().map(|l| l.as_ref().map(|l| l.logprob)).collect();
        }
        if let Some(reason) = out.finish_reason {
            assert!(out.error.is_none(), "{:?}", out.error);
            done.finish = reason;
            break;
        }
    }
    done
}

pub fn greedy_params(steps: usize) -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        logprobs: Some(5),
        prompt_logprobs: Some(5),
        ..SamplingParams::greedy(steps)
    }
}

pub fn assert_close(what: &str, ours: &[f32], theirs: &[f64], tol: f64) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert!(
            (*a as f64 - b).abs() <= tol,
            "{what}[{i}]: ember {a} vs reference {b} (tol {tol})"
        );
    }
}

/// Checks each result against its reference prompt: prompt logprobs and greedy logprobs within
/// [`LOGPROB_TOL`], greedy tokens identical, finished by length.
pub fn assert_matches_reference(name: &str, prompts: &[Value], results: &[Finished]) {
    assert_eq!(prompts.len(), results.len(), "{name}: number of results");
    for (i, (p, got)) in prompts.iter().zip(results).enumerate() {
        let what = format!("{name} prompt {i}");
        let want_prompt: Vec<Option<f64>> = p["prompt_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(Value::as_f64)
            .collect();
        assert_eq!(
            got.prompt_logprobs.len(),
            want_prompt.len(),
            "{what}: prompt logprob count"
        );
        assert!(got.prompt_logprobs[0].is_none() && want_prompt[0].is_none());
        let ours: Vec<f32> = got.prompt_logprobs[1..]
            .iter()
            .map(|x| x.unwrap())
            .collect();
        let theirs: Vec<f64> = want_prompt[1..].iter().map(|x| x.unwrap()).collect();
        assert_close(
            &format!("{what} prompt logprobs"),
            &ours,
            &theirs,
            LOGPROB_TOL,
        );
        assert_eq!(
            got.tokens,
            ids(&p["greedy"]["token_ids"]),
            "{what}: greedy tokens"
        );
        let theirs: Vec<f64> = floats(&p["greedy"]["logprobs"]);
        assert_close(
            &format!("{what} greedy logprobs"),
            &got.logprobs,
            &theirs,
            LOGPROB_TOL,
        );
        assert_eq!(got.finish, FinishReason::Length);
    }
}

/// Greedy steps the reference recorded for prompt `p`.
pub fn greedy_steps(p: &Value) -> usize {
    p["greedy"]["token_ids"].as_array().unwrap().len()
}

/// The logprob of every token but the first of each of `sequences` (teacher-forced through
/// prompt logprobs, so no greedy flip can make two runs diverge), and the weight bytes held,
/// under `opts` and the engine settings `cfg`.
pub fn score_with(
    opts: &LoadOptions,
    cfg: EngineConfig,
    sequences: &[Vec<u32>],
) -> (Vec<f32>, u64) {
    let loaded = load_model(opts).unwrap();
    let weight_bytes = loaded.weight_bytes;
    let engine = Engine::start(loaded, cfg).unwrap();
    let params = SamplingParams {
        prompt_logprobs: Some(1),
        ..SamplingParams::greedy(0)
    };
    let mut logprobs = vec![];
    for tokens in sequences {
        let got = collect(engine.submit(tokens.clone(), params.clone()).unwrap());
        logprobs.extend(got.prompt_logprobs[1..].iter().map(|l| l.unwrap()));
    }
    (logprobs, weight_bytes)
}

/// [`score_with`] under the default engine settings.
pub fn score(opts: &LoadOptions, sequences: &[Vec<u32>]) -> (Vec<f32>, u64) {
    score_with(opts, EngineConfig::default(), sequences)
}

/// A scoring fixture's token sequences (its `sequences`).
pub fn fixture_sequences(fixture: &Value) -> Vec<Vec<u32>> {
    fixture["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect()
}

/// A scoring fixture's logprobs under `key`, all sequences end to end.
pub fn fixture_logprobs(fixture: &Value, key: &str) -> Vec<f64> {
    fixture[key]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(floats)
        .collect()
}
