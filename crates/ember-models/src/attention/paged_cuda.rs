//! ember's paged attention kernel (`kernels/paged_attention.cu`) in the model path on CUDA, as a
//! candle custom op over the query and the layer's cache tensors (`--attention-backend ember`).
//! The step's metadata (block tables, each token's sequence and context length) is built from
//! the batch on the host, checked and copied to the GPU once per step by the first layer that
//! runs the kernel, and read by every layer after; the op launches on candle's stream, so it
//! orders with candle's own ops.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Shape, Tensor};
use ember_kernels::cuda::CudaKernels;
use ember_kernels::paged_attention::{PagedAttentionShape, MAX_V_DIM};

use crate::cache::kv_cache::LayerKvCache;
use crate::step::batch::ForwardBatch;
use crate::step::metadata::StepPagedBatch;
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
        let kernels = crate::device::kernels::kernels(&device)?;
        let ranges = [
            crate::device::kernels::contiguous_range(lq, "paged attention: q")?,
            crate::device::kernels::contiguous_range(lk, "paged attention: the k cache")?,
            crate::device::kernels::contiguous_range(lv, "paged attention: the v cache")?,
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
/// [`crate::attention::paged::paged_attention`] computes it on the CPU. Returns
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
