//! Mixture-of-experts blocks: Qwen3-MoE's sparse block and DeepSeek's (routed plus shared
//! experts), the router, and the routed experts, run one by one or fused.

pub mod deepseek;
pub mod experts;
pub mod fused;
pub mod router;

use std::sync::Arc;

use candle_core::{DType, Tensor};
use ember_core::{EmberError, MoeConfig, Result};
use ember_kernels::moe_routing::{RoutingConfig, TopkMethod as KernelTopk};

use crate::linear::{load_linear, LinearLayer};
use crate::loading::context::LoadContext;
use crate::loading::weights::Weights;
use crate::lora::{LoraRows, LoraTargets};
use crate::moe::experts::{load_experts, Experts};
use crate::moe::router::route_softmax_topk;
use crate::parallel::RankContext;
use crate::step::mode::StepMode;
use crate::TensorResult;

/// `mlp` of a sparse Qwen3-MoE layer.
pub struct SparseMoe {
    gate: Arc<dyn LinearLayer>,
    experts: Experts,
    top_k: usize,
    norm_topk_prob: bool,
    /// Zeros `[experts]` f32 on the device (the routing kernel's unused bias) when the experts
    /// are stacked for the fused MoE.
    fused_bias: Option<Tensor>,
}

impl SparseMoe {
    /// Loads the router `gate` and the experts (see [`load_experts`]).
    pub fn load(
        weights: &Weights,
        ctx: &LoadContext,
        hidden: usize,
        moe: &MoeConfig,
    ) -> Result<Self> {
        let (e, i) = (moe.num_experts, moe.moe_intermediate_size);
        let gate = load_linear(&weights.pp("gate"), ctx, hidden, e, false)?;
        let experts = load_experts(&weights.pp("experts"), ctx, hidden, e, i)?;
        let fused_bias = experts
            .is_stacked()
            .then(|| Tensor::zeros(e, DType::F32, weights.device()))
            .transpose()
            .map_err(|err| EmberError::Tensor(err.to_string()))?;
        Ok(Self {
            gate,
            experts,
            fused_bias,
            top_k: moe.num_experts_per_tok,
            norm_topk_prob: moe.norm_topk_prob,
        })
    }

    /// Applies the block to `[tokens, hidden]`, each row with its adapter.
    pub fn forward(&self, x: &Tensor, lora: &LoraRows, step: &StepMode) -> TensorResult {
        let logits = self.gate.forward(x)?.to_dtype(DType::F32)?;
        if let Some(bias) = &self.fused_bias {
            let routing = RoutingConfig {
                num_experts: self.experts.num_experts,
                top_k: self.top_k,
                n_group: 1,
                topk_group: 1,
                method: KernelTopk::Greedy,
                sigmoid: false,
                renormalize: self.norm_topk_prob,
                scaling: 1.0,
            };
            if let Some(y) = self
                .experts
                .run_fused(x, &logits, &routing, bias, lora, step)?
            {
                return Ok(y);
            }
        }
        let logits = logits.to_vec2::<f32>()?;
        let routing = route_softmax_topk(
            &logits,
            self.top_k,
            self.norm_topk_prob,
            self.experts.num_experts,
        )?;
        self.experts.run(&routing, x, lora, step)
    }

    /// Whether the block's output is a rank's partial sum (tensor parallelism).
    pub fn output_is_partial(&self, rank: Option<&RankContext>) -> bool {
        self.experts.output_is_partial(rank)
    }

    /// Records the experts' projections as LoRA targets.
    pub fn register(&self, targets: &mut LoraTargets) {
        self.experts.register(targets);
    }
}
