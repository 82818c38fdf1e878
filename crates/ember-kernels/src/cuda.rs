//! The CUDA side's shared machinery: the fatbins build.rs made from `kernels/*.cu` (SASS for
//! sm_80, sm_90, sm_100 by default), loaded into one device's context at start ([`CudaKernels`]),
//! the stream every launch goes on, the pinned staging buffers step metadata is copied through
//! ([`Staging`]), and the small helpers every launcher uses. The launchers themselves, one
//! `impl CudaKernels` per op with the CPU reference's signature over device slices, sit with
//! their references: `rms_norm.rs`, `paged_attention/cuda.rs` and so on. Launches are
//! asynchronous on the context's stream.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PinnedHostSlice, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use crate::error::check_shape;
use crate::{Element, KernelError};

pub use crate::fused_moe::cuda::DeviceAlignment;
pub use crate::paged_attention::cuda::DevicePagedBatch;

const RMS_NORM_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rms_norm.fatbin"));
const ROTARY_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rotary.fatbin"));
const SAMPLING_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sampling.fatbin"));
const SCATTER_ROWS_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/scatter_rows.fatbin"));
const SILU_AND_MUL_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/silu_and_mul.fatbin"));
const W4A16_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/w4a16.fatbin"));
const W8A16_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/w8a16.fatbin"));
const FP8_E5M2_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fp8_e5m2.fatbin"));
const FUSED_MOE_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fused_moe.fatbin"));
const MOE_ROUTING_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/moe_routing.fatbin"));
const W8A8_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/w8a8.fatbin"));
const MOE_W4A16_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/moe_w4a16.fatbin"));
const MOE_W8A16_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/moe_w8a16.fatbin"));
const MLA_DECODE_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mla_decode.fatbin"));
const PAGED_ATTENTION_FATBIN: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/paged_attention.fatbin"));
const PREFILL_ATTENTION_FATBIN: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/prefill_attention.fatbin"));

/// ptxas's registers and spills per kernel and architecture, as build.rs recorded them.
pub const PTXAS_RESOURCE_USAGE: &str =
    include_str!(concat!(env!("OUT_DIR"), "/ptxas-resource-usage.txt"));

/// An element type the CUDA kernels take ([`Element`] that cudarc can pass to a kernel and zero).
pub trait CudaElement: Element + DeviceRepr + ValidAsZeroBits {}
impl CudaElement for f32 {}
impl CudaElement for half::bf16 {}

/// Page-locked host buffers that step metadata is staged in on its way to the GPU, so the copy
/// is a true asynchronous DMA: a copy from pageable memory first waits for the stream's earlier
/// work, which mid-step (the first attention layer's metadata) stalls the host that queues the
/// rest of the step. Per size class (powers of two), a ring of [`STAGING_RING`] buffers used in
/// turn; writing into one waits only for that buffer's own previous copy (cudarc's event on it),
/// long done by the time the ring comes round.
pub struct Staging<T> {
    classes: std::sync::Mutex<std::collections::HashMap<usize, StagingRing<T>>>,
}

/// The element types [`CudaKernels::stage`] copies (a step's u32 metadata and f32 masks and
/// parameters), each with its own [`Staging`].
pub trait StagedElement: DeviceRepr + ValidAsZeroBits + Copy {
    /// This type's staging buffers of `kernels`.
    fn staging(kernels: &CudaKernels) -> &Staging<Self>;
}

impl StagedElement for u32 {
    fn staging(kernels: &CudaKernels) -> &Staging<u32> {
        &kernels.staging_u32
    }
}

impl StagedElement for f32 {
    fn staging(kernels: &CudaKernels) -> &Staging<f32> {
        &kernels.staging_f32
    }
}

/// One size class of [`Staging`]: the next buffer to use, and the buffers made so far.
type StagingRing<T> = (usize, Vec<PinnedHostSlice<T>>);

