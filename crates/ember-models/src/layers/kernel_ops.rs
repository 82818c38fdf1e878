//! ember's RMSNorm (alone, and fused with the residual add before it), SiLU-and-mul and RoPE
//! kernels in the model path (`--layer-kernels ember`), as candle custom ops: the CUDA kernels
//! (`kernels/rms_norm.cu`, `silu_and_mul.cu`, `rotary.cu`) on a GPU, their CPU references
//! (ember-kernels, the oracle the kernels are tested against) on the CPU. They take f32 and bf16;
//! callers keep candle's ops for other dtypes ([`serves`]).
//!
//! What they save over candle's ops on a GPU: the residual add and the norm after it read and
//! write the hidden state once instead of twice; the gate and up projections run as one GEMM whose
//! halves one kernel combines (instead of two GEMMs, a SiLU and a multiply); DeepSeek's
//! interleaved rotary dims are read in place instead of gathered first.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use ember_kernels::rotary::RotaryShape;
use ember_kernels::{rms_norm, rotary, silu_and_mul, Element, KernelError};

use crate::backends::LayerKernels;
use crate::TensorResult;

/// Whether ember's kernels serve tensors of `dtype` under `kernels`.
pub fn serves(kernels: LayerKernels, dtype: DType) -> bool {
    kernels == LayerKernels::Ember && matches!(dtype, DType::F32 | DType::BF16)
}

/// `x / sqrt(mean(x²) + eps) * weight` over the last dimension of `x` (`weight` of its dtype).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> TensorResult {
    x.contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &Op(RmsNorm { eps }))
}

