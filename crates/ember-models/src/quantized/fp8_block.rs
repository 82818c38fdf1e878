//! Block-FP8 weights (DeepSeek-V3's, Kimi K2's and Qwen3 `-FP8` e4m3 with a `weight_scale_inv`
//! per 128 x 128 block) kept as stored, one byte per parameter, and multiplied by ember's W8A16
//! kernel (`kernels/w8a16.cu`, [`ember_kernels::w8a16`]) instead of dequantized to the model
//! dtype at load. On the CPU the op runs the kernel's reference, which is how the path is tested
//! against the dequantizing loader.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use ember_core::{EmberError, Result, WeightQuantization};
use ember_kernels::w8a16::{self, W8a16Shape};

use super::GEMV_MAX_ROWS;
use crate::linear::{LinearLayer, Split};
use crate::weights::{tensor_bytes, Weights};

/// A projection over an e4m3 weight with block scales, multiplied by the W8A16 kernel.
pub struct Fp8BlockLinear {
    /// `[n * k]` e4m3 bytes.
    weight: Tensor,
    /// `[ceil(n / block_n) * ceil(k / block_k)]` f32.
    scales: Tensor,
    shape: W8a16Shape,
    bias: Option<Tensor>,
    /// The model dtype, which [`LinearLayer::weight`] returns.
    dtype: DType,
}

impl Fp8BlockLinear {
    /// The rank's part `split` of `<prefix>.weight` held as stored, when the checkpoint stores it
    /// in block FP8, the model computes in f32 or bf16, and the part starts on a block boundary;
    /// `None` to load it the usual way.
    pub fn load(
        weights: &Weights,
        in_dim: usize,
        out_dim: usize,
        split: Option<Split>,
        bias: Option<Tensor>,
    ) -> Result<Option<Self>> {
        let Some(WeightQuantization::Fp8Block([block_n, block_k])) = weights.quantization() else {
            return Ok(None);
        };
        if !matches!(weights.dtype(), DType::F32 | DType::BF16)
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
        Ok(Some(Self {
            weight,
            scales,
            shape,
            bias,
            dtype: weights.dtype(),
        }))
    }
}

impl LinearLayer for Fp8BlockLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let m = x.elem_count() / k.max(1);
        let x2 = x.reshape((m, k))?.contiguous()?;
        let y = if m <= GEMV_MAX_ROWS {
            let op = W8a16Op {
                shape: W8a16Shape { m, ..self.shape },
            };
            x2.apply_op3_no_bwd(&self.weight, &self.scales, &op)?
        } else {
            // A prefill-sized batch: the weight dequantized on the device, then a dense GEMM.
            let op = W8a16Dequant {
                shape: self.shape,
                dtype: x2.dtype(),
            };
            let w = self.weight.apply_op2_no_bwd(&self.scales, &op)?;
            x2.matmul(&w.t()?)?
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("x has a last dimension") = self.shape.n;
        let y = y.reshape(out_dims)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    fn weight(&self) -> candle_core::Result<Tensor> {
        let cpu = candle_core::Device::Cpu;
        let bytes = self.weight.to_device(&cpu)?.to_vec1::<u8>()?;
        let scales = self.scales.to_device(&cpu)?.to_vec1::<f32>()?;
        let (n, k) = (self.shape.n, self.shape.k);
        let w: Vec<f32> = (0..n * k)
            .map(|i| w8a16::weight(&bytes, &scales, &self.shape, i / k, i % k))
            .collect();
        Tensor::from_vec(w, (n, k), self.weight.device())?.to_dtype(self.dtype)
    }
}

/// `y = x · Wᵀ` over e4m3 bytes with block scales: ember-kernels' reference on the CPU, its
/// `w8a16_gemm` kernel on CUDA. Inputs: `x` `[m, k]` (f32 or bf16), the bytes, the scales.
struct W8a16Op {
    shape: W8a16Shape,
}

