//! SiLU-and-mul, the SwiGLU activation over a fused gate/up projection: for each row of
//! `input = [gate | up]` (`[rows, 2 * d]`), `out = silu(gate) * up` (`[rows, d]`), as vLLM lays it out.
//!
//! Numerics, shared by the CPU reference and `kernels/silu_and_mul.cu`: f32 throughout,
//! `silu(g) = g / (1 + exp(-g))`, one rounding to the storage dtype on store.

use crate::error::check_shape;
use crate::{Element, KernelError};

/// Rows and `d` of a SiLU-and-mul call, or why `input` isn't `[rows, 2 * d]` for `out` `[rows, d]`.
pub fn silu_and_mul_shape(
    input_len: usize,
    out_len: usize,
    d: usize,
) -> Result<(usize, usize), KernelError> {
    check_shape(d > 0 && out_len.is_multiple_of(d), "silu_and_mul", || {
        format!("out has {out_len} elements, not a multiple of d = {d}")
    })?;
    check_shape(input_len == 2 * out_len, "silu_and_mul", || {
        format!("input has {input_len} elements, expected 2 x out's {out_len}")
    })?;
    Ok((out_len / d, d))
}

/// CPU reference: `out[r] = silu(input[r][..d]) * input[r][d..]` for each row.
pub fn silu_and_mul<T: Element>(input: &[T], d: usize, out: &mut [T]) -> Result<(), KernelError> {
    silu_and_mul_shape(input.len(), out.len(), d)?;
    for (row, out) in input.chunks_exact(2 * d).zip(out.chunks_exact_mut(d)) {
        let (gate, up) = row.split_at(d);
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            let g = g.to_f32();
            *o = T::from_f32(g / (1.0 + (-g).exp()) * u.to_f32());
        }
    }
    Ok(())
}

/// The launcher: [`silu_and_mul`] on the GPU.
#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{CudaSlice, CudaView, PushKernelArg};

    use super::silu_and_mul_shape;
    use crate::cuda::{elementwise_launch, kernel, too_big, CudaElement, CudaKernels};
    use crate::KernelError;

    impl CudaKernels {
        /// [`crate::silu_and_mul::silu_and_mul`] on the GPU.
        pub fn silu_and_mul<T: CudaElement>(
            &self,
            input: &CudaView<T>,
            d: usize,
            out: &mut CudaSlice<T>,
        ) -> Result<(), KernelError> {
            silu_and_mul_shape(input.len(), out.len(), d)?;
            let d_arg = i32::try_from(d).map_err(|_| too_big("silu_and_mul", "d", d))?;
            let n = out.len() as i64;
            if n == 0 {
                return Ok(());
            }
            let f = kernel(&self.silu_and_mul, "silu_and_mul", T::KERNEL_SUFFIX)?;
            let mut launch = self.stream.launch_builder(&f);
            launch.arg(out).arg(input).arg(&d_arg).arg(&n);
            // SAFETY: matches silu_and_mul_<T>(T*, const T*, int, long long); shapes checked.
            unsafe { launch.launch(elementwise_launch(n)) }?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;

    #[test]
    fn multiplies_the_silu_of_the_gate_half_by_the_up_half() {
        // Two rows, d = 2: [g0 g1 | u0 u1].
        let input = [0.0f32, 1.0, 5.0, 2.0, -1.0, 3.0, 4.0, -0.5];
        let mut out = [0.0f32; 4];
        silu_and_mul(&input, 2, &mut out).unwrap();
        let silu = |g: f32| g / (1.0 + (-g).exp());
        let expected = [0.0, silu(1.0) * 2.0, silu(-1.0) * 4.0, silu(3.0) * -0.5];
        for (o, e) in out.iter().zip(expected) {
            assert!((o - e).abs() < 1e-6, "{out:?} vs {expected:?}");
        }
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
    }

    #[test]
    fn large_negative_gates_give_zero_not_nan() {
        let mut out = [bf16::ONE; 1];
        silu_and_mul(&[bf16::from_f32(-200.0), bf16::from_f32(3.0)], 1, &mut out).unwrap();
        assert_eq!(out[0].to_f32(), 0.0);
    }

    #[test]
    fn bf16_rounds_once_after_the_f32_product() {
        let (g, u) = (bf16::from_f32(0.37), bf16::from_f32(-2.3));
        let mut out = [bf16::ZERO];
        silu_and_mul(&[g, u], 1, &mut out).unwrap();
        let gf = g.to_f32();
        assert_eq!(
            out[0],
            bf16::from_f32(gf / (1.0 + (-gf).exp()) * u.to_f32())
        );
    }

    #[test]
    fn refuses_an_input_that_is_not_twice_the_output() {
        let mut out = [0.0f32; 4];
        let err = silu_and_mul(&[0.0; 6], 2, &mut out).unwrap_err();
        assert!(err.to_string().contains("expected 2 x out's 4"), "{err}");
    }
}
