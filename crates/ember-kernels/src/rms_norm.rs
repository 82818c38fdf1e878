//! RMSNorm over the last dimension (`x / sqrt(mean(x²) + eps) * weight`), alone and fused with the
//! residual add before it (`residual += x; out = rms_norm(residual)`), as the decoder layers use it.
//!
//! Numerics, shared by the CPU reference and `kernels/rms_norm.cu`: load as f32, sum of squares in
//! f32, `(x * inv_rms) * weight` in f32, one rounding to the storage dtype on store. The fused form
//! rounds `x + residual` to the storage dtype first (it is stored) and normalises that rounded sum.
//! (candle's CPU `rms_norm` multiplies in the storage dtype, so for bf16 it rounds twice.)

use crate::error::check_shape;
use crate::{Element, KernelError};

/// Rows and hidden size of an RMSNorm call, or why the lengths don't fit `[rows, weight.len()]`.
pub fn rms_norm_shape(
    x_len: usize,
    weight_len: usize,
    out_len: usize,
) -> Result<(usize, usize), KernelError> {
    let hidden = weight_len;
    check_shape(
        hidden > 0 && x_len.is_multiple_of(hidden),
        "rms_norm",
        || format!("x has {x_len} elements, not a multiple of the weight's {hidden}"),
    )?;
    check_shape(out_len == x_len, "rms_norm", || {
        format!("out has {out_len} elements, x has {x_len}")
    })?;
    Ok((x_len / hidden, hidden))
}

/// Rows and hidden size of a fused add-RMSNorm call: [`rms_norm_shape`]'s, with a residual as
/// long as `x`.
pub fn fused_add_rms_norm_shape(
    x_len: usize,
    residual_len: usize,
    weight_len: usize,
    out_len: usize,
) -> Result<(usize, usize), KernelError> {
    let dims = rms_norm_shape(x_len, weight_len, out_len)?;
    check_shape(residual_len == x_len, "fused_add_rms_norm", || {
        format!("residual has {residual_len} elements, x has {x_len}")
    })?;
    Ok(dims)
}

/// CPU reference: `out[r] = x[r] / sqrt(mean(x[r]²) + eps) * weight` for each row of `x`.
pub fn rms_norm<T: Element>(
    x: &[T],
    weight: &[T],
    eps: f32,
    out: &mut [T],
) -> Result<(), KernelError> {
    let (_, hidden) = rms_norm_shape(x.len(), weight.len(), out.len())?;
    for (x, out) in x.chunks_exact(hidden).zip(out.chunks_exact_mut(hidden)) {
        normalise_row(x, weight, eps, out);
    }
    Ok(())
}

/// CPU reference of the fused form: `residual[r] += x[r]` (rounded to `T`), then
/// `out[r] = rms_norm(residual[r])`.
pub fn fused_add_rms_norm<T: Element>(
    x: &[T],
    residual: &mut [T],
    weight: &[T],
    eps: f32,
    out: &mut [T],
) -> Result<(), KernelError> {
    let (_, hidden) = fused_add_rms_norm_shape(x.len(), residual.len(), weight.len(), out.len())?;
    for ((x, residual), out) in x
        .chunks_exact(hidden)
        .zip(residual.chunks_exact_mut(hidden))
        .zip(out.chunks_exact_mut(hidden))
    {
        for (r, &x) in residual.iter_mut().zip(x) {
            *r = T::from_f32(x.to_f32() + r.to_f32());
        }
        normalise_row(residual, weight, eps, out);
    }
    Ok(())
}

fn normalise_row<T: Element>(x: &[T], weight: &[T], eps: f32, out: &mut [T]) {
    let sum_sq: f32 = x.iter().map(|v| v.to_f32() * v.to_f32()).sum();
    let inv_rms = 1.0 / (sum_sq / x.len() as f32 + eps).sqrt();
    for ((o, &x), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = T::from_f32(x.to_f32() * inv_rms * w.to_f32());
    }
}

