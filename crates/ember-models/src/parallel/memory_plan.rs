//! Weight memory per rank of a sharded model, from its config alone: the dry run of a
//! `--tensor-parallel-size` / `--enable-expert-parallel` load, for shapes too big to load here.
//!
//! The plan walks the layers the loader builds and splits each tensor by the loader's own rules
//! ([`even_share`], [`kv_head_share`]): query heads and MLA heads split, key/value heads split or
//! replicated, the MLA latent projections (`q_a_proj`, `kv_a_proj_with_mqa`) and their norms
//! replicated, dense MLPs and (under tensor parallelism) every expert split by intermediate
//! channels, under expert parallelism whole experts partitioned and DeepSeek's shared experts
//! replicated, router and norms replicated, embeddings and `lm_head` split by vocabulary rows.
//! For [`WeightFormat::Loaded`] it equals [`crate::LoadedModel::rank_weight_bytes`] byte for byte
//! (tested against real loads). Not counted: the KV cache (see [`kv_cache_bytes_per_token`]),
//! activations, the RoPE tables, communication buffers and the runtime's own memory.

use candle_core::DType;
use ember_core::config::{DeepseekConfig, TopkMethod};
use ember_core::{ModelConfig, Result};

use crate::parallel::{even_share, expert_slots_per_rank, kv_head_share};

/// How the weights are stored in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// As ember's loader holds a checkpoint with `--packed-weights false`: every tensor in this
    /// dtype (quantized checkpoints dequantized at load), the DeepSeek router and
    /// `e_score_correction_bias` in f32.
    Loaded(DType),
    /// Block FP8 as DeepSeek-V3 and Kimi K2 publish it, kept as stored: every projection of
    /// attention, MLPs and experts in e4m3 with an f32 scale per 128x128 block; embeddings,
    /// `lm_head`, norms and router in bf16, `e_score_correction_bias` in f32.
    Fp8Block,
    /// INT4 as Kimi K2 Thinking publishes it (compressed-tensors `pack-quantized`, group 32,
    /// symmetric), kept as stored: routed experts packed 8 to an int32 with a bf16 scale per 32
    /// inputs; everything its `ignore` list names (attention, shared experts, dense MLPs,
    /// `lm_head`) and the rest in bf16, `e_score_correction_bias` in f32.
    Int4Experts,
}

/// Which kind of projection a matrix is; the quantized formats treat them differently.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Attention,
    DenseMlp,
    RoutedExpert,
    SharedExpert,
}

const FP8_BLOCK: u64 = 128;
const INT4_GROUP: u64 = 32;

impl WeightFormat {
    /// Bytes of one element of an unquantized tensor (embeddings, norms, biases, `w_uk`/`w_uv`).
    fn element(self) -> u64 {
        match self {
            WeightFormat::Loaded(dtype) => dtype.size_in_bytes() as u64,
            WeightFormat::Fp8Block | WeightFormat::Int4Experts => 2,
        }
    }

    /// Bytes of a projection's `[out, in]` weight (one rank's part).
    fn matrix(self, part: Part, out: u64, inp: u64) -> u64 {
        match (self, part) {
            (WeightFormat::Fp8Block, _) => {
                out * inp + out.div_ceil(FP8_BLOCK) * inp.div_ceil(FP8_BLOCK) * 4
            }
            (WeightFormat::Int4Experts, Part::RoutedExpert) => {
                out * (inp * 4).div_ceil(32) * 4 + out * inp.div_ceil(INT4_GROUP) * 2
            }
            _ => out * inp * self.element(),
        }
    }

    /// Bytes of a DeepSeek router `gate` of `elems` weights: ember routes in f32.
    fn router(self, elems: u64) -> u64 {
        match self {
            WeightFormat::Loaded(_) => elems * 4,
            _ => elems * self.element(),
        }
    }
}

/// One rank's weight bytes, by what they belong to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RankWeights {
    /// Attention projections (and their biases).
    pub attention: u64,
    /// MLA's absorbed-decode copies of the rank's `kv_b_proj` halves (`w_uk`, `w_uv`), held in
    /// the compute dtype beside `kv_b_proj` itself.
    pub mla_absorbed: u64,
    /// Dense MLPs.
    pub dense_mlp: u64,
    /// Routed experts.
    pub routed_experts: u64,
    /// DeepSeek's shared experts.
    pub shared_experts: u64,
    /// `embed_tokens` and `lm_head` (once when tied).
    pub embeddings: u64,
    /// Every RMSNorm, the routers and `e_score_correction_bias`.
    pub norms_and_router: u64,
}

