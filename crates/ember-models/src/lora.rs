//! LoRA adapters in PEFT's format, applied per row of a batch without merging weights.
//!
//! An adapter maps module paths of the base model (`model.layers.0.self_attn.q_proj`, routed
//! experts as `model.layers.1.mlp.experts.3.gate_proj`) to low-rank factors. A batch may mix
//! adapters and the base model: [`LoraRows`] says which adapter each row of a projection's input
//! uses, and [`crate::linear::Projection`] adds `scaling · (x Aᵀ) Bᵀ` to the rows of each adapter
//! (segmented, SGMV-style: one pair of small GEMMs per adapter present, never a merged weight).
//! Rows of the base model cost nothing.
//!
//! `models/lora/FORMAT.md` documents PEFT's layout, including transformers-5 fused experts
//! (`target_parameters`), which are split into per-expert factors here at load.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, DeviceLocation, Tensor};
use ember_core::{EmberError, Result};
use serde::Deserialize;

use crate::linear::Split;
use crate::TensorResult;

/// The low-rank factors of one adapted projection, transposed for `x · Aᵀ · Bᵀ`, with the
/// adapter's scaling folded into B.
#[derive(Debug, Clone)]
pub struct LoraFactors {
    /// `Aᵀ`, `[in, r]`.
    pub a_t: Tensor,
    /// `scaling · Bᵀ`, `[r, out]`.
    pub b_t: Tensor,
    /// `(a_t, b_t)` copied to each other device a rank runs on, made on its first use there.
    copies: Arc<Mutex<Vec<(DeviceLocation, Tensor, Tensor)>>>,
}

impl LoraFactors {
    /// Factors `Aᵀ` `[in, r]` and `scaling · Bᵀ` `[r, out]`.
    pub fn new(a_t: Tensor, b_t: Tensor) -> Self {
        Self {
            a_t,
            b_t,
            copies: Arc::default(),
        }
    }

    /// `(Aᵀ, s Bᵀ)` on `device`: the adapter's own, or a copy kept for a rank on another GPU.
    fn on(&self, device: &Device) -> TensorResult<(Tensor, Tensor)> {
        if self.a_t.device().same_device(device) {
            return Ok((self.a_t.clone(), self.b_t.clone()));
        }
        let mut copies = self.copies.lock().unwrap_or_else(|p| p.into_inner());
        let at = device.location();
        if let Some((_, a, b)) = copies.iter().find(|(loc, ..)| *loc == at) {
            return Ok((a.clone(), b.clone()));
        }
        let (a, b) = (self.a_t.to_device(device)?, self.b_t.to_device(device)?);
        copies.push((at, a.clone(), b.clone()));
        Ok((a, b))
    }

    /// `(x Aᵀ) (s Bᵀ)` for `x` `[rows, in]`.
    pub fn delta(&self, x: &Tensor) -> TensorResult {
        let (a_t, b_t) = self.on(x.device())?;
        x.matmul(&a_t)?.matmul(&b_t)
    }

    /// [`LoraFactors::delta`] for a tensor-parallel rank's part of the projection: its output
    /// columns of `B` (column-parallel), or its input rows of `A` (row-parallel, a partial sum
    /// the ranks add up like the base output).
    pub fn delta_part(&self, x: &Tensor, split: Option<Split>) -> TensorResult {
        let (a_t, b_t) = self.on(x.device())?;
        match split {
            None => x.matmul(&a_t)?.matmul(&b_t),
            Some(Split::Columns { start, len }) => x
                .matmul(&a_t)?
                .matmul(&b_t.narrow(1, start, len)?.contiguous()?),
            Some(Split::Rows { start, len }) => x
                .matmul(&a_t.narrow(0, start, len)?.contiguous()?)?
                .matmul(&b_t),
        }
    }

    /// The adapter's rank on this projection.
    pub fn rank(&self) -> usize {
        self.b_t.dims()[0]
    }
}

