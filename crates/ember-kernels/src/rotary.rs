//! Rotary position embedding over a flattened batch: each token's heads rotated by the cos/sin row
//! of its own position, from tables `[max_positions, head_dim / 2]` (plain, linear and YaRN
//! frequencies all live in the tables; YaRN's attention factor is folded into them), as
//! `ember_models::rope` builds them.
//!
//! Layouts: rotate-half (Qwen3: pairs `(x[i], x[i + half])`) or interleaved input (DeepSeek's
//! `rope_interleave`: pairs `(x[2i], x[2i + 1])`), whose output is written in rotate-half layout, as
//! transformers' `apply_rotary_pos_emb_interleave` returns it. So the op is out of place.
//!
//! Numerics, shared by the CPU reference and `kernels/rotary.cu`: load as f32,
//! `a' = a * cos - b * sin`, `b' = b * cos + a * sin` in f32 (no fused multiply-add on either side),
//! one rounding to the storage dtype on store.

use crate::error::check_shape;
use crate::{Element, KernelError};

/// The shape of one rotary call: `x` and `out` are `[tokens, heads, head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotaryShape {
    /// Heads per token.
    pub heads: usize,
    /// Rotated dims per head (even); the tables hold `head_dim / 2` columns.
    pub head_dim: usize,
    /// Whether the input pairs are interleaved (`x[2i], x[2i + 1]`) rather than rotate-half.
    pub interleaved: bool,
}

/// Tokens of a rotary call, or why the buffers do not fit `shape`: `x`/`out` must be
/// `[positions.len(), heads, head_dim]`, the tables `[rows, head_dim / 2]`, and every position a
/// row of the tables.
pub fn rotary_shape(
    shape: &RotaryShape,
    x_len: usize,
    positions: &[u32],
    table_len: usize,
    out_len: usize,
) -> Result<usize, KernelError> {
    const OP: &str = "rotary_embedding";
    let RotaryShape {
        heads, head_dim, ..
    } = *shape;
    check_shape(
        heads > 0 && head_dim > 0 && head_dim.is_multiple_of(2),
        OP,
        || format!("heads = {heads} and head_dim = {head_dim} must be positive, head_dim even"),
    )?;
    let tokens = positions.len();
    check_shape(x_len == tokens * heads * head_dim, OP, || {
        format!("x has {x_len} elements, expected {tokens} tokens x {heads} heads x {head_dim}")
    })?;
    check_shape(out_len == x_len, OP, || {
        format!("out has {out_len} elements, x has {x_len}")
    })?;
    let half = head_dim / 2;
    check_shape(table_len.is_multiple_of(half), OP, || {
        format!("the cos/sin tables have {table_len} elements, not rows of {half}")
    })?;
    let rows = table_len / half;
    if let Some((i, &p)) = positions
        .iter()
        .enumerate()
        .find(|&(_, &p)| p as usize >= rows)
    {
        return Err(KernelError::Shape {
            op: OP,
            message: format!("token {i} has position {p}, past the tables' {rows} rows"),
        });
    }
    Ok(tokens)
}

/// Tokens of a call of [`rotary_embedding_rows`], or why the buffers do not fit `shape`: `x`/`out`
/// `[tokens, heads, head_dim]` and the step's rows `cos`/`sin` `[tokens, head_dim / 2]`.
pub fn rotary_rows_shape(
    shape: &RotaryShape,
    x_len: usize,
    cos_len: usize,
    sin_len: usize,
    out_len: usize,
) -> Result<usize, KernelError> {
    const OP: &str = "rotary_embedding_rows";
    check_shape(
        shape.heads > 0 && shape.head_dim > 0 && shape.head_dim.is_multiple_of(2),
        OP,
        || format!("{shape:?}: heads and head_dim must be positive, head_dim even"),
    )?;
    let token_len = shape.heads * shape.head_dim;
    check_shape(
        x_len.is_multiple_of(token_len) && out_len == x_len,
        OP,
        || format!("x has {x_len} and out {out_len} elements, not whole tokens of {token_len}"),
    )?;
    let tokens = x_len / token_len;
    let half = shape.head_dim / 2;
    check_shape(cos_len == tokens * half && sin_len == cos_len, OP, || {
        format!("cos ({cos_len}) and sin ({sin_len}) must hold {tokens} rows of {half}")
    })?;
    Ok(tokens)
}

