//! NCCL collectives for ranks that are threads of this process, one GPU each: the
//! [`Communicator`] of a model sharded over several GPUs of one node.
//!
//! libnccl is opened at run time (`libnccl.so.2` from the library path, or the file
//! `EMBER_NCCL_LIBRARY` names), not linked. candle's `cuda` feature links the CUDA libraries it
//! uses; linking NCCL as well would keep every CUDA build of ember from starting on a machine
//! without NCCL, though serving on one GPU never needs it. Where it cannot be opened, the loader
//! falls back to [`crate::parallel::ThreadGroup`] (collectives through host copies) and says so.
//! The declarations below are NCCL's C API (`nccl.h`, stable across 2.x).
//!
//! NCCL moves flat buffers ([`FlatTransport`]); [`Staged`] turns that into every collective of
//! [`crate::parallel::Communicator`] (shapes, uneven gathers, ragged all-to-alls, tested in CI
//! over the threads backend). Each NCCL call is a candle custom op on the rank's tensor,
//! enqueued on candle's stream of the rank's GPU, so it orders with the layers' own kernels; only
//! the headers of shapes the peers cannot know are read back on the host.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor,
};
use ember_core::EmberError;

use crate::parallel::flat::{FlatCall, FlatTransport, Staged};

type NcclResult = c_int;
type RawComm = *mut c_void;
type Stream = *mut c_void;

// ncclDataType_t and ncclRedOp_t values.
const NCCL_UINT8: c_int = 1;
const NCCL_UINT32: c_int = 3;
const NCCL_INT64: c_int = 4;
const NCCL_FLOAT16: c_int = 6;
const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;
const NCCL_BFLOAT16: c_int = 9;
const NCCL_SUM: c_int = 0;

/// `ncclAllReduce`, `ncclReduceScatter`, `ncclBroadcast`: send and receive buffers, count,
/// dtype, the reduction (or the root), the communicator, the stream.
type CollectiveFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    RawComm,
    Stream,
) -> NcclResult;

/// `ncclAllGather`: as [`CollectiveFn`] without a reduction.
type AllGatherFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, RawComm, Stream) -> NcclResult;

/// The NCCL entry points ember calls, resolved from the opened library.
struct Api {
    _lib: libloading::Library,
    version: c_int,
    comm_init_all: unsafe extern "C" fn(*mut RawComm, c_int, *const c_int) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(RawComm) -> NcclResult,
    comm_abort: unsafe extern "C" fn(RawComm) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    all_reduce: CollectiveFn,
    all_gather: AllGatherFn,
    reduce_scatter: CollectiveFn,
    broadcast: CollectiveFn,
    send: unsafe extern "C" fn(*const c_void, usize, c_int, c_int, RawComm, Stream) -> NcclResult,
    recv: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, RawComm, Stream) -> NcclResult,
    group_start: unsafe extern "C" fn() -> NcclResult,
    group_end: unsafe extern "C" fn() -> NcclResult,
}

impl Api {
    fn open() -> std::result::Result<Self, String> {
        let name = std::env::var("EMBER_NCCL_LIBRARY").unwrap_or_else(|_| "libnccl.so.2".into());
        // SAFETY: loading libnccl runs its initializers, which only set up NCCL's own state.
        let lib = unsafe { libloading::Library::new(name.as_str()) }.map_err(|e| {
            format!(
                "cannot open {name} ({e}); install NCCL (e.g. `pip install nvidia-nccl-cu13` and put \
                 its nvidia/nccl/lib on LD_LIBRARY_PATH) or set EMBER_NCCL_LIBRARY to the library"
            )
        })?;
        macro_rules! symbol {
            ($name:literal) => {
                // SAFETY: the symbol is NCCL's C function of that name, declared with the type of
                // the field it is stored in (nccl.h); the library outlives it (held in `_lib`).
                *unsafe { lib.get($name) }.map_err(|e| format!("{name} has no {}: {e}", $name))?
            };
        }
        let get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult = symbol!("ncclGetVersion");
        let mut version = 0;
        // SAFETY: writes one int.
        unsafe { get_version(&mut version) };
        Ok(Self {
            version,
            comm_init_all: symbol!("ncclCommInitAll"),
            comm_destroy: symbol!("ncclCommDestroy"),
            comm_abort: symbol!("ncclCommAbort"),
            get_error_string: symbol!("ncclGetErrorString"),
            all_reduce: symbol!("ncclAllReduce"),
            all_gather: symbol!("ncclAllGather"),
            reduce_scatter: symbol!("ncclReduceScatter"),
            broadcast: symbol!("ncclBroadcast"),
            send: symbol!("ncclSend"),
            recv: symbol!("ncclRecv"),
            group_start: symbol!("ncclGroupStart"),
            group_end: symbol!("ncclGroupEnd"),
            _lib: lib,
        })
    }

