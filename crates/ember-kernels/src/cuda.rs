//! The CUDA side: the fatbins build.rs made from `kernels/*.cu` (SASS for sm_80, sm_90, sm_100 by
//! default), loaded into one device's context at start, and one method per op with the CPU
//! reference's signature over device slices. Launches are asynchronous on the context's stream.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use crate::error::check_shape;
use crate::fused_moe::{align_capacity, GroupedGemmShape};
use crate::mla_decode::{mla_decode_splits, mla_dims, MlaShape};
use crate::moe_routing::{routing_shape, RoutingConfig, TopkMethod};
use crate::paged_attention::{
    check_extent, check_splits, paged_attention_dims, paged_attention_splits, paged_batch_extent,
    BatchExtent, PagedAttentionBatch, PagedAttentionShape,
};
use crate::rms_norm::rms_norm_shape;
use crate::rotary::{rotary_shape, RotaryShape};
use crate::sampling::argmax_shape;
use crate::scatter_rows::scatter_rows_shape;
use crate::silu_and_mul::silu_and_mul_shape;
use crate::w4a16::{w4a16_shape, W4a16Shape};
use crate::w8a16::{w8a16_shape, W8a16Shape};
use crate::{Element, KernelError};

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
/// Threads per block of `argmax_f32` in `kernels/sampling.cu` (its `ARGMAX_THREADS`).
const ARGMAX_THREADS: u32 = 256;
/// Threads per block of `token_logprobs_f32` in `kernels/sampling.cu` (its `LOGPROB_THREADS`).
const LOGPROB_THREADS: u32 = 512;
/// Threads per block of `sample_rows_f32` in `kernels/sampling.cu` (its `SAMPLE_THREADS`).
const SAMPLE_THREADS: u32 = 512;
/// Warps per block and rows of `x` per block of `kernels/w4a16.cu` (`W4A16_WARPS`, `W4A16_ROWS`)
/// and of `kernels/w8a16.cu` (`W8A16_WARPS`, `W8A16_ROWS`, the same).
const W4A16_WARPS: u32 = 4;
const W4A16_ROWS: u32 = 8;
/// Query rows per block of `kernels/prefill_attention.cu` (its `PF_BM`).
const PREFILL_ROWS: usize = 64;
/// Threads per block of `kernels/paged_attention.cu` (its `PA_THREADS`).
const PA_THREADS: u32 = 128;
/// Warps per block and sorted rows per tile of `kernels/moe_w8a16.cu` (`GW8_WARPS`, `GW8_ROWS`)
/// and of `kernels/moe_w4a16.cu` (`GW4_WARPS`, `GW4_ROWS`, the same).
const GW8_WARPS: u32 = 4;
const GW8_ROWS: usize = 8;
/// Threads per block of `kernels/mla_decode.cu` (its `MLA_THREADS`).
const MLA_THREADS: u32 = 128;

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
    sm_count: usize,
    staging_u32: Staging<u32>,
    staging_f32: Staging<f32>,
    stream: Arc<CudaStream>,
    rms_norm: Arc<CudaModule>,
    rotary: Arc<CudaModule>,
    fp8_e5m2: Arc<CudaModule>,
    sampling: Arc<CudaModule>,
    scatter_rows: Arc<CudaModule>,
    silu_and_mul: Arc<CudaModule>,
    w4a16: Arc<CudaModule>,
    w8a16: Arc<CudaModule>,
    paged_attention: Arc<CudaModule>,
    prefill_attention: Arc<CudaModule>,
    mla_decode: Arc<CudaModule>,
    moe_w8a16: Arc<CudaModule>,
    moe_w4a16: Arc<CudaModule>,
    w8a8: Arc<CudaModule>,
    moe_routing: Arc<CudaModule>,
    fused_moe: Arc<CudaModule>,
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

    /// [`crate::rms_norm::rms_norm`] on the GPU.
    pub fn rms_norm<T: CudaElement>(
        &self,
        x: &CudaView<T>,
        weight: &CudaView<T>,
        eps: f32,
        out: &mut CudaViewMut<T>,
    ) -> Result<(), KernelError> {
        let (rows, hidden) = rms_norm_shape(x.len(), weight.len(), out.len())?;
        if rows == 0 {
            return Ok(());
        }
        let hidden_arg = hidden_i32(hidden)?;
        let f = kernel(&self.rms_norm, "rms_norm", T::KERNEL_SUFFIX)?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(out)
            .arg(x)
            .arg(weight)
            .arg(&hidden_arg)
            .arg(&eps);
        // SAFETY: the argument list matches rms_norm_<T>(T*, const T*, const T*, int, float) in
        // kernels/rms_norm.cu, and the shape check above bounds every index it touches.
        unsafe { launch.launch(row_launch(rows, hidden)?) }?;
        Ok(())
    }

    /// [`crate::rms_norm::fused_add_rms_norm`] on the GPU (`residual` is updated in place).
    pub fn fused_add_rms_norm<T: CudaElement>(
        &self,
        x: &CudaView<T>,
        residual: &mut CudaViewMut<T>,
        weight: &CudaView<T>,
        eps: f32,
        out: &mut CudaViewMut<T>,
    ) -> Result<(), KernelError> {
        let (rows, hidden) = rms_norm_shape(x.len(), weight.len(), out.len())?;
        check_shape(residual.len() == x.len(), "fused_add_rms_norm", || {
            format!(
                "residual has {} elements, x has {}",
                residual.len(),
                x.len()
            )
        })?;
        if rows == 0 {
            return Ok(());
        }
        let hidden_arg = hidden_i32(hidden)?;
        let f = kernel(&self.rms_norm, "fused_add_rms_norm", T::KERNEL_SUFFIX)?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(out)
            .arg(residual)
            .arg(x)
            .arg(weight)
            .arg(&hidden_arg)
            .arg(&eps);
        // SAFETY: matches fused_add_rms_norm_<T>(T*, T*, const T*, const T*, int, float); shapes checked.
        unsafe { launch.launch(row_launch(rows, hidden)?) }?;
        Ok(())
    }

    /// [`crate::w4a16::w4a16_gemm`] on the GPU.
    #[allow(clippy::too_many_arguments)]
    pub fn w4a16_gemm<T: CudaElement>(
        &self,
        x: &CudaView<T>,
        codes: &CudaView<u8>,
        qparams: &CudaView<f32>,
        shape: &W4a16Shape,
        y: &mut CudaSlice<T>,
    ) -> Result<(), KernelError> {
        w4a16_shape(shape, x.len(), codes.len(), qparams.len(), y.len())?;
        if shape.m == 0 || shape.n == 0 {
            return Ok(());
        }
        let op = "w4a16_gemm";
        let m = int32(op, "m", shape.m)?;
        let n = int32(op, "n", shape.n)?;
        let k = int32(op, "k", shape.k)?;
        let group_size = int32(op, "group_size", shape.group_size)?;
        let f16_weights = i32::from(shape.f16_weights);
        let e2m1 = i32::from(shape.e2m1);
        let zeros = i32::from(shape.zeros);
        let scales = shape.scales.code();
        let f = kernel(&self.w4a16, op, T::KERNEL_SUFFIX)?;
        let blocks_y = u32::try_from(shape.m.div_ceil(W4A16_ROWS as usize))
            .ok()
            .filter(|&b| b <= 65_535)
            .ok_or_else(|| too_big(op, "m", shape.m))?;
        let cfg = LaunchConfig {
            grid_dim: (shape.n.div_ceil(W4A16_WARPS as usize) as u32, blocks_y, 1),
            block_dim: (32 * W4A16_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(y)
            .arg(x)
            .arg(codes)
            .arg(qparams)
            .arg(&m)
            .arg(&n)
            .arg(&k)
            .arg(&group_size)
            .arg(&f16_weights)
            .arg(&e2m1)
            .arg(&zeros)
            .arg(&scales);
        // SAFETY: matches w4a16_gemm_<T>(T*, const T*, const u8*, const float*, int, int, int,
        // int, int, int, int, int) in kernels/w4a16.cu; the shape check bounds every index it
        // reads (codes of `codes_len`, qparams of `qparams_len` for its scales).
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::w8a16::w8a16_gemm`] on the GPU, over e4m3 weights as any one-byte element
    /// (`float8::F8E4M3` from candle, or raw `u8`).
    pub fn w8a16_gemm<T: CudaElement, P: DeviceRepr>(
        &self,
        x: &CudaView<T>,
        w: &CudaView<P>,
        scales: &CudaView<f32>,
        shape: &W8a16Shape,
        y: &mut CudaSlice<T>,
    ) -> Result<(), KernelError> {
        let op = "w8a16_gemm";
        check_shape(std::mem::size_of::<P>() == 1, op, || {
            format!(
                "weights must be one byte each, not {}",
                std::mem::size_of::<P>()
            )
        })?;
        w8a16_shape(shape, x.len(), w.len(), scales.len(), y.len())?;
        if shape.m == 0 || shape.n == 0 {
            return Ok(());
        }
        let m = int32(op, "m", shape.m)?;
        let n = int32(op, "n", shape.n)?;
        let k = int32(op, "k", shape.k)?;
        let block_n = int32(op, "block_n", shape.block_n)?;
        let block_k = int32(op, "block_k", shape.block_k)?;
        let f = kernel(&self.w8a16, op, T::KERNEL_SUFFIX)?;
        let blocks_y = u32::try_from(shape.m.div_ceil(W4A16_ROWS as usize))
            .ok()
            .filter(|&b| b <= 65_535)
            .ok_or_else(|| too_big(op, "m", shape.m))?;
        let cfg = LaunchConfig {
            grid_dim: (shape.n.div_ceil(W4A16_WARPS as usize) as u32, blocks_y, 1),
            block_dim: (32 * W4A16_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(y)
            .arg(x)
            .arg(w)
            .arg(scales)
            .arg(&m)
            .arg(&n)
            .arg(&k)
            .arg(&block_n)
            .arg(&block_k);
        // SAFETY: matches w8a16_gemm_<T>(T*, const T*, const u8*, const float*, int, int, int,
        // int, int) in kernels/w8a16.cu (its W8A16_WARPS and W8A16_ROWS equal W4A16's); the
        // shape check bounds every index it reads, and `P` is one byte.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::w4a16::dequantize`] on the GPU.
    pub fn w4a16_dequant<T: CudaElement>(
        &self,
        codes: &CudaView<u8>,
        qparams: &CudaView<f32>,
        shape: &W4a16Shape,
        out: &mut CudaSlice<T>,
    ) -> Result<(), KernelError> {
        let op = "w4a16_dequant";
        w4a16_shape(
            &W4a16Shape { m: 0, ..*shape },
            0,
            codes.len(),
            qparams.len(),
            0,
        )?;
        check_shape(out.len() == shape.n * shape.k, op, || {
            format!(
                "out has {} elements, expected {} x {}",
                out.len(),
                shape.n,
                shape.k
            )
        })?;
        if out.is_empty() {
            return Ok(());
        }
        let n = int32(op, "n", shape.n)?;
        let k = int32(op, "k", shape.k)?;
        let group_size = int32(op, "group_size", shape.group_size)?;
        let f16_weights = i32::from(shape.f16_weights);
        let e2m1 = i32::from(shape.e2m1);
        let zeros = i32::from(shape.zeros);
        let scales = shape.scales.code();
        let f = kernel(&self.w4a16, op, T::KERNEL_SUFFIX)?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(out)
            .arg(codes)
            .arg(qparams)
            .arg(&n)
            .arg(&k)
            .arg(&group_size)
            .arg(&f16_weights)
            .arg(&e2m1)
            .arg(&zeros)
            .arg(&scales);
        // SAFETY: matches w4a16_dequant_<T>(T*, const u8*, const float*, int x 7) in
        // kernels/w4a16.cu; the shape check bounds every index it touches.
        unsafe { launch.launch(elementwise_launch((shape.n * shape.k) as i64)) }?;
        Ok(())
    }

    /// [`crate::w8a16::dequantize`] on the GPU, over e4m3 weights as any one-byte element.
    pub fn w8a16_dequant<T: CudaElement, P: DeviceRepr>(
        &self,
        w: &CudaView<P>,
        scales: &CudaView<f32>,
        shape: &W8a16Shape,
        out: &mut CudaSlice<T>,
    ) -> Result<(), KernelError> {
        let op = "w8a16_dequant";
        check_shape(std::mem::size_of::<P>() == 1, op, || {
            format!(
                "weights must be one byte each, not {}",
                std::mem::size_of::<P>()
            )
        })?;
        w8a16_shape(&W8a16Shape { m: 0, ..*shape }, 0, w.len(), scales.len(), 0)?;
        check_shape(out.len() == shape.n * shape.k, op, || {
            format!(
                "out has {} elements, expected {} x {}",
                out.len(),
                shape.n,
                shape.k
            )
        })?;
        if out.is_empty() {
            return Ok(());
        }
        let n = int32(op, "n", shape.n)?;
        let k = int32(op, "k", shape.k)?;
        let block_n = int32(op, "block_n", shape.block_n)?;
        let block_k = int32(op, "block_k", shape.block_k)?;
        let f = kernel(&self.w8a16, op, T::KERNEL_SUFFIX)?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(out)
            .arg(w)
            .arg(scales)
            .arg(&n)
            .arg(&k)
            .arg(&block_n)
            .arg(&block_k);
        // SAFETY: matches w8a16_dequant_<T>(T*, const u8*, const float*, int, int, int, int) in
        // kernels/w8a16.cu; the shape check bounds every index it touches, and `P` is one byte.
        unsafe { launch.launch(elementwise_launch((shape.n * shape.k) as i64)) }?;
        Ok(())
    }

    /// [`crate::silu_and_mul::silu_and_mul`] on the GPU.
    pub fn silu_and_mul<T: CudaElement>(
        &self,
        input: &CudaView<T>,
        d: usize,
        out: &mut CudaSlice<T>,
    ) -> Result<(), KernelError> {
        silu_and_mul_shape(input.len(), out.len(), d)?;
        let d_arg = i32::try_from(d).map_err(|_| too_big("silu_and_mul", "d", d))?;
        let n = out.len() as i64;
        if n == 0 {
            return Ok(());
        }
        let f = kernel(&self.silu_and_mul, "silu_and_mul", T::KERNEL_SUFFIX)?;
        let threads = 256u32;
        // Enough blocks to fill any of our GPUs; the kernel strides over the rest.
        let blocks = (out.len().div_ceil(threads as usize)).min(65_535) as u32;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(out).arg(input).arg(&d_arg).arg(&n);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches silu_and_mul_<T>(T*, const T*, int, long long); shapes checked.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
    /// [`crate::rotary::rotary_embedding`] on the GPU. `positions` stays on the host: it is
    /// checked against the tables there (every row the kernel reads exists), then copied over.
    #[allow(clippy::too_many_arguments)]
    pub fn rotary_embedding<T: CudaElement>(
        &self,
        x: &CudaView<T>,
        positions: &[u32],
        cos: &CudaView<T>,
        sin: &CudaView<T>,
        shape: &RotaryShape,
        out: &mut CudaSlice<T>,
    ) -> Result<(), KernelError> {
        check_shape(cos.len() == sin.len(), "rotary_embedding", || {
            format!("cos has {} elements, sin {}", cos.len(), sin.len())
        })?;
        let tokens = rotary_shape(shape, x.len(), positions, cos.len(), out.len())?;
        if tokens == 0 {
            return Ok(());
        }
        let positions = self.stream.clone_htod(positions)?;
        self.launch_rotary(x, Some(&positions), cos, sin, shape, tokens, out)
    }

    /// [`crate::rotary::rotary_embedding_rows`] on the GPU: token `t` rotated by row `t` of
    /// `cos`/`sin` (the step's rows, gathered once), so no positions are copied.
    pub fn rotary_embedding_rows<T: CudaElement>(
        &self,
        x: &CudaView<T>,
        cos: &CudaView<T>,
        sin: &CudaView<T>,
        shape: &RotaryShape,
        out: &mut CudaSlice<T>,
    ) -> Result<(), KernelError> {
        let tokens =
            crate::rotary::rotary_rows_shape(shape, x.len(), cos.len(), sin.len(), out.len())?;
        if tokens == 0 {
            return Ok(());
        }
        self.launch_rotary(x, None, cos, sin, shape, tokens, out)
    }

    /// Launches `rotary_embedding_<T>` (with positions) or `rotary_embedding_rows_<T>` (without)
    /// over `tokens` tokens whose buffers the caller checked.
    #[allow(clippy::too_many_arguments)]
    fn launch_rotary<T: CudaElement>(
        &self,
        x: &CudaView<T>,
        positions: Option<&CudaSlice<u32>>,
        cos: &CudaView<T>,
        sin: &CudaView<T>,
        shape: &RotaryShape,
        tokens: usize,
        out: &mut CudaSlice<T>,
    ) -> Result<(), KernelError> {
        let op = "rotary_embedding";
        let tokens = u32::try_from(tokens).map_err(|_| too_big(op, "tokens", tokens))?;
        let heads = int32(op, "heads", shape.heads)?;
        let head_dim = int32(op, "head_dim", shape.head_dim)?;
        int32(op, "heads x head_dim", shape.heads * shape.head_dim)?;
        let interleaved = i32::from(shape.interleaved);
        let name = if positions.is_some() {
            op
        } else {
            "rotary_embedding_rows"
        };
        let f = kernel(&self.rotary, name, T::KERNEL_SUFFIX)?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(out).arg(x);
        if let Some(positions) = positions {
            launch.arg(positions);
        }
        launch
            .arg(cos)
            .arg(sin)
            .arg(&heads)
            .arg(&head_dim)
            .arg(&interleaved);
        let pairs = shape.heads * shape.head_dim / 2;
        let cfg = LaunchConfig {
            grid_dim: (tokens, 1, 1),
            block_dim: (pairs.next_multiple_of(32).clamp(32, 256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches rotary_embedding_<T>(T*, const T*, const unsigned*, const T*, const T*,
        // int, int, int) and rotary_embedding_rows_<T>(the same without positions) in
        // kernels/rotary.cu; rotary_shape / rotary_rows_shape bound every x, out and table index.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}

impl CudaKernels {
    /// [`crate::fp8_e5m2::encode_slice`] on the GPU: f32 to e5m2 bytes (nearest even, saturating).
    pub fn e5m2_from_f32(
        &self,
        x: &CudaView<'_, f32>,
        out: &mut CudaSlice<u8>,
    ) -> Result<(), KernelError> {
        // SAFETY: e5m2_from_f32(unsigned char*, const float*, long long) in kernels/fp8_e5m2.cu.
        unsafe { self.e5m2_convert("e5m2_from_f32", x, out) }
    }

    /// [`crate::fp8_e5m2::decode_slice`] on the GPU: e5m2 bytes to f32 (exact).
    pub fn e5m2_to_f32(
        &self,
        x: &CudaView<'_, u8>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        // SAFETY: e5m2_to_f32(float*, const unsigned char*, long long) in kernels/fp8_e5m2.cu.
        unsafe { self.e5m2_convert("e5m2_to_f32", x, out) }
    }

    /// Launches `name` of `kernels/fp8_e5m2.cu` over equal-length `x` and `out`.
    ///
    /// # Safety
    /// `name` must take `(O* out, const I* x, long long n)`.
    unsafe fn e5m2_convert<I: DeviceRepr, O: DeviceRepr>(
        &self,
        name: &'static str,
        x: &CudaView<'_, I>,
        out: &mut CudaSlice<O>,
    ) -> Result<(), KernelError> {
        check_shape(x.len() == out.len(), name, || {
            format!("x has {} elements, out {}", x.len(), out.len())
        })?;
        let f = self.fp8_e5m2.load_function(name)?;
        let n = out.len() as i64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(out).arg(x).arg(&n);
        // SAFETY: the caller names a kernel of this signature; both buffers hold n elements.
        unsafe { launch.launch(elementwise_launch(n)) }?;
        Ok(())
    }

    /// [`crate::scatter_rows::scatter_rows`] on the GPU, over a pool of any one-byte element
    /// (`u8`, float8): `slots` stay on the device; one past the pool is skipped.
    pub fn scatter_rows<P: DeviceRepr>(
        &self,
        pool: &mut CudaSlice<P>,
        rows: &CudaView<'_, P>,
        slots: &CudaView<'_, u32>,
        row_bytes: usize,
    ) -> Result<(), KernelError> {
        check_shape(std::mem::size_of::<P>() == 1, "scatter_rows", || {
            format!(
                "elements of {} bytes; the kernel copies bytes",
                std::mem::size_of::<P>()
            )
        })?;
        let tokens = scatter_rows_shape(pool.len(), rows.len(), slots.len(), row_bytes)?;
        if tokens == 0 {
            return Ok(());
        }
        let tokens =
            u32::try_from(tokens).map_err(|_| too_big("scatter_rows", "tokens", tokens))?;
        let pool_rows = (pool.len() / row_bytes) as i64;
        let row_bytes = row_bytes as i64;
        let f = self.scatter_rows.load_function("scatter_rows_u8")?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(pool)
            .arg(rows)
            .arg(slots)
            .arg(&row_bytes)
            .arg(&pool_rows);
        let cfg = LaunchConfig {
            grid_dim: (tokens, 1, 1),
            block_dim: ((row_bytes as u32).next_multiple_of(32).clamp(32, 256), 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches scatter_rows_u8(unsigned char*, const unsigned char*, const unsigned*,
        // long long, long long) in kernels/scatter_rows.cu for one-byte elements (checked);
        // scatter_rows_shape bounds every row read, and the kernel skips slots past pool_rows.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::sampling::argmax_rows`] on the GPU: each f32 logits row's token id, so greedy
    /// decoding copies back `rows` ids instead of `rows x vocab` logits. `logits` is a view, as a
    /// tensor's rows may start inside its buffer.
    pub fn argmax_rows(
        &self,
        logits: &CudaView<'_, f32>,
        vocab: usize,
        out: &mut CudaSlice<u32>,
    ) -> Result<(), KernelError> {
        let rows = argmax_shape(logits.len(), vocab, out.len())?;
        if rows == 0 {
            return Ok(());
        }
        let rows = u32::try_from(rows).map_err(|_| too_big("argmax", "rows", rows))?;
        let vocab = int32("argmax", "vocab", vocab)?;
        let f = self.sampling.load_function("argmax_f32")?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(out).arg(logits).arg(&vocab);
        let cfg = LaunchConfig {
            grid_dim: (rows, 1, 1),
            block_dim: (ARGMAX_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches argmax_f32(unsigned*, const float*, int) in kernels/sampling.cu, launched
        // with its ARGMAX_THREADS; argmax_shape bounds every row it reads and writes.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::sampling::sample_rows`] on the GPU: one token per row of f32 `logits`
    /// (`[rows, vocab]`), each row drawn under its `params` (copied over, five floats a row).
    pub fn sample_rows(
        &self,
        logits: &CudaView<f32>,
        vocab: usize,
        params: &[crate::sampling::DrawParams],
        out: &mut CudaSlice<u32>,
    ) -> Result<(), KernelError> {
        let rows = crate::sampling::sample_shape(logits.len(), vocab, params.len(), out.len())?;
        if rows == 0 {
            return Ok(());
        }
        let op = "sample_rows";
        let rows = u32::try_from(rows).map_err(|_| too_big(op, "rows", rows))?;
        let vocab_arg = int32(op, "vocab", vocab)?;
        let flat: Vec<f32> = params
            .iter()
            .flat_map(|p| [p.temperature, p.top_k as f32, p.top_p, p.min_p, p.uniform])
            .collect();
        let dparams = self.stage(&flat)?;
        let f = self.sampling.load_function("sample_rows_f32")?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(out).arg(logits).arg(&dparams).arg(&vocab_arg);
        let cfg = LaunchConfig {
            grid_dim: (rows, 1, 1),
            block_dim: (SAMPLE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches sample_rows_f32(unsigned*, const float*, const float*, int) in
        // kernels/sampling.cu; sample_shape checked `rows` rows of `vocab` logits, five params
        // and one output per row (top_k below 2^23, exact as a float).
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::sampling::token_logprobs_rows`] on the GPU: each row's token's logprob and its
    /// `k` best alternatives (at most the vocab), packed per row as
    /// [`crate::sampling::logprobs_width`] says.
    pub fn token_logprobs(
        &self,
        logits: &CudaView<f32>,
        vocab: usize,
        tokens: &CudaView<u32>,
        k: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        let op = "token_logprobs";
        let rows = crate::sampling::argmax_shape(logits.len(), vocab, tokens.len())?;
        let k = k.min(vocab);
        check_shape(
            out.len() == rows * crate::sampling::logprobs_width(k),
            op,
            || {
                format!(
                    "out has {} elements for {rows} rows of {k} alternatives",
                    out.len()
                )
            },
        )?;
        check_shape(vocab < 1 << 24, op, || {
            format!("vocab {vocab}: ids must be exact as f32")
        })?;
        if rows == 0 {
            return Ok(());
        }
        let rows = u32::try_from(rows).map_err(|_| too_big(op, "rows", rows))?;
        let (vocab_arg, k_arg) = (int32(op, "vocab", vocab)?, int32(op, "k", k)?);
        let f = self.sampling.load_function("token_logprobs_f32")?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(out)
            .arg(logits)
            .arg(tokens)
            .arg(&vocab_arg)
            .arg(&k_arg);
        let cfg = LaunchConfig {
            grid_dim: (rows, 1, 1),
            block_dim: (LOGPROB_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches token_logprobs_f32(float*, const float*, const unsigned*, int, int) in
        // kernels/sampling.cu; `rows` rows of `vocab` logits, one token and 1 + 2k outputs each.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}

impl CudaKernels {
    /// A call's metadata checked on the host ([`paged_batch_extent`]) and copied to the GPU once,
    /// for every layer of a step to read.
    pub fn upload_paged_batch(
        &self,
        batch: &PagedAttentionBatch<'_>,
        block_size: usize,
        max_blocks: usize,
    ) -> Result<DevicePagedBatch, KernelError> {
        let extent = paged_batch_extent(batch, block_size, max_blocks)?;
        Ok(DevicePagedBatch {
            block_tables: self.stage(batch.block_tables)?,
            token_seq: self.stage(batch.token_seq)?,
            token_ctx: self.stage(batch.token_ctx)?,
            table_len: batch.block_tables.len(),
            extent,
            block_size,
            max_blocks,
        })
    }

    /// [`Self::upload_paged_batch`] for metadata a CUDA graph keeps and rewrites before each
    /// replay ([`Self::rewrite_paged_batch`]): its extent claims every block of a cache of
    /// `cache_blocks` blocks, so the launches check, once at capture, that the cache holds them
    /// all, and each rewrite is checked on the host to read no block beyond them.
    pub fn upload_paged_batch_bounded(
        &self,
        batch: &PagedAttentionBatch<'_>,
        block_size: usize,
        max_blocks: usize,
        cache_blocks: usize,
    ) -> Result<DevicePagedBatch, KernelError> {
        let mut meta = self.upload_paged_batch(batch, block_size, max_blocks)?;
        check_bound(&meta.extent, cache_blocks)?;
        meta.extent.blocks_read = cache_blocks;
        Ok(meta)
    }

    /// Replaces the contents of `meta` (made by [`Self::upload_paged_batch_bounded`]) with
    /// `batch`, in place: the same tokens and sequences, checked like an upload, reading no block
    /// beyond the bound `meta` was made with. `batch`'s tables may be narrower than `meta`'s
    /// (`width` columns, enough for every context it holds): only those columns are copied, and
    /// what is left beyond them is never read.
    pub fn rewrite_paged_batch(
        &self,
        meta: &DevicePagedBatch,
        batch: &PagedAttentionBatch<'_>,
        width: usize,
    ) -> Result<(), KernelError> {
        const OP: &str = "paged_attention";
        check_shape((1..=meta.max_blocks).contains(&width), OP, || {
            format!(
                "tables {width} wide; the metadata's are {}",
                meta.max_blocks
            )
        })?;
        let extent = paged_batch_extent(batch, meta.block_size, width)?;
        let rows = meta.table_len / meta.max_blocks;
        check_shape(
            extent.tokens == meta.extent.tokens && batch.block_tables.len() == rows * width,
            OP,
            || {
                format!(
                    "rewriting metadata of {} tokens and {rows} tables with {} and {} entries \
                     ({width} a table)",
                    meta.extent.tokens,
                    extent.tokens,
                    batch.block_tables.len()
                )
            },
        )?;
        check_bound(&extent, meta.extent.blocks_read)?;
        self.write_rows(
            &meta.block_tables,
            meta.max_blocks,
            batch.block_tables,
            width,
        )?;
        self.write_at(&meta.token_seq, 0, batch.token_seq)?;
        self.write_at(&meta.token_ctx, 0, batch.token_ctx)
    }

    /// [`crate::paged_attention::paged_attention`] on the GPU, over metadata
    /// [`CudaKernels::upload_paged_batch`] checked and copied: the buffers are checked against
    /// it here (the tokens, and every block it reads against the cache's size).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention<T: CudaElement>(
        &self,
        out: &mut CudaSlice<T>,
        q: &CudaView<T>,
        k_cache: &CudaView<T>,
        v_cache: &CudaView<T>,
        batch: &DevicePagedBatch,
        scale: f32,
        shape: &PagedAttentionShape,
    ) -> Result<(), KernelError> {
        let tokens = q.len() / (shape.num_heads * shape.head_dim).max(1);
        let splits = paged_attention_splits(shape, tokens, self.sm_count);
        self.paged_attention_with_splits(out, q, k_cache, v_cache, batch, scale, shape, splits)
    }

    /// [`Self::paged_attention`] with each context cut into `splits` runs (1: not split; see
    /// [`crate::paged_attention::paged_attention_split`]), which it picks itself by
    /// [`paged_attention_splits`].
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention_with_splits<T: CudaElement>(
        &self,
        out: &mut CudaSlice<T>,
        q: &CudaView<T>,
        k_cache: &CudaView<T>,
        v_cache: &CudaView<T>,
        batch: &DevicePagedBatch,
        scale: f32,
        shape: &PagedAttentionShape,
        splits: usize,
    ) -> Result<(), KernelError> {
        let s = shape;
        check_splits("paged_attention", splits)?;
        batch.check_made_for("paged_attention", s.block_size, s.max_blocks)?;
        let (tokens, blocks_in_cache) =
            paged_attention_dims(shape, q.len(), k_cache.len(), v_cache.len(), out.len())?;
        check_extent(&batch.extent, tokens, blocks_in_cache)?;
        if tokens == 0 {
            return Ok(());
        }
        let int = |what: &str, v: usize| int32("paged_attention", what, v);
        let args = [
            int("num_heads", s.num_heads)?,
            int("num_kv_heads", s.num_kv_heads)?,
            int("head_dim", s.head_dim)?,
            int("v_dim", s.v_dim)?,
            int("block_size", s.block_size)?,
            int("max_blocks", s.max_blocks)?,
        ];
        // q, the tile's weights and slots, and one float per warp.
        let shared = (s.head_dim + 2 * PA_THREADS as usize + PA_THREADS as usize / 32) * 4;
        let call = AttentionCall {
            op: "paged_attention",
            module: &self.paged_attention,
            tokens,
            num_heads: s.num_heads,
            v_dim: s.v_dim,
            threads: PA_THREADS,
            shared,
            splits,
        };
        // SAFETY: paged_attention_<T> and its _split/_merge kernels in
        // kernels/paged_attention.cu take the arguments launch_attention passes, with these six
        // ints (num_heads, num_kv_heads, head_dim, v_dim, block_size, max_blocks); the metadata
        // was checked when uploaded (each token's sequence and context fit the tables) and its
        // extent here against these buffers (every block read is in the cache), and
        // paged_attention_dims sized `out`, which bounds every index the kernels read and write.
        unsafe { self.launch_attention(&call, out, [q, k_cache, v_cache], batch, scale, &args) }
    }
}

/// One launch of a grouped GEMM over packed experts ([`CudaKernels::launch_grouped`]).
#[derive(Clone, Copy)]
struct GroupedCall<'a> {
    op: &'static str,
    /// The fused MoE's tensor-core tiles, else `simt`'s SIMT ones.
    tensor_cores: bool,
    simt: &'a Arc<CudaModule>,
    shape: &'a GroupedGemmShape,
    /// The alignment's capacity (its padded rows).
    cap: usize,
}

/// One launch of ember's paged attention kernels ([`CudaKernels::launch_attention`]).
struct AttentionCall<'a> {
    op: &'static str,
    module: &'a Arc<CudaModule>,
    tokens: usize,
    num_heads: usize,
    /// Width of each (token, head)'s output row.
    v_dim: usize,
    threads: u32,
    /// Dynamic shared memory of the attention kernel, in bytes.
    shared: usize,
    splits: usize,
}

impl CudaKernels {
    /// Launches `<op>_<T>(T* out, const T* q, const T* a, const T* b, const unsigned*
    /// block_tables, const unsigned* token_seq, const unsigned* token_ctx, float scale, int...
    /// ints)` over a `(tokens, num_heads)` grid; split, `<op>_split_<T>(q, a, b, the tables,
    /// scale, ints..., int splits, float* part_out, float* part_ml)` over `(tokens, num_heads,
    /// splits)` into f32 partials it allocates, then `<op>_merge_<T>` (see [`Self::merge_splits`]).
    ///
    /// # Safety
    /// The op's kernels must take exactly these arguments, and `ints` with the buffers must bound
    /// every index they read and write, `out` holding `tokens · num_heads` rows of `v_dim`.
    unsafe fn launch_attention<T: CudaElement>(
        &self,
        call: &AttentionCall<'_>,
        out: &mut CudaSlice<T>,
        [q, a, b]: [&CudaView<T>; 3],
        batch: &DevicePagedBatch,
        scale: f32,
        ints: &[i32],
    ) -> Result<(), KernelError> {
        let c = call;
        check_shape(c.num_heads <= 65_535, c.op, || {
            format!("{} heads exceed the grid's 65535", c.num_heads)
        })?;
        let pairs = c.tokens * c.num_heads;
        let tokens = u32::try_from(c.tokens).map_err(|_| too_big(c.op, "tokens", c.tokens))?;
        let shared = u32::try_from(c.shared).map_err(|_| too_big(c.op, "head size", c.shared))?;
        let splits = int32(c.op, "splits", c.splits)?;
        let mut parts = None;
        let f = if c.splits > 1 {
            // Each (token, head, split)'s normalized row, then its max and sum.
            parts = Some((
                self.stream.alloc_zeros::<f32>(pairs * c.splits * c.v_dim)?,
                self.stream.alloc_zeros::<f32>(pairs * c.splits * 2)?,
            ));
            kernel(c.module, &format!("{}_split", c.op), T::KERNEL_SUFFIX)?
        } else {
            kernel(c.module, c.op, T::KERNEL_SUFFIX)?
        };
        let mut launch = self.stream.launch_builder(&f);
        if parts.is_none() {
            launch.arg(&mut *out);
        }
        launch
            .arg(q)
            .arg(a)
            .arg(b)
            .arg(&batch.block_tables)
            .arg(&batch.token_seq)
            .arg(&batch.token_ctx)
            .arg(&scale);
        for i in ints {
            launch.arg(i);
        }
        if let Some((part_out, part_ml)) = parts.as_mut() {
            launch.arg(&splits).arg(part_out).arg(part_ml);
        }
        let cfg = LaunchConfig {
            grid_dim: (tokens, c.num_heads as u32, c.splits as u32),
            block_dim: (c.threads, 1, 1),
            shared_mem_bytes: shared,
        };
        // SAFETY: the caller's contract; each split block writes its own row and pair of the
        // partials, sized above for every (token, head, split).
        unsafe { launch.launch(cfg) }?;
        let Some((part_out, part_ml)) = parts else {
            return Ok(());
        };
        let f = kernel(c.module, &format!("{}_merge", c.op), T::KERNEL_SUFFIX)?;
        let sizes = [
            int32(c.op, "num_heads", c.num_heads)?,
            int32(c.op, "v_dim", c.v_dim)?,
            splits,
        ];
        self.merge_splits(&f, out, (&part_out, &part_ml), (tokens, c.num_heads), sizes)
    }
}

impl CudaKernels {
    /// The split form's second pass (`merge_splits` in kernels/split_softmax.cuh) through `f`,
    /// a `<op>_merge_<T>(T* out, const float* part_out, const float* part_ml, int num_heads,
    /// int v_dim, int splits)` kernel: block (token, head) of `grid` merges that pair's
    /// partials into its row of `out`, which the caller has checked holds `tokens · heads`
    /// rows of v_dim; the partials hold `splits` rows (and max/sum pairs) per pair.
    fn merge_splits<T: CudaElement>(
        &self,
        f: &CudaFunction,
        out: &mut CudaSlice<T>,
        (part_out, part_ml): (&CudaSlice<f32>, &CudaSlice<f32>),
        (tokens, heads): (u32, usize),
        [num_heads, v_dim, splits]: [i32; 3],
    ) -> Result<(), KernelError> {
        let mut launch = self.stream.launch_builder(f);
        launch
            .arg(out)
            .arg(part_out)
            .arg(part_ml)
            .arg(&num_heads)
            .arg(&v_dim)
            .arg(&splits);
        let cfg = LaunchConfig {
            grid_dim: (tokens, heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches the merge kernels' signature above; each block reads
        // its pair's `splits` partials (written by the split launch before it on this stream)
        // and writes its pair's row of `out`, all within the sizes the callers allocated.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::mla_decode::mla_decode`] on the GPU, over metadata
    /// [`CudaKernels::upload_paged_batch`] checked and copied (its extent checked here against
    /// these caches).
    #[allow(clippy::too_many_arguments)]
    pub fn mla_decode<T: CudaElement>(
        &self,
        out: &mut CudaSlice<T>,
        q: &CudaView<T>,
        latent_cache: &CudaView<T>,
        rope_cache: &CudaView<T>,
        batch: &DevicePagedBatch,
        scale: f32,
        shape: &MlaShape,
    ) -> Result<(), KernelError> {
        let tokens = q.len() / (shape.num_heads * (shape.rank + shape.rope_dim)).max(1);
        let splits = mla_decode_splits(shape, tokens, self.sm_count);
        self.mla_decode_with_splits(
            out,
            q,
            latent_cache,
            rope_cache,
            batch,
            scale,
            shape,
            splits,
        )
    }

    /// [`Self::mla_decode`] with each context cut into `splits` runs (1: not split; see
    /// [`crate::mla_decode::mla_decode_split`]), which it picks itself by
    /// [`mla_decode_splits`].
    #[allow(clippy::too_many_arguments)]
    pub fn mla_decode_with_splits<T: CudaElement>(
        &self,
        out: &mut CudaSlice<T>,
        q: &CudaView<T>,
        latent_cache: &CudaView<T>,
        rope_cache: &CudaView<T>,
        batch: &DevicePagedBatch,
        scale: f32,
        shape: &MlaShape,
        splits: usize,
    ) -> Result<(), KernelError> {
        const OP: &str = "mla_decode";
        check_splits(OP, splits)?;
        let s = shape;
        batch.check_made_for(OP, s.block_size, s.max_blocks)?;
        let (tokens, blocks_in_cache) = mla_dims(
            shape,
            q.len(),
            latent_cache.len(),
            rope_cache.len(),
            out.len(),
        )?;
        check_extent(&batch.extent, tokens, blocks_in_cache)?;
        if tokens == 0 {
            return Ok(());
        }
        let int = |what: &str, v: usize| int32(OP, what, v);
        let args = [
            int("num_heads", s.num_heads)?,
            int("rank", s.rank)?,
            int("rope_dim", s.rope_dim)?,
            int("block_size", s.block_size)?,
            int("max_blocks", s.max_blocks)?,
        ];
        // q, the tile's weights and slots, and one float per warp.
        let shared =
            (s.rank + s.rope_dim + 2 * MLA_THREADS as usize + MLA_THREADS as usize / 32) * 4;
        let call = AttentionCall {
            op: OP,
            module: &self.mla_decode,
            tokens,
            num_heads: s.num_heads,
            v_dim: s.rank,
            threads: MLA_THREADS,
            shared,
            splits,
        };
        // SAFETY: mla_decode_<T> and its _split/_merge kernels in kernels/mla_decode.cu take the
        // arguments launch_attention passes, with these five ints (num_heads, rank, rope_dim,
        // block_size, max_blocks); the metadata was checked when uploaded and its extent here
        // against these caches, and mla_dims bounds q, out and every cache row.
        unsafe {
            self.launch_attention(
                &call,
                out,
                [q, latent_cache, rope_cache],
                batch,
                scale,
                &args,
            )
        }
    }
}

impl CudaKernels {
    /// Whether the GPU has FP8 tensor cores (compute capability 8.9 and up), which
    /// [`CudaKernels::w8a8_gemm`] needs.
    pub fn has_fp8_tensor_cores(&self) -> Result<bool, KernelError> {
        Ok(self.stream.context().compute_capability()? >= (8, 9))
    }

    /// [`crate::w8a8::quantize_groups`] on the GPU: `x` `[m, k]` to e4m3 bytes `q` `[m, k]` and
    /// scales `[m, ceil(k / 128)]`.
    pub fn quant_fp8_groups<T: CudaElement>(
        &self,
        x: &CudaView<T>,
        k: usize,
        q: &mut CudaSlice<u8>,
        scales: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "quant_fp8_groups";
        check_shape(k > 0 && x.len().is_multiple_of(k), OP, || {
            format!("x has {} elements, not rows of {k}", x.len())
        })?;
        let m = x.len() / k;
        let groups = k.div_ceil(crate::w8a8::GROUP);
        check_shape(q.len() == m * k && scales.len() == m * groups, OP, || {
            format!(
                "q has {} and scales {} elements for [{m}, {k}]",
                q.len(),
                scales.len()
            )
        })?;
        if m == 0 {
            return Ok(());
        }
        let (m_arg, k_arg) = (int32(OP, "m", m)?, int32(OP, "k", k)?);
        let items = m * groups;
        let blocks = u32::try_from(items.div_ceil(8)).map_err(|_| too_big(OP, "rows", m))?;
        let f = kernel(&self.w8a8, OP, T::KERNEL_SUFFIX)?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(q).arg(scales).arg(x).arg(&m_arg).arg(&k_arg);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches quant_fp8_groups_<T>(u8*, float*, const T*, int, int) in
        // kernels/w8a8.cu: one warp per (row, group), 8 a block; lengths checked above.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::w8a8::w8a8_gemm`] on FP8 tensor cores; `qw` e4m3 bytes as any one-byte element.
    /// Refused on a GPU without them ([`CudaKernels::has_fp8_tensor_cores`]).
    #[allow(clippy::too_many_arguments)]
    pub fn w8a8_gemm<T: CudaElement, P: DeviceRepr>(
        &self,
        qa: &CudaView<u8>,
        sa: &CudaView<f32>,
        qw: &CudaView<P>,
        sw: &CudaView<f32>,
        shape: &crate::w8a8::W8a8Shape,
        y: &mut CudaSlice<T>,
    ) -> Result<(), KernelError> {
        const OP: &str = "w8a8_gemm";
        check_shape(std::mem::size_of::<P>() == 1, OP, || {
            "e4m3 weights are one byte each".into()
        })?;
        crate::w8a8::w8a8_shape(shape, qa.len(), sa.len(), qw.len(), sw.len(), y.len())?;
        check_shape(self.has_fp8_tensor_cores()?, OP, || {
            "this GPU has no FP8 tensor cores (compute capability below 8.9)".into()
        })?;
        let s = shape;
        if s.m == 0 || s.n == 0 {
            return Ok(());
        }
        let int = |what: &str, v: usize| int32(OP, what, v);
        let args = [
            int("m", s.m)?,
            int("n", s.n)?,
            int("k", s.k)?,
            int("block_n", s.block_n)?,
        ];
        let tiles = |v: usize, what| {
            u32::try_from(v.div_ceil(64))
                .ok()
                .filter(|&b| b <= 65_535 || what == "m")
                .ok_or_else(|| too_big(OP, what, v))
        };
        let f = kernel(&self.w8a8, OP, T::KERNEL_SUFFIX)?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(y).arg(qa).arg(sa).arg(qw).arg(sw);
        for a in &args {
            launch.arg(a);
        }
        let cfg = LaunchConfig {
            grid_dim: (tiles(s.m, "m")?, tiles(s.n, "n")?, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches w8a8_gemm_<T>(T*, const u8*, const float*, const u8*, const float*,
        // int x 4) in kernels/w8a8.cu, launched with its 128 threads; w8a8_shape bounds every
        // row, input and scale it reads, and it writes only rows < m and columns < n.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}

impl CudaKernels {
    /// [`crate::w8a8::grouped_w8a8`] on FP8 tensor cores over an alignment
    /// [`CudaKernels::moe_align`] made (`shape.block_m` must be 64); `qa`/`sa` the activation
    /// rows quantized by [`CudaKernels::quant_fp8_groups`].
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_w8a8<T: CudaElement, P: DeviceRepr>(
        &self,
        out: &mut CudaSlice<T>,
        qa: &CudaView<u8>,
        sa: &CudaView<f32>,
        qw: &CudaView<P>,
        sw: &CudaView<f32>,
        align: &DeviceAlignment,
        shape: &GroupedGemmShape,
        block_n: usize,
    ) -> Result<(), KernelError> {
        const OP: &str = "grouped_w8a8";
        let s = shape;
        check_shape(std::mem::size_of::<P>() == 1, OP, || {
            "e4m3 weights are one byte each".into()
        })?;
        let (cap, host) = self.check_alignment(OP, align, s)?;
        crate::w8a8::grouped_w8a8_shape(
            s,
            block_n,
            out.len(),
            qa.len(),
            sa.len(),
            qw.len(),
            sw.len(),
            &host,
        )?;
        check_shape(self.has_fp8_tensor_cores()?, OP, || {
            "this GPU has no FP8 tensor cores (compute capability below 8.9)".into()
        })?;
        if s.num_entries == 0 {
            return Ok(());
        }
        let args = grouped_ints(OP, s, &[int32(OP, "block_n", block_n)?])?;
        let f = kernel(&self.w8a8, OP, T::KERNEL_SUFFIX)?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(out).arg(qa).arg(sa).arg(qw).arg(sw);
        push_alignment(&mut launch, align);
        for a in &args {
            launch.arg(a);
        }
        let blocks_n = u32::try_from(s.n_out.div_ceil(64))
            .ok()
            .filter(|&b| b <= 65_535)
            .ok_or_else(|| too_big(OP, "n_out", s.n_out))?;
        let cfg = LaunchConfig {
            grid_dim: ((cap / s.block_m) as u32, blocks_n, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches grouped_w8a8_<T>(T*, const u8*, const float*, const u8*, const float*,
        // const unsigned* x 3, int x 6) in kernels/w8a8.cu, launched with its 128 threads; the
        // kernel reads activation rows of entries < num_entries and weights and scales of experts
        // < num_experts within the lengths checked above, and writes rows of those entries.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}

/// A step's paged attention metadata on the GPU ([`CudaKernels::upload_paged_batch`]).
pub struct DevicePagedBatch {
    block_tables: CudaSlice<u32>,
    token_seq: CudaSlice<u32>,
    token_ctx: CudaSlice<u32>,
    /// Entries of `block_tables` in use (the staged buffer may be longer).
    table_len: usize,
    extent: BatchExtent,
    block_size: usize,
    max_blocks: usize,
}

impl DevicePagedBatch {
    /// What the metadata needs of a call's buffers.
    pub fn extent(&self) -> BatchExtent {
        self.extent
    }

    /// Errs unless the metadata was made for blocks of `block_size` and tables `max_blocks`
    /// wide (what `op`'s call reads it as).
    fn check_made_for(
        &self,
        op: &'static str,
        block_size: usize,
        max_blocks: usize,
    ) -> Result<(), KernelError> {
        check_shape(
            block_size == self.block_size && max_blocks == self.max_blocks,
            op,
            || {
                format!(
                    "the metadata was made for blocks of {} and tables of {}, not {block_size} and \
                     {max_blocks}",
                    self.block_size, self.max_blocks
                )
            },
        )
    }
}

impl CudaKernels {
    /// [`crate::moe_routing::route`] on the GPU: f32 router logits `[tokens, experts]` to each
    /// token's chosen expert ids and weights (`[tokens, top_k]`, best first). `bias` may be empty
    /// unless the method is `NoauxTc`.
    ///
    /// With `live`, a device count: tokens from it on are routed to no expert
    /// ([`crate::moe_routing::retire_rows`]); how a CUDA graph's spare rows skip the experts.
    pub fn moe_routing(
        &self,
        logits: &CudaView<f32>,
        bias: &CudaView<f32>,
        cfg: &RoutingConfig,
        ids: &mut CudaSlice<u32>,
        weights: &mut CudaSlice<f32>,
        live: Option<&CudaSlice<u32>>,
    ) -> Result<(), KernelError> {
        let tokens = routing_shape(cfg, logits.len(), bias.len(), ids.len(), weights.len())?;
        if tokens == 0 {
            return Ok(());
        }
        let tokens = u32::try_from(tokens).map_err(|_| too_big("moe_routing", "tokens", tokens))?;
        let method: i32 = match cfg.method {
            TopkMethod::Greedy => 0,
            TopkMethod::GroupLimitedGreedy => 1,
            TopkMethod::NoauxTc => 2,
        };
        // Sizes are bounded by routing_shape (at most 1024 experts).
        let ints = [
            cfg.num_experts as i32,
            cfg.top_k as i32,
            cfg.n_group as i32,
            cfg.topk_group as i32,
            method,
            cfg.sigmoid as i32,
            cfg.renormalize as i32,
        ];
        let f = self.moe_routing.load_function("moe_routing")?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(ids).arg(weights).arg(logits).arg(bias);
        for i in &ints {
            launch.arg(i);
        }
        launch.arg(&cfg.scaling);
        let null = 0u64;
        match live {
            Some(live) => launch.arg(live),
            None => launch.arg(&null),
        };
        let threads = cfg.num_experts.next_multiple_of(32).clamp(32, 1024) as u32;
        let launch_cfg = LaunchConfig {
            grid_dim: (tokens, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches moe_routing(unsigned*, float*, const float*, const float*, int x 7,
        // float, const unsigned*) in kernels/moe_routing.cu (a null pointer for no `live`, which
        // else holds at least the one u32 the kernel reads); routing_shape bounds the experts,
        // groups and top_k by the kernel's shared arrays and every buffer by the token count.
        unsafe { launch.launch(launch_cfg) }?;
        Ok(())
    }
}

/// [`crate::fused_moe::MoeAlignment`] on the GPU: computed there, read by the grouped GEMM there.
pub struct DeviceAlignment {
    pub sorted_ids: CudaSlice<u32>,
    pub expert_ids: CudaSlice<u32>,
    /// One element: the rows in use.
    pub num_padded: CudaSlice<u32>,
    pub num_entries: usize,
    pub num_experts: usize,
    pub block_m: usize,
}

impl CudaKernels {
    /// [`crate::fused_moe::moe_align`] on the GPU. An id of `topk_ids` outside the experts is
    /// counted by none of them: its entry is dropped, never read out of bounds.
    pub fn moe_align(
        &self,
        topk_ids: &CudaView<u32>,
        num_experts: usize,
        block_m: usize,
    ) -> Result<DeviceAlignment, KernelError> {
        check_shape(
            num_experts > 0 && num_experts <= 1024 && block_m > 0 && block_m <= 1024,
            "moe_align",
            || format!("{num_experts} experts (1 to 1024), block_m {block_m} (1 to 1024)"),
        )?;
        let n = topk_ids.len();
        let cap = align_capacity(n, num_experts, block_m);
        let int =
            |what: &str, v: usize| i32::try_from(v).map_err(|_| too_big("moe_align", what, v));
        let args = [
            int("entries", n)?,
            num_experts as i32,
            block_m as i32,
            int("capacity", cap)?,
        ];
        let mut a = DeviceAlignment {
            sorted_ids: self.stream.alloc_zeros::<u32>(cap)?,
            expert_ids: self.stream.alloc_zeros::<u32>(cap / block_m)?,
            num_padded: self.stream.alloc_zeros::<u32>(1)?,
            num_entries: n,
            num_experts,
            block_m,
        };
        let f = self.fused_moe.load_function("moe_align")?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(&mut a.sorted_ids)
            .arg(&mut a.expert_ids)
            .arg(&mut a.num_padded)
            .arg(topk_ids);
        for x in &args {
            launch.arg(x);
        }
        let threads = num_experts.next_multiple_of(32) as u32;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches moe_align(unsigned*, unsigned*, unsigned*, const unsigned*, int x 4) in
        // kernels/fused_moe.cu; the outputs hold `cap` rows and `cap / block_m` blocks, what any
        // counts of n entries over num_experts (<= 1024 threads) can fill.
        unsafe { launch.launch(cfg) }?;
        Ok(a)
    }

    /// [`crate::fused_moe::grouped_gemm`] on the GPU over an alignment [`CudaKernels::moe_align`]
    /// made (`shape.block_m` must be 64, its tiles' rows).
    pub fn grouped_gemm<T: CudaElement>(
        &self,
        out: &mut CudaSlice<T>,
        x: &CudaView<T>,
        w: &CudaView<T>,
        align: &DeviceAlignment,
        shape: &GroupedGemmShape,
    ) -> Result<(), KernelError> {
        let s = shape;
        let (cap, host) = self.check_alignment("grouped_gemm", align, s)?;
        crate::fused_moe::grouped_gemm_shape(s, out.len(), x.len(), w.len(), &host)?;
        if s.num_entries == 0 {
            return Ok(());
        }
        let args = grouped_ints("grouped_gemm", s, &[])?;
        let bf16 = T::KERNEL_SUFFIX == "bf16";
        let f = kernel(&self.fused_moe, "grouped_gemm", T::KERNEL_SUFFIX)?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(out).arg(x).arg(w);
        push_alignment(&mut launch, align);
        for a in &args {
            launch.arg(a);
        }
        let mut cfg = wmma_tile_launch("grouped_gemm", cap, s)?;
        if !bf16 {
            cfg.block_dim.0 = 256;
        }
        // SAFETY: matches grouped_gemm_<T>(T*, const T*, const T*, const unsigned* x 3, int x 5);
        // the kernel reads x rows of ids < num_entries, weights of experts < num_experts and
        // writes rows of ids < num_entries, all bounded by the length checks above.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::prefill_attention::prefill_attention`] on the GPU, on bf16 tensor cores (bf16
    /// only; keys up to [`crate::prefill_attention::MAX_DQK`] wide, values up to `MAX_DV`).
    pub fn prefill_attention<T: CudaElement>(
        &self,
        out: &mut CudaSlice<T>,
        q: &CudaView<T>,
        k: &CudaView<T>,
        v: &CudaView<T>,
        shape: &crate::prefill_attention::PrefillShape,
        scale: f32,
    ) -> Result<(), KernelError> {
        use crate::prefill_attention::{prefill_shape, MAX_DQK, MAX_DV};
        const OP: &str = "prefill_attention";
        let s = shape;
        check_shape(T::KERNEL_SUFFIX == "bf16", OP, || {
            "bf16 inputs (tensor cores)".into()
        })?;
        check_shape(s.dqk <= MAX_DQK && s.dv <= MAX_DV, OP, || {
            format!(
                "heads of {} and {} are over the kernel's {MAX_DQK} and {MAX_DV}",
                s.dqk, s.dv
            )
        })?;
        prefill_shape(s, q.len(), k.len(), v.len(), out.len())?;
        if s.q_len == 0 {
            return Ok(());
        }
        let ints = [
            int32(OP, "q_len", s.q_len)?,
            int32(OP, "kv_len", s.kv_len)?,
            int32(OP, "heads", s.heads)?,
            int32(OP, "dqk", s.dqk)?,
            int32(OP, "dv", s.dv)?,
        ];
        let blocks_y = u32::try_from(s.heads)
            .ok()
            .filter(|&b| b <= 65_535)
            .ok_or_else(|| too_big(OP, "heads", s.heads))?;
        let cfg = LaunchConfig {
            grid_dim: (s.q_len.div_ceil(PREFILL_ROWS) as u32, blocks_y, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = kernel(&self.prefill_attention, OP, T::KERNEL_SUFFIX)?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(out).arg(q).arg(k).arg(v);
        for a in &ints {
            launch.arg(a);
        }
        launch.arg(&scale);
        // SAFETY: matches prefill_attention_bf16(bf16*, const bf16* x 3, int x 5, float) in
        // kernels/prefill_attention.cu (T is bf16, checked); it reads q rows < q_len and k, v rows
        // < kv_len and writes out rows < q_len, within the lengths checked above.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::fused_moe::grouped_w8a16_tc`] on the GPU: the grouped GEMM over e4m3 experts on
    /// bf16 tensor cores, each weight dequantized into the tile (prefill-sized batches; bf16 only).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_w8a16_tc<T: CudaElement, P: DeviceRepr>(
        &self,
        out: &mut CudaSlice<T>,
        x: &CudaView<T>,
        w: &CudaView<P>,
        scales: &CudaView<f32>,
        align: &DeviceAlignment,
        shape: &GroupedGemmShape,
        blocks: &crate::fused_moe::ScaleBlocks,
    ) -> Result<(), KernelError> {
        self.grouped_w8a16_on(true, out, x, w, scales, align, shape, blocks)
    }

    /// [`crate::fused_moe::grouped_w4a16_tc`] on the GPU: the grouped GEMM over 4-bit experts on
    /// bf16 tensor cores, each weight dequantized into the tile (prefill-sized batches; bf16 only).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_w4a16_tc<T: CudaElement>(
        &self,
        out: &mut CudaSlice<T>,
        x: &CudaView<T>,
        codes: &CudaView<u8>,
        qparams: &CudaView<f32>,
        align: &DeviceAlignment,
        shape: &GroupedGemmShape,
        params: &crate::fused_moe::W4Params,
    ) -> Result<(), KernelError> {
        self.grouped_w4a16_on(true, out, x, codes, qparams, align, shape, params)
    }

    /// [`crate::fused_moe::grouped_w8a16`] on the GPU over an alignment
    /// [`CudaKernels::moe_align`] made (`shape.block_m` must be 64); `w` holds e4m3 bytes as any
    /// one-byte element.
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_w8a16<T: CudaElement, P: DeviceRepr>(
        &self,
        out: &mut CudaSlice<T>,
        x: &CudaView<T>,
        w: &CudaView<P>,
        scales: &CudaView<f32>,
        align: &DeviceAlignment,
        shape: &GroupedGemmShape,
        blocks: &crate::fused_moe::ScaleBlocks,
    ) -> Result<(), KernelError> {
        self.grouped_w8a16_on(false, out, x, w, scales, align, shape, blocks)
    }

    /// The grouped W8A16 GEMM on the SIMT tiles (`kernels/moe_w8a16.cu`), or with
    /// `tensor_cores` the bf16 WMMA tiles (`grouped_w8a16_tc_bf16` in `kernels/fused_moe.cu`).
    #[allow(clippy::too_many_arguments)]
    fn grouped_w8a16_on<T: CudaElement, P: DeviceRepr>(
        &self,
        tensor_cores: bool,
        out: &mut CudaSlice<T>,
        x: &CudaView<T>,
        w: &CudaView<P>,
        scales: &CudaView<f32>,
        align: &DeviceAlignment,
        shape: &GroupedGemmShape,
        blocks: &crate::fused_moe::ScaleBlocks,
    ) -> Result<(), KernelError> {
        let op: &'static str = if tensor_cores {
            "grouped_w8a16_tc"
        } else {
            "grouped_w8a16"
        };
        let s = shape;
        check_shape(std::mem::size_of::<P>() == 1, op, || {
            "e4m3 weights are one byte each".into()
        })?;
        check_shape(!tensor_cores || T::KERNEL_SUFFIX == "bf16", op, || {
            "bf16 activations (tensor cores)".into()
        })?;
        let (cap, host) = self.check_alignment(op, align, s)?;
        crate::fused_moe::grouped_w8a16_shape(
            s,
            blocks,
            out.len(),
            x.len(),
            w.len(),
            scales.len(),
            &host,
        )?;
        if s.num_entries == 0 {
            return Ok(());
        }
        let extra = [
            int32(op, "block_n", blocks.block_n)?,
            int32(op, "block_k", blocks.block_k)?,
        ];
        let call = GroupedCall {
            op,
            tensor_cores,
            simt: &self.moe_w8a16,
            shape: s,
            cap,
        };
        // SAFETY: grouped_w8a16_<T> in kernels/moe_w8a16.cu and grouped_w8a16_tc_bf16 in
        // kernels/fused_moe.cu (T is bf16 there, checked) both take (T*, const T*, const u8*,
        // const float*, const unsigned* x 3, int x 7); they read x rows of ids < num_entries,
        // weights and scales of experts < num_experts within the lengths checked above, and write
        // rows of ids < num_entries.
        unsafe { self.launch_grouped(&call, out, x, w, scales, align, &extra) }
    }

    /// [`crate::fused_moe::grouped_w4a16`] on the GPU over an alignment
    /// [`CudaKernels::moe_align`] made (`shape.block_m` must be 64).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_w4a16<T: CudaElement>(
        &self,
        out: &mut CudaSlice<T>,
        x: &CudaView<T>,
        codes: &CudaView<u8>,
        qparams: &CudaView<f32>,
        align: &DeviceAlignment,
        shape: &GroupedGemmShape,
        params: &crate::fused_moe::W4Params,
    ) -> Result<(), KernelError> {
        self.grouped_w4a16_on(false, out, x, codes, qparams, align, shape, params)
    }

    /// The grouped W4A16 GEMM on the SIMT tiles (`kernels/moe_w4a16.cu`), or with
    /// `tensor_cores` the bf16 WMMA tiles (`grouped_w4a16_tc_bf16` in `kernels/fused_moe.cu`).
    #[allow(clippy::too_many_arguments)]
    fn grouped_w4a16_on<T: CudaElement>(
        &self,
        tensor_cores: bool,
        out: &mut CudaSlice<T>,
        x: &CudaView<T>,
        codes: &CudaView<u8>,
        qparams: &CudaView<f32>,
        align: &DeviceAlignment,
        shape: &GroupedGemmShape,
        params: &crate::fused_moe::W4Params,
    ) -> Result<(), KernelError> {
        let op: &'static str = if tensor_cores {
            "grouped_w4a16_tc"
        } else {
            "grouped_w4a16"
        };
        let s = shape;
        check_shape(!tensor_cores || T::KERNEL_SUFFIX == "bf16", op, || {
            "bf16 activations (tensor cores)".into()
        })?;
        let (cap, host) = self.check_alignment(op, align, s)?;
        crate::fused_moe::grouped_w4a16_shape(
            s,
            params,
            out.len(),
            x.len(),
            codes.len(),
            qparams.len(),
            &host,
        )?;
        if s.num_entries == 0 {
            return Ok(());
        }
        let extra = [
            int32(op, "group_size", params.group_size)?,
            i32::from(params.f16_weights),
            i32::from(params.e2m1),
            i32::from(params.zeros),
            params.scales.code(),
        ];
        let call = GroupedCall {
            op,
            tensor_cores,
            simt: &self.moe_w4a16,
            shape: s,
            cap,
        };
        // SAFETY: grouped_w4a16_<T> in kernels/moe_w4a16.cu and grouped_w4a16_tc_bf16 in
        // kernels/fused_moe.cu (T is bf16 there, checked) both take (T*, const T*, const u8*,
        // const float*, const unsigned* x 3, int x 10); the kernel reads x rows of ids <
        // num_entries, codes and qparams of experts < num_experts within the lengths checked
        // above, and writes rows of ids < num_entries.
        unsafe { self.launch_grouped(&call, out, x, codes, qparams, align, &extra) }
    }

    /// The launch both grouped GEMMs over packed experts end with: `op` from the fused MoE's
    /// module (its tensor-core tiles) or from `simt`, over `(out, x, weights, their scales,
    /// the alignment, the shape's ints, extra)`, on the tiles' grid.
    ///
    /// # Safety
    /// `op` must take exactly those arguments, and the lengths checked by the caller must bound
    /// every row, weight and scale it reads and writes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch_grouped<T: CudaElement, W: DeviceRepr>(
        &self,
        call: &GroupedCall<'_>,
        out: &mut CudaSlice<T>,
        x: &CudaView<T>,
        weights: &CudaView<W>,
        params: &CudaView<f32>,
        align: &DeviceAlignment,
        extra: &[i32],
    ) -> Result<(), KernelError> {
        let GroupedCall {
            op,
            tensor_cores,
            simt,
            shape: s,
            cap,
        } = *call;
        let args = grouped_ints(op, s, extra)?;
        let module = if tensor_cores { &self.fused_moe } else { simt };
        let f = kernel(module, op, T::KERNEL_SUFFIX)?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(out).arg(x).arg(weights).arg(params);
        push_alignment(&mut launch, align);
        for a in &args {
            launch.arg(a);
        }
        let cfg = if tensor_cores {
            wmma_tile_launch(op, cap, s)?
        } else {
            grouped_tile_launch(op, cap, s)?
        };
        // SAFETY: the caller's contract.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::fused_moe::count_experts`] on the GPU: `counts` (one per expert) += the entries
    /// of `topk_ids` per expert, asynchronously.
    pub fn count_experts(
        &self,
        counts: &mut CudaSlice<u64>,
        topk_ids: &CudaView<u32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "count_experts";
        let n = topk_ids.len();
        if n == 0 {
            return Ok(());
        }
        let (n_arg, e_arg) = (
            int32(OP, "entries", n)?,
            int32(OP, "experts", counts.len())?,
        );
        let f = self.fused_moe.load_function(OP)?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(counts).arg(topk_ids).arg(&n_arg).arg(&e_arg);
        // SAFETY: matches count_experts(u64*, const unsigned*, int, int) in kernels/fused_moe.cu;
        // it reads n ids and adds only to counters below counts.len().
        unsafe { launch.launch(elementwise_launch(n as i64)) }?;
        Ok(())
    }

    /// [`crate::fused_moe::moe_sum`] on the GPU.
    pub fn moe_sum<T: CudaElement>(
        &self,
        out: &mut CudaSlice<T>,
        y: &CudaView<T>,
        weights: &CudaView<f32>,
        top_k: usize,
        hidden: usize,
    ) -> Result<(), KernelError> {
        crate::fused_moe::moe_sum_shape(out.len(), y.len(), weights.len(), top_k, hidden)?;
        let tokens = out.len() / hidden;
        if tokens == 0 {
            return Ok(());
        }
        let int = |what: &str, v: usize| int32("moe_sum", what, v);
        let (k_arg, h_arg) = (int("top_k", top_k)?, int("hidden", hidden)?);
        let f = kernel(&self.fused_moe, "moe_sum", T::KERNEL_SUFFIX)?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(out).arg(y).arg(weights).arg(&k_arg).arg(&h_arg);
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(tokens).map_err(|_| too_big("moe_sum", "tokens", tokens))?,
                1,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches moe_sum_<T>(T*, const T*, const float*, int, int); lengths checked.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}

impl CudaKernels {
    /// Checks that `align` was made for `s`; the alignment's capacity.
    fn check_alignment(
        &self,
        op: &'static str,
        align: &DeviceAlignment,
        s: &GroupedGemmShape,
    ) -> Result<(usize, crate::fused_moe::MoeAlignment), KernelError> {
        check_shape(
            align.num_entries == s.num_entries
                && align.num_experts == s.num_experts
                && align.block_m == s.block_m,
            op,
            || "the alignment was made for other entries, experts or block_m".into(),
        )?;
        let cap = align_capacity(s.num_entries, s.num_experts, s.block_m);
        // A host alignment of the same capacity, for the references' size checks.
        let host = crate::fused_moe::MoeAlignment {
            sorted_ids: vec![0; cap],
            expert_ids: vec![0; cap / s.block_m.max(1)],
            num_padded: 0,
        };
        Ok((cap, host))
    }
}

/// The int arguments every grouped GEMM kernel starts with (entries, experts, k_in, n_out,
/// x_div), then `extra`.
fn grouped_ints(
    op: &'static str,
    s: &GroupedGemmShape,
    extra: &[i32],
) -> Result<Vec<i32>, KernelError> {
    let mut ints = vec![
        int32(op, "entries", s.num_entries)?,
        int32(op, "experts", s.num_experts)?,
        int32(op, "k_in", s.k_in)?,
        int32(op, "n_out", s.n_out)?,
        int32(op, "x_div", s.x_div)?,
    ];
    ints.extend_from_slice(extra);
    Ok(ints)
}

/// The launch of `kernels/fused_moe.cu`'s 64 x 64 grouped GEMM tiles: one block of 128 threads
/// (4 warps on tensor cores) per 64-row block of the alignment and 64 output columns.
fn wmma_tile_launch(
    op: &'static str,
    cap: usize,
    s: &GroupedGemmShape,
) -> Result<LaunchConfig, KernelError> {
    let blocks_n =
        u32::try_from(s.n_out.div_ceil(64)).map_err(|_| too_big(op, "n_out", s.n_out))?;
    Ok(LaunchConfig {
        grid_dim: ((cap / s.block_m) as u32, blocks_n, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Pushes an alignment's three device arrays (sorted ids, block experts, padded rows).
fn push_alignment<'a>(launch: &mut cudarc::driver::LaunchArgs<'a>, align: &'a DeviceAlignment) {
    launch
        .arg(&align.sorted_ids)
        .arg(&align.expert_ids)
        .arg(&align.num_padded);
}

/// The launch of kernels/moe_w8a16.cu and moe_w4a16.cu: a tile of `GW8_ROWS` sorted rows by
/// `GW8_WARPS` output columns per block.
fn grouped_tile_launch(
    op: &'static str,
    cap: usize,
    s: &GroupedGemmShape,
) -> Result<LaunchConfig, KernelError> {
    let tiles = u32::try_from(cap / GW8_ROWS).map_err(|_| too_big(op, "entries", s.num_entries))?;
    let blocks_n = u32::try_from(s.n_out.div_ceil(GW8_WARPS as usize))
        .ok()
        .filter(|&b| b <= 65_535)
        .ok_or_else(|| too_big(op, "n_out", s.n_out))?;
    Ok(LaunchConfig {
        grid_dim: (tiles, blocks_n, 1),
        block_dim: (32 * GW8_WARPS, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn kernel(module: &Arc<CudaModule>, op: &str, suffix: &str) -> Result<CudaFunction, KernelError> {
    Ok(module.load_function(&format!("{op}_{suffix}"))?)
}

fn hidden_i32(hidden: usize) -> Result<i32, KernelError> {
    i32::try_from(hidden).map_err(|_| too_big("rms_norm", "hidden", hidden))
}

/// `value` as a kernel's 32-bit int argument, or why it does not fit.
fn int32(op: &'static str, what: &str, value: usize) -> Result<i32, KernelError> {
    i32::try_from(value).map_err(|_| too_big(op, what, value))
}

/// Errs unless metadata of `extent` reads only blocks below `cache_blocks`.
fn check_bound(extent: &BatchExtent, cache_blocks: usize) -> Result<(), KernelError> {
    check_shape(
        extent.blocks_read <= cache_blocks,
        "paged_attention",
        || {
            format!(
                "a token reads block {}; the metadata is bound to {cache_blocks} blocks",
                extent.blocks_read.saturating_sub(1)
            )
        },
    )
}

fn too_big(op: &'static str, what: &str, value: usize) -> KernelError {
    KernelError::Shape {
        op,
        message: format!("{what} = {value} does not fit the kernel's 32-bit index"),
    }
}

/// One block per row, a multiple of 32 threads (block_sum's warp shuffles need full warps), ≤ 1024.
/// 256 threads a block, enough blocks for `n` elements up to 65535 (the kernel strides on).
fn elementwise_launch(n: i64) -> LaunchConfig {
    let blocks = (n.max(1) as usize).div_ceil(256).min(65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn row_launch(rows: usize, hidden: usize) -> Result<LaunchConfig, KernelError> {
    let rows = u32::try_from(rows).map_err(|_| too_big("rms_norm", "rows", rows))?;
    let threads = hidden.next_multiple_of(32).clamp(32, 1024) as u32;
    Ok(LaunchConfig {
        grid_dim: (rows, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}
