//! FP8 e4m3 weights: DeepSeek's block-scaled checkpoints (one f32 `weight_scale_inv` per
//! 128x128 block; `scale_fmt: ue8m0` scales are powers of two stored as f32, needing no decoding).

use candle_core::Tensor;

use crate::TensorResult;

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
