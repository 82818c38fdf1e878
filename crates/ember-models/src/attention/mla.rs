//! Multi-head latent attention (MLA) of DeepSeek-V2/V3 and Kimi K2 over the paged cache.
//!
//! Per token the cache holds only the normalised KV latent (`kv_lora_rank`, in the pool's K rows)
//! and the rotated rope key shared by all heads (`qk_rope_head_dim`, in the V rows). Prefill
//! chunks expand the latent into per-head keys and values through `kv_b_proj`; single-token
//! decodes use the absorbed form, folding `kv_b_proj`'s key half into the query and its value
//! half into the output, so nothing is expanded per head:
//! `score = (q_nope · W_uk) · latent + q_rope · k_rope`, `out = (probs · latent) · W_uvᵀ`.

use candle_core::Tensor;
use ember_core::config::{yarn_get_mscale, DeepseekConfig};
use ember_core::{EmberError, ModelConfig, Result, RopeScaling};

use crate::backends::AttentionBackend;
use crate::cache::kv_cache::{KvScales, LayerKvCache, LayerKvScales};
use crate::device::calls::{Kernel, KernelCalls};
use crate::layers::norm::RmsNorm;
use crate::layers::rope::RopeRows;
use crate::linear::{load_weight, load_weight_split, projection_from_weight, Projection};
use crate::loading::context::LoadContext;
use crate::loading::weights::{tensor_bytes, Weights};
use crate::lora::{LoraRows, LoraTargets};
use crate::parallel::Split;
use crate::step::batch::{ForwardBatch, SequenceAttention};
use crate::TensorResult;

/// How queries are projected: through a low-rank bottleneck, or directly.
enum QueryProjection {
    LowRank {
        q_a_proj: Projection,
        q_a_layernorm: RmsNorm,
        q_b_proj: Projection,
    },
    Plain {
        q_proj: Projection,
    },
}

/// `self_attn` of a DeepSeek-V3 decoder layer.
pub struct MlaAttention {
    q: QueryProjection,
    kv_a_proj_with_mqa: Projection,
    kv_a_layernorm: RmsNorm,
    kv_b_proj: Projection,
    /// `kv_b_proj`'s key half `[heads, qk_nope_head_dim, kv_lora_rank]`, for absorbed decode.
    w_uk: Tensor,
    /// `kv_b_proj`'s value half `[heads, v_head_dim, kv_lora_rank]`, for absorbed decode.
    w_uv: Tensor,
    o_proj: Projection,
    num_heads: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    kv_lora_rank: usize,
    softmax_scale: f64,
    /// fp8 cache scale of the latent and rope key rows: the checkpoint's `k_scale` for both, as
    /// vLLM's MLA cache (one row of both) uses it, else 1.0.
    kv_scales: LayerKvScales,
    /// `--attention-backend ember`: the step's decodes through ember's MLA kernel.
    backend: AttentionBackend,
    /// Where the kernels' calls are counted.
    calls: std::sync::Arc<KernelCalls>,
}

/// `qk_head_dim^-0.5`, times `mscale(factor, mscale_all_dim)²` under YaRN, as transformers does.
pub fn softmax_scale(cfg: &ModelConfig, ds: &DeepseekConfig) -> f64 {
    let base = (ds.qk_head_dim() as f64).powf(-0.5);
    match &cfg.rope_scaling {
        RopeScaling::Yarn(yarn) => match yarn.mscale_all_dim {
            Some(all) if all != 0.0 => {
                let m = yarn_get_mscale(yarn.factor, all);
                base * m * m
            }
            _ => base,
        },
        _ => base,
    }
}