impl CustomOp3 for W8a16Op {
    fn name(&self) -> &'static str {
        "ember-w8a16"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        scales: &CpuStorage,
        scales_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &w.as_slice::<u8>()?[crate::contiguous_range(w_layout, "w8a16 weights")?];
        let scales =
            &scales.as_slice::<f32>()?[crate::contiguous_range(scales_layout, "w8a16 scales")?];
        let range = crate::contiguous_range(x_layout, "w8a16 input")?;
        let (m, n) = (self.shape.m, self.shape.n);
        let wrap = candle_core::Error::wrap;
        let out = match x {
            CpuStorage::F32(x) => {
                let mut y = vec![0f32; m * n];
                w8a16::w8a16_gemm(&x[range], w, scales, &self.shape, &mut y).map_err(wrap)?;
                CpuStorage::F32(y)
            }
            CpuStorage::BF16(x) => {
                let mut y = vec![half::bf16::ZERO; m * n];
                w8a16::w8a16_gemm(&x[range], w, scales, &self.shape, &mut y).map_err(wrap)?;
                CpuStorage::BF16(y)
            }
            other => candle_core::bail!(
                "w8a16 takes f32 or bf16 inputs, not {:?}",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        };
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        w: &candle_core::CudaStorage,
        w_layout: &Layout,
        scales: &candle_core::CudaStorage,
        scales_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let device = x.device().clone();
        let kernels = crate::cuda_attention::kernels(&device)?;
        let w = w
            .as_cuda_slice::<u8>()?
            .slice(crate::contiguous_range(w_layout, "w8a16 weights")?);
        let scales = scales
            .as_cuda_slice::<f32>()?
            .slice(crate::contiguous_range(scales_layout, "w8a16 scales")?);
        let range = crate::contiguous_range(x_layout, "w8a16 input")?;
        let (m, n) = (self.shape.m, self.shape.n);
        let wrap = candle_core::Error::wrap;
        let out = match x.dtype() {
            DType::F32 => {
                let xs = x.as_cuda_slice::<f32>()?.slice(range);
                let mut y = device.alloc_zeros::<f32>(m * n)?;
                kernels
                    .w8a16_gemm(&xs, &w, &scales, &self.shape, &mut y)
                    .map_err(wrap)?;
                candle_core::CudaStorage::wrap_cuda_slice(y, device)
            }
            DType::BF16 => {
                let xs = x.as_cuda_slice::<half::bf16>()?.slice(range);
                let mut y = device.alloc_zeros::<half::bf16>(m * n)?;
                kernels
                    .w8a16_gemm(&xs, &w, &scales, &self.shape, &mut y)
                    .map_err(wrap)?;
                candle_core::CudaStorage::wrap_cuda_slice(y, device)
            }
            other => candle_core::bail!("w8a16 takes f32 or bf16 inputs, not {other:?}"),
        };
        Ok((out, Shape::from((m, n))))
    }
}

/// The weight `[n, k]` itself from e4m3 bytes and block scales, in `dtype` (f32 or bf16):
/// ember-kernels' `w8a16::dequantize` on the CPU, its `w8a16_dequant` kernel on CUDA.
struct W8a16Dequant {
    shape: W8a16Shape,
    dtype: DType,
}

impl CustomOp2 for W8a16Dequant {
    fn name(&self) -> &'static str {
        "ember-w8a16-dequant"
    }

    fn cpu_fwd(
        &self,
        w: &CpuStorage,
        w_layout: &Layout,
        scales: &CpuStorage,
        scales_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &w.as_slice::<u8>()?[crate::contiguous_range(w_layout, "w8a16 weights")?];
        let scales =
            &scales.as_slice::<f32>()?[crate::contiguous_range(scales_layout, "w8a16 scales")?];
        let (n, k) = (self.shape.n, self.shape.k);
        let wrap = candle_core::Error::wrap;
        let out = match self.dtype {
            DType::F32 => {
                let mut out = vec![0f32; n * k];
                w8a16::dequantize(w, scales, &self.shape, &mut out).map_err(wrap)?;
                CpuStorage::F32(out)
            }
            DType::BF16 => {
                let mut out = vec![half::bf16::ZERO; n * k];
                w8a16::dequantize(w, scales, &self.shape, &mut out).map_err(wrap)?;
                CpuStorage::BF16(out)
            }
            other => candle_core::bail!("w8a16 dequantizes to f32 or bf16, not {other:?}"),
        };
        Ok((out, Shape::from((n, k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &candle_core::CudaStorage,
        w_layout: &Layout,
        scales: &candle_core::CudaStorage,
        scales_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let device = w.device().clone();
        let kernels = crate::cuda_attention::kernels(&device)?;
        let w = w
            .as_cuda_slice::<u8>()?
            .slice(crate::contiguous_range(w_layout, "w8a16 weights")?);
        let scales = scales
            .as_cuda_slice::<f32>()?
            .slice(crate::contiguous_range(scales_layout, "w8a16 scales")?);
        let (n, k) = (self.shape.n, self.shape.k);
        let wrap = candle_core::Error::wrap;
        let out = match self.dtype {
            DType::F32 => {
                let mut out = device.alloc_zeros::<f32>(n * k)?;
                kernels
                    .w8a16_dequant(&w, &scales, &self.shape, &mut out)
                    .map_err(wrap)?;
                candle_core::CudaStorage::wrap_cuda_slice(out, device)
            }
            DType::BF16 => {
                let mut out = device.alloc_zeros::<half::bf16>(n * k)?;
                kernels
                    .w8a16_dequant(&w, &scales, &self.shape, &mut out)
                    .map_err(wrap)?;
                candle_core::CudaStorage::wrap_cuda_slice(out, device)
            }
            other => candle_core::bail!("w8a16 dequantizes to f32 or bf16, not {other:?}"),
        };
        Ok((out, Shape::from((n, k))))
    }
}
