//! Paged attention for the flattened batch: every query token (a prefill chunk's or a decode's)
//! attends to the first `token_ctx[t]` positions of its sequence, read where they sit in the
//! paged KV cache through the sequence's block table. Causality is in `token_ctx`: token `i` of
//! a chunk after `past` cached tokens sees `past + i + 1` positions. Grouped-query attention:
//! query head `h` reads key/value head `h / (num_heads / num_kv_heads)`.
//!
//! Layouts (row-major): `q` `[tokens, num_heads, head_dim]`; `k_cache` `[slots, num_kv_heads,
//! head_dim]`, `v_cache` `[slots, num_kv_heads, v_dim]` with slot `block * block_size + offset`
//! (ember's `KvCachePool` rows); `block_tables` `[num_seqs, max_blocks]`; `out` `[tokens,
//! num_heads, v_dim]`.
//!
//! Numerics, shared by the CPU reference and `kernels/paged_attention.cu`: load as f32, scores
//! `scale · q·k` in f32, a max-subtracted softmax in f32 (the kernel's online form rescales by
//! `exp(m_old − m_new)` per tile, which the reference's two passes equal up to f32 rounding),
//! the weighted sum of value rows in f32, one rounding to the storage dtype on store.

use crate::error::check_shape;
use rayon::prelude::*;

use crate::{Element, KernelError};

/// The sizes of a paged attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedAttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub v_dim: usize,
    pub block_size: usize,
    /// Columns of `block_tables`: the most blocks any sequence of the call holds.
    pub max_blocks: usize,
}

/// The per-call metadata, on the host: which sequence each token belongs to and how many of its
/// positions it sees, and every sequence's block table.
#[derive(Debug, Clone, Copy)]
pub struct PagedAttentionBatch<'a> {
    pub block_tables: &'a [u32],
    pub token_seq: &'a [u32],
    pub token_ctx: &'a [u32],
}

/// Largest `v_dim` the CUDA kernel accumulates (its per-thread registers); the reference takes any.
pub const MAX_V_DIM: usize = 1024;

/// Positions per tile of the CUDA kernel (its `PA_THREADS`): a split's run of the context is a
/// whole number of tiles.
pub const SPLIT_ALIGN: usize = 128;
/// Most splits of one context (the split form's partial results are `splits` rows a head).
pub const MAX_SPLITS: usize = 32;
/// Contexts up to this many positions (as bounded by the block tables) are never split.
pub const SPLIT_MIN_CONTEXT: usize = 1024;

/// Positions `[start, end)` of split `s` of `splits` over a context of `ctx` positions: runs of
/// `ceil(ctx / splits)` rounded up to whole tiles ([`SPLIT_ALIGN`]), so the last splits of a
/// short context may be empty.
pub fn split_range(ctx: usize, splits: usize, s: usize) -> (usize, usize) {
    let len = ctx
        .div_ceil(splits.max(1))
        .next_multiple_of(SPLIT_ALIGN)
        .max(SPLIT_ALIGN);
    ((s * len).min(ctx), ((s + 1) * len).min(ctx))
}

/// How many splits the CUDA kernel cuts each context into (flash-decoding): one, unless the
/// call's (token, head) pairs alone would leave the GPU's `sm_count` multiprocessors idle and
/// its contexts may run past [`SPLIT_MIN_CONTEXT`] (`max_blocks · block_size`, what the tables
/// can hold: a CUDA graph's call is split by its bound, not by the contexts of the step it was
/// captured over); then enough to give about two blocks per multiprocessor, at most
/// [`MAX_SPLITS`] and one per tile of the longest context.
pub fn paged_attention_splits(
    shape: &PagedAttentionShape,
    tokens: usize,
    sm_count: usize,
) -> usize {
    splits_for(
        tokens * shape.num_heads,
        shape.max_blocks * shape.block_size,
        sm_count,
    )
}

/// [`paged_attention_splits`]' rule for a call of `pairs` (token, head) pairs over contexts of up
/// to `max_ctx` positions (MLA's decode kernel takes it too).
pub fn splits_for(pairs: usize, max_ctx: usize, sm_count: usize) -> usize {
    if max_ctx <= SPLIT_MIN_CONTEXT || pairs == 0 || pairs >= sm_count {
        return 1;
    }
    (2 * sm_count)
        .div_ceil(pairs)
        .min(max_ctx.div_ceil(SPLIT_ALIGN))
        .clamp(1, MAX_SPLITS)
}

