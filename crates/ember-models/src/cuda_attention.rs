//! ember's paged attention kernel (`kernels/paged_attention.cu`) in the model path on CUDA, as a
//! candle custom op over the query and the layer's cache tensors (`--attention-backend ember`).
//! The step's metadata (block tables, each token's sequence and context length) is built from
//! the batch on the host, checked and copied to the GPU once per step by the first layer that
//! runs the kernel, and read by every layer after; the op launches on candle's stream, so it
//! orders with candle's own ops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Shape, Tensor};
use ember_kernels::cuda::{CudaKernels, DevicePagedBatch};
use ember_kernels::paged_attention::{PagedAttentionBatch, PagedAttentionShape, MAX_V_DIM};

use crate::batch::ForwardBatch;
use crate::kv_cache::LayerKvCache;
use crate::TensorResult;

/// Whether the kernel serves this layer: the query on a GPU in f32 or bf16, a cache of the same
/// dtype (an fp8 cache keeps the tensor path), value rows within the kernel's width.
pub fn supported(cache: &LayerKvCache, q: &Tensor, num_kv_heads: usize) -> bool {
    q.device().is_cuda()
        && matches!(q.dtype(), DType::F32 | DType::BF16)
        && cache.k.dtype() == q.dtype()
        && cache.v.dtype() == q.dtype()
        && cache
            .v
            .dim(1)
            .is_ok_and(|w| w / num_kv_heads.max(1) <= MAX_V_DIM)
}

/// The kernels loaded on each GPU candle uses, once.
pub(crate) fn kernels(device: &CudaDevice) -> candle_core::Result<Arc<CudaKernels>> {
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

/// The step's metadata on each GPU it runs on, uploaded by the first layer that needs it.
#[derive(Default)]
pub struct StepMetadata {
    paged: Mutex<Vec<(candle_core::cuda::DeviceId, Arc<StepPagedBatch>)>>,
}

impl std::fmt::Debug for StepMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepMetadata").finish_non_exhaustive()
    }
}

/// A step's paged attention metadata on one GPU, and its block tables' width.
struct StepPagedBatch {
    device: Arc<DevicePagedBatch>,
    max_blocks: usize,
}

impl StepMetadata {
    /// Hands every layer `meta` (tables `max_blocks` wide) as the step's metadata on `device`
    /// instead of uploading it: a CUDA graph's batch, whose metadata the graph rewrites in
    /// place before each replay.
    pub(crate) fn preset(
        &self,
        device: &CudaDevice,
        meta: Arc<DevicePagedBatch>,
        max_blocks: usize,
    ) {
        let mut uploaded = self.paged.lock().unwrap_or_else(|p| p.into_inner());
        uploaded.retain(|(id, _)| *id != device.id());
        uploaded.push((
            device.id(),
            Arc::new(StepPagedBatch {
                device: meta,
                max_blocks,
            }),
        ));
    }

    /// The batch's paged attention metadata on `device`: checked and copied once per step.
    fn paged(
        &self,
        batch: &ForwardBatch,
        device: &CudaDevice,
    ) -> candle_core::Result<Arc<StepPagedBatch>> {
        let mut uploaded = self.paged.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, meta)) = uploaded.iter().find(|(id, _)| *id == device.id()) {
            return Ok(meta.clone());
        }
        let (block_tables, token_seq, token_ctx, max_blocks) = host_metadata(batch);
        let host = PagedAttentionBatch {
            block_tables: &block_tables,
            token_seq: &token_seq,
            token_ctx: &token_ctx,
        };
        let meta = Arc::new(StepPagedBatch {
            device: Arc::new(
                kernels(device)?
                    .upload_paged_batch(&host, batch.block_size, max_blocks)
                    .map_err(candle_core::Error::wrap)?,
            ),
            max_blocks,
        });
        uploaded.push((device.id(), meta.clone()));
        Ok(meta)
    }
}

