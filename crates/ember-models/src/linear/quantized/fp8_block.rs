//! Block-FP8 weights (DeepSeek-V3's, Kimi K2's and Qwen3 `-FP8` e4m3 with a `weight_scale_inv`
//! per 128 x 128 block) kept as stored, one byte per parameter, and multiplied by ember's W8A16
//! kernel (`kernels/w8a16.cu`, [`ember_kernels::w8a16`]) instead of dequantized to the model
//! dtype at load. On the CPU the op runs ember-kernels' packed CPU GEMM, tested against the
//! dequantizing loader.

use candle_core::{DType, Tensor};
use ember_core::{EmberError, Result, WeightQuantization};
use ember_kernels::w8a16::W8a16Shape;

use super::packed::{computes_in, PackedLinear};
use crate::loading::context::LoadContext;
use crate::loading::weights::{tensor_bytes, Weights};
use crate::parallel::Split;

/// The rank's part `split` of `<prefix>.weight` held as stored for the W8A16 kernel, when the
/// checkpoint stores it in block FP8, the model computes in f32 or bf16, and the part starts on a
/// block boundary; `None` to load it the usual way.
pub(crate) fn load(
    weights: &Weights,
    ctx: &LoadContext,
    in_dim: usize,
    out_dim: usize,
    split: Option<Split>,
    bias: Option<Tensor>,
) -> Result<Option<PackedLinear<W8a16Shape>>> {
    let Some(WeightQuantization::Fp8Block([block_n, block_k])) = ctx.quantization else {
        return Ok(None);
    };
    if !computes_in(weights.dtype())
        || weights.stored_dtype("weight") != Some(DType::F8E4M3)
        || !weights.contains("weight_scale_inv")
    {
        return Ok(None);
    }
    // The part: rows (outputs) or columns (inputs) of W, starting on a block boundary.
    let (row0, rows, col0, cols) = match split {
        None => (0, out_dim, 0, in_dim),
        Some(Split::Columns { start, len }) if start.is_multiple_of(block_n) => {
            (start, len, 0, in_dim)
        }
        Some(Split::Rows { start, len }) if start.is_multiple_of(block_k) => {
            (0, out_dim, start, len)
        }
        Some(_) => return Ok(None),
    };
    let err = |e: candle_core::Error| {
        EmberError::Weights(format!(
            "cannot hold `{}.weight` as fp8: {e}",
            weights.prefix()
        ))
    };
    let stored = weights.get_stored("weight")?;
    if stored.dims() != [out_dim, in_dim] {
        return Err(EmberError::Weights(format!(
            "tensor `{}.weight` has shape {:?}, expected [{out_dim}, {in_dim}]",
            weights.prefix(),
            stored.dims()
        )));
    }
    let codes = stored.to_vec2::<float8::F8E4M3>().map_err(err)?;
    let bytes: Vec<u8> = codes[row0..row0 + rows]
        .iter()
        .flat_map(|row| row[col0..col0 + cols].iter().map(|v| v.to_bits()))
        .collect();
    let (scale_rows, scale_cols) = (out_dim.div_ceil(block_n), in_dim.div_ceil(block_k));
    let all_scales = weights
        .read_as("weight_scale_inv", (scale_rows, scale_cols), DType::F32)?
        .to_vec2::<f32>()
        .map_err(err)?;
    let shape = W8a16Shape {
        m: 0,
        n: rows,
        k: cols,
        block_n,
        block_k,
    };
    let (s_row0, s_col0) = (row0 / block_n, col0 / block_k);
    let scales: Vec<f32> = all_scales[s_row0..s_row0 + rows.div_ceil(block_n)]
        .iter()
        .flat_map(|r| r[s_col0..s_col0 + cols.div_ceil(block_k)].to_vec())
        .collect();
    debug_assert_eq!(scales.len(), shape.scale_len());
    let device = weights.device();
    let weight = Tensor::from_vec(bytes, rows * cols, device).map_err(err)?;
    let scales = Tensor::from_vec(scales, shape.scale_len(), device).map_err(err)?;
    weights.note_held(tensor_bytes(&weight) + tensor_bytes(&scales));
    let layer = PackedLinear::new(weight, scales, shape, bias, None, weights.dtype());
    Ok(Some(match ctx.backends.fp8_gemm {
        crate::backends::Fp8Gemm::W8a8 => layer.with_w8a8(),
        crate::backends::Fp8Gemm::W8a16 => layer,
    }))
}
