//! ember against transformers: every tiny checkpoint in `models/` must reproduce the fp32
//! reference outputs recorded by `models/make_tiny_models.py`, through the real engine
//! (paged KV cache, scheduler, sampler), alone and batched.

mod common;

use common::*;
use ember_core::{FinishReason, SamplingParams};
use ember_engine::{Engine, EngineConfig};
use ember_models::device::calls::{Kernel, KernelCalls};
use ember_models::{load_model, LoadOptions};
use serde_json::Value;

#[test]
fn a_cache_too_small_for_one_full_request_is_refused_at_start() {
    let opts = LoadOptions {
        dtype: Some(candle_core::DType::F32),
        ..LoadOptions::new(model_dir("qwen3-tiny").to_string_lossy())
    };
    let cfg = EngineConfig {
        num_blocks: Some(10),
        block_size: 4,
        ..EngineConfig::default()
    };
    let err = Engine::start(load_model(&opts).unwrap(), cfg)
        .err()
        .expect("must refuse")
        .to_string();
    assert!(
        err.contains("--max-model-len 4096") && err.contains("40 tokens"),
        "{err}"
    );
}

fn check_against_reference(name: &str, cfg: EngineConfig, batched: bool) {
    check_against_reference_with(name, cfg, batched, |_| {});
}

/// Checks `name` against its reference; returns the calls its kernel paths served.
fn check_against_reference_with(
    name: &str,
    cfg: EngineConfig,
    batched: bool,
    set: impl FnOnce(&mut LoadOptions),
) -> std::sync::Arc<KernelCalls> {
    let reference = reference(name);
    let (engine, calls) = start_counting(name, cfg, set);
    let prompts = reference["prompts"].as_array().unwrap();
    let run = |p: &Value| {
        engine
            .submit(ids(&p["token_ids"]), greedy_params(greedy_steps(p)))
            .unwrap()
    };
    // Batched: submit every prompt before reading any output, so they share steps.
    let results: Vec<Finished> = if batched {
        let receivers: Vec<_> = prompts.iter().map(run).collect();
        receivers.into_iter().map(collect).collect()
    } else {
        prompts.iter().map(|p| collect(run(p))).collect()
    };
    assert_matches_reference(name, prompts, &results);
    calls
}
#[test]
fn every_model_matches_transformers_alone() {
    for name in MODELS {
        check_against_reference(name, EngineConfig::default(), false);
    }
}

#[test]
fn every_model_matches_transformers_batched_and_chunked() {
    for name in MODELS {
        // Small budget and blocks: prompts are prefilled in chunks next to other requests' decodes.
        let cfg = EngineConfig {
            max_num_batched_tokens: 24,
            block_size: 4,
            ..EngineConfig::default()
        };
        check_against_reference(name, cfg, true);
    }
}

/// On the CPU the default MoE backend runs dense experts, and packed ones (4-bit, FP4, block
/// FP8), through the fused MoE's blocked CPU kernel (ember-kernels' `moe_cpu`): the MoE
/// checkpoints match transformers through it.
#[test]
fn the_moe_checkpoints_match_transformers_through_the_cpu_moe_kernel() {
    for name in [
        "qwen3-moe-tiny",
        "deepseek-v3-tiny",
        "kimi-k2-tiny",
        "deepseek-v2-tiny",
        "kimi-k2-int4-tiny",
        "kimi-k2-mxfp4-tiny",
        "deepseek-v3-fp8-tiny",
    ] {
        let calls = check_against_reference_with(name, EngineConfig::default(), true, |_| {});
        assert!(
            calls.get(Kernel::MoeCpu) > 0,
            "{name}: the CPU MoE kernel never ran"
        );
    }
}

/// The fused MoE (`--moe-backend fused`: dense and packed experts through the blocked CPU
/// kernel here, as by default on the CPU) and ember's layer kernels (their CPU references here:
/// the oracles of the CUDA kernels), batched and chunked: every checkpoint still matches
/// transformers.
#[test]
fn every_model_matches_transformers_through_embers_kernel_references() {
    for name in MODELS {
        let cfg = EngineConfig {
            max_num_batched_tokens: 24,
            block_size: 4,
            ..EngineConfig::default()
        };
        check_against_reference_with(name, cfg, true, |opts| {
            opts.moe_backend = ember_models::backends::MoeBackend::Fused;
            opts.layer_kernels = ember_models::backends::LayerKernels::Ember;
        });
    }
}