impl RankWeights {
    /// All of the rank's weight bytes.
    pub fn total(&self) -> u64 {
        self.attention
            + self.mla_absorbed
            + self.dense_mlp
            + self.routed_experts
            + self.shared_experts
            + self.embeddings
            + self.norms_and_router
    }
}

/// The weight bytes each of `world_size` ranks holds when `cfg` (a generating model) is loaded
/// in `format`, with routed experts partitioned when `expert_parallel`; an error names a size
/// that does not split over the ranks, as the loader would.
pub fn rank_weights(
    cfg: &ModelConfig,
    world_size: usize,
    expert_parallel: bool,
    format: WeightFormat,
) -> Result<Vec<RankWeights>> {
    let layout = Layout {
        expert_parallel,
        ..Layout::one_group(world_size)
    };
    plan_ranks(cfg, format, layout)
}

/// The weight bytes each of `world_size` data-parallel ranks holds (`--data-parallel-size`):
/// every layer whole, but the routed experts partitioned when `expert_parallel`.
pub fn rank_weights_data_parallel(
    cfg: &ModelConfig,
    world_size: usize,
    expert_parallel: bool,
    format: WeightFormat,
) -> Result<Vec<RankWeights>> {
    let layout = Layout {
        expert_parallel,
        data_parallel: true,
        ..Layout::one_group(world_size)
    };
    plan_ranks(cfg, format, layout)
}

/// The weight bytes each rank holds under `replicas` data-parallel replicas of `tp`
/// tensor-parallel ranks each (`--data-parallel-size` with `--tensor-parallel-size`): a TP
/// rank's share of every layer, with the routed experts partitioned over all `replicas · tp`
/// ranks when `expert_parallel`. In rank order, replica after replica.
pub fn rank_weights_replicas(
    cfg: &ModelConfig,
    replicas: usize,
    tp: usize,
    expert_parallel: bool,
    format: WeightFormat,
) -> Result<Vec<RankWeights>> {
    let layout = Layout {
        ranks: replicas.max(1) * tp.max(1),
        expert_parallel,
        ..Layout::one_group(tp)
    };
    plan_ranks(cfg, format, layout)
}

/// [`rank_weights`] under expert parallelism with `--num-redundant-experts redundant`: each
/// rank holds `(experts + redundant) / world_size` whole experts, its share of the copies.
pub fn rank_weights_with_redundant_experts(
    cfg: &ModelConfig,
    world_size: usize,
    redundant: usize,
    format: WeightFormat,
) -> Result<Vec<RankWeights>> {
    let layout = Layout {
        expert_parallel: true,
        redundant_experts: redundant,
        ..Layout::one_group(world_size)
    };
    plan_ranks(cfg, format, layout)
}

/// How a plan's ranks split the model: `ranks` in all, in groups of `group` that split each
/// layer (tensor parallelism; rank r is rank `r % group` of its group), the routed experts
/// partitioned over all `ranks` under expert parallelism.
struct Layout {
    ranks: usize,
    group: usize,
    expert_parallel: bool,
    redundant_experts: usize,
    /// The ranks hold every layer whole (data parallelism).
    data_parallel: bool,
}

impl Layout {
    /// `ranks` ranks that split each layer as one tensor-parallel group, experts and all.
    fn one_group(ranks: usize) -> Self {
        Layout {
            ranks,
            group: ranks,
            expert_parallel: false,
            redundant_experts: 0,
            data_parallel: false,
        }
    }
}

fn plan_ranks(cfg: &ModelConfig, format: WeightFormat, l: Layout) -> Result<Vec<RankWeights>> {
    let (ranks, group) = (l.ranks.max(1), l.group.max(1));
    (0..ranks)
        .map(|rank| {
            RankPlan {
                cfg,
                format,
                rank: rank % group,
                world: group,
                expert_parallel: l.expert_parallel,
                redundant_experts: l.redundant_experts,
                data_parallel: l.data_parallel,
                bytes: RankWeights::default(),
                experts_world: ranks,
            }
            .plan()
        })
        .collect()
}

