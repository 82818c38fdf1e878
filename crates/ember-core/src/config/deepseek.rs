//! DeepSeek's settings in `config.json` (V2, V3, Kimi K2): multi-head latent attention and the
//! router of its MoE layers.

use super::{need, RawConfig};
use crate::error::{EmberError, Result};

/// How a DeepSeek router picks experts (`topk_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// Bias-corrected, group-limited top-k of DeepSeek-V3 (`noaux_tc`).
    NoauxTc,
    /// Plain top-k over all experts (DeepSeek-V2-Lite, `greedy`).
    Greedy,
    /// Top-k inside the `topk_group` groups with the highest single expert score
    /// (DeepSeek-V2, `group_limited_greedy`).
    GroupLimitedGreedy,
}

/// How router logits become expert scores (`scoring_func`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    Sigmoid,
    Softmax,
}

/// Multi-head latent attention and DeepSeek-MoE settings (DeepSeek-V3, Kimi K2).
#[derive(Debug, Clone, PartialEq)]
pub struct DeepseekConfig {
    /// Rank of the query compression; `None` means a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    /// Layers before this index keep a dense MLP.
    pub first_k_dense_replace: usize,
    /// Every `moe_layer_freq`-th layer (from `first_k_dense_replace`) is sparse.
    pub moe_layer_freq: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub topk_method: TopkMethod,
    pub scoring_func: ScoringFunc,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    /// Rotary dims are laid out in interleaved pairs `(x0, x1), (x2, x3), …`.
    pub rope_interleave: bool,
}

impl DeepseekConfig {
    /// Query/key head width: the no-position part plus the rotary part.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}

pub(super) fn parse_deepseek(raw: &RawConfig) -> Result<DeepseekConfig> {
    let n_routed_experts = need(raw.n_routed_experts, "n_routed_experts")?;
    let num_experts_per_tok = need(raw.num_experts_per_tok, "num_experts_per_tok")?;
    if num_experts_per_tok == 0 || num_experts_per_tok > n_routed_experts {
        return Err(EmberError::Config(format!(
            "num_experts_per_tok {num_experts_per_tok} must be between 1 and n_routed_experts {n_routed_experts}"
        )));
    }
    let n_group = raw.n_group.unwrap_or(1).max(1);
    let topk_group = raw.topk_group.unwrap_or(n_group);
    if !n_routed_experts.is_multiple_of(n_group) || topk_group == 0 || topk_group > n_group {
        return Err(EmberError::Config(format!(
            "n_group {n_group} must divide n_routed_experts {n_routed_experts} and topk_group {topk_group} must be between 1 and n_group"
        )));
    }
    // DeepSeek-V2 configs default to softmax greedy routing without renormalisation; V3 and
    // Kimi K2 to sigmoid noaux_tc with renormalisation (the defaults of transformers' configs).
    let v2 = raw.model_type.as_deref() == Some("deepseek_v2")
        || (raw.model_type.is_none()
            && raw
                .architectures
                .iter()
                .any(|a| a == "DeepseekV2ForCausalLM"));
    let default_method = if v2 { "greedy" } else { "noaux_tc" };
    let topk_method = match raw.topk_method.as_deref().unwrap_or(default_method) {
        "noaux_tc" => TopkMethod::NoauxTc,
        "greedy" => TopkMethod::Greedy,
        "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
        other => {
            return Err(EmberError::Config(format!(
                "topk_method {other:?} is not supported; supported: noaux_tc, greedy, group_limited_greedy"
            )))
        }
    };
    let scoring_func = match raw.scoring_func.as_deref().unwrap_or(match topk_method {
        TopkMethod::NoauxTc => "sigmoid",
        TopkMethod::Greedy | TopkMethod::GroupLimitedGreedy => "softmax",
    }) {
        "sigmoid" => ScoringFunc::Sigmoid,
        "softmax" => ScoringFunc::Softmax,
        other => {
            return Err(EmberError::Config(format!(
                "scoring_func {other:?} is not supported; supported: sigmoid, softmax"
            )))
        }
    };
    if topk_method == TopkMethod::NoauxTc && n_routed_experts / n_group < 2 {
        return Err(EmberError::Config(format!(
            "noaux_tc routing scores groups by their top-2 experts; n_routed_experts {n_routed_experts} / n_group {n_group} leaves fewer than 2 per group"
        )));
    }
    Ok(DeepseekConfig {
        q_lora_rank: raw.q_lora_rank,
        kv_lora_rank: need(raw.kv_lora_rank, "kv_lora_rank")?,
        qk_nope_head_dim: need(raw.qk_nope_head_dim, "qk_nope_head_dim")?,
        qk_rope_head_dim: need(raw.qk_rope_head_dim, "qk_rope_head_dim")?,
        v_head_dim: need(raw.v_head_dim, "v_head_dim")?,
        n_routed_experts,
        n_shared_experts: raw.n_shared_experts.unwrap_or(0),
        num_experts_per_tok,
        moe_intermediate_size: need(raw.moe_intermediate_size, "moe_intermediate_size")?,
        first_k_dense_replace: raw.first_k_dense_replace.unwrap_or(0),
        moe_layer_freq: raw.moe_layer_freq.unwrap_or(1).max(1),
        n_group,
        topk_group,
        topk_method,
        scoring_func,
        norm_topk_prob: raw.norm_topk_prob.unwrap_or(!v2),
        routed_scaling_factor: raw.routed_scaling_factor.unwrap_or(1.0),
        rope_interleave: raw.rope_interleave.unwrap_or(true),
    })
}
