//! The one linear-layer interface. Every projection of every model goes through
//! [`LinearLayer`], so quantized formats and LoRA plug in without model changes.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use ember_core::{EmberError, Result};

use crate::lora::{LoraRows, LoraTargets};
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

/// Loads `<prefix>.weight` `[out, in]` in the model dtype. An FP8 block-quantized weight
/// (float8_e4m3fn with `<prefix>.weight_scale_inv`, one f32 per block) is dequantized here, at
/// load: CPU matmuls need a float weight anyway, so the model then holds it in the model dtype
/// (4 bytes per parameter in f32, 2 in bf16: 2-4x the checkpoint's 1 byte) and pays nothing per
/// step. `scale_fmt: ue8m0` scales are powers of two stored as f32, so they need no decoding.
pub fn load_weight(weights: &Weights, in_dim: usize, out_dim: usize) -> Result<Tensor> {
    let Some([block_rows, block_cols]) = weights.fp8_block_of("weight") else {
        return weights.get("weight", (out_dim, in_dim));
    };
    let (rows, cols) = (out_dim.div_ceil(block_rows), in_dim.div_ceil(block_cols));
    let weight = weights.get_as("weight", (out_dim, in_dim), DType::F32)?;
    let scale = weights.get_as("weight_scale_inv", (rows, cols), DType::F32)?;
    dequantize_fp8_blocks(&weight, &scale, [block_rows, block_cols])
        .and_then(|w| w.to_dtype(weights.dtype()))
        .map_err(|e| EmberError::Weights(format!("cannot dequantize fp8 weight: {e}")))
}

/// `weight[i, j] * scale[i / block_rows, j / block_cols]`, for an f32 weight `[out, in]`.
pub fn dequantize_fp8_blocks(
    weight: &Tensor,
    scale: &Tensor,
    [block_rows, block_cols]: [usize; 2],
) -> TensorResult {
    let (out_dim, in_dim) = weight.dims2()?;
    let (rows, cols) = scale.dims2()?;
    let expanded = scale
        .unsqueeze(1)?
        .unsqueeze(3)?
        .broadcast_as((rows, block_rows, cols, block_cols))?
        .reshape((rows * block_rows, cols * block_cols))?
        .narrow(0, 0, out_dim)?
        .narrow(1, 0, in_dim)?;
    weight.mul(&expanded)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fp8_blocks_scale_their_own_rows_and_columns_including_partial_edges() {
        // A 3x5 weight of ones in 2x2 blocks: scale rows 2, cols 3 (the last block partial).
        let weight = Tensor::ones((3, 5), DType::F32, &Device::Cpu).unwrap();
        let scale = Tensor::new(&[[1f32, 2.0, 4.0], [0.5, 0.25, 8.0]], &Device::Cpu).unwrap();
        let got = dequantize_fp8_blocks(&weight, &scale, [2, 2])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(got[0], vec![1.0, 1.0, 2.0, 2.0, 4.0]);
        assert_eq!(got[1], vec![1.0, 1.0, 2.0, 2.0, 4.0]);
        assert_eq!(got[2], vec![0.5, 0.5, 0.25, 0.25, 8.0]);
    }

    #[test]
    fn e4m3_values_convert_exactly() {
        // 448 is e4m3's largest finite value; 0.01953125 = 2^-6 * 1.25 is a normal one.
        let values = [448f32, -0.019_531_25, 1.5, 0.0];
        let t = Tensor::new(&values, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F8E4M3)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(t.to_vec1::<f32>().unwrap(), values);
    }
}
