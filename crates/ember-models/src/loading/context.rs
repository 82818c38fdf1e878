//! What a model's layers are loaded for, beside their tensors: the implementations they run,
//! how the checkpoint stores its projections, the load-time options, the rank they shard for,
//! and the model-wide counters they report into. The loader fills one per model (one per rank
//! when sharded) and hands it to every layer's `load` next to the [`Weights`] they read.
//!
//! [`Weights`]: crate::loading::weights::Weights

use std::sync::Arc;

use ember_core::WeightQuantization;

use crate::backends::Backends;
use crate::device::calls::KernelCalls;
use crate::parallel::eplb::ExpertLoad;
use crate::parallel::RankContext;

/// Everything a layer's `load` needs to know that is not a tensor; fixed for the model's life.
#[derive(Clone, Default)]
pub struct LoadContext {
    /// The implementations the layers run.
    pub backends: Backends,
    /// How the checkpoint stores its quantized linear weights (from config.json; dummy weights
    /// are stored so too); `None` for unquantized ones.
    pub quantization: Option<WeightQuantization>,
    /// `--quantization fp8` on an unquantized checkpoint: projections are quantized to e4m3 per
    /// output channel at load.
    pub online_fp8: bool,
    /// `--calculate-kv-scales`: attention layers compute their fp8 cache scales from the first
    /// keys and values they write instead of taking the checkpoint's (or 1.0).
    pub calculate_kv_scales: bool,
    /// 4-bit and block-FP8 checkpoint weights are held as stored for the W4A16 / W8A16 kernels
    /// ([`crate::linear::quantized::int4`], [`crate::linear::quantized::fp8_block`]) instead of
    /// dequantized.
    pub packed_weights: bool,
    /// The rank the model is loaded for, when sharded (`--tensor-parallel-size` or
    /// `--data-parallel-size` > 1).
    pub rank: Option<RankContext>,
    /// Per-expert token counters of the MoE layers, shared by every rank.
    pub expert_load: Arc<ExpertLoad>,
    /// Calls each of ember's kernel paths served, shared by every layer of the model.
    pub kernel_calls: Arc<KernelCalls>,
}

impl LoadContext {
    /// The tensor-parallel rank being loaded, `None` for an unsharded model and for a
    /// data-parallel rank (whose layers are whole).
    pub fn rank(&self) -> Option<&RankContext> {
        self.rank.as_ref().filter(|r| !r.data_parallel)
    }

    /// The rank the routed experts are loaded for: [`LoadContext::rank`], or a data-parallel
    /// rank (whose experts are partitioned under expert parallelism, and whole otherwise).
    pub fn expert_rank(&self) -> Option<&RankContext> {
        self.rank.as_ref()
    }

    /// The same context for one rank of a sharded model.
    pub fn for_rank(&self, rank: RankContext) -> Self {
        Self {
            rank: Some(rank),
            ..self.clone()
        }
    }
}