/// `residual + delta` (rounded to the dtype) and its RMSNorm, in one pass: `(sum, normed)`.
pub fn add_rms_norm(
    delta: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> TensorResult<(Tensor, Tensor)> {
    let both = delta.contiguous()?.apply_op3_no_bwd(
        &residual.contiguous()?,
        &weight.contiguous()?,
        &Op(AddRmsNorm { eps }),
    )?;
    Ok((both.get(1)?, both.get(0)?))
}

/// `silu(h[.., :d]) * h[.., d:]` for `h` `[rows, 2d]` (gate then up): `[rows, d]`.
pub fn silu_and_mul(h: &Tensor) -> TensorResult {
    let (_, two_d) = h.dims2()?;
    h.contiguous()?
        .apply_op1_no_bwd(&Op(SiluAndMul { d: two_d / 2 }))
}

/// `x` `[tokens, heads, head_dim]` rotated by the step's rows `cos`/`sin` `[tokens, head_dim/2]`
/// (row `t` for token `t`); `interleaved` input pairs `(x[2i], x[2i+1])` come out rotate-half.
pub fn rotary_rows(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> TensorResult {
    let (_, heads, head_dim) = x.dims3()?;
    let shape = RotaryShape {
        heads,
        head_dim,
        interleaved,
    };
    x.contiguous()?
        .apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &Op(Rotary(shape)))
}

/// One of the ops above over f32 or bf16 inputs of one dtype.
trait LayerOp: Send + Sync {
    const NAME: &'static str;

    /// The output's shape for the inputs' shapes.
    fn out_shape(&self, inputs: &[&Shape]) -> candle_core::Result<Shape>;

    /// The CPU reference over the inputs' elements into `out`.
    fn cpu<T: Element>(
        &self,
        inputs: &[&[T]],
        out: &mut [T],
    ) -> std::result::Result<(), KernelError>;

    /// The kernel over the inputs' elements into `out`.
    #[cfg(feature = "cuda")]
    fn cuda<T: ember_kernels::cuda::CudaElement>(
        &self,
        kernels: &ember_kernels::cuda::CudaKernels,
        inputs: &[candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>],
        out: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    ) -> std::result::Result<(), KernelError>;
}

struct Op<L>(L);

fn run_cpu<L: LayerOp>(
    op: &L,
    inputs: &[(&CpuStorage, &Layout)],
) -> candle_core::Result<(CpuStorage, Shape)> {
    let shapes: Vec<&Shape> = inputs.iter().map(|(_, l)| l.shape()).collect();
    let shape = op.out_shape(&shapes)?;
    fn go<L: LayerOp, T: Element + candle_core::WithDType>(
        op: &L,
        inputs: &[(&CpuStorage, &Layout)],
        n: usize,
    ) -> candle_core::Result<Vec<T>> {
        let slices = inputs
            .iter()
            .map(|(s, l)| {
                Ok(&s.as_slice::<T>()?[crate::device::kernels::contiguous_range(l, L::NAME)?])
            })
            .collect::<candle_core::Result<Vec<&[T]>>>()?;
        let mut out = vec![T::from_f32(0.0); n];
        op.cpu(&slices, &mut out)
            .map_err(candle_core::Error::wrap)?;
        Ok(out)
    }
    let n = shape.elem_count();
    let out = match inputs[0].0 {
        CpuStorage::F32(_) => CpuStorage::F32(go::<L, f32>(op, inputs, n)?),
        CpuStorage::BF16(_) => CpuStorage::BF16(go::<L, half::bf16>(op, inputs, n)?),
        other => candle_core::bail!(
            "{} takes f32 or bf16, not {:?}",
            L::NAME,
            candle_core::backend::BackendStorage::dtype(other)
        ),
    };
    Ok((out, shape))
}

#[cfg(feature = "cuda")]
fn run_cuda<L: LayerOp>(
    op: &L,
    inputs: &[(&candle_core::CudaStorage, &Layout)],
) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let shapes: Vec<&Shape> = inputs.iter().map(|(_, l)| l.shape()).collect();
    let shape = op.out_shape(&shapes)?;
    let device = inputs[0].0.device().clone();
    let kernels = crate::device::kernels::kernels(&device)?;
    fn go<
        L: LayerOp,
        T: ember_kernels::cuda::CudaElement + candle_core::cuda_backend::CudaDType,
    >(
        op: &L,
        kernels: &ember_kernels::cuda::CudaKernels,
        device: &candle_core::CudaDevice,
        inputs: &[(&candle_core::CudaStorage, &Layout)],
        n: usize,
    ) -> candle_core::Result<candle_core::CudaStorage> {
        let views = inputs
            .iter()
            .map(|(s, l)| {
                Ok(s.as_cuda_slice::<T>()?
                    .slice(crate::device::kernels::contiguous_range(l, L::NAME)?))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut out = device.alloc_zeros::<T>(n)?;
        op.cuda(kernels, &views, &mut out)
            .map_err(candle_core::Error::wrap)?;
        Ok(candle_core::CudaStorage::wrap_cuda_slice(
            out,
            device.clone(),
        ))
    }
    let n = shape.elem_count();
    let out = match inputs[0].0.dtype() {
        DType::F32 => go::<L, f32>(op, &kernels, &device, inputs, n)?,
        DType::BF16 => go::<L, half::bf16>(op, &kernels, &device, inputs, n)?,
        other => candle_core::bail!("{} takes f32 or bf16, not {other:?}", L::NAME),
    };
    Ok((out, shape))
}

/// All inputs of one dtype.
fn same_dtype(name: &str, dtypes: &[DType]) -> candle_core::Result<()> {
    if dtypes.windows(2).any(|w| w[0] != w[1]) {
        candle_core::bail!("{name}: inputs of mixed dtypes {dtypes:?}");
    }
    Ok(())
}

impl<L: LayerOp> CustomOp1 for Op<L> {
    fn name(&self) -> &'static str {
        L::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        run_cpu(&self.0, &[(s, l)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        run_cuda(&self.0, &[(s, l)])
    }
}

impl<L: LayerOp> CustomOp2 for Op<L> {
    fn name(&self) -> &'static str {
        L::NAME
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        same_dtype(L::NAME, &[a.dtype(), b.dtype()])?;
        run_cpu(&self.0, &[(a, la), (b, lb)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        la: &Layout,
        b: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        same_dtype(L::NAME, &[a.dtype(), b.dtype()])?;
        run_cuda(&self.0, &[(a, la), (b, lb)])
    }
}

impl<L: LayerOp> CustomOp3 for Op<L> {
    fn name(&self) -> &'static str {
        L::NAME
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
        c: &CpuStorage,
        lc: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        same_dtype(L::NAME, &[a.dtype(), b.dtype(), c.dtype()])?;
        run_cpu(&self.0, &[(a, la), (b, lb), (c, lc)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        la: &Layout,
        b: &candle_core::CudaStorage,
        lb: &Layout,
        c: &candle_core::CudaStorage,
        lc: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        same_dtype(L::NAME, &[a.dtype(), b.dtype(), c.dtype()])?;
        run_cuda(&self.0, &[(a, la), (b, lb), (c, lc)])
    }
}

struct RmsNorm {
    eps: f32,
}

impl LayerOp for RmsNorm {
    const NAME: &'static str = "ember-rms-norm";

    fn out_shape(&self, inputs: &[&Shape]) -> candle_core::Result<Shape> {
        Ok(inputs[0].clone())
    }

    fn cpu<T: Element>(&self, i: &[&[T]], out: &mut [T]) -> std::result::Result<(), KernelError> {
        rms_norm::rms_norm(i[0], i[1], self.eps, out)
    }

    #[cfg(feature = "cuda")]
    fn cuda<T: ember_kernels::cuda::CudaElement>(
        &self,
        k: &ember_kernels::cuda::CudaKernels,
        i: &[candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>],
        out: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    ) -> std::result::Result<(), KernelError> {
        k.rms_norm(&i[0], &i[1], self.eps, &mut out.as_view_mut())
    }
}

/// Inputs `delta`, `residual`, `weight`; output `[2, ..]`: the norm, then the sum.
struct AddRmsNorm {
    eps: f32,
}

impl LayerOp for AddRmsNorm {
    const NAME: &'static str = "ember-add-rms-norm";

    fn out_shape(&self, inputs: &[&Shape]) -> candle_core::Result<Shape> {
        if inputs[0] != inputs[1] {
            candle_core::bail!(
                "{}: delta {:?} and residual {:?} differ",
                Self::NAME,
                inputs[0],
                inputs[1]
            );
        }
        let mut dims = vec![2];
        dims.extend_from_slice(inputs[0].dims());
        Ok(Shape::from(dims))
    }

    fn cpu<T: Element>(&self, i: &[&[T]], out: &mut [T]) -> std::result::Result<(), KernelError> {
        let (normed, sum) = out.split_at_mut(i[0].len());
        sum.copy_from_slice(i[1]);
        rms_norm::fused_add_rms_norm(i[0], sum, i[2], self.eps, normed)
    }

    #[cfg(feature = "cuda")]
    fn cuda<T: ember_kernels::cuda::CudaElement>(
        &self,
        k: &ember_kernels::cuda::CudaKernels,
        i: &[candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>],
        out: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    ) -> std::result::Result<(), KernelError> {
        let (mut normed, mut sum) = out.split_at_mut(i[0].len());
        k.stream().memcpy_dtod(&i[1], &mut sum)?;
        k.fused_add_rms_norm(&i[0], &mut sum, &i[2], self.eps, &mut normed)
    }
}

/// Input `[rows, 2d]`, gate then up.
struct SiluAndMul {
    d: usize,
}

impl LayerOp for SiluAndMul {
    const NAME: &'static str = "ember-silu-and-mul";

    fn out_shape(&self, inputs: &[&Shape]) -> candle_core::Result<Shape> {
        let (rows, two_d) = inputs[0].dims2()?;
        if two_d != 2 * self.d {
            candle_core::bail!(
                "{}: [{rows}, {two_d}] is not [rows, 2 x {}]",
                Self::NAME,
                self.d
            );
        }
        Ok(Shape::from((rows, self.d)))
    }

    fn cpu<T: Element>(&self, i: &[&[T]], out: &mut [T]) -> std::result::Result<(), KernelError> {
        silu_and_mul::silu_and_mul(i[0], self.d, out)
    }

    #[cfg(feature = "cuda")]
    fn cuda<T: ember_kernels::cuda::CudaElement>(
        &self,
        k: &ember_kernels::cuda::CudaKernels,
        i: &[candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>],
        out: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    ) -> std::result::Result<(), KernelError> {
        k.silu_and_mul(&i[0], self.d, out)
    }
}

/// Inputs `x`, the step's `cos` and `sin` rows.
struct Rotary(RotaryShape);

impl LayerOp for Rotary {
    const NAME: &'static str = "ember-rotary";

    fn out_shape(&self, inputs: &[&Shape]) -> candle_core::Result<Shape> {
        Ok(inputs[0].clone())
    }

    fn cpu<T: Element>(&self, i: &[&[T]], out: &mut [T]) -> std::result::Result<(), KernelError> {
        rotary::rotary_embedding_rows(i[0], i[1], i[2], &self.0, out)
    }

    #[cfg(feature = "cuda")]
    fn cuda<T: ember_kernels::cuda::CudaElement>(
        &self,
        k: &ember_kernels::cuda::CudaKernels,
        i: &[candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>],
        out: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    ) -> std::result::Result<(), KernelError> {
        k.rotary_embedding_rows(&i[0], &i[1], &i[2], &self.0, out)
    }
}
