//! Sampling where the logits are: each row's argmax, or a draw under temperature, top-k, top-p
//! and min-p, and the drawn tokens' logprobs, as candle ops (ember-kernels' CPU references on the
//! CPU, its `argmax_f32`, `sample_rows_f32` and `token_logprobs_f32` kernels on CUDA), so a step
//! copies back a token id (and its logprobs) per row instead of the whole `[rows, vocab]` logits.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use ember_kernels::sampling::{argmax_rows, sample_rows, DrawParams};

use crate::device::kernels::cpu_input;
#[cfg(feature = "cuda")]
use crate::device::kernels::{cuda_input, device_kernels};

/// The argmax of each row of f32 `logits` `[rows, vocab]`: the lowest id of the largest logit, NaN
/// never chosen (as the host sampler chooses), brought back to the host.
pub fn greedy_tokens(logits: &Tensor) -> candle_core::Result<Vec<u32>> {
    greedy_token_ids(logits)?.to_vec1::<u32>()
}

/// [`greedy_tokens`] left where the logits are: `[rows]` u32.
pub fn greedy_token_ids(logits: &Tensor) -> candle_core::Result<Tensor> {
    if logits.dtype() != DType::F32 {
        candle_core::bail!("greedy sampling takes f32 logits, not {:?}", logits.dtype());
    }
    let (_, vocab) = logits.dims2()?;
    logits
        .contiguous()?
        .apply_op1_no_bwd(&PickTokens { vocab, draws: None })
}

/// Each row of f32 `logits` `[rows, vocab]` drawn under its `params` (see
/// [`ember_kernels::sampling`]), brought back to the host.
pub fn sampled_tokens(logits: &Tensor, params: &[DrawParams]) -> candle_core::Result<Vec<u32>> {
    sampled_token_ids(logits, params)?.to_vec1::<u32>()
}

/// [`sampled_tokens`] left where the logits are: `[rows]` u32.
pub fn sampled_token_ids(logits: &Tensor, params: &[DrawParams]) -> candle_core::Result<Tensor> {
    if logits.dtype() != DType::F32 {
        candle_core::bail!("sampling takes f32 logits, not {:?}", logits.dtype());
    }
    let (_, vocab) = logits.dims2()?;
    logits.contiguous()?.apply_op1_no_bwd(&PickTokens {
        vocab,
        draws: Some(params),
    })
}

/// Each row's logprob of its token (`tokens` `[rows]` u32, where the logits are) and its `k` best
/// alternatives, computed where the logits are (ember-kernels' `token_logprobs_rows`, the host
/// sampler's definition): `[rows, 1 + 2k]` f32, k at most the vocab (see
/// [`ember_kernels::sampling::logprobs_width`]).
pub fn token_logprobs(logits: &Tensor, tokens: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    if logits.dtype() != DType::F32 || tokens.dtype() != DType::U32 {
        candle_core::bail!(
            "logprobs take f32 logits and u32 tokens, not {:?} and {:?}",
            logits.dtype(),
            tokens.dtype()
        );
    }
    let (_, vocab) = logits.dims2()?;
    logits.contiguous()?.apply_op2_no_bwd(
        &tokens.contiguous()?,
        &Logprobs {
            vocab,
            k: k.min(vocab),
        },
    )
}

struct Logprobs {
    vocab: usize,
    k: usize,
}

impl candle_core::CustomOp2 for Logprobs {
    fn name(&self) -> &'static str {
        "ember-token-logprobs"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        tokens: &CpuStorage,
        tokens_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let logits = cpu_input::<f32>(logits, logits_layout, "logprobs")?;
        let tokens = cpu_input::<u32>(tokens, tokens_layout, "their tokens")?;
        let width = ember_kernels::sampling::logprobs_width(self.k);
        let mut out = vec![0f32; tokens.len() * width];
        ember_kernels::sampling::token_logprobs_rows(logits, self.vocab, tokens, self.k, &mut out)
            .map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(out), Shape::from((tokens.len(), width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &candle_core::CudaStorage,
        logits_layout: &Layout,
        tokens: &candle_core::CudaStorage,
        tokens_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (device, kernels) = device_kernels(logits)?;
        let logits = cuda_input::<f32>(logits, logits_layout, "logprobs")?;
        let tokens = cuda_input::<u32>(tokens, tokens_layout, "their tokens")?;
        let width = ember_kernels::sampling::logprobs_width(self.k);
        let rows = tokens.len();
        let mut out = device.alloc_zeros::<f32>(rows * width)?;
        kernels
            .token_logprobs(&logits, self.vocab, &tokens, self.k, &mut out)
            .map_err(candle_core::Error::wrap)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((rows, width)),
        ))
    }
}

/// Each row's token from f32 logits `[rows, vocab]`: its argmax, or its draw.
struct PickTokens<'a> {
    vocab: usize,
    /// Each row's draw parameters; `None` for the argmax.
    draws: Option<&'a [DrawParams]>,
}

impl PickTokens<'_> {
    /// Who refuses strided logits.
    fn what(&self) -> &'static str {
        match self.draws {
            None => "greedy sampling",
            Some(_) => "sampling",
        }
    }

    fn rows(&self, logits: usize) -> usize {
        match self.draws {
            None => logits / self.vocab,
            Some(params) => params.len(),
        }
    }
}

impl CustomOp1 for PickTokens<'_> {
    fn name(&self) -> &'static str {
        match self.draws {
            None => "ember-argmax",
            Some(_) => "ember-sample",
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let logits = cpu_input::<f32>(storage, layout, self.what())?;
        let mut out = vec![0u32; self.rows(logits.len())];
        match self.draws {
            None => argmax_rows(logits, self.vocab, &mut out),
            Some(params) => sample_rows(logits, self.vocab, params, &mut out),
        }
        .map_err(candle_core::Error::wrap)?;
        let rows = out.len();
        Ok((CpuStorage::U32(out), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (device, kernels) = device_kernels(storage)?;
        let logits = cuda_input::<f32>(storage, layout, self.what())?;
        let rows = self.rows(logits.len());
        let mut out = device.alloc_zeros::<u32>(rows)?;
        match self.draws {
            None => kernels.argmax_rows(&logits, self.vocab, &mut out),
            Some(params) => kernels.sample_rows(&logits, self.vocab, params, &mut out),
        }
        .map_err(candle_core::Error::wrap)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, device),
            Shape::from(rows),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn picks_each_rows_lowest_best_id_from_a_strided_view() {
        // Columns 1.. of a [3, 5] tensor: a non-contiguous view, made contiguous by the op.
        let t = Tensor::new(
            &[
                [9f32, 1.0, 4.0, 4.0, 0.0],
                [9.0, f32::NAN, -1.0, 2.0, 2.0],
                [9.0, f32::NAN, f32::NAN, f32::NAN, f32::NAN],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let view = t.narrow(1, 1, 4).unwrap();
        assert_eq!(greedy_tokens(&view).unwrap(), [1, 2, 0]);
        assert!(greedy_tokens(&view.to_dtype(DType::BF16).unwrap()).is_err());
    }
}