/// The quantized checkpoints dequantized at load (`--packed-weights false`; by default they are
/// held packed, as the tests above run them), batched and chunked: transformers' outputs still.
#[test]
fn the_quantized_checkpoints_match_transformers_dequantized_at_load() {
    for name in QUANTIZED {
        let cfg = EngineConfig {
            max_num_batched_tokens: 24,
            block_size: 4,
            ..EngineConfig::default()
        };
        check_against_reference_with(name, cfg, true, |opts| opts.packed_weights = Some(false));
    }
}

#[test]
fn preemption_under_a_tiny_cache_gives_the_same_tokens() {
    // 60 blocks of 4 tokens (240) cannot hold every prompt at once: requests get preempted and recomputed.
    let cfg = EngineConfig {
        num_blocks: Some(60),
        block_size: 4,
        max_num_batched_tokens: 64,
        ..EngineConfig::default()
    };
    check_against_reference("qwen3-moe-tiny", cfg, true);
}

#[test]
fn batch_invariance_of_logprobs() {
    let name = "qwen3-moe-tiny";
    let reference = reference(name);
    let prompts: Vec<Vec<u32>> = reference["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| ids(&p["token_ids"]))
        .collect();
    let alone_engine = start(name, EngineConfig::default());
    let alone: Vec<Finished> = prompts
        .iter()
        .map(|p| collect(alone_engine.submit(p.clone(), greedy_params(8)).unwrap()))
        .collect();
    let batch_engine = start(
        name,
        EngineConfig {
            block_size: 8,
            ..EngineConfig::default()
        },
    );
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| batch_engine.submit(p.clone(), greedy_params(8)).unwrap())
        .collect();
    for (i, (a, b)) in alone
        .iter()
        .zip(receivers.into_iter().map(collect))
        .enumerate()
    {
        assert_eq!(a.tokens, b.tokens, "prompt {i}");
        let theirs: Vec<f64> = a.logprobs.iter().map(|&x| x as f64).collect();
        assert_close(
            &format!("prompt {i} batched vs alone"),
            &b.logprobs,
            &theirs,
            BATCH_TOL,
        );
    }
}

#[test]
fn max_tokens_zero_scores_the_prompt_only() {
    let name = "qwen3-tiny";
    let reference = reference(name);
    let p = &reference["prompts"][2];
    let engine = start(name, EngineConfig::default());
    let params = SamplingParams {
        prompt_logprobs: Some(1),
        ..SamplingParams::greedy(0)
    };
    let got = collect(engine.submit(ids(&p["token_ids"]), params).unwrap());
    assert!(got.tokens.is_empty());
    assert_eq!(got.finish, FinishReason::Length);
    let theirs = floats(&Value::from(&p["prompt_logprobs"].as_array().unwrap()[1..]));
    let ours: Vec<f32> = got.prompt_logprobs[1..]
        .iter()
        .map(|x| x.unwrap())
        .collect();
    assert_close("scored prompt", &ours, &theirs, LOGPROB_TOL);
}

#[test]
fn prefix_cache_hits_reproduce_the_reference() {
    let name = "qwen3-moe-tiny";
    let reference = reference(name);
    let p = &reference["prompts"][4];
    let prompt = ids(&p["token_ids"]);
    let engine = start(
        name,
        EngineConfig {
            block_size: 8,
            ..EngineConfig::default()
        },
    );
    let params = SamplingParams {
        prompt_logprobs: None,
        ..greedy_params(16)
    };
    let theirs: Vec<f64> = floats(&p["greedy"]["logprobs"]);
    let first = collect(engine.submit(prompt.clone(), params.clone()).unwrap());
    assert_eq!(first.cached_prompt_tokens, 0);
    let second = collect(engine.submit(prompt.clone(), params.clone()).unwrap());
    // Every whole block but the one holding the last prompt token comes from the cache.
    assert_eq!(second.cached_prompt_tokens, (prompt.len() - 1) / 8 * 8);
    for got in [&first, &second] {
        assert_eq!(got.tokens, ids(&p["greedy"]["token_ids"]));
        assert_close("prefix-cached greedy", &got.logprobs, &theirs, LOGPROB_TOL);
    }
    // A different prompt shares no block with the cached one and still matches its reference.
    let other = &reference["prompts"][3];
    let third = collect(engine.submit(ids(&other["token_ids"]), params).unwrap());
    assert_eq!(third.cached_prompt_tokens, 0);
    assert_eq!(third.tokens, ids(&other["greedy"]["token_ids"]));
}