/// Tokens of a call, or why the buffers and metadata don't fit `shape`: lengths, the GQA ratio,
/// each token's sequence and context against the block tables, and every block a token reads
/// against the cache's size.
pub fn paged_attention_shape(
    shape: &PagedAttentionShape,
    q_len: usize,
    k_len: usize,
    v_len: usize,
    out_len: usize,
    batch: &PagedAttentionBatch<'_>,
) -> Result<usize, KernelError> {
    let (tokens, blocks_in_cache) = paged_attention_dims(shape, q_len, k_len, v_len, out_len)?;
    let extent = paged_batch_extent(batch, shape.block_size, shape.max_blocks)?;
    check_extent(&extent, tokens, blocks_in_cache)?;
    Ok(tokens)
}

/// What a call's metadata needs of the buffers, checked against its block size and table width
/// alone (so a step checks it once for all its layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchExtent {
    /// Query tokens.
    pub tokens: usize,
    /// One more than the largest block any token reads: the blocks a cache must hold.
    pub blocks_read: usize,
}

/// Tokens and blocks of the caches of a call of `shape`, or why the buffer lengths don't fit it
/// (the GQA ratio, whole rows and slots, the output's size).
pub fn paged_attention_dims(
    shape: &PagedAttentionShape,
    q_len: usize,
    k_len: usize,
    v_len: usize,
    out_len: usize,
) -> Result<(usize, usize), KernelError> {
    const OP: &str = "paged_attention";
    let s = shape;
    check_shape(
        s.num_heads > 0
            && s.num_kv_heads > 0
            && s.num_heads.is_multiple_of(s.num_kv_heads)
            && s.head_dim > 0
            && s.v_dim > 0
            && s.block_size > 0
            && s.max_blocks > 0,
        OP,
        || format!("{shape:?}: heads must be a multiple of kv heads, and every size positive"),
    )?;
    check_shape(s.v_dim <= MAX_V_DIM, OP, || {
        format!("v_dim {} is over the kernel's {MAX_V_DIM}", s.v_dim)
    })?;
    let q_row = s.num_heads * s.head_dim;
    check_shape(q_len.is_multiple_of(q_row), OP, || {
        format!("q has {q_len} elements, not a multiple of num_heads x head_dim = {q_row}")
    })?;
    let tokens = q_len / q_row;
    check_shape(out_len == tokens * s.num_heads * s.v_dim, OP, || {
        format!(
            "out has {out_len} elements, expected {tokens} tokens x {} heads x {}",
            s.num_heads, s.v_dim
        )
    })?;
    let (k_row, v_row) = (s.num_kv_heads * s.head_dim, s.num_kv_heads * s.v_dim);
    check_shape(
        k_len.is_multiple_of(k_row)
            && v_len.is_multiple_of(v_row)
            && k_len / k_row == v_len / v_row,
        OP,
        || format!("k_cache ({k_len}) and v_cache ({v_len}) do not hold the same whole slots"),
    )?;
    Ok((tokens, k_len / k_row / s.block_size))
}

