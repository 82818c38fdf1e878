//! Causal attention of one sequence's prefill chunk over keys and values laid out contiguously
//! (MLA's prefill: the latent cache expanded into per-head keys and values): token `i` of the
//! chunk, at position `past + i` with `past = kv_len - q_len`, attends to keys `0..=past + i`.
//!
//! Layouts (row-major): `q` `[q_len, heads, dqk]`, `k` `[kv_len, heads, dqk]`, `v` `[kv_len,
//! heads, dv]`, `out` `[q_len, heads, dv]`.
//!
//! Numerics: the reference computes each score `scale · q·k` in f32, a max-subtracted softmax
//! in f32 and the weighted sum of values in f32, with one rounding to the storage dtype on store.
//! `kernels/prefill_attention.cu` (bf16 only, on tensor cores) accumulates in f32 in another order
//! under an online softmax and rounds each tile's probabilities to bf16 before multiplying the
//! values, so it agrees to about 2^-8 of the values' magnitude.

use crate::error::check_shape;
use crate::{Element, KernelError};

/// The sizes of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillShape {
    pub q_len: usize,
    pub kv_len: usize,
    pub heads: usize,
    /// Query and key width per head.
    pub dqk: usize,
    /// Value width per head.
    pub dv: usize,
}

/// Widest keys and values the CUDA kernel takes (its register tiles); the reference takes any.
pub const MAX_DQK: usize = 192;
pub const MAX_DV: usize = 128;

/// Checks the buffers of a call against `shape`.
pub fn prefill_shape(
    shape: &PrefillShape,
    q_len: usize,
    k_len: usize,
    v_len: usize,
    out_len: usize,
) -> Result<(), KernelError> {
    const OP: &str = "prefill_attention";
    let s = shape;
    check_shape(
        s.heads > 0 && s.dqk > 0 && s.dv > 0 && s.q_len <= s.kv_len,
        OP,
        || format!("{s:?}: sizes must be positive and the chunk within its context"),
    )?;
    for (what, len, want) in [
        ("q", q_len, s.q_len * s.heads * s.dqk),
        ("k", k_len, s.kv_len * s.heads * s.dqk),
        ("v", v_len, s.kv_len * s.heads * s.dv),
        ("out", out_len, s.q_len * s.heads * s.dv),
    ] {
        check_shape(len == want, OP, || {
            format!("{what} has {len} elements, expected {want} for {s:?}")
        })?;
    }
    Ok(())
}

/// CPU reference.
pub fn prefill_attention<T: Element>(
    out: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    shape: &PrefillShape,
    scale: f32,
) -> Result<(), KernelError> {
    let s = *shape;
    prefill_shape(&s, q.len(), k.len(), v.len(), out.len())?;
    let past = s.kv_len - s.q_len;
    let mut scores = Vec::with_capacity(s.kv_len);
    let mut acc = vec![0f32; s.dv];
    for i in 0..s.q_len {
        let seen = past + i + 1;
        for h in 0..s.heads {
            let qr = &q[(i * s.heads + h) * s.dqk..][..s.dqk];
            scores.clear();
            scores.extend((0..seen).map(|j| {
                let kr = &k[(j * s.heads + h) * s.dqk..][..s.dqk];
                scale
                    * qr.iter()
                        .zip(kr)
                        .map(|(a, b)| a.to_f32() * b.to_f32())
                        .sum::<f32>()
            }));
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0f32;
            for p in scores.iter_mut() {
                *p = (*p - max).exp();
                total += *p;
            }
            acc.iter_mut().for_each(|a| *a = 0.0);
            for (j, p) in scores.iter().enumerate() {
                let vr = &v[(j * s.heads + h) * s.dv..][..s.dv];
                for (a, x) in acc.iter_mut().zip(vr) {
                    *a += p * x.to_f32();
                }
            }
            let o = &mut out[(i * s.heads + h) * s.dv..][..s.dv];
            for (o, a) in o.iter_mut().zip(&acc) {
                *o = T::from_f32(a / total);
            }
        }
    }
    Ok(())
}

