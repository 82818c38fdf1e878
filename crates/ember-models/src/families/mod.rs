//! The model families: the decoder every family shares, and each family's choice of layers.

pub mod decoder;
pub mod deepseek_v3;
pub mod qwen3;

use candle_core::Tensor;
use ember_core::{ModelConfig, Result};

use crate::cache::kv_cache::KvCachePool;
use crate::lora::LoraTargets;
use crate::step::batch::ForwardBatch;

/// A decoder-only language model.
pub trait CausalLm: Send + Sync {
    /// The validated config the model was built from.
    fn config(&self) -> &ModelConfig;

    /// The projections LoRA adapters may target, by module path.
    fn lora_targets(&self) -> &LoraTargets;

    /// Ranks that run different sequences (`--data-parallel-size`): each step must then come
    /// split by rank ([`ForwardBatch::split_data_parallel`]), and rank r's sequences
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
