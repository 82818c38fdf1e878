//! Grouped-query attention of Qwen3 (per-head q/k RMSNorm, RoPE) over the paged KV cache.

use candle_core::Tensor;
use ember_core::{ModelConfig, Result};

use crate::backends::AttentionBackend;
use crate::cache::kv_cache::{KvScales, LayerKvCache, LayerKvScales};
use crate::layers::norm::RmsNorm;
use crate::layers::rope::RopeRows;
use crate::linear::Projection;
use crate::loading::context::LoadContext;
use crate::loading::weights::Weights;
use crate::lora::LoraTargets;
use crate::parallel::kv_head_share;
use crate::parallel::Split;
use crate::step::batch::ForwardBatch;
use crate::TensorResult;

/// `self_attn` of a Qwen3 decoder layer.
pub struct Qwen3Attention {
    q_proj: Projection,
    k_proj: Projection,
    v_proj: Projection,
    o_proj: Projection,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// fp8 cache scales of this layer's key/value heads (the checkpoint's, else 1.0).
    kv_scales: LayerKvScales,
    /// Read on CUDA builds only (the CPU has one kernel).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    backend: AttentionBackend,
}

impl Qwen3Attention {
    /// Loads `q_proj`, `k_proj`, `v_proj`, `o_proj`, `q_norm`, `k_norm` under `weights`. On a
    /// tensor-parallel rank, the rank's query heads and their key/value heads (replicated when
    /// there are fewer than ranks), with `o_proj` split by rows: the output is a partial sum.
    pub fn load(weights: &Weights, ctx: &LoadContext, cfg: &ModelConfig) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.attention_bias;
        let (q_split, kv_split, o_split, local_q, local_kv, kv_first) = match ctx.rank() {
            None => (None, None, None, nq, nkv, 0),
            Some(rank) => {
                let (q0, qn) = rank.even_share(nq, "num_attention_heads")?;
                let (kv0, kvn) = kv_head_share(nkv, rank.rank(), rank.world_size())?;
                (
                    Some(Split::Columns {
                        start: q0 * d,
                        len: qn * d,
                    }),
                    Some(Split::Columns {
                        start: kv0 * d,
                        len: kvn * d,
                    }),
                    Some(Split::Rows {
                        start: q0 * d,
                        len: qn * d,
                    }),
                    qn,
                    kvn,
                    kv0,
                )
            }
        };
        Ok(Self {
            q_proj: Projection::load_split(&weights.pp("q_proj"), ctx, h, nq * d, bias, q_split)?,
            k_proj: Projection::load_split(&weights.pp("k_proj"), ctx, h, nkv * d, bias, kv_split)?,
            v_proj: Projection::load_split(&weights.pp("v_proj"), ctx, h, nkv * d, bias, kv_split)?,
            o_proj: Projection::load_split(&weights.pp("o_proj"), ctx, nq * d, h, bias, o_split)?,
            q_norm: RmsNorm::load(&weights.pp("q_norm"), ctx, d, cfg.rms_norm_eps)?,
            k_norm: RmsNorm::load(&weights.pp("k_norm"), ctx, d, cfg.rms_norm_eps)?,
            num_heads: local_q,
            num_kv_heads: local_kv,
            head_dim: d,
            kv_scales: if ctx.calculate_kv_scales {
                LayerKvScales::calculated(false)
            } else {
                LayerKvScales::fixed(
                    KvScales::load(weights, nkv, (kv_first, local_kv))?.unwrap_or_default(),
                )
            },
            backend: ctx.backends.attention,
        })
    }

    /// Attends the batch's new tokens (`x`: `[tokens, hidden]`) to their sequences' cached
    /// context, after writing the new keys and values into `cache`.
    pub fn forward(
        &self,
        x: &Tensor,
        batch: &ForwardBatch,
        rope: &RopeRows,
        cache: &LayerKvCache,
    ) -> TensorResult {
        let tokens = x.dim(0)?;
        let d = self.head_dim;
        let q = self
            .q_proj
            .forward(x, &batch.lora)?
            .reshape((tokens, self.num_heads, d))?;
        let k = self
            .k_proj
            .forward(x, &batch.lora)?
            .reshape((tokens, self.num_kv_heads, d))?;
        let v = self.v_proj.forward(x, &batch.lora)?;
        let q = rope.apply(&self.q_norm.forward(&q)?)?;
        let k = rope.apply(&self.k_norm.forward(&k)?)?;
        let k_rows = k.reshape((tokens, self.num_kv_heads * d))?;
        let kv_scales = self.kv_scales.resolve(cache, &k_rows, &v)?;
        cache.write(&k_rows, &v, &batch.slot_mapping, kv_scales)?;

        let scale = 1.0 / (d as f64).sqrt();
        #[cfg(feature = "cuda")]
        if self.backend == AttentionBackend::Ember
            && crate::attention::paged_cuda::supported(cache, &q, self.num_kv_heads)
        {
            let attn = crate::attention::paged_cuda::paged_attention(
                &q,
                cache,
                batch,
                self.num_kv_heads,
                scale as f32,
            )?;
            return self.o_proj.forward(&attn, &batch.lora);
        }
        if crate::attention::paged::supported(cache, &q) {
            let attn = crate::attention::paged::paged_attention(
                &q,
                cache,
                kv_scales,
                batch,
                self.num_kv_heads,
                scale as f32,
            )?;
            return self.o_proj.forward(&attn, &batch.lora);
        }
        batch
            .mode
            .refuse("attention over the tensor path (per sequence, on the host)")?;
        let group = self.num_heads / self.num_kv_heads;
        let mut outputs = Vec::with_capacity(batch.sequences.len());
        for seq in &batch.sequences {
            let (ql, ctx) = (seq.query_len, seq.context_len);
            let (k_ctx, v_ctx) = cache.gather(&seq.context_slots()?, kv_scales)?;
            // [kv_heads, ctx, d]
            let k_ctx = k_ctx
                .reshape((ctx, self.num_kv_heads, d))?
                .transpose(0, 1)?
                .contiguous()?;
            let v_ctx = v_ctx
                .reshape((ctx, self.num_kv_heads, d))?
                .transpose(0, 1)?
                .contiguous()?;
            // Query heads h = kv * group + g, so [ql, H, d] → [kv, group * ql, d].
            let q_seq = q
                .narrow(0, seq.query_start, ql)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((self.num_kv_heads, group * ql, d))?;
            // Grouped as [kv, group, ql, ctx] so the [ql, ctx] mask broadcasts.
            let scores = q_seq
                .matmul(&k_ctx.t()?)?
                .reshape((self.num_kv_heads, group, ql, ctx))?;
            let probs = seq
                .masked_softmax(&scores, scale, v_ctx.dtype())?
                .reshape((self.num_kv_heads, group * ql, ctx))?;
            let out = probs
                .matmul(&v_ctx)?
                .reshape((self.num_heads, ql, d))?
                .transpose(0, 1)?
                .reshape((ql, self.num_heads * d))?;
            outputs.push(out);
        }
        let attn = Tensor::cat(&outputs, 0)?;
        self.o_proj.forward(&attn, &batch.lora)
    }

    /// Records q/k/v/o as LoRA targets.
    pub fn register(&self, targets: &mut LoraTargets) {
        for p in [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj] {
            p.register(targets);
        }
    }
}
