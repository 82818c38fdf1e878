//! W8A16 GEMM: `y[m, n] = x[m, k] · Wᵀ` with `W` `[n, k]` held as float8 e4m3 bytes and one f32
//! scale per `block_n x block_k` block (DeepSeek-V3's and Kimi K2's 128 x 128 `weight_scale_inv`;
//! `block_n = 1, block_k = k` is one scale per output channel). Blocks at the edges may be
//! partial: `scales` is `[ceil(n / block_n), ceil(k / block_k)]`.
//!
//! Numerics, shared by the CPU reference and `kernels/w8a16.cu`: each weight is its e4m3 value
//! (exact in f32) times its block's scale, rounded once to f32, and the products are summed in
//! f32. The GPU sums in another order, so the two agree to f32 rounding of the sum (relative to
//! the sum of the terms' magnitudes), then one rounding to the storage dtype.

use crate::error::check_shape;
use crate::{Element, KernelError};

/// The dimensions of one W8A16 GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct W8a16Shape {
    /// Rows of `x` and `y` (tokens).
    pub m: usize,
    /// Outputs: rows of `W`, columns of `y`.
    pub n: usize,
    /// Inputs: columns of `x` and `W`.
    pub k: usize,
    /// Rows of `W` per scale block.
    pub block_n: usize,
    /// Columns of `W` per scale block.
    pub block_k: usize,
}

impl W8a16Shape {
    /// Elements of `scales`.
    pub fn scale_len(&self) -> usize {
        self.n.div_ceil(self.block_n.max(1)) * self.k.div_ceil(self.block_k.max(1))
    }
}

/// Checks the buffers of a call against `shape`.
pub fn w8a16_shape(
    shape: &W8a16Shape,
    x_len: usize,
    w_len: usize,
    scales_len: usize,
    y_len: usize,
) -> Result<(), KernelError> {
    let W8a16Shape {
        m,
        n,
        k,
        block_n,
        block_k,
    } = *shape;
    let op = "w8a16_gemm";
    check_shape(block_n > 0 && block_k > 0, op, || {
        format!("blocks must be at least 1 x 1, got {block_n} x {block_k}")
    })?;
    for (what, len, want) in [
        ("x", x_len, m * k),
        ("w", w_len, n * k),
        ("scales", scales_len, shape.scale_len()),
        ("y", y_len, m * n),
    ] {
        check_shape(len == want, op, || {
            format!("{what} has {len} elements, expected {want} for m {m}, n {n}, k {k}, blocks {block_n} x {block_k}")
        })?;
    }
    Ok(())
}

/// float8 e4m3 (the `fn` variant: no infinities, `S.1111.111` is NaN) to f32, exactly.
pub fn e4m3_to_f32(byte: u8) -> f32 {
    if byte & 0x7F == 0x7F {
        return f32::NAN;
    }
    e4m3_bits(byte) * E4M3_REBIAS
}

/// 2^120: an e4m3 byte's bits placed in an f32 (see [`e4m3_bits`]) times this are its value.
pub(crate) const E4M3_REBIAS: f32 = f32::from_bits((127 + 120) << 23);

/// An e4m3 byte's sign, exponent and mantissa placed in an f32's fields as they are (the
/// exponent not rebiased): its value times 2^-120, exactly, subnormals included. NaN codes
/// read as 480 · 2^-120.
#[inline(always)]
pub(crate) fn e4m3_bits(byte: u8) -> f32 {
    f32::from_bits(((i32::from(byte as i8) << 20) as u32) & 0x87F0_0000)
}

/// The weight `W[j, c]` of `w` and `scales`.
pub fn weight(w: &[u8], scales: &[f32], shape: &W8a16Shape, j: usize, c: usize) -> f32 {
    let scale_cols = shape.k.div_ceil(shape.block_k);
    e4m3_to_f32(w[j * shape.k + c]) * scales[(j / shape.block_n) * scale_cols + c / shape.block_k]
}

/// CPU reference of `w8a16_dequant`: `W` `[n, k]` itself in `T` (each weight rounded once), for
/// batches too large for the GEMV, which then run a dense GEMM on it. `shape.m` is ignored.
pub fn dequantize<T: Element>(
    w: &[u8],
    scales: &[f32],
    shape: &W8a16Shape,
    out: &mut [T],
) -> Result<(), KernelError> {
    let (n, k) = (shape.n, shape.k);
    w8a16_shape(&W8a16Shape { m: 0, ..*shape }, 0, w.len(), scales.len(), 0)?;
    check_shape(out.len() == n * k, "w8a16_dequant", || {
        format!("out has {} elements, expected {n} x {k}", out.len())
    })?;
    crate::weight_gemm::dequantize_into(k, |j, c| weight(w, scales, shape, j, c), out);
    Ok(())
}

/// CPU reference: `y[r, j] = Σ_c x[r, c] · W[j, c]`, summed in f32 in input order.
pub fn w8a16_gemm<T: Element>(
    x: &[T],
    w: &[u8],
    scales: &[f32],
    shape: &W8a16Shape,
    y: &mut [T],
) -> Result<(), KernelError> {
    w8a16_shape(shape, x.len(), w.len(), scales.len(), y.len())?;
    let dims = [shape.m, shape.n, shape.k];
    crate::weight_gemm::gemm(x, dims, |j, c| weight(w, scales, shape, j, c), y);
    Ok(())
}

