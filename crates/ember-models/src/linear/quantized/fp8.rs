//! FP8 e4m3 weights: DeepSeek's block-scaled checkpoints (one f32 `weight_scale_inv` per
//! 128x128 block; `scale_fmt: ue8m0` scales are powers of two stored as f32, needing no decoding),
//! and online FP8 (`--quantization fp8` on a 16/32-bit checkpoint): weights quantized at load to
//! e4m3 with one f32 scale per output channel, held as e4m3 and multiplied by the W8A16 kernels
//! (one scale block per output row; on the CPU ember-kernels' packed CPU GEMM), the fused MoE's
//! grouped one included; with `--packed-weights false`, dequantized per matmul.

use candle_core::{DType, Device, Module, Tensor};

use crate::linear::LinearLayer;
use crate::TensorResult;

/// float8_e4m3fn's largest finite value.
pub const E4M3_MAX: f32 = 448.0;

/// The smallest per-channel scale, as vLLM's dynamic FP8 kernels floor it: an all-zero (or
/// nearly zero) row gets a finite scale instead of dividing by zero.
const MIN_SCALE: f32 = 1.0 / (E4M3_MAX * 512.0);

/// Quantizes `weight` `[out, in]` to e4m3 per output channel, as vLLM's dynamic FP8 kernels do:
/// `scale = max(absmax(row) / 448, 1 / (448·512))`, `q = clamp(w / scale, ±448)` rounded to
/// nearest even. Returns `(q [out, in] F8E4M3, scale [out, 1] f32)`, on the weight's device.
pub fn quantize_per_channel(weight: &Tensor) -> TensorResult<(Tensor, Tensor)> {
    let (rows, cols) = weight.dims2()?;
    let (codes, scales) = per_channel_codes(weight)?;
    let codes: Vec<float8::F8E4M3> = codes.into_iter().map(float8::F8E4M3::from_bits).collect();
    let q = Tensor::from_vec(codes, (rows, cols), &Device::Cpu)?;
    let scale = Tensor::from_vec(scales, (rows, 1), &Device::Cpu)?;
    Ok((
        q.to_device(weight.device())?,
        scale.to_device(weight.device())?,
    ))
}

/// [`quantize_per_channel`]'s e4m3 bytes `[out · in]` and scales `[out]`, on the host, rows in
/// parallel.
fn per_channel_codes(weight: &Tensor) -> TensorResult<(Vec<u8>, Vec<f32>)> {
    use rayon::prelude::*;
    let (_, cols) = weight.dims2()?;
    let w = weight.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let w = w.flatten_all()?.to_vec1::<f32>()?;
    let mut codes = vec![0u8; w.len()];
    let scales: Vec<f32> = w
        .par_chunks(cols.max(1))
        .zip(codes.par_chunks_mut(cols.max(1)))
        .map(|(row, out)| {
            let absmax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            let scale = (absmax / E4M3_MAX).max(MIN_SCALE);
            // Division, not a multiply by 1/scale: the two round differently, and vLLM divides.
            for (o, x) in out.iter_mut().zip(row) {
                *o = float8::F8E4M3::from_f32((x / scale).clamp(-E4M3_MAX, E4M3_MAX)).to_bits();
            }
            scale
        })
        .collect();
    Ok((codes, scales))
}

/// [`quantize_per_channel`] held for the W8A16 kernels: the e4m3 bytes `[out · in]` (u8) and
/// the scales `[out]` as one block per output row, in the weight's dtype.
pub(crate) fn packed_per_channel(
    weight: &Tensor,
) -> TensorResult<(Tensor, Tensor, ember_kernels::w8a16::W8a16Shape)> {
    let (n, k) = weight.dims2()?;
    let (bytes, scales) = per_channel_codes(weight)?;
    Ok((
        Tensor::from_vec(bytes, n * k, weight.device())?,
        Tensor::from_vec(scales, n, weight.device())?,
        ember_kernels::w8a16::W8a16Shape {
            m: 0,
            n,
            k,
            block_n: 1,
            block_k: k.max(1),
        },
    ))
}

/// `q · scale` per output channel, in f32 (`q` e4m3 `[out, in]`, `scale` f32 `[out, 1]`).
pub fn dequantize_per_channel(q: &Tensor, scale: &Tensor) -> TensorResult {
    q.to_dtype(DType::F32)?.broadcast_mul(scale)
}

/// A linear layer holding its weight in e4m3 with per-output-channel f32 scales (1 byte per
/// parameter plus 4 per row). The CPU has no e4m3 GEMM, so each forward dequantizes the weight
/// into the activations' dtype and runs the plain matmul: half the weight memory of bf16,
/// paid for with a dequantization per call.
pub struct Fp8ChannelLinear {
    weight: Tensor,
    scale: Tensor,
    bias: Option<Tensor>,
    /// The dtype the weight was given in (the model dtype).
    dtype: DType,
}

impl Fp8ChannelLinear {
    /// Quantizes `weight` `[out, in]` (see [`quantize_per_channel`]); `bias` stays as given.
    pub fn quantize(weight: &Tensor, bias: Option<Tensor>) -> TensorResult<Self> {
        let dtype = weight.dtype();
        let (weight, scale) = quantize_per_channel(weight)?;
        Ok(Self {
            weight,
            scale,
            bias,
            dtype,
        })
    }

    /// Bytes of the e4m3 weight and its scales.
    pub fn weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        bytes(&self.weight) + bytes(&self.scale)
    }
}

impl LinearLayer for Fp8ChannelLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = dequantize_per_channel(&self.weight, &self.scale)?.to_dtype(x.dtype())?;
        candle_nn::Linear::new(w, self.bias.clone()).forward(x)
    }

    fn weight(&self) -> candle_core::Result<Tensor> {
        dequantize_per_channel(&self.weight, &self.scale)?.to_dtype(self.dtype)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

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
