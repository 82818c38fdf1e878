//! The decoder-only transformer every family shares: embeddings, pre-norm decoder layers
//! (attention then MLP, each with a residual), final norm, then the output head: lm_head for
//! generation, none for embeddings. Families differ only in the attention and MLP variants each
//! layer holds, chosen at load.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use ember_core::{EmberError, ModelConfig, ModelTask, Result};

use crate::attention::gqa::Qwen3Attention;
use crate::attention::mla::MlaAttention;
use crate::cache::kv_cache::{KvCachePool, LayerKvCache};
use crate::layers::mlp::Mlp;
use crate::layers::norm::RmsNorm;
use crate::layers::rope::{RopeRows, RotaryEmbedding};
use crate::linear::{linear_from_weight, load_weight_split, LinearLayer};
use crate::loading::context::LoadContext;
use crate::loading::weights::Weights;
use crate::lora::LoraTargets;
use crate::moe::deepseek::DeepseekMoe;
use crate::moe::SparseMoe;
use crate::parallel::Split;
use crate::parallel::{kv_head_share, RankContext};
use crate::step::batch::ForwardBatch;
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
    DeepseekMoe(Box<DeepseekMoe>),
}

/// One pre-norm decoder layer.
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: FeedForward,
    /// The rank's group on a sharded model: attention's (and a split MLP's) partial outputs
    /// are summed across ranks, one all-reduce each.
    rank: Option<RankContext>,
}

impl FeedForward {
    /// Whether the block's output is a rank's partial sum under `rank`.
    fn output_is_partial(&self, rank: Option<&RankContext>) -> bool {
        match self {
            FeedForward::Dense(_) => rank.is_some(),
            FeedForward::Moe(moe) => moe.output_is_partial(rank),
            FeedForward::DeepseekMoe(moe) => moe.output_is_partial(rank),
        }
    }
}

impl DecoderLayer {
    /// Loads the two norms around the given attention and MLP (`input_layernorm`,
    /// `post_attention_layernorm` under `weights`).
    pub fn load(
        weights: &Weights,
        ctx: &LoadContext,
        cfg: &ModelConfig,
        self_attn: Attention,
        mlp: FeedForward,
    ) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(&weights.pp("input_layernorm"), ctx, h, eps)?,
            self_attn,
            post_attention_layernorm: RmsNorm::load(
                &weights.pp("post_attention_layernorm"),
                ctx,
                h,
                eps,
            )?,
            mlp,
            rank: ctx.rank().cloned(),
        })
    }

    /// Runs the layer on the hidden state `residual + delta` (`delta` the previous layer's MLP
    /// output, added here, fused with the norm after it). Returns the residual stream after
    /// attention and this layer's MLP output, which the next layer (or the final norm) adds.
    fn forward(
        &self,
        residual: &Tensor,
        delta: Option<&Tensor>,
        batch: &ForwardBatch,
        rope: &RopeRows,
        cache: &LayerKvCache,
    ) -> TensorResult<(Tensor, Tensor)> {
        let (x, normed) = match delta {
            Some(delta) => self.input_layernorm.forward_add(delta, residual)?,
            None => (residual.clone(), self.input_layernorm.forward(residual)?),
        };
        let attn = match &self.self_attn {
            Attention::Gqa(attn) => attn.forward(&normed, batch, rope, cache)?,
            Attention::Mla(attn) => attn.forward(&normed, batch, rope, cache)?,
        };
        let attn = match &self.rank {
            Some(rank) => rank.comm.all_reduce_sum(&attn)?,
            None => attn,
        };
        let (x, normed) = self.post_attention_layernorm.forward_add(&attn, &x)?;
        let mlp = match &self.mlp {
            FeedForward::Dense(mlp) => mlp.forward(&normed, &batch.lora)?,
            FeedForward::Moe(moe) => moe.forward(&normed, &batch.lora, &batch.mode)?,
            FeedForward::DeepseekMoe(moe) => moe.forward(&normed, &batch.lora, &batch.mode)?,
        };
        let mlp = match &self.rank {
            Some(rank) if self.mlp.output_is_partial(Some(rank)) => {
                rank.comm.all_reduce_sum(&mlp)?
            }
            _ => mlp,
        };
        Ok((x, mlp))
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
    /// On a sharded model, the rank's rows `start..` of the vocabulary: its part of the
    /// embedding and of the LM head (vocab-parallel).
    vocab_start: usize,
    rank: Option<RankContext>,
    /// Widths of this rank's cached K and V rows.
    kv_widths: (usize, usize),
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    head: OutputHead,
    rotary: RotaryEmbedding,
    lora_targets: LoraTargets,
}

impl DecoderModel {
    /// The group the routed experts are dispatched over, when it is not the rank's own
    /// (tensor-parallel replicas under expert parallelism): a failing rank aborts it too.
    pub fn experts_comm(&self) -> Option<&std::sync::Arc<dyn crate::parallel::Communicator>> {
        self.rank.as_ref().and_then(|r| r.experts_comm.as_ref())
    }