#[test]
fn min_tokens_bans_the_stop_token_until_reached() {
    let name = "qwen3-tiny";
    let reference = reference(name);
    let p = &reference["prompts"][1];
    let greedy = ids(&p["greedy"]["token_ids"]);
    let engine = start(name, EngineConfig::default());
    // Make the reference's third greedy token a stop token: without min_tokens it ends there.
    let stop = greedy[2];
    let params = SamplingParams {
        stop_token_ids: vec![stop],
        ..SamplingParams::greedy(16)
    };
    let got = collect(engine.submit(ids(&p["token_ids"]), params.clone()).unwrap());
    assert_eq!(got.tokens, greedy[..3].to_vec());
    assert_eq!(got.finish, FinishReason::Stop);
    let params = SamplingParams {
        min_tokens: 5,
        ..params
    };
    let got = collect(engine.submit(ids(&p["token_ids"]), params).unwrap());
    assert!(got.tokens.len() >= 5, "{:?}", got.tokens);
    assert!(!got.tokens[..5].contains(&stop), "{:?}", got.tokens);
    assert_eq!(got.tokens[..2], greedy[..2]);
}

/// Steps where every sequence decodes plainly greedily choose their tokens on the model's device
/// (`ModelRunner::forward_sampled`); they must be the host sampler's tokens, and so the
/// reference's, alone (also with logprobs, computed there too), batched with chunked prefills,
/// and mixed with a request that needs its logits rows (prompt logprobs), which sends the steps
/// it shares back to the host sampler.
#[test]
fn device_greedy_sampling_gives_the_host_samplers_tokens() {
    let plain = |steps| SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(steps)
    };
    for name in ["qwen3-tiny", "qwen3-moe-tiny", "deepseek-v3-tiny"] {
        let reference = reference(name);
        let prompts = reference["prompts"].as_array().unwrap();
        let want: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| ids(&p["greedy"]["token_ids"]))
            .collect();
        let cfg = EngineConfig {
            max_num_batched_tokens: 24,
            block_size: 4,
            ..EngineConfig::default()
        };
        let engine = start(name, cfg);
        let submit = |p: &Value, params: SamplingParams| {
            engine.submit(ids(&p["token_ids"]), params).unwrap()
        };
        // Alone, then all at once: only device-sampled steps.
        for (p, want) in prompts.iter().zip(&want) {
            let got = collect(submit(p, plain(want.len())));
            assert_eq!(&got.tokens, want, "{name}: alone");
            assert!(got.logprobs.is_empty());
        }
        // Logprobs come with the device's tokens, computed where the logits are: the reference's
        // greedy logprobs, and still every step sampled there.
        for (p, want) in prompts.iter().zip(&want) {
            let params = SamplingParams {
                logprobs: Some(3),
                ..plain(want.len())
            };
            let got = collect(submit(p, params));
            assert_eq!(&got.tokens, want, "{name}: with logprobs");
            assert_close(
                &format!("{name}: device logprobs"),
                &got.logprobs,
                &floats(&p["greedy"]["logprobs"]),
                LOGPROB_TOL,
            );
        }
        let before = engine.stats();
        // The last step's count may not be published yet when its request has finished.
        assert!(
            before.device_sampled_steps > 0 && before.device_sampled_steps + 1 >= before.steps,
            "{name}: {before:?}"
        );
        let receivers: Vec<_> = prompts
            .iter()
            .zip(&want)
            .map(|(p, w)| submit(p, plain(w.len())))
            .collect();
        for (rx, want) in receivers.into_iter().zip(&want) {
            assert_eq!(&collect(rx).tokens, want, "{name}: batched");
        }
        // One request with logprobs among plain ones: the shared steps sample on the host.
        let receivers: Vec<_> = prompts
            .iter()
            .zip(&want)
            .enumerate()
            .map(|(i, (p, w))| {
                let params = if i == 0 {
                    greedy_params(w.len())
                } else {
                    plain(w.len())
                };
                submit(p, params)
            })
            .collect();
        for (rx, want) in receivers.into_iter().zip(&want) {
            assert_eq!(&collect(rx).tokens, want, "{name}: mixed");
        }
        let after = engine.stats();
        assert!(after.device_sampled_steps > before.device_sampled_steps);
        assert!(
            after.device_sampled_steps < after.steps,
            "{name}: the logprobs request's steps ran on the host"
        );
    }
}

