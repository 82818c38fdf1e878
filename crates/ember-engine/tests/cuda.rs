//! The engine on a GPU (`--features cuda`): every tiny checkpoint through the real engine on
//! CUDA against transformers' fp32 reference, and the KV cache sized from the GPU's memory.
//! Each test prints SKIPPED with the reason and passes when the build has no CUDA or no GPU
//! opens; run them on a GPU machine with `cargo test -p ember-engine --features cuda --test cuda`.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device};
use common::*;
use ember_engine::EngineConfig;
use ember_models::backends::AttentionBackend;
use ember_models::backends::LayerKernels;
use ember_models::backends::MoeBackend;
use ember_models::device::calls::{Kernel, KernelCalls};
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
    chunked_engine_with_graphs(name, device, dtype, backends, &[]).0
}

/// [`chunked_engine`] whose decode steps run as CUDA graphs of `graph_sizes` where they can.
fn chunked_engine_with_graphs(
    name: &str,
    device: &Device,
    dtype: DType,
    backends: Backends,
    graph_sizes: &[usize],
) -> (ember_engine::EngineHandle, Arc<KernelCalls>) {
    let cfg = EngineConfig {
        max_num_batched_tokens: 24,
        block_size: 4,
        cuda_graph_sizes: graph_sizes.to_vec(),
        ..EngineConfig::default()
    };
    start_counting(name, cfg, |opts| {
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
    let (reference, results, _) = run_batched_counted(name, device, dtype, backends);
    (reference, results)
}

/// [`run_batched_with`], and the calls the model's kernel paths served.
fn run_batched_counted(
    name: &str,
    device: &Device,
    dtype: DType,
    backends: Backends,
) -> (Value, Vec<Finished>, Arc<KernelCalls>) {
    let (reference, results, _, calls) =
        run_batched_with_graphs(name, device, dtype, backends, &[]);
    (reference, results, calls)
}

fn run_batched_with_graphs(
    name: &str,
    device: &Device,
    dtype: DType,
    backends: Backends,
    graph_sizes: &[usize],
) -> (Value, Vec<Finished>, u64, Arc<KernelCalls>) {
    let reference = reference(name);
    let (engine, calls) = chunked_engine_with_graphs(name, device, dtype, backends, graph_sizes);
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
    // Published after each step: all but perhaps the last are counted.
    (reference, results, engine.stats().graph_steps, calls)
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

/// Plain greedy requests take the device-greedy path: the argmax kernel on the GPU (and, for
/// every other request here, the logprobs kernel), only token ids and logprobs copied back.
/// Their tokens must be transformers' greedy tokens and their logprobs its greedy logprobs
/// (f32 tolerance), batched and chunked, and every step must have sampled on the device.
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
            .enumerate()
            .map(|(i, p)| {
                let params = ember_core::SamplingParams {
                    ignore_eos: true,
                    logprobs: (i % 2 == 1).then_some(4),
                    ..ember_core::SamplingParams::greedy(greedy_steps(p))
                };
                engine.submit(ids(&p["token_ids"]), params).unwrap()
            })
            .collect();
        for (i, (rx, p)) in receivers.into_iter().zip(prompts).enumerate() {
            let got = collect(rx);
            assert_eq!(got.tokens, ids(&p["greedy"]["token_ids"]), "{name}");
            if i % 2 == 1 {
                assert_close(
                    &format!("{name}: logprobs on the GPU"),
                    &got.logprobs,
                    &floats(&p["greedy"]["logprobs"]),
                    LOGPROB_TOL,
                );
            }
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
        let fused = Backends {
            moe: MoeBackend::Fused,
            ..Backends::default()
        };
        let (reference, results, calls) = run_batched_counted(name, &device, DType::F32, fused);
        assert!(
            calls.get(Kernel::FusedMoe) > 0,
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
        let (reference, results, calls) = run_batched_counted(name, &device, DType::F32, EMBER);
        assert!(
            calls.get(Kernel::AddRmsNorm) > 0,
            "{name}: the fused add-RMSNorm never ran"
        );
        let mla = name.starts_with("deepseek") || name.starts_with("kimi");
        assert!(
            !mla || calls.get(Kernel::MlaDecode) > 0,
            "{name}: the MLA decode kernel never ran"
        );
        assert_matches_reference(name, reference["prompts"].as_array().unwrap(), &results);
        eprintln!(
            "{name}: all of ember's kernels on CUDA in f32 match transformers (tol {LOGPROB_TOL})"
        );
        let (reference, results, calls) = run_batched_counted(name, &device, DType::BF16, EMBER);
        assert_tracks_in_bf16(
            name,
            &reference,
            &results,
            "all of ember's kernels in bf16 on CUDA",
        );
        // bf16 MLA prefill runs on the tensor-core prefill attention kernel.
        assert!(
            !mla || calls.get(Kernel::MlaPrefill) > 0,
            "{name}: the MLA prefill kernel never ran in bf16"
        );
    }
}

/// Decode steps replayed from CUDA graphs (sizes 1, 2, 4: the prompts' decodes run 1 to 4 at a
/// time, padded up to a size) over all of ember's kernels, for every checkpoint: in f32 the
/// eager path's tokens, their logprobs within the batch tolerance, and transformers' reference;
/// in bf16 the eager logprobs within the bf16 tolerance for as long as the tokens agree. Graphs
/// must have served steps (the engine checked each size's first replay against the eager step,
/// and would have turned them off).
#[test]
fn decode_graphs_match_the_eager_steps() {
    let Some(device) = gpu("decode_graphs_match_the_eager_steps") else {
        return;
    };
    for name in MODELS {
        for dtype in [DType::F32, DType::BF16] {
            let (reference, eager) = run_batched_with(name, &device, dtype, EMBER);
            let (_, graphs, replays, _) =
                run_batched_with_graphs(name, &device, dtype, EMBER, &[1, 2, 4]);
            assert!(
                replays > 0,
                "{name} {dtype:?}: no decode step ran as a graph"
            );
            let tol = if dtype == DType::F32 {
                BATCH_TOL
            } else {
                BF16_MAX_TOL
            };
            for (i, (e, g)) in eager.iter().zip(&graphs).enumerate() {
                if dtype == DType::F32 {
                    assert_eq!(e.tokens, g.tokens, "{name} prompt {i}: tokens");
                }
                let same = e.tokens.iter().zip(&g.tokens).take_while(|(a, b)| a == b);
                for (j, _) in same.enumerate() {
                    let d = (e.logprobs[j] - g.logprobs[j]).abs() as f64;
                    assert!(
                        d <= tol,
                        "{name} {dtype:?} prompt {i} token {j}: graph logprob off by {d} (tol {tol})"
                    );
                }
            }
            if dtype == DType::F32 {
                assert_matches_reference(name, reference["prompts"].as_array().unwrap(), &graphs);
            }
            eprintln!(
                "{name} {dtype:?}: {replays} decode steps from CUDA graphs match the eager ones"
            );
        }
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

/// GPUs this process can open, counting from cuda:0.
fn gpu_count() -> usize {
    (0..16)
        .take_while(|&i| ember_models::device::open_cuda(i).is_ok())
        .count()
}

/// Random f32 rows, the same for the same seed.
#[cfg(feature = "cuda")]
fn random_tensor(shape: &[usize], seed: u64, device: &Device) -> candle_core::Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    candle_core::Tensor::from_vec(v, shape, device).unwrap()
}

/// Every collective of rank `comm` on its inputs, seeded by its rank: sums, gathers (one of
/// them uneven), scatters, an all-to-all of ragged pieces (some empty) and a broadcast; the
/// results on the host, in order.
#[cfg(feature = "cuda")]
fn all_collectives(
    comm: &dyn ember_models::parallel::Communicator,
    device: &Device,
) -> Vec<Vec<f32>> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let seed = 100 * rank as u64;
    let host = |t: candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let x = random_tensor(&[3, 4 * world], seed, device);
    let mut out = vec![
        host(comm.all_reduce_sum(&x).unwrap()),
        host(comm.all_gather(&x, 0).unwrap()),
        host(comm.all_gather(&x, 1).unwrap()),
        host(comm.all_gather_equal(&x, 1).unwrap()),
        host(comm.reduce_scatter_sum(&x, 1).unwrap()),
        // bf16 through the same sum.
        host(
            comm.all_reduce_sum(&x.to_dtype(DType::BF16).unwrap())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
        ),
    ];
    // Uneven along dim 0: rank r sends r + 1 rows.
    let uneven = random_tensor(&[rank + 1, 5], seed + 1, device);
    out.push(host(comm.all_gather(&uneven, 0).unwrap()));
    // Rank r sends (r + d) % 3 rows of 2 to rank d: some pieces are empty.
    let send = (0..world)
        .map(|d| random_tensor(&[(rank + d) % 3, 2], seed + 2 + d as u64, device))
        .collect();
    for piece in comm.all_to_all(send).unwrap() {
        out.push(host(piece));
    }
    let root = world - 1;
    let mine = random_tensor(&[2, 3], seed + 50, device);
    let b = comm
        .broadcast((rank == root).then_some(&mine), root)
        .unwrap();
    assert_eq!(b.dims(), [2, 3]);
    out.push(host(b));
    out
}

/// Runs [`all_collectives`] on every rank of a group, each on its own thread.
#[cfg(feature = "cuda")]
fn on_ranks(
    comms: Vec<std::sync::Arc<dyn ember_models::parallel::Communicator>>,
    devices: &[Device],
) -> Vec<Vec<Vec<f32>>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .zip(devices)
            .map(|(comm, device)| s.spawn(move || all_collectives(comm.as_ref(), device)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// NCCL's collectives against the threads backend on the CPU, on the same random inputs: one
/// rank on one GPU (every call, header exchange and reshaping, with NCCL doing the copy), and
/// every GPU up to 4 when there are several. Sums may add in another order: within 1e-5 (f32)
/// and 1e-2 (bf16); everything else exact.
#[test]
fn nccl_collectives_match_the_threads_backend() {
    #[cfg(feature = "cuda")]
    {
        use ember_models::parallel::{Communicator, ThreadGroup};
        use std::sync::Arc;
        let test = "nccl_collectives_match_the_threads_backend";
        let Some(_) = gpu(test) else { return };
        if let Err(e) = ember_models::parallel::nccl::version() {
            eprintln!("SKIPPED {test}: {e}");
            return;
        }
        let count = gpu_count();
        let mut worlds = vec![1];
        if count >= 2 {
            worlds.push(count.min(4));
        } else {
            eprintln!("{test}: one GPU, so one rank only (NCCL takes a GPU per rank)");
        }
        for world in worlds {
            let gpus: Vec<Device> = (0..world)
                .map(|i| ember_models::device::open_cuda(i).unwrap())
                .collect();
            let nccl = ember_models::parallel::nccl::ranks(&gpus)
                .unwrap()
                .into_iter()
                .map(|r| Arc::new(r) as Arc<dyn Communicator>)
                .collect();
            let got = on_ranks(nccl, &gpus);
            let cpus = vec![Device::Cpu; world];
            let threads = ThreadGroup::ranks(world)
                .into_iter()
                .map(|r| Arc::new(r) as Arc<dyn Communicator>)
                .collect();
            let want = on_ranks(threads, &cpus);
            for (rank, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.len(), w.len(), "world {world} rank {rank}: results");
                for (i, (a, b)) in g.iter().zip(w).enumerate() {
                    assert_eq!(
                        a.len(),
                        b.len(),
                        "world {world} rank {rank} result {i}: length"
                    );
                    let tol = if i == 5 { 1e-2 } else { 1e-5 };
                    let worst = a
                        .iter()
                        .zip(b)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        worst <= tol,
                        "world {world} rank {rank} result {i}: off by {worst}"
                    );
                }
            }
            eprintln!("{test}: {world} NCCL rank(s) match the threads backend");
        }
    }
}

/// A model sharded over GPUs, one rank each (NCCL where libnccl opens): tensor parallel,
/// expert parallel and data parallel over 2 GPUs match transformers as one rank does (f32).
/// Needs 2 GPUs.
#[test]
fn tensor_and_expert_parallel_over_gpus_match_transformers() {
    let test = "tensor_and_expert_parallel_over_gpus_match_transformers";
    let Some(_) = gpu(test) else { return };
    let count = gpu_count();
    if count < 2 {
        eprintln!("SKIPPED {test}: {count} GPU(s); a rank needs a GPU of its own");
        return;
    }
    for name in [
        "qwen3-tiny",
        "qwen3-moe-tiny",
        "deepseek-v3-tiny",
        "kimi-k2-tiny",
    ] {
        // (tensor parallel, data parallel, expert parallel) sizes.
        let layouts: &[(usize, usize, bool)] = if name == "qwen3-tiny" {
            &[(2, 1, false), (1, 2, false)]
        } else {
            &[(2, 1, false), (2, 1, true), (1, 2, true)]
        };
        for &(tp, dp, expert_parallel) in layouts {
            let reference = reference(name);
            let cfg = EngineConfig {
                max_num_batched_tokens: 24,
                block_size: 4,
                ..EngineConfig::default()
            };
            let engine = start_with(name, cfg, |opts| {
                opts.dtype = Some(DType::F32);
                opts.device = ember_models::device::open_cuda(0).unwrap();
                opts.tensor_parallel_size = tp;
                opts.data_parallel_size = dp;
                opts.enable_expert_parallel = expert_parallel;
            });
            let prompts = reference["prompts"].as_array().unwrap();
            let receivers: Vec<_> = prompts
                .iter()
                .map(|p| {
                    engine
                        .submit(ids(&p["token_ids"]), greedy_params(greedy_steps(p)))
                        .unwrap()
                })
                .collect();
            let results: Vec<_> = receivers.into_iter().map(collect).collect();
            assert_matches_reference(name, prompts, &results);
            eprintln!(
                "{name}: 2 GPUs (TP {tp}, DP {dp}, expert parallel {expert_parallel}) match transformers"
            );
        }
    }
}