/// The projections of a model that adapters may target: module path → `[in, out]`.
#[derive(Debug, Clone, Default)]
pub struct LoraTargets {
    modules: BTreeMap<String, [usize; 2]>,
    /// Routed-expert containers (`model.layers.1.mlp.experts`) → number of experts, for
    /// transformers-5 fused adapters (`mlp.experts.lora_A`) that cover all experts at once.
    experts: BTreeMap<String, usize>,
}

impl LoraTargets {
    /// Records a projection the model runs through [`crate::linear::Projection`].
    pub fn add(&mut self, path: &str, in_dim: usize, out_dim: usize) {
        self.modules.insert(path.to_string(), [in_dim, out_dim]);
    }

    /// Records a routed-expert container of `num_experts` experts.
    pub fn add_experts(&mut self, path: &str, num_experts: usize) {
        self.experts.insert(path.to_string(), num_experts);
    }

    /// Adds `other`'s projections and expert containers (the ranks of a sharded model).
    pub fn merge(&mut self, other: &LoraTargets) {
        self.modules
            .extend(other.modules.iter().map(|(k, v)| (k.clone(), *v)));
        self.experts
            .extend(other.experts.iter().map(|(k, v)| (k.clone(), *v)));
    }

    /// `[in, out]` of the projection at `path`.
    pub fn dims(&self, path: &str) -> Option<[usize; 2]> {
        self.modules.get(path).copied()
    }

    /// Number of adaptable projections.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// Whether the model has no adaptable projection.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
}

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
    id: u64,
    name: String,
    modules: HashMap<String, LoraFactors>,
    /// Every module path and each of its dot-separated prefixes (`model.layers.3.mlp.experts`
    /// of `model.layers.3.mlp.experts.7.up_proj`): [`LoraRows::adapts_under`]'s lookup.
    prefixes: HashSet<String>,
    max_rank: usize,
    num_parameters: usize,
}

fn invalid(dir: &Path, what: impl std::fmt::Display) -> EmberError {
    EmberError::AdapterLoad(format!("LoRA adapter {}: {what}", dir.display()))
}