/// The extent of a call's metadata, or why it is inconsistent: each token's sequence must have a
/// table row, and its context must be positive and fit the row's `max_blocks` blocks.
pub fn paged_batch_extent(
    batch: &PagedAttentionBatch<'_>,
    block_size: usize,
    max_blocks: usize,
) -> Result<BatchExtent, KernelError> {
    const OP: &str = "paged_attention";
    check_shape(block_size > 0 && max_blocks > 0, OP, || {
        format!("block_size {block_size} and max_blocks {max_blocks} must be positive")
    })?;
    let tokens = batch.token_seq.len();
    check_shape(batch.token_ctx.len() == tokens, OP, || {
        format!(
            "{tokens} token_seq but {} token_ctx entries",
            batch.token_ctx.len()
        )
    })?;
    check_shape(
        batch.block_tables.len().is_multiple_of(max_blocks),
        OP,
        || {
            format!(
                "block_tables has {} entries, not a multiple of max_blocks = {max_blocks}",
                batch.block_tables.len()
            )
        },
    )?;
    let num_seqs = batch.block_tables.len() / max_blocks;
    let mut blocks_read = 0usize;
    for (t, (&seq, &ctx)) in batch.token_seq.iter().zip(batch.token_ctx).enumerate() {
        let (seq, ctx) = (seq as usize, ctx as usize);
        check_shape(seq < num_seqs, OP, || {
            format!("token {t} belongs to sequence {seq} of {num_seqs}")
        })?;
        check_shape(ctx > 0 && ctx <= max_blocks * block_size, OP, || {
            format!(
                "token {t} sees {ctx} positions; 1 to {} fit its block table",
                max_blocks * block_size
            )
        })?;
        let table = &batch.block_tables[seq * max_blocks..][..ctx.div_ceil(block_size)];
        if let Some(&most) = table.iter().max() {
            blocks_read = blocks_read.max(most as usize + 1);
        }
    }
    Ok(BatchExtent {
        tokens,
        blocks_read,
    })
}

/// Checks a batch's extent against a call's tokens and cache blocks.
pub fn check_extent(
    extent: &BatchExtent,
    tokens: usize,
    blocks_in_cache: usize,
) -> Result<(), KernelError> {
    const OP: &str = "paged_attention";
    check_shape(extent.tokens == tokens, OP, || {
        format!("q holds {tokens} tokens but the metadata {}", extent.tokens)
    })?;
    check_shape(extent.blocks_read <= blocks_in_cache, OP, || {
        format!(
            "a token reads block {}; the cache holds {blocks_in_cache} blocks",
            extent.blocks_read - 1
        )
    })
}

/// An element of a KV cache the CPU attention reads, widened to f32 as it is read: f32 and bf16,
/// e4m3, and e5m2 held as bytes ([`crate::fp8_e5m2`]).
pub trait CacheElement: Copy + Send + Sync {
    /// The element's value as f32 (exact for every element type).
    fn to_f32(self) -> f32;
}

impl<T: Element> CacheElement for T {
    fn to_f32(self) -> f32 {
        Element::to_f32(self)
    }
}

impl CacheElement for float8::F8E4M3 {
    fn to_f32(self) -> f32 {
        float8::F8E4M3::to_f32(&self)
    }
}

/// An e5m2 cache's bytes.
impl CacheElement for u8 {
    fn to_f32(self) -> f32 {
        crate::fp8_e5m2::decode(self)
    }
}

/// The scales of an fp8 cache's keys and values (`x = stored · scale`): one per tensor, or one
/// per key/value head (a row's heads split evenly among them); none means 1.0.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheScales<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
}

impl CacheScales<'_> {
    /// The scale of head `head` of `heads` among `scales` (1.0 where there are none).
    pub fn of_head(scales: &[f32], head: usize, heads: usize) -> f32 {
        match scales.len() {
            0 => 1.0,
            1 => scales[0],
            n => scales[head * n / heads],
        }
    }
}

/// `out[t, h] = softmax_p(scale · q[t, h]·k[p]) · v[p]` over the `token_ctx[t]` positions `p`
/// of token `t`'s sequence, `k`/`v` of key/value head `h / group`: the reference the CUDA kernel
/// is held to, and the CPU's paged attention ([`paged_attention_scaled`] with an fp8 cache).
pub fn paged_attention<T: Element>(
    out: &mut [T],
    q: &[T],
    k_cache: &[T],
    v_cache: &[T],
    batch: &PagedAttentionBatch<'_>,
    scale: f32,
    shape: &PagedAttentionShape,
) -> Result<(), KernelError> {
    let none = CacheScales::default();
    paged_attention_scaled(out, q, k_cache, v_cache, batch, scale, none, shape)
}

/// [`paged_attention`] over a cache of any [`CacheElement`] with its `scales`: the key head's
/// scale folds into `scale`, the value head's into the output. One task per (token, head) on
/// rayon's pool.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_scaled<Q: CacheElement, K: CacheElement, O: Element>(
    out: &mut [O],
    q: &[Q],
    k_cache: &[K],
    v_cache: &[K],
    batch: &PagedAttentionBatch<'_>,
    scale: f32,
    scales: CacheScales<'_>,
    shape: &PagedAttentionShape,
) -> Result<(), KernelError> {
    let call = Call::new(q, k_cache, v_cache, batch, scale, scales, shape);
    call.each_head(out, |head, scores, row| head.attend(scores, row))
}

