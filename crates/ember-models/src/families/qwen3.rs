//! Qwen3 (dense) and Qwen3-MoE: grouped-query attention, an MLP dense or sparse per layer.

use ember_core::{ModelConfig, ModelTask, Result};

use crate::attention::gqa::Qwen3Attention;
use crate::families::decoder::{Attention, DecoderLayer, DecoderModel, FeedForward};
use crate::layers::mlp::Mlp;
use crate::loading::context::LoadContext;
use crate::loading::weights::Weights;
use crate::moe::SparseMoe;

/// Loads `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM` (names as transformers writes them), or a
/// Qwen3-Embedding checkpoint for `task` embed.
pub fn load_qwen3(
    weights: &Weights,
    ctx: &LoadContext,
    cfg: &ModelConfig,
    max_positions: usize,
    task: ModelTask,
) -> Result<DecoderModel> {
    DecoderModel::load(
        weights,
        ctx,
        cfg,
        max_positions,
        task,
        |layer, layer_idx| {
            let h = cfg.hidden_size;
            let mlp = match &cfg.moe {
                Some(moe) if cfg.is_moe_layer(layer_idx) => {
                    FeedForward::Moe(SparseMoe::load(&layer.pp("mlp"), ctx, h, moe)?)
                }
                _ => FeedForward::Dense(Mlp::load_dense(
                    &layer.pp("mlp"),
                    ctx,
                    h,
                    cfg.intermediate_size,
                )?),
            };
            let attn = Attention::Gqa(Qwen3Attention::load(&layer.pp("self_attn"), ctx, cfg)?);
            DecoderLayer::load(layer, ctx, cfg, attn, mlp)
        },
    )
}
