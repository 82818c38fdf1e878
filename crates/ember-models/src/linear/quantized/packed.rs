//! A projection over a weight held as its checkpoint packs it (4-bit codes, e4m3 bytes), one
//! layer for every packed format. On a GPU, batches of up to [`GEMV_MAX_ROWS`] rows multiply
//! the packed weight with the format's GEMV kernel; larger ones (prefill) dequantize it on the
//! device and run a dense GEMM. On the CPU every batch runs ember-kernels' packed CPU GEMM
//! ([`ember_kernels::packed_cpu`]: weights decoded in registers for a decode step's rows, a
//! block of weight rows at a time into a tile in cache for prefill), and the dequantization
//! (the layer's [`LinearLayer::weight`]) the reference. The formats are [`ember_kernels::w4a16`]
//! ([`crate::linear::quantized::int4`]) and [`ember_kernels::w8a16`]
//! ([`crate::linear::quantized::fp8_block`], online FP8).

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
#[cfg(feature = "cuda")]
use ember_kernels::cuda::CudaElement;
use ember_kernels::w4a16::{self, W4a16Shape};
use ember_kernels::w8a16::{self, W8a16Shape};
use ember_kernels::{Element, KernelError};

use super::GEMV_MAX_ROWS;
use crate::device::kernels::cpu_input;
#[cfg(feature = "cuda")]
use crate::device::kernels::{cuda_input, device_kernels};
use crate::linear::LinearLayer;

/// Whether the packed kernels compute in `dtype` (f32 and bf16); other model dtypes dequantize
/// at load.
pub(crate) fn computes_in(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16)
}

/// A packed weight format: its shape, and its kernels over the packed bytes and the f32
/// parameters (qparams or block scales) beside them.
pub(crate) trait PackedFormat: Copy + Send + Sync + 'static {
    /// The op names candle reports.
    const GEMM: &'static str;
    const DEQUANT: &'static str;

    /// Outputs `n` and inputs `k` of the weight `[n, k]`.
    fn dims(&self) -> (usize, usize);

    /// The shape, as either format.
    fn packed_shape(&self) -> PackedShape;

    /// The CPU GEMM over `m` rows (ember-kernels' packed CPU GEMM).
    fn gemm<T: Element>(
        &self,
        m: usize,
        x: &[T],
        bytes: &[u8],
        params: &[f32],
        y: &mut [T],
    ) -> Result<(), KernelError>;

    /// The CPU dequantization reference: the weight `[n, k]` in `T`.
    fn dequant<T: Element>(
        &self,
        bytes: &[u8],
        params: &[f32],
        out: &mut [T],
    ) -> Result<(), KernelError>;

    /// [`PackedFormat::gemm`] on the GPU.
    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    fn gemm_cuda<T: ember_kernels::cuda::CudaElement>(
        &self,
        kernels: &ember_kernels::cuda::CudaKernels,
        m: usize,
        x: &candle_core::cuda_backend::cudarc::driver::CudaView<T>,
        bytes: &candle_core::cuda_backend::cudarc::driver::CudaView<u8>,
        params: &candle_core::cuda_backend::cudarc::driver::CudaView<f32>,
        y: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    ) -> Result<(), KernelError>;

    /// [`PackedFormat::dequant`] on the GPU.
    #[cfg(feature = "cuda")]
    fn dequant_cuda<T: ember_kernels::cuda::CudaElement>(
        &self,
        kernels: &ember_kernels::cuda::CudaKernels,
        bytes: &candle_core::cuda_backend::cudarc::driver::CudaView<u8>,
        params: &candle_core::cuda_backend::cudarc::driver::CudaView<f32>,
        out: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    ) -> Result<(), KernelError>;
}