/// CPU reference of the step-rows form: token `t` rotated by row `t` of `cos`/`sin`, the rows
/// already gathered by position (as [`rotary_embedding`] with positions `0, 1, …`).
pub fn rotary_embedding_rows<T: Element>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    shape: &RotaryShape,
    out: &mut [T],
) -> Result<(), KernelError> {
    let tokens = rotary_rows_shape(shape, x.len(), cos.len(), sin.len(), out.len())?;
    let identity: Vec<u32> = (0..tokens as u32).collect();
    rotary_embedding(x, &identity, cos, sin, shape, out)
}

/// CPU reference: rotates every head of token `t` of `x` by row `positions[t]` of `cos`/`sin`.
pub fn rotary_embedding<T: Element>(
    x: &[T],
    positions: &[u32],
    cos: &[T],
    sin: &[T],
    shape: &RotaryShape,
    out: &mut [T],
) -> Result<(), KernelError> {
    check_shape(cos.len() == sin.len(), "rotary_embedding", || {
        format!("cos has {} elements, sin {}", cos.len(), sin.len())
    })?;
    rotary_shape(shape, x.len(), positions, cos.len(), out.len())?;
    let (head_dim, half) = (shape.head_dim, shape.head_dim / 2);
    let token_len = shape.heads * head_dim;
    for ((x, out), &pos) in x
        .chunks_exact(token_len)
        .zip(out.chunks_exact_mut(token_len))
        .zip(positions)
    {
        let row = pos as usize * half;
        let (cos, sin) = (&cos[row..row + half], &sin[row..row + half]);
        for (x, out) in x.chunks_exact(head_dim).zip(out.chunks_exact_mut(head_dim)) {
            for i in 0..half {
                let (a, b) = if shape.interleaved {
                    (x[2 * i].to_f32(), x[2 * i + 1].to_f32())
                } else {
                    (x[i].to_f32(), x[i + half].to_f32())
                };
                let (c, s) = (cos[i].to_f32(), sin[i].to_f32());
                out[i] = T::from_f32(a * c - b * s);
                out[i + half] = T::from_f32(b * c + a * s);
            }
        }
    }
    Ok(())
}

