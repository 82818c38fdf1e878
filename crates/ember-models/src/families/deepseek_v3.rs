//! DeepSeek-V3 / V3.1 and Kimi K2 (`DeepseekV3ForCausalLM`): MLA attention, dense MLPs in the
//! first `first_k_dense_replace` layers, DeepSeek-MoE (routed plus shared experts) after.
//! Multi-token-prediction layers (index ≥ `num_hidden_layers`) are never asked for, so
//! checkpoints that ship them load unchanged.

use ember_core::{EmberError, ModelConfig, ModelTask, Result};

use crate::attention::mla::MlaAttention;
use crate::families::decoder::{Attention, DecoderLayer, DecoderModel, FeedForward};
use crate::layers::mlp::Mlp;
use crate::loading::context::LoadContext;
use crate::loading::weights::Weights;
use crate::moe::deepseek::DeepseekMoe;

/// Loads `DeepseekV3ForCausalLM` (DeepSeek-V3, V3.1, Kimi K2) or `DeepseekV2ForCausalLM`
/// (DeepSeek-V2, V2-Lite; same layers, another router): layers `0..num_hidden_layers`.
pub fn load_deepseek_v3(
    weights: &Weights,
    ctx: &LoadContext,
    cfg: &ModelConfig,
    max_positions: usize,
) -> Result<DecoderModel> {
    let ds = cfg.deepseek.as_ref().ok_or_else(|| {
        EmberError::Config("a deepseek_v3 model needs its MLA and MoE settings".into())
    })?;
    DecoderModel::load(
        weights,
        ctx,
        cfg,
        max_positions,
        ModelTask::Generate,
        |layer, layer_idx| {
            let h = cfg.hidden_size;
            let mlp = if cfg.is_moe_layer(layer_idx) {
                FeedForward::DeepseekMoe(Box::new(DeepseekMoe::load(&layer.pp("mlp"), ctx, h, ds)?))
            } else {
                FeedForward::Dense(Mlp::load_dense(
                    &layer.pp("mlp"),
                    ctx,
                    h,
                    cfg.intermediate_size,
                )?)
            };
            let attn = Attention::Mla(MlaAttention::load(&layer.pp("self_attn"), ctx, cfg, ds)?);
            DecoderLayer::load(layer, ctx, cfg, attn, mlp)
        },
    )
}