/// The split form of [`paged_attention`], as the CUDA kernel computes it over long contexts
/// ([`split_attend`]). Equal to [`paged_attention`] up to f32 rounding.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_split<T: Element>(
    out: &mut [T],
    q: &[T],
    k_cache: &[T],
    v_cache: &[T],
    batch: &PagedAttentionBatch<'_>,
    scale: f32,
    shape: &PagedAttentionShape,
    splits: usize,
) -> Result<(), KernelError> {
    check_splits("paged_attention", splits)?;
    let scales = CacheScales::default();
    let call = Call::new(q, k_cache, v_cache, batch, scale, scales, shape);
    call.each_head(out, |head, _, row| {
        let score = |p| head.score(head.slot(p));
        let value = |p, d| head.value(head.slot(p), d);
        split_attend(head.ctx, splits, &score, &value, row)
    })
}

/// A call's inputs: the query, the caches, the metadata and the scales.
struct Call<'a, Q, K> {
    q: &'a [Q],
    k: &'a [K],
    v: &'a [K],
    batch: PagedAttentionBatch<'a>,
    scale: f32,
    scales: CacheScales<'a>,
    shape: PagedAttentionShape,
}

impl<'a, Q: CacheElement, K: CacheElement> Call<'a, Q, K> {
    /// The call of the public functions' arguments, in their order.
    #[allow(clippy::too_many_arguments)]
    fn new(
        q: &'a [Q],
        k_cache: &'a [K],
        v_cache: &'a [K],
        batch: &PagedAttentionBatch<'a>,
        scale: f32,
        scales: CacheScales<'a>,
        shape: &PagedAttentionShape,
    ) -> Self {
        Call {
            q,
            k: k_cache,
            v: v_cache,
            batch: *batch,
            scale,
            scales,
            shape: *shape,
        }
    }

    /// Checks the call and fills each (token, head)'s row of `out` (`v_dim` wide) with
    /// `row_of(head, scores, row)`, one task per row on rayon's pool: `scores` is scratch space,
    /// `row` the f32 result, stored rounded.
    fn each_head<O: Element>(
        &self,
        out: &mut [O],
        row_of: impl Fn(&Head<'_, Q, K>, &mut Vec<f32>, &mut [f32]) + Sync,
    ) -> Result<(), KernelError> {
        let Call {
            q,
            k,
            v,
            batch,
            scale,
            scales,
            shape: s,
        } = *self;
        paged_attention_shape(&s, q.len(), k.len(), v.len(), out.len(), &batch)?;
        let group = s.num_heads / s.num_kv_heads;
        out.par_chunks_mut(s.v_dim).enumerate().for_each_init(
            || (Vec::new(), vec![0f32; s.v_dim]),
            |(scores, row), (i, out_row)| {
                let (t, h) = (i / s.num_heads, i % s.num_heads);
                let (seq, ctx) = (batch.token_seq[t] as usize, batch.token_ctx[t] as usize);
                let kv = h / group;
                let head = Head {
                    q_row: &q[i * s.head_dim..][..s.head_dim],
                    k,
                    v,
                    kv,
                    table: &batch.block_tables[seq * s.max_blocks..][..ctx.div_ceil(s.block_size)],
                    ctx,
                    score_scale: scale * CacheScales::of_head(scales.k, kv, s.num_kv_heads),
                    v_scale: CacheScales::of_head(scales.v, kv, s.num_kv_heads),
                    shape: s,
                };
                row_of(&head, scores, row);
                for (o, r) in out_row.iter_mut().zip(row.iter()) {
                    *o = O::from_f32(*r);
                }
            },
        );
        Ok(())
    }
}

/// What one (token, head) reads: its query row, its key/value head's columns of the cache, and
/// its context's blocks.
struct Head<'a, Q, K> {
    q_row: &'a [Q],
    k: &'a [K],
    v: &'a [K],
    kv: usize,
    /// The context's blocks, `ctx.div_ceil(block_size)` of them.
    table: &'a [u32],
    ctx: usize,
    /// `scale` times the key head's scale.
    score_scale: f32,
    v_scale: f32,
    shape: PagedAttentionShape,
}