/// Implements [`PackedFormat`] for a kernel shape by delegating to its packed CPU GEMM, its
/// module's dequantization reference and its `CudaKernels` launchers (the formats differ only
/// in these names).
macro_rules! packed_format {
    ($shape:ident, $module:ident, $cpu_gemm:ident, $gemm:ident, $dequant:ident, $gemm_name:literal, $dequant_name:literal, $variant:ident) => {
        impl PackedFormat for $shape {
            const GEMM: &'static str = $gemm_name;
            const DEQUANT: &'static str = $dequant_name;

            fn dims(&self) -> (usize, usize) {
                (self.n, self.k)
            }

            fn packed_shape(&self) -> PackedShape {
                PackedShape::$variant(*self)
            }

            fn gemm<T: Element>(
                &self,
                m: usize,
                x: &[T],
                bytes: &[u8],
                params: &[f32],
                y: &mut [T],
            ) -> Result<(), KernelError> {
                ember_kernels::packed_cpu::$cpu_gemm(x, bytes, params, &$shape { m, ..*self }, y)
            }

            fn dequant<T: Element>(
                &self,
                bytes: &[u8],
                params: &[f32],
                out: &mut [T],
            ) -> Result<(), KernelError> {
                $module::dequantize(bytes, params, self, out)
            }

            #[cfg(feature = "cuda")]
            fn gemm_cuda<T: ember_kernels::cuda::CudaElement>(
                &self,
                kernels: &ember_kernels::cuda::CudaKernels,
                m: usize,
                x: &candle_core::cuda_backend::cudarc::driver::CudaView<T>,
                bytes: &candle_core::cuda_backend::cudarc::driver::CudaView<u8>,
                params: &candle_core::cuda_backend::cudarc::driver::CudaView<f32>,
                y: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
            ) -> Result<(), KernelError> {
                kernels.$gemm(x, bytes, params, &$shape { m, ..*self }, y)
            }

            #[cfg(feature = "cuda")]
            fn dequant_cuda<T: ember_kernels::cuda::CudaElement>(
                &self,
                kernels: &ember_kernels::cuda::CudaKernels,
                bytes: &candle_core::cuda_backend::cudarc::driver::CudaView<u8>,
                params: &candle_core::cuda_backend::cudarc::driver::CudaView<f32>,
                out: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
            ) -> Result<(), KernelError> {
                kernels.$dequant(bytes, params, self, out)
            }
        }
    };
}

packed_format!(
    W4a16Shape,
    w4a16,
    w4a16_cpu,
    w4a16_gemm,
    w4a16_dequant,
    "ember-w4a16",
    "ember-w4a16-dequant",
    W4a16
);
packed_format!(
    W8a16Shape,
    w8a16,
    w8a16_cpu,
    w8a16_gemm,
    w8a16_dequant,
    "ember-w8a16",
    "ember-w8a16-dequant",
    W8a16
);

/// A projection over a packed weight (see the module doc).
pub(crate) struct PackedLinear<F: PackedFormat> {
    /// The packed bytes (u8).
    bytes: Tensor,
    /// The f32 parameters beside them.
    params: Tensor,
    format: F,
    bias: Option<Tensor>,
    /// The input columns the kernels take, in their order (GPTQ's activation order), if permuted.
    order: Option<Tensor>,
    /// The model dtype, which [`LinearLayer::weight`] returns.
    dtype: DType,
    /// W8A8 (e4m3 weights with 128-input scale blocks only): every batch quantizes its
    /// activations and runs the FP8 GEMM.
    w8a8: Option<ember_kernels::w8a8::W8a8Shape>,
}

impl<F: PackedFormat> PackedLinear<F> {
    pub fn new(
        bytes: Tensor,
        params: Tensor,
        format: F,
        bias: Option<Tensor>,
        order: Option<Tensor>,
        dtype: DType,
    ) -> Self {
        Self {
            bytes,
            params,
            format,
            bias,
            order,
            dtype,
            w8a8: None,
        }
    }
}

