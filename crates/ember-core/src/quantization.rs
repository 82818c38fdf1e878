//! How a checkpoint stores its linear weights, read from config.json's `quantization_config`,
//! and what `--quantization` asks for. Which tensors are quantized is read from the checkpoint
//! itself (a `weight_packed` or a float8 `weight` next to its scales): the config says how.

use serde_json::Value;

use crate::error::{EmberError, Result};

/// The storage format of a checkpoint's quantized linear weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightQuantization {
    /// float8_e4m3fn with one f32 `weight_scale_inv` per `[rows, cols]` block (DeepSeek's
    /// `quant_method: fp8`, `weight_block_size`).
    Fp8Block([usize; 2]),
    /// compressed-tensors `pack-quantized`: `num_bits`-bit integers packed densely into int32
    /// `weight_packed`, a `weight_scale` per `group_size` input columns (`None`: one per output
    /// channel), a packed `weight_zero_point` unless `symmetric` (W4A16 / W8A16, GPTQ / AWQ-style).
    PackedInt {
        num_bits: u32,
        group_size: Option<usize>,
        symmetric: bool,
    },
    /// NVFP4: e2m1 pairs in uint8, one float8_e4m3fn scale per 16 inputs and an f32 global scale.
    Nvfp4(Nvfp4Layout),
    /// MXFP4: e2m1 pairs in uint8 `weight_packed`, one e8m0 (uint8, bias 127) scale per 32
    /// inputs (compressed-tensors `mxfp4-pack-quantized`).
    Mxfp4,
    /// GPTQ (`quant_method: gptq`, AutoGPTQ / GPTQModel): `qweight` int32 `[in * bits / 32, out]`
    /// packed down the input dimension, `qzeros` int32 `[groups, out * bits / 32]`, `scales`
    /// `[groups, out]` in 16 bits, `g_idx` `[in]` (each input column's group; activation order
    /// permutes it). `v1` (`checkpoint_format: gptq`, the default) stores each packed zero word
    /// less one per field, as GPTQModel's own conversion adds back word-wise; `gptq_v2` does not.
    Gptq {
        bits: u32,
        group_size: Option<usize>,
        v1: bool,
    },
    /// AWQ (`quant_method: awq`, AutoAWQ `version: gemm`): 4-bit `qweight` int32 `[in, out / 8]`
    /// packed along the output dimension in AWQ's interleaved order, `qzeros` `[groups, out / 8]`
    /// packed alike, `scales` `[groups, out]` in float16.
    Awq { group_size: usize },
}

/// Where an NVFP4 checkpoint keeps its global scale, and which way it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nvfp4Layout {
    /// compressed-tensors `nvfp4-pack-quantized`: `weight_packed`, `weight_scale`,
    /// `weight_global_scale`; `w = e2m1 * (scale / global_scale)`.
    CompressedTensors,
    /// NVIDIA ModelOpt (`quant_method: modelopt`, `quant_algo: NVFP4`): `weight` (uint8),
    /// `weight_scale`, `weight_scale_2`; `w = e2m1 * (scale * scale_2)`.
    ModelOpt,
}

impl WeightQuantization {
    /// The `--quantization` name of the format, as vLLM spells it.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Fp8Block(_) => "fp8",
            Self::PackedInt { .. } | Self::Nvfp4(Nvfp4Layout::CompressedTensors) | Self::Mxfp4 => {
                "compressed-tensors"
            }
            Self::Nvfp4(Nvfp4Layout::ModelOpt) => "modelopt",
            Self::Gptq { .. } => "gptq",
            Self::Awq { .. } => "awq",
        }
    }
}