impl<Q: CacheElement, K: CacheElement> Head<'_, Q, K> {
    /// Calls `f(p, slot)` for each position `p` of the context and its cache slot, in order.
    #[inline]
    fn each_slot(&self, mut f: impl FnMut(usize, usize)) {
        let bs = self.shape.block_size;
        for (b, &block) in self.table.iter().enumerate() {
            let first = block as usize * bs;
            for (i, slot) in (first..first + bs.min(self.ctx - b * bs)).enumerate() {
                f(b * bs + i, slot);
            }
        }
    }

    /// The cache slot of position `p`.
    fn slot(&self, p: usize) -> usize {
        let bs = self.shape.block_size;
        self.table[p / bs] as usize * bs + p % bs
    }

    /// The scaled score of the key in `slot`.
    #[inline]
    fn score(&self, slot: usize) -> f32 {
        let s = &self.shape;
        let k_row = &self.k[(slot * s.num_kv_heads + self.kv) * s.head_dim..][..s.head_dim];
        dot(self.q_row, k_row) * self.score_scale
    }

    /// The value row in `slot`, stored.
    #[inline]
    fn value_row(&self, slot: usize) -> &[K] {
        let s = &self.shape;
        &self.v[(slot * s.num_kv_heads + self.kv) * s.v_dim..][..s.v_dim]
    }

    /// Dim `d` of the value in `slot`, scaled.
    fn value(&self, slot: usize, d: usize) -> f32 {
        self.value_row(slot)[d].to_f32() * self.v_scale
    }

    /// [`attend`] over the cache: the scores of the context into `scores`, their softmax, and
    /// the weighted sum of the value rows into `row`.
    fn attend(&self, scores: &mut Vec<f32>, row: &mut [f32]) {
        scores.clear();
        self.each_slot(|_, slot| scores.push(self.score(slot)));
        let (_, sum) = softmax(scores);
        row.fill(0.0);
        self.each_slot(|p, slot| {
            let w = scores[p];
            for (o, x) in row.iter_mut().zip(self.value_row(slot)) {
                *o += w * x.to_f32();
            }
        });
        let norm = self.v_scale / sum;
        for o in row.iter_mut() {
            *o *= norm;
        }
    }
}

/// `Σ a·b` in f32 with eight independent accumulators, so the compiler vectorises it (a
/// conversion is a no-op for f32).
#[inline]
fn dot<A: CacheElement, B: CacheElement>(a: &[A], b: &[B]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (ca, cb) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l].to_f32() * cb[l].to_f32();
        }
    }
    let tail: f32 = a[chunks..]
        .iter()
        .zip(&b[chunks..])
        .map(|(x, y)| x.to_f32() * y.to_f32())
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// Turns `scores` into their max-subtracted exponentials, in place; returns the max and the
/// exponentials' sum (0 for no scores).
fn softmax(scores: &mut [f32]) -> (f32, f32) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in scores.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    (max, sum)
}

/// One (token, head)'s output `row` over its `ctx` positions: a max-subtracted softmax of
/// `score(p)` in f32, then the weighted sum of `value(p, d)` divided by the weights' sum. The
/// definition the kernels' and the references' other forms are held to.
pub fn attend(
    ctx: usize,
    score: &dyn Fn(usize) -> f32,
    value: &dyn Fn(usize, usize) -> f32,
    row: &mut [f32],
) {
    let mut weights: Vec<f32> = (0..ctx).map(score).collect();
    let (_, sum) = softmax(&mut weights);
    for (d, o) in row.iter_mut().enumerate() {
        let acc: f32 = weights
            .iter()
            .enumerate()
            .map(|(p, w)| w * value(p, d))
            .sum();
        *o = acc / sum;
    }
}

/// Errs unless `splits` is a split count the kernels take (1 to [`MAX_SPLITS`]).
pub fn check_splits(op: &'static str, splits: usize) -> Result<(), KernelError> {
    check_shape((1..=MAX_SPLITS).contains(&splits), op, || {
        format!("{splits} splits; 1 to {MAX_SPLITS} allowed")
    })
}

