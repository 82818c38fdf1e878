//! Rotary position embeddings, as cos/sin tables indexed by each token's position so a flattened
//! batch of many sequences rotates in one call. Rotate-half layout (Qwen3) or DeepSeek's
//! interleaved pairs; plain, linear or YaRN frequencies.

use candle_core::{DType, Device, Tensor};
use ember_core::config::YarnScaling;
use ember_core::{EmberError, ModelConfig, Result, RopeScaling};

use crate::backends::LayerKernels;
use crate::device::calls::{Kernel, KernelCalls};
use crate::layers::kernel_ops;
use crate::TensorResult;
use std::sync::Arc;

/// Precomputed cos/sin tables `[max_positions, head_dim / 2]` in the model dtype.
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
    /// For interleaved checkpoints, the permutation that gathers even then odd dims.
    deinterleave: Option<Tensor>,
    kernels: LayerKernels,
    calls: Arc<KernelCalls>,
}

/// YaRN's inverse frequencies for `dim` rotary dims, as transformers' `_compute_yarn_parameters`:
/// a per-dim blend of interpolated (`/ factor`) and extrapolated frequencies along a linear ramp
/// between the correction dims of `beta_fast` and `beta_slow` rotations.
pub fn yarn_inv_freq(theta: f64, dim: usize, yarn: &YarnScaling) -> Vec<f32> {
    let original = yarn.original_max_position_embeddings as f64;
    let correction_dim = |rotations: f64| {
        dim as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
    };
    let (mut low, mut high) = (
        correction_dim(yarn.beta_fast),
        correction_dim(yarn.beta_slow),
    );
    if yarn.truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
    if low == high {
        high += 0.001; // as transformers, to avoid dividing by zero
    }
    (0..dim / 2)
        .map(|i| {
            // torch computes these in f32; so do we, to match its rounding.
            let pos_freq = (theta as f32).powf((2 * i) as f32 / dim as f32);
            let extrapolation = 1.0 / pos_freq;
            let interpolation = 1.0 / (yarn.factor as f32 * pos_freq);
            let ramp = (((i as f64 - low) / (high - low)).clamp(0.0, 1.0)) as f32;
            let extrapolation_factor = 1.0 - ramp;
            interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
        })
        .collect()
}

impl RotaryEmbedding {
    /// Builds the tables for `max_positions` positions from the config's theta and scaling.
    pub fn new(
        cfg: &ModelConfig,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let plain = |factor: f64| -> Vec<f32> {
            // inv_freq is rounded to f32 as transformers keeps it; the angle is then taken in f32.
            (0..half)
                .map(|i| {
                    (1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64) / factor)
                        as f32
                })
                .collect()
        };
        let (inv_freq, attention_factor) = match &cfg.rope_scaling {
            RopeScaling::None => (plain(1.0), 1.0f32),
            RopeScaling::Linear { factor } => (plain(*factor), 1.0),
            RopeScaling::Yarn(yarn) => (
                yarn_inv_freq(cfg.rope_theta, cfg.head_dim, yarn),
                yarn.cos_sin_factor() as f32,
            ),
        };
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for &f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos() * attention_factor);
                sin.push(angle.sin() * attention_factor);
            }
        }
        let build = |v: Vec<f32>| -> Result<Tensor> {
            Tensor::from_vec(v, (max_positions, half), device)
                .and_then(|t| t.to_dtype(dtype))
                .map_err(|e| EmberError::Tensor(e.to_string()))
        };
        let interleaved = cfg.deepseek.as_ref().is_some_and(|ds| ds.rope_interleave);
        let deinterleave = interleaved
            .then(|| {
                let order: Vec<u32> = (0..half as u32)
                    .map(|i| 2 * i)
                    .chain((0..half as u32).map(|i| 2 * i + 1))
                    .collect();
                Tensor::new(order, device)
            })
            .transpose()
            .map_err(|e| EmberError::Tensor(e.to_string()))?;
        Ok(Self {
            cos: build(cos)?,
            sin: build(sin)?,
            deinterleave,
            kernels: LayerKernels::default(),
            calls: Arc::default(),
        })
    }

    /// The same tables, rotated by `kernels` (ember's rotary kernel reads interleaved pairs in
    /// place), its calls counted in `calls`.
    pub fn with_kernels(self, kernels: LayerKernels, calls: Arc<KernelCalls>) -> Self {
        Self {
            kernels,
            calls,
            ..self
        }
    }

    /// The cos/sin rows of the given positions (a u32 `[tokens]` tensor), picked once per step.
    pub fn select(&self, positions: &Tensor) -> candle_core::Result<RopeRows> {
        Ok(RopeRows {
            cos: self.cos.index_select(positions, 0)?,
            sin: self.sin.index_select(positions, 0)?,
            deinterleave: self.deinterleave.clone(),
            kernels: self.kernels,
            calls: self.calls.clone(),
        })
    }
}

/// cos/sin rows `[tokens, head_dim / 2]` for the tokens of one step.
pub struct RopeRows {
    cos: Tensor,
    sin: Tensor,
    deinterleave: Option<Tensor>,
    kernels: LayerKernels,
    calls: Arc<KernelCalls>,
}