    fn check(&self, code: NcclResult, what: &str) -> std::result::Result<(), String> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: NCCL returns a static string for every result code.
        let text = unsafe { CStr::from_ptr((self.get_error_string)(code)) };
        Err(format!(
            "{what}: NCCL error {code}: {}",
            text.to_string_lossy()
        ))
    }
}

/// libnccl, opened once.
fn api() -> std::result::Result<&'static Api, String> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(Api::open).as_ref().map_err(Clone::clone)
}

/// NCCL's version as `major.minor.patch`, or why it cannot be opened.
pub fn version() -> std::result::Result<String, String> {
    let v = api()?.version;
    // 2.9 and later encode the version as major·10000 + minor·100 + patch.
    Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
}

/// One communicator handle; NCCL lets any thread use it while no other does (the lock).
struct CommPtr(RawComm);

// SAFETY: an NCCL communicator is not tied to the thread that made it; every use goes through
// the mutex around it (or, in `abort`, through NCCL's own abort, which is made for a
// communicator another thread may be stuck in).
unsafe impl Send for CommPtr {}

/// The communicators of one group, and whether it failed.
struct Group {
    api: &'static Api,
    comms: Vec<Mutex<CommPtr>>,
    /// Raw handles for `abort`, which must reach a communicator whose lock a stuck rank holds.
    raw: Vec<CommPtr>,
    aborted: Vec<AtomicBool>,
    failed: Mutex<Option<String>>,
}

// SAFETY: `raw` is only read, and only by `abort` and `drop` (see `CommPtr`).
unsafe impl Sync for Group {}

impl Group {
    fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rank `rank`'s communicator, locked, unless the group failed.
    fn comm(&self, rank: usize) -> Result<MutexGuard<'_, CommPtr>> {
        if let Some(reason) = self.failure() {
            return Err(group_error(&reason));
        }
        let comm = self.comms[rank].lock().unwrap_or_else(|p| p.into_inner());
        if self.aborted[rank].load(Ordering::Acquire) {
            return Err(group_error(
                &self.failure().unwrap_or_else(|| "aborted".into()),
            ));
        }
        Ok(comm)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for (comm, aborted) in self.raw.iter().zip(&self.aborted) {
            if !aborted.load(Ordering::Acquire) {
                // SAFETY: no rank is left to use the communicator; it is destroyed once.
                unsafe { (self.api.comm_destroy)(comm.0) };
            }
        }
    }
}

fn group_error(reason: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("the parallel group failed: {reason}"))
}

/// One rank of an NCCL group: its GPU and its communicator.
pub struct NcclRank {
    group: Arc<Group>,
    rank: usize,
    device: Device,
}