/// Device sampling (`EngineConfig::device_sampling`, on by default on a GPU; forced here on the
/// CPU, where the draw runs ember-kernels' reference of the CUDA kernel): steps whose samplers
/// need only temperature, top-k, top-p and min-p draw there and copy back token ids.
/// - top-k 1 and min-p 1 keep only the best token: the transformers greedy tokens, alone and
///   batched, every step drawn where the logits are;
/// - a seed repeats its tokens, alone or batched next to other requests (each draws from its
///   own stream, one uniform a step, as the host sampler does);
/// - a request with a penalty in the batch sends the shared steps to the host sampler.
#[test]
fn device_draws_keep_greedy_filters_greedy_and_seeds_reproducible() {
    let name = "qwen3-moe-tiny";
    let reference = reference(name);
    let prompts = reference["prompts"].as_array().unwrap();
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| ids(&p["greedy"]["token_ids"]))
        .collect();
    let cfg = EngineConfig {
        max_num_batched_tokens: 24,
        block_size: 4,
        device_sampling: Some(true),
        ..EngineConfig::default()
    };
    let engine = start(name, cfg);
    let sampled = |steps: usize, top_k: usize, min_p: f32, seed: Option<u64>| SamplingParams {
        temperature: 1.3,
        top_k,
        min_p,
        seed,
        ignore_eos: true,
        ..SamplingParams::greedy(steps)
    };
    let submit =
        |p: &Value, params: SamplingParams| engine.submit(ids(&p["token_ids"]), params).unwrap();
    for (top_k, min_p) in [(1, 0.0), (0, 1.0)] {
        for (p, want) in prompts.iter().zip(&want) {
            let got = collect(submit(p, sampled(want.len(), top_k, min_p, None)));
            assert_eq!(&got.tokens, want, "top_k {top_k} min_p {min_p}: alone");
        }
        let receivers: Vec<_> = prompts
            .iter()
            .zip(&want)
            .map(|(p, w)| submit(p, sampled(w.len(), top_k, min_p, None)))
            .collect();
        for (rx, want) in receivers.into_iter().zip(&want) {
            assert_eq!(
                &collect(rx).tokens,
                want,
                "top_k {top_k} min_p {min_p}: batched"
            );
        }
    }
    let stats = engine.stats();
    assert!(
        stats.device_sampled_steps > 0 && stats.device_sampled_steps + 1 >= stats.steps,
        "{stats:?}"
    );
    // Seeds: alone, then batched next to unseeded requests.
    let seeded = |p: &Value, seed| submit(p, sampled(12, 40, 0.0, Some(seed)));
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| collect(seeded(p, 7 + i as u64)).tokens)
        .collect();
    assert!(
        alone
            .iter()
            .zip(&want)
            .any(|(a, w)| a[..] != w[..a.len().min(w.len())]),
        "temperature 1.3 drew the greedy tokens everywhere"
    );
    let receivers: Vec<_> = prompts
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            [
                seeded(p, 7 + i as u64),
                submit(p, sampled(12, 40, 0.0, None)),
            ]
        })
        .collect();
    let batched: Vec<Vec<u32>> = receivers.into_iter().map(|rx| collect(rx).tokens).collect();
    for (i, a) in alone.iter().enumerate() {
        assert_eq!(a, &batched[2 * i], "prompt {i}: seeded alone vs batched");
    }
    // A penalty needs the host sampler: that request's steps copy the logits back.
    let before = engine.stats();
    let penalised = SamplingParams {
        repetition_penalty: 1.3,
        ..sampled(6, 0, 0.0, Some(1))
    };
    collect(submit(&prompts[0], penalised));
    let after = engine.stats();
    assert!(after.steps > before.steps);
    assert_eq!(
        after.device_sampled_steps, before.device_sampled_steps,
        "{after:?}"
    );
}
