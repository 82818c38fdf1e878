//! Loading a PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`) for the
//! projections of a base model, fused transformers-5 experts split per expert.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use ember_core::{EmberError, Result};
use serde::Deserialize;

use crate::lora::{LoraFactors, LoraTargets};
use crate::TensorResult;

/// The fields of `adapter_config.json` that decide how an adapter is applied.
#[derive(Debug, Deserialize)]
struct AdapterConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    target_parameters: Option<Vec<String>>,
    #[serde(default)]
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

impl AdapterConfig {
    /// `lora_alpha` of the module at `path`: the first `alpha_pattern` key matching the end of the
    /// path on a dot boundary (PEFT's `re.match(rf"(.*\.)?({key})$", path)`), else the global one.
    fn alpha_of(&self, path: &str) -> Result<f64> {
        for (pattern, value) in &self.alpha_pattern {
            if pattern_matches(pattern, path)? {
                return value.as_f64().ok_or_else(|| {
                    EmberError::AdapterLoad(format!(
                        "alpha_pattern `{pattern}` is not a number: {value}"
                    ))
                });
            }
        }
        Ok(self.lora_alpha)
    }

    /// `r` the config gives the module at `path` (used only to check the tensors agree).
    fn rank_of(&self, path: &str) -> Result<usize> {
        for (pattern, value) in &self.rank_pattern {
            if pattern_matches(pattern, path)? {
                return value.as_u64().map(|r| r as usize).ok_or_else(|| {
                    EmberError::AdapterLoad(format!(
                        "rank_pattern `{pattern}` is not an integer: {value}"
                    ))
                });
            }
        }
        Ok(self.r)
    }

    fn scaling(&self, path: &str, rank: usize) -> Result<f64> {
        let alpha = self.alpha_of(path)?;
        Ok(if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        })
    }
}

fn pattern_matches(pattern: &str, path: &str) -> Result<bool> {
    let re = regex::Regex::new(&format!("^(?:.*\\.)?(?:{pattern})$")).map_err(|e| {
        EmberError::AdapterLoad(format!("invalid rank/alpha pattern `{pattern}`: {e}"))
    })?;
    Ok(re.is_match(path))
}

/// A PEFT LoRA adapter resident in memory, in the base model's dtype and on its device.
#[derive(Debug)]
pub struct LoraAdapter {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) modules: HashMap<String, LoraFactors>,
    /// Every module path and each of its dot-separated prefixes (`model.layers.3.mlp.experts`
    /// of `model.layers.3.mlp.experts.7.up_proj`): [`LoraRows::adapts_under`]'s lookup.
    pub(crate) prefixes: HashSet<String>,
    pub(crate) max_rank: usize,
    pub(crate) num_parameters: usize,
}

fn invalid(dir: &Path, what: impl std::fmt::Display) -> EmberError {
    EmberError::AdapterLoad(format!("LoRA adapter {}: {what}", dir.display()))
}

/// Each module path and its dot-separated prefixes.
pub(crate) fn module_prefixes(modules: &HashMap<String, LoraFactors>) -> HashSet<String> {
    let mut prefixes = HashSet::new();
    for path in modules.keys() {
        prefixes.extend(path.match_indices('.').map(|(i, _)| path[..i].to_string()));
        prefixes.insert(path.clone());
    }
    prefixes
}

/// Which part of a tensor key names the module, and whether it is LoRA's A or B.
fn split_key(key: &str) -> Option<(&str, bool)> {
    let path = key.strip_prefix("base_model.model.").unwrap_or(key);
    let path = path.strip_suffix(".weight").unwrap_or(path);
    let path = path.strip_suffix(".default").unwrap_or(path);
    if let Some(module) = path.strip_suffix(".lora_A") {
        Some((module, true))
    } else {
        path.strip_suffix(".lora_B").map(|module| (module, false))
    }
}

