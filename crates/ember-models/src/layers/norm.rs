//! RMSNorm, as Qwen3 and DeepSeek use it (`weight * x / sqrt(mean(x²) + eps)`), alone or fused
//! with the residual add before it.

use candle_core::Tensor;
use ember_core::Result;

use crate::backends::LayerKernels;
use crate::device::calls::{Kernel, KernelCalls};
use crate::layers::kernel_ops;
use crate::loading::context::LoadContext;
use crate::loading::weights::Weights;
use crate::TensorResult;
use std::sync::Arc;

/// Root-mean-square normalisation over the last dimension, computed in f32.
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    kernels: LayerKernels,
    calls: Arc<KernelCalls>,
}

impl RmsNorm {
    /// Loads `<prefix>.weight` of length `size`.
    pub fn load(weights: &Weights, ctx: &LoadContext, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weights.get("weight", size)?,
            eps,
            kernels: ctx.backends.layer_kernels,
            calls: ctx.kernel_calls.clone(),
        })
    }

    fn ember_serves(&self, x: &Tensor) -> bool {
        kernel_ops::serves(self.kernels, x.dtype()) && self.weight.dtype() == x.dtype()
    }

    /// Normalises `x` (`[..., size]`), returning the input dtype; accumulates in f32.
    pub fn forward(&self, x: &Tensor) -> TensorResult {
        if self.ember_serves(x) {
            self.calls.count(Kernel::RmsNorm);
            return kernel_ops::rms_norm(x, &self.weight, self.eps as f32);
        }
        candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)
    }

    /// `residual + delta` and its norm: `(sum, normed)`; one kernel under ember's layer kernels.
    pub fn forward_add(&self, delta: &Tensor, residual: &Tensor) -> TensorResult<(Tensor, Tensor)> {
        if self.ember_serves(residual) && delta.dtype() == residual.dtype() {
            self.calls.count(Kernel::AddRmsNorm);
            return kernel_ops::add_rms_norm(delta, residual, &self.weight, self.eps as f32);
        }
        let sum = (residual + delta)?;
        let normed = self.forward(&sum)?;
        Ok((sum, normed))
    }
}
