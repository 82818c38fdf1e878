//! Model configuration parsed from a Hugging Face `config.json`.
//!
//! Accepts both the older key names (`rope_theta`, `rope_scaling`, `torch_dtype`, `num_experts`)
//! and the transformers-5 ones (`rope_parameters`, `dtype`, `num_local_experts`).

use serde::Deserialize;
use serde_json::Value;

use crate::error::{EmberError, Result};
use crate::quantization::{
    parse_quantization_config, parse_quantized_modules, QuantizedModules, WeightQuantization,
};

mod deepseek;
mod rope;

use deepseek::parse_deepseek;
pub use deepseek::{DeepseekConfig, ScoringFunc, TopkMethod};
use rope::parse_rope;
pub use rope::{yarn_get_mscale, RopeScaling, YarnScaling};

/// The model families ember runs, chosen from `model_type` / `architectures`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// Dense Qwen3 (`model_type: qwen3`).
    Qwen3,
    /// Qwen3 Mixture-of-Experts (`model_type: qwen3_moe`).
    Qwen3Moe,
    /// The DeepSeek MLA family: DeepSeek-V3 / V3.1 and Kimi K2 (`model_type: deepseek_v3` or
    /// `kimi_k2`; sigmoid group-limited routing) and DeepSeek-V2 / V2-Lite (`deepseek_v2`; softmax
    /// greedy or group-limited greedy routing). MLA attention, shared experts.
    DeepseekV3,
}

impl ModelFamily {
    /// Picks the family from `model_type`, falling back to the first known entry of `architectures`.
    pub fn detect(model_type: Option<&str>, architectures: &[String]) -> Result<Self> {
        let from_type = |t: &str| match t {
            "qwen3" => Some(Self::Qwen3),
            "qwen3_moe" => Some(Self::Qwen3Moe),
            "deepseek_v2" | "deepseek_v3" | "kimi_k2" => Some(Self::DeepseekV3),
            _ => None,
        };
        let from_arch = |a: &str| match a {
            // `Qwen3Model`: a checkpoint saved without the LM head (embedding models).
            "Qwen3ForCausalLM" | "Qwen3Model" => Some(Self::Qwen3),
            "Qwen3MoeForCausalLM" => Some(Self::Qwen3Moe),
            "DeepseekV2ForCausalLM" | "DeepseekV3ForCausalLM" => Some(Self::DeepseekV3),
            _ => None,
        };
        if let Some(family) = model_type.and_then(from_type) {
            return Ok(family);
        }
        if let Some(family) = architectures.iter().find_map(|a| from_arch(a)) {
            return Ok(family);
        }
        Err(EmberError::Config(format!(
            "unsupported model_type {:?} (architectures {:?}); ember supports qwen3, qwen3_moe, deepseek_v2, deepseek_v3 and kimi_k2",
            model_type.unwrap_or("<missing>"),
            architectures
        )))
    }

    /// The `model_type` string of this family.
    pub fn model_type(&self) -> &'static str {
        match self {
            Self::Qwen3 => "qwen3",
            Self::Qwen3Moe => "qwen3_moe",
            Self::DeepseekV3 => "deepseek_v3",
        }
    }
}

/// Mixture-of-Experts settings of a Qwen3-MoE style model.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Number of routed experts.
    pub num_experts: usize,
    /// Experts chosen per token.
    pub num_experts_per_tok: usize,
    /// Intermediate size of each expert's MLP.
    pub moe_intermediate_size: usize,
    /// Every `decoder_sparse_step`-th layer is sparse (counting from 1).
    pub decoder_sparse_step: usize,
    /// Layers that stay dense regardless of `decoder_sparse_step`.
    pub mlp_only_layers: Vec<usize>,
    /// Renormalise the chosen experts' softmax weights to sum to one.
    pub norm_topk_prob: bool,
}

