//! The one linear-layer interface. Every projection of every model goes through
//! [`LinearLayer`], so quantized formats and LoRA plug in without model changes.

use std::sync::Arc;

use candle_core::{Module, Tensor};
use ember_core::{EmberError, Result};

use crate::lora::{LoraRows, LoraTargets};
use crate::quantized::dequantize_weight;
use crate::weights::Weights;
use crate::TensorResult;

/// A projection of the model that LoRA adapters may target: the base [`LinearLayer`] plus the
/// module path adapters name it by (`model.layers.0.self_attn.q_proj`).
#[derive(Clone)]
pub struct Projection {
    base: Arc<dyn LinearLayer>,
    path: Arc<str>,
    in_dim: usize,
    out_dim: usize,
}

impl Projection {
    /// Loads `<prefix>.weight` (and bias) like [`load_linear`]; the prefix is the module path.
    pub fn load(weights: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Ok(Self::new(
            load_linear(weights, in_dim, out_dim, bias)?,
            weights.prefix(),
            in_dim,
            out_dim,
        ))
    }

    /// Wraps an already built layer under the module path `path`.
    pub fn new(base: Arc<dyn LinearLayer>, path: &str, in_dim: usize, out_dim: usize) -> Self {
        Self {
            base,
            path: path.into(),
            in_dim,
            out_dim,
        }
    }

    /// `x Wᵀ (+ b)`, plus each row's adapter delta.
    pub fn forward(&self, x: &Tensor, lora: &LoraRows) -> TensorResult {
        let y = self.base.forward(x)?;
        if lora.is_empty() {
            return Ok(y);
        }
        lora.apply(&self.path, x, y)
    }

    /// The module path adapters name this projection by.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Records this projection as a LoRA target.
    pub fn register(&self, targets: &mut LoraTargets) {
        targets.add(&self.path, self.in_dim, self.out_dim);
    }
}

/// A linear projection `y = x Wᵀ (+ b)` over the last dimension of a `[tokens, in]` input.
pub trait LinearLayer: Send + Sync {
    /// Applies the projection.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor>;
}

/// Weights kept unquantized in the model dtype (bf16, f16 or f32).
pub struct DenseLinear {
    inner: candle_nn::Linear,
}

impl LinearLayer for DenseLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.inner.forward(x)
    }
}

/// Loads `<prefix>.weight` of shape `[out, in]` (and `<prefix>.bias` when `bias`).
pub fn load_linear(
    weights: &Weights,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
) -> Result<Arc<dyn LinearLayer>> {
    let weight = load_weight(weights, in_dim, out_dim)?;
    let bias = if bias {
        Some(weights.get("bias", out_dim)?)
    } else {
        None
    };
    Ok(Arc::new(DenseLinear {
        inner: candle_nn::Linear::new(weight, bias),
    }))
}

/// Loads `<prefix>.weight` `[out, in]` in the model dtype. A weight the checkpoint stores
/// quantized (block FP8, packed INT4/INT8, NVFP4, MXFP4: see [`crate::quantized`]) is
/// dequantized here, at load, so the model holds it in the model dtype (4 bytes per parameter in
/// f32, 2 in bf16, against the checkpoint's 0.5-1) and pays nothing per step.
pub fn load_weight(weights: &Weights, in_dim: usize, out_dim: usize) -> Result<Tensor> {
    match dequantize_weight(weights, in_dim, out_dim)? {
        None => weights.get("weight", (out_dim, in_dim)),
        Some(w) => w
            .to_dtype(weights.dtype())
            .and_then(|w| w.to_device(weights.device()))
            .map_err(|e| {
                EmberError::Weights(format!(
                    "cannot dequantize `{}.weight`: {e}",
                    weights.prefix()
                ))
            }),
    }
}

/// A linear layer over an already loaded weight (tied embeddings).
pub fn linear_from_weight(weight: Tensor) -> Arc<dyn LinearLayer> {
    Arc::new(DenseLinear {
        inner: candle_nn::Linear::new(weight, None),
    })
}

/// Shorthand used by layers: forward through a shared linear layer.
pub fn apply(layer: &Arc<dyn LinearLayer>, x: &Tensor) -> TensorResult {
    layer.forward(x)
}