/// Parses `quantization_config`; `None` (or null) is an unquantized checkpoint.
pub fn parse_quantization_config(qc: Option<&Value>) -> Result<Option<WeightQuantization>> {
    let Some(qc) = qc.filter(|q| !q.is_null()) else {
        return Ok(None);
    };
    let method = qc.get("quant_method").and_then(Value::as_str).unwrap_or("");
    match method {
        "fp8" => parse_fp8(qc).map(Some),
        "compressed-tensors" => parse_compressed_tensors(qc).map(Some),
        "modelopt" => parse_modelopt(qc).map(Some),
        "gptq" => parse_gptq(qc).map(Some),
        "awq" => parse_awq(qc).map(Some),
        _ => Err(EmberError::Config(format!(
            "quantization_config quant_method {method:?} is not supported yet; supported: fp8 (block-quantized), \
             compressed-tensors (pack-quantized, nvfp4-pack-quantized, mxfp4-pack-quantized), modelopt (NVFP4), \
             gptq (2/4/8-bit), awq (4-bit gemm)"
        ))),
    }
}

fn parse_fp8(qc: &Value) -> Result<WeightQuantization> {
    if let Some(fmt) = qc.get("fmt").and_then(Value::as_str) {
        if fmt != "e4m3" {
            return Err(EmberError::Config(format!(
                "fp8 format {fmt:?} is not supported; only e4m3 checkpoints load"
            )));
        }
    }
    let block = qc
        .get("weight_block_size")
        .and_then(Value::as_array)
        .map(|b| b.iter().filter_map(Value::as_u64).collect::<Vec<_>>())
        .unwrap_or_default();
    match block.as_slice() {
        [r, c] if *r > 0 && *c > 0 => Ok(WeightQuantization::Fp8Block([*r as usize, *c as usize])),
        _ => Err(EmberError::Config(
            "fp8 quantization_config needs `weight_block_size: [rows, cols]`; per-tensor fp8 checkpoints are not supported yet".into(),
        )),
    }
}

/// `group_size` as GPTQ and AWQ write it: `-1` (or absent for GPTQ) is one group per output
/// channel.
fn group_size_of(qc: &Value, method: &str) -> Result<Option<usize>> {
    match qc.get("group_size").and_then(Value::as_i64) {
        None | Some(-1) => Ok(None),
        Some(g) if g > 0 => Ok(Some(g as usize)),
        Some(g) => Err(EmberError::Config(format!(
            "{method} quantization_config group_size {g} is neither positive nor -1"
        ))),
    }
}

fn parse_gptq(qc: &Value) -> Result<WeightQuantization> {
    let bits = qc.get("bits").and_then(Value::as_u64).unwrap_or(0) as u32;
    if ![2, 4, 8].contains(&bits) {
        return Err(EmberError::Config(format!(
            "gptq quantization_config bits {bits} is not supported; 2, 4 and 8-bit GPTQ load (3-bit packs across words)"
        )));
    }
    let format = qc
        .get("checkpoint_format")
        .and_then(Value::as_str)
        .unwrap_or("gptq");
    let v1 = match format {
        "gptq" => true,
        "gptq_v2" => false,
        other => {
            return Err(EmberError::Config(format!(
                "gptq checkpoint_format {other:?} is not supported; gptq and gptq_v2 load"
            )))
        }
    };
    Ok(WeightQuantization::Gptq {
        bits,
        group_size: group_size_of(qc, "gptq")?,
        v1,
    })
}

