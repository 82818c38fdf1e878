//! The engine on a GPU (`--features cuda`): every tiny checkpoint through the real engine on
//! CUDA against transformers' fp32 reference, and the KV cache sized from the GPU's memory.
//! Each test prints SKIPPED with the reason and passes when the build has no CUDA or no GPU
//! opens; run them on a GPU machine with `cargo test -p ember-engine --features cuda --test cuda`.

mod common;

use candle_core::{DType, Device};
use common::*;
use ember_engine::EngineConfig;
use ember_models::attention::AttentionBackend;
use ember_models::fused_moe::MoeBackend;
use ember_models::layer_ops::LayerKernels;
use serde_json::Value;

/// Largest |bf16 on the GPU − fp32 transformers| allowed on one prompt log-probability, and on
/// their mean over a checkpoint's prompts: bf16 keeps 8 significant bits, so each of the tiny
/// models' few layers moves a logprob by a few hundredths.
const BF16_MAX_TOL: f64 = 0.15;
const BF16_MEAN_TOL: f64 = 0.03;

fn gpu(test: &str) -> Option<Device> {
    if !ember_models::device::cuda_built() {
        eprintln!("SKIPPED {test}: ember was built without --features cuda");
        return None;
    }
    match ember_models::device::open_cuda(0) {
        Ok(device) => Some(device),
        Err(e) => {
            eprintln!("SKIPPED {test}: no GPU: {e}");
            None
        }
    }
}

/// Runs every prompt of `name`'s reference batched, chunked prefill next to decodes.
fn run_batched(name: &str, device: &Device, dtype: DType) -> (Value, Vec<Finished>) {
    run_batched_on(name, device, dtype, AttentionBackend::Tensor)
}

/// The implementations a CUDA run selects (`--attention-backend`, `--moe-backend`,
/// `--layer-kernels`).
#[derive(Clone, Copy, Default)]
struct Backends {
    attention: AttentionBackend,
    moe: MoeBackend,
    layer: LayerKernels,
}

/// ember's kernels everywhere they serve.
const EMBER: Backends = Backends {
    attention: AttentionBackend::Ember,
    moe: MoeBackend::Fused,
    layer: LayerKernels::Ember,
};

/// An engine on `name` with a small token budget and blocks of 4: prompts prefill in chunks
/// next to other requests' decodes.
fn chunked_engine(
    name: &str,
    device: &Device,
    dtype: DType,
    backends: Backends,
) -> ember_engine::EngineHandle {
    let cfg = EngineConfig {
        max_num_batched_tokens: 24,
        block_size: 4,
        ..EngineConfig::default()
    };
    start_with(name, cfg, |opts| {
        opts.dtype = Some(dtype);
        opts.device = device.clone();
        opts.attention_backend = backends.attention;
        opts.moe_backend = backends.moe;
        opts.layer_kernels = backends.layer;
    })
}

fn run_batched_on(
    name: &str,
    device: &Device,
    dtype: DType,
    attention: AttentionBackend,
) -> (Value, Vec<Finished>) {
    let backends = Backends {
        attention,
        ..Backends::default()
    };
    run_batched_with(name, device, dtype, backends)
}

fn run_batched_with(
    name: &str,
    device: &Device,
    dtype: DType,
    backends: Backends,
) -> (Value, Vec<Finished>) {
    let reference = reference(name);
    let engine = chunked_engine(name, device, dtype, backends);
    let prompts = reference["prompts"].as_array().unwrap();
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| {
            engine
                .submit(ids(&p["token_ids"]), greedy_params(greedy_steps(p)))
                .unwrap()
        })
        .collect();
    let results = receivers.into_iter().map(collect).collect();
    (reference, results)
}

#[test]
fn every_model_matches_transformers_on_cuda_in_f32() {
    let Some(device) = gpu("every_model_matches_transformers_on_cuda_in_f32") else {
        return;
    };
    for name in MODELS {
        let (reference, results) = run_batched(name, &device, DType::F32);
        assert_matches_reference(name, reference["prompts"].as_array().unwrap(), &results);
        eprintln!("{name}: f32 on CUDA matches transformers (tol {LOGPROB_TOL})");
    }
}