impl MlaAttention {
    /// Loads the projections and norms under `weights`.
    pub fn load(
        weights: &Weights,
        ctx: &LoadContext,
        cfg: &ModelConfig,
        ds: &DeepseekConfig,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let n_all = cfg.num_attention_heads;
        let bias = cfg.attention_bias;
        let eps = cfg.rms_norm_eps;
        // A tensor-parallel rank keeps its heads' query, key/value expansion and output rows;
        // the latent projection (shared by all heads) is replicated.
        let (h0, n) = match ctx.rank() {
            Some(rank) => rank.even_share(n_all, "num_attention_heads")?,
            None => (0, n_all),
        };
        let sharded = ctx.rank().is_some();
        let heads = |per_head: usize, split: fn(usize, usize) -> Split| {
            sharded.then(|| split(h0 * per_head, n * per_head))
        };
        let columns = |start, len| Split::Columns { start, len };
        let rows = |start, len| Split::Rows { start, len };
        let qk = ds.qk_head_dim();
        let q = match ds.q_lora_rank {
            Some(r) => QueryProjection::LowRank {
                q_a_proj: Projection::load(&weights.pp("q_a_proj"), ctx, h, r, bias)?,
                q_a_layernorm: RmsNorm::load(&weights.pp("q_a_layernorm"), ctx, r, eps)?,
                q_b_proj: Projection::load_split(
                    &weights.pp("q_b_proj"),
                    ctx,
                    r,
                    n_all * qk,
                    false,
                    heads(qk, columns),
                )?,
            },
            None => QueryProjection::Plain {
                q_proj: Projection::load_split(
                    &weights.pp("q_proj"),
                    ctx,
                    h,
                    n_all * qk,
                    false,
                    heads(qk, columns),
                )?,
            },
        };
        let kvr = ds.kv_lora_rank;
        let per_head = ds.qk_nope_head_dim + ds.v_head_dim;
        let kv_b_w = weights.pp("kv_b_proj");
        let kv_b = match heads(per_head, columns) {
            Some(split) => load_weight_split(&kv_b_w, ctx, kvr, n_all * per_head, split)?,
            None => load_weight(&kv_b_w, ctx, kvr, n_all * per_head)?,
        };
        let kv_b = projection_from_weight(&kv_b_w, ctx, kv_b, None)?;
        // Absorbed decode folds the weight as the expanded path's matmul sees it (dequantized
        // under online FP8, as vLLM does), so both forms compute the same attention.
        let split = || -> candle_core::Result<(Tensor, Tensor)> {
            let w = kv_b.weight()?.reshape((n, per_head, kvr))?;
            Ok((
                w.narrow(1, 0, ds.qk_nope_head_dim)?.contiguous()?,
                w.narrow(1, ds.qk_nope_head_dim, ds.v_head_dim)?
                    .contiguous()?,
            ))
        };
        let (w_uk, w_uv) = split().map_err(|e| EmberError::Weights(format!("kv_b_proj: {e}")))?;
        weights.note_held(tensor_bytes(&w_uk) + tensor_bytes(&w_uv));
        Ok(Self {
            q,
            kv_a_proj_with_mqa: Projection::load(
                &weights.pp("kv_a_proj_with_mqa"),
                ctx,
                h,
                kvr + ds.qk_rope_head_dim,
                bias,
            )?,
            kv_a_layernorm: RmsNorm::load(&weights.pp("kv_a_layernorm"), ctx, kvr, eps)?,
            kv_b_proj: Projection::new(kv_b, kv_b_w.prefix(), kvr, n_all * per_head)
                .with_split(heads(per_head, columns)),
            w_uk,
            w_uv,
            o_proj: Projection::load_split(
                &weights.pp("o_proj"),
                ctx,
                n_all * ds.v_head_dim,
                h,
                bias,
                heads(ds.v_head_dim, rows),
            )?,
            num_heads: n,
            qk_nope_head_dim: ds.qk_nope_head_dim,
            qk_rope_head_dim: ds.qk_rope_head_dim,
            v_head_dim: ds.v_head_dim,
            kv_lora_rank: kvr,
            softmax_scale: softmax_scale(cfg, ds),
            kv_scales: if ctx.calculate_kv_scales {
                LayerKvScales::calculated(true)
            } else {
                LayerKvScales::fixed(
                    KvScales::load(weights, 1, (0, 1))?
                        .map(|s| KvScales {
                            v: s.k.clone(),
                            ..s
                        })
                        .unwrap_or_default(),
                )
            },
            backend: ctx.backends.attention,
            calls: ctx.kernel_calls.clone(),
        })
    }