/// A validated model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Family the weights belong to.
    pub family: ModelFamily,
    /// `architectures` as written in config.json.
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Intermediate size of dense MLP layers.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    /// Weight dtype named by the checkpoint (`torch_dtype` or `dtype`), if any.
    pub torch_dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids named in config.json (generation_config.json may add more).
    pub eos_token_ids: Vec<u32>,
    /// Present for MoE families.
    pub moe: Option<MoeConfig>,
    /// Present for the DeepSeek-V3 family.
    pub deepseek: Option<DeepseekConfig>,
    /// How the checkpoint stores its quantized linear weights (`quantization_config`), if it does.
    pub quantization: Option<WeightQuantization>,
    /// Which linear modules it stores quantized (the config's targets and ignore list).
    pub quantized_modules: QuantizedModules,
}

/// config.json as written on disk; every key optional so that errors can name what is missing.
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    attention_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    num_experts: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    decoder_sparse_step: Option<usize>,
    #[serde(default)]
    mlp_only_layers: Vec<usize>,
    norm_topk_prob: Option<bool>,
    q_lora_rank: Option<usize>,
    kv_lora_rank: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    first_k_dense_replace: Option<usize>,
    moe_layer_freq: Option<usize>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    topk_method: Option<String>,
    scoring_func: Option<String>,
    routed_scaling_factor: Option<f64>,
    rope_interleave: Option<bool>,
    quantization_config: Option<Value>,
}

fn need<T>(value: Option<T>, key: &str) -> Result<T> {
    value.ok_or_else(|| EmberError::Config(format!("config.json is missing `{key}`")))
}

