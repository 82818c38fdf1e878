//! ember's RMSNorm (alone, and fused with the residual add before it), SiLU-and-mul and RoPE
//! kernels in the model path (`--layer-kernels ember`), as candle custom ops: the CUDA kernels
//! (`kernels/rms_norm.cu`, `silu_and_mul.cu`, `rotary.cu`) on a GPU, their CPU references
//! (ember-kernels, the oracle the kernels are tested against) on the CPU. They take f32 and bf16;
//! callers keep candle's ops for other dtypes ([`serves`]).
//!
//! What they save over candle's ops on a GPU: the residual add and the norm after it read and
//! write the hidden state once instead of twice; the gate and up projections run as one GEMM whose
//! halves one kernel combines (instead of two GEMMs, a SiLU and a multiply); DeepSeek's
//! interleaved rotary dims are read in place instead of gathered first.

use candle_core::{DType, Shape, Tensor};
#[cfg(feature = "cuda")]
use ember_kernels::cuda::CudaElement;
use ember_kernels::rotary::RotaryShape;
use ember_kernels::{rms_norm, rotary, silu_and_mul, Element};

use crate::backends::LayerKernels;
#[cfg(feature = "cuda")]
use crate::device::same_dtype_op::CudaCall;
use crate::device::same_dtype_op::{SameDtype as Op, SameDtypeOp};
use crate::TensorResult;

/// Whether ember's kernels serve tensors of `dtype` under `kernels`.
pub fn serves(kernels: LayerKernels, dtype: DType) -> bool {
    kernels == LayerKernels::Ember && matches!(dtype, DType::F32 | DType::BF16)
}

/// `x / sqrt(mean(x²) + eps) * weight` over the last dimension of `x` (`weight` of its dtype).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> TensorResult {
    x.contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &Op(RmsNorm { eps }))
}