    /// Loads embeddings, layers `0..num_hidden_layers` (each by `load_layer`), the final norm and,
    /// for `task` generate, lm_head. Layers past `num_hidden_layers` (DeepSeek's MTP layers) are
    /// never asked for. The body's tensors sit under `model.` in a `*ForCausalLM` checkpoint and
    /// at the top in one saved from the bare `*Model` (as Qwen3-Embedding is).
    pub fn load(
        weights: &Weights,
        ctx: &LoadContext,
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
        let rank = ctx.rank().cloned();
        let (vocab_start, vocab_len) = match &rank {
            // A rank finds its ids among the step's in f32 (see `embed`).
            Some(_) if v > 1 << 24 => {
                return Err(EmberError::Config(format!(
                    "vocab_size {v} is past the 2^24 ids a sharded embedding lookup takes"
                )));
            }
            Some(r) => r.even_share(v, "vocab_size")?,
            None => (0, v),
        };
        let embed =
            model
                .pp("embed_tokens")
                .get_slice("weight", (v, h), 0, vocab_start, vocab_len)?;
        let kv_widths = match (&cfg.deepseek, &rank) {
            (None, Some(r)) => {
                let (_, kv) = kv_head_share(cfg.num_key_value_heads, r.rank(), r.world_size())?;
                (kv * cfg.head_dim, kv * cfg.head_dim)
            }
            _ => cfg.kv_cache_row_widths(),
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| load_layer(&model.pp("layers").pp(l), l))
            .collect::<Result<Vec<_>>>()?;
        let head = match task {
            ModelTask::Embed => OutputHead::Hidden,
            // Tied checkpoints reuse the embedding matrix as lm_head, as transformers does.
            ModelTask::Generate if cfg.tie_word_embeddings => {
                OutputHead::LmHead(linear_from_weight(embed.clone()))
            }
            // A rank's vocabulary rows (all of them unsharded).
            ModelTask::Generate => OutputHead::LmHead(linear_from_weight(load_weight_split(
                &weights.pp("lm_head"),
                ctx,
                h,
                v,
                Split::Columns {
                    start: vocab_start,
                    len: vocab_len,
                },
            )?)),
        };
        let mut lora_targets = LoraTargets::default();
        for layer in &layers {
            layer.register(&mut lora_targets);
        }
        Ok(Self {
            lora_targets,
            embed_tokens: candle_nn::Embedding::new(embed, h),
            vocab_start,
            rank,
            kv_widths,
            layers,
            norm: RmsNorm::load(&model.pp("norm"), ctx, h, cfg.rms_norm_eps)?,
            head,
            rotary: RotaryEmbedding::new(cfg, max_positions, weights.dtype(), weights.device())?
                .with_kernels(ctx.backends.layer_kernels, ctx.kernel_calls.clone()),
            cfg: cfg.clone(),
        })
    }
}

impl DecoderModel {
    /// The embeddings of `ids`; on a sharded model each rank looks up the ids in its part of
    /// the vocabulary (zeros elsewhere) and the parts are summed.
    fn embed(&self, ids: &Tensor) -> TensorResult {
        let Some(rank) = &self.rank else {
            return self.embed_tokens.forward(ids);
        };
        let len = self.embed_tokens.embeddings().dim(0)?;
        let (start, end) = (self.vocab_start as f64, (self.vocab_start + len) as f64);
        // Where the ids are, so the step never waits to read them back: in f32, exact for every
        // id below 2^24 (vocabularies are far smaller).
        let ids = ids.to_dtype(DType::F32)?;
        let keep = ids.ge(start)?.mul(&ids.lt(end)?)?.to_dtype(DType::F32)?;
        let local = ((ids - start)? * &keep)?.to_dtype(DType::U32)?;
        let x = self.embed_tokens.forward(&local)?;
        let keep = keep.unsqueeze(1)?.to_dtype(x.dtype())?;
        rank.comm.all_reduce_sum(&x.broadcast_mul(&keep)?)
    }

    /// Widths of the K and V rows this model (this rank, when sharded) caches per token.
    pub fn kv_cache_row_widths(&self) -> (usize, usize) {
        self.kv_widths
    }

    /// Runs the batch against this rank's cache.
    pub fn forward_rank(&self, batch: &ForwardBatch, cache: &KvCachePool) -> Result<Tensor> {
        let run = || -> TensorResult {
            let rope = self.rotary.select(&batch.positions)?;
            let mut x = self.embed(&batch.token_ids)?;
            let mut delta = None;
            for (layer, layer_cache) in self.layers.iter().zip(&cache.layers) {
                let (residual, mlp) =
                    layer.forward(&x, delta.as_ref(), batch, &rope, layer_cache)?;
                (x, delta) = (residual, Some(mlp));
            }
            let rows = &batch.logits_rows;
            let x = match &delta {
                Some(delta) => {
                    let (delta, x) = (delta.index_select(rows, 0)?, x.index_select(rows, 0)?);
                    self.norm.forward_add(&delta, &x)?.1
                }
                None => self.norm.forward(&x.index_select(rows, 0)?)?,
            };
            match (&self.head, &self.rank) {
                (OutputHead::LmHead(lm_head), None) => lm_head.forward(&x)?.to_dtype(DType::F32),
                // Each rank's logits over its vocabulary rows, gathered in rank order.
                (OutputHead::LmHead(lm_head), Some(rank)) => rank
                    .comm
                    .all_gather_equal(&lm_head.forward(&x)?.to_dtype(DType::F32)?, 1),
                (OutputHead::Hidden, _) => x.to_dtype(DType::F32),
            }
        };
        run().map_err(|e| EmberError::Tensor(e.to_string()))
    }
}

impl CausalLm for DecoderModel {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn lora_targets(&self) -> &LoraTargets {
        &self.lora_targets
    }

    fn kv_cache_shards(&self) -> Vec<(usize, usize)> {
        vec![self.kv_widths]
    }

    fn forward(&self, batch: &ForwardBatch, caches: &[KvCachePool]) -> Result<Tensor> {
        let [cache] = caches else {
            return Err(EmberError::Tensor(format!(
                "an unsharded model runs against one KV cache, not {}",
                caches.len()
            )));
        };
        self.forward_rank(batch, cache)
    }
}
