//! W4A16 GEMM: `y[m, n] = x[m, k] · Wᵀ` with `W` `[n, k]` held as 4-bit codes, the layout every
//! INT4 checkpoint format (compressed-tensors `pack-quantized`, GPTQ, AWQ) unpacks to:
//! - `codes` `[n, k / 2]` bytes, input `c` of a row in byte `c / 2`, the low nibble when `c` is
//!   even, unsigned 0..=15;
//! - `qparams` `[n, k / group_size, 2]` f32: each group's scale, then its zero point (a whole
//!   number), or with [`W4a16Shape::zeros`] off `[n, k / group_size]`: the scales alone, the zero
//!   point 8 (symmetric checkpoints, such as Kimi K2 Thinking's) or none (FP4);
//! - `W[j, c] = (code[j, c] - zero[j, g]) * scale[j, g]` with `g = c / group_size`, rounded to
//!   float16 when [`W4a16Shape::f16_weights`] (GPTQ and AWQ dequantize in their float16 scales'
//!   dtype; their tools' weights are those, bit for bit).
//!
//! With [`W4a16Shape::e2m1`] the codes are FP4 instead (NVFP4, MXFP4): `W[j, c] =
//! e2m1(code) * scale[j, g]`, the zero point unused; e2m1 has a sign bit (bit 3) and the
//! magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
//!
//! FP4 scales may stay in the byte their checkpoints store them in ([`W4Scales`]): then each
//! row of `codes` is its `k / 2` code bytes followed by its `k / group_size` scale bytes (an
//! e4m3 or an e8m0 each), and `qparams` `[n]` holds each row's f32 global scale. NVFP4 then
//! takes 0.5625 bytes a weight instead of 0.75.
//!
//! Numerics, shared by the CPU reference and `kernels/w4a16.cu`: each weight is dequantized in
//! f32 (exact: a small integer times the scale) and the products are summed in f32. The GPU sums
//! in another order (lanes, then a shuffle tree), so the two agree to f32 rounding of the sum
//! (relative to the sum of the terms' magnitudes), then one rounding to the storage dtype.

use crate::error::check_shape;
use crate::{Element, KernelError};

/// The dimensions of one W4A16 GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct W4a16Shape {
    /// Rows of `x` and `y` (tokens).
    pub m: usize,
    /// Outputs: rows of `W`, columns of `y`.
    pub n: usize,
    /// Inputs: columns of `x` and `W`.
    pub k: usize,
    /// Inputs per scale and zero point; even, and divides `k`.
    pub group_size: usize,
    /// Round each dequantized weight to float16 (round to nearest even) before multiplying.
    pub f16_weights: bool,
    /// The codes are e2m1 (FP4) values rather than integers less a zero point.
    pub e2m1: bool,
    /// `qparams` holds a zero point after each scale; without, the zero point is 8 (unused for
    /// e2m1) and `qparams` holds the scales alone, half the bytes.
    pub zeros: bool,
    /// Where the group scales are: f32s in `qparams`, or bytes after each row's codes.
    pub scales: W4Scales,
}

/// How a 4-bit weight's group scales are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum W4Scales {
    /// f32s in `qparams` (with or without zero points, see [`W4a16Shape::zeros`]).
    #[default]
    F32,
    /// An e4m3 byte per group after each row's codes, times the row's f32 in `qparams` (NVFP4
    /// as ModelOpt dequantizes it).
    E4m3Times,
    /// An e4m3 byte per group, divided by the row's f32 (NVFP4 as compressed-tensors does).
    E4m3Over,
    /// An e8m0 byte per group (a power of two, MXFP4), times the row's f32 (1 for MXFP4).
    Ue8m0,
}

impl W4Scales {
    /// The kernels' code for it.
    pub fn code(self) -> i32 {
        match self {
            W4Scales::F32 => 0,
            W4Scales::E4m3Times => 1,
            W4Scales::E4m3Over => 2,
            W4Scales::Ue8m0 => 3,
        }
    }