/// Buffers per size class of [`Staging`].
const STAGING_RING: usize = 8;
/// Smallest staged buffer, and the largest a copy is staged in (bigger ones, such as a long
/// prefill's causal masks, copy from pageable memory as before).
const STAGING_MIN: usize = 256;
const STAGING_MAX: usize = 1 << 20;

impl<T: DeviceRepr + ValidAsZeroBits + Copy> Staging<T> {
    fn new() -> Self {
        Self {
            classes: Default::default(),
        }
    }

    /// `data` on the GPU through a pinned buffer: a slice of at least `data.len()` elements
    /// (its size class; the first `data.len()` are `data`), or `None` when `data` is too large
    /// to stage.
    fn upload(
        &self,
        stream: &Arc<CudaStream>,
        data: &[T],
    ) -> Result<Option<CudaSlice<T>>, KernelError> {
        let cap = data.len().next_power_of_two().max(STAGING_MIN);
        if cap > STAGING_MAX {
            return Ok(None);
        }
        let mut classes = self.classes.lock().unwrap_or_else(|p| p.into_inner());
        let (next, ring) = classes.entry(cap).or_insert_with(|| (0, Vec::new()));
        let at = *next;
        *next = (at + 1) % STAGING_RING;
        if ring.len() <= at {
            // SAFETY: the buffer is written below before it is copied from.
            ring.push(unsafe { stream.context().alloc_pinned::<T>(cap) }?);
        }
        let host = &mut ring[at];
        // Waits for this buffer's previous copy, STAGING_RING uploads of this size ago.
        host.as_mut_slice()?[..data.len()].copy_from_slice(data);
        // SAFETY: every element is written by the copy below.
        let mut dst = unsafe { stream.alloc::<T>(cap) }?;
        stream.memcpy_htod(host, &mut dst)?;
        Ok(Some(dst))
    }
}

/// ember's kernels loaded on one GPU, with the stream they launch on.
pub struct CudaKernels {
    /// The GPU's streaming multiprocessors (how many blocks a launch needs to fill it).
    pub(crate) sm_count: usize,
    staging_u32: Staging<u32>,
    staging_f32: Staging<f32>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) rms_norm: Arc<CudaModule>,
    pub(crate) rotary: Arc<CudaModule>,
    pub(crate) fp8_e5m2: Arc<CudaModule>,
    pub(crate) sampling: Arc<CudaModule>,
    pub(crate) scatter_rows: Arc<CudaModule>,
    pub(crate) silu_and_mul: Arc<CudaModule>,
    pub(crate) w4a16: Arc<CudaModule>,
    pub(crate) w8a16: Arc<CudaModule>,
    pub(crate) paged_attention: Arc<CudaModule>,
    pub(crate) prefill_attention: Arc<CudaModule>,
    pub(crate) mla_decode: Arc<CudaModule>,
    pub(crate) moe_w8a16: Arc<CudaModule>,
    pub(crate) moe_w4a16: Arc<CudaModule>,
    pub(crate) w8a8: Arc<CudaModule>,
    pub(crate) moe_routing: Arc<CudaModule>,
    pub(crate) fused_moe: Arc<CudaModule>,
}

