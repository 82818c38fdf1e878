//! MLA attention (DeepSeek-V2/V3, Kimi K2) in the absorbed form over the paged latent cache, for
//! the flattened batch: every query token attends to the first `token_ctx[t]` positions of its
//! sequence, read through the sequence's block table, as [`crate::paged_attention`] does. All
//! heads share one cached row per position: the latent `c` (`rank` = kv_lora_rank) in one cache
//! and the roped key `k_r` (`rope_dim`) in another. With `kv_b_proj`'s key half folded into the
//! query (`q_latent = q_nope · W_uk`), the score is `scale · (q_latent·c + q_rope·k_r)` and the
//! output is the weighted sum of the latents, which the caller maps through `W_uv`.
//!
//! Layouts (row-major): `q` `[tokens, num_heads, rank + rope_dim]` (latent part, then rope part);
//! `latent_cache` `[slots, rank]`, `rope_cache` `[slots, rope_dim]` (ember's MLA cache: the
//! `k` and `v` tensors of its layer); `out` `[tokens, num_heads, rank]`. Metadata as
//! [`crate::paged_attention::PagedAttentionBatch`].
//!
//! Numerics, shared by the CPU reference and `kernels/mla_decode.cu`: load as f32, the latent and
//! rope dot products each summed in f32 and added, times `scale`; a max-subtracted softmax in f32
//! (online in the kernel); the weighted sum of latents in f32; one rounding on store.

use crate::error::check_shape;
use crate::paged_attention::{
    attend, check_extent, check_splits, paged_batch_extent, split_attend, splits_for, BatchExtent,
    PagedAttentionBatch,
};
use crate::{Element, KernelError};

/// Largest `rank` the CUDA kernel accumulates (its per-thread registers).
pub const MLA_MAX_RANK: usize = 1024;

/// The sizes of an MLA call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaShape {
    pub num_heads: usize,
    /// kv_lora_rank: the latent's width, and the output's.
    pub rank: usize,
    /// qk_rope_head_dim.
    pub rope_dim: usize,
    pub block_size: usize,
    /// Columns of `block_tables`.
    pub max_blocks: usize,
}

/// Tokens and cache blocks of a call of `shape`, or why the buffer lengths don't fit it.
pub fn mla_dims(
    shape: &MlaShape,
    q_len: usize,
    latent_len: usize,
    rope_len: usize,
    out_len: usize,
) -> Result<(usize, usize), KernelError> {
    const OP: &str = "mla_decode";
    let s = shape;
    check_shape(
        s.num_heads > 0 && s.rank > 0 && s.rope_dim > 0 && s.block_size > 0 && s.max_blocks > 0,
        OP,
        || format!("{shape:?}: every size must be positive"),
    )?;
    check_shape(s.rank <= MLA_MAX_RANK, OP, || {
        format!("rank {} is over the kernel's {MLA_MAX_RANK}", s.rank)
    })?;
    let q_row = s.num_heads * (s.rank + s.rope_dim);
    check_shape(q_len.is_multiple_of(q_row), OP, || {
        format!("q has {q_len} elements, not a multiple of heads x (rank + rope_dim) = {q_row}")
    })?;
    let tokens = q_len / q_row;
    check_shape(out_len == tokens * s.num_heads * s.rank, OP, || {
        format!(
            "out has {out_len} elements, expected {tokens} tokens x {} heads x {}",
            s.num_heads, s.rank
        )
    })?;
    check_shape(
        latent_len.is_multiple_of(s.rank)
            && rope_len.is_multiple_of(s.rope_dim)
            && latent_len / s.rank == rope_len / s.rope_dim,
        OP,
        || {
            format!(
                "the latent ({latent_len}) and rope ({rope_len}) caches do not hold the same slots"
            )
        },
    )?;
    Ok((tokens, latent_len / s.rank / s.block_size))
}

/// Tokens of a call, or why the buffers and metadata don't fit `shape` (as
/// [`crate::paged_attention::paged_attention_shape`]).
pub fn mla_shape(
    shape: &MlaShape,
    q_len: usize,
    latent_len: usize,
    rope_len: usize,
    out_len: usize,
    batch: &PagedAttentionBatch<'_>,
) -> Result<usize, KernelError> {
    let (tokens, blocks) = mla_dims(shape, q_len, latent_len, rope_len, out_len)?;
    let extent: BatchExtent = paged_batch_extent(batch, shape.block_size, shape.max_blocks)?;
    check_extent(&extent, tokens, blocks)?;
    Ok(tokens)
}

/// CPU reference: `out[t, h] = softmax_p(scale · (q_lat[t, h]·c[p] + q_rope[t, h]·k_r[p])) · c[p]`
/// over the `token_ctx[t]` positions `p` of token `t`'s sequence.
#[allow(clippy::too_many_arguments)]
pub fn mla_decode<T: Element>(
    out: &mut [T],
    q: &[T],
    latent_cache: &[T],
    rope_cache: &[T],
    batch: &PagedAttentionBatch<'_>,
    scale: f32,
    shape: &MlaShape,
) -> Result<(), KernelError> {
    each_head(
        out,
        q,
        latent_cache,
        rope_cache,
        batch,
        scale,
        shape,
        attend,
    )
}