/// The launchers: [`rms_norm`] and [`fused_add_rms_norm`] on the GPU.
#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

    use super::{fused_add_rms_norm_shape, rms_norm_shape};
    use crate::cuda::{block_per_row, kernel, too_big, CudaElement, CudaKernels};
    use crate::KernelError;

    impl CudaKernels {
        /// [`crate::rms_norm::rms_norm`] on the GPU.
        pub fn rms_norm<T: CudaElement>(
            &self,
            x: &CudaView<T>,
            weight: &CudaView<T>,
            eps: f32,
            out: &mut CudaViewMut<T>,
        ) -> Result<(), KernelError> {
            let (rows, hidden) = rms_norm_shape(x.len(), weight.len(), out.len())?;
            // SAFETY: rms_norm_<T>(T*, const T*, const T*, int, float) in kernels/rms_norm.cu
            // takes what launch_rows passes without a residual, and the shape check above bounds
            // every index it touches.
            unsafe { self.launch_rows("rms_norm", [rows, hidden], out, None, x, weight, eps) }
        }

        /// [`crate::rms_norm::fused_add_rms_norm`] on the GPU (`residual` is updated in place).
        pub fn fused_add_rms_norm<T: CudaElement>(
            &self,
            x: &CudaView<T>,
            residual: &mut CudaViewMut<T>,
            weight: &CudaView<T>,
            eps: f32,
            out: &mut CudaViewMut<T>,
        ) -> Result<(), KernelError> {
            let (rows, hidden) =
                fused_add_rms_norm_shape(x.len(), residual.len(), weight.len(), out.len())?;
            // SAFETY: fused_add_rms_norm_<T>(T*, T*, const T*, const T*, int, float) takes what
            // launch_rows passes with the residual; shapes checked.
            unsafe {
                let dims = [rows, hidden];
                self.launch_rows(
                    "fused_add_rms_norm",
                    dims,
                    out,
                    Some(residual),
                    x,
                    weight,
                    eps,
                )
            }
        }

        /// Launches `<op>_<T>(out, [residual,] x, weight, hidden, eps)` over `rows` rows of
        /// `hidden` ([`row_launch`]); nothing for no rows.
        ///
        /// # Safety
        /// `op` must take exactly those arguments, and the buffers must hold `rows` rows of
        /// `hidden` (`weight` one).
        #[allow(clippy::too_many_arguments)]
        unsafe fn launch_rows<T: CudaElement>(
            &self,
            op: &str,
            [rows, hidden]: [usize; 2],
            out: &mut CudaViewMut<T>,
            residual: Option<&mut CudaViewMut<T>>,
            x: &CudaView<T>,
            weight: &CudaView<T>,
            eps: f32,
        ) -> Result<(), KernelError> {
            if rows == 0 {
                return Ok(());
            }
            let hidden_arg = hidden_i32(hidden)?;
            let f = kernel(&self.rms_norm, op, T::KERNEL_SUFFIX)?;
            let mut launch = self.stream.launch_builder(&f);
            launch.arg(out);
            if let Some(residual) = residual {
                launch.arg(residual);
            }
            launch.arg(x).arg(weight).arg(&hidden_arg).arg(&eps);
            // SAFETY: the caller's contract.
            unsafe { launch.launch(row_launch(rows, hidden)?) }?;
            Ok(())
        }
    }

    /// `hidden` as the kernels' 32-bit int argument.
    fn hidden_i32(hidden: usize) -> Result<i32, KernelError> {
        i32::try_from(hidden).map_err(|_| too_big("rms_norm", "hidden", hidden))
    }

    /// One block per row, of a multiple of 32 threads up to 1024 (block_sum's warp shuffles need
    /// full warps).
    fn row_launch(rows: usize, hidden: usize) -> Result<LaunchConfig, KernelError> {
        let threads = hidden.next_multiple_of(32).clamp(32, 1024) as u32;
        block_per_row("rms_norm", "rows", rows, threads)
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;

    #[test]
    fn normalises_each_row_by_its_rms_and_scales_by_the_weight() {
        // Row [3, 4]: mean of squares 12.5; row [0, 2]: 2.
        let x = [3.0f32, 4.0, 0.0, 2.0];
        let mut out = [0.0f32; 4];
        rms_norm(&x, &[1.0, 2.0], 0.0, &mut out).unwrap();
        let r = 12.5f32.sqrt();
        let expected = [3.0 / r, 8.0 / r, 0.0, 4.0 / 2.0f32.sqrt()];
        for (o, e) in out.iter().zip(expected) {
            assert!((o - e).abs() < 1e-6, "{out:?} vs {expected:?}");
        }
    }

    #[test]
    fn eps_keeps_a_zero_row_finite() {
        let mut out = [1.0f32; 3];
        rms_norm(&[0.0; 3], &[1.0; 3], 1e-6, &mut out).unwrap();
        assert_eq!(out, [0.0; 3]);
    }

    #[test]
    fn fused_form_stores_the_rounded_sum_and_normalises_it() {
        let x = [bf16::from_f32(1.0), bf16::from_f32(1.0 / 512.0)];
        // 1 + 1/512 is not a bf16 (8 mantissa bits): the stored residual rounds to 1.
        let mut residual = [bf16::from_f32(2.0), bf16::from_f32(1.0)];
        let weight = [bf16::ONE; 2];
        let mut out = [bf16::ZERO; 2];
        fused_add_rms_norm(&x, &mut residual, &weight, 0.0, &mut out).unwrap();
        assert_eq!(residual, [bf16::from_f32(3.0), bf16::from_f32(1.0)]);
        let r = 5.0f32.sqrt();
        assert_eq!(out, [bf16::from_f32(3.0 / r), bf16::from_f32(1.0 / r)]);
    }

    #[test]
    fn bf16_rounds_once_after_the_f32_product() {
        let x = [
            bf16::from_f32(1.3),
            bf16::from_f32(-0.7),
            bf16::from_f32(2.1),
        ];
        let w = [
            bf16::from_f32(0.9),
            bf16::from_f32(1.1),
            bf16::from_f32(1.7),
        ];
        let mut out = [bf16::ZERO; 3];
        rms_norm(&x, &w, 1e-6, &mut out).unwrap();
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let inv = 1.0 / (xf.iter().map(|v| v * v).sum::<f32>() / 3.0 + 1e-6).sqrt();
        for i in 0..3 {
            assert_eq!(out[i], bf16::from_f32(xf[i] * inv * w[i].to_f32()));
        }
    }

    #[test]
    fn f32_matches_candles_rms_norm() {
        let (rows, hidden) = (5, 96);
        let x: Vec<f32> = (0..rows * hidden)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let w: Vec<f32> = (0..hidden).map(|i| 0.5 + (i % 7) as f32 / 5.0).collect();
        let mut out = vec![0.0f32; x.len()];
        rms_norm(&x, &w, 1e-6, &mut out).unwrap();
        let dev = candle_core::Device::Cpu;
        let xt = candle_core::Tensor::from_slice(&x, (rows, hidden), &dev).unwrap();
        let wt = candle_core::Tensor::from_slice(&w, hidden, &dev).unwrap();
        let candle = candle_nn::ops::rms_norm(&xt, &wt, 1e-6).unwrap();
        let candle: Vec<f32> = candle.flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in out.iter().zip(&candle) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{a} vs candle {b}"
            );
        }
    }

    #[test]
    fn refuses_lengths_that_do_not_fit_the_weight() {
        let mut out = [0.0f32; 5];
        let err = rms_norm(&[1.0; 5], &[1.0; 2], 1e-6, &mut out).unwrap_err();
        assert!(
            err.to_string().contains("not a multiple of the weight's 2"),
            "{err}"
        );
        let mut residual = [0.0f32; 2];
        let mut out = [0.0f32; 4];
        let err =
            fused_add_rms_norm(&[1.0; 4], &mut residual, &[1.0; 2], 1e-6, &mut out).unwrap_err();
        assert!(err.to_string().contains("residual has 2 elements"), "{err}");
    }
}