/// Each module path and its dot-separated prefixes.
fn module_prefixes(modules: &HashMap<String, LoraFactors>) -> HashSet<String> {
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

/// Which adapter each row of a projection's input uses, grouped by adapter.
#[derive(Debug, Clone, Default)]
pub struct LoraRows {
    /// Adapter index of each row (`NO_ADAPTER` for the base model), for [`LoraRows::select`].
    row_adapter: Vec<u16>,
    adapters: Vec<Arc<LoraAdapter>>,
    groups: Vec<LoraGroup>,
    /// On a data-parallel rank, the whole step's rows (host side) and each of this rank's rows'
    /// index among them: expert-parallel rows travel with their step index, which the experts'
    /// owner resolves here (see [`LoraRows::step_row`]).
    step: Option<Arc<(LoraRows, Vec<u32>)>>,
}

#[derive(Debug, Clone)]
struct LoraGroup {
    adapter: usize,
    rows: GroupRows,
}

#[derive(Debug, Clone)]
enum GroupRows {
    /// `start..start + len`.
    Range(usize, usize),
    /// `[n]` u32 row indices, and the same on the host.
    Indices(Tensor),
}

/// Row marker for the base model in [`LoraRows`].
pub const NO_ADAPTER: u16 = u16::MAX;

impl LoraRows {
    /// No adapter on any row.
    pub fn none() -> Self {
        Self::default()
    }

    /// Rows using `adapters[row_adapter[i]]`, or none where `row_adapter[i] == NO_ADAPTER`.
    pub fn new(
        adapters: Vec<Arc<LoraAdapter>>,
        row_adapter: Vec<u16>,
        device: &Device,
    ) -> TensorResult<Self> {
        let mut rows_of: Vec<Vec<u32>> = vec![Vec::new(); adapters.len()];
        for (row, &a) in row_adapter.iter().enumerate() {
            if a != NO_ADAPTER {
                rows_of[a as usize].push(row as u32);
            }
        }
        let mut groups = Vec::new();
        for (adapter, rows) in rows_of.into_iter().enumerate() {
            let (Some(&first), Some(&last)) = (rows.first(), rows.last()) else {
                continue;
            };
            let rows = if (last - first) as usize + 1 == rows.len() {
                GroupRows::Range(first as usize, rows.len())
            } else {
                // Staged like the step's other metadata: an asynchronous copy.
                GroupRows::Indices(crate::batch::upload(rows, device)?)
            };
            groups.push(LoraGroup { adapter, rows });
        }
        Ok(Self {
            row_adapter,
            adapters,
            groups,
            step: None,
        })
    }

    /// All `rows` rows use `adapter`.
    pub fn uniform(adapter: &Arc<LoraAdapter>, rows: usize) -> Self {
        Self {
            row_adapter: vec![0; rows],
            adapters: vec![adapter.clone()],
            groups: vec![LoraGroup {
                adapter: 0,
                rows: GroupRows::Range(0, rows),
            }],
            step: None,
        }
    }

    /// Whether no row uses an adapter (projections then cost exactly the base GEMM).
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Whether a row's adapter adapts the projection at `path`.
    pub fn adapts(&self, path: &str) -> bool {
        self.groups
            .iter()
            .any(|g| self.adapters[g.adapter].modules.contains_key(path))
    }

    /// Whether a row's adapter adapts a projection under the module path `prefix` (a layer's
    /// experts, `model.layers.3.mlp.experts`).
    pub fn adapts_under(&self, prefix: &str) -> bool {
        self.groups
            .iter()
            .any(|g| self.adapters[g.adapter].prefixes.contains(prefix))
    }

    /// The same rows, with their index tensors on `device` (a rank's copy of a step).
    pub fn to_device(&self, device: &Device) -> TensorResult<Self> {
        let mut rows = if self.is_empty() {
            Self::none()
        } else {
            Self::new(self.adapters.clone(), self.row_adapter.clone(), device)?
        };
        rows.step = self.step.clone();
        Ok(rows)
    }

    /// These rows as a data-parallel rank's share of a step whose rows are `step`: this rank's
    /// row i is the step's row `step_rows[i]`.
    pub fn within_step(self, step: &LoraRows, step_rows: Vec<u32>) -> Self {
        let whole = LoraRows {
            row_adapter: step.row_adapter.clone(),
            adapters: step.adapters.clone(),
            groups: Vec::new(),
            step: None,
        };
        Self {
            step: Some(Arc::new((whole, step_rows))),
            ..self
        }
    }

    /// Row `row`'s index in the step: itself, or its index in the whole step on a
    /// data-parallel rank.
    pub fn step_row(&self, row: u32) -> u32 {
        match &self.step {
            Some(step) => step.1[row as usize],
            None => row,
        }
    }

    /// [`LoraRows::select`] of step rows (from [`LoraRows::step_row`], possibly another
    /// rank's).
    pub fn select_step_rows(&self, rows: &[u32], device: &Device) -> TensorResult<Self> {
        match &self.step {
            Some(step) if !step.0.adapters.is_empty() => {
                let row_adapter = rows
                    .iter()
                    .map(|&r| step.0.row_adapter[r as usize])
                    .collect();
                Self::new(step.0.adapters.clone(), row_adapter, device)
            }
            Some(_) => Ok(Self::none()),
            None => self.select(rows, device),
        }
    }

    /// The rows `rows` of this set, renumbered `0..rows.len()` (the tokens routed to one expert).
    pub fn select(&self, rows: &[u32], device: &Device) -> TensorResult<Self> {
        if self.is_empty() {
            return Ok(Self::none());
        }
        let row_adapter = rows.iter().map(|&r| self.row_adapter[r as usize]).collect();
        Self::new(self.adapters.clone(), row_adapter, device)
    }

    /// `y + Σ_adapters scaling · (x_rows Aᵀ) Bᵀ` for the projection at `path`, over the rows of
    /// each adapter that adapts it. `x` is `[rows, in]`, `y` the base output `[rows, out]`.
    pub fn apply(&self, path: &str, x: &Tensor, y: Tensor, split: Option<Split>) -> TensorResult {
        let mut y = y;
        let mut scattered: Vec<(Tensor, Tensor)> = Vec::new();
        for group in &self.groups {
            let Some(factors) = self.adapters[group.adapter].factors(path) else {
                continue;
            };
            match &group.rows {
                GroupRows::Range(start, len) if *start == 0 && *len == x.dim(0)? => {
                    y = (y + factors.delta_part(x, split)?)?;
                }
                GroupRows::Range(start, len) => {
                    let delta = factors.delta_part(&x.narrow(0, *start, *len)?, split)?;
                    let rows = Tensor::arange(*start as u32, (*start + *len) as u32, x.device())?;
                    scattered.push((rows, delta));
                }
                GroupRows::Indices(rows) => {
                    let delta = factors.delta_part(&x.index_select(rows, 0)?, split)?;
                    scattered.push((rows.clone(), delta));
                }
            }
        }
        match scattered.len() {
            0 => Ok(y),
            1 => y.index_add(&scattered[0].0, &scattered[0].1, 0),
            _ => {
                let (rows, deltas): (Vec<Tensor>, Vec<Tensor>) = scattered.into_iter().unzip();
                y.index_add(&Tensor::cat(&rows, 0)?, &Tensor::cat(&deltas, 0)?, 0)
            }
        }
    }

    /// The adapter of row `row`, if any.
    pub fn adapter_of(&self, row: usize) -> Option<&Arc<LoraAdapter>> {
        let a = *self.row_adapter.get(row)?;
        (a != NO_ADAPTER).then(|| &self.adapters[a as usize])
    }
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

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn adapter(id: u64, path: &str, rank: usize, seed: u64) -> Arc<LoraAdapter> {
        let factors = LoraFactors::new(random((6, rank), seed), random((rank, 5), seed + 1));
        let modules = HashMap::from([(path.to_string(), factors)]);
        Arc::new(LoraAdapter {
            id,
            name: format!("a{id}"),
            prefixes: module_prefixes(&modules),
            modules,
            max_rank: rank,
            num_parameters: 0,
        })
    }

    /// Mixed rows: each row's output equals the merged weight `W + Bᵀ·Aᵀ` of its own adapter
    /// (or W), whatever the grouping (ranges, scattered rows, base rows in between).
    #[test]
    fn mixed_rows_match_per_row_merged_weights() {
        let (x, w) = (random((7, 6), 1), random((6, 5), 2));
        let adapters = vec![
            adapter(1, "p", 2, 10),
            adapter(2, "p", 4, 20),
            adapter(3, "q", 3, 30),
        ];
        let row_adapter = vec![0, 0, NO_ADAPTER, 1, 0, 2, 1];
        let rows = LoraRows::new(adapters.clone(), row_adapter.clone(), &Device::Cpu).unwrap();
        let got = rows.apply("p", &x, x.matmul(&w).unwrap(), None).unwrap();
        for (row, &a) in row_adapter.iter().enumerate() {
            let merged = match a {
                // Adapter 2 targets "q", not "p": its rows get the base output.
                NO_ADAPTER | 2 => w.clone(),
                a => {
                    let f = adapters[a as usize].factors("p").unwrap();
                    (&w + f.a_t.matmul(&f.b_t).unwrap()).unwrap()
                }
            };
            let want = x.narrow(0, row, 1).unwrap().matmul(&merged).unwrap();
            let diff = (got.narrow(0, row, 1).unwrap() - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "row {row}: {diff}");
        }
        // Selecting rows (an expert's tokens) keeps each row's adapter.
        let sub = rows.select(&[5, 3, 2], &Device::Cpu).unwrap();
        assert_eq!(sub.adapter_of(0).unwrap().id(), 3);
        assert_eq!(sub.adapter_of(1).unwrap().id(), 2);
        assert!(sub.adapter_of(2).is_none());
        assert!(LoraRows::none()
            .select(&[0], &Device::Cpu)
            .unwrap()
            .is_empty());
    }
}