/// The launcher: [`prefill_attention`] on the GPU.
#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{CudaSlice, CudaView, PushKernelArg};

    use super::{prefill_shape, PrefillShape, MAX_DQK, MAX_DV};
    use crate::cuda::{grid_launch, grid_y_blocks, int32, kernel, CudaElement, CudaKernels};
    use crate::error::check_shape;
    use crate::KernelError;

    /// Query rows per block of `kernels/prefill_attention.cu` (its `PF_BM`).
    const PREFILL_ROWS: usize = 64;

    impl CudaKernels {
        /// [`crate::prefill_attention::prefill_attention`] on the GPU, on bf16 tensor cores (bf16
        /// only; keys up to [`crate::prefill_attention::MAX_DQK`] wide, values up to `MAX_DV`).
        pub fn prefill_attention<T: CudaElement>(
            &self,
            out: &mut CudaSlice<T>,
            q: &CudaView<T>,
            k: &CudaView<T>,
            v: &CudaView<T>,
            shape: &PrefillShape,
            scale: f32,
        ) -> Result<(), KernelError> {
            const OP: &str = "prefill_attention";
            let s = shape;
            check_shape(T::KERNEL_SUFFIX == "bf16", OP, || {
                "bf16 inputs (tensor cores)".into()
            })?;
            check_shape(s.dqk <= MAX_DQK && s.dv <= MAX_DV, OP, || {
                format!(
                    "heads of {} and {} are over the kernel's {MAX_DQK} and {MAX_DV}",
                    s.dqk, s.dv
                )
            })?;
            prefill_shape(s, q.len(), k.len(), v.len(), out.len())?;
            if s.q_len == 0 {
                return Ok(());
            }
            let ints = [
                int32(OP, "q_len", s.q_len)?,
                int32(OP, "kv_len", s.kv_len)?,
                int32(OP, "heads", s.heads)?,
                int32(OP, "dqk", s.dqk)?,
                int32(OP, "dv", s.dv)?,
            ];
            let blocks_y = grid_y_blocks(OP, "heads", s.heads, 1)?;
            let cfg = grid_launch((s.q_len.div_ceil(PREFILL_ROWS) as u32, blocks_y), 128);
            let f = kernel(&self.prefill_attention, OP, T::KERNEL_SUFFIX)?;
            let mut launch = self.stream.launch_builder(&f);
            launch.arg(out).arg(q).arg(k).arg(v);
            for a in &ints {
                launch.arg(a);
            }
            launch.arg(&scale);
            // SAFETY: matches prefill_attention_bf16(bf16*, const bf16* x 3, int x 5, float) in
            // kernels/prefill_attention.cu (T is bf16, checked); it reads q rows < q_len and k, v
            // rows < kv_len and writes out rows < q_len, within the lengths checked above.
            unsafe { launch.launch(cfg) }?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One head: the first token sees only itself, the last all three; a chunk after one cached
    /// token sees it too.
    #[test]
    fn each_token_sees_the_context_before_it() {
        let shape = PrefillShape {
            q_len: 2,
            kv_len: 3,
            heads: 1,
            dqk: 1,
            dv: 1,
        };
        // Equal scores: plain means of the values seen.
        let (q, k) = ([0.0f32, 0.0], [1.0f32, 2.0, 3.0]);
        let v = [10.0f32, 20.0, 60.0];
        let mut out = [0f32; 2];
        prefill_attention(&mut out, &q, &k, &v, &shape, 1.0).unwrap();
        assert_eq!(out, [15.0, 30.0]);
        // A score of ln 3 on the last key weighs it 3 to 1 against each other.
        let q = [1.0f32, 1.0];
        let k = [0.0f32, 0.0, 3f32.ln()];
        prefill_attention(&mut out, &q, &k, &v, &shape, 1.0).unwrap();
        assert!(
            (out[1] - (10.0 + 20.0 + 3.0 * 60.0) / 5.0).abs() < 1e-4,
            "{out:?}"
        );
        assert!(prefill_attention(&mut out, &q, &k, &v[..2], &shape, 1.0).is_err());
    }
}