impl RopeRows {
    /// Rotates `x` of shape `[tokens, heads, head_dim]`. Interleaved pairs `(x0, x1), …` are
    /// first gathered as `[x0, x2, …, x1, x3, …]`, so the output is in rotate-half layout, as
    /// transformers' `apply_rotary_pos_emb_interleave` returns it (queries and keys alike).
    pub fn apply(&self, x: &Tensor) -> TensorResult {
        if kernel_ops::serves(self.kernels, x.dtype()) && self.cos.dtype() == x.dtype() {
            self.calls.count(Kernel::Rotary);
            return kernel_ops::rotary_rows(x, &self.cos, &self.sin, self.deinterleave.is_some());
        }
        let x = match &self.deinterleave {
            Some(order) => x.contiguous()?.index_select(order, 2)?,
            None => x.clone(),
        };
        candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, &self.cos, &self.sin)?
            .squeeze(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_frequencies_and_attention_factor_match_transformers() {
        // transformers 5 `_compute_yarn_parameters` for dim 16, theta 1e4, factor 40, original
        // 4096, beta 32/1, mscale 1, mscale_all_dim 0.8 (values printed by the venv's torch).
        let yarn = YarnScaling {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: Some(1.0),
            mscale_all_dim: Some(0.8),
            attention_factor: None,
            truncate: true,
        };
        let expected = [
            1.0,
            0.316_227_76,
            0.1,
            0.023_914_725,
            0.005_124_999_7,
            0.000_849_862_2,
            2.5e-5,
            7.905_694_5e-6,
        ];
        for (got, want) in yarn_inv_freq(10_000.0, 16, &yarn).iter().zip(expected) {
            assert!((got / want - 1.0).abs() < 1e-6, "{got} vs {want}");
        }
        assert!((yarn.cos_sin_factor() - 1.056_966_256_753_127_5).abs() < 1e-12);
    }

    #[test]
    fn interleaved_pairs_rotate_like_transformers() {
        // One head of 4 dims at position 1 with inv_freq [1, 0.01]: pairs (x0,x1) and (x2,x3)
        // rotate by 1 and 0.01 rad, output laid out as [x0', x2', x1', x3'].
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type":"deepseek_v3","vocab_size":8,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":1,"kv_lora_rank":4,"q_lora_rank":null,
            "qk_nope_head_dim":2,"qk_rope_head_dim":4,"v_head_dim":2,"n_routed_experts":4,
            "num_experts_per_tok":2,"moe_intermediate_size":4,"rope_theta":10000.0}"#,
        )
        .unwrap();
        let rope = RotaryEmbedding::new(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
        let rows = rope
            .select(&Tensor::new(&[1u32], &Device::Cpu).unwrap())
            .unwrap();
        let x = Tensor::new(&[[[1f32, 2.0, 3.0, 4.0]]], &Device::Cpu).unwrap();
        let got = rows
            .apply(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (c1, s1, c2, s2) = (1f32.cos(), 1f32.sin(), 0.01f32.cos(), 0.01f32.sin());
        let want = [
            c1 - 2.0 * s1,
            3.0 * c2 - 4.0 * s2,
            2.0 * c1 + s1,
            4.0 * c2 + 3.0 * s2,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    /// The CUDA kernel's CPU reference (ember-kernels' `rotary_embedding`) rotates as this module
    /// does, on these tables, for rotate-half, YaRN and interleaved checkpoints; so the kernel,
    /// tested against that reference, can stand in for `RopeRows::apply`. Tolerance 1e-6 (the
    /// same f32 products; candle's CPU rope may contract them differently).
    #[test]
    fn kernel_reference_rotates_as_rope_rows() {
        use ember_kernels::rotary::{rotary_embedding, RotaryShape};
        let qwen = r#"{"model_type":"qwen3","vocab_size":8,"hidden_size":16,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":8,
            "rope_theta":1000000.0}"#;
        let deepseek_yarn = r#"{"model_type":"deepseek_v3","vocab_size":8,"hidden_size":8,
            "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"kv_lora_rank":4,
            "q_lora_rank":null,"qk_nope_head_dim":2,"qk_rope_head_dim":8,"v_head_dim":2,
            "n_routed_experts":4,"num_experts_per_tok":2,"moe_intermediate_size":4,
            "rope_theta":10000.0,"rope_scaling":{"type":"yarn","factor":40.0,
            "original_max_position_embeddings":16,"beta_fast":32.0,"beta_slow":1.0,"mscale":1.0,
            "mscale_all_dim":1.0}}"#;
        let mut seed = 0x2545_f491_u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
        };
        for (json, interleaved) in [(qwen, false), (deepseek_yarn, true)] {
            let cfg = ModelConfig::from_json_str(json).unwrap();
            assert_eq!(
                matches!(cfg.rope_scaling, RopeScaling::Yarn(_)),
                interleaved
            );
            let rope = RotaryEmbedding::new(&cfg, 64, DType::F32, &Device::Cpu).unwrap();
            let (heads, head_dim) = (2, cfg.head_dim);
            let positions = [0u32, 63, 5, 17, 40];
            let x: Vec<f32> = (0..positions.len() * heads * head_dim)
                .map(|_| next())
                .collect();
            let xt =
                Tensor::from_slice(&x, (positions.len(), heads, head_dim), &Device::Cpu).unwrap();
            let rows = rope
                .select(&Tensor::new(&positions[..], &Device::Cpu).unwrap())
                .unwrap();
            let want = rows.apply(&xt).unwrap().flatten_all().unwrap();
            let want = want.to_vec1::<f32>().unwrap();
            let table = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let shape = RotaryShape {
                heads,
                head_dim,
                interleaved,
            };
            let mut got = vec![0f32; x.len()];
            rotary_embedding(
                &x,
                &positions,
                &table(&rope.cos),
                &table(&rope.sin),
                &shape,
                &mut got,
            )
            .unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-6, "{json}: element {i}: {g} vs {w}");
            }
        }
    }
}
