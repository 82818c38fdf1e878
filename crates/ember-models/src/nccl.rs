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
//! Every collective is a candle custom op on the rank's tensor, enqueued on candle's stream of
//! the rank's GPU, so it orders with the layers' own kernels and the step never waits for it on
//! the host. Shapes that the peers cannot know (all-to-all, uneven all-gathers, broadcast) are
//! exchanged first in a small fixed-size header, read back on the host.

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

use crate::parallel::Communicator;

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

/// The NCCL entry points ember calls, resolved from the opened library.
struct Api {
    _lib: libloading::Library,
    version: c_int,
    comm_init_all: unsafe extern "C" fn(*mut RawComm, c_int, *const c_int) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(RawComm) -> NcclResult,
    comm_abort: unsafe extern "C" fn(RawComm) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    #[allow(clippy::type_complexity)]
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        RawComm,
        Stream,
    ) -> NcclResult,
    all_gather: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        RawComm,
        Stream,
    ) -> NcclResult,
    #[allow(clippy::type_complexity)]
    reduce_scatter: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        RawComm,
        Stream,
    ) -> NcclResult,
    #[allow(clippy::type_complexity)]
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        RawComm,
        Stream,
    ) -> NcclResult,
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
pub fn ranks(devices: &[Device]) -> ember_core::Result<Vec<NcclRank>> {
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
        .map(|(rank, device)| NcclRank {
            group: group.clone(),
            rank,
            device: device.clone(),
        })
        .collect())
}

/// A collective as one NCCL call (or group of calls) over flat buffers.
#[derive(Debug, Clone)]
enum Call {
    AllReduce,
    /// Every rank sends the same count.
    AllGather,
    ReduceScatter,
    Broadcast {
        root: usize,
    },
    /// Elements sent to and received from each rank, in rank order.
    AllToAll {
        send: Vec<usize>,
        recv: Vec<usize>,
    },
}

/// [`Call`] on one rank's contiguous input, producing a flat `[out_len]` tensor.
struct Collective<'a> {
    rank: &'a NcclRank,
    call: Call,
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
        let range = crate::contiguous_range(layout, "an NCCL collective")?;
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

/// The element types a header names, by index.
const HEADER_DTYPES: [DType; 7] = [
    DType::F32,
    DType::BF16,
    DType::F16,
    DType::F64,
    DType::U32,
    DType::I64,
    DType::U8,
];
/// Dimensions a header carries.
const HEADER_DIMS: usize = 6;
/// `[dtype index, rank, dims...]`.
const HEADER_LEN: usize = 2 + HEADER_DIMS;

fn header(dtype: DType, shape: &[usize]) -> Result<[i64; HEADER_LEN]> {
    let Some(code) = HEADER_DTYPES.iter().position(|&d| d == dtype) else {
        candle_core::bail!("NCCL collectives do not take {dtype:?} tensors")
    };
    if shape.len() > HEADER_DIMS {
        candle_core::bail!(
            "NCCL collectives take tensors of up to {HEADER_DIMS} dimensions, not {shape:?}"
        );
    }
    let mut h = [0i64; HEADER_LEN];
    h[0] = code as i64;
    h[1] = shape.len() as i64;
    for (slot, &d) in h[2..].iter_mut().zip(shape) {
        *slot = d as i64;
    }
    Ok(h)
}

fn read_header(h: &[i64]) -> Result<(DType, Vec<usize>)> {
    let dtype = usize::try_from(h[0])
        .ok()
        .and_then(|i| HEADER_DTYPES.get(i).copied());
    let dims = usize::try_from(h[1]).ok().filter(|&n| n <= HEADER_DIMS);
    match (dtype, dims) {
        (Some(dtype), Some(n)) => Ok((dtype, h[2..2 + n].iter().map(|&d| d as usize).collect())),
        _ => candle_core::bail!("a rank sent a malformed NCCL header {h:?}"),
    }
}

/// Moves axis 0 of `t` to position `dim` and merges it with the axis there: the inverse of
/// splitting `dim` into `[world, piece]` and moving `world` to the front.
fn merge_leading_axis(t: &Tensor, dim: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let mut order: Vec<usize> = (1..=dim).collect();
    order.push(0);
    order.extend(dim + 1..dims.len());
    let moved = t.permute(order)?.contiguous()?;
    let mut merged = dims[1..].to_vec();
    merged[dim] *= dims[0];
    moved.reshape(merged)
}

