//! Where a model runs: the CPU always, a CUDA GPU when ember is built with `--features cuda`;
//! and how much of a GPU's memory the KV cache may take (`--gpu-memory-utilization`).

pub mod calls;
pub mod kernels;
pub mod same_dtype_op;

use candle_core::{DType, Device};
use ember_core::{EmberError, ModelConfig, Result};

/// Opens GPU `ordinal`. Fails with a one-line reason when this build has no CUDA backend, or when
/// the driver, the runtime libraries or the GPU are missing.
pub fn open_cuda(ordinal: usize) -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        // cudarc panics instead of erring on some missing-library paths; a panic is a reason too.
        match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
            Ok(Ok(device)) => Ok(device),
            Ok(Err(e)) => Err(EmberError::Config(format!(
                "--device cuda:{ordinal}: cannot open the GPU: {} (is the NVIDIA driver installed, \
                 and the CUDA 13 runtime libraries on LD_LIBRARY_PATH?)",
                first_line(&e.to_string())
            ))),
            Err(panic) => Err(EmberError::Config(format!(
                "--device cuda:{ordinal}: cannot open the GPU: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("the CUDA driver panicked")
            ))),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(EmberError::Config(format!(
            "--device cuda:{ordinal}: this build of ember serves on the CPU only (built without \
             --features cuda); use --device cpu, or build with \
             `cargo build --release -p ember-cli --features cuda` (README: CUDA)"
        )))
    }
}

/// `--device auto`: GPU 0 when this build has CUDA and a GPU opens, else the CPU (the reason is
/// logged).
pub fn auto_device() -> Device {
    if !cfg!(feature = "cuda") {
        return Device::Cpu;
    }
    match open_cuda(0) {
        Ok(device) => device,
        Err(e) => {
            tracing::info!("--device auto: serving on the CPU ({e})");
            Device::Cpu
        }
    }
}

/// The device of each of `world` ranks of a sharded model: all on the CPU for a CPU model; on
/// GPUs, one each, counting up from `device`'s (`cuda:N` puts rank r on `cuda:N+r`). Errs,
/// naming the rank, when there are fewer GPUs than ranks.
pub fn rank_devices(device: &Device, world: usize) -> Result<Vec<Device>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(gpu) if world > 1 => {
            let first = gpu.cuda_stream().context().ordinal();
            (0..world)
                .map(|r| match r {
                    0 => Ok(device.clone()),
                    _ => open_cuda(first + r).map_err(|e| {
                        EmberError::Config(format!(
                            "{world} ranks put rank {r} on cuda:{}, which cannot be used ({e}); \
                             each rank needs a GPU of its own",
                            first + r
                        ))
                    }),
                })
                .collect()
        }
        _ => Ok(vec![device.clone(); world]),
    }
}

/// Whether this build can drive GPUs at all.
pub fn cuda_built() -> bool {
    cfg!(feature = "cuda")
}

/// Free and total bytes of the GPU `device` lives on; `None` for the CPU.
pub fn gpu_memory(device: &Device) -> Result<Option<(u64, u64)>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(gpu) => {
            let (free, total) =
                gpu.cuda_stream().context().mem_get_info().map_err(|e| {
                    EmberError::Config(format!("cannot read the GPU's memory: {e}"))
                })?;
            Ok(Some((free as u64, total as u64)))
        }
        _ => Ok(None),
    }
}

/// The error without the backtrace candle appends on further lines.
#[cfg(feature = "cuda")]
fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text).trim()
}

/// Peak bytes one engine step may allocate beside weights and KV cache, estimated from the
/// model's shape: the step's hidden rows and their MLP (or chosen experts') activations, the
/// attention scores of the tensor path for a chunk attending to itself, and f32 logits of every
/// sequence, plus 1 GiB for cuBLAS workspaces, the CUDA context and fragmentation. An estimate,
/// not a profile: `--kv-cache-memory` sets the cache size outright.
pub fn activation_reserve_bytes(
    cfg: &ModelConfig,
    dtype: DType,
    max_num_batched_tokens: usize,
    max_num_seqs: usize,
) -> u64 {
    let tokens = max_num_batched_tokens as u64;
    let elem = dtype.size_in_bytes() as u64;
    let (experts_per_tok, expert_width) = match (&cfg.moe, &cfg.deepseek) {
        (Some(m), _) => (m.num_experts_per_tok, m.moe_intermediate_size),
        (None, Some(d)) => (
            d.num_experts_per_tok + d.n_shared_experts,
            d.moe_intermediate_size,
        ),
        (None, None) => (1, cfg.intermediate_size),
    };
    let mlp_width = (experts_per_tok * expert_width).max(cfg.intermediate_size) as u64;
    // Residual, normed input, attention output and q/k/v rows: about eight hidden widths; the
    // MLP's gate, up and product: three of its width.
    let rows = tokens * (8 * cfg.hidden_size as u64 + 3 * mlp_width) * elem;
    // Scores and probabilities of one chunk over itself, in f32, all heads.
    let scores = 2 * cfg.num_attention_heads as u64 * tokens * tokens * 4;
    let logits = 2 * max_num_seqs.min(max_num_batched_tokens) as u64 * cfg.vocab_size as u64 * 4;
    (1 << 30) + rows + scores + logits
}

