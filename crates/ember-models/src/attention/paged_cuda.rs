//! ember's paged attention kernel (`kernels/paged_attention.cu`) in the model path on CUDA, as a
//! candle custom op over the query and the layer's cache tensors (`--attention-backend ember`).
//! The step's metadata (block tables, each token's sequence and context length) is built from
//! the batch on the host, checked and copied to the GPU once per step by the first layer that
//! runs the kernel, and read by every layer after; the op launches on candle's stream, so it
//! orders with candle's own ops.

use std::sync::Arc;

use candle_core::{DType, Shape, Tensor};
use ember_kernels::cuda::CudaElement;
use ember_kernels::paged_attention::{PagedAttentionShape, MAX_V_DIM};
use ember_kernels::Element;

use crate::attention::paged::kernel_shape;
use crate::cache::kv_cache::LayerKvCache;
use crate::device::same_dtype_op::{CudaCall, SameDtype, SameDtypeOp};
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

/// One layer's call: the step's metadata and sizes. Inputs: `q`, the k cache, the v cache.
struct PagedAttentionOp {
    meta: Arc<StepPagedBatch>,
    shape: PagedAttentionShape,
    scale: f32,
    tokens: usize,
}

impl SameDtypeOp for PagedAttentionOp {
    const NAME: &'static str = "ember-paged-attention";

    fn out_shape(&self, _: &[&Shape]) -> candle_core::Result<Shape> {
        Ok(Shape::from((
            self.tokens,
            self.shape.num_heads * self.shape.v_dim,
        )))
    }

    fn cpu<T: Element>(&self, _: &[&[T]], _: &mut [T]) -> candle_core::Result<()> {
        candle_core::bail!("ember's paged attention kernel runs on CUDA; the CPU has its own path")
    }

    fn cuda<T: CudaElement>(&self, call: CudaCall<'_, T>) -> candle_core::Result<()> {
        let (k, i, out) = (call.kernels, call.inputs, call.out);
        let (meta, shape) = (&self.meta.device, &self.shape);
        k.paged_attention(out, &i[0], &i[1], &i[2], meta, self.scale, shape)
            .map_err(candle_core::Error::wrap)
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
    let meta = match q.device() {
        candle_core::Device::Cuda(device) => batch.device_metadata.paged(batch, device)?,
        _ => candle_core::bail!("ember's paged attention kernel runs on CUDA"),
    };
    let (tokens, shape) = kernel_shape(q, cache, num_kv_heads, batch.block_size, meta.max_blocks)?;
    let op = PagedAttentionOp {
        shape,
        meta,
        scale,
        tokens,
    };
    // The op reads q where it starts: no copy once contiguous.
    q.contiguous()?
        .apply_op3_no_bwd(&cache.k, &cache.v, &SameDtype(op))
}
