//! MLA decode through ember's kernel (`kernels/mla_decode.cu`, `--attention-backend ember`): the
//! step's single-token decodes attend over the latent cache in the absorbed form in one call,
//! instead of one gather and three matmuls per sequence. A candle custom op over the queries and
//! the layer's two caches: the kernel on a GPU, its CPU reference (ember-kernels' `mla_decode`,
//! the kernel's oracle) on the CPU.
//!
//! The step's metadata (which sequences decode, their block tables and context lengths) is built
//! once per step on the host and, on a GPU, checked and copied once, for every layer to read.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use ember_kernels::mla_decode::{self, MlaShape};
use ember_kernels::Element;

use crate::cache::kv_cache::LayerKvCache;
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
    let out = q.contiguous()?.apply_op3_no_bwd(&cache.k, &cache.v, &op)?;
    Ok(out)
}

/// A CPU op input's contiguous elements.
fn slice<'s, T: candle_core::WithDType>(
    (s, l): (&'s CpuStorage, &Layout),
    what: &str,
) -> candle_core::Result<&'s [T]> {
    Ok(&s.as_slice::<T>()?[crate::device::kernels::contiguous_range(l, what)?])
}

/// A three-input op's CPU output: `f32s` when every input is f32, `bf16s` when every one is
/// bf16, else the error `what`.
fn f32_or_bf16(
    inputs: [(&CpuStorage, &Layout); 3],
    what: &str,
    f32s: impl FnOnce([(&CpuStorage, &Layout); 3]) -> candle_core::Result<Vec<f32>>,
    bf16s: impl FnOnce([(&CpuStorage, &Layout); 3]) -> candle_core::Result<Vec<half::bf16>>,
) -> candle_core::Result<CpuStorage> {
    match inputs.map(|(s, _)| s) {
        [CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)] => {
            Ok(CpuStorage::F32(f32s(inputs)?))
        }
        [CpuStorage::BF16(_), CpuStorage::BF16(_), CpuStorage::BF16(_)] => {
            Ok(CpuStorage::BF16(bf16s(inputs)?))
        }
        _ => candle_core::bail!("{what}"),
    }
}

struct MlaDecodeOp<'a> {
    decodes: &'a MlaDecodeBatch,
    shape: MlaShape,
    scale: f32,
}

impl MlaDecodeOp<'_> {
    fn out_shape(&self) -> Shape {
        Shape::from((
            self.decodes.seqs.len(),
            self.shape.num_heads,
            self.shape.rank,
        ))
    }

    fn cpu<T: Element + candle_core::WithDType>(
        &self,
        [q, c, r]: [(&CpuStorage, &Layout); 3],
    ) -> candle_core::Result<Vec<T>> {
        let mut out = vec![T::from_f32(0.0); self.out_shape().elem_count()];
        mla_decode::mla_decode(
            &mut out,
            slice(q, "MLA queries")?,
            slice(c, "the latent cache")?,
            slice(r, "the rope key cache")?,
            &self.decodes.host(),
            self.scale,
            &self.shape,
        )
        .map_err(candle_core::Error::wrap)?;
        Ok(out)
    }
}