impl LoraAdapter {
    /// Reads `adapter_config.json` and `adapter_model.safetensors` from `dir`, checks every tensor
    /// against the model's `targets`, and converts the factors to `dtype` on `device`.
    /// Unsupported features (DoRA, LoRA biases, `modules_to_save`, embedding or lm_head adapters)
    /// are refused with an error naming them.
    pub fn load(
        dir: &Path,
        name: &str,
        id: u64,
        targets: &LoraTargets,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| invalid(dir, format!("cannot read adapter_config.json: {e}")))?;
        let config: AdapterConfig = serde_json::from_str(&text)
            .map_err(|e| invalid(dir, format!("adapter_config.json: {e}")))?;
        if let Some(kind) = config.peft_type.as_deref().filter(|k| *k != "LORA") {
            return Err(invalid(
                dir,
                format!("peft_type {kind} is not supported (only LORA)"),
            ));
        }
        if config.use_dora {
            return Err(invalid(dir, "DoRA (use_dora: true) is not supported"));
        }
        if config.fan_in_fan_out {
            return Err(invalid(
                dir,
                "fan_in_fan_out: true (GPT-2 Conv1D layout) is not supported",
            ));
        }
        if let Some(bias) = config.bias.as_deref().filter(|b| *b != "none") {
            return Err(invalid(
                dir,
                format!("LoRA biases (bias: {bias}) are not supported"),
            ));
        }
        if let Some(modules) = config.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
            return Err(invalid(
                dir,
                format!("modules_to_save ({modules:?}) is not supported: only low-rank adapters are served"),
            ));
        }
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.is_file() {
            return Err(invalid(dir, "adapter_model.safetensors is missing"));
        }
        // SAFETY: mapped read-only and copied into owned tensors before this function returns.
        let file = unsafe { MmapedSafetensors::new(&weights_path) }
            .map_err(|e| invalid(dir, format!("adapter_model.safetensors: {e}")))?;

        let mut pairs: BTreeMap<String, [Option<Tensor>; 2]> = BTreeMap::new();
        for (key, _) in file.tensors() {
            let Some((module, is_a)) = split_key(&key) else {
                if key.contains("lora_embedding") {
                    return Err(invalid(
                        dir,
                        "LoRA on embeddings (embed_tokens) is not supported",
                    ));
                }
                return Err(invalid(
                    dir,
                    format!("`{key}` is not a LoRA A/B weight (DoRA, bias and saved modules are not supported)"),
                ));
            };
            let tensor = file
                .load(&key, &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| invalid(dir, format!("`{key}`: {e}")))?;
            pairs.entry(module.to_string()).or_default()[usize::from(!is_a)] = Some(tensor);
        }
        if pairs.is_empty() {
            return Err(invalid(
                dir,
                "adapter_model.safetensors holds no LoRA weights",
            ));
        }

        let mut modules = HashMap::new();
        let mut add = |path: String, a: Tensor, b: Tensor, scaling: f64| -> Result<()> {
            let factors = (|| -> TensorResult<LoraFactors> {
                Ok(LoraFactors::new(
                    a.t()?.contiguous()?.to_dtype(dtype)?.to_device(device)?,
                    (b.t()? * scaling)?
                        .contiguous()?
                        .to_dtype(dtype)?
                        .to_device(device)?,
                ))
            })()
            .map_err(|e| invalid(dir, format!("{path}: {e}")))?;
            modules.insert(path, factors);
            Ok(())
        };
        let fused = fused_expert_params(&config, &pairs);
        for (module, [a, b]) in pairs {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(invalid(
                    dir,
                    format!("`{module}` has lora_A or lora_B but not both"),
                ));
            };
            let dims = |t: &Tensor| {
                t.dims2()
                    .map_err(|e| invalid(dir, format!("{module}: {e}")))
            };
            let ((r, a_in), (b_out, b_r)) = (dims(&a)?, dims(&b)?);
            if let Some((experts_path, param)) = fused.get(&module) {
                let Some(&num_experts) = targets.experts.get(experts_path.as_str()) else {
                    return Err(invalid(
                        dir,
                        format!("`{module}`: this model has no routed experts at `{experts_path}`"),
                    ));
                };
                if r % num_experts != 0 || b_r != r {
                    return Err(invalid(
                        dir,
                        format!("{module}: fused expert factors {a:?}/{b:?} do not split over {num_experts} experts"),
                    ));
                }
                let rank = r / num_experts;
                let scaling = config.scaling(&format!("{experts_path}.{param}"), rank)?;
                split_fused_experts(experts_path, param, num_experts, rank, &a, &b, targets)
                    .map_err(|e| invalid(dir, e))?
                    .into_iter()
                    .try_for_each(|(path, a, b)| add(path, a, b, scaling))?;
                continue;
            }
            let Some([in_dim, out_dim]) = targets.dims(&module) else {
                let leaf = module.rsplit('.').next().unwrap_or(&module);
                let why = match leaf {
                    "lm_head" | "embed_tokens" => format!("LoRA on {leaf} is not supported"),
                    _ => format!(
                        "module `{module}` is not a projection of this model that LoRA can adapt"
                    ),
                };
                return Err(invalid(dir, why));
            };
            if a_in != in_dim || b_out != out_dim || b_r != r {
                return Err(invalid(
                    dir,
                    format!(
                        "{module}: lora_A {:?} / lora_B {:?} do not fit the layer's [in {in_dim}, out {out_dim}] (wrong base model?)",
                        a.dims(),
                        b.dims()
                    ),
                ));
            }
            let configured = config.rank_of(&module)?;
            if configured != r {
                return Err(invalid(
                    dir,
                    format!("{module}: lora_A has rank {r} but the config says {configured}"),
                ));
            }
            let scaling = config.scaling(&module, r)?;
            add(module, a, b, scaling)?;
        }
        let max_rank = modules.values().map(LoraFactors::rank).max().unwrap_or(0);
        let num_parameters = modules
            .values()
            .map(|f| f.a_t.elem_count() + f.b_t.elem_count())
            .sum();
        Ok(Self {
            id,
            name: name.to_string(),
            prefixes: module_prefixes(&modules),
            modules,
            max_rank,
            num_parameters,
        })
    }

    /// The adapter's number, unique among the adapters an engine has registered (never 0,
    /// which is the base model in prefix-cache keys).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The name requests select it by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The largest rank of any of its projections.
    pub fn max_rank(&self) -> usize {
        self.max_rank
    }

    /// Number of values in its factors.
    pub fn num_parameters(&self) -> usize {
        self.num_parameters
    }

    /// Number of adapted projections (routed experts counted one by one).
    pub fn num_modules(&self) -> usize {
        self.modules.len()
    }

    /// The factors of the projection at `path`, if the adapter adapts it.
    pub fn factors(&self, path: &str) -> Option<&LoraFactors> {
        self.modules.get(path)
    }
}