#[test]
fn ember_paged_attention_kernel_matches_transformers_on_cuda() {
    let Some(device) = gpu("ember_paged_attention_kernel_matches_transformers_on_cuda") else {
        return;
    };
    // The Qwen3 families' attention runs ember's kernel under --attention-backend ember (MLA
    // keeps the tensor path): f32 against the reference, blocks of 4 and chunked prefill.
    for name in ["qwen3-tiny", "qwen3-moe-tiny", "qwen3-moe-mixed-tiny"] {
        let (reference, results) =
            run_batched_on(name, &device, DType::F32, AttentionBackend::Ember);
        assert_matches_reference(name, reference["prompts"].as_array().unwrap(), &results);
        eprintln!("{name}: ember's paged attention kernel on CUDA matches transformers (tol {LOGPROB_TOL})");
    }
}

/// Plain greedy requests (no logprobs) take the device-greedy path: the argmax kernel on the
/// GPU, only token ids copied back. Their tokens must be transformers' greedy tokens, batched
/// and chunked, and every step must have sampled on the device.
#[test]
fn device_greedy_sampling_on_cuda_gives_the_reference_tokens() {
    let Some(device) = gpu("device_greedy_sampling_on_cuda_gives_the_reference_tokens") else {
        return;
    };
    for name in ["qwen3-tiny", "qwen3-moe-tiny", "deepseek-v3-tiny"] {
        let reference = reference(name);
        let engine = chunked_engine(name, &device, DType::F32, Backends::default());
        let prompts = reference["prompts"].as_array().unwrap();
        let receivers: Vec<_> = prompts
            .iter()
            .map(|p| {
                let params = ember_core::SamplingParams {
                    ignore_eos: true,
                    ..ember_core::SamplingParams::greedy(greedy_steps(p))
                };
                engine.submit(ids(&p["token_ids"]), params).unwrap()
            })
            .collect();
        for (rx, p) in receivers.into_iter().zip(prompts) {
            assert_eq!(collect(rx).tokens, ids(&p["greedy"]["token_ids"]), "{name}");
        }
        let stats = engine.stats();
        assert!(
            stats.device_sampled_steps + 1 >= stats.steps,
            "{name}: {stats:?}"
        );
        eprintln!("{name}: device greedy sampling on CUDA gives the reference tokens");
    }
}

/// Sampling requests take the device-draw path on a GPU (the default there): top-k 1 at
/// temperature 1.3 keeps only the best token, so the tokens are transformers' greedy tokens with
/// every step drawn by `sample_rows_f32`; a seeded request repeats its tokens.
#[test]
fn device_sampling_on_cuda_keeps_filters_and_seeds() {
    let Some(device) = gpu("device_sampling_on_cuda_keeps_filters_and_seeds") else {
        return;
    };
    for name in ["qwen3-tiny", "qwen3-moe-tiny", "deepseek-v3-tiny"] {
        let reference = reference(name);
        let engine = chunked_engine(name, &device, DType::F32, Backends::default());
        let prompts = reference["prompts"].as_array().unwrap();
        let sampled = |steps, top_k, seed| ember_core::SamplingParams {
            temperature: 1.3,
            top_k,
            seed,
            ignore_eos: true,
            ..ember_core::SamplingParams::greedy(steps)
        };
        let receivers: Vec<_> = prompts
            .iter()
            .map(|p| {
                engine
                    .submit(ids(&p["token_ids"]), sampled(greedy_steps(p), 1, None))
                    .unwrap()
            })
            .collect();
        for (rx, p) in receivers.into_iter().zip(prompts) {
            assert_eq!(collect(rx).tokens, ids(&p["greedy"]["token_ids"]), "{name}");
        }
        let stats = engine.stats();
        assert!(
            stats.device_sampled_steps + 1 >= stats.steps,
            "{name}: {stats:?}"
        );
        let seeded = || {
            collect(
                engine
                    .submit(ids(&prompts[0]["token_ids"]), sampled(16, 50, Some(3)))
                    .unwrap(),
            )
            .tokens
        };
        assert_eq!(seeded(), seeded(), "{name}: a seed repeats its tokens");
        eprintln!("{name}: device sampling on CUDA keeps top-k 1 greedy and seeds reproducible");
    }
}