impl CudaKernels {
    /// Opens GPU `ordinal` and loads the kernels; fails when there is no driver, no such device, or
    /// the fatbins hold no code for its architecture.
    pub fn new(ordinal: usize) -> Result<Self, KernelError> {
        // cudarc panics, rather than erring, when it cannot dlopen libcuda (no driver installed).
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal)).map_err(|panic| {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            KernelError::NoDriver(why)
        })??;
        Self::with_stream(ctx.default_stream())
    }

    /// Loads the kernels into the context of `stream` and launches them on it: candle's stream,
    /// so that our ops run in order with candle's on the same GPU.
    pub fn with_stream(stream: Arc<CudaStream>) -> Result<Self, KernelError> {
        let ctx = stream.context().clone();
        let load = |image: &[u8]| ctx.load_module(Ptx::from_binary(image.to_vec()));
        let sm_count = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )?;
        Ok(Self {
            sm_count: usize::try_from(sm_count).unwrap_or(1).max(1),
            rms_norm: load(RMS_NORM_FATBIN)?,
            rotary: load(ROTARY_FATBIN)?,
            fp8_e5m2: load(FP8_E5M2_FATBIN)?,
            sampling: load(SAMPLING_FATBIN)?,
            scatter_rows: load(SCATTER_ROWS_FATBIN)?,
            silu_and_mul: load(SILU_AND_MUL_FATBIN)?,
            w4a16: load(W4A16_FATBIN)?,
            w8a16: load(W8A16_FATBIN)?,
            paged_attention: load(PAGED_ATTENTION_FATBIN)?,
            prefill_attention: load(PREFILL_ATTENTION_FATBIN)?,
            mla_decode: load(MLA_DECODE_FATBIN)?,
            moe_w8a16: load(MOE_W8A16_FATBIN)?,
            moe_w4a16: load(MOE_W4A16_FATBIN)?,
            w8a8: load(W8A8_FATBIN)?,
            moe_routing: load(MOE_ROUTING_FATBIN)?,
            fused_moe: load(FUSED_MOE_FATBIN)?,
            staging_u32: Staging::new(),
            staging_f32: Staging::new(),
            stream,
        })
    }

    /// `data` copied to the GPU asynchronously through a page-locked buffer (see [`Staging`]):
    /// a slice of at least `data.len()` elements whose first `data.len()` are `data`; beyond the
    /// staging size, an exact copy from pageable memory.
    pub fn stage<T: StagedElement>(&self, data: &[T]) -> Result<CudaSlice<T>, KernelError> {
        match T::staging(self).upload(&self.stream, data)? {
            Some(slice) => Ok(slice),
            None => Ok(self.stream.clone_htod(data)?),
        }
    }

    /// Copies `data` into `dst` from element `offset` on, staged like [`Self::stage`]: how a
    /// CUDA graph's persistent inputs are rewritten before a replay, in a buffer that the graph
    /// and the batch it was captured over both hold.
    pub fn write_at<T: StagedElement>(
        &self,
        dst: &CudaSlice<T>,
        offset: usize,
        data: &[T],
    ) -> Result<(), KernelError> {
        check_shape(
            offset
                .checked_add(data.len())
                .is_some_and(|end| end <= dst.len()),
            "write_at",
            || {
                format!(
                    "{} elements at {offset} overrun a buffer of {}",
                    data.len(),
                    dst.len()
                )
            },
        )?;
        if data.is_empty() {
            return Ok(());
        }
        let staged = self.stage(data)?;
        let size = std::mem::size_of::<T>();
        let (src, _src_use) = staged.device_ptr(&self.stream);
        let (base, _dst_use) = dst.device_ptr(&self.stream);
        // SAFETY: both ranges are in bounds (checked above; `staged` holds at least
        // `data.len()` elements). The copy is queued on the stream every kernel and copy of
        // these buffers goes on, so it lands after the work that read `dst` before and before
        // the work that reads it next; `staged` is freed on the same stream, after the copy.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                base + (offset * size) as u64,
                src,
                std::mem::size_of_val(data),
                self.stream.cu_stream(),
            )
        }?;
        Ok(())
    }

    /// Copies the rows of `data` (`width` elements each) into the first `width` elements of
    /// `dst`'s rows, `pitch` elements apart, staged like [`Self::write_at`]: one 2D copy.
    pub fn write_rows<T: StagedElement>(
        &self,
        dst: &CudaSlice<T>,
        pitch: usize,
        data: &[T],
        width: usize,
    ) -> Result<(), KernelError> {
        if width == pitch {
            return self.write_at(dst, 0, data);
        }
        let rows = data.len() / width.max(1);
        check_shape(
            width > 0
                && width <= pitch
                && data.len() == rows * width
                && (rows == 0 || (rows - 1) * pitch + width <= dst.len()),
            "write_rows",
            || {
                format!(
                    "{} elements as rows of {width}, {pitch} apart, into a buffer of {}",
                    data.len(),
                    dst.len()
                )
            },
        )?;
        if rows == 0 {
            return Ok(());
        }
        let staged = self.stage(data)?;
        let size = std::mem::size_of::<T>();
        let (src, _src_use) = staged.device_ptr(&self.stream);
        let (base, _dst_use) = dst.device_ptr(&self.stream);
        let copy = cudarc::driver::sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: cudarc::driver::sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: src,
            srcArray: std::ptr::null_mut(),
            srcPitch: width * size,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: cudarc::driver::sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: base,
            dstArray: std::ptr::null_mut(),
            dstPitch: pitch * size,
            WidthInBytes: width * size,
            Height: rows,
        };
        // SAFETY: `rows` rows of `width` elements are read from `staged` (which holds at least
        // `data.len()`) and written `pitch` apart into `dst`, the last ending within it (checked
        // above); ordered on the one stream as in `write_at`.
        unsafe { cudarc::driver::sys::cuMemcpy2DAsync_v2(&copy, self.stream.cu_stream()) }
            .result()?;
        Ok(())
    }

    /// The stream every launch goes on (copy inputs and results with it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