/// GPU memory decode graphs of up to `largest` rows keep for themselves: a decode step's
/// activations and logits at that size. Graphs replayed on one stream share their memory, so the
/// largest bounds them all.
pub fn decode_graph_reserve_bytes(cfg: &ModelConfig, dtype: DType, largest: usize) -> u64 {
    activation_reserve_bytes(cfg, dtype, largest, largest) - (1 << 30)
}

/// Bytes the KV cache gets under `--gpu-memory-utilization`: the share `utilization` of the
/// GPU's `total` memory, less what is already in use (`total - free`: weights, the context,
/// other processes) and the step's `reserve`. Errs, naming the numbers, when nothing is left.
pub fn kv_cache_budget(free: u64, total: u64, utilization: f64, reserve: u64) -> Result<u64> {
    if !(utilization > 0.0 && utilization <= 1.0) {
        return Err(EmberError::Config(format!(
            "--gpu-memory-utilization {utilization} must be in (0, 1]"
        )));
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let allowed = (total as f64 * utilization) as u64;
    let used = total.saturating_sub(free);
    match allowed.checked_sub(used + reserve) {
        Some(budget) if budget > 0 => Ok(budget),
        _ => Err(EmberError::Config(format!(
            "no GPU memory is left for the KV cache: --gpu-memory-utilization {utilization} allows \
             {:.2} GiB of {:.2} GiB, {:.2} GiB is in use (weights, CUDA context, other processes) \
             and a step needs about {:.2} GiB; raise --gpu-memory-utilization, lower \
             --max-num-batched-tokens or --max-num-seqs, or set --kv-cache-memory",
            gib(allowed),
            gib(total),
            gib(used),
            gib(reserve)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_budget_is_the_allowed_share_less_what_is_used_and_the_reserve() {
        // 80 GiB card, 30 GiB in use after loading, 0.9 allowed, 2 GiB for the step.
        let budget = kv_cache_budget(50 * GIB, 80 * GIB, 0.9, 2 * GIB).unwrap();
        assert_eq!(budget, (80.0 * 0.9 * GIB as f64) as u64 - 32 * GIB);
        let err = kv_cache_budget(10 * GIB, 80 * GIB, 0.9, 2 * GIB)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("70.00 GiB is in use") && err.contains("--kv-cache-memory"),
            "{err}"
        );
        for bad in [0.0, 1.5, f64::NAN] {
            let err = kv_cache_budget(GIB, GIB, bad, 0).unwrap_err().to_string();
            assert!(err.contains("must be in (0, 1]"), "{err}");
        }
    }

    #[test]
    fn the_reserve_grows_with_the_step_and_counts_chosen_experts() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let moe = crate::loader::read_config(&dir.join("qwen3-moe-tiny"), None).unwrap();
        let small = activation_reserve_bytes(&moe, DType::BF16, 256, 16);
        let big = activation_reserve_bytes(&moe, DType::BF16, 2048, 256);
        assert!(small > GIB && big > small);
        let m = moe.moe.as_ref().unwrap();
        let width = (m.num_experts_per_tok * m.moe_intermediate_size).max(moe.intermediate_size);
        let rows = 256 * (8 * moe.hidden_size + 3 * width) as u64 * 2;
        let scores = 2 * moe.num_attention_heads as u64 * 256 * 256 * 4;
        let logits = 2 * 16 * moe.vocab_size as u64 * 4;
        assert_eq!(small, GIB + rows + scores + logits);
    }

    #[test]
    fn without_a_gpu_there_is_no_gpu_memory_and_cuda_is_a_clear_error() {
        assert_eq!(gpu_memory(&Device::Cpu).unwrap(), None);
        if !cuda_built() {
            let err = open_cuda(1).unwrap_err().to_string();
            assert!(
                err.contains("cuda:1") && err.contains("CPU only") && err.contains("--device cpu"),
                "{err}"
            );
            assert!(auto_device().is_cpu());
            return;
        }
        // A CUDA build: auto takes GPU 0 when it opens, else the CPU; cuda names why it cannot.
        match open_cuda(0) {
            Ok(gpu) => {
                assert!(gpu.is_cuda() && auto_device().is_cuda());
                let (free, total) = gpu_memory(&gpu).unwrap().unwrap();
                assert!(free > 0 && free <= total);
            }
            Err(e) => {
                let err = e.to_string();
                assert!(
                    err.contains("cannot open the GPU") && !err.contains('\n'),
                    "{err}"
                );
                assert!(auto_device().is_cpu());
            }
        }
    }
}