/// The launchers: [`w8a16_gemm`] and [`dequantize`] on the GPU.
#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{CudaSlice, CudaView, DeviceRepr};

    use super::{w8a16_shape, W8a16Shape};
    use crate::cuda::{check_e4m3_bytes, elementwise_launch, int32, CudaElement, CudaKernels};
    use crate::weight_gemm::{check_dequant_out, gemv_launch};
    use crate::KernelError;

    impl CudaKernels {
        /// [`crate::w8a16::w8a16_gemm`] on the GPU, over e4m3 weights as any one-byte element
        /// (`float8::F8E4M3` from candle, or raw `u8`).
        pub fn w8a16_gemm<T: CudaElement, P: DeviceRepr>(
            &self,
            x: &CudaView<T>,
            w: &CudaView<P>,
            scales: &CudaView<f32>,
            shape: &W8a16Shape,
            y: &mut CudaSlice<T>,
        ) -> Result<(), KernelError> {
            let op = "w8a16_gemm";
            check_e4m3_bytes::<P>(op)?;
            w8a16_shape(shape, x.len(), w.len(), scales.len(), y.len())?;
            if shape.m == 0 || shape.n == 0 {
                return Ok(());
            }
            let m = int32(op, "m", shape.m)?;
            let ints = weight_ints(op, shape)?;
            let cfg = gemv_launch(op, shape.m, shape.n)?;
            let module = &self.w8a16;
            // SAFETY: w8a16_gemm_<T>(T*, const T*, const u8*, const float*, int, int, int, int,
            // int) in kernels/w8a16.cu (its W8A16_WARPS and W8A16_ROWS equal W4A16's) takes (y, x,
            // w, scales, m, ints); the shape check bounds every index it reads, and `P` is one
            // byte.
            unsafe { self.launch_weight_kernel(module, op, cfg, y, Some((x, m)), w, scales, &ints) }
        }

        /// [`crate::w8a16::dequantize`] on the GPU, over e4m3 weights as any one-byte element.
        pub fn w8a16_dequant<T: CudaElement, P: DeviceRepr>(
            &self,
            w: &CudaView<P>,
            scales: &CudaView<f32>,
            shape: &W8a16Shape,
            out: &mut CudaSlice<T>,
        ) -> Result<(), KernelError> {
            let op = "w8a16_dequant";
            check_e4m3_bytes::<P>(op)?;
            w8a16_shape(&W8a16Shape { m: 0, ..*shape }, 0, w.len(), scales.len(), 0)?;
            check_dequant_out(op, out.len(), shape.n, shape.k)?;
            if out.is_empty() {
                return Ok(());
            }
            let ints = weight_ints(op, shape)?;
            let cfg = elementwise_launch((shape.n * shape.k) as i64);
            let module = &self.w8a16;
            // SAFETY: w8a16_dequant_<T>(T*, const u8*, const float*, int, int, int, int) in
            // kernels/w8a16.cu takes (out, w, scales, ints); the shape check bounds every index it
            // touches, and `P` is one byte.
            unsafe { self.launch_weight_kernel(module, op, cfg, out, None, w, scales, &ints) }
        }
    }

    /// The weights' int arguments both kernels take after their buffers (and `m`): n, k,
    /// block_n, block_k.
    fn weight_ints(op: &'static str, shape: &W8a16Shape) -> Result<[i32; 4], KernelError> {
        Ok([
            int32(op, "n", shape.n)?,
            int32(op, "k", shape.k)?,
            int32(op, "block_n", shape.block_n)?,
            int32(op, "block_k", shape.block_k)?,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_decodes_normals_subnormals_and_nan() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0); // exponent 7, mantissa 0
        assert_eq!(e4m3_to_f32(0x7E), 448.0); // the largest finite
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // the smallest subnormal
        assert_eq!(e4m3_to_f32(0x07), 7.0 * 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6)); // the smallest normal
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
    }

    #[test]
    fn e4m3_decodes_every_code_as_the_float8_crate_does() {
        for byte in 0..=255u8 {
            let ours = e4m3_to_f32(byte);
            let theirs = float8::F8E4M3::from_bits(byte).to_f32();
            assert!(
                ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
                "{byte:#04x}: {ours} vs {theirs}"
            );
        }
    }

    #[test]
    fn block_scales_apply_to_their_rows_and_columns_including_partial_edges() {
        // W [3, 3] of ones (0x38), blocks 2 x 2: scales [[1, 2], [3, 4]] (the last row and
        // column are partial blocks).
        let shape = W8a16Shape {
            m: 1,
            n: 3,
            k: 3,
            block_n: 2,
            block_k: 2,
        };
        let w = [0x38u8; 9];
        let scales = [1.0f32, 2.0, 3.0, 4.0];
        let mut y = [0.0f32; 3];
        w8a16_gemm(&[1.0f32, 1.0, 1.0], &w, &scales, &shape, &mut y).unwrap();
        assert_eq!(y, [1.0 + 1.0 + 2.0, 1.0 + 1.0 + 2.0, 3.0 + 3.0 + 4.0]);
        let e = w8a16_shape(&shape, 3, 9, 3, 3).unwrap_err().to_string();
        assert!(e.contains("scales has 3"), "{e}");
    }
}