/// `<op>_<suffix>` of `module`: an op's kernel for one element type.
pub(crate) fn kernel(
    module: &Arc<CudaModule>,
    op: &str,
    suffix: &str,
) -> Result<CudaFunction, KernelError> {
    Ok(module.load_function(&format!("{op}_{suffix}"))?)
}

/// `value` as a kernel's 32-bit int argument, or why it does not fit.
pub(crate) fn int32(op: &'static str, what: &str, value: usize) -> Result<i32, KernelError> {
    i32::try_from(value).map_err(|_| too_big(op, what, value))
}

/// The error of a size that does not fit a kernel's 32-bit int argument.
pub(crate) fn too_big(op: &'static str, what: &str, value: usize) -> KernelError {
    KernelError::Shape {
        op,
        message: format!("{what} = {value} does not fit the kernel's 32-bit index"),
    }
}

/// 256 threads a block, enough blocks for `n` elements up to 65535 (the kernel strides on).
pub(crate) fn elementwise_launch(n: i64) -> LaunchConfig {
    let blocks = (n.max(1) as usize).div_ceil(256).min(65_535) as u32;
    grid_launch((blocks, 1), 256)
}

/// A `(x, y)` grid of blocks of `threads` threads, without dynamic shared memory.
pub(crate) fn grid_launch((x, y): (u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x, y, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `threads` per row (or token) of a call, `rows` of them, or why they do not fit
/// the grid.
pub(crate) fn block_per_row(
    op: &'static str,
    what: &str,
    rows: usize,
    threads: u32,
) -> Result<LaunchConfig, KernelError> {
    let rows = u32::try_from(rows).map_err(|_| too_big(op, what, rows))?;
    Ok(grid_launch((rows, 1), threads))
}

/// Blocks of `per` that cover `value` on a grid's y axis (65535 at most), or why they do not fit.
pub(crate) fn grid_y_blocks(
    op: &'static str,
    what: &str,
    value: usize,
    per: usize,
) -> Result<u32, KernelError> {
    u32::try_from(value.div_ceil(per))
        .ok()
        .filter(|&b| b <= 65_535)
        .ok_or_else(|| too_big(op, what, value))
}

/// Errs unless `P` is one byte: e4m3 weights come as any one-byte element (`u8`,
/// `float8::F8E4M3`).
pub(crate) fn check_e4m3_bytes<P>(op: &'static str) -> Result<(), KernelError> {
    let size = std::mem::size_of::<P>();
    check_shape(size == 1, op, || {
        format!("e4m3 weights are one byte each, not {size}")
    })
}
