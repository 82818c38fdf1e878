//! A candle custom op whose inputs and output are all of one dtype, f32 or bf16 (ember's layer
//! kernels, MLA decode, prefill attention): the op says its output shape and its CPU and CUDA
//! bodies over the inputs' contiguous elements; [`SameDtype`] does the candle plumbing (dtype
//! checks, slicing, the output buffer) for one, two or three inputs.

#[cfg(feature = "cuda")]
use candle_core::{
    cuda_backend::cudarc::driver::{CudaSlice, CudaView},
    CudaDevice, CudaStorage,
};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape};
#[cfg(feature = "cuda")]
use ember_kernels::cuda::{CudaElement, CudaKernels};
use ember_kernels::Element;

use super::kernels::contiguous_range;

/// An op over inputs and an output of one dtype, f32 or bf16.
pub trait SameDtypeOp: Send + Sync {
    /// The name candle reports.
    const NAME: &'static str;

    /// The output's shape for the inputs' shapes.
    fn out_shape(&self, inputs: &[&Shape]) -> candle_core::Result<Shape>;

    /// The CPU reference over the inputs' elements into `out`.
    fn cpu<T: Element>(&self, inputs: &[&[T]], out: &mut [T]) -> candle_core::Result<()>;

    /// The kernel over the inputs' elements into the output.
    #[cfg(feature = "cuda")]
    fn cuda<T: CudaElement>(&self, call: CudaCall<'_, T>) -> candle_core::Result<()>;
}

/// What an op's kernel call gets: ember's kernels on the inputs' GPU, the inputs, the output.
#[cfg(feature = "cuda")]
pub struct CudaCall<'a, T> {
    pub kernels: &'a CudaKernels,
    pub device: &'a CudaDevice,
    pub inputs: &'a [CudaView<'a, T>],
    pub out: &'a mut CudaSlice<T>,
}

/// A [`SameDtypeOp`] as candle applies it (`apply_op{1,2,3}_no_bwd`).
pub struct SameDtype<O>(pub O);

type CpuOut = candle_core::Result<(CpuStorage, Shape)>;
#[cfg(feature = "cuda")]
type CudaOut = candle_core::Result<(CudaStorage, Shape)>;

fn run_cpu<O: SameDtypeOp>(op: &O, inputs: &[(&CpuStorage, &Layout)]) -> CpuOut {
    use candle_core::backend::BackendStorage;
    same_dtype(O::NAME, inputs.iter().map(|(s, _)| s.dtype()))?;
    let shapes: Vec<&Shape> = inputs.iter().map(|(_, l)| l.shape()).collect();
    let shape = op.out_shape(&shapes)?;
    fn go<O: SameDtypeOp, T: Element + candle_core::WithDType>(
        op: &O,
        inputs: &[(&CpuStorage, &Layout)],
        n: usize,
    ) -> candle_core::Result<Vec<T>> {
        let slices = inputs
            .iter()
            .map(|(s, l)| Ok(&s.as_slice::<T>()?[contiguous_range(l, O::NAME)?]))
            .collect::<candle_core::Result<Vec<&[T]>>>()?;
        let mut out = vec![T::from_f32(0.0); n];
        op.cpu(&slices, &mut out)?;
        Ok(out)
    }
    let n = shape.elem_count();
    let out = match inputs[0].0.dtype() {
        DType::F32 => CpuStorage::F32(go::<O, f32>(op, inputs, n)?),
        DType::BF16 => CpuStorage::BF16(go::<O, half::bf16>(op, inputs, n)?),
        other => candle_core::bail!("{} takes f32 or bf16, not {other:?}", O::NAME),
    };
    Ok((out, shape))
}

#[cfg(feature = "cuda")]
fn run_cuda<O: SameDtypeOp>(op: &O, inputs: &[(&CudaStorage, &Layout)]) -> CudaOut {
    use candle_core::backend::BackendStorage;
    same_dtype(O::NAME, inputs.iter().map(|(s, _)| s.dtype()))?;
    let shapes: Vec<&Shape> = inputs.iter().map(|(_, l)| l.shape()).collect();
    let shape = op.out_shape(&shapes)?;
    let device = inputs[0].0.device().clone();
    let kernels = super::kernels::kernels(&device)?;
    fn go<O: SameDtypeOp, T: CudaElement + candle_core::cuda_backend::CudaDType>(
        op: &O,
        kernels: &CudaKernels,
        device: &CudaDevice,
        inputs: &[(&CudaStorage, &Layout)],
        n: usize,
    ) -> candle_core::Result<CudaStorage> {
        let views = inputs
            .iter()
            .map(|(s, l)| Ok(s.as_cuda_slice::<T>()?.slice(contiguous_range(l, O::NAME)?)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut out = device.alloc_zeros::<T>(n)?;
        op.cuda(CudaCall {
            kernels,
            device,
            inputs: &views,
            out: &mut out,
        })?;
        Ok(CudaStorage::wrap_cuda_slice(out, device.clone()))
    }
    let n = shape.elem_count();
    let out = match inputs[0].0.dtype() {
        DType::F32 => go::<O, f32>(op, &kernels, &device, inputs, n)?,
        DType::BF16 => go::<O, half::bf16>(op, &kernels, &device, inputs, n)?,
        other => candle_core::bail!("{} takes f32 or bf16, not {other:?}", O::NAME),
    };
    Ok((out, shape))
}

/// All inputs of one dtype.
fn same_dtype(name: &str, dtypes: impl Iterator<Item = DType>) -> candle_core::Result<()> {
    let dtypes: Vec<DType> = dtypes.collect();
    if dtypes.windows(2).any(|w| w[0] != w[1]) {
        candle_core::bail!("{name}: inputs of mixed dtypes {dtypes:?}");
    }
    Ok(())
}

impl<O: SameDtypeOp> CustomOp1 for SameDtype<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(&self, a: &CpuStorage, la: &Layout) -> CpuOut {
        run_cpu(&self.0, &[(a, la)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, a: &CudaStorage, la: &Layout) -> CudaOut {
        run_cuda(&self.0, &[(a, la)])
    }
}

impl<O: SameDtypeOp> CustomOp2 for SameDtype<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(&self, a: &CpuStorage, la: &Layout, b: &CpuStorage, lb: &Layout) -> CpuOut {
        run_cpu(&self.0, &[(a, la), (b, lb)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, a: &CudaStorage, la: &Layout, b: &CudaStorage, lb: &Layout) -> CudaOut {
        run_cuda(&self.0, &[(a, la), (b, lb)])
    }
}

impl<O: SameDtypeOp> CustomOp3 for SameDtype<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
        c: &CpuStorage,
        lc: &Layout,
    ) -> CpuOut {
        run_cpu(&self.0, &[(a, la), (b, lb), (c, lc)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
        c: &CudaStorage,
        lc: &Layout,
    ) -> CudaOut {
        run_cuda(&self.0, &[(a, la), (b, lb), (c, lc)])
    }
}