impl PackedLinear<W8a16Shape> {
    /// The same projection multiplied by the W8A8 GEMM, when its scale blocks are 128 inputs wide;
    /// unchanged otherwise.
    pub(crate) fn with_w8a8(self) -> Self {
        if self.format.block_k != ember_kernels::w8a8::GROUP || self.order.is_some() {
            return self;
        }
        let shape = ember_kernels::w8a8::W8a8Shape {
            m: 0,
            n: self.format.n,
            k: self.format.k,
            block_n: self.format.block_n,
        };
        Self {
            w8a8: Some(shape),
            ..self
        }
    }
}

/// The shape of a packed weight, in either format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedShape {
    W4a16(W4a16Shape),
    W8a16(W8a16Shape),
}

/// A packed weight as [`PackedLinear`] holds it: the bytes (u8), the f32 parameters beside them
/// (qparams or block scales) and the shape.
#[derive(Clone)]
pub struct PackedWeight {
    pub bytes: Tensor,
    pub params: Tensor,
    pub shape: PackedShape,
    /// The model dtype the layer computes in.
    pub dtype: DType,
    /// An e4m3 weight multiplied by the W8A8 GEMM (activations quantized to e4m3).
    pub w8a8: bool,
}

impl PackedWeight {
    /// A projection over the weight (views of a stack, say), without bias or input order.
    pub(crate) fn layer(self) -> std::sync::Arc<dyn LinearLayer> {
        let (bytes, params, dtype) = (self.bytes, self.params, self.dtype);
        match self.shape {
            PackedShape::W4a16(s) => {
                std::sync::Arc::new(PackedLinear::new(bytes, params, s, None, None, dtype))
            }
            PackedShape::W8a16(s) => {
                let layer = PackedLinear::new(bytes, params, s, None, None, dtype);
                std::sync::Arc::new(if self.w8a8 { layer.with_w8a8() } else { layer })
            }
        }
    }
}