/// Makes one communicator per GPU in `devices` (rank r on `devices[r]`, each a different GPU of
/// this process), with NCCL's single-process initialization.
pub fn ranks(devices: &[Device]) -> ember_core::Result<Vec<Staged<NcclRank>>> {
    let api = api().map_err(EmberError::Config)?;
    let mut ordinals = Vec::with_capacity(devices.len());
    for device in devices {
        match device {
            Device::Cuda(gpu) => {
                let ordinal = gpu.cuda_stream().context().ordinal();
                if ordinals.contains(&(ordinal as c_int)) {
                    return Err(EmberError::Config(format!(
                        "NCCL needs a GPU per rank; cuda:{ordinal} holds two ranks"
                    )));
                }
                ordinals.push(ordinal as c_int);
            }
            other => {
                return Err(EmberError::Config(format!(
                    "NCCL ranks run on GPUs, not {other:?}"
                )))
            }
        }
    }
    let mut comms: Vec<RawComm> = vec![std::ptr::null_mut(); devices.len()];
    // SAFETY: `comms` has room for one handle per ordinal.
    let code = unsafe {
        (api.comm_init_all)(
            comms.as_mut_ptr(),
            ordinals.len() as c_int,
            ordinals.as_ptr(),
        )
    };
    api.check(code, "ncclCommInitAll")
        .map_err(EmberError::Config)?;
    let group = Arc::new(Group {
        api,
        comms: comms.iter().map(|&c| Mutex::new(CommPtr(c))).collect(),
        raw: comms.iter().map(|&c| CommPtr(c)).collect(),
        aborted: comms.iter().map(|_| AtomicBool::new(false)).collect(),
        failed: Mutex::new(None),
    });
    Ok(devices
        .iter()
        .enumerate()
        .map(|(rank, device)| {
            Staged(NcclRank {
                group: group.clone(),
                rank,
                device: device.clone(),
            })
        })
        .collect())
}

/// [`FlatCall`] on one rank's contiguous input, producing a flat `[out_len]` tensor.
struct Collective<'a> {
    rank: &'a NcclRank,
    call: FlatCall,
    out_len: usize,
}

impl Collective<'_> {
    fn run<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        &self,
        storage: &CudaStorage,
        range: std::ops::Range<usize>,
        dtype: c_int,
    ) -> Result<CudaStorage> {
        let device = storage.device().clone();
        let stream = device.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(candle_core::Error::wrap)?;
        let src = storage.as_cuda_slice::<T>()?.slice(range);
        // One element at least: a rank may receive nothing, but still hands NCCL a buffer.
        let mut out = device.alloc_zeros::<T>(self.out_len.max(1))?;
        {
            let (src_ptr, _src_sync) = src.device_ptr(&stream);
            let (dst_ptr, _dst_sync) = out.device_ptr_mut(&stream);
            self.rank
                .enqueue(
                    &self.call,
                    Buffers {
                        src: src_ptr as usize,
                        src_len: src.len(),
                        dst: dst_ptr as usize,
                        dst_len: self.out_len,
                        elem: std::mem::size_of::<T>(),
                        dtype,
                        stream: stream.cu_stream() as Stream,
                    },
                )
                .map_err(candle_core::Error::Msg)?;
        }
        Ok(T::wrap_cuda_slice(out, device))
    }
}

impl CustomOp1 for Collective<'_> {
    fn name(&self) -> &'static str {
        "nccl-collective"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives take CUDA tensors")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let range = crate::device::kernels::contiguous_range(layout, "an NCCL collective")?;
        let out = match storage.dtype() {
            DType::F32 => self.run::<f32>(storage, range, NCCL_FLOAT32)?,
            DType::BF16 => self.run::<half::bf16>(storage, range, NCCL_BFLOAT16)?,
            DType::F16 => self.run::<half::f16>(storage, range, NCCL_FLOAT16)?,
            DType::F64 => self.run::<f64>(storage, range, NCCL_FLOAT64)?,
            DType::U32 => self.run::<u32>(storage, range, NCCL_UINT32)?,
            DType::I64 => self.run::<i64>(storage, range, NCCL_INT64)?,
            DType::U8 => self.run::<u8>(storage, range, NCCL_UINT8)?,
            other => candle_core::bail!("NCCL collectives do not take {other:?} tensors"),
        };
        Ok((out, Shape::from(self.out_len)))
    }
}

/// Device addresses and counts of one collective's buffers.
struct Buffers {
    src: usize,
    src_len: usize,
    dst: usize,
    dst_len: usize,
    elem: usize,
    dtype: c_int,
    stream: Stream,
}