/// fp8 KV caches on CUDA score as the same cache on the CPU (the conversions are exact on both;
/// only f32 arithmetic order differs): e5m2 (bytes converted by kernels/fp8_e5m2.cu) and e4m3
/// (candle's float8 casts), both written by kernels/scatter_rows.cu (candle's CUDA scatter has
/// no float8 kernel).
#[test]
fn fp8_kv_caches_on_cuda_match_the_cpu() {
    let Some(device) = gpu("fp8_kv_caches_on_cuda_match_the_cpu") else {
        return;
    };
    use ember_core::KvCacheDtype;
    for (name, kv) in [
        ("qwen3-moe-tiny", KvCacheDtype::Fp8E5m2),
        ("deepseek-v3-tiny", KvCacheDtype::Fp8E5m2),
        ("qwen3-moe-tiny", KvCacheDtype::Fp8E4m3),
    ] {
        let reference = reference(name);
        let run = |device: &Device| {
            let engine = start_with(name, EngineConfig::default(), |opts| {
                opts.dtype = Some(DType::F32);
                opts.device = device.clone();
                opts.kv_cache_dtype = kv;
            });
            let p = &reference["prompts"][0];
            collect(
                engine
                    .submit(ids(&p["token_ids"]), greedy_params(greedy_steps(p)))
                    .unwrap(),
            )
        };
        let (cpu, gpu) = (run(&Device::Cpu), run(&device));
        assert_eq!(cpu.tokens, gpu.tokens, "{name} {kv:?}");
        let as_f64: Vec<f64> = cpu.logprobs.iter().map(|&x| x as f64).collect();
        assert_close(
            &format!("{name} {kv:?} cache"),
            &gpu.logprobs,
            &as_f64,
            1e-3,
        );
        eprintln!("{name}: {kv:?} KV cache on CUDA matches the CPU");
    }
}

#[test]
fn every_model_tracks_transformers_on_cuda_in_bf16() {
    let Some(device) = gpu("every_model_tracks_transformers_on_cuda_in_bf16") else {
        return;
    };
    for name in MODELS {
        let (reference, results) = run_batched(name, &device, DType::BF16);
        assert_tracks_in_bf16(name, &reference, &results, "bf16 on CUDA");
    }
}

/// `name`'s teacher-forced prompt logprobs within the bf16 tolerances of transformers' fp32.
fn assert_tracks_in_bf16(name: &str, reference: &Value, results: &[Finished], what: &str) {
    let (mut max, mut sum, mut n) = (0f64, 0f64, 0usize);
    for (p, got) in reference["prompts"].as_array().unwrap().iter().zip(results) {
        // Prompt logprobs are teacher-forced: they compare position by position even where a
        // bf16 greedy path would pick another token.
        let want = p["prompt_logprobs"].as_array().unwrap();
        assert_eq!(
            got.prompt_logprobs.len(),
            want.len(),
            "{name}: prompt logprobs"
        );
        for (ours, theirs) in got.prompt_logprobs.iter().zip(want).skip(1) {
            let d = (ours.unwrap() as f64 - theirs.as_f64().unwrap()).abs();
            max = max.max(d);
            sum += d;
            n += 1;
        }
    }
    let mean = sum / n as f64;
    eprintln!("{name}: {what} vs transformers fp32: max |Δ| {max:.4}, mean {mean:.4}");
    assert!(
        max <= BF16_MAX_TOL && mean <= BF16_MEAN_TOL,
        "{name}: {what}: prompt logprobs off by max {max} (tol {BF16_MAX_TOL}), mean {mean} (tol {BF16_MEAN_TOL})"
    );
}