impl CustomOp3 for MlaDecodeOp<'_> {
    fn name(&self) -> &'static str {
        "ember-mla-decode"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        c: &CpuStorage,
        lc: &Layout,
        r: &CpuStorage,
        lr: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = f32_or_bf16(
            [(q, lq), (c, lc), (r, lr)],
            "MLA decode takes f32 or bf16 queries and caches of one dtype",
            |inputs| self.cpu::<f32>(inputs),
            |inputs| self.cpu::<half::bf16>(inputs),
        )?;
        Ok((out, self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        lq: &Layout,
        c: &candle_core::CudaStorage,
        lc: &Layout,
        r: &candle_core::CudaStorage,
        lr: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let device = q.device().clone();
        let kernels = crate::device::kernels::kernels(&device)?;
        let meta = self.decodes.on_device(&device)?;
        let ranges = [
            crate::device::kernels::contiguous_range(lq, "MLA queries")?,
            crate::device::kernels::contiguous_range(lc, "the latent cache")?,
            crate::device::kernels::contiguous_range(lr, "the rope key cache")?,
        ];
        fn run<T: ember_kernels::cuda::CudaElement + candle_core::cuda_backend::CudaDType>(
            op: &MlaDecodeOp<'_>,
            kernels: &ember_kernels::cuda::CudaKernels,
            device: &candle_core::CudaDevice,
            meta: &ember_kernels::cuda::DevicePagedBatch,
            [q, c, r]: [&candle_core::CudaStorage; 3],
            [rq, rc, rr]: [std::ops::Range<usize>; 3],
        ) -> candle_core::Result<candle_core::CudaStorage> {
            let mut out = device.alloc_zeros::<T>(op.out_shape().elem_count())?;
            kernels
                .mla_decode(
                    &mut out,
                    &q.as_cuda_slice::<T>()?.slice(rq),
                    &c.as_cuda_slice::<T>()?.slice(rc),
                    &r.as_cuda_slice::<T>()?.slice(rr),
                    meta,
                    op.scale,
                    &op.shape,
                )
                .map_err(candle_core::Error::wrap)?;
            Ok(candle_core::CudaStorage::wrap_cuda_slice(
                out,
                device.clone(),
            ))
        }
        let storage = match (q.dtype(), c.dtype(), r.dtype()) {
            (DType::F32, DType::F32, DType::F32) => {
                run::<f32>(self, &kernels, &device, &meta, [q, c, r], ranges)?
            }
            (DType::BF16, DType::BF16, DType::BF16) => {
                run::<half::bf16>(self, &kernels, &device, &meta, [q, c, r], ranges)?
            }
            _ => candle_core::bail!("MLA decode takes f32 or bf16 queries and caches of one dtype"),
        };
        Ok((storage, self.out_shape()))
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
        shape: ember_kernels::prefill_attention::PrefillShape {
            q_len,
            kv_len,
            heads,
            dqk,
            dv,
        },
        scale,
    };
    let out = q
        .contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
    Ok(out)
}

struct PrefillOp {
    shape: ember_kernels::prefill_attention::PrefillShape,
    scale: f32,
}

impl PrefillOp {
    fn out_shape(&self) -> Shape {
        Shape::from((self.shape.q_len, self.shape.heads * self.shape.dv))
    }

    fn cpu<T: Element + candle_core::WithDType>(
        &self,
        [q, k, v]: [(&CpuStorage, &Layout); 3],
    ) -> candle_core::Result<Vec<T>> {
        let mut out = vec![T::from_f32(0.0); self.out_shape().elem_count()];
        ember_kernels::prefill_attention::prefill_attention(
            &mut out,
            slice(q, "prefill queries")?,
            slice(k, "prefill keys")?,
            slice(v, "prefill values")?,
            &self.shape,
            self.scale,
        )
        .map_err(candle_core::Error::wrap)?;
        Ok(out)
    }
}

impl CustomOp3 for PrefillOp {
    fn name(&self) -> &'static str {
        "ember-prefill-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = f32_or_bf16(
            [(q, lq), (k, lk), (v, lv)],
            "prefill attention takes f32 or bf16 inputs of one dtype",
            |inputs| self.cpu::<f32>(inputs),
            |inputs| self.cpu::<half::bf16>(inputs),
        )?;
        Ok((out, self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        lq: &Layout,
        k: &candle_core::CudaStorage,
        lk: &Layout,
        v: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let device = q.device().clone();
        let kernels = crate::device::kernels::kernels(&device)?;
        fn slice<'s>(
            s: &'s candle_core::CudaStorage,
            l: &Layout,
            what: &str,
        ) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'s, half::bf16>>
        {
            Ok(s.as_cuda_slice::<half::bf16>()?
                .slice(crate::device::kernels::contiguous_range(l, what)?))
        }
        let mut out = device.alloc_zeros::<half::bf16>(self.out_shape().elem_count())?;
        kernels
            .prefill_attention(
                &mut out,
                &slice(q, lq, "prefill queries")?,
                &slice(k, lk, "prefill keys")?,
                &slice(v, lv, "prefill values")?,
                &self.shape,
                self.scale,
            )
            .map_err(candle_core::Error::wrap)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, device),
            self.out_shape(),
        ))
    }
}