/// `residual + delta` (rounded to the dtype) and its RMSNorm, in one pass: `(sum, normed)`.
pub fn add_rms_norm(
    delta: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> TensorResult<(Tensor, Tensor)> {
    let both = delta.contiguous()?.apply_op3_no_bwd(
        &residual.contiguous()?,
        &weight.contiguous()?,
        &Op(AddRmsNorm { eps }),
    )?;
    Ok((both.get(1)?, both.get(0)?))
}

/// `silu(h[.., :d]) * h[.., d:]` for `h` `[rows, 2d]` (gate then up): `[rows, d]`.
pub fn silu_and_mul(h: &Tensor) -> TensorResult {
    let (_, two_d) = h.dims2()?;
    h.contiguous()?
        .apply_op1_no_bwd(&Op(SiluAndMul { d: two_d / 2 }))
}

/// `x` `[tokens, heads, head_dim]` rotated by the step's rows `cos`/`sin` `[tokens, head_dim/2]`
/// (row `t` for token `t`); `interleaved` input pairs `(x[2i], x[2i+1])` come out rotate-half.
pub fn rotary_rows(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> TensorResult {
    let (_, heads, head_dim) = x.dims3()?;
    let shape = RotaryShape {
        heads,
        head_dim,
        interleaved,
    };
    x.contiguous()?
        .apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &Op(Rotary(shape)))
}

struct RmsNorm {
    eps: f32,
}

impl SameDtypeOp for RmsNorm {
    const NAME: &'static str = "ember-rms-norm";

    fn out_shape(&self, inputs: &[&Shape]) -> candle_core::Result<Shape> {
        Ok(inputs[0].clone())
    }

    fn cpu<T: Element>(&self, i: &[&[T]], out: &mut [T]) -> candle_core::Result<()> {
        rms_norm::rms_norm(i[0], i[1], self.eps, out).map_err(candle_core::Error::wrap)
    }

    #[cfg(feature = "cuda")]
    fn cuda<T: CudaElement>(&self, call: CudaCall<'_, T>) -> candle_core::Result<()> {
        let (k, i, out) = (call.kernels, call.inputs, call.out);
        k.rms_norm(&i[0], &i[1], self.eps, &mut out.as_view_mut())
            .map_err(candle_core::Error::wrap)
    }
}

/// Inputs `delta`, `residual`, `weight`; output `[2, ..]`: the norm, then the sum.
struct AddRmsNorm {
    eps: f32,
}

impl SameDtypeOp for AddRmsNorm {
    const NAME: &'static str = "ember-add-rms-norm";

    fn out_shape(&self, inputs: &[&Shape]) -> candle_core::Result<Shape> {
        if inputs[0] != inputs[1] {
            candle_core::bail!(
                "{}: delta {:?} and residual {:?} differ",
                Self::NAME,
                inputs[0],
                inputs[1]
            );
        }
        let mut dims = vec![2];
        dims.extend_from_slice(inputs[0].dims());
        Ok(Shape::from(dims))
    }

    fn cpu<T: Element>(&self, i: &[&[T]], out: &mut [T]) -> candle_core::Result<()> {
        let (normed, sum) = out.split_at_mut(i[0].len());
        sum.copy_from_slice(i[1]);
        rms_norm::fused_add_rms_norm(i[0], sum, i[2], self.eps, normed)
            .map_err(candle_core::Error::wrap)
    }

    #[cfg(feature = "cuda")]
    fn cuda<T: CudaElement>(&self, call: CudaCall<'_, T>) -> candle_core::Result<()> {
        let (k, i, out) = (call.kernels, call.inputs, call.out);
        let (mut normed, mut sum) = out.split_at_mut(i[0].len());
        k.stream()
            .memcpy_dtod(&i[1], &mut sum)
            .map_err(candle_core::Error::wrap)?;
        k.fused_add_rms_norm(&i[0], &mut sum, &i[2], self.eps, &mut normed)
            .map_err(candle_core::Error::wrap)
    }
}

/// Input `[rows, 2d]`, gate then up.
struct SiluAndMul {
    d: usize,
}

impl SameDtypeOp for SiluAndMul {
    const NAME: &'static str = "ember-silu-and-mul";

    fn out_shape(&self, inputs: &[&Shape]) -> candle_core::Result<Shape> {
        let (rows, two_d) = inputs[0].dims2()?;
        if two_d != 2 * self.d {
            candle_core::bail!(
                "{}: [{rows}, {two_d}] is not [rows, 2 x {}]",
                Self::NAME,
                self.d
            );
        }
        Ok(Shape::from((rows, self.d)))
    }

    fn cpu<T: Element>(&self, i: &[&[T]], out: &mut [T]) -> candle_core::Result<()> {
        silu_and_mul::silu_and_mul(i[0], self.d, out).map_err(candle_core::Error::wrap)
    }

    #[cfg(feature = "cuda")]
    fn cuda<T: CudaElement>(&self, call: CudaCall<'_, T>) -> candle_core::Result<()> {
        let (k, i, out) = (call.kernels, call.inputs, call.out);
        k.silu_and_mul(&i[0], self.d, out)
            .map_err(candle_core::Error::wrap)
    }
}

/// Inputs `x`, the step's `cos` and `sin` rows.
struct Rotary(RotaryShape);

impl SameDtypeOp for Rotary {
    const NAME: &'static str = "ember-rotary";

    fn out_shape(&self, inputs: &[&Shape]) -> candle_core::Result<Shape> {
        Ok(inputs[0].clone())
    }

    fn cpu<T: Element>(&self, i: &[&[T]], out: &mut [T]) -> candle_core::Result<()> {
        rotary::rotary_embedding_rows(i[0], i[1], i[2], &self.0, out)
            .map_err(candle_core::Error::wrap)
    }

    #[cfg(feature = "cuda")]
    fn cuda<T: CudaElement>(&self, call: CudaCall<'_, T>) -> candle_core::Result<()> {
        let (k, i, out) = (call.kernels, call.inputs, call.out);
        k.rotary_embedding_rows(&i[0], &i[1], &i[2], &self.0, out)
            .map_err(candle_core::Error::wrap)
    }
}