/// How many splits the CUDA kernel cuts each context of a call into: the rule of
/// [`crate::paged_attention::paged_attention_splits`], for `tokens` tokens of `shape`.
pub fn mla_decode_splits(shape: &MlaShape, tokens: usize, sm_count: usize) -> usize {
    splits_for(
        tokens * shape.num_heads,
        shape.max_blocks * shape.block_size,
        sm_count,
    )
}

/// The split form of [`mla_decode`] the CUDA kernel takes over long contexts with few (token,
/// head) pairs ([`split_attend`]). Equal to [`mla_decode`] up to f32 rounding.
#[allow(clippy::too_many_arguments)]
pub fn mla_decode_split<T: Element>(
    out: &mut [T],
    q: &[T],
    latent_cache: &[T],
    rope_cache: &[T],
    batch: &PagedAttentionBatch<'_>,
    scale: f32,
    shape: &MlaShape,
    splits: usize,
) -> Result<(), KernelError> {
    check_splits("mla_decode", splits)?;
    each_head(
        out,
        q,
        latent_cache,
        rope_cache,
        batch,
        scale,
        shape,
        |ctx, score, value, row| split_attend(ctx, splits, score, value, row),
    )
}

/// Checks a call and fills each (token, head)'s row of `out` with `row_of(ctx, score, value,
/// row)`: `score(p)` is position p's scaled latent and rope score, `value(p, d)` its latent's
/// dim d.
#[allow(clippy::too_many_arguments)]
fn each_head<T: Element>(
    out: &mut [T],
    q: &[T],
    latent_cache: &[T],
    rope_cache: &[T],
    batch: &PagedAttentionBatch<'_>,
    scale: f32,
    shape: &MlaShape,
    mut row_of: impl FnMut(usize, &dyn Fn(usize) -> f32, &dyn Fn(usize, usize) -> f32, &mut [f32]),
) -> Result<(), KernelError> {
    let s = *shape;
    let tokens = mla_shape(
        &s,
        q.len(),
        latent_cache.len(),
        rope_cache.len(),
        out.len(),
        batch,
    )?;
    let q_dim = s.rank + s.rope_dim;
    let dot =
        |a: &[T], b: &[T]| -> f32 { a.iter().zip(b).map(|(x, y)| x.to_f32() * y.to_f32()).sum() };
    let mut row = vec![0f32; s.rank];
    for t in 0..tokens {
        let (seq, ctx) = (batch.token_seq[t] as usize, batch.token_ctx[t] as usize);
        let table = &batch.block_tables[seq * s.max_blocks..];
        let slot = |p: usize| table[p / s.block_size] as usize * s.block_size + p % s.block_size;
        for h in 0..s.num_heads {
            let q_row = &q[(t * s.num_heads + h) * q_dim..][..q_dim];
            let (q_lat, q_rope) = q_row.split_at(s.rank);
            let score = |p: usize| {
                let c = &latent_cache[slot(p) * s.rank..][..s.rank];
                let r = &rope_cache[slot(p) * s.rope_dim..][..s.rope_dim];
                (dot(q_lat, c) + dot(q_rope, r)) * scale
            };
            let value = |p: usize, d: usize| latent_cache[slot(p) * s.rank + d].to_f32();
            row_of(ctx, &score, &value, &mut row);
            for (o, r) in out[(t * s.num_heads + h) * s.rank..][..s.rank]
                .iter_mut()
                .zip(&row)
            {
                *o = T::from_f32(*r);
            }
        }
    }
    Ok(())
}

