//! The implementations a model's layers run, chosen once at load from the command line
//! (`--attention-backend`, `--moe-backend`, `--layer-kernels`, `--fp8-gemm`) and fixed for the
//! model's life. Each defaults to candle's ops or the path already proven on a GPU until ember's
//! kernels have run on one.

use ember_core::{EmberError, Result};

/// Which implementation attention runs (`--attention-backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AttentionBackend {
    /// candle's tensor ops on the GPU (gather the context, matmuls, masked softmax), and ember's
    /// CPU kernel on the CPU: the default until ember's CUDA kernel has been run on a GPU.
    #[default]
    Tensor,
    /// ember's paged attention kernel (`kernels/paged_attention.cu`) where it serves the layer
    /// (CUDA, f32/bf16 caches), and for MLA layers the step's decodes through ember's MLA
    /// kernel (`kernels/mla_decode.cu`; its CPU reference on the CPU, f32/bf16 caches);
    /// elsewhere as `Tensor`.
    Ember,
}

/// Which implementation runs a layer's routed experts (`--moe-backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MoeBackend {
    /// On the CPU the fused MoE where it serves the layer (dense f32/bf16 experts or packed ones,
    /// not expert parallel, no adapter on the experts in the step: ember-kernels' blocked CPU
    /// kernel), elsewhere as `Experts`; on a GPU `Experts`, until the fused kernels have been
    /// run on one.
    #[default]
    Auto,
    /// Each expert's MLP over the rows routed to it, routed on the host.
    Experts,
    /// The fused MoE where it serves the layer (dense f32/bf16 experts, or e4m3/4-bit ones held
    /// as stored, not expert parallel, no adapter on the experts in the step); elsewhere as
    /// `Experts`.
    Fused,
}

/// Which implementation RMSNorm, SiLU-and-mul and RoPE run (`--layer-kernels`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LayerKernels {
    /// candle's ops: the default until ember's kernels have been run on a GPU.
    #[default]
    Candle,
    /// ember's kernels (their CPU references on the CPU) for f32 and bf16.
    Ember,
}

/// How block-FP8 projections multiply (`--fp8-gemm`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fp8Gemm {
    /// Activations in the model dtype, weights decoded in the GEMM (the W8A16 kernels): the
    /// default until the W8A8 kernel has run on a GPU, and the only path on sm_80.
    #[default]
    W8a16,
    /// Activations quantized per token and 128-input group to e4m3, FP8 tensor cores (sm_89 and
    /// up; on the CPU the kernels' references), as DeepSeek-V3 was trained: checkpoints with
    /// 128-input scale blocks.
    W8a8,
}

/// Every backend choice of one model, as the loader hands them to its layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backends {
    pub attention: AttentionBackend,
    pub moe: MoeBackend,
    pub layer_kernels: LayerKernels,
    pub fp8_gemm: Fp8Gemm,
}

/// The value `name` picks among `choices` (case-insensitive; `auto` is the first), or an error
/// naming `flag` and the accepted names.
fn choose<T: Copy>(flag: &str, name: &str, choices: [(&str, T); 2]) -> Result<T> {
    let lower = name.to_ascii_lowercase();
    if lower == "auto" {
        return Ok(choices[0].1);
    }
    choices
        .iter()
        .find(|(n, _)| *n == lower)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            EmberError::Config(format!(
                "unknown {flag} {name:?}; use {} or {}",
                choices[0].0, choices[1].0
            ))
        })
}

impl AttentionBackend {
    /// Parses `--attention-backend`.
    pub fn parse(name: &str) -> Result<Self> {
        choose(
            "--attention-backend",
            name,
            [("tensor", Self::Tensor), ("ember", Self::Ember)],
        )
    }
}

impl MoeBackend {
    /// Parses `--moe-backend` (`auto`, `experts` or `fused`).
    pub fn parse(name: &str) -> Result<Self> {
        if name.eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        choose(
            "--moe-backend",
            name,
            [("experts", Self::Experts), ("fused", Self::Fused)],
        )
    }
}

impl LayerKernels {
    /// Parses `--layer-kernels`.
    pub fn parse(name: &str) -> Result<Self> {
        choose(
            "--layer-kernels",
            name,
            [("candle", Self::Candle), ("ember", Self::Ember)],
        )
    }
}

impl Fp8Gemm {
    /// Parses `--fp8-gemm`.
    pub fn parse(name: &str) -> Result<Self> {
        choose(
            "--fp8-gemm",
            name,
            [("w8a16", Self::W8a16), ("w8a8", Self::W8a8)],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_case_insensitively_with_auto_the_default() {
        assert_eq!(
            AttentionBackend::parse("EMBER").unwrap(),
            AttentionBackend::Ember
        );
        assert_eq!(
            AttentionBackend::parse("auto").unwrap(),
            AttentionBackend::Tensor
        );
        assert_eq!(MoeBackend::parse("fused").unwrap(), MoeBackend::Fused);
        assert_eq!(MoeBackend::parse("Auto").unwrap(), MoeBackend::Auto);
        assert_eq!(LayerKernels::parse("auto").unwrap(), LayerKernels::Candle);
        assert_eq!(Fp8Gemm::parse("W8A8").unwrap(), Fp8Gemm::W8a8);
        let err = MoeBackend::parse("triton").unwrap_err().to_string();
        assert!(
            err.contains("unknown --moe-backend \"triton\"; use experts or fused"),
            "{err}"
        );
    }
}