    /// Attends the batch's new tokens (`x`: `[tokens, hidden]`) to their sequences' cached
    /// context, after writing the new latents and rope keys into `cache`.
    pub fn forward(
        &self,
        x: &Tensor,
        batch: &ForwardBatch,
        rope: &RopeRows,
        cache: &LayerKvCache,
    ) -> TensorResult {
        let tokens = x.dim(0)?;
        let (nope, rd) = (self.qk_nope_head_dim, self.qk_rope_head_dim);
        let q = match &self.q {
            QueryProjection::LowRank {
                q_a_proj,
                q_a_layernorm,
                q_b_proj,
            } => q_b_proj.forward(
                &q_a_layernorm.forward(&q_a_proj.forward(x, &batch.lora)?)?,
                &batch.lora,
            )?,
            QueryProjection::Plain { q_proj } => q_proj.forward(x, &batch.lora)?,
        }
        .reshape((tokens, self.num_heads, nope + rd))?;
        // [heads, tokens, dim] for per-head matmuls.
        let q_nope = q.narrow(2, 0, nope)?.transpose(0, 1)?.contiguous()?;
        let q_rope = rope
            .apply(&q.narrow(2, nope, rd)?)?
            .transpose(0, 1)?
            .contiguous()?;
        let compressed = self.kv_a_proj_with_mqa.forward(x, &batch.lora)?;
        let latent = self
            .kv_a_layernorm
            .forward(&compressed.narrow(1, 0, self.kv_lora_rank)?.contiguous()?)?;
        let k_rope = rope
            .apply(
                &compressed
                    .narrow(1, self.kv_lora_rank, rd)?
                    .reshape((tokens, 1, rd))?,
            )?
            .reshape((tokens, rd))?;
        let kv_scales = self.kv_scales.resolve(cache, &latent, &k_rope)?;
        cache.write(&latent, &k_rope, &batch.slot_mapping, kv_scales)?;

        // The step's decodes through ember's kernel, all at once: `[decodes, heads * v]`.
        let decoded = self.decode_with_kernel(&q_nope, &q_rope, batch, cache)?;
        if let Some((decodes, out)) = &decoded {
            // Every sequence decodes: the kernel's rows are the step's, in order.
            if decodes.seqs.len() == batch.sequences.len() {
                return self.o_proj.forward(out, &batch.lora);
            }
        }
        let mut outputs = Vec::with_capacity(batch.sequences.len());
        for (s, seq) in batch.sequences.iter().enumerate() {
            if let Some((decodes, out)) = &decoded {
                if let Ok(j) = decodes.seqs.binary_search(&s) {
                    outputs.push(out.narrow(0, j, 1)?);
                    continue;
                }
            }
            batch
                .mode
                .refuse("MLA over the tensor path (per sequence, on the host)")?;
            let (start, ql) = (seq.query_start, seq.query_len);
            let (latent_ctx, k_rope_ctx) = cache.gather(&seq.context_slots()?, kv_scales)?;
            let q_nope = q_nope.narrow(1, start, ql)?;
            let q_rope = q_rope.narrow(1, start, ql)?;
            // An adapter on kv_b_proj changes W_uk and W_uv: such sequences expand instead.
            let kv_b_adapted = seq
                .adapter
                .as_ref()
                .is_some_and(|a| a.factors(self.kv_b_proj.path()).is_some());
            if (ql > 1 || kv_b_adapted)
                && self.backend == AttentionBackend::Ember
                && crate::attention::mla_decode::prefill_serves(&q_nope, nope + rd, self.v_head_dim)
            {
                outputs.push(self.expanded_with_kernel(
                    &q_nope,
                    &q_rope,
                    &latent_ctx,
                    &k_rope_ctx,
                    seq,
                )?);
                continue;
            }
            // The rope part of the scores is shared by both forms: [heads, ql, ctx].
            let rope_scores = q_rope.broadcast_matmul(&k_rope_ctx.t()?)?;
            let out = if ql == 1 && !kv_b_adapted {
                self.absorbed(&q_nope, &rope_scores, &latent_ctx, seq)?
            } else {
                self.expanded(&q_nope, &rope_scores, &latent_ctx, seq)?
            };
            // [heads, ql, v] → [ql, heads * v]
            outputs.push(
                out.transpose(0, 1)?
                    .reshape((ql, self.num_heads * self.v_head_dim))?,
            );
        }
        self.o_proj.forward(&Tensor::cat(&outputs, 0)?, &batch.lora)
    }