/// One (token, head)'s output `row` (`v_dim` wide) in the split form over its `ctx` positions,
/// `score(p)` and `value(p, d)` giving position p's scaled score and value dim d: per run
/// ([`split_range`]) a softmax with its own max `m` and sum `l` and the weighted values divided
/// by `l`, then the runs weighed by `l · exp(m − M)` against the largest `M` (an empty run, by
/// nothing). The reference for the kernels' split launches (`kernels/split_softmax.cuh`).
pub fn split_attend(
    ctx: usize,
    splits: usize,
    score: &dyn Fn(usize) -> f32,
    value: &dyn Fn(usize, usize) -> f32,
    row: &mut [f32],
) {
    let mut parts: Vec<(f32, f32, Vec<f32>)> = Vec::with_capacity(splits);
    for split in 0..splits {
        let (lo, hi) = split_range(ctx, splits, split);
        let mut weights: Vec<f32> = (lo..hi).map(score).collect();
        let (m, l) = softmax(&mut weights);
        let part = (0..row.len())
            .map(|d| {
                let acc: f32 = weights
                    .iter()
                    .zip(lo..hi)
                    .map(|(w, p)| w * value(p, d))
                    .sum();
                if l > 0.0 {
                    acc / l
                } else {
                    0.0
                }
            })
            .collect();
        parts.push((m, l, part));
    }
    let top = parts.iter().map(|p| p.0).fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f32> = parts
        .iter()
        .map(|(m, l, _)| if *l > 0.0 { l * (m - top).exp() } else { 0.0 })
        .collect();
    let total: f32 = w.iter().sum();
    for (d, o) in row.iter_mut().enumerate() {
        *o = parts.iter().zip(&w).map(|(p, w)| w * p.2[d]).sum::<f32>() / total;
    }
}