/// For transformers-5 fused experts (`target_parameters`), which module keys hold which parameter:
/// `<experts>.base_layer` is the first targeted parameter and `<experts>` the last (PEFT nests
/// one wrapper per parameter, the last outermost). Returns module key → (experts path, param).
fn fused_expert_params(
    config: &AdapterConfig,
    pairs: &BTreeMap<String, [Option<Tensor>; 2]>,
) -> HashMap<String, (String, String)> {
    let params: Vec<&str> = config
        .target_parameters
        .iter()
        .flatten()
        .filter_map(|p| p.rsplit('.').next())
        .filter(|p| matches!(*p, "gate_up_proj" | "down_proj"))
        .collect();
    let mut out = HashMap::new();
    let Some((&outer, inner)) = params.split_last() else {
        return out;
    };
    for module in pairs.keys() {
        if let Some(experts) = module.strip_suffix(".base_layer") {
            if experts.ends_with(".experts") {
                if let Some(&first) = inner.first() {
                    out.insert(module.clone(), (experts.to_string(), first.to_string()));
                }
            }
        } else if module.ends_with(".experts") {
            out.insert(module.clone(), (module.clone(), outer.to_string()));
        }
    }
    out
}

/// Splits a fused expert adapter (`A [r·E, in]`, `B [out, r·E]`, B's columns rank-major) into
/// per-expert `(path, A_e [r, in], B_e [out, r])`; `gate_up_proj`'s B is split into gate and up
/// halves that share `A_e`.
fn split_fused_experts(
    experts_path: &str,
    param: &str,
    num_experts: usize,
    rank: usize,
    a: &Tensor,
    b: &Tensor,
    targets: &LoraTargets,
) -> std::result::Result<Vec<(String, Tensor, Tensor)>, String> {
    let gate_dims = targets.dims(&format!("{experts_path}.0.gate_proj"));
    let down_dims = targets.dims(&format!("{experts_path}.0.down_proj"));
    let (Some([hidden, inter]), Some(_)) = (gate_dims, down_dims) else {
        return Err(format!(
            "`{experts_path}` has no routed experts in this model"
        ));
    };
    let (in_dim, out_dim) = match param {
        "gate_up_proj" => (hidden, 2 * inter),
        _ => (inter, hidden),
    };
    if a.dims()[1] != in_dim || b.dims()[0] != out_dim {
        return Err(format!(
            "{experts_path}.{param}: factors {:?}/{:?} do not fit experts of [in {in_dim}, out {out_dim}]",
            a.dims(),
            b.dims()
        ));
    }
    let split = || -> TensorResult<Vec<(String, Tensor, Tensor)>> {
        // B [out, r·E] with column k·E + e → [out, r, E].
        let b = b.reshape((out_dim, rank, num_experts))?;
        let mut out = Vec::new();
        for e in 0..num_experts {
            let a_e = a.narrow(0, e * rank, rank)?;
            let b_e = b.narrow(2, e, 1)?.squeeze(2)?;
            if param == "gate_up_proj" {
                out.push((
                    format!("{experts_path}.{e}.gate_proj"),
                    a_e.clone(),
                    b_e.narrow(0, 0, inter)?,
                ));
                out.push((
                    format!("{experts_path}.{e}.up_proj"),
                    a_e,
                    b_e.narrow(0, inter, inter)?,
                ));
            } else {
                out.push((format!("{experts_path}.{e}.down_proj"), a_e, b_e));
            }
        }
        Ok(out)
    };
    split().map_err(|e| format!("{experts_path}.{param}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_dotted_suffixes_as_peft_does() {
        assert!(pattern_matches("layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj").unwrap());
        assert!(
            !pattern_matches("layers.1.mlp.down_proj", "model.layers.11.mlp.down_proj").unwrap()
        );
        assert!(!pattern_matches("1.mlp.down_proj", "model.layers.11.mlp.down_proj").unwrap());
        assert!(pattern_matches(
            "mlp.experts.down_proj",
            "model.layers.0.mlp.experts.down_proj"
        )
        .unwrap());
        assert!(pattern_matches(".*q_proj", "model.layers.0.self_attn.q_proj").unwrap());
        assert!(pattern_matches("(", "x").is_err());
    }

    #[test]
    fn keys_name_their_module_and_factor() {
        assert_eq!(
            split_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some(("model.layers.0.self_attn.q_proj", true))
        );
        assert_eq!(
            split_key("base_model.model.model.layers.0.mlp.experts.lora_B.default.weight"),
            Some(("model.layers.0.mlp.experts", false))
        );
        assert_eq!(split_key("base_model.model.lm_head.weight"), None);
    }
}