/// KV cache bytes one token takes on each rank (all layers, `element_bytes` per cached value):
/// a rank caches its (possibly replicated) key/value heads; MLA's latent and rope key are
/// shared by all heads, so every rank caches them whole.
pub fn kv_cache_bytes_per_token(
    cfg: &ModelConfig,
    world_size: usize,
    element_bytes: u64,
) -> Result<u64> {
    let (k, v) = match &cfg.deepseek {
        Some(_) => cfg.kv_cache_row_widths(),
        None if world_size > 1 => {
            let (_, heads) = kv_head_share(cfg.num_key_value_heads, 0, world_size)?;
            (heads * cfg.head_dim, heads * cfg.head_dim)
        }
        None => cfg.kv_cache_row_widths(),
    };
    Ok((k + v) as u64 * cfg.num_hidden_layers as u64 * element_bytes)
}

/// The walk over one rank's layers, adding up what it holds.
struct RankPlan<'a> {
    cfg: &'a ModelConfig,
    format: WeightFormat,
    rank: usize,
    world: usize,
    expert_parallel: bool,
    /// Expert slots beyond the routed experts, spread over the ranks (expert parallelism).
    redundant_experts: usize,
    /// Data-parallel ranks: nothing is split but the routed experts under expert parallelism.
    data_parallel: bool,
    bytes: RankWeights,
    /// Ranks the routed experts are partitioned over under expert parallelism: `world`, or
    /// every rank of every tensor-parallel replica.
    experts_world: usize,
}

