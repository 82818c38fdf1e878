//! DeepSeek's MoE block (V2, V3, Kimi K2): the router `gate` (+ `e_score_correction_bias`),
//! the routed experts, and shared experts applied to every token.

use candle_core::{DType, Tensor};
use ember_core::config::DeepseekConfig;
use ember_core::{EmberError, Result};

use crate::layers::mlp::Mlp;
use crate::loading::context::LoadContext;
use crate::loading::weights::Weights;
use crate::lora::{LoraRows, LoraTargets};
use crate::moe::experts::{load_experts, Experts};
use crate::moe::router::ExpertRouter;
use crate::step::mode::StepMode;
use crate::TensorResult;

/// `mlp` of a sparse layer: router `gate` (+ `e_score_correction_bias`), routed experts, and
/// shared experts applied to every token.
pub struct DeepseekMoe {
    /// Router weight `[experts, hidden]`, kept in f32: routing is computed in f32.
    gate: Tensor,
    e_score_correction_bias: Vec<f32>,
    router: ExpertRouter,
    experts: Experts,
    shared_experts: Option<Mlp>,
    /// The bias on the device, when the experts are stacked for the fused MoE.
    fused_bias: Option<Tensor>,
}

impl DeepseekMoe {
    /// Loads `gate`, `experts` and `shared_experts` under `weights`.
    pub fn load(
        weights: &Weights,
        ctx: &LoadContext,
        hidden: usize,
        ds: &DeepseekConfig,
    ) -> Result<Self> {
        let (e, i) = (ds.n_routed_experts, ds.moe_intermediate_size);
        let gate_w = weights.pp("gate");
        let gate = gate_w.get_as("weight", (e, hidden), DType::F32)?;
        let e_score_correction_bias = if gate_w.contains("e_score_correction_bias") {
            gate_w
                .get_as("e_score_correction_bias", e, DType::F32)?
                .to_vec1::<f32>()
                .map_err(|err| EmberError::Weights(format!("e_score_correction_bias: {err}")))?
        } else {
            vec![0.0; e]
        };
        // Shared experts are split like a dense MLP under tensor parallelism and replicated
        // under expert parallelism (where the routed output is whole on every rank).
        let shared_i = i * ds.n_shared_experts;
        let shared_channels = match ctx.rank() {
            Some(rank) if !rank.expert_parallel => {
                Some(rank.even_share(shared_i, "the shared experts' intermediate size")?)
            }
            _ => None,
        };
        let shared_experts = (ds.n_shared_experts > 0)
            .then(|| {
                Mlp::load_split(
                    &weights.pp("shared_experts"),
                    ctx,
                    hidden,
                    shared_i,
                    shared_channels,
                )
            })
            .transpose()?;
        let experts = load_experts(&weights.pp("experts"), ctx, hidden, e, i)?;
        let fused_bias = experts
            .is_stacked()
            .then(|| Tensor::from_slice(&e_score_correction_bias, e, weights.device()))
            .transpose()
            .map_err(|err| EmberError::Tensor(err.to_string()))?;
        Ok(Self {
            gate,
            e_score_correction_bias,
            router: ExpertRouter::new(ds),
            experts,
            shared_experts,
            fused_bias,
        })
    }

    /// Applies the block to `[tokens, hidden]`, each row with its adapter.
    pub fn forward(&self, x: &Tensor, lora: &LoraRows, step: &StepMode) -> TensorResult {
        let logits = x.to_dtype(DType::F32)?.matmul(&self.gate.t()?)?;
        let fused = match &self.fused_bias {
            Some(bias) => {
                let routing = self.router.kernel_config();
                self.experts
                    .run_fused(x, &logits, &routing, bias, lora, step)?
            }
            None => None,
        };
        let routed = match fused {
            Some(routed) => routed,
            None => {
                let logits = logits.to_vec2::<f32>()?;
                let routing = self.router.route(&logits, &self.e_score_correction_bias)?;
                self.experts.run(&routing, x, lora, step)?
            }
        };
        match &self.shared_experts {
            Some(shared) => routed + shared.forward(x, lora)?,
            None => Ok(routed),
        }
    }

    /// Whether the block's output is a rank's partial sum (tensor parallelism).
    pub fn output_is_partial(&self, rank: Option<&crate::parallel::RankContext>) -> bool {
        self.experts.output_is_partial(rank)
    }

    /// Records routed and shared experts as LoRA targets.
    pub fn register(&self, targets: &mut LoraTargets) {
        self.experts.register(targets);
        if let Some(shared) = &self.shared_experts {
            shared.register(targets);
        }
    }
}
