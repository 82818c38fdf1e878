//! Weights held unquantized in the model dtype. On the CPU a step's few rows (decodes) multiply
//! through ember-kernels' `linear_cpu`, which reads each weight row once on every core; many
//! rows (prefill) go to candle's cache-blocked GEMM.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Shape, Tensor};
use ember_kernels::cpu_dot::DotWeight;
use ember_kernels::linear_cpu::linear_cpu;
use ember_kernels::Element;

use super::LinearLayer;
use crate::device::kernels::cpu_input;

/// Rows up to which the CPU multiplies with `linear_cpu` rather than candle's GEMM: below it
/// the step is bound by reading the weight, which `linear_cpu` does once for all rows; above
/// it candle's blocked GEMM does more arithmetic per byte (measured: see benches/RESULTS.md).
pub(crate) const LINEAR_CPU_MAX_ROWS: usize = 16;

/// `x Wᵀ (+ b)` over a weight `[out, in]` held as loaded.
pub struct DenseLinear {
    inner: candle_nn::Linear,
}

impl DenseLinear {
    /// The layer over `weight` `[out, in]` and an optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            inner: candle_nn::Linear::new(weight, bias),
        }
    }

    /// `x Wᵀ` through `linear_cpu`, when `x` is on the CPU with at most
    /// [`LINEAR_CPU_MAX_ROWS`] rows in a dtype it takes.
    fn forward_cpu(&self, x: &Tensor) -> Option<candle_core::Result<Tensor>> {
        let w = self.inner.weight();
        let (n, k) = w.dims2().ok()?;
        let rows = x.elem_count() / k.max(1);
        let dtypes_ok = matches!(
            (x.dtype(), w.dtype()),
            (DType::F32, DType::F32) | (DType::BF16, DType::BF16) | (DType::F32, DType::BF16)
        );
        if !x.device().is_cpu() || rows > LINEAR_CPU_MAX_ROWS || !dtypes_ok || x.rank() == 0 {
            return None;
        }
        let run = || {
            let mut out_dims = x.dims().to_vec();
            out_dims[x.rank() - 1] = n;
            let x2 = x.reshape((rows, k))?.contiguous()?;
            let y = x2.apply_op2_no_bwd(w, &LinearCpu { rows, n, k })?;
            let y = y.reshape(out_dims)?;
            match self.inner.bias() {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            }
        };
        Some(run())
    }
}

impl LinearLayer for DenseLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.forward_cpu(x) {
            Some(y) => y,
            None => self.inner.forward(x),
        }
    }

    fn weight(&self) -> candle_core::Result<Tensor> {
        Ok(self.inner.weight().clone())
    }

    fn dense_weight(&self) -> Option<Tensor> {
        self.inner
            .bias()
            .is_none()
            .then(|| self.inner.weight().clone())
    }
}

/// `linear_cpu` as a candle op over `x` `[rows, k]` and the weight `[n, k]`.
struct LinearCpu {
    rows: usize,
    n: usize,
    k: usize,
}

impl CustomOp2 for LinearCpu {
    fn name(&self) -> &'static str {
        "linear_cpu"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        fn go<T: Element + candle_core::WithDType, W: DotWeight + candle_core::WithDType>(
            op: &LinearCpu,
            (x, xl): (&CpuStorage, &Layout),
            (w, wl): (&CpuStorage, &Layout),
        ) -> candle_core::Result<Vec<T>> {
            let x = cpu_input::<T>(x, xl, "linear_cpu input")?;
            let w = cpu_input::<W>(w, wl, "linear_cpu weight")?;
            let mut y = vec![T::from_f32(0.0); op.rows * op.n];
            linear_cpu(&mut y, x, w, [op.rows, op.n, op.k]).map_err(candle_core::Error::wrap)?;
            Ok(y)
        }
        let (xs, ws) = ((x, x_layout), (w, w_layout));
        let y = match (x.dtype(), w.dtype()) {
            (DType::F32, DType::F32) => CpuStorage::F32(go::<f32, f32>(self, xs, ws)?),
            (DType::F32, DType::BF16) => CpuStorage::F32(go::<f32, half::bf16>(self, xs, ws)?),
            (DType::BF16, DType::BF16) => {
                CpuStorage::BF16(go::<half::bf16, half::bf16>(self, xs, ws)?)
            }
            (a, b) => candle_core::bail!("linear_cpu takes f32 or bf16, not {a:?} x {b:?}"),
        };
        Ok((y, Shape::from((self.rows, self.n))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// A decode's rows and a prefill's take the two paths; both equal candle's matmul.
    #[test]
    fn few_and_many_rows_match_candles_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (37, 24), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 37, &dev).unwrap();
        let layer = DenseLinear::new(w.clone(), Some(b.clone()));
        for rows in [1, 3, LINEAR_CPU_MAX_ROWS, LINEAR_CPU_MAX_ROWS + 5] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, 24), &dev).unwrap();
            let want = x
                .broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            let got = layer.forward(&x).unwrap();
            assert_eq!(got.dims(), [1, rows, 37]);
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "{rows} rows: max diff {diff}");
        }
    }
}