    /// Under `--attention-backend ember`, the outputs `[decodes, heads * v_head_dim]` of the
    /// step's single-token decodes through ember's MLA kernel (absorbed, every decode in one
    /// call), with the decodes; `None` when the kernel does not serve this layer or step (no
    /// decodes, an fp8 cache, or a decode whose adapter adapts `kv_b_proj`).
    fn decode_with_kernel(
        &self,
        q_nope: &Tensor,
        q_rope: &Tensor,
        batch: &ForwardBatch,
        cache: &LayerKvCache,
    ) -> TensorResult<
        Option<(
            std::sync::Arc<crate::step::metadata::MlaDecodeBatch>,
            Tensor,
        )>,
    > {
        if self.backend != AttentionBackend::Ember
            || !crate::attention::mla_decode::serves(cache, q_nope, self.kv_lora_rank)
        {
            return Ok(None);
        }
        let decodes = batch.mla_decodes()?;
        let adapted = decodes.seqs.iter().any(|&s| {
            batch.sequences[s]
                .adapter
                .as_ref()
                .is_some_and(|a| a.factors(self.kv_b_proj.path()).is_some())
        });
        if decodes.seqs.is_empty() || adapted {
            return Ok(None);
        }
        let n = decodes.seqs.len();
        // [heads, n, kv_lora_rank] and [heads, n, rope] → [n, heads, kv_lora_rank + rope].
        let q_latent = q_nope.index_select(&decodes.rows, 1)?.matmul(&self.w_uk)?;
        let q_rope = q_rope.index_select(&decodes.rows, 1)?;
        let q = Tensor::cat(&[&q_latent, &q_rope], 2)?.transpose(0, 1)?;
        let latent_out =
            crate::attention::mla_decode::decode(&q, cache, &decodes, self.softmax_scale as f32)?;
        self.calls.count(Kernel::MlaDecode);
        // [n, heads, kv_lora_rank] → [heads, n, v] → [n, heads * v]
        let out = latent_out
            .transpose(0, 1)?
            .contiguous()?
            .matmul(&self.w_uv.t()?)?
            .transpose(0, 1)?
            .reshape((n, self.num_heads * self.v_head_dim))?;
        Ok(Some((decodes, out)))
    }

    /// Records the MLA projections as LoRA targets.
    pub fn register(&self, targets: &mut LoraTargets) {
        match &self.q {
            QueryProjection::LowRank {
                q_a_proj, q_b_proj, ..
            } => {
                q_a_proj.register(targets);
                q_b_proj.register(targets);
            }
            QueryProjection::Plain { q_proj } => q_proj.register(targets),
        }
        for p in [&self.kv_a_proj_with_mqa, &self.kv_b_proj, &self.o_proj] {
            p.register(targets);
        }
    }