impl RankPlan<'_> {
    /// The loader shards only when there is more than one rank.
    fn sharded(&self) -> bool {
        self.world > 1
    }

    /// Whether layers are split over the ranks (tensor parallelism).
    fn tensor_parallel(&self) -> bool {
        self.sharded() && !self.data_parallel
    }

    /// This rank's count of `n` items split evenly (all of them on an unsharded model and on a
    /// data-parallel rank).
    fn share(&self, n: usize, what: &str) -> Result<u64> {
        if !self.tensor_parallel() {
            return Ok(n as u64);
        }
        Ok(even_share(n, self.rank, self.world, what)?.1 as u64)
    }

    fn plain(&self, elems: u64) -> u64 {
        elems * self.format.element()
    }

    fn plan(mut self) -> Result<RankWeights> {
        let cfg = self.cfg;
        let h = cfg.hidden_size as u64;
        let vocab = self.share(cfg.vocab_size, "vocab_size")?;
        let tables = if cfg.tie_word_embeddings { 1 } else { 2 };
        self.bytes.embeddings = tables * self.plain(vocab * h);
        self.bytes.norms_and_router = self.plain(h);
        for layer in 0..cfg.num_hidden_layers {
            self.bytes.norms_and_router += 2 * self.plain(h);
            match &cfg.deepseek {
                Some(ds) => self.mla(ds)?,
                None => self.gqa()?,
            }
            match (&cfg.deepseek, &cfg.moe) {
                _ if !cfg.is_moe_layer(layer) => {
                    let channels = self.share(cfg.intermediate_size, "intermediate_size")?;
                    self.bytes.dense_mlp += self.mlp(Part::DenseMlp, channels);
                }
                (Some(ds), _) => self.deepseek_moe(ds)?,
                (None, Some(moe)) => {
                    let e = moe.num_experts;
                    self.bytes.norms_and_router += self.plain(e as u64 * h);
                    self.bytes.routed_experts += self.experts(e, moe.moe_intermediate_size)?;
                }
                (None, None) => {}
            }
        }
        Ok(self.bytes)
    }

    /// gate, up and down projections over `channels` intermediate channels.
    fn mlp(&self, part: Part, channels: u64) -> u64 {
        let h = self.cfg.hidden_size as u64;
        2 * self.format.matrix(part, channels, h) + self.format.matrix(part, h, channels)
    }

    /// Grouped-query attention: the rank's query heads and key/value heads; `o_proj`'s bias on
    /// rank 0 alone.
    fn gqa(&mut self) -> Result<()> {
        let cfg = self.cfg;
        let (h, d) = (cfg.hidden_size as u64, cfg.head_dim as u64);
        let q = self.share(cfg.num_attention_heads, "num_attention_heads")? * d;
        let kv = if self.tensor_parallel() {
            kv_head_share(cfg.num_key_value_heads, self.rank, self.world)?.1 as u64
        } else {
            cfg.num_key_value_heads as u64
        } * d;
        let f = self.format;
        self.bytes.attention += f.matrix(Part::Attention, q, h)
            + 2 * f.matrix(Part::Attention, kv, h)
            + f.matrix(Part::Attention, h, q);
        if cfg.attention_bias {
            let o_bias = if self.rank == 0 || !self.tensor_parallel() {
                h
            } else {
                0
            };
            self.bytes.attention += self.plain(q + 2 * kv + o_bias);
        }
        self.bytes.norms_and_router += 2 * self.plain(d);
        Ok(())
    }

    /// Multi-head latent attention: the rank's heads of `q_b_proj` (or `q_proj`), `kv_b_proj`
    /// and `o_proj`; the latent projections and norms whole; `w_uk`/`w_uv` beside `kv_b_proj`.
    fn mla(&mut self, ds: &DeepseekConfig) -> Result<()> {
        let cfg = self.cfg;
        let h = cfg.hidden_size as u64;
        let n = self.share(cfg.num_attention_heads, "num_attention_heads")?;
        let (qk, kvr) = (ds.qk_head_dim() as u64, ds.kv_lora_rank as u64);
        let (rope, per_head) = (
            ds.qk_rope_head_dim as u64,
            (ds.qk_nope_head_dim + ds.v_head_dim) as u64,
        );
        let f = self.format;
        let mut attention = match ds.q_lora_rank.map(|r| r as u64) {
            Some(r) => {
                self.bytes.norms_and_router += self.plain(r);
                f.matrix(Part::Attention, r, h) + f.matrix(Part::Attention, n * qk, r)
            }
            None => f.matrix(Part::Attention, n * qk, h),
        };
        attention += f.matrix(Part::Attention, kvr + rope, h)
            + f.matrix(Part::Attention, n * per_head, kvr)
            + f.matrix(Part::Attention, h, n * ds.v_head_dim as u64);
        if cfg.attention_bias {
            let q_a = ds.q_lora_rank.map_or(0, |r| r as u64);
            let o_bias = if self.rank == 0 || !self.tensor_parallel() {
                h
            } else {
                0
            };
            attention += self.plain(q_a + kvr + rope + o_bias);
        }
        self.bytes.attention += attention;
        self.bytes.norms_and_router += self.plain(kvr);
        self.bytes.mla_absorbed += self.plain(n * per_head * kvr);
        Ok(())
    }

    /// `e` routed experts of `i` channels: whole experts partitioned under expert parallelism,
    /// else every expert's share of its channels.
    fn experts(&self, e: usize, i: usize) -> Result<u64> {
        let (count, channels) = if self.experts_world > 1 && self.expert_parallel {
            let per_rank = expert_slots_per_rank(e, self.redundant_experts, self.experts_world)?;
            (per_rank as u64, i as u64)
        } else {
            (e as u64, self.share(i, "moe_intermediate_size")?)
        };
        Ok(count * self.mlp(Part::RoutedExpert, channels))
    }

    /// DeepSeek-MoE: router (and, for `noaux_tc` checkpoints, its bias) whole, routed experts,
    /// shared experts split under tensor parallelism and whole under expert parallelism.
    fn deepseek_moe(&mut self, ds: &DeepseekConfig) -> Result<()> {
        let (e, h) = (ds.n_routed_experts as u64, self.cfg.hidden_size as u64);
        // Checkpoints ship the bias exactly when they route by it (V3, Kimi K2; not V2).
        let bias = if ds.topk_method == TopkMethod::NoauxTc {
            e * 4
        } else {
            0
        };
        self.bytes.norms_and_router += self.format.router(e * h) + bias;
        self.bytes.routed_experts += self.experts(ds.n_routed_experts, ds.moe_intermediate_size)?;
        if ds.n_shared_experts > 0 {
            let shared = ds.moe_intermediate_size * ds.n_shared_experts;
            let channels = if self.expert_parallel {
                shared as u64
            } else {
                self.share(shared, "the shared experts' intermediate size")?
            };
            self.bytes.shared_experts += self.mlp(Part::SharedExpert, channels);
        }
        Ok(())
    }
}
