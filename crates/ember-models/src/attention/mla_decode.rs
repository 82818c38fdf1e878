//! MLA decode through ember's kernel (`kernels/mla_decode.cu`, `--attention-backend ember`): the
//! step's single-token decodes attend over the latent cache in the absorbed form in one call,
//! instead of one gather and three matmuls per sequence. A candle custom op over the queries and
//! the layer's two caches: the kernel on a GPU, its CPU reference (ember-kernels' `mla_decode`,
//! the kernel's oracle) on the CPU.
//!
//! The step's metadata (which sequences decode, their block tables and context lengths) is built
//! once per step on the host and, on a GPU, checked and copied once, for every layer to read.

use candle_core::{DType, Shape, Tensor};
#[cfg(feature = "cuda")]
use ember_kernels::cuda::CudaElement;
use ember_kernels::mla_decode::{self, MlaShape};
use ember_kernels::prefill_attention::PrefillShape;
use ember_kernels::Element;

use crate::cache::kv_cache::LayerKvCache;
#[cfg(feature = "cuda")]
use crate::device::same_dtype_op::CudaCall;
use crate::device::same_dtype_op::{SameDtype, SameDtypeOp};
use crate::step::metadata::MlaDecodeBatch;
use crate::TensorResult;

/// Whether the kernel serves a layer: queries in f32 or bf16, caches of the same dtype (an fp8
/// cache keeps the tensor path), latents within the kernel's width.
pub fn serves(cache: &LayerKvCache, q: &Tensor, rank: usize) -> bool {
    matches!(q.dtype(), DType::F32 | DType::BF16)
        && cache.k.dtype() == q.dtype()
        && cache.v.dtype() == q.dtype()
        && rank <= mla_decode::MLA_MAX_RANK
}

/// Attention of the decodes' queries `q` (`[decodes, heads, rank + rope_dim]`: the absorbed
/// latent query, then the roped query) over their cached context: `[decodes, heads, rank]`.
pub fn decode(
    q: &Tensor,
    cache: &LayerKvCache,
    decodes: &MlaDecodeBatch,
    scale: f32,
) -> TensorResult {
    let (_, num_heads, q_dim) = q.dims3()?;
    let rank = cache.k.dim(1)?;
    let shape = MlaShape {
        num_heads,
        rank,
        rope_dim: q_dim - rank,
        block_size: decodes.block_size,
        max_blocks: decodes.max_blocks,
    };
    let op = MlaDecodeOp {
        decodes,
        shape,
        scale,
    };
    let out = q
        .contiguous()?
        .apply_op3_no_bwd(&cache.k, &cache.v, &SameDtype(op))?;
    Ok(out)
}

struct MlaDecodeOp<'a> {
    decodes: &'a MlaDecodeBatch,
    shape: MlaShape,
    scale: f32,
}

impl SameDtypeOp for MlaDecodeOp<'_> {
    const NAME: &'static str = "ember-mla-decode";

    /// Inputs: the queries, the latent cache and the rope key cache.
    fn out_shape(&self, _: &[&Shape]) -> candle_core::Result<Shape> {
        Ok(Shape::from((
            self.decodes.seqs.len(),
            self.shape.num_heads,
            self.shape.rank,
        )))
    }

    fn cpu<T: Element>(&self, i: &[&[T]], out: &mut [T]) -> candle_core::Result<()> {
        let batch = self.decodes.host();
        mla_decode::mla_decode(out, i[0], i[1], i[2], &batch, self.scale, &self.shape)
            .map_err(candle_core::Error::wrap)
    }

    #[cfg(feature = "cuda")]
    fn cuda<T: CudaElement>(&self, call: CudaCall<'_, T>) -> candle_core::Result<()> {
        let (k, i, out) = (call.kernels, call.inputs, call.out);
        let meta = self.decodes.on_device(call.device)?;
        k.mla_decode(out, &i[0], &i[1], &i[2], &meta, self.scale, &self.shape)
            .map_err(candle_core::Error::wrap)
    }
}

/// Whether the prefill kernel serves queries like `q` with keys `dqk` and values `dv` wide per
/// head: its CPU reference takes f32 and bf16; on a GPU, the tensor-core kernel takes bf16
/// within its widths.
pub fn prefill_serves(q: &Tensor, dqk: usize, dv: usize) -> bool {
    use ember_kernels::prefill_attention::{MAX_DQK, MAX_DV};
    match q.device() {
        candle_core::Device::Cpu => matches!(q.dtype(), DType::F32 | DType::BF16),
        _ => q.dtype() == DType::BF16 && dqk <= MAX_DQK && dv <= MAX_DV,
    }
}

/// Causal attention of one sequence's chunk `q` (`[q_len, heads, dqk]`) over its whole context's
/// keys `k` (`[kv_len, heads, dqk]`) and values `v` (`[kv_len, heads, dv]`): `[q_len, heads · dv]`.
pub fn prefill(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> TensorResult {
    let (q_len, heads, dqk) = q.dims3()?;
    let (kv_len, _, dv) = v.dims3()?;
    let op = PrefillOp {
        shape: PrefillShape {
            q_len,
            kv_len,
            heads,
            dqk,
            dv,
        },
        scale,
    };
    let out =
        q.contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &SameDtype(op))?;
    Ok(out)
}

struct PrefillOp {
    shape: PrefillShape,
    scale: f32,
}

impl SameDtypeOp for PrefillOp {
    const NAME: &'static str = "ember-prefill-attention";

    /// Inputs: the queries, the keys and the values.
    fn out_shape(&self, _: &[&Shape]) -> candle_core::Result<Shape> {
        Ok(Shape::from((
            self.shape.q_len,
            self.shape.heads * self.shape.dv,
        )))
    }

    fn cpu<T: Element>(&self, i: &[&[T]], out: &mut [T]) -> candle_core::Result<()> {
        let attention = ember_kernels::prefill_attention::prefill_attention;
        attention(out, i[0], i[1], i[2], &self.shape, self.scale).map_err(candle_core::Error::wrap)
    }

    /// The kernel takes bf16 only (see [`prefill_serves`]); it refuses f32.
    #[cfg(feature = "cuda")]
    fn cuda<T: CudaElement>(&self, call: CudaCall<'_, T>) -> candle_core::Result<()> {
        let (k, i, out) = (call.kernels, call.inputs, call.out);
        k.prefill_attention(out, &i[0], &i[1], &i[2], &self.shape, self.scale)
            .map_err(candle_core::Error::wrap)
    }
}
