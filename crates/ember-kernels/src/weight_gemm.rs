//! The CPU references' shared loops over a weight given element by element (the packed
//! formats' dequantizers): the weight itself in a storage dtype, and `y = x · Wᵀ` summed in f32
//! in input order. With `cuda`, what their two GPU kernels' launchers share.

use crate::Element;

/// `out[j, c] = weight(j, c)` for `[n, k]`, rounded once to `T`.
pub(crate) fn dequantize_into<T: Element>(
    k: usize,
    weight: impl Fn(usize, usize) -> f32,
    out: &mut [T],
) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = T::from_f32(weight(i / k, i % k));
    }
}

/// `y[r, j] = Σ_c x[r, c] · weight(j, c)` for `x` `[m, k]` and `y` `[m, n]`, in f32 in input
/// order, rounded once to `T`.
pub(crate) fn gemm<T: Element>(
    x: &[T],
    [m, n, k]: [usize; 3],
    weight: impl Fn(usize, usize) -> f32,
    y: &mut [T],
) {
    let w: Vec<f32> = (0..n * k).map(|i| weight(i / k, i % k)).collect();
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        for j in 0..n {
            let sum = xr
                .iter()
                .zip(&w[j * k..(j + 1) * k])
                .fold(0f32, |acc, (&a, &b)| acc + a.to_f32() * b);
            y[r * n + j] = T::from_f32(sum);
        }
    }
}

/// Errs unless a dequantizer's `out` holds the `[n, k]` weight.
#[cfg(feature = "cuda")]
pub(crate) fn check_dequant_out(
    op: &'static str,
    out_len: usize,
    n: usize,
    k: usize,
) -> Result<(), crate::KernelError> {
    crate::error::check_shape(out_len == n * k, op, || {
        format!("out has {out_len} elements, expected {n} x {k}")
    })
}

/// Warps per block and rows of `x` per block of `kernels/w4a16.cu` (`W4A16_WARPS`, `W4A16_ROWS`)
/// and of `kernels/w8a16.cu` (`W8A16_WARPS`, `W8A16_ROWS`, the same).
#[cfg(feature = "cuda")]
const W4A16_WARPS: u32 = 4;
#[cfg(feature = "cuda")]
const W4A16_ROWS: u32 = 8;

/// The launch of `kernels/w4a16.cu` and `kernels/w8a16.cu`'s GEMMs for `y` `[m, n]`: one warp
/// per output column, `W4A16_ROWS` rows of `x` per block.
#[cfg(feature = "cuda")]
pub(crate) fn gemv_launch(
    op: &'static str,
    m: usize,
    n: usize,
) -> Result<cudarc::driver::LaunchConfig, crate::KernelError> {
    let blocks_y = crate::cuda::grid_y_blocks(op, "m", m, W4A16_ROWS as usize)?;
    let blocks_x = n.div_ceil(W4A16_WARPS as usize) as u32;
    Ok(crate::cuda::grid_launch(
        (blocks_x, blocks_y),
        32 * W4A16_WARPS,
    ))
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use cudarc::driver::{
        CudaModule, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };

    use crate::cuda::{kernel, CudaElement, CudaKernels};
    use crate::KernelError;

    impl CudaKernels {
        /// Launches `<op>_<T>` of `module` on `cfg` with `(out, x, weights, params, m, ints...)`
        /// for a GEMM (`gemm_x`: x and its rows m) or `(out, weights, params, ints...)` for a
        /// dequantizer.
        ///
        /// # Safety
        /// `op` must take exactly those arguments, and the caller's shape checks must bound every
        /// index it reads and writes.
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn launch_weight_kernel<T: CudaElement, W: DeviceRepr>(
            &self,
            module: &Arc<CudaModule>,
            op: &str,
            cfg: LaunchConfig,
            out: &mut CudaSlice<T>,
            gemm_x: Option<(&CudaView<T>, i32)>,
            weights: &CudaView<W>,
            params: &CudaView<f32>,
            ints: &[i32],
        ) -> Result<(), KernelError> {
            let f = kernel(module, op, T::KERNEL_SUFFIX)?;
            let mut launch = self.stream.launch_builder(&f);
            launch.arg(out);
            if let Some((x, _)) = &gemm_x {
                launch.arg(*x);
            }
            launch.arg(weights).arg(params);
            if let Some((_, m)) = &gemm_x {
                launch.arg(m);
            }
            for a in ints {
                launch.arg(a);
            }
            // SAFETY: the caller's contract.
            unsafe { launch.launch(cfg) }?;
            Ok(())
        }
    }
}
