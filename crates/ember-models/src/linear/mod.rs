//! The one linear-layer interface. Every projection of every model goes through
//! [`LinearLayer`], so quantized formats and LoRA plug in without model changes.

mod dense;
pub mod quantized;

use std::sync::Arc;

use candle_core::Tensor;
use ember_core::{EmberError, Result};

pub use crate::linear::dense::DenseLinear;
use crate::linear::quantized::dequantize_weight;
use crate::linear::quantized::fp8::Fp8ChannelLinear;
use crate::linear::quantized::{fp8_block, int4};
use crate::loading::context::LoadContext;
use crate::loading::weights::{tensor_bytes, Weights};
use crate::lora::{LoraRows, LoraTargets};
use crate::parallel::Split;
use crate::TensorResult;

/// A projection of the model that LoRA adapters may target: the base [`LinearLayer`] plus the
/// module path adapters name it by (`model.layers.0.self_attn.q_proj`).
#[derive(Clone)]
pub struct Projection {
    base: Arc<dyn LinearLayer>,
    path: Arc<str>,
    /// The whole projection's dimensions, as adapters are shaped.
    in_dim: usize,
    out_dim: usize,
    /// The part of the projection a tensor-parallel rank holds; adapters are cut to match.
    split: Option<Split>,
}

impl Projection {
    /// Loads `<prefix>.weight` (and bias) like [`load_linear`], quantized to e4m3 under online
    /// FP8 (see [`projection_from_weight`]); the prefix is the module path.
    pub fn load(
        weights: &Weights,
        ctx: &LoadContext,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let bias = if bias {
            Some(weights.get("bias", out_dim)?)
        } else {
            None
        };
        let layer = match packed_projection(weights, ctx, in_dim, out_dim, None, &bias)? {
            Some(layer) => layer,
            None => {
                let weight = load_weight(weights, ctx, in_dim, out_dim)?;
                projection_from_weight(weights, ctx, weight, bias)?
            }
        };
        Ok(Self::new(layer, weights.prefix(), in_dim, out_dim))
    }

    /// Loads one rank's part of a projection split across tensor-parallel ranks (`split`), or
    /// all of it (`None`). A row-parallel projection's partial outputs are summed across ranks
    /// by the caller; its bias is held by rank 0 alone, so the sum adds it once.
    pub fn load_split(
        weights: &Weights,
        ctx: &LoadContext,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        split: Option<Split>,
    ) -> Result<Self> {
        let Some(split) = split else {
            return Self::load(weights, ctx, in_dim, out_dim, bias);
        };
        let bias = match split {
            _ if !bias => None,
            Split::Columns { start, len } => {
                Some(weights.get_slice("bias", out_dim, 0, start, len)?)
            }
            Split::Rows { .. } if ctx.rank().is_none_or(|r| r.rank() == 0) => {
                Some(weights.get("bias", out_dim)?)
            }
            Split::Rows { .. } => None,
        };
        let layer = match packed_projection(weights, ctx, in_dim, out_dim, Some(split), &bias)? {
            Some(layer) => layer,
            None => {
                let weight = load_weight_split(weights, ctx, in_dim, out_dim, split)?;
                projection_from_weight(weights, ctx, weight, bias)?
            }
        };
        Ok(Self::new(layer, weights.prefix(), in_dim, out_dim).with_split(Some(split)))
    }

    /// Wraps an already built layer under the module path `path`; `in_dim`/`out_dim` are the
    /// whole projection's (see [`Projection::with_split`] for a rank's part).
    pub fn new(base: Arc<dyn LinearLayer>, path: &str, in_dim: usize, out_dim: usize) -> Self {
        Self {
            base,
            path: path.into(),
            in_dim,
            out_dim,
            split: None,
        }
    }

    /// The same projection (path, dimensions, split) over another base layer.
    pub fn with_base(self, base: Arc<dyn LinearLayer>) -> Self {
        Self { base, ..self }
    }

    /// Marks the layer as a tensor-parallel rank's part `split` of the projection.
    pub fn with_split(self, split: Option<Split>) -> Self {
        Self { split, ..self }
    }

    /// `x Wᵀ (+ b)`, plus each row's adapter delta.
    pub fn forward(&self, x: &Tensor, lora: &LoraRows) -> TensorResult {
        let y = self.base.forward(x)?;
        if lora.is_empty() {
            return Ok(y);
        }
        lora.apply(&self.path, x, y, self.split)
    }