impl<F: PackedFormat> LinearLayer for PackedLinear<F> {
    fn packed(&self) -> Option<PackedWeight> {
        if self.bias.is_some() || self.order.is_some() {
            return None;
        }
        Some(PackedWeight {
            bytes: self.bytes.clone(),
            params: self.params.clone(),
            shape: self.format.packed_shape(),
            dtype: self.dtype,
            w8a8: self.w8a8.is_some(),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, _) = self.format.dims();
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let m = x.elem_count() / k.max(1);
        let x2 = x.reshape((m, k))?;
        let x2 = match &self.order {
            Some(order) => x2.index_select(order, 1)?,
            None => x2.contiguous()?,
        };
        let y = if let Some(shape) = self.w8a8 {
            let op = W8a8Gemm {
                shape: ember_kernels::w8a8::W8a8Shape { m, ..shape },
            };
            x2.apply_op3_no_bwd(&self.bytes, &self.params, &Packed(op))?
        } else if m <= GEMV_MAX_ROWS || x2.device().is_cpu() {
            // The CPU's GEMM picks its own path by row count, never expanding the weight.
            let op = Gemm {
                format: self.format,
                m,
            };
            x2.apply_op3_no_bwd(&self.bytes, &self.params, &Packed(op))?
        } else {
            let op = Dequant {
                format: self.format,
            };
            let w = x2.apply_op3_no_bwd(&self.bytes, &self.params, &Packed(op))?;
            x2.matmul(&w.t()?)?
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("x has a last dimension") = n;
        let y = y.reshape(out_dims)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    fn weight(&self) -> candle_core::Result<Tensor> {
        let cpu = candle_core::Device::Cpu;
        let (n, k) = self.format.dims();
        let bytes = self.bytes.to_device(&cpu)?.to_vec1::<u8>()?;
        let params = self.params.to_device(&cpu)?.to_vec1::<f32>()?;
        let mut kernel_order = vec![0f32; n * k];
        self.format
            .dequant(&bytes, &params, &mut kernel_order)
            .map_err(candle_core::Error::wrap)?;
        // Columns back to the inputs' order.
        let w = match &self.order {
            Some(order) => {
                let order = order.to_device(&cpu)?.to_vec1::<u32>()?;
                let mut w = vec![0f32; n * k];
                for j in 0..n {
                    for (c, &input) in order.iter().enumerate() {
                        w[j * k + input as usize] = kernel_order[j * k + c];
                    }
                }
                w
            }
            None => kernel_order,
        };
        Tensor::from_vec(w, (n, k), self.bytes.device())?.to_dtype(self.dtype)
    }
}

type OpResult = candle_core::Result<()>;

/// One of the packed ops over the activations `x` `[m, k]` (f32 or bf16), the packed bytes (u8)
/// and their f32 parameters, into an output in `x`'s dtype.
trait PackedOp: Send + Sync {
    /// The name candle reports.
    const NAME: &'static str;

    /// The output's `[rows, cols]`.
    fn out_dims(&self) -> (usize, usize);

    /// The CPU op into `out`.
    fn cpu<T: Element>(&self, x: &[T], bytes: &[u8], params: &[f32], out: &mut [T]) -> OpResult;

    /// The kernels into the call's output.
    #[cfg(feature = "cuda")]
    fn cuda<T: CudaElement>(&self, call: PackedCall<'_, T>) -> OpResult;
}

/// What a packed op's kernel call gets: the kernels on the inputs' GPU, the inputs, the output.
#[cfg(feature = "cuda")]
struct PackedCall<'a, T> {
    kernels: &'a ember_kernels::cuda::CudaKernels,
    device: &'a candle_core::CudaDevice,
    x: CudaView<'a, T>,
    bytes: CudaView<'a, u8>,
    params: CudaView<'a, f32>,
    out: &'a mut CudaSlice<T>,
}

/// The format's GEMM over `x` `[m, k]`.
struct Gemm<F> {
    format: F,
    m: usize,
}

impl<F: PackedFormat> PackedOp for Gemm<F> {
    const NAME: &'static str = F::GEMM;

    fn out_dims(&self) -> (usize, usize) {
        (self.m, self.format.dims().0)
    }

    fn cpu<T: Element>(&self, x: &[T], bytes: &[u8], params: &[f32], out: &mut [T]) -> OpResult {
        self.format
            .gemm(self.m, x, bytes, params, out)
            .map_err(candle_core::Error::wrap)
    }

    #[cfg(feature = "cuda")]
    fn cuda<T: CudaElement>(&self, c: PackedCall<'_, T>) -> OpResult {
        self.format
            .gemm_cuda(c.kernels, self.m, &c.x, &c.bytes, &c.params, c.out)
            .map_err(candle_core::Error::wrap)
    }
}

/// The weight `[n, k]` itself, in `x`'s dtype (`x` gives only its dtype).
struct Dequant<F> {
    format: F,
}

impl<F: PackedFormat> PackedOp for Dequant<F> {
    const NAME: &'static str = F::DEQUANT;

    fn out_dims(&self) -> (usize, usize) {
        self.format.dims()
    }

    fn cpu<T: Element>(&self, _: &[T], bytes: &[u8], params: &[f32], out: &mut [T]) -> OpResult {
        self.format
            .dequant(bytes, params, out)
            .map_err(candle_core::Error::wrap)
    }

    #[cfg(feature = "cuda")]
    fn cuda<T: CudaElement>(&self, c: PackedCall<'_, T>) -> OpResult {
        self.format
            .dequant_cuda(c.kernels, &c.bytes, &c.params, c.out)
            .map_err(candle_core::Error::wrap)
    }
}

/// The W8A8 GEMM over `x` `[m, k]`, e4m3 bytes and block scales: activations quantized per token
/// and 128-input group, then the FP8 GEMM (tensor cores on CUDA, the references on the CPU).
struct W8a8Gemm {
    shape: ember_kernels::w8a8::W8a8Shape,
}

impl PackedOp for W8a8Gemm {
    const NAME: &'static str = "ember-w8a8";

    fn out_dims(&self) -> (usize, usize) {
        (self.shape.m, self.shape.n)
    }

    fn cpu<T: Element>(&self, x: &[T], bytes: &[u8], scales: &[f32], out: &mut [T]) -> OpResult {
        use ember_kernels::w8a8;
        let wrap = candle_core::Error::wrap;
        let s = &self.shape;
        let (qa, sa) = w8a8::quantize_groups(x, s.k).map_err(wrap)?;
        w8a8::w8a8_gemm(&qa, &sa, bytes, scales, s, out).map_err(wrap)
    }

    #[cfg(feature = "cuda")]
    fn cuda<T: CudaElement>(&self, c: PackedCall<'_, T>) -> OpResult {
        let wrap = candle_core::Error::wrap;
        let s = &self.shape;
        let mut qa = c.device.alloc_zeros::<u8>(s.m * s.k)?;
        let mut sa = c.device.alloc_zeros::<f32>(s.act_scale_len())?;
        c.kernels
            .quant_fp8_groups(&c.x, s.k, &mut qa, &mut sa)
            .map_err(wrap)?;
        let (qa, sa) = (qa.as_view(), sa.as_view());
        c.kernels
            .w8a8_gemm(&qa, &sa, &c.bytes, &c.params, s, c.out)
            .map_err(wrap)
    }
}

/// A [`PackedOp`] as candle applies it: `x.apply_op3_no_bwd(bytes, params, op)`.
struct Packed<O>(O);

impl<O: PackedOp> CustomOp3 for Packed<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        bytes: &CpuStorage,
        bytes_layout: &Layout,
        params: &CpuStorage,
        params_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let bytes = cpu_input::<u8>(bytes, bytes_layout, "packed weight")?;
        let params = cpu_input::<f32>(params, params_layout, "packed params")?;
        let (rows, cols) = self.0.out_dims();
        fn go<O: PackedOp, T: Element + candle_core::WithDType>(
            op: &O,
            (x, x_layout): (&CpuStorage, &Layout),
            bytes: &[u8],
            params: &[f32],
            len: usize,
        ) -> candle_core::Result<Vec<T>> {
            let x = cpu_input::<T>(x, x_layout, O::NAME)?;
            let mut out = vec![T::from_f32(0.0); len];
            op.cpu(x, bytes, params, &mut out)?;
            Ok(out)
        }
        let (op, x, len) = (&self.0, (x, x_layout), rows * cols);
        let out = match x.0.dtype() {
            DType::F32 => CpuStorage::F32(go::<O, f32>(op, x, bytes, params, len)?),
            DType::BF16 => CpuStorage::BF16(go::<O, half::bf16>(op, x, bytes, params, len)?),
            other => candle_core::bail!("{} takes f32 or bf16 inputs, not {other:?}", O::NAME),
        };
        Ok((out, Shape::from((rows, cols))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        bytes: &candle_core::CudaStorage,
        bytes_layout: &Layout,
        params: &candle_core::CudaStorage,
        params_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (device, kernels) = device_kernels(x)?;
        let bytes = cuda_input::<u8>(bytes, bytes_layout, "packed weight")?;
        let params = cuda_input::<f32>(params, params_layout, "packed params")?;
        let (rows, cols) = self.0.out_dims();
        fn go<O: PackedOp, T: CudaElement + candle_core::cuda_backend::CudaDType>(
            op: &O,
            (x, x_layout): (&candle_core::CudaStorage, &Layout),
            (kernels, device): (&ember_kernels::cuda::CudaKernels, &candle_core::CudaDevice),
            bytes: CudaView<'_, u8>,
            params: CudaView<'_, f32>,
            len: usize,
        ) -> candle_core::Result<candle_core::CudaStorage> {
            let x = cuda_input::<T>(x, x_layout, O::NAME)?;
            let mut out = device.alloc_zeros::<T>(len)?;
            op.cuda(PackedCall {
                kernels,
                device,
                x,
                bytes,
                params,
                out: &mut out,
            })?;
            Ok(candle_core::CudaStorage::wrap_cuda_slice(
                out,
                device.clone(),
            ))
        }
        let (op, x, on, len) = (&self.0, (x, x_layout), (&*kernels, &device), rows * cols);
        let out = match x.0.dtype() {
            DType::F32 => go::<O, f32>(op, x, on, bytes, params, len)?,
            DType::BF16 => go::<O, half::bf16>(op, x, on, bytes, params, len)?,
            other => candle_core::bail!("{} takes f32 or bf16 inputs, not {other:?}", O::NAME),
        };
        Ok((out, Shape::from((rows, cols))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_kernels::w8a16::e4m3_to_f32;
    use ember_kernels::w8a8::{quantize_groups, GROUP};

    /// The W8A8 projection is the dense product of the fake-quantized activations (each group's
    /// e4m3 values times its scale) and the decoded weight, to f32 rounding: the op quantizes
    /// with the right groups and applies both scales where they belong (128 x 128 blocks with a
    /// ragged edge, n 200 and k 300).
    #[test]
    fn the_w8a8_projection_multiplies_fake_quantized_activations_by_the_decoded_weight() {
        let (m, n, k) = (5, 200, 300);
        let mut seed = 5u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed >> 8
        };
        let bytes: Vec<u8> = (0..n * k)
            .map(|_| (next() % 0x7F) as u8 | ((next() % 2) << 7) as u8)
            .collect();
        let shape = W8a16Shape {
            m: 0,
            n,
            k,
            block_n: 128,
            block_k: 128,
        };
        let scales: Vec<f32> = (0..shape.scale_len())
            .map(|_| (next() % 100 + 1) as f32 / 3000.0)
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|_| (next() % 4000) as f32 / 1000.0 - 2.0)
            .collect();
        let dev = candle_core::Device::Cpu;
        let layer = PackedLinear::new(
            Tensor::from_vec(bytes.clone(), n * k, &dev).unwrap(),
            Tensor::from_vec(scales.clone(), shape.scale_len(), &dev).unwrap(),
            shape,
            None,
            None,
            DType::F32,
        )
        .with_w8a8();
        assert!(layer.w8a8.is_some());
        let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
        let got = layer.forward(&xt).unwrap().to_vec2::<f32>().unwrap();
        let (qa, sa) = quantize_groups(&x, k).unwrap();
        let groups = k.div_ceil(GROUP);
        for r in 0..m {
            for j in 0..n {
                let (mut want, mut magnitude) = (0f32, 0f32);
                for c in 0..k {
                    let a = e4m3_to_f32(qa[r * k + c]) * sa[r * groups + c / GROUP];
                    let w = e4m3_to_f32(bytes[j * k + c]) * scales[(j / 128) * groups + c / 128];
                    want += a * w;
                    magnitude += (a * w).abs();
                }
                let g = got[r][j];
                assert!(
                    (g - want).abs() <= 1e-5 * magnitude + 1e-6,
                    "{r},{j}: {g} vs {want}"
                );
            }
        }
        // A weight whose scale blocks are not 128 inputs wide keeps W8A16.
        let other = PackedLinear::new(
            Tensor::from_vec(bytes, n * k, &dev).unwrap(),
            Tensor::from_vec(vec![1f32; n], n, &dev).unwrap(),
            W8a16Shape {
                m: 0,
                n,
                k,
                block_n: 1,
                block_k: k,
            },
            None,
            None,
            DType::F32,
        )
        .with_w8a8();
        assert!(other.w8a8.is_none());
    }
}