/// The MoE checkpoints with dense experts under `--moe-backend fused`: routing, alignment, the
/// grouped GEMMs (bf16 on tensor cores; the grouped W8A16 / W4A16 GEMMs for the FP8 and 4-bit
/// checkpoints, whose experts stay packed on CUDA) and the weighted sum as ember's kernels,
/// router logits kept on the GPU. f32 within the reference tolerance, bf16 within the bf16 ones, and every
/// model must actually have run the fused op.
#[test]
fn ember_fused_moe_kernels_match_transformers_on_cuda() {
    let Some(device) = gpu("ember_fused_moe_kernels_match_transformers_on_cuda") else {
        return;
    };
    for name in [
        "qwen3-moe-tiny",
        "qwen3-moe-mixed-tiny",
        "deepseek-v3-tiny",
        "kimi-k2-tiny",
        "deepseek-v2-lite-tiny",
        "deepseek-v2-tiny",
        // e4m3 experts held as stored on CUDA: the grouped W8A16 GEMM.
        "deepseek-v3-fp8-tiny",
        "deepseek-v3-fp8-ue8m0-tiny",
        // 4-bit experts held packed: the grouped W4A16 GEMM (int4, AWQ, NVFP4).
        "kimi-k2-int4-tiny",
        "kimi-k2-awq-tiny",
        "kimi-k2-nvfp4-tiny",
    ] {
        let before = ember_models::fused_moe::calls();
        let fused = Backends {
            moe: MoeBackend::Fused,
            ..Backends::default()
        };
        let (reference, results) = run_batched_with(name, &device, DType::F32, fused);
        assert!(
            ember_models::fused_moe::calls() > before,
            "{name}: the fused MoE never ran"
        );
        assert_matches_reference(name, reference["prompts"].as_array().unwrap(), &results);
        eprintln!("{name}: the fused MoE on CUDA in f32 matches transformers (tol {LOGPROB_TOL})");
        let (reference, results) = run_batched_with(name, &device, DType::BF16, fused);
        assert_tracks_in_bf16(name, &reference, &results, "the fused MoE in bf16 on CUDA");
    }
}

/// Every checkpoint with all of ember's kernels selected (paged attention, MLA decode, the fused MoE, RMSNorm
/// with the residual add, the fused gate/up GEMM with SiLU-and-mul, RoPE): f32 within the
/// reference tolerance, bf16 within the bf16 ones. What switching the defaults would serve.
#[test]
fn every_model_matches_transformers_with_all_of_embers_kernels() {
    let Some(device) = gpu("every_model_matches_transformers_with_all_of_embers_kernels") else {
        return;
    };
    for name in MODELS {
        let before = ember_models::layer_ops::calls();
        let mla_before = ember_models::mla_kernel::calls();
        let (reference, results) = run_batched_with(name, &device, DType::F32, EMBER);
        assert!(
            ember_models::layer_ops::calls()[1] > before[1],
            "{name}: the fused add-RMSNorm never ran"
        );
        let mla = name.starts_with("deepseek") || name.starts_with("kimi");
        assert!(
            !mla || ember_models::mla_kernel::calls() > mla_before,
            "{name}: the MLA decode kernel never ran"
        );
        assert_matches_reference(name, reference["prompts"].as_array().unwrap(), &results);
        eprintln!(
            "{name}: all of ember's kernels on CUDA in f32 match transformers (tol {LOGPROB_TOL})"
        );
        let (reference, results) = run_batched_with(name, &device, DType::BF16, EMBER);
        assert_tracks_in_bf16(
            name,
            &reference,
            &results,
            "all of ember's kernels in bf16 on CUDA",
        );
    }
}

#[test]
fn the_kv_cache_takes_what_gpu_memory_utilization_leaves() {
    let Some(device) = gpu("the_kv_cache_takes_what_gpu_memory_utilization_leaves") else {
        return;
    };
    let utilization = 0.3;
    let cfg = EngineConfig {
        gpu_memory_utilization: Some(utilization),
        // Far below what the share leaves: the share, not this, must size the cache.
        kv_cache_bytes: 1 << 20,
        ..EngineConfig::default()
    };
    let engine = start_on("qwen3-tiny", cfg, device.clone(), DType::BF16);
    let blocks = engine.stats().kv_blocks_total;
    let (free, total) = ember_models::device::gpu_memory(&device).unwrap().unwrap();
    let used = total - free;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    eprintln!(
        "qwen3-tiny bf16 at {utilization}: {blocks} blocks, {:.2} of {:.2} GiB in use",
        gib(used),
        gib(total)
    );
    // The cache is allocated, the step's reserve is not: in use stays under the share.
    assert!(blocks > 1000, "{blocks} blocks");
    assert!(
        (used as f64) <= utilization * total as f64,
        "{:.2} GiB in use, over {utilization} of {:.2} GiB",
        gib(used),
        gib(total)
    );
    // A well-formed request still runs on it.
    let p = &reference("qwen3-tiny")["prompts"][0];
    let got = collect(
        engine
            .submit(ids(&p["token_ids"]), greedy_params(4))
            .unwrap(),
    );
    assert_eq!(got.tokens.len(), 4);
}