    /// Whether the scales are bytes after each row's codes.
    #[inline]
    pub fn in_bytes(self) -> bool {
        self != W4Scales::F32
    }

    /// A scale byte's value under the row's global `global`.
    #[inline]
    pub fn value(self, byte: u8, global: f32) -> f32 {
        match self {
            W4Scales::F32 => f32::from(byte),
            W4Scales::E4m3Times => crate::w8a16::e4m3_to_f32(byte) * global,
            W4Scales::E4m3Over => crate::w8a16::e4m3_to_f32(byte) / global,
            W4Scales::Ue8m0 => e8m0(byte) * global,
        }
    }
}

/// The power of two an e8m0 byte stands for (`2^(byte - 127)`; 255 is NaN).
pub fn e8m0(byte: u8) -> f32 {
    match byte {
        255 => f32::NAN,
        // 2^-127 is an f32 subnormal: built from its bits, not the exponent field.
        0 => f32::from_bits(1 << 22),
        b => f32::from_bits(u32::from(b) << 23),
    }
}

impl W4a16Shape {
    /// Bytes of one row of `codes`: its codes, and its scales when they are bytes.
    pub fn row_bytes(&self) -> usize {
        let scales = if self.scales.in_bytes() {
            self.k / self.group_size.max(1)
        } else {
            0
        };
        self.k / 2 + scales
    }

    /// Elements of `codes`.
    pub fn codes_len(&self) -> usize {
        self.n * self.row_bytes()
    }

    /// f32s of `qparams` per group: a scale and a zero point, or the scale alone.
    pub fn params_per_group(&self) -> usize {
        if self.zeros {
            2
        } else {
            1
        }
    }

    /// Elements of `qparams`: per group, or with byte scales one global per row.
    pub fn qparams_len(&self) -> usize {
        if self.scales.in_bytes() {
            return self.n;
        }
        self.n * (self.k / self.group_size.max(1)) * self.params_per_group()
    }

    /// Row `j`'s group `g` (scale, zero point), `row` being its bytes of `codes`.
    pub fn group_params(&self, row: &[u8], qparams: &[f32], j: usize, g: usize) -> (f32, f32) {
        if self.scales.in_bytes() {
            return (self.scales.value(row[self.k / 2 + g], qparams[j]), 8.0);
        }
        let g = j * (self.k / self.group_size) + g;
        if self.zeros {
            (qparams[2 * g], qparams[2 * g + 1])
        } else {
            (qparams[g], 8.0)
        }
    }
}

/// Packed codes `[n, k / 2]` and scale bytes `[n, groups]` as the rows of `codes` under byte
/// scales (each row's codes, then its scales).
pub fn with_scale_bytes(packed: &[u8], scales: &[u8], n: usize, k: usize) -> Vec<u8> {
    let groups = scales.len().checked_div(n).unwrap_or(0);
    assert!(packed.len() == n * k / 2 && scales.len() == n * groups);
    (0..n)
        .flat_map(|j| {
            packed[j * k / 2..(j + 1) * k / 2]
                .iter()
                .chain(&scales[j * groups..(j + 1) * groups])
                .copied()
        })
        .collect()
}