    /// `kv_b_proj` over the context's latents (with the sequence's adapter): `[ctx, heads,
    /// nope + v]`.
    fn kv_b(&self, latent_ctx: &Tensor, seq: &SequenceAttention) -> TensorResult {
        let ctx = seq.context_len;
        let lora = match &seq.adapter {
            Some(adapter) => LoraRows::uniform(adapter, ctx),
            None => LoraRows::none(),
        };
        self.kv_b_proj.forward(latent_ctx, &lora)?.reshape((
            ctx,
            self.num_heads,
            self.qk_nope_head_dim + self.v_head_dim,
        ))
    }

    /// The context's keys `[ctx, heads, nope + rope]` and values `[ctx, heads, v]`: the latents
    /// expanded through `kv_b_proj` (with the sequence's adapter), the rope key shared by all heads.
    fn expand_context(
        &self,
        latent_ctx: &Tensor,
        k_rope_ctx: &Tensor,
        seq: &SequenceAttention,
    ) -> TensorResult<(Tensor, Tensor)> {
        let ctx = seq.context_len;
        let kv = self.kv_b(latent_ctx, seq)?;
        let k_rope =
            k_rope_ctx
                .unsqueeze(1)?
                .broadcast_as((ctx, self.num_heads, self.qk_rope_head_dim))?;
        let k = Tensor::cat(&[&kv.narrow(2, 0, self.qk_nope_head_dim)?, &k_rope], 2)?;
        let v = kv.narrow(2, self.qk_nope_head_dim, self.v_head_dim)?;
        Ok((k, v))
    }

    /// Prefill through ember's kernel (`--attention-backend ember`): the context expanded as
    /// [`Self::expanded`] does, then causal attention in one call that never holds the scores:
    /// `[ql, heads * v]`.
    fn expanded_with_kernel(
        &self,
        q_nope: &Tensor,
        q_rope: &Tensor,
        latent_ctx: &Tensor,
        k_rope_ctx: &Tensor,
        seq: &SequenceAttention,
    ) -> TensorResult {
        let (k, v) = self.expand_context(latent_ctx, k_rope_ctx, seq)?;
        // [heads, ql, nope] and [heads, ql, rope] → [ql, heads, nope + rope].
        let q = Tensor::cat(&[q_nope, q_rope], 2)?.transpose(0, 1)?;
        self.calls.count(Kernel::MlaPrefill);
        crate::attention::mla_decode::prefill(&q, &k, &v, self.softmax_scale as f32)
    }

    /// Prefill: expand the context's latents into per-head keys and values.
    fn expanded(
        &self,
        q_nope: &Tensor,
        rope_scores: &Tensor,
        latent_ctx: &Tensor,
        seq: &SequenceAttention,
    ) -> TensorResult {
        let kv = self.kv_b(latent_ctx, seq)?.transpose(0, 1)?;
        let k_nope = kv.narrow(2, 0, self.qk_nope_head_dim)?.contiguous()?;
        let v = kv
            .narrow(2, self.qk_nope_head_dim, self.v_head_dim)?
            .contiguous()?;
        let scores = (q_nope.matmul(&k_nope.t()?)? + rope_scores)?;
        seq.masked_softmax(&scores, self.softmax_scale, v.dtype())?
            .matmul(&v)
    }

    /// Decode: fold `kv_b_proj` into the query and the output; attend over latents directly.
    fn absorbed(
        &self,
        q_nope: &Tensor,
        rope_scores: &Tensor,
        latent_ctx: &Tensor,
        seq: &SequenceAttention,
    ) -> TensorResult {
        let q_latent = q_nope.matmul(&self.w_uk)?; // [heads, ql, kv_lora_rank]
        let scores = (q_latent.broadcast_matmul(&latent_ctx.t()?)? + rope_scores)?;
        let probs = seq.masked_softmax(&scores, self.softmax_scale, latent_ctx.dtype())?;
        probs
            .broadcast_matmul(latent_ctx)? // [heads, ql, kv_lora_rank]
            .matmul(&self.w_uv.t()?)
    }
}
