//! ember's model families and the loading of Hugging Face checkpoints.
//!
//! A model runs one forward over a [`batch::ForwardBatch`] (the flattened new tokens of many
//! sequences) against a paged [`kv_cache::KvCachePool`], and returns logits (or, for an
//! embedding model, final hidden states) for the rows the batch asks for.

pub mod attention;
pub mod batch;
pub mod checkpoint;
#[cfg(feature = "cuda")]
pub mod cuda_attention;
pub mod cuda_graph;
pub mod decoder;
pub mod deepseek_v3;
pub mod device;
pub mod flat_collectives;
pub mod fp8_e5m2;
pub mod fused_moe;
pub mod greedy;
pub mod kv_cache;
pub mod layer_ops;
pub mod linear;
pub mod loader;
pub mod lora;
pub mod memory_plan;
pub mod mla;
pub mod mla_kernel;
pub mod mlp;
pub mod moe;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod norm;
pub mod paged_attention;
pub mod parallel;
pub mod quantized;
pub mod qwen3;
pub mod rope;
pub mod routing;
pub mod sharded;
pub mod task;
pub mod weights;

use candle_core::Tensor;
use ember_core::{ModelConfig, Result};

pub use batch::{ForwardBatch, SequenceInput};
pub use kv_cache::KvCachePool;
pub use loader::{load_model, LoadOptions, LoadedModel};
pub use lora::{LoraAdapter, LoraTargets};
pub use weights::LoadFormat;

/// Result of candle tensor code inside layers; converted to [`ember_core::EmberError`] at the model edge.
pub type TensorResult<T = Tensor> = candle_core::Result<T>;

/// The elements of a custom op's contiguous input, from its layout's start; `what` names the op
/// that refuses a strided one.
pub(crate) fn contiguous_range(
    layout: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<std::ops::Range<usize>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(start..end),
        None => candle_core::bail!("{what} needs a contiguous tensor"),
    }
}

/// A decoder-only language model.
pub trait CausalLm: Send + Sync {
    /// The validated config the model was built from.
    fn config(&self) -> &ModelConfig;

    /// The projections LoRA adapters may target, by module path.
    fn lora_targets(&self) -> &lora::LoraTargets;

    /// Ranks that run different sequences (`--data-parallel-size`): each step must then come
    /// split by rank ([`batch::ForwardBatch::split_data_parallel`]), and rank r's sequences
    /// keep their KV in cache r. 1 for every other model.
    fn data_parallel_size(&self) -> usize {
        1
    }

    /// Widths of the cached K and V rows of each KV cache the model runs against: one for an
    /// unsharded model, one per rank for a sharded one (each rank caches its own heads).
    fn kv_cache_shards(&self) -> Vec<(usize, usize)> {
        vec![self.config().kv_cache_row_widths()]
    }

    /// Runs the batch and returns f32 rows for `batch.logits_rows`, writing the new tokens' keys
    /// and values into `caches` (one per entry of [`CausalLm::kv_cache_shards`], same blocks in
    /// each): logits `[rows, vocab]`, or for a model loaded for the embed task the final-normed
    /// hidden states `[rows, hidden]`.
    fn forward(&self, batch: &ForwardBatch, caches: &[KvCachePool]) -> Result<Tensor>;

    /// Why the model can no longer run (a rank of a sharded model failed), if it cannot.
    fn failure(&self) -> Option<String> {
        None
    }
}