impl NcclRank {
    /// Enqueues `call` on this rank's communicator, unless the group failed.
    fn enqueue(&self, call: &Call, b: Buffers) -> std::result::Result<(), String> {
        let group = &self.group;
        let api = group.api;
        let comm = group.comm(self.rank).map_err(|e| e.to_string())?;
        let c = comm.0;
        let at = |base: usize, offset: usize| (base + offset * b.elem) as *mut c_void;
        // SAFETY: `src` and `dst` are live device buffers of `src_len` and at least `dst_len`
        // (and 1) elements of the type `dtype` names, on the stream's GPU, which is the
        // communicator's; the counts below stay within them.
        let code = unsafe {
            match call {
                Call::AllReduce => (api.all_reduce)(
                    b.src as *const c_void,
                    b.dst as *mut c_void,
                    b.src_len,
                    b.dtype,
                    NCCL_SUM,
                    c,
                    b.stream,
                ),
                Call::AllGather => (api.all_gather)(
                    b.src as *const c_void,
                    b.dst as *mut c_void,
                    b.src_len,
                    b.dtype,
                    c,
                    b.stream,
                ),
                Call::ReduceScatter => (api.reduce_scatter)(
                    b.src as *const c_void,
                    b.dst as *mut c_void,
                    b.dst_len,
                    b.dtype,
                    NCCL_SUM,
                    c,
                    b.stream,
                ),
                Call::Broadcast { root } => (api.broadcast)(
                    b.src as *const c_void,
                    b.dst as *mut c_void,
                    b.dst_len,
                    b.dtype,
                    *root as c_int,
                    c,
                    b.stream,
                ),
                Call::AllToAll { send, recv } => {
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

    fn apply(&self, input: &Tensor, call: Call, out_len: usize) -> Result<Tensor> {
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

    /// Every rank's `[n]` flat tensor, `n` the same everywhere, as `[world · n]` in rank order.
    fn gather_flat(&self, flat: &Tensor) -> Result<Tensor> {
        let n = flat.elem_count();
        self.apply(flat, Call::AllGather, n * self.world_size())
    }

    /// Every rank's header, on the host.
    fn gather_headers(&self, mine: &[i64]) -> Result<Vec<Vec<i64>>> {
        let t = Tensor::from_slice(mine, mine.len(), &self.device)?;
        let all = self.gather_flat(&t)?.to_vec1::<i64>()?;
        Ok(all.chunks(mine.len()).map(<[i64]>::to_vec).collect())
    }
}

impl Communicator for NcclRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.comms.len()
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        let n = tensor.elem_count();
        if n == 0 {
            return Ok(tensor.clone());
        }
        self.apply(tensor, Call::AllReduce, n)?
            .reshape(tensor.shape())
    }

    fn all_gather(&self, tensor: &Tensor, dim: usize) -> Result<Tensor> {
        // The ranks may differ along `dim` (an uneven split of a step's tokens): each learns the
        // others' shapes, and every rank sends the largest count, padded.
        let headers = self.gather_headers(&header(tensor.dtype(), tensor.dims())?)?;
        let shapes = headers
            .iter()
            .map(|h| read_header(h).map(|(_, shape)| shape))
            .collect::<Result<Vec<_>>>()?;
        let counts: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        let most = counts.iter().copied().max().unwrap_or(0);
        if most == 0 {
            return Tensor::cat(
                &shapes
                    .iter()
                    .map(|s| Tensor::zeros(s.as_slice(), tensor.dtype(), &self.device))
                    .collect::<Result<Vec<_>>>()?,
                dim,
            );
        }
        let flat = tensor.flatten_all()?;
        let padded = if flat.elem_count() == most {
            flat
        } else {
            let pad = Tensor::zeros(most - flat.elem_count(), tensor.dtype(), &self.device)?;
            Tensor::cat(&[flat, pad], 0)?
        };
        let all = self.gather_flat(&padded)?;
        if counts.iter().all(|&c| c == most) {
            let mut stacked = vec![self.world_size()];
            stacked.extend_from_slice(tensor.dims());
            return merge_leading_axis(&all.reshape(stacked)?, dim);
        }
        let pieces = shapes
            .iter()
            .zip(&counts)
            .enumerate()
            .map(|(r, (shape, &n))| all.narrow(0, r * most, n)?.reshape(shape.as_slice()))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&pieces, dim)
    }

    fn reduce_scatter_sum(&self, tensor: &Tensor, dim: usize) -> Result<Tensor> {
        let world = self.world_size();
        let dims = tensor.dims().to_vec();
        let len = dims[dim];
        if !len.is_multiple_of(world) {
            candle_core::bail!(
                "reduce_scatter: dim {dim} of size {len} does not split over {world} ranks"
            );
        }
        // Split `dim` into [world, piece] and bring `world` to the front: each rank's piece is
        // then one contiguous block, in rank order, as NCCL scatters.
        let mut split = dims[..dim].to_vec();
        split.extend([world, len / world]);
        split.extend_from_slice(&dims[dim + 1..]);
        let mut order = vec![dim];
        order.extend(0..dim);
        order.extend(dim + 1..split.len());
        let blocks = tensor.reshape(split)?.permute(order)?.contiguous()?;
        let mut piece = dims.clone();
        piece[dim] = len / world;
        let n = tensor.elem_count() / world;
        if n == 0 {
            return Tensor::zeros(piece, tensor.dtype(), &self.device);
        }
        self.apply(&blocks.flatten_all()?, Call::ReduceScatter, n)?
            .reshape(piece)
    }

    fn all_to_all(&self, send: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let world = self.world_size();
        if send.len() != world {
            candle_core::bail!("all_to_all: {} tensors for {world} ranks", send.len());
        }
        let dtype = send[0].dtype();
        if let Some(t) = send.iter().find(|t| t.dtype() != dtype) {
            candle_core::bail!(
                "all_to_all: {dtype:?} and {:?} tensors in one call",
                t.dtype()
            );
        }
        let mut mine = Vec::with_capacity(world * HEADER_LEN);
        for t in &send {
            mine.extend(header(dtype, t.dims())?);
        }
        // headers[s] holds rank s's headers for every destination.
        let headers = self.gather_headers(&mine)?;
        let mut recv_shapes = Vec::with_capacity(world);
        for from in &headers {
            let h = &from[self.rank * HEADER_LEN..(self.rank + 1) * HEADER_LEN];
            let (their_dtype, shape) = read_header(h)?;
            if their_dtype != dtype {
                candle_core::bail!("all_to_all: a rank sends {their_dtype:?}, this one {dtype:?}");
            }
            recv_shapes.push(shape);
        }
        let send_counts: Vec<usize> = send.iter().map(Tensor::elem_count).collect();
        let recv_counts: Vec<usize> = recv_shapes.iter().map(|s| s.iter().product()).collect();
        let total: usize = recv_counts.iter().sum();
        let flat: Vec<Tensor> = send
            .iter()
            .filter(|t| t.elem_count() > 0)
            .map(Tensor::flatten_all)
            .collect::<Result<_>>()?;
        let input = if flat.is_empty() {
            Tensor::zeros(1, dtype, &self.device)?
        } else {
            Tensor::cat(&flat, 0)?
        };
        let received = self.apply(
            &input,
            Call::AllToAll {
                send: send_counts,
                recv: recv_counts.clone(),
            },
            total,
        )?;
        let mut at = 0;
        recv_shapes
            .iter()
            .zip(&recv_counts)
            .map(|(shape, &n)| {
                let piece = received.narrow(0, at, n)?.reshape(shape.as_slice());
                at += n;
                piece
            })
            .collect()
    }

    fn broadcast(&self, tensor: Option<&Tensor>, root: usize) -> Result<Tensor> {
        if (self.rank == root) != tensor.is_some() {
            let reason = format!("broadcast: rank {} disagrees about root {root}", self.rank);
            self.abort(&reason);
            return Err(group_error(&reason));
        }
        let mine = match tensor {
            Some(t) => header(t.dtype(), t.dims())?,
            None => [0; HEADER_LEN],
        };
        let h = Tensor::from_slice(&mine, HEADER_LEN, &self.device)?;
        let h = self
            .apply(&h, Call::Broadcast { root }, HEADER_LEN)?
            .to_vec1::<i64>()?;
        let (dtype, shape) = read_header(&h)?;
        let n: usize = shape.iter().product();
        if n == 0 {
            return Tensor::zeros(shape, dtype, &self.device);
        }
        let input = match tensor {
            Some(t) => t.clone(),
            None => Tensor::zeros(1, dtype, &self.device)?,
        };
        self.apply(&input, Call::Broadcast { root }, n)?
            .reshape(shape)
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

    #[test]
    fn headers_round_trip_and_refuse_what_they_cannot_carry() {
        let h = header(DType::BF16, &[3, 0, 7]).unwrap();
        assert_eq!(read_header(&h).unwrap(), (DType::BF16, vec![3, 0, 7]));
        assert!(header(DType::F8E4M3, &[1]).is_err());
        assert!(header(DType::F32, &[1; 7]).is_err());
        assert!(read_header(&[99, 1, 1, 0, 0, 0, 0, 0]).is_err());
        assert!(read_header(&[0, 9, 1, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn merging_the_leading_axis_is_a_concatenation_along_dim() {
        let d = Device::Cpu;
        let parts: Vec<Tensor> = (0i64..3)
            .map(|r| {
                Tensor::arange(r * 8, r * 8 + 8, &d)
                    .unwrap()
                    .reshape((2, 4))
                    .unwrap()
            })
            .collect();
        let stacked = Tensor::stack(&parts, 0).unwrap();
        for dim in 0..2 {
            assert_eq!(
                merge_leading_axis(&stacked, dim)
                    .unwrap()
                    .to_vec2::<i64>()
                    .unwrap(),
                Tensor::cat(&parts, dim).unwrap().to_vec2::<i64>().unwrap(),
                "dim {dim}"
            );
        }
    }
}