/// The magnitudes of e2m1 codes 0-7; bit 3 is the sign.
pub(crate) const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// A 4-bit code's weight before its scale: the integer less `zero`, or its e2m1 value.
pub(crate) fn code_value(code: u8, zero: f32, e2m1: bool) -> f32 {
    if !e2m1 {
        return f32::from(code) - zero;
    }
    let magnitude = E2M1[usize::from(code & 7)];
    if code & 8 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// Checks the buffers of a call against `shape`.
pub fn w4a16_shape(
    shape: &W4a16Shape,
    x_len: usize,
    codes_len: usize,
    qparams_len: usize,
    y_len: usize,
) -> Result<(), KernelError> {
    let W4a16Shape {
        m,
        n,
        k,
        group_size,
        ..
    } = *shape;
    let op = "w4a16_gemm";
    check_shape(
        group_size > 0 && group_size.is_multiple_of(2) && k.is_multiple_of(group_size),
        op,
        || format!("group_size {group_size} must be even and divide k = {k}"),
    )?;
    for (what, len, want) in [
        ("x", x_len, m * k),
        ("codes", codes_len, shape.codes_len()),
        ("qparams", qparams_len, shape.qparams_len()),
        ("y", y_len, m * n),
    ] {
        check_shape(len == want, op, || {
            format!("{what} has {len} elements, expected {want} for m {m}, n {n}, k {k}, group_size {group_size}")
        })?;
    }
    Ok(())
}

/// Packs unsigned 4-bit codes `[n, k]` (row-major, each 0..=15) into [`w4a16_gemm`]'s bytes.
pub fn pack_codes(codes: &[u8], k: usize) -> Vec<u8> {
    assert!(k.is_multiple_of(2) && codes.len().is_multiple_of(k.max(1)));
    codes
        .chunks_exact(2)
        .map(|pair| (pair[0] & 15) | (pair[1] & 15) << 4)
        .collect()
}

/// The weight `W[j, c]` of `codes` and `qparams`.
pub fn weight(codes: &[u8], qparams: &[f32], shape: &W4a16Shape, j: usize, c: usize) -> f32 {
    let row = &codes[j * shape.row_bytes()..][..shape.row_bytes()];
    let byte = row[c / 2];
    let code = if c.is_multiple_of(2) {
        byte & 15
    } else {
        byte >> 4
    };
    let (scale, zero) = shape.group_params(row, qparams, j, c / shape.group_size);
    let w = code_value(code, zero, shape.e2m1) * scale;
    if shape.f16_weights {
        half::f16::from_f32(w).to_f32()
    } else {
        w
    }
}

/// CPU reference of `w4a16_dequant`: `W` `[n, k]` itself in `T` (each weight rounded once), for
/// batches too large for the GEMV, which then run a dense GEMM on it. `shape.m` is ignored.
pub fn dequantize<T: Element>(
    codes: &[u8],
    qparams: &[f32],
    shape: &W4a16Shape,
    out: &mut [T],
) -> Result<(), KernelError> {
    let (n, k) = (shape.n, shape.k);
    w4a16_shape(
        &W4a16Shape { m: 0, ..*shape },
        0,
        codes.len(),
        qparams.len(),
        0,
    )?;
    check_shape(out.len() == n * k, "w4a16_dequant", || {
        format!("out has {} elements, expected {n} x {k}", out.len())
    })?;
    crate::weight_gemm::dequantize_into(k, |j, c| weight(codes, qparams, shape, j, c), out);
    Ok(())
}

/// CPU reference: `y[r, j] = Σ_c x[r, c] · W[j, c]`, summed in f32 in input order.
pub fn w4a16_gemm<T: Element>(
    x: &[T],
    codes: &[u8],
    qparams: &[f32],
    shape: &W4a16Shape,
    y: &mut [T],
) -> Result<(), KernelError> {
    w4a16_shape(shape, x.len(), codes.len(), qparams.len(), y.len())?;
    let dims = [shape.m, shape.n, shape.k];
    crate::weight_gemm::gemm(x, dims, |j, c| weight(codes, qparams, shape, j, c), y);
    Ok(())
}

/// The launchers: [`w4a16_gemm`] and [`dequantize`] on the GPU.
#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{CudaSlice, CudaView};

    use super::{w4a16_shape, W4a16Shape};
    use crate::cuda::{elementwise_launch, int32, CudaElement, CudaKernels};
    use crate::weight_gemm::{check_dequant_out, gemv_launch};
    use crate::KernelError;

    impl CudaKernels {
        /// [`crate::w4a16::w4a16_gemm`] on the GPU.
        #[allow(clippy::too_many_arguments)]
        pub fn w4a16_gemm<T: CudaElement>(
            &self,
            x: &CudaView<T>,
            codes: &CudaView<u8>,
            qparams: &CudaView<f32>,
            shape: &W4a16Shape,
            y: &mut CudaSlice<T>,
        ) -> Result<(), KernelError> {
            w4a16_shape(shape, x.len(), codes.len(), qparams.len(), y.len())?;
            if shape.m == 0 || shape.n == 0 {
                return Ok(());
            }
            let op = "w4a16_gemm";
            let m = int32(op, "m", shape.m)?;
            let ints = weight_ints(op, shape)?;
            let cfg = gemv_launch(op, shape.m, shape.n)?;
            let module = &self.w4a16;
            // SAFETY: w4a16_gemm_<T>(T*, const T*, const u8*, const float*, int, int, int, int,
            // int, int, int, int) in kernels/w4a16.cu takes (y, x, codes, qparams, m, ints); the
            // shape check bounds every index it reads (codes of `codes_len`, qparams of
            // `qparams_len` for its scales).
            unsafe {
                self.launch_weight_kernel(module, op, cfg, y, Some((x, m)), codes, qparams, &ints)
            }
        }

        /// [`crate::w4a16::dequantize`] on the GPU.
        pub fn w4a16_dequant<T: CudaElement>(
            &self,
            codes: &CudaView<u8>,
            qparams: &CudaView<f32>,
            shape: &W4a16Shape,
            out: &mut CudaSlice<T>,
        ) -> Result<(), KernelError> {
            let op = "w4a16_dequant";
            w4a16_shape(
                &W4a16Shape { m: 0, ..*shape },
                0,
                codes.len(),
                qparams.len(),
                0,
            )?;
            check_dequant_out(op, out.len(), shape.n, shape.k)?;
            if out.is_empty() {
                return Ok(());
            }
            let ints = weight_ints(op, shape)?;
            let cfg = elementwise_launch((shape.n * shape.k) as i64);
            let module = &self.w4a16;
            // SAFETY: w4a16_dequant_<T>(T*, const u8*, const float*, int x 7) in kernels/w4a16.cu
            // takes (out, codes, qparams, ints); the shape check bounds every index it touches.
            unsafe { self.launch_weight_kernel(module, op, cfg, out, None, codes, qparams, &ints) }
        }
    }

    /// The weights' int arguments both kernels take after their buffers (and `m`): n, k,
    /// group_size, f16_weights, e2m1, zeros and the scales' code.
    fn weight_ints(op: &'static str, shape: &W4a16Shape) -> Result<[i32; 7], KernelError> {
        Ok([
            int32(op, "n", shape.n)?,
            int32(op, "k", shape.k)?,
            int32(op, "group_size", shape.group_size)?,
            i32::from(shape.f16_weights),
            i32::from(shape.e2m1),
            i32::from(shape.zeros),
            shape.scales.code(),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_zero_points_and_scales_give_the_weight() {
        // W = [[(3-8)*0.5, (12-8)*0.5, (0-1)*2, (15-1)*2]]: group_size 2, two groups.
        let shape = W4a16Shape {
            m: 2,
            n: 1,
            k: 4,
            group_size: 2,
            f16_weights: false,
            e2m1: false,
            zeros: true,
            scales: W4Scales::F32,
        };
        let codes = pack_codes(&[3, 12, 0, 15], 4);
        assert_eq!(codes, [3 | 12 << 4, 15 << 4]);
        let qparams = [0.5f32, 8.0, 2.0, 1.0];
        let x = [1.0f32, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.5];
        let mut y = [0.0f32; 2];
        w4a16_gemm(&x, &codes, &qparams, &shape, &mut y).unwrap();
        assert_eq!(y, [-2.5 + 2.0 - 2.0 + 28.0, -2.5 + 14.0]);
        // (7 - 0) * 0.1 = 0.7 rounds to float16's 0.7001953.
        let shape = W4a16Shape {
            m: 1,
            n: 1,
            k: 2,
            group_size: 2,
            f16_weights: true,
            e2m1: false,
            zeros: true,
            scales: W4Scales::F32,
        };
        let mut y = [0.0f32];
        w4a16_gemm(&[1.0f32, 0.0], &[7], &[0.1, 0.0], &shape, &mut y).unwrap();
        assert_eq!(y, [half::f16::from_f32(0.7).to_f32()]);
        assert_ne!(y, [0.7]);
        // e2m1 codes 3 (1.5) and 13 (-3) at scale 2; the zero point is ignored.
        let shape = W4a16Shape {
            e2m1: true,
            f16_weights: false,
            ..shape
        };
        w4a16_gemm(&[1.0f32, 1.0], &[3 | 13 << 4], &[2.0, 5.0], &shape, &mut y).unwrap();
        assert_eq!(y, [3.0 - 6.0]);
    }

    /// Byte scales: each row's scale bytes after its codes, under its global. e4m3 0x3c is 1.5
    /// and 0x48 is 4; e8m0 129 is 4 and 126 is 0.5.
    #[test]
    fn byte_scales_follow_each_rows_codes_under_its_global() {
        // Two rows of four e2m1 inputs in groups of 2: codes 2 (1.0) and 11 (-1.5) throughout.
        let packed = pack_codes(&[2, 11, 2, 11, 2, 11, 2, 11], 4);
        let shape = |scales| W4a16Shape {
            m: 1,
            n: 2,
            k: 4,
            group_size: 2,
            f16_weights: false,
            e2m1: true,
            zeros: false,
            scales,
        };
        let x = [1.0f32, 1.0, 2.0, 2.0];
        // Per row: (1 - 1.5) · s0 + 2 (1 - 1.5) · s1.
        let row = |s0: f32, s1: f32| -0.5 * s0 - s1;
        for (scales, bytes, globals, want) in [
            (
                W4Scales::E4m3Times,
                [0x3c, 0x48, 0x48, 0x3c],
                [2.0, 0.5],
                [row(3.0, 8.0), row(2.0, 0.75)],
            ),
            (
                W4Scales::E4m3Over,
                [0x3c, 0x48, 0x48, 0x3c],
                [2.0, 0.5],
                [row(0.75, 2.0), row(8.0, 3.0)],
            ),
            (
                W4Scales::Ue8m0,
                [129, 126, 127, 127],
                [1.0, 1.0],
                [row(4.0, 0.5), row(1.0, 1.0)],
            ),
        ] {
            let codes = with_scale_bytes(&packed, &bytes, 2, 4);
            assert_eq!(codes.len(), shape(scales).codes_len());
            assert_eq!(&codes[2..4], &bytes[..2], "row 0's scales follow its codes");
            let mut y = [0.0f32; 2];
            w4a16_gemm(&x, &codes, &globals, &shape(scales), &mut y).unwrap();
            assert_eq!(y, want, "{scales:?}");
        }
        assert_eq!(e8m0(127), 1.0);
        assert_eq!(e8m0(0), 2f32.powi(-127));
        assert!(e8m0(255).is_nan());
    }

    #[test]
    fn shapes_that_do_not_fit_are_named() {
        let shape = W4a16Shape {
            m: 1,
            n: 2,
            k: 8,
            group_size: 3,
            f16_weights: false,
            e2m1: false,
            zeros: true,
            scales: W4Scales::F32,
        };
        let e = w4a16_shape(&shape, 8, 8, 8, 2).unwrap_err().to_string();
        assert!(e.contains("group_size 3"), "{e}");
        let shape = W4a16Shape {
            group_size: 4,
            ..shape
        };
        let e = w4a16_shape(&shape, 8, 7, 8, 2).unwrap_err().to_string();
        assert!(e.contains("codes has 7"), "{e}");
    }
}