/// The kernel's metadata of a batch on the host: block tables `[sequences, max_blocks]`, each
/// token's sequence and the positions it sees, and `max_blocks`.
pub(crate) fn host_metadata(batch: &ForwardBatch) -> (Vec<u32>, Vec<u32>, Vec<u32>, usize) {
    let block_size = batch.block_size;
    let tokens = batch.num_tokens;
    let max_blocks = batch
        .sequences
        .iter()
        .map(|s| s.context_len.div_ceil(block_size))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut block_tables = vec![0u32; batch.sequences.len() * max_blocks];
    let (mut token_seq, mut token_ctx) = (vec![0u32; tokens], vec![0u32; tokens]);
    for (s, seq) in batch.sequences.iter().enumerate() {
        seq.write_block_table(&mut block_tables[s * max_blocks..]);
        let past = seq.context_len - seq.query_len;
        for i in 0..seq.query_len {
            token_seq[seq.query_start + i] = s as u32;
            token_ctx[seq.query_start + i] = (past + i + 1) as u32;
        }
    }
    (block_tables, token_seq, token_ctx, max_blocks)
}

/// One layer's call: the step's metadata and sizes.
struct PagedAttentionOp {
    meta: Arc<StepPagedBatch>,
    shape: PagedAttentionShape,
    scale: f32,
    tokens: usize,
}

impl PagedAttentionOp {
    /// The kernel over `[q, k cache, v cache]` and their element ranges.
    fn run<T: ember_kernels::cuda::CudaElement + candle_core::cuda_backend::CudaDType>(
        &self,
        kernels: &CudaKernels,
        device: &CudaDevice,
        [q, k, v]: [&CudaStorage; 3],
        [rq, rk, rv]: [std::ops::Range<usize>; 3],
        out_len: usize,
    ) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>> {
        let mut out = device.alloc_zeros::<T>(out_len)?;
        kernels
            .paged_attention(
                &mut out,
                &q.as_cuda_slice::<T>()?.slice(rq),
                &k.as_cuda_slice::<T>()?.slice(rk),
                &v.as_cuda_slice::<T>()?.slice(rv),
                &self.meta.device,
                self.scale,
                &self.shape,
            )
            .map_err(candle_core::Error::wrap)?;
        Ok(out)
    }
}

impl CustomOp3 for PagedAttentionOp {
    fn name(&self) -> &'static str {
        "ember-paged-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("ember's paged attention kernel runs on CUDA; the CPU has its own path")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let device = q.device().clone();
        let kernels = kernels(&device)?;
        let ranges = [
            crate::contiguous_range(lq, "paged attention: q")?,
            crate::contiguous_range(lk, "paged attention: the k cache")?,
            crate::contiguous_range(lv, "paged attention: the v cache")?,
        ];
        let s = &self.shape;
        let out_len = self.tokens * s.num_heads * s.v_dim;
        let storage = match q.dtype() {
            DType::F32 => CudaStorage::wrap_cuda_slice(
                self.run::<f32>(&kernels, &device, [q, k, v], ranges, out_len)?,
                device,
            ),
            DType::BF16 => CudaStorage::wrap_cuda_slice(
                self.run::<half::bf16>(&kernels, &device, [q, k, v], ranges, out_len)?,
                device,
            ),
            other => candle_core::bail!("paged attention: no kernel for {other:?}"),
        };
        Ok((storage, Shape::from((self.tokens, s.num_heads * s.v_dim))))
    }
}

/// Attention of `q` (`[tokens, num_heads, head_dim]`, roped) over the batch's cached context, as
/// [`crate::paged_attention::paged_attention`] computes it on the CPU. Returns
/// `[tokens, num_heads · v_dim]`.
pub fn paged_attention(
    q: &Tensor,
    cache: &LayerKvCache,
    batch: &ForwardBatch,
    num_kv_heads: usize,
    scale: f32,
) -> TensorResult {
    let (tokens, num_heads, head_dim) = q.dims3()?;
    let v_dim = cache.v.dim(1)? / num_kv_heads;
    let meta = match q.device() {
        candle_core::Device::Cuda(device) => batch.device_metadata.paged(batch, device)?,
        _ => candle_core::bail!("ember's paged attention kernel runs on CUDA"),
    };
    let op = PagedAttentionOp {
        shape: PagedAttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
            v_dim,
            block_size: batch.block_size,
            max_blocks: meta.max_blocks,
        },
        meta,
        scale,
        tokens,
    };
    // The op reads q where it starts: no copy once contiguous.
    q.contiguous()?.apply_op3_no_bwd(&cache.k, &cache.v, &op)
}
