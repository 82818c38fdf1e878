//! What ember's custom ops share: the kernels loaded on each GPU, a step's small uploads staged
//! through page-locked memory, and the contiguous slice a CPU op reads.

#[cfg(feature = "cuda")]
use std::collections::HashMap;
#[cfg(feature = "cuda")]
use std::sync::{Arc, Mutex, OnceLock};

#[cfg(feature = "cuda")]
use candle_core::CudaDevice;
use candle_core::{Device, Tensor};
#[cfg(feature = "cuda")]
use ember_kernels::cuda::CudaKernels;

/// The elements of a custom op's contiguous input, from its layout's start; `what` names the op
/// that refuses a strided one.
pub fn contiguous_range(
    layout: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<std::ops::Range<usize>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(start..end),
        None => candle_core::bail!("{what} needs a contiguous tensor"),
    }
}

/// A custom op's CPU input as its contiguous elements of `T` (see [`contiguous_range`]).
pub fn cpu_input<'a, T: candle_core::WithDType>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    Ok(&storage.as_slice::<T>()?[contiguous_range(layout, what)?])
}

/// [`cpu_input`] on a GPU.
#[cfg(feature = "cuda")]
pub fn cuda_input<'a, T: candle_core::cuda_backend::CudaDType>(
    storage: &'a candle_core::CudaStorage,
    layout: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    Ok(storage
        .as_cuda_slice::<T>()?
        .slice(contiguous_range(layout, what)?))
}

/// The GPU a custom op's input is on, and the kernels loaded there.
#[cfg(feature = "cuda")]
pub fn device_kernels(
    storage: &candle_core::CudaStorage,
) -> candle_core::Result<(CudaDevice, Arc<CudaKernels>)> {
    let device = candle_core::backend::BackendStorage::device(storage).clone();
    let k = kernels(&device)?;
    Ok((device, k))
}

#[cfg(feature = "cuda")]
/// The kernels loaded on each GPU candle uses, once.
pub fn kernels(device: &CudaDevice) -> candle_core::Result<Arc<CudaKernels>> {
    static LOADED: OnceLock<Mutex<HashMap<candle_core::cuda::DeviceId, Arc<CudaKernels>>>> =
        OnceLock::new();
    let mut loaded = LOADED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(k) = loaded.get(&device.id()) {
        return Ok(k.clone());
    }
    let k =
        Arc::new(CudaKernels::with_stream(device.cuda_stream()).map_err(candle_core::Error::wrap)?);
    loaded.insert(device.id(), k.clone());
    Ok(k)
}

/// A step's host data as a `[len]` tensor on `device`: on a GPU staged through page-locked
/// memory and copied asynchronously ([`ember_kernels::cuda::CudaKernels::stage`]), so the copy
/// does not wait for the stream's earlier work.
pub fn upload<T: Staged>(data: Vec<T>, device: &Device) -> candle_core::Result<Tensor> {
    let n = data.len();
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(gpu) if n > 0 => {
            let kernels = kernels(gpu)?;
            let slice = kernels.stage(&data).map_err(candle_core::Error::wrap)?;
            let len = slice.len();
            Tensor::from_storage(
                candle_core::Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(
                    slice,
                    gpu.clone(),
                )),
                len,
                candle_core::op::BackpropOp::none(),
                false,
            )
            .narrow(0, 0, n)
        }
        _ => Tensor::from_vec(data, n, device),
    }
}

/// The element types a step uploads: token ids, positions, slots (u32) and masks (f32).
#[cfg(feature = "cuda")]
pub trait Staged:
    candle_core::WithDType + candle_core::cuda_backend::CudaDType + ember_kernels::cuda::StagedElement
{
}
#[cfg(not(feature = "cuda"))]
pub trait Staged: candle_core::WithDType {}
impl Staged for u32 {}
impl Staged for f32 {}