/// The launchers: [`rotary_embedding`] and [`rotary_embedding_rows`] on the GPU.
#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{CudaSlice, CudaView, PushKernelArg};

    use super::{rotary_rows_shape, rotary_shape, RotaryShape};
    use crate::cuda::{block_per_row, int32, kernel, CudaElement, CudaKernels};
    use crate::error::check_shape;
    use crate::KernelError;

    impl CudaKernels {
        /// [`crate::rotary::rotary_embedding`] on the GPU. `positions` stays on the host: it is
        /// checked against the tables there (every row the kernel reads exists), then copied over.
        #[allow(clippy::too_many_arguments)]
        pub fn rotary_embedding<T: CudaElement>(
            &self,
            x: &CudaView<T>,
            positions: &[u32],
            cos: &CudaView<T>,
            sin: &CudaView<T>,
            shape: &RotaryShape,
            out: &mut CudaSlice<T>,
        ) -> Result<(), KernelError> {
            check_shape(cos.len() == sin.len(), "rotary_embedding", || {
                format!("cos has {} elements, sin {}", cos.len(), sin.len())
            })?;
            let tokens = rotary_shape(shape, x.len(), positions, cos.len(), out.len())?;
            if tokens == 0 {
                return Ok(());
            }
            let positions = self.stream.clone_htod(positions)?;
            self.launch_rotary(x, Some(&positions), cos, sin, shape, tokens, out)
        }

        /// [`crate::rotary::rotary_embedding_rows`] on the GPU: token `t` rotated by row `t` of
        /// `cos`/`sin` (the step's rows, gathered once), so no positions are copied.
        pub fn rotary_embedding_rows<T: CudaElement>(
            &self,
            x: &CudaView<T>,
            cos: &CudaView<T>,
            sin: &CudaView<T>,
            shape: &RotaryShape,
            out: &mut CudaSlice<T>,
        ) -> Result<(), KernelError> {
            let tokens = rotary_rows_shape(shape, x.len(), cos.len(), sin.len(), out.len())?;
            if tokens == 0 {
                return Ok(());
            }
            self.launch_rotary(x, None, cos, sin, shape, tokens, out)
        }

        /// Launches `rotary_embedding_<T>` (with positions) or `rotary_embedding_rows_<T>`
        /// (without) over `tokens` tokens whose buffers the caller checked.
        #[allow(clippy::too_many_arguments)]
        fn launch_rotary<T: CudaElement>(
            &self,
            x: &CudaView<T>,
            positions: Option<&CudaSlice<u32>>,
            cos: &CudaView<T>,
            sin: &CudaView<T>,
            shape: &RotaryShape,
            tokens: usize,
            out: &mut CudaSlice<T>,
        ) -> Result<(), KernelError> {
            let op = "rotary_embedding";
            let pairs = shape.heads * shape.head_dim / 2;
            let threads = pairs.next_multiple_of(32).clamp(32, 256) as u32;
            let cfg = block_per_row(op, "tokens", tokens, threads)?;
            let heads = int32(op, "heads", shape.heads)?;
            let head_dim = int32(op, "head_dim", shape.head_dim)?;
            int32(op, "heads x head_dim", shape.heads * shape.head_dim)?;
            let interleaved = i32::from(shape.interleaved);
            let name = if positions.is_some() {
                op
            } else {
                "rotary_embedding_rows"
            };
            let f = kernel(&self.rotary, name, T::KERNEL_SUFFIX)?;
            let mut launch = self.stream.launch_builder(&f);
            launch.arg(out).arg(x);
            if let Some(positions) = positions {
                launch.arg(positions);
            }
            launch
                .arg(cos)
                .arg(sin)
                .arg(&heads)
                .arg(&head_dim)
                .arg(&interleaved);
            // SAFETY: matches rotary_embedding_<T>(T*, const T*, const unsigned*, const T*, const
            // T*, int, int, int) and rotary_embedding_rows_<T>(the same without positions) in
            // kernels/rotary.cu; rotary_shape / rotary_rows_shape bound every x, out and table
            // index.
            unsafe { launch.launch(cfg) }?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_each_token_by_its_own_position() {
        // One head of 4 dims, tables for 3 positions with angles 0, pi/2 (first pair) and pi.
        let half = 2;
        let angles = [
            [0.0f32, 0.0],
            [std::f32::consts::FRAC_PI_2, 0.0],
            [std::f32::consts::PI, 0.0],
        ];
        let cos: Vec<f32> = angles.iter().flatten().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().flatten().map(|a| a.sin()).collect();
        let shape = RotaryShape {
            heads: 1,
            head_dim: 2 * half,
            interleaved: false,
        };
        let x = [1.0f32, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0];
        let mut out = [0.0f32; 8];
        rotary_embedding(&x, &[0, 1], &cos, &sin, &shape, &mut out).unwrap();
        // Position 0: unchanged. Position 1: pair (1, 3) by pi/2 -> (-3, 1); pair (2, 4) by 0.
        let expected = [1.0, 2.0, 3.0, 4.0, -3.0, 2.0, 1.0, 4.0];
        for (o, e) in out.iter().zip(expected) {
            assert!((o - e).abs() < 1e-6, "{out:?} vs {expected:?}");
        }
    }

    #[test]
    fn interleaved_pairs_come_out_in_rotate_half_layout() {
        let shape = RotaryShape {
            heads: 1,
            head_dim: 4,
            interleaved: true,
        };
        let (cos, sin) = ([0.0f32, 1.0], [1.0f32, 0.0]); // first pair by pi/2, second by 0
        let x = [1.0f32, 3.0, 2.0, 4.0]; // pairs (1, 3) and (2, 4)
        let mut out = [0.0f32; 4];
        rotary_embedding(&x, &[0], &cos, &sin, &shape, &mut out).unwrap();
        assert_eq!(out, [-3.0, 2.0, 1.0, 4.0]);
    }

    #[test]
    fn refuses_a_position_past_the_tables() {
        let shape = RotaryShape {
            heads: 2,
            head_dim: 4,
            interleaved: false,
        };
        let mut out = [0.0f32; 16];
        let err = rotary_embedding(&[0.5; 16], &[0, 3], &[1.0; 6], &[0.0; 6], &shape, &mut out)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("token 1 has position 3, past the tables' 3 rows"),
            "{err}"
        );
    }

    #[test]
    fn refuses_an_odd_head_dim_and_a_wrong_x() {
        let odd = RotaryShape {
            heads: 1,
            head_dim: 3,
            interleaved: false,
        };
        assert!(rotary_shape(&odd, 3, &[0], 3, 3).is_err());
        let shape = RotaryShape {
            heads: 2,
            head_dim: 4,
            interleaved: false,
        };
        let err = rotary_shape(&shape, 12, &[0, 1], 8, 12).unwrap_err();
        assert!(
            err.to_string().contains("expected 2 tokens x 2 heads x 4"),
            "{err}"
        );
    }
}
