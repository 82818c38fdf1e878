//! ember's paged attention kernel (`kernels/paged_attention.cu`) in the model path on CUDA, as a
//! candle custom op over the query and the layer's cache tensors (`--attention-backend ember`).
//! The step's metadata (block tables, each token's sequence and context length) comes from the
//! batch on the host; the op launches on candle's stream, so it orders with candle's own ops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Shape, Tensor};
use ember_kernels::cuda::CudaKernels;
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

/// One layer's call: the step's metadata and sizes.
struct PagedAttentionOp {
    block_tables: Vec<u32>,
    token_seq: Vec<u32>,
    token_ctx: Vec<u32>,
    shape: PagedAttentionShape,
    scale: f32,
    tokens: usize,
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
        for (what, l) in [("q", lq), ("k cache", lk), ("v cache", lv)] {
            if !l.is_contiguous() || l.start_offset() != 0 {
                candle_core::bail!("paged attention: {what} must be contiguous from its start");
            }
        }
        let device = q.device().clone();
        let kernels = kernels(&device)?;
        let batch = PagedAttentionBatch {
            block_tables: &self.block_tables,
            token_seq: &self.token_seq,
            token_ctx: &self.token_ctx,
        };
        let s = &self.shape;
        let out_len = self.tokens * s.num_heads * s.v_dim;
        let storage = match q.dtype() {
            DType::F32 => {
                let mut out = device.alloc_zeros::<f32>(out_len)?;
                kernels
                    .paged_attention(
                        &mut out,
                        q.as_cuda_slice::<f32>()?,
                        k.as_cuda_slice::<f32>()?,
                        v.as_cuda_slice::<f32>()?,
                        &batch,
                        self.scale,
                        s,
                    )
                    .map_err(candle_core::Error::wrap)?;
                CudaStorage::wrap_cuda_slice(out, device)
            }
            DType::BF16 => {
                let mut out = device.alloc_zeros::<half::bf16>(out_len)?;
                kernels
                    .paged_attention(
                        &mut out,
                        q.as_cuda_slice::<half::bf16>()?,
                        k.as_cuda_slice::<half::bf16>()?,
                        v.as_cuda_slice::<half::bf16>()?,
                        &batch,
                        self.scale,
                        s,
                    )
                    .map_err(candle_core::Error::wrap)?;
                CudaStorage::wrap_cuda_slice(out, device)
            }
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
    let block_size = batch.block_size;
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
        // Each block's first slot names it: slot = block · block_size + offset.
        for (b, slot) in seq
            .context_slots_host
            .iter()
            .step_by(block_size)
            .enumerate()
        {
            block_tables[s * max_blocks + b] = slot / block_size as u32;
        }
        let past = seq.context_len - seq.query_len;
        for i in 0..seq.query_len {
            token_seq[seq.query_start + i] = s as u32;
            token_ctx[seq.query_start + i] = (past + i + 1) as u32;
        }
    }
    let op = PagedAttentionOp {
        block_tables,
        token_seq,
        token_ctx,
        shape: PagedAttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
            v_dim,
            block_size,
            max_blocks,
        },
        scale,
        tokens,
    };
    // A fresh contiguous copy: the op reads its input from offset 0.
    let q = q.contiguous()?.copy()?;
    q.apply_op3_no_bwd(&cache.k, &cache.v, &op)
}