/// Reads a token id or a list of token ids (`eos_token_id` may be either).
pub fn token_ids_from_json(value: &Value) -> Vec<u32> {
    match value {
        Value::Number(n) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// Parses and validates config.json text.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| EmberError::Config(format!("config.json is not valid: {e}")))?;
        let family = ModelFamily::detect(raw.model_type.as_deref(), &raw.architectures)?;
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 {
            return Err(EmberError::Config(
                "num_attention_heads and num_key_value_heads must be positive".into(),
            ));
        }
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(EmberError::Config(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let deepseek = match family {
            ModelFamily::DeepseekV3 => Some(parse_deepseek(&raw)?),
            _ => None,
        };
        // transformers sets DeepSeek's head_dim to the rotary width (what RoPE tables span).
        let head_dim = match &deepseek {
            Some(ds) => ds.qk_rope_head_dim,
            None => raw.head_dim.unwrap_or(hidden_size / num_attention_heads),
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(EmberError::Config(format!(
                "head_dim {head_dim} must be even and positive for rotary embeddings"
            )));
        }
        let (rope_theta, rope_scaling) = parse_rope(&raw)?;
        let moe = match family {
            ModelFamily::Qwen3 | ModelFamily::DeepseekV3 => None,
            ModelFamily::Qwen3Moe => {
                let num_experts = need(raw.num_experts.or(raw.num_local_experts), "num_experts")?;
                let num_experts_per_tok = need(raw.num_experts_per_tok, "num_experts_per_tok")?;
                if num_experts_per_tok == 0 || num_experts_per_tok > num_experts {
                    return Err(EmberError::Config(format!(
                        "num_experts_per_tok {num_experts_per_tok} must be between 1 and num_experts {num_experts}"
                    )));
                }
                Some(MoeConfig {
                    num_experts,
                    num_experts_per_tok,
                    moe_intermediate_size: need(
                        raw.moe_intermediate_size,
                        "moe_intermediate_size",
                    )?,
                    decoder_sparse_step: raw.decoder_sparse_step.unwrap_or(1).max(1),
                    mlp_only_layers: raw.mlp_only_layers.clone(),
                    norm_topk_prob: raw.norm_topk_prob.unwrap_or(false),
                })
            }
        };
        Ok(Self {
            family,
            architectures: raw.architectures.clone(),
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(32_768),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            attention_bias: raw.attention_bias.unwrap_or(false),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            torch_dtype: raw.dtype.clone().or(raw.torch_dtype.clone()),
            bos_token_id: raw
                .bos_token_id
                .as_ref()
                .and_then(|v| token_ids_from_json(v).first().copied()),
            eos_token_ids: raw
                .eos_token_id
                .as_ref()
                .map(token_ids_from_json)
                .unwrap_or_default(),
            moe,
            deepseek,
            quantization: parse_quantization_config(raw.quantization_config.as_ref())?,
            quantized_modules: parse_quantized_modules(raw.quantization_config.as_ref())?,
        })
    }

    /// Whether decoder layer `layer_idx` uses the MoE block (Qwen3-MoE's or DeepSeek's rule).
    pub fn is_moe_layer(&self, layer_idx: usize) -> bool {
        if let Some(ds) = &self.deepseek {
            return ds.n_routed_experts > 0
                && layer_idx >= ds.first_k_dense_replace
                && layer_idx.is_multiple_of(ds.moe_layer_freq);
        }
        match &self.moe {
            None => false,
            Some(moe) => {
                !moe.mlp_only_layers.contains(&layer_idx)
                    && moe.num_experts > 0
                    && (layer_idx + 1).is_multiple_of(moe.decoder_sparse_step)
            }
        }
    }

    /// Widths of one token's cached K row and V row in a layer. Grouped-query attention caches
    /// `kv_heads * head_dim` each; MLA caches the normalised latent (`kv_lora_rank`) as "K" and the
    /// rotated shared rope key (`qk_rope_head_dim`) as "V", both shared by every head.
    pub fn kv_cache_row_widths(&self) -> (usize, usize) {
        match &self.deepseek {
            Some(ds) => (ds.kv_lora_rank, ds.qk_rope_head_dim),
            None => {
                let w = self.num_key_value_heads * self.head_dim;
                (w, w)
            }
        }
    }

    fn attention_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        if let Some(ds) = &self.deepseek {
            let n = self.num_attention_heads as u64;
            let qk = ds.qk_head_dim() as u64;
            let kvr = ds.kv_lora_rank as u64;
            let q = match ds.q_lora_rank {
                Some(r) => h * r as u64 + r as u64 + r as u64 * n * qk,
                None => h * n * qk,
            };
            let kv = h * (kvr + ds.qk_rope_head_dim as u64)
                + kvr
                + kvr * n * (ds.qk_nope_head_dim + ds.v_head_dim) as u64;
            return q + kv + n * ds.v_head_dim as u64 * h;
        }
        let q = (self.num_attention_heads * self.head_dim) as u64;
        let kv = (self.num_key_value_heads * self.head_dim) as u64;
        let bias = if self.attention_bias {
            q + 2 * kv + h
        } else {
            0
        };
        h * q + 2 * h * kv + q * h + bias + 2 * self.head_dim as u64
    }

    /// (routed experts, their intermediate size, experts per token, parameters outside the
    /// routed experts: router, bias, shared experts) of an MoE layer.
    fn moe_shape(&self) -> Option<(u64, u64, u64, u64)> {
        let h = self.hidden_size as u64;
        if let Some(ds) = &self.deepseek {
            let (e, i) = (ds.n_routed_experts as u64, ds.moe_intermediate_size as u64);
            let shared = 3 * h * i * ds.n_shared_experts as u64;
            let bias = if ds.topk_method == TopkMethod::NoauxTc {
                e
            } else {
                0
            };
            return Some((e, i, ds.num_experts_per_tok as u64, e * h + bias + shared));
        }
        self.moe.as_ref().map(|moe| {
            let e = moe.num_experts as u64;
            (
                e,
                moe.moe_intermediate_size as u64,
                moe.num_experts_per_tok as u64,
                e * h,
            )
        })
    }

    /// Total parameter count implied by the shapes (embeddings counted once when tied;
    /// multi-token-prediction layers excluded, as ember never loads them).
    pub fn num_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        let attention = self.attention_parameters();
        let mut total = 0u64;
        for layer in 0..self.num_hidden_layers {
            let mlp = match (self.moe_shape(), self.is_moe_layer(layer)) {
                (Some((e, i, _, other)), true) => e * 3 * h * i + other,
                _ => 3 * h * self.intermediate_size as u64,
            };
            total += attention + mlp + 2 * h;
        }
        let embed = self.vocab_size as u64 * h;
        total + embed + h + if self.tie_word_embeddings { 0 } else { embed }
    }

    /// Weights read per token: every parameter except the routed experts a token does not choose
    /// and the input embedding table (one row of it is read; when tied to the LM head it is read
    /// in full and counts). DeepSeek publishes its "activated parameters" this way (V3: 37B,
    /// V2-Lite: 2.4B); Qwen counts the embedding table too (Qwen3-30B-A3B's 3.3B).
    pub fn num_active_parameters(&self) -> u64 {
        let embed = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size as u64 * self.hidden_size as u64
        };
        let Some((e, i, k, _)) = self.moe_shape() else {
            return self.num_parameters() - embed;
        };
        let idle = (e - k) * 3 * self.hidden_size as u64 * i;
        let moe_layers = (0..self.num_hidden_layers)
            .filter(|&l| self.is_moe_layer(l))
            .count() as u64;
        self.num_parameters() - moe_layers * idle - embed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moe_json(extra: &str) -> String {
        format!(
            r#"{{"model_type":"qwen3_moe","vocab_size":100,"hidden_size":16,"intermediate_size":32,
            "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":8,
            "moe_intermediate_size":8,"num_experts_per_tok":2{extra}}}"#
        )
    }

    #[test]
    fn reads_old_and_new_key_names_alike() {
        let old = ModelConfig::from_json_str(&moe_json(
            r#","num_experts":4,"rope_theta":1000000.0,"torch_dtype":"bfloat16""#,
        ))
        .unwrap();
        let new = ModelConfig::from_json_str(&moe_json(
            r#","num_local_experts":4,"rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"},"dtype":"bfloat16""#,
        ))
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(old.rope_theta, 1_000_000.0);
        assert_eq!(old.moe.as_ref().unwrap().num_experts, 4);
    }

    #[test]
    fn sparse_step_and_mlp_only_layers_pick_dense_layers() {
        let cfg = ModelConfig::from_json_str(&moe_json(
            r#","num_experts":4,"decoder_sparse_step":2,"mlp_only_layers":[3]"#,
        ))
        .unwrap();
        let sparse: Vec<bool> = (0..4).map(|l| cfg.is_moe_layer(l)).collect();
        assert_eq!(sparse, vec![false, true, false, false]);
    }

    #[test]
    fn errors_name_the_problem() {
        let err = ModelConfig::from_json_str(r#"{"model_type":"llama4"}"#).unwrap_err();
        assert!(err.to_string().contains("llama4"), "{err}");
        let err = ModelConfig::from_json_str(&moe_json("")).unwrap_err();
        assert!(err.to_string().contains("num_experts"), "{err}");
        let err = ModelConfig::from_json_str("{not json").unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
    }

    #[test]
    fn eos_may_be_a_list() {
        let cfg = ModelConfig::from_json_str(&moe_json(r#","num_experts":4,"eos_token_id":[7,9]"#))
            .unwrap();
        assert_eq!(cfg.eos_token_ids, vec![7, 9]);
    }

    #[test]
    fn qwen3_30b_a3b_parameter_count() {
        // Shapes of Qwen/Qwen3-30B-A3B: 30.5B total, 3.3B active per the model card, which counts
        // the 0.31B embedding table that ember leaves out of the weights read per token.
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type":"qwen3_moe","vocab_size":151936,"hidden_size":2048,"intermediate_size":6144,
            "num_hidden_layers":48,"num_attention_heads":32,"num_key_value_heads":4,"head_dim":128,
            "moe_intermediate_size":768,"num_experts":128,"num_experts_per_tok":8,"tie_word_embeddings":false}"#,
        )
        .unwrap();
        let total = cfg.num_parameters() as f64 / 1e9;
        let active = cfg.num_active_parameters() as f64 / 1e9;
        assert!((30.4..30.6).contains(&total), "{total}");
        assert!((3.0..3.1).contains(&active), "{active}");
        let embed = 151_936.0 * 2048.0 / 1e9;
        assert!((3.3..3.4).contains(&(active + embed)), "{active}");
    }

    /// config.json of deepseek-ai/DeepSeek-V3 (the keys that shape the model).
    pub(crate) const DEEPSEEK_V3: &str = r#"{"architectures":["DeepseekV3ForCausalLM"],"model_type":"deepseek_v3",
        "vocab_size":129280,"hidden_size":7168,"intermediate_size":18432,"moe_intermediate_size":2048,
        "num_hidden_layers":61,"num_nextn_predict_layers":1,"num_attention_heads":128,"num_key_value_heads":128,
        "n_shared_experts":1,"n_routed_experts":256,"routed_scaling_factor":2.5,"kv_lora_rank":512,
        "q_lora_rank":1536,"qk_rope_head_dim":64,"v_head_dim":128,"qk_nope_head_dim":128,
        "topk_method":"noaux_tc","n_group":8,"topk_group":4,"num_experts_per_tok":8,"moe_layer_freq":1,
        "first_k_dense_replace":3,"norm_topk_prob":true,"scoring_func":"sigmoid","max_position_embeddings":163840,
        "rms_norm_eps":1e-06,"rope_theta":10000,"tie_word_embeddings":false,"torch_dtype":"bfloat16",
        "rope_scaling":{"beta_fast":32,"beta_slow":1,"factor":40,"mscale":1.0,"mscale_all_dim":1.0,
        "original_max_position_embeddings":4096,"type":"yarn"},"bos_token_id":0,"eos_token_id":1}"#;

    /// config.json of moonshotai/Kimi-K2-Instruct (shape keys), in transformers-5 spelling.
    pub(crate) const KIMI_K2: &str = r#"{"architectures":["DeepseekV3ForCausalLM"],"model_type":"kimi_k2",
        "vocab_size":163840,"hidden_size":7168,"intermediate_size":18432,"moe_intermediate_size":2048,
        "num_hidden_layers":61,"num_attention_heads":64,"num_key_value_heads":64,"n_shared_experts":1,
        "n_routed_experts":384,"routed_scaling_factor":2.827,"kv_lora_rank":512,"q_lora_rank":1536,
        "qk_rope_head_dim":64,"v_head_dim":128,"qk_nope_head_dim":128,"topk_method":"noaux_tc","n_group":1,
        "topk_group":1,"num_experts_per_tok":8,"moe_layer_freq":1,"first_k_dense_replace":1,
        "norm_topk_prob":true,"scoring_func":"sigmoid","max_position_embeddings":131072,"rms_norm_eps":1e-06,
        "tie_word_embeddings":false,"dtype":"bfloat16","rope_parameters":{"rope_theta":50000.0,"rope_type":"yarn",
        "beta_fast":1.0,"beta_slow":1.0,"factor":32.0,"mscale":1.0,"mscale_all_dim":1.0,
        "original_max_position_embeddings":4096},"bos_token_id":163584,"eos_token_id":163585}"#;

    /// Whether `ours` rounds to `published` at the precision it is published with (`unit`, the
    /// value of its last digit): "37B" stands for anything in [36.5B, 37.5B).
    fn rounds_to(ours: u64, published: f64, unit: f64) -> bool {
        (ours as f64 - published).abs() <= unit / 2.0
    }

    #[test]
    fn deepseek_v3_and_kimi_k2_parameter_counts_match_the_published_totals() {
        // Exact counts from the shapes (MTP layers excluded; embeddings and lm_head in the totals,
        // the input embedding table out of the active counts). Published: DeepSeek-V3 671B total,
        // 37B activated; Kimi K2 "1T" total (1.04T in its tech report), 32B activated.
        // Relative to the published figures: V3 +0.004% / -1.01%, K2 +2.6% / -0.98%; each is the
        // published figure at the precision it is given in.
        for (json, total, active, published) in [
            (
                DEEPSEEK_V3,
                671_026_419_200u64,
                36_625_618_432u64,
                [(671e9, 1e9), (37e9, 1e9)],
            ),
            (
                KIMI_K2,
                1_026_408_232_448,
                31_687_095_808,
                [(1.0e12, 0.1e12), (32e9, 1e9)],
            ),
        ] {
            let cfg = ModelConfig::from_json_str(json).unwrap();
            assert_eq!(cfg.num_parameters(), total);
            assert_eq!(cfg.num_active_parameters(), active);
            let [(t, t_unit), (a, a_unit)] = published;
            assert!(rounds_to(total, t, t_unit), "total {total}");
            assert!(rounds_to(active, a, a_unit), "active {active}");
        }
    }

    /// config.json of deepseek-ai/DeepSeek-V2-Lite (shape and routing keys).
    const DEEPSEEK_V2_LITE: &str = r#"{"architectures":["DeepseekV2ForCausalLM"],"model_type":"deepseek_v2",
        "vocab_size":102400,"hidden_size":2048,"intermediate_size":10944,"moe_intermediate_size":1408,
        "num_hidden_layers":27,"num_attention_heads":16,"num_key_value_heads":16,"n_shared_experts":2,
        "n_routed_experts":64,"routed_scaling_factor":1.0,"kv_lora_rank":512,"q_lora_rank":null,
        "qk_rope_head_dim":64,"v_head_dim":128,"qk_nope_head_dim":128,"n_group":1,"topk_group":1,
        "num_experts_per_tok":6,"moe_layer_freq":1,"first_k_dense_replace":1,"max_position_embeddings":163840,
        "rms_norm_eps":1e-06,"rope_theta":10000,"tie_word_embeddings":false,"torch_dtype":"bfloat16",
        "rope_scaling":{"beta_fast":32,"beta_slow":1,"factor":40,"mscale":0.707,"mscale_all_dim":0.707,
        "original_max_position_embeddings":4096,"type":"yarn"},"bos_token_id":100000,"eos_token_id":100001}"#;

    #[test]
    fn deepseek_v2_lite_defaults_to_softmax_greedy_routing_without_renormalising() {
        let cfg = ModelConfig::from_json_str(DEEPSEEK_V2_LITE).unwrap();
        assert_eq!(cfg.family, ModelFamily::DeepseekV3);
        let ds = cfg.deepseek.as_ref().unwrap();
        assert_eq!(
            (ds.topk_method, ds.scoring_func, ds.norm_topk_prob),
            (TopkMethod::Greedy, ScoringFunc::Softmax, false)
        );
        assert_eq!(ds.q_lora_rank, None);
        // Published: 15.7B total, 2.4B activated (2.45B here: the "2.4B" is truncated).
        assert_eq!(cfg.num_parameters(), 15_706_484_224);
        assert_eq!(cfg.num_active_parameters(), 2_451_435_008);
        assert!(rounds_to(cfg.num_parameters(), 15.7e9, 0.1e9));
        let v2 = DEEPSEEK_V2_LITE.replace(
            r#""n_group":1,"topk_group":1"#,
            r#""n_group":8,"topk_group":3,"topk_method":"group_limited_greedy""#,
        );
        let ds = ModelConfig::from_json_str(&v2).unwrap().deepseek.unwrap();
        assert_eq!(
            (ds.topk_method, ds.n_group, ds.topk_group),
            (TopkMethod::GroupLimitedGreedy, 8, 3)
        );
        let bad =
            DEEPSEEK_V2_LITE.replace(r#""n_group":1"#, r#""topk_method":"sinkhorn","n_group":1"#);
        let err = ModelConfig::from_json_str(&bad).unwrap_err().to_string();
        assert!(
            err.contains("sinkhorn") && err.contains("group_limited_greedy"),
            "{err}"
        );
    }

    #[test]
    fn deepseek_configs_read_mla_routing_and_yarn() {
        let v3 = ModelConfig::from_json_str(DEEPSEEK_V3).unwrap();
        assert_eq!(v3.family, ModelFamily::DeepseekV3);
        let ds = v3.deepseek.as_ref().unwrap();
        assert_eq!(
            (ds.q_lora_rank, ds.kv_lora_rank, ds.qk_head_dim()),
            (Some(1536), 512, 192)
        );
        assert_eq!(
            (ds.n_group, ds.topk_group, ds.topk_method),
            (8, 4, TopkMethod::NoauxTc)
        );
        assert_eq!(ds.scoring_func, ScoringFunc::Sigmoid);
        assert!(
            ds.rope_interleave,
            "transformers defaults rope_interleave to true"
        );
        assert_eq!(v3.head_dim, 64);
        let RopeScaling::Yarn(yarn) = &v3.rope_scaling else {
            panic!("{:?}", v3.rope_scaling)
        };
        assert_eq!(
            (yarn.factor, yarn.original_max_position_embeddings),
            (40.0, 4096)
        );
        // mscale == mscale_all_dim: cos/sin are left unscaled, the softmax scale takes mscale².
        assert!((yarn.cos_sin_factor() - 1.0).abs() < 1e-12);
        assert_eq!(v3.kv_cache_row_widths(), (512, 64));
        let moe_layers: Vec<bool> = (0..5).map(|l| v3.is_moe_layer(l)).collect();
        assert_eq!(moe_layers, vec![false, false, false, true, true]);

        let k2 = ModelConfig::from_json_str(KIMI_K2).unwrap();
        assert_eq!(k2.family, ModelFamily::DeepseekV3);
        assert_eq!(k2.rope_theta, 50_000.0);
        assert_eq!(k2.deepseek.as_ref().unwrap().n_group, 1);
        let greedy = ModelConfig::from_json_str(
            &DEEPSEEK_V3.replace(r#""topk_method":"noaux_tc""#, r#""topk_method":"greedy""#),
        )
        .unwrap();
        let ds = greedy.deepseek.unwrap();
        // scoring_func is still sigmoid as written; greedy only changes the selection.
        assert_eq!(
            (ds.topk_method, ds.scoring_func),
            (TopkMethod::Greedy, ScoringFunc::Sigmoid)
        );
        let q_proj = ModelConfig::from_json_str(
            &DEEPSEEK_V3.replace(r#""q_lora_rank":1536"#, r#""q_lora_rank":null"#),
        )
        .unwrap();
        assert_eq!(q_proj.deepseek.unwrap().q_lora_rank, None);
    }

    /// Bytes per token per layer of the latent cache against an expanded per-head K/V cache, bf16.
    #[test]
    fn the_mla_latent_cache_is_71x_smaller_than_expanded_kv_for_deepseek_v3() {
        let cfg = ModelConfig::from_json_str(DEEPSEEK_V3).unwrap();
        let (k, v) = cfg.kv_cache_row_widths();
        let latent_bytes = (k + v) * 2;
        let ds = cfg.deepseek.unwrap();
        let expanded_bytes = cfg.num_attention_heads * (ds.qk_head_dim() + ds.v_head_dim) * 2;
        assert_eq!(latent_bytes, 1_152);
        assert_eq!(expanded_bytes, 81_920);
        assert_eq!(expanded_bytes / latent_bytes, 71);
    }
}