impl NcclRank {
    /// Enqueues `call` on this rank's communicator, unless the group failed.
    fn enqueue(&self, call: &FlatCall, b: Buffers) -> std::result::Result<(), String> {
        let group = &self.group;
        let api = group.api;
        let comm = group.comm(self.rank).map_err(|e| e.to_string())?;
        let c = comm.0;
        let at = |base: usize, offset: usize| (base + offset * b.elem) as *mut c_void;
        let (src, dst) = (b.src as *const c_void, b.dst as *mut c_void);
        let (dtype, stream) = (b.dtype, b.stream);
        // SAFETY: `src` and `dst` are live device buffers of `src_len` and at least `dst_len`
        // (and 1) elements of the type `dtype` names, on the stream's GPU, which is the
        // communicator's; the counts below stay within them.
        let code = unsafe {
            match call {
                FlatCall::AllReduce => {
                    (api.all_reduce)(src, dst, b.src_len, dtype, NCCL_SUM, c, stream)
                }
                FlatCall::AllGather => (api.all_gather)(src, dst, b.src_len, dtype, c, stream),
                FlatCall::ReduceScatter => {
                    (api.reduce_scatter)(src, dst, b.dst_len, dtype, NCCL_SUM, c, stream)
                }
                FlatCall::Broadcast { root } => {
                    (api.broadcast)(src, dst, b.dst_len, dtype, *root as c_int, c, stream)
                }
                FlatCall::AllToAll { send, recv } => {
                    api.check((api.group_start)(), "ncclGroupStart")?;
                    let (mut sent, mut received) = (0, 0);
                    let mut code = 0;
                    for (peer, (&s, &r)) in send.iter().zip(recv).enumerate() {
                        if s > 0 && code == 0 {
                            code =
                                (api.send)(at(b.src, sent), s, b.dtype, peer as c_int, c, b.stream);
                        }
                        if r > 0 && code == 0 {
                            code = (api.recv)(
                                at(b.dst, received),
                                r,
                                b.dtype,
                                peer as c_int,
                                c,
                                b.stream,
                            );
                        }
                        sent += s;
                        received += r;
                    }
                    // The group is closed whatever happened inside it.
                    let end = (api.group_end)();
                    if code == 0 {
                        end
                    } else {
                        code
                    }
                }
            }
        };
        api.check(code, "an NCCL collective")
    }

    fn apply(&self, input: &Tensor, call: FlatCall, out_len: usize) -> Result<Tensor> {
        if !input.device().same_device(&self.device) {
            candle_core::bail!(
                "rank {}'s collective got a tensor on {:?}, not its GPU",
                self.rank,
                input.device().location()
            );
        }
        input.contiguous()?.apply_op1_no_bwd(&Collective {
            rank: self,
            call,
            out_len,
        })
    }
}

impl FlatTransport for NcclRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.comms.len()
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn run(&self, input: &Tensor, call: FlatCall, out_len: usize) -> Result<Tensor> {
        self.apply(input, call, out_len)
    }

    fn abort(&self, reason: &str) {
        let group = &self.group;
        {
            let mut failed = group.failed.lock().unwrap_or_else(|p| p.into_inner());
            if failed.is_some() {
                return;
            }
            *failed = Some(format!("rank {}: {reason}", self.rank));
        }
        // Every rank's communicator, so ranks waiting on this one inside NCCL return. A rank
        // holding its lock is enqueueing; after a short wait it is aborted under it, since
        // NCCL's abort is what frees a rank stuck in a call.
        for (r, comm) in group.comms.iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(2);
            let guard = loop {
                match comm.try_lock() {
                    Ok(g) => break Some(g),
                    Err(std::sync::TryLockError::Poisoned(p)) => break Some(p.into_inner()),
                    Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(std::sync::TryLockError::WouldBlock) => break None,
                }
            };
            if !group.aborted[r].swap(true, Ordering::AcqRel) {
                // SAFETY: marked aborted first, so no later call uses it and drop skips it.
                unsafe { (group.api.comm_abort)(group.raw[r].0) };
            }
            drop(guard);
        }
        tracing::error!(reason, "aborted the NCCL group");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entry point resolves where libnccl is installed (no GPU needed for that).
    #[test]
    fn the_library_opens_with_every_entry_point_where_installed() {
        match version() {
            Ok(v) => {
                assert!(v.starts_with("2."), "NCCL {v}");
                eprintln!("NCCL {v}: every entry point resolved");
            }
            Err(e) if e.contains("cannot open") => eprintln!("SKIPPED: {e}"),
            Err(e) => panic!("{e}"),
        }
    }
}
