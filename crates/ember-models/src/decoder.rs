//! The decoder-only transformer every family shares: embeddings, pre-norm decoder layers
//! (attention then MLP, each with a residual), final norm, then the output head: lm_head for
//! generation, none for embeddings. Families differ only in the attention and MLP variants each
//! layer holds, chosen at load.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use ember_core::{EmberError, ModelConfig, ModelTask, Result};

use crate::attention::Qwen3Attention;
use crate::batch::ForwardBatch;
use crate::deepseek_v3::DeepseekMoe;
use crate::kv_cache::{KvCachePool, LayerKvCache};
use crate::linear::{linear_from_weight, load_linear, LinearLayer};
use crate::lora::LoraTargets;
use crate::mla::MlaAttention;
use crate::mlp::Mlp;
use crate::moe::SparseMoe;
use crate::norm::RmsNorm;
use crate::rope::{RopeRows, RotaryEmbedding};
use crate::weights::Weights;
use crate::{CausalLm, TensorResult};

/// The attention variant of a decoder layer.
pub enum Attention {
    /// Grouped-query attention (Qwen3).
    Gqa(Qwen3Attention),
    /// Multi-head latent attention (DeepSeek-V3, Kimi K2).
    Mla(MlaAttention),
}

/// The MLP variant of a decoder layer.
pub enum FeedForward {
    Dense(Mlp),
    /// Qwen3-MoE's softmax top-k experts.
    Moe(SparseMoe),
    /// DeepSeek's routed plus shared experts.
    DeepseekMoe(DeepseekMoe),
}

/// One pre-norm decoder layer.
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: FeedForward,
}

impl DecoderLayer {
    /// Loads the two norms around the given attention and MLP (`input_layernorm`,
    /// `post_attention_layernorm` under `weights`).
    pub fn load(
        weights: &Weights,
        cfg: &ModelConfig,
        self_attn: Attention,
        mlp: FeedForward,
    ) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(&weights.pp("input_layernorm"), h, eps)?,
            self_attn,
            post_attention_layernorm: RmsNorm::load(
                &weights.pp("post_attention_layernorm"),
                h,
                eps,
            )?,
            mlp,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        batch: &ForwardBatch,
        rope: &RopeRows,
        cache: &LayerKvCache,
    ) -> TensorResult {
        let normed = self.input_layernorm.forward(x)?;
        let attn = match &self.self_attn {
            Attention::Gqa(attn) => attn.forward(&normed, batch, rope, cache)?,
            Attention::Mla(attn) => attn.forward(&normed, batch, rope, cache)?,
        };
        let x = (x + attn)?;
        let normed = self.post_attention_layernorm.forward(&x)?;
        let mlp = match &self.mlp {
            FeedForward::Dense(mlp) => mlp.forward(&normed, &batch.lora)?,
            FeedForward::Moe(moe) => moe.forward(&normed, &batch.lora)?,
            FeedForward::DeepseekMoe(moe) => moe.forward(&normed, &batch.lora)?,
        };
        x + mlp
    }

    /// Records the layer's adaptable projections.
    pub fn register(&self, targets: &mut LoraTargets) {
        match &self.self_attn {
            Attention::Gqa(attn) => attn.register(targets),
            Attention::Mla(attn) => attn.register(targets),
        }
        match &self.mlp {
            FeedForward::Dense(mlp) => mlp.register(targets),
            FeedForward::Moe(moe) => moe.register(targets),
            FeedForward::DeepseekMoe(moe) => moe.register(targets),
        }
    }
}

/// What the model makes of the final-normed hidden states of the rows it is asked for.
pub enum OutputHead {
    /// Logits over the vocabulary (`*ForCausalLM`).
    LmHead(Arc<dyn LinearLayer>),
    /// The hidden states themselves, for pooling into embeddings (`*Model`, no LM head).
    Hidden,
}

/// A decoder-only language model (`*ForCausalLM`, or the bare `*Model` of an embedding
/// checkpoint) of any family.
pub struct DecoderModel {
    cfg: ModelConfig,
    embed_tokens: candle_nn::Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    head: OutputHead,
    rotary: RotaryEmbedding,
    lora_targets: LoraTargets,
}

impl DecoderModel {
    /// Loads embeddings, layers `0..num_hidden_layers` (each by `load_layer`), the final norm and,
    /// for `task` generate, lm_head. Layers past `num_hidden_layers` (DeepSeek's MTP layers) are
    /// never asked for. The body's tensors sit under `model.` in a `*ForCausalLM` checkpoint and
    /// at the top in one saved from the bare `*Model` (as Qwen3-Embedding is).
    pub fn load(
        weights: &Weights,
        cfg: &ModelConfig,
        max_positions: usize,
        task: ModelTask,
        load_layer: impl Fn(&Weights, usize) -> Result<DecoderLayer>,
    ) -> Result<Self> {
        let bare = !weights.contains("model.embed_tokens.weight")
            && weights.contains("embed_tokens.weight");
        let model = if bare {
            weights.clone()
        } else {
            weights.pp("model")
        };
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = model.pp("embed_tokens").get("weight", (v, h))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| load_layer(&model.pp("layers").pp(l), l))
            .collect::<Result<Vec<_>>>()?;
        let head = match task {
            ModelTask::Embed => OutputHead::Hidden,
            // Tied checkpoints reuse the embedding matrix as lm_head, as transformers does.
            ModelTask::Generate if cfg.tie_word_embeddings => {
                OutputHead::LmHead(linear_from_weight(embed.clone()))
            }
            ModelTask::Generate => {
                OutputHead::LmHead(load_linear(&weights.pp("lm_head"), h, v, false)?)
            }
        };
        let mut lora_targets = LoraTargets::default();
        for layer in &layers {
            layer.register(&mut lora_targets);
        }
        Ok(Self {
            lora_targets,
            embed_tokens: candle_nn::Embedding::new(embed, h),
            layers,
            norm: RmsNorm::load(&model.pp("norm"), h, cfg.rms_norm_eps)?,
            head,
            rotary: RotaryEmbedding::new(cfg, max_positions, weights.dtype(), weights.device())?,
            cfg: cfg.clone(),
        })
    }
}

impl CausalLm for DecoderModel {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn lora_targets(&self) -> &LoraTargets {
        &self.lora_targets
    }

    fn forward(&self, batch: &ForwardBatch, cache: &KvCachePool) -> Result<Tensor> {
        let run = || -> TensorResult {
            let rope = self.rotary.select(&batch.positions)?;
            let mut x = self.embed_tokens.forward(&batch.token_ids)?;
            for (layer, layer_cache) in self.layers.iter().zip(&cache.layers) {
                x = layer.forward(&x, batch, &rope, layer_cache)?;
            }
            let x = self.norm.forward(&x.index_select(&batch.logits_rows, 0)?)?;
            match &self.head {
                OutputHead::LmHead(lm_head) => lm_head.forward(&x)?.to_dtype(DType::F32),
                OutputHead::Hidden => x.to_dtype(DType::F32),
            }
        };
        run().map_err(|e| EmberError::Tensor(e.to_string()))
    }
}