fn parse_awq(qc: &Value) -> Result<WeightQuantization> {
    let bits = qc
        .get("bits")
        .or_else(|| qc.get("w_bit"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let version = qc
        .get("version")
        .and_then(Value::as_str)
        .unwrap_or("gemm")
        .to_ascii_lowercase();
    let zero_point = qc
        .get("zero_point")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let group_size = qc
        .get("group_size")
        .or_else(|| qc.get("q_group_size"))
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if bits != 4 || version != "gemm" || !zero_point || group_size <= 0 {
        return Err(EmberError::Config(format!(
            "awq quantization_config (bits {bits}, version {version:?}, zero_point {zero_point}, group_size {group_size}) \
             is not supported; only 4-bit GEMM checkpoints with zero points and a positive group_size load"
        )));
    }
    Ok(WeightQuantization::Awq {
        group_size: group_size as usize,
    })
}

fn parse_modelopt(qc: &Value) -> Result<WeightQuantization> {
    // config.json carries the algorithm at the top level; hf_quant_config.json nests it.
    let algo = qc
        .get("quant_algo")
        .or_else(|| qc.pointer("/quantization/quant_algo"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let group = qc
        .get("group_size")
        .or_else(|| qc.pointer("/quantization/group_size"))
        .and_then(Value::as_u64)
        .unwrap_or(16);
    if algo != "NVFP4" || group != 16 {
        return Err(EmberError::Config(format!(
            "modelopt quant_algo {algo:?} with group_size {group} is not supported; only NVFP4 (group 16) loads"
        )));
    }
    Ok(WeightQuantization::Nvfp4(Nvfp4Layout::ModelOpt))
}

/// One scheme for the whole checkpoint: every config group must agree on the format and the
/// weight arguments (mixed-precision checkpoints are refused, naming the groups).
fn parse_compressed_tensors(qc: &Value) -> Result<WeightQuantization> {
    let groups = qc
        .get("config_groups")
        .and_then(Value::as_object)
        .filter(|g| !g.is_empty())
        .ok_or_else(|| {
            EmberError::Config("compressed-tensors quantization_config has no config_groups".into())
        })?;
    let top_format = qc.get("format").and_then(Value::as_str);
    let mut found: Option<(String, WeightQuantization)> = None;
    for (name, group) in groups {
        let format = group
            .get("format")
            .and_then(Value::as_str)
            .or(top_format)
            .unwrap_or("");
        let scheme = parse_compressed_tensors_group(name, format, group)?;
        match &found {
            Some((first, s)) if *s != scheme => {
                return Err(EmberError::Config(format!(
                    "compressed-tensors config groups {first:?} ({s:?}) and {name:?} ({scheme:?}) differ; \
                     mixed-precision checkpoints are not supported yet"
                )))
            }
            Some(_) => {}
            None => found = Some((name.clone(), scheme)),
        }
    }
    Ok(found.expect("config_groups is not empty").1)
}

fn parse_compressed_tensors_group(
    name: &str,
    format: &str,
    group: &Value,
) -> Result<WeightQuantization> {
    let w = group.get("weights").filter(|w| !w.is_null()).ok_or_else(|| {
        EmberError::Config(format!(
            "compressed-tensors group {name:?} quantizes no weights; only weight quantization is supported"
        ))
    })?;
    let num_bits = w.get("num_bits").and_then(Value::as_u64).unwrap_or(0) as u32;
    let kind = w.get("type").and_then(Value::as_str).unwrap_or("");
    let strategy = w.get("strategy").and_then(Value::as_str).unwrap_or("");
    let group_size = w
        .get("group_size")
        .and_then(Value::as_u64)
        .map(|g| g as usize);
    let symmetric = w.get("symmetric").and_then(Value::as_bool).unwrap_or(true);
    let bad = |why: &str| {
        EmberError::Config(format!(
            "compressed-tensors group {name:?} (format {format:?}, {num_bits}-bit {kind}, strategy {strategy:?}, \
             group_size {group_size:?}): {why}"
        ))
    };
    match format {
        "pack-quantized" => {
            if group.get("input_activations").is_some_and(|a| !a.is_null()) {
                return Err(bad(
                    "activation quantization is not supported; only weight-only (W4A16 / W8A16) pack-quantized loads",
                ));
            }
            // actorder "group" (GPTQ's activation order) stores a `weight_g_idx` column-to-group
            // map beside each weight, which the dequantizer reads; "weight" stores nothing.
            if kind != "int" || !(1..=8).contains(&num_bits) {
                return Err(bad("pack-quantized holds 1-8 bit integers"));
            }
            let group_size = match strategy {
                "group" => match group_size {
                    Some(g) if g > 0 => Some(g),
                    _ => return Err(bad("strategy group needs a positive group_size")),
                },
                "channel" => None,
                _ => return Err(bad("only group and channel strategies are supported")),
            };
            Ok(WeightQuantization::PackedInt {
                num_bits,
                group_size,
                symmetric,
            })
        }
        // Activation scales of W4A4 checkpoints are ignored: the CPU path runs W4A16.
        "nvfp4-pack-quantized" if kind == "float" && num_bits == 4 && group_size == Some(16) => {
            Ok(WeightQuantization::Nvfp4(Nvfp4Layout::CompressedTensors))
        }
        "mxfp4-pack-quantized" if kind == "float" && num_bits == 4 && group_size == Some(32) => {
            Ok(WeightQuantization::Mxfp4)
        }
        "nvfp4-pack-quantized" | "mxfp4-pack-quantized" => Err(bad(
            "nvfp4 needs 4-bit float weights in groups of 16, mxfp4 in groups of 32",
        )),
        _ => Err(bad(
            "supported formats: pack-quantized, nvfp4-pack-quantized, mxfp4-pack-quantized",
        )),
    }
}

/// Which linear modules a checkpoint stores quantized; everything else (embeddings, norms, and
/// the linear modules left out) it stores in 16 bits. A real checkpoint shows it by the tensors
/// it holds; a dummy load (`--load-format dummy`) has only this to go by.
///
/// compressed-tensors quantizes its config groups' `targets` (`Linear`: every linear module)
/// less its `ignore` list; the other methods every linear module less `modules_to_not_convert`
/// (ModelOpt: `ignore` or `exclude_modules`). DeepSeek's `fp8`, GPTQ (without `lm_head: true`)
/// and AWQ never quantize the LM head, and their configs need not say so.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantizedModules {
    /// `None`: every linear module.
    targets: Option<Vec<ModulePattern>>,
    ignore: Vec<ModulePattern>,
}

/// One entry of a `targets` or ignore list, matched against a module's path
/// (`model.layers.0.mlp.gate`): `re:<regex>` matched from the path's start (as compressed-tensors
/// does), a pattern with `*` wildcards matching the whole path (as ModelOpt's), or a module name
/// matching whole dot-separated parts of the path (`lm_head`, `mlp.gate`, `model.layers.0`).
#[derive(Debug, Clone)]
struct ModulePattern {
    entry: String,
    regex: regex::Regex,
}

impl PartialEq for ModulePattern {
    fn eq(&self, other: &Self) -> bool {
        self.entry == other.entry
    }
}

impl ModulePattern {
    fn parse(entry: &str) -> Result<Self> {
        let pattern = if let Some(re) = entry.strip_prefix("re:") {
            format!("^(?:{re})")
        } else if entry.contains('*') {
            let parts: Vec<String> = entry.split('*').map(regex::escape).collect();
            format!("^{}$", parts.join(".*"))
        } else {
            format!(r"(?:^|\.){}(?:$|\.)", regex::escape(entry))
        };
        let regex = regex::Regex::new(&pattern).map_err(|e| {
            EmberError::Config(format!(
                "quantization_config module pattern {entry:?} is not a valid regex: {e}"
            ))
        })?;
        Ok(Self {
            entry: entry.to_string(),
            regex,
        })
    }

    fn matches(&self, module: &str) -> bool {
        self.regex.is_match(module)
    }
}

impl QuantizedModules {
    /// Whether the checkpoint stores the linear module at `path` quantized.
    pub fn quantizes(&self, path: &str) -> bool {
        let targeted = self
            .targets
            .as_ref()
            .is_none_or(|t| t.iter().any(|p| p.matches(path)));
        targeted && !self.ignore.iter().any(|p| p.matches(path))
    }
}

/// Reads which linear modules `quantization_config` quantizes (see [`QuantizedModules`]);
/// absent or null: every one (nothing is quantized then anyway).
pub fn parse_quantized_modules(qc: Option<&Value>) -> Result<QuantizedModules> {
    let Some(qc) = qc.filter(|q| !q.is_null()) else {
        return Ok(QuantizedModules::default());
    };
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    let method = qc.get("quant_method").and_then(Value::as_str).unwrap_or("");
    let mut ignore = match method {
        "compressed-tensors" => strings(qc.get("ignore")),
        "modelopt" => [
            qc.get("ignore"),
            qc.get("exclude_modules"),
            qc.pointer("/quantization/exclude_modules"),
        ]
        .into_iter()
        .flat_map(strings)
        .collect(),
        _ => strings(qc.get("modules_to_not_convert")),
    };
    let lm_head_quantized = method == "gptq" && qc.get("lm_head") == Some(&Value::Bool(true));
    if matches!(method, "fp8" | "gptq" | "awq") && !lm_head_quantized {
        ignore.push("lm_head".into());
    }
    // compressed-tensors' targets name a module class (`Linear`) or modules; a group without
    // targets, or any group targeting `Linear`, covers every linear module.
    let mut targets: Option<Vec<String>> = None;
    if method == "compressed-tensors" {
        let groups = qc.get("config_groups").and_then(Value::as_object);
        let named: Vec<Vec<String>> = groups
            .into_iter()
            .flat_map(|g| g.values())
            .map(|g| strings(g.get("targets")))
            .collect();
        if !named.is_empty()
            && named
                .iter()
                .all(|t| !t.is_empty() && !t.iter().any(|t| t == "Linear"))
        {
            targets = Some(named.concat());
        }
    }
    let patterns = |entries: Vec<String>| -> Result<Vec<ModulePattern>> {
        entries.iter().map(|e| ModulePattern::parse(e)).collect()
    };
    Ok(QuantizedModules {
        targets: targets.map(patterns).transpose()?,
        ignore: patterns(ignore)?,
    })
}

/// What `--quantization` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantizationRequest {
    /// Whatever the checkpoint's `quantization_config` says (none: unquantized).
    #[default]
    Auto,
    /// `fp8`: a checkpoint's block FP8 as is, or a 16/32-bit checkpoint quantized at load to
    /// float8_e4m3fn with one f32 scale per output channel (online FP8).
    Fp8,
    /// A named checkpoint method (`compressed-tensors`, `modelopt`) that must match config.json.
    Checkpoint(&'static str),
}

impl QuantizationRequest {
    /// Parses a `--quantization` value.
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "auto" | "none" => Ok(Self::Auto),
            "fp8" => Ok(Self::Fp8),
            "compressed-tensors" | "compressed_tensors" => {
                Ok(Self::Checkpoint("compressed-tensors"))
            }
            "modelopt" | "modelopt_fp4" | "nvfp4" => Ok(Self::Checkpoint("modelopt")),
            "gptq" => Ok(Self::Checkpoint("gptq")),
            "awq" => Ok(Self::Checkpoint("awq")),
            other => Err(EmberError::Config(format!(
                "unknown --quantization {other:?}; use auto, fp8, compressed-tensors, modelopt, gptq or awq"
            ))),
        }
    }
}

/// What `--kv-cache-dtype` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// The model dtype.
    #[default]
    Auto,
    /// float8_e4m3fn with a per-tensor scale of 1.0 (vLLM's default for checkpoints without
    /// `k_scale`/`v_scale`): one byte per element.
    Fp8E4m3,
    /// float8_e5m2 (vLLM's `fp8_e5m2`): one byte per element, range ±57344 at one mantissa bit
    /// less than e4m3; checkpoint scales apply as for e4m3, and default to 1.0.
    Fp8E5m2,
}