/// The launchers: [`mla_decode`] and [`mla_decode_split`] on the GPU.
#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{CudaSlice, CudaView};

    use super::{mla_decode_splits, mla_dims, MlaShape};
    use crate::cuda::{int32, CudaElement, CudaKernels, DevicePagedBatch};
    use crate::paged_attention::cuda::AttentionCall;
    use crate::paged_attention::{check_extent, check_splits};
    use crate::KernelError;

    /// Threads per block of `kernels/mla_decode.cu` (its `MLA_THREADS`).
    const MLA_THREADS: u32 = 128;

    impl CudaKernels {
        /// [`crate::mla_decode::mla_decode`] on the GPU, over metadata
        /// [`CudaKernels::upload_paged_batch`] checked and copied (its extent checked here against
        /// these caches).
        #[allow(clippy::too_many_arguments)]
        pub fn mla_decode<T: CudaElement>(
            &self,
            out: &mut CudaSlice<T>,
            q: &CudaView<T>,
            latent_cache: &CudaView<T>,
            rope_cache: &CudaView<T>,
            batch: &DevicePagedBatch,
            scale: f32,
            shape: &MlaShape,
        ) -> Result<(), KernelError> {
            let tokens = q.len() / (shape.num_heads * (shape.rank + shape.rope_dim)).max(1);
            let splits = mla_decode_splits(shape, tokens, self.sm_count);
            let inputs = [q, latent_cache, rope_cache];
            self.mla_decode_with_splits(out, inputs, batch, scale, shape, splits)
        }

        /// [`Self::mla_decode`] with each context cut into `splits` runs (1: not split; see
        /// [`crate::mla_decode::mla_decode_split`]), which it picks itself by
        /// [`mla_decode_splits`]; `inputs` are q and the latent and rope caches, in that order.
        pub fn mla_decode_with_splits<T: CudaElement>(
            &self,
            out: &mut CudaSlice<T>,
            inputs: [&CudaView<T>; 3],
            batch: &DevicePagedBatch,
            scale: f32,
            shape: &MlaShape,
            splits: usize,
        ) -> Result<(), KernelError> {
            const OP: &str = "mla_decode";
            check_splits(OP, splits)?;
            let s = shape;
            batch.check_made_for(OP, s.block_size, s.max_blocks)?;
            let [q, latent_cache, rope_cache] = inputs;
            let (tokens, blocks_in_cache) = mla_dims(
                shape,
                q.len(),
                latent_cache.len(),
                rope_cache.len(),
                out.len(),
            )?;
            check_extent(&batch.extent(), tokens, blocks_in_cache)?;
            if tokens == 0 {
                return Ok(());
            }
            let int = |what: &str, v: usize| int32(OP, what, v);
            let args = [
                int("num_heads", s.num_heads)?,
                int("rank", s.rank)?,
                int("rope_dim", s.rope_dim)?,
                int("block_size", s.block_size)?,
                int("max_blocks", s.max_blocks)?,
            ];
            // q, the tile's weights and slots, and one float per warp.
            let shared =
                (s.rank + s.rope_dim + 2 * MLA_THREADS as usize + MLA_THREADS as usize / 32) * 4;
            let call = AttentionCall {
                op: OP,
                module: &self.mla_decode,
                tokens,
                num_heads: s.num_heads,
                v_dim: s.rank,
                threads: MLA_THREADS,
                shared,
                splits,
            };
            // SAFETY: mla_decode_<T> and its _split/_merge kernels in kernels/mla_decode.cu take
            // the arguments launch_attention passes, with these five ints (num_heads, rank,
            // rope_dim, block_size, max_blocks); the metadata was checked when uploaded and its
            // extent here against these caches, and mla_dims bounds q, out and every cache row.
            unsafe { self.launch_attention(&call, out, inputs, batch, scale, &args) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The split form equals the reference: contexts of 1 to several tiles, 1 to 32 splits.
    #[test]
    fn the_split_form_equals_the_reference() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let shape = MlaShape {
            num_heads: 3,
            rank: 16,
            rope_dim: 4,
            block_size: 8,
            max_blocks: 80,
        };
        let ctxs = [1usize, 9, 128, 257, 600];
        let pool = 90usize;
        let slots = pool * shape.block_size;
        let mut random =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let q = random(ctxs.len() * shape.num_heads * (shape.rank + shape.rope_dim));
        let latent = random(slots * shape.rank);
        let rope = random(slots * shape.rope_dim);
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
        let n = ctxs.len() * shape.num_heads * shape.rank;
        let mut want = vec![0f32; n];
        mla_decode(&mut want, &q, &latent, &rope, &batch, 0.3, &shape).unwrap();
        for splits in [1usize, 2, 5, 32] {
            let mut got = vec![0f32; n];
            mla_decode_split(&mut got, &q, &latent, &rope, &batch, 0.3, &shape, splits).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs() + 1e-6,
                    "{splits} splits [{i}]: {g} vs {w}"
                );
            }
        }
        let mut out = vec![0f32; n];
        assert!(mla_decode_split(&mut out, &q, &latent, &rope, &batch, 0.3, &shape, 0).is_err());
    }

    #[test]
    fn one_position_returns_its_latent_and_two_weigh_by_their_scores() {
        let shape = MlaShape {
            num_heads: 1,
            rank: 2,
            rope_dim: 1,
            block_size: 2,
            max_blocks: 1,
        };
        // Slots 0 and 1: latents [1 0] and [0 1], rope keys 0 and ln 3 (with q_rope 1).
        let latent = [1.0f32, 0.0, 0.0, 1.0];
        let rope = [0.0f32, 3f32.ln()];
        let q = [0.0f32, 0.0, 1.0];
        let run = |ctx: u32| {
            let batch = PagedAttentionBatch {
                block_tables: &[0],
                token_seq: &[0],
                token_ctx: &[ctx],
            };
            let mut out = [0f32; 2];
            mla_decode(&mut out, &q, &latent, &rope, &batch, 1.0, &shape).unwrap();
            out
        };
        assert_eq!(run(1), [1.0, 0.0]);
        let two = run(2);
        assert!(
            (two[0] - 0.25).abs() < 1e-6 && (two[1] - 0.75).abs() < 1e-6,
            "{two:?}"
        );
        let batch = PagedAttentionBatch {
            block_tables: &[1],
            token_seq: &[0],
            token_ctx: &[1],
        };
        let mut out = [0f32; 2];
        let err = mla_decode(&mut out, &q, &latent, &rope, &batch, 1.0, &shape).unwrap_err();
        assert!(
            err.to_string().contains("reads block 1; the cache holds 1"),
            "{err}"
        );
    }
}