    /// The base layer's packed weight ([`LinearLayer::packed`]).
    pub fn packed(&self) -> Option<crate::linear::quantized::packed::PackedWeight> {
        self.base.packed()
    }

    /// The base layer's weight when held dense and without a bias ([`LinearLayer::dense_weight`]).
    pub fn dense_weight(&self) -> Option<Tensor> {
        self.base.dense_weight()
    }

    /// The whole projection's `(in, out)` dimensions (a tensor-parallel rank holds a part).
    pub fn dims(&self) -> (usize, usize) {
        (self.in_dim, self.out_dim)
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

    /// The weight `[out, in]` as the matmul sees it, in the model dtype (dequantized if held
    /// quantized): what MLA folds into its absorbed decode.
    fn weight(&self) -> candle_core::Result<Tensor>;

    /// The weight `[out, in]` when the layer is that weight alone, held as is (no bias, no
    /// quantization): what the fused MoE stacks.
    fn dense_weight(&self) -> Option<Tensor> {
        None
    }

    /// The packed bytes and parameters when the layer is a packed weight alone (no bias, inputs
    /// in order): what the fused MoE stacks for its grouped W8A16 / W4A16 GEMMs.
    fn packed(&self) -> Option<crate::linear::quantized::packed::PackedWeight> {
        None
    }
}

/// Loads `<prefix>.weight` of shape `[out, in]` (and `<prefix>.bias` when `bias`) as the
/// checkpoint stores it, never quantized online: the router and the LM head, which vLLM's online
/// FP8 keeps in 16 bits too.
pub fn load_linear(
    weights: &Weights,
    ctx: &LoadContext,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
) -> Result<Arc<dyn LinearLayer>> {
    let weight = load_weight(weights, ctx, in_dim, out_dim)?;
    let bias = if bias {
        Some(weights.get("bias", out_dim)?)
    } else {
        None
    };
    Ok(Arc::new(DenseLinear::new(weight, bias)))
}

/// Like [`load_weight`] for one rank's part: only the slice is read from an unquantized
/// checkpoint; a quantized one is dequantized whole at load and cut (its packing does not align
/// with every split), and the rank holds only its part.
pub fn load_weight_split(
    weights: &Weights,
    ctx: &LoadContext,
    in_dim: usize,
    out_dim: usize,
    split: Split,
) -> Result<Tensor> {
    load_weight_part(weights, ctx, in_dim, out_dim, Some(split))
}

/// Loads `<prefix>.weight` `[out, in]` in the model dtype. A weight the checkpoint stores
/// quantized (block FP8, packed INT4/INT8, NVFP4, MXFP4: see [`crate::linear::quantized`]) is
/// dequantized here, at load, so the model holds it in the model dtype (4 bytes per parameter in
/// f32, 2 in bf16, against the checkpoint's 0.5-1) and pays nothing per step.
pub fn load_weight(
    weights: &Weights,
    ctx: &LoadContext,
    in_dim: usize,
    out_dim: usize,
) -> Result<Tensor> {
    load_weight_part(weights, ctx, in_dim, out_dim, None)
}

/// The whole weight, or the part `split` takes; see [`load_weight`] and [`load_weight_split`].
fn load_weight_part(
    weights: &Weights,
    ctx: &LoadContext,
    in_dim: usize,
    out_dim: usize,
    split: Option<Split>,
) -> Result<Tensor> {
    let weights = &weights.as_linear(in_dim, out_dim);
    let part = split.map(Split::range);
    match dequantize_weight(weights, ctx, in_dim, out_dim)? {
        None => match part {
            Some((dim, start, len)) => {
                weights.get_slice("weight", (out_dim, in_dim), dim, start, len)
            }
            None => weights.get("weight", (out_dim, in_dim)),
        },
        Some(w) => {
            let w = match part {
                Some((dim, start, len)) => w.narrow(dim, start, len).and_then(|w| w.contiguous()),
                None => Ok(w),
            }
            .and_then(|w| w.to_dtype(weights.dtype()))
            .and_then(|w| w.to_device(weights.device()))
            .map_err(|e| {
                EmberError::Weights(format!(
                    "cannot dequantize `{}.weight`: {e}",
                    weights.prefix()
                ))
            })?;
            weights.note_held(tensor_bytes(&w));
            Ok(w)
        }
    }
}

/// The projection held as the checkpoint packs it, when [`LoadContext::packed_weights`] asks for
/// it: 4-bit weights for the W4A16 kernel, block FP8 for the W8A16 kernel.
fn packed_projection(
    weights: &Weights,
    ctx: &LoadContext,
    in_dim: usize,
    out_dim: usize,
    split: Option<Split>,
    bias: &Option<Tensor>,
) -> Result<Option<Arc<dyn LinearLayer>>> {
    if !ctx.packed_weights {
        return Ok(None);
    }
    let weights = &weights.as_linear(in_dim, out_dim);
    if let Some(layer) = int4::load(weights, ctx, in_dim, out_dim, split, bias.clone())? {
        return Ok(Some(Arc::new(layer)));
    }
    let layer = fp8_block::load(weights, ctx, in_dim, out_dim, split, bias.clone())?;
    Ok(layer.map(|l| Arc::new(l) as Arc<dyn LinearLayer>))
}

/// A projection of attention, an MLP or an expert over its loaded weight `[out, in]` (counted as
/// held by `weights`). Under online FP8 ([`LoadContext::online_fp8`]) the weight is quantized to e4m3
/// with per-output-channel scales and the full-precision tensor is released.
pub fn projection_from_weight(
    weights: &Weights,
    ctx: &LoadContext,
    weight: Tensor,
    bias: Option<Tensor>,
) -> Result<Arc<dyn LinearLayer>> {
    if !ctx.online_fp8 {
        return Ok(Arc::new(DenseLinear::new(weight, bias)));
    }
    if ctx.packed_weights && crate::linear::quantized::packed::computes_in(weight.dtype()) {
        // Held for the W8A16 kernels (on CUDA): e4m3 bytes, one scale per output channel.
        let (bytes, scales, shape) = crate::linear::quantized::fp8::packed_per_channel(&weight)
            .map_err(|e| {
                EmberError::Weights(format!(
                    "cannot quantize `{}.weight` to fp8: {e}",
                    weights.prefix()
                ))
            })?;
        // Under W8A8 each row's scale is repeated over its 128-input blocks, the layout the FP8
        // GEMM reads (and the W8A16 kernels too).
        let w8a8 = ctx.backends.fp8_gemm == crate::backends::Fp8Gemm::W8a8;
        let (scales, shape) = if w8a8 {
            let groups = shape.k.div_ceil(ember_kernels::w8a8::GROUP);
            let scales = scales
                .reshape((shape.n, 1))
                .and_then(|s| s.repeat((1, groups)))
                .and_then(|s| s.flatten_all())
                .map_err(|e| EmberError::Tensor(e.to_string()))?;
            let shape = ember_kernels::w8a16::W8a16Shape {
                block_k: ember_kernels::w8a8::GROUP,
                ..shape
            };
            (scales, shape)
        } else {
            (scales, shape)
        };
        let held = bytes.elem_count() + 4 * scales.elem_count();
        weights.note_held(held as i64 - tensor_bytes(&weight));
        let layer = crate::linear::quantized::packed::PackedLinear::new(
            bytes,
            scales,
            shape,
            bias,
            None,
            weight.dtype(),
        );
        return Ok(Arc::new(if w8a8 { layer.with_w8a8() } else { layer }));
    }
    let layer = Fp8ChannelLinear::quantize(&weight, bias).map_err(|e| {
        EmberError::Weights(format!(
            "cannot quantize `{}.weight` to fp8: {e}",
            weights.prefix()
        ))
    })?;
    weights.note_held(layer.weight_bytes() as i64 - tensor_bytes(&weight));
    Ok(Arc::new(layer))
}

/// A linear layer over an already loaded weight, never quantized online (tied embeddings).
pub fn linear_from_weight(weight: Tensor) -> Arc<dyn LinearLayer> {
    Arc::new(DenseLinear::new(weight, None))
}

/// Shorthand used by layers: forward through a shared linear layer.
pub fn apply(layer: &Arc<dyn LinearLayer>, x: &Tensor) -> TensorResult {
    layer.forward(x)
}