impl KvCacheDtype {
    /// Parses a `--kv-cache-dtype` value (vLLM's names: `fp8` is e4m3).
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "fp8" | "fp8_e4m3" => Ok(Self::Fp8E4m3),
            "fp8_e5m2" => Ok(Self::Fp8E5m2),
            other => Err(EmberError::Config(format!(
                "unknown --kv-cache-dtype {other:?}; use auto, fp8 (e4m3), fp8_e4m3 or fp8_e5m2"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Option<WeightQuantization>> {
        parse_quantization_config(Some(&v))
    }

    #[test]
    fn kimi_k2_thinking_int4_experts_parse_as_packed_w4a16_group_32() {
        let qc = json!({
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "kv_cache_scheme": null,
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"],
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": null, "output_activations": null,
                "weights": {"num_bits": 4, "type": "int", "symmetric": true, "group_size": 32,
                            "strategy": "group", "dynamic": false, "actorder": null, "observer": "minmax"}}}
        });
        assert_eq!(
            parse(qc).unwrap(),
            Some(WeightQuantization::PackedInt {
                num_bits: 4,
                group_size: Some(32),
                symmetric: true
            })
        );
    }

    #[test]
    fn gptq_and_awq_configs_parse_as_their_makers_write_them() {
        // Qwen's Qwen3-*-GPTQ-Int4 and -AWQ configs, trimmed to what decides the layout.
        let gptq = json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false,
                          "sym": true, "damp_percent": 0.01, "true_sequential": true});
        assert_eq!(
            parse(gptq).unwrap(),
            Some(WeightQuantization::Gptq {
                bits: 4,
                group_size: Some(128),
                v1: true
            })
        );
        let v2 = json!({"quant_method": "gptq", "bits": 8, "group_size": -1, "checkpoint_format": "gptq_v2"});
        assert_eq!(
            parse(v2).unwrap(),
            Some(WeightQuantization::Gptq {
                bits: 8,
                group_size: None,
                v1: false
            })
        );
        let awq = json!({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true,
                         "version": "gemm", "modules_to_not_convert": null});
        assert_eq!(
            parse(awq).unwrap(),
            Some(WeightQuantization::Awq { group_size: 128 })
        );
        for (bad, says) in [
            (
                json!({"quant_method": "gptq", "bits": 3, "group_size": 128}),
                "3-bit",
            ),
            (
                json!({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}),
                "marlin",
            ),
            (
                json!({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}),
                "gemv",
            ),
            (
                json!({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": false}),
                "zero_point false",
            ),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
        assert_eq!(
            QuantizationRequest::parse("GPTQ").unwrap(),
            QuantizationRequest::Checkpoint("gptq")
        );
        assert_eq!(
            QuantizationRequest::parse("awq").unwrap(),
            QuantizationRequest::Checkpoint("awq")
        );
    }

    #[test]
    fn fp4_formats_and_fp8_blocks_parse() {
        let nv = json!({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
            "config_groups": {"g": {"weights": {"num_bits": 4, "type": "float", "group_size": 16, "strategy": "tensor_group"}}}});
        assert_eq!(
            parse(nv).unwrap(),
            Some(WeightQuantization::Nvfp4(Nvfp4Layout::CompressedTensors))
        );
        let mx = json!({"quant_method": "compressed-tensors",
            "config_groups": {"g": {"format": "mxfp4-pack-quantized",
                "weights": {"num_bits": 4, "type": "float", "group_size": 32, "strategy": "group"}}}});
        assert_eq!(parse(mx).unwrap(), Some(WeightQuantization::Mxfp4));
        let mo = json!({"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16});
        assert_eq!(
            parse(mo).unwrap(),
            Some(WeightQuantization::Nvfp4(Nvfp4Layout::ModelOpt))
        );
        let fp8 = json!({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]});
        assert_eq!(
            parse(fp8).unwrap(),
            Some(WeightQuantization::Fp8Block([128, 128]))
        );
        assert_eq!(parse(Value::Null).unwrap(), None);
    }

    #[test]
    fn unsupported_schemes_are_refused_naming_what_is_wrong() {
        let w8a8 = json!({"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
                                    "input_activations": {"num_bits": 8, "type": "int", "dynamic": true}}}});
        let err = parse(w8a8).unwrap_err().to_string();
        assert!(err.contains("activation quantization"), "{err}");
        let mixed = json!({"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {
                "a": {"weights": {"num_bits": 4, "type": "int", "group_size": 32, "strategy": "group"}},
                "b": {"weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}});
        let err = parse(mixed).unwrap_err().to_string();
        assert!(
            err.contains("mixed-precision") && err.contains("\"b\""),
            "{err}"
        );
        let bnb = json!({"quant_method": "bitsandbytes", "load_in_4bit": true});
        let err = parse(bnb).unwrap_err().to_string();
        assert!(
            err.contains("\"bitsandbytes\"")
                && err.contains("compressed-tensors")
                && err.contains("awq"),
            "{err}"
        );
    }

    #[test]
    fn ignore_lists_and_targets_say_which_linear_modules_are_quantized() {
        let modules = |v: Value| parse_quantized_modules(Some(&v)).unwrap();
        // RedHatAI's Qwen3-30B-A3B W4A16: the LM head and the MoE routers stay in 16 bits.
        let w4a16 = modules(json!({"quant_method": "compressed-tensors",
            "ignore": ["lm_head", "re:.*mlp.gate$"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4}}}}));
        assert!(!w4a16.quantizes("lm_head"));
        assert!(!w4a16.quantizes("model.layers.7.mlp.gate"));
        assert!(w4a16.quantizes("model.layers.7.mlp.experts.3.gate_proj"));
        assert!(w4a16.quantizes("model.layers.7.self_attn.q_proj"));
        // Kimi K2 Thinking: only the routed experts.
        let kimi = modules(json!({"quant_method": "compressed-tensors",
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
            "config_groups": {"group_0": {"targets": ["Linear"]}}}));
        assert!(kimi.quantizes("model.layers.1.mlp.experts.0.down_proj"));
        for kept in [
            "model.layers.1.self_attn.kv_b_proj",
            "model.layers.1.mlp.shared_experts.up_proj",
            "model.layers.0.mlp.gate_proj",
        ] {
            assert!(!kimi.quantizes(kept), "{kept}");
        }
        // Targets other than `Linear` limit what is quantized.
        let experts = modules(json!({"quant_method": "compressed-tensors",
            "config_groups": {"g": {"targets": ["re:.*experts.*"]}}}));
        assert!(experts.quantizes("model.layers.1.mlp.experts.0.up_proj"));
        assert!(!experts.quantizes("model.layers.1.self_attn.o_proj"));
        // A plain name matches whole parts of the path; ModelOpt's wildcards the whole path.
        let awq = modules(json!({"quant_method": "awq", "modules_to_not_convert": ["mlp.gate"]}));
        assert!(!awq.quantizes("model.layers.2.mlp.gate"));
        assert!(awq.quantizes("model.layers.2.mlp.gate_proj"));
        assert!(!awq.quantizes("lm_head"), "AWQ never quantizes the LM head");
        let modelopt = modules(json!({"quant_method": "modelopt",
            "exclude_modules": ["lm_head", "model.layers.0.self_attn*"]}));
        assert!(!modelopt.quantizes("model.layers.0.self_attn.o_proj"));
        assert!(modelopt.quantizes("model.layers.10.self_attn.o_proj"));
        // DeepSeek's block FP8 names nothing and keeps its LM head; GPTQ can quantize it.
        let fp8 = modules(json!({"quant_method": "fp8", "weight_block_size": [128, 128]}));
        assert!(!fp8.quantizes("lm_head") && fp8.quantizes("model.layers.3.mlp.experts.1.up_proj"));
        let gptq = modules(json!({"quant_method": "gptq", "bits": 4, "lm_head": true}));
        assert!(gptq.quantizes("lm_head"));
        let err = parse_quantized_modules(Some(&json!({"quant_method": "compressed-tensors",
            "ignore": ["re:(unclosed"]})))
        .unwrap_err()
        .to_string();
        assert!(err.contains("re:(unclosed"), "{err}");
    }

    #[test]
    fn quantization_flag_values() {
        assert_eq!(
            QuantizationRequest::parse("auto").unwrap(),
            QuantizationRequest::Auto
        );
        assert_eq!(
            QuantizationRequest::parse("FP8").unwrap(),
            QuantizationRequest::Fp8
        );
        let err = QuantizationRequest::parse("gguf").unwrap_err().to_string();
        assert!(err.contains("gguf") && err.contains("fp8"), "{err}");
        assert_eq!(KvCacheDtype::parse("fp8").unwrap(), KvCacheDtype::Fp8E4m3);
        assert_eq!(KvCacheDtype::parse("auto").unwrap(), KvCacheDtype::Auto);
        assert_eq!(
            KvCacheDtype::parse("fp8_e5m2").unwrap(),
            KvCacheDtype::Fp8E5m2
        );
        let err = KvCacheDtype::parse("int8").unwrap_err().to_string();
        assert!(err.contains("int8") && err.contains("fp8_e5m2"), "{err}");
    }
}