/// The launchers of paged attention on the GPU, in a file of their own (with them this would
/// pass 800 lines).
#[cfg(feature = "cuda")]
pub(crate) mod cuda;

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: PagedAttentionShape = PagedAttentionShape {
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 2,
        v_dim: 1,
        block_size: 2,
        max_blocks: 2,
    };

    #[test]
    fn a_token_sees_only_its_context_through_its_block_table() {
        // One sequence in blocks [1, 0]: positions 0,1 in slots 2,3; position 2 in slot 0.
        let k = [0.0f32, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        let v = [10.0f32, 0.0, 20.0, 30.0];
        let q = [1.0f32, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0];
        let batch = PagedAttentionBatch {
            block_tables: &[1, 0],
            token_seq: &[0, 0],
            token_ctx: &[1, 3],
        };
        let mut out = [0.0f32; 4];
        paged_attention(&mut out, &q, &k, &v, &batch, 1.0, &SHAPE).unwrap();
        // Token 0 sees slot 2 only: its value, whatever the scores.
        assert_eq!(&out[..2], &[20.0, 20.0]);
        // Token 1, head 0 (q = e0): scores over slots 2, 3, 0 are 1, 0, 0.
        let e = std::f32::consts::E;
        let want0 = (20.0 * e + 30.0 + 10.0) / (e + 2.0);
        // Head 1 (q = e1): scores 0, 1, 1.
        let want1 = (20.0 + 30.0 * e + 10.0 * e) / (1.0 + 2.0 * e);
        assert!(
            (out[2] - want0).abs() < 1e-5 && (out[3] - want1).abs() < 1e-5,
            "{out:?}"
        );
    }

    #[test]
    fn metadata_that_reads_outside_the_cache_is_refused() {
        let (k, v, q) = ([0.0f32; 8], [0.0f32; 4], [0.0f32; 4]);
        let mut out = [0.0f32; 2];
        let run = |tables: &[u32], ctx: u32, out: &mut [f32]| {
            let batch = PagedAttentionBatch {
                block_tables: tables,
                token_seq: &[0],
                token_ctx: &[ctx],
            };
            paged_attention(out, &q, &k, &v, &batch, 1.0, &SHAPE)
                .unwrap_err()
                .to_string()
        };
        assert!(run(&[0, 2], 3, &mut out).contains("reads block 2; the cache holds 2"));
        assert!(run(&[0, 1], 5, &mut out).contains("sees 5 positions"));
        assert!(run(&[0, 1], 0, &mut out).contains("sees 0 positions"));
    }

    #[test]
    fn splits_cover_each_context_once_in_whole_tiles() {
        for ctx in [1usize, 2, 127, 128, 129, 1000, 4096, 40_000] {
            for splits in [1usize, 2, 3, 7, 32] {
                let mut next = 0;
                for s in 0..splits {
                    let (lo, hi) = split_range(ctx, splits, s);
                    assert_eq!(
                        lo, next,
                        "ctx {ctx} splits {splits}: split {s} starts at {lo}"
                    );
                    assert!(hi >= lo && hi <= ctx);
                    assert!(
                        lo % SPLIT_ALIGN == 0 || lo == ctx,
                        "ctx {ctx}: split {s} at {lo}"
                    );
                    next = hi;
                }
                assert_eq!(next, ctx, "ctx {ctx} splits {splits}: all positions");
            }
        }
    }

    #[test]
    fn only_calls_too_small_for_the_gpu_over_long_contexts_split() {
        let shape = |max_blocks| PagedAttentionShape {
            num_heads: 32,
            num_kv_heads: 4,
            head_dim: 128,
            v_dim: 128,
            block_size: 16,
            max_blocks,
        };
        // 132 SMs (H100 SXM): one decode of 32 heads over 2048 positions: 9 splits (264 blocks).
        assert_eq!(paged_attention_splits(&shape(128), 1, 132), 9);
        // Short tables, or enough (token, head) pairs already: none.
        assert_eq!(paged_attention_splits(&shape(64), 1, 132), 1);
        assert_eq!(paged_attention_splits(&shape(4096), 5, 132), 1);
        // A long bound with few pairs: capped at MAX_SPLITS, and at one per tile.
        let one_head = PagedAttentionShape {
            num_heads: 1,
            num_kv_heads: 1,
            ..shape(4096)
        };
        assert_eq!(paged_attention_splits(&one_head, 1, 132), MAX_SPLITS);
        let short = PagedAttentionShape {
            block_size: 1,
            max_blocks: 1100,
            ..one_head
        };
        assert_eq!(paged_attention_splits(&short, 1, 132), 9);
    }

    /// The split form equals the reference on random inputs: contexts of one position to past
    /// several tiles, at and off tile edges, split from 1 to 32 ways (so some splits are empty).
    #[test]
    fn the_split_form_equals_the_reference() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let shape = PagedAttentionShape {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            v_dim: 6,
            block_size: 16,
            max_blocks: 40,
        };
        let ctxs = [1usize, 5, 128, 129, 300, 640];
        let pool = 64usize;
        let slots = pool * shape.block_size;
        let mut random =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
        let q = random(ctxs.len() * shape.num_heads * shape.head_dim);
        let k = random(slots * shape.num_kv_heads * shape.head_dim);
        let v = random(slots * shape.num_kv_heads * shape.v_dim);
        let mut tables = vec![0u32; ctxs.len() * shape.max_blocks];
        for (s, ctx) in ctxs.iter().enumerate() {
            for b in 0..ctx.div_ceil(shape.block_size) {
                tables[s * shape.max_blocks + b] = rng.random_range(0..pool as u32);
            }
        }
        let token_seq: Vec<u32> = (0..ctxs.len() as u32).collect();
        let token_ctx: Vec<u32> = ctxs.iter().map(|&c| c as u32).collect();
        let batch = PagedAttentionBatch {
            block_tables: &tables,
            token_seq: &token_seq,
            token_ctx: &token_ctx,
        };
        let n = ctxs.len() * shape.num_heads * shape.v_dim;
        let mut want = vec![0f32; n];
        paged_attention(&mut want, &q, &k, &v, &batch, 0.7, &shape).unwrap();
        for splits in [1usize, 2, 3, 7, 32] {
            let mut got = vec![0f32; n];
            paged_attention_split(&mut got, &q, &k, &v, &batch, 0.7, &shape, splits).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs() + 1e-6,
                    "{splits} splits [{i}]: {g} vs {w}"
                );
            }
        }
        let mut out = vec![0f32; n];
        assert!(paged_attention_split(&mut out, &q, &k, &v, &batch, 0.7, &shape, 33).is_err());
    }
}
