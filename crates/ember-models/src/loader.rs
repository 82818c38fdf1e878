//! The one loader path: resolve the checkpoint, read its configs, check the memory it needs,
//! and build the model from safetensors or dummy weights.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use ember_core::config::token_ids_from_json;
use ember_core::{
    EmberError, KvCacheDtype, ModelConfig, ModelFamily, ModelTask, QuantizationRequest, Result,
    WeightQuantization,
};
use serde_json::Value;

use crate::backends::{Backends, Fp8Gemm};
use crate::device::calls::KernelCalls;
use crate::loading::checkpoint::{packed_held_bytes, resolve_model_dir, safetensors_files};
use std::sync::Arc;

use crate::families::decoder::DecoderModel;
use crate::families::deepseek_v3::load_deepseek_v3;
use crate::families::qwen3::load_qwen3;
use crate::loading::context::LoadContext;
use crate::loading::task::resolve_task;
use crate::loading::weights::{LoadFormat, Weights};
use crate::parallel::eplb::ExpertLoad;
use crate::parallel::{Communicator, RankContext, ThreadGroup};
use crate::sharded::ShardedModel;
use crate::CausalLm;

/// What to load and how.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// A checkpoint directory or a Hub id in the local cache.
    pub model: String,
    /// `None` (`--dtype auto`): the checkpoint's dtype on GPUs, float32 on the CPU.
    pub dtype: Option<DType>,
    pub load_format: LoadFormat,
    pub device: Device,
    /// JSON object merged over config.json before parsing (`--hf-overrides`).
    pub hf_overrides: Option<Value>,
    /// Cap on prompt + completion tokens; defaults to `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    /// Seed of dummy weights.
    pub seed: u64,
    /// `None` (`--task auto`): embed for an embedding checkpoint, else generate.
    pub task: Option<ModelTask>,
    /// `--quantization`: auto (from `quantization_config`) or a method the checkpoint must match.
    pub quantization: QuantizationRequest,
    /// `--kv-cache-dtype`: the model dtype, or fp8 e4m3.
    pub kv_cache_dtype: KvCacheDtype,
    /// `--tensor-parallel-size`: ranks the model is sharded over (threads of this process on
    /// the CPU), 1 for an unsharded model.
    pub tensor_parallel_size: usize,
    /// `--data-parallel-size`: ranks that each run their own sequences over their own KV cache
    /// with every layer whole, meeting in the routed experts under expert parallelism
    /// (DeepSeek's DP attention). 1: none. Not combined with tensor parallelism yet.
    pub data_parallel_size: usize,
    /// `--enable-expert-parallel`: routed experts partitioned across the ranks instead of split.
    pub enable_expert_parallel: bool,
    /// `--num-redundant-experts`: extra expert slots over the expert-parallel ranks, each a
    /// copy of a hot expert (DeepSeek's EPLB); needs expert parallelism.
    pub num_redundant_experts: usize,
    /// `--enable-eplb --eplb-step-interval N`: under expert parallelism, re-place the experts
    /// and their copies every N steps from the load seen since the last time (0: never).
    pub eplb_step_interval: u64,
    /// `--eplb-window-size`: the re-placement weighs the last this many steps' load (0, or not
    /// below the interval: all of them since the last re-placement).
    pub eplb_window_size: u64,
    /// `--calculate-kv-scales`: with an fp8 KV cache, each attention layer's scales come from
    /// the first keys and values it writes (max |x| / 200 for keys, / 100 for values, as vLLM).
    pub calculate_kv_scales: bool,
    /// `--attention-backend`: candle's tensor path, or ember's CUDA kernel where it serves.
    pub attention_backend: crate::backends::AttentionBackend,
    /// `--moe-backend`: each expert's MLP routed on the host, or the fused MoE kernels.
    pub moe_backend: crate::backends::MoeBackend,
    /// `--layer-kernels`: candle's RMSNorm, SiLU and RoPE ops, or ember's kernels.
    pub layer_kernels: crate::backends::LayerKernels,
    /// `--fp8-gemm`: block-FP8 projections as W8A16 or W8A8 (FP8 tensor cores, sm_89 and up).
    pub fp8_gemm: Fp8Gemm,
    /// `--packed-weights`: hold 4-bit and FP8 projections (block-FP8 checkpoints, online FP8)
    /// as stored and multiply them with the W4A16 / W8A16 kernels (on the CPU ember-kernels'
    /// `packed_cpu`, as fast as the dequantized f32 weights or faster at a quarter to an eighth
    /// of the memory) rather than dequantize them at load (`None`: packed, on every device).
    pub packed_weights: Option<bool>,
}

impl LoadOptions {
    /// Defaults for loading `model` on the CPU in its own dtype.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            dtype: None,
            load_format: LoadFormat::Safetensors,
            device: Device::Cpu,
            hf_overrides: None,
            max_model_len: None,
            seed: 0,
            task: None,
            quantization: QuantizationRequest::Auto,
            kv_cache_dtype: KvCacheDtype::Auto,
            tensor_parallel_size: 1,
            data_parallel_size: 1,
            enable_expert_parallel: false,
            num_redundant_experts: 0,
            eplb_step_interval: 0,
            eplb_window_size: 0,
            calculate_kv_scales: false,
            attention_backend: Default::default(),
            moe_backend: Default::default(),
            layer_kernels: Default::default(),
            fp8_gemm: Default::default(),
            packed_weights: None,
        }
    }
}

/// `--fp8-gemm` as the device can run it: W8A8 needs FP8 tensor cores on a GPU (the CPU runs its
/// references); without them it is W8A16, with a warning.
fn fp8_gemm(opts: &LoadOptions) -> Result<Fp8Gemm> {
    #[cfg(feature = "cuda")]
    if let (Fp8Gemm::W8a8, Device::Cuda(device)) = (opts.fp8_gemm, &opts.device) {
        let kernels = crate::device::kernels::kernels(device)
            .map_err(|e| EmberError::Config(format!("cannot load ember's kernels: {e}")))?;
        if !kernels
            .has_fp8_tensor_cores()
            .map_err(|e| EmberError::Config(e.to_string()))?
        {
            tracing::warn!("--fp8-gemm w8a8: this GPU has no FP8 tensor cores; using w8a16");
            return Ok(Fp8Gemm::W8a16);
        }
    }
    Ok(opts.fp8_gemm)
}

/// A model ready to run, with what the rest of ember needs to know about it.
pub struct LoadedModel {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub model: Box<dyn CausalLm>,
    pub dtype: DType,
    /// eos ids from config.json and generation_config.json, merged.
    pub eos_token_ids: Vec<u32>,
    pub max_model_len: usize,
    /// What the model was loaded for; an embed model has no LM head.
    pub task: ModelTask,
    /// Bytes of the weights the model holds, as loaded (fp8 projections at 1 byte a parameter),
    /// all ranks together.
    pub weight_bytes: u64,
    /// Bytes each rank holds (one entry for an unsharded model).
    pub rank_weight_bytes: Vec<u64>,
    /// Tokens routed to each expert of each MoE layer, counted as the model runs.
    pub expert_load: Arc<ExpertLoad>,
    /// Calls each of ember's kernel paths has served, counted as the model runs.
    pub kernel_calls: Arc<KernelCalls>,
    /// The dtype the paged KV cache stores: `dtype`, `F8E4M3` under `--kv-cache-dtype fp8`, or
    /// `U8` holding e5m2 bytes under `fp8_e5m2` (see [`crate::cache::kv_cache::E5M2_STORAGE`]).
    pub kv_cache_dtype: DType,
    /// Where the weights live and the model runs; its KV cache goes there too.
    pub device: Device,
    /// Where each rank runs and keeps its KV cache (`[device]` for an unsharded model; one GPU
    /// per rank when a sharded one is on GPUs). Rank 0 is on `device`.
    pub rank_devices: Vec<Device>,
    /// The attention and MoE implementations it was loaded with (`--attention-backend`,
    /// `--moe-backend`).
    pub attention_backend: crate::backends::AttentionBackend,
    pub moe_backend: crate::backends::MoeBackend,
}

impl LoadedModel {
    /// Whether its decode steps can run as CUDA graphs: on a GPU, one rank, generating, with
    /// ember's attention kernels over a cache in the model's dtype and, for an MoE model, the
    /// fused MoE (the paths that read nothing of a step on the host). The capture itself still
    /// refuses anything else it meets.
    pub fn decode_graphs_possible(&self) -> bool {
        let moe = self.config.moe.is_some() || self.config.deepseek.is_some();
        self.device.is_cuda()
            && self.model.kv_cache_shards().len() == 1
            && self.model.data_parallel_size() == 1
            && self.task == ember_core::ModelTask::Generate
            && self.attention_backend == crate::backends::AttentionBackend::Ember
            && self.kv_cache_dtype == self.dtype
            && (!moe || self.moe_backend == crate::backends::MoeBackend::Fused)
    }
}

/// Parses a `--dtype` value; `auto` is `None`.
pub fn parse_dtype(name: &str) -> Result<Option<DType>> {
    match name.to_ascii_lowercase().as_str() {
        "auto" => Ok(None),
        "bfloat16" | "bf16" => Ok(Some(DType::BF16)),
        "float16" | "fp16" | "half" => Ok(Some(DType::F16)),
        "float32" | "fp32" | "float" => Ok(Some(DType::F32)),
        other => Err(EmberError::Config(format!(
            "unknown dtype {other:?}; use auto, bfloat16, float16 or float32"
        ))),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| EmberError::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| EmberError::Config(format!("{} is not valid JSON: {e}", path.display())))
}

/// Reads config.json, applies overrides, and validates it.
pub fn read_config(dir: &Path, overrides: Option<&Value>) -> Result<ModelConfig> {
    let mut json = read_json(&dir.join("config.json"))?;
    if let Some(over) = overrides {
        let Some(over) = over.as_object() else {
            return Err(EmberError::Config(
                "--hf-overrides must be a JSON object".into(),
            ));
        };
        let Some(obj) = json.as_object_mut() else {
            return Err(EmberError::Config(
                "config.json must hold a JSON object".into(),
            ));
        };
        for (k, v) in over {
            obj.insert(k.clone(), v.clone());
        }
    }
    ModelConfig::from_json_str(&json.to_string())
}

/// eos ids of config.json plus those of generation_config.json (which may be a list).
fn eos_token_ids(dir: &Path, cfg: &ModelConfig) -> Result<Vec<u32>> {
    let mut ids = cfg.eos_token_ids.clone();
    let path = dir.join("generation_config.json");
    if path.is_file() {
        if let Some(eos) = read_json(&path)?.get("eos_token_id") {
            ids.extend(token_ids_from_json(eos));
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// The dtype the model computes in: `requested`, else on a GPU the checkpoint's `torch_dtype`,
/// and on the CPU the dtype its weights are stored in (`stored`: bf16 stays bf16, which the CPU
/// kernels multiply as stored; f16, which they do not take, and dummy weights compute in f32).
fn resolve_dtype(
    requested: Option<DType>,
    cfg: &ModelConfig,
    device: &Device,
    stored: Option<DType>,
) -> Result<DType> {
    if let Some(dtype) = requested {
        return Ok(dtype);
    }
    if device.is_cpu() {
        let dtype = match stored {
            Some(DType::BF16) => DType::BF16,
            _ => DType::F32,
        };
        tracing::info!(
            stored = ?stored,
            "on CPU --dtype auto computes in {dtype:?} (the weights' stored dtype; f16 and dummy weights compute in F32)"
        );
        return Ok(dtype);
    }
    match cfg.torch_dtype.as_deref() {
        None => Ok(DType::F32),
        Some(name) => parse_dtype(name)?.ok_or_else(|| {
            EmberError::Config("config.json names dtype \"auto\"; pass --dtype".into())
        }),
    }
}

fn available_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A parameter count as people write it: `671.03B`.
pub fn billions(params: u64) -> String {
    format!("{:.2}B", params as f64 / 1e9)
}

/// Bytes the weights take in `dtype`.
pub fn weight_bytes(cfg: &ModelConfig, dtype: DType) -> u64 {
    cfg.num_parameters() * dtype.size_in_bytes() as u64
}

/// Whether 4-bit and FP8 projections are held as stored ([`LoadOptions::packed_weights`]).
fn packed_weights(opts: &LoadOptions) -> bool {
    opts.packed_weights.unwrap_or(true)
}

/// Bytes a load of the checkpoint in `files` holds with its quantized projections packed: the
/// checkpoint's tensors as [`packed_held_bytes`] counts them, and MLA's absorbed-decode copies of
/// `kv_b_proj`, which the loader derives in `dtype`.
pub fn packed_weight_bytes(cfg: &ModelConfig, files: &[PathBuf], dtype: DType) -> Result<u64> {
    use crate::parallel::memory_plan::{rank_weights, WeightFormat};
    let absorbed = rank_weights(cfg, 1, false, WeightFormat::Loaded(dtype))?[0].mla_absorbed;
    Ok(packed_held_bytes(files, dtype)? + absorbed)
}

/// Whether the checkpoint stores 4-bit integer or block-FP8 projections that this load holds
/// packed (the W4A16 and W8A16 kernels compute in f32 and bf16).
fn holds_packed_weights(
    opts: &LoadOptions,
    stored: Option<WeightQuantization>,
    dtype: DType,
) -> bool {
    let packs = matches!(
        stored,
        Some(
            WeightQuantization::PackedInt { num_bits: 4, .. }
                | WeightQuantization::Gptq { bits: 4, .. }
                | WeightQuantization::Awq { .. }
                | WeightQuantization::Nvfp4(_)
                | WeightQuantization::Mxfp4
                | WeightQuantization::Fp8Block(_)
        )
    );
    packs && packed_weights(opts) && crate::linear::quantized::packed_computes_in(dtype)
}

/// Checks `--quantization` against the checkpoint's `quantization_config`; `true` when the
/// weights are to be quantized at load (online FP8: `fp8` on an unquantized checkpoint).
fn check_quantization(
    request: QuantizationRequest,
    stored: Option<WeightQuantization>,
) -> Result<bool> {
    let stored_method = stored.map(|q| q.method());
    match (request, stored) {
        (QuantizationRequest::Auto, _) => Ok(false),
        (QuantizationRequest::Fp8, Some(WeightQuantization::Fp8Block(_))) => Ok(false),
        (QuantizationRequest::Fp8, None) => Ok(true),
        (QuantizationRequest::Checkpoint(m), Some(q)) if q.method() == m => Ok(false),
        (QuantizationRequest::Fp8 | QuantizationRequest::Checkpoint(_), _) => {
            let asked = match request {
                QuantizationRequest::Checkpoint(m) => m,
                _ => "fp8",
            };
            Err(EmberError::Config(format!(
                "--quantization {asked} does not match the checkpoint, whose quantization_config is {}; \
                 pass --quantization auto",
                stored_method.unwrap_or("absent (unquantized)")
            )))
        }
    }
}

/// Bytes of the checkpoint's safetensors files on disk.
fn checkpoint_bytes(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum()
}

/// Loads a model as `opts` says.
pub fn load_model(opts: &LoadOptions) -> Result<LoadedModel> {
    let dir = resolve_model_dir(&opts.model)?;
    let config = read_config(&dir, opts.hf_overrides.as_ref())?;
    let task = resolve_task(&dir, &config, opts.task)?;
    let online_fp8 = check_quantization(opts.quantization, config.quantization)?;
    let stored = match (opts.dtype, opts.load_format) {
        (None, LoadFormat::Safetensors) if opts.device.is_cpu() => {
            crate::loading::checkpoint::stored_float_dtype(&safetensors_files(&dir)?)?
        }
        _ => None,
    };
    let dtype = resolve_dtype(opts.dtype, &config, &opts.device, stored)?;
    let max_model_len = match opts.max_model_len {
        Some(len) if len > config.max_position_embeddings => {
            return Err(EmberError::Config(format!(
                "--max-model-len {len} exceeds the model's max_position_embeddings {}; lower it",
                config.max_position_embeddings
            )))
        }
        Some(len) => len,
        None => config.max_position_embeddings,
    };
    let need = weight_bytes(&config, dtype);
    tracing::info!(
        params = config.num_parameters(),
        active_params = config.num_active_parameters(),
        gib = need as f64 / (1u64 << 30) as f64,
        ?dtype,
        task = task.as_str(),
        "loading {} from {}",
        config.family.model_type(),
        dir.display()
    );
    let data_parallel = opts.data_parallel_size > 1;
    // Ranks of one tensor-parallel group: under --data-parallel-size each data-parallel rank is
    // such a group (a replica sharded over its own ranks).
    let group = opts.tensor_parallel_size.max(1);
    // Ranks: the tensor-parallel ones, times the data-parallel replicas.
    let world = (opts.tensor_parallel_size * opts.data_parallel_size).max(1);
    // What one GPU must hold: a rank's share when sharded (the loader's own split rules; a
    // lower bound for a data-parallel rank, whose attention is whole).
    let need_on_gpu = if data_parallel && group > 1 {
        crate::parallel::memory_plan::rank_weights_replicas(
            &config,
            opts.data_parallel_size,
            group,
            opts.enable_expert_parallel,
            crate::parallel::memory_plan::WeightFormat::Loaded(dtype),
        )
        .ok()
        .and_then(|ranks| ranks.iter().map(|r| r.total()).max())
        .unwrap_or(need / group as u64)
    } else if data_parallel && !opts.enable_expert_parallel {
        need
    } else if world > 1 {
        crate::parallel::memory_plan::rank_weights(
            &config,
            world,
            opts.enable_expert_parallel,
            crate::parallel::memory_plan::WeightFormat::Loaded(dtype),
        )
        .ok()
        .and_then(|ranks| ranks.iter().map(|r| r.total()).max())
        .unwrap_or(need / world as u64)
    } else {
        need
    };
    if let Some((free, total)) = crate::device::gpu_memory(&opts.device)? {
        tracing::info!(
            free_gib = free as f64 / (1u64 << 30) as f64,
            total_gib = total as f64 / (1u64 << 30) as f64,
            "memory: GPU before loading"
        );
        // Projections held packed (4-bit, block FP8) take a fraction of `need`; their load
        // fails with the GPU's out-of-memory error if they do not fit.
        if need_on_gpu > free && !holds_packed_weights(opts, config.quantization, dtype) {
            return Err(EmberError::Config(format!(
                "{} parameters need {:.1} GiB in {dtype:?}{} but the GPU has {:.1} GiB free of {:.1} GiB; \
                 use a smaller --dtype, a quantized checkpoint, more GPUs (--tensor-parallel-size) \
                 or fewer layers (--hf-overrides)",
                billions(config.num_parameters()),
                need_on_gpu as f64 / (1u64 << 30) as f64,
                if world > 1 { " a rank" } else { "" },
                free as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            )));
        }
    }
    let files = match opts.load_format {
        LoadFormat::Safetensors => Some(safetensors_files(&dir)?),
        LoadFormat::Dummy => None,
    };
    // What the weights take held: in `dtype`, but projections held packed at their size.
    let packed = holds_packed_weights(opts, config.quantization, dtype);
    let held = match &files {
        Some(files) if packed => packed_weight_bytes(&config, files, dtype)?,
        // A dummy load of a quantized config holds its projections packed too: half a byte
        // (4-bit) or one (block FP8) per parameter at least.
        None if packed => {
            let bits = match config.quantization {
                Some(WeightQuantization::Fp8Block(_)) => 8,
                _ => 4,
            };
            config.num_parameters() * bits / 8
        }
        _ => need,
    };
    if opts.device.is_cpu() {
        if let Some(avail) = available_memory_bytes() {
            if held > avail {
                return Err(EmberError::Config(format!(
                    "{} parameters ({} active per token) need {:.1} GiB in {dtype:?}{} but only {:.1} GiB of memory is available; \
                     use a smaller --dtype or fewer layers, e.g. --hf-overrides '{{\"num_hidden_layers\": 2}}'",
                    billions(config.num_parameters()),
                    billions(config.num_active_parameters()),
                    held as f64 / (1u64 << 30) as f64,
                    if packed { " with the quantized projections packed" } else { "" },
                    avail as f64 / (1u64 << 30) as f64
                )));
            }
        }
    }
    let (weights, quantization) = match &files {
        Some(files) => {
            tracing::info!(
                weights_gib = held as f64 / (1u64 << 30) as f64,
                checkpoint_gib = checkpoint_bytes(files) as f64 / (1u64 << 30) as f64,
                available_gib = available_memory_bytes().map(|b| b as f64 / (1u64 << 30) as f64),
                quantization = ?config.quantization,
                packed,
                "memory: weights held in {dtype:?}{}",
                if packed {
                    ", but for the 4-bit and block-FP8 projections, held as stored"
                } else if config.quantization.is_some() {
                    " (the quantized checkpoint dequantized at load)"
                } else {
                    ""
                }
            );
            (
                Weights::from_safetensors(files, dtype, &opts.device)?,
                config.quantization,
            )
        }
        // Linear modules stored as the quantization_config says, as a real checkpoint's are.
        None => (
            Weights::dummy_quantized(
                opts.seed,
                config.quantization,
                config.quantized_modules.clone(),
                dtype,
                &opts.device,
            ),
            config.quantization,
        ),
    };
    let ctx = LoadContext {
        backends: Backends {
            attention: opts.attention_backend,
            moe: opts.moe_backend,
            layer_kernels: opts.layer_kernels,
            fp8_gemm: fp8_gemm(opts)?,
        },
        quantization,
        online_fp8,
        calculate_kv_scales: opts.calculate_kv_scales,
        packed_weights: packed_weights(opts),
        ..LoadContext::default()
    };
    tracing::info!(
        backends = ?ctx.backends,
        packed_weights = ctx.packed_weights,
        "kernels selected (each serves where it can; the rest runs candle's ops)"
    );
    let build = |weights: &Weights, ctx: &LoadContext| -> Result<DecoderModel> {
        match config.family {
            ModelFamily::Qwen3 | ModelFamily::Qwen3Moe => {
                load_qwen3(weights, ctx, &config, max_model_len, task)
            }
            ModelFamily::DeepseekV3 if task == ModelTask::Embed => Err(EmberError::Config(
                "--task embed is for Qwen3 embedding checkpoints (Qwen3-Embedding); DeepSeek models only generate"
                    .into(),
            )),
            ModelFamily::DeepseekV3 => load_deepseek_v3(weights, ctx, &config, max_model_len),
        }
    };
    let world = opts.tensor_parallel_size * opts.data_parallel_size;
    if (opts.num_redundant_experts > 0 || opts.eplb_step_interval > 0)
        && !(opts.enable_expert_parallel && world > 1)
    {
        return Err(EmberError::Config(
            "--num-redundant-experts and --enable-eplb need --enable-expert-parallel over more than one rank"
                .into(),
        ));
    }
    let rank_devices = crate::device::rank_devices(&opts.device, world.max(1))?;
    let (model, rank_weight_bytes): (Box<dyn CausalLm>, Vec<u64>) = match world {
        0 => {
            return Err(EmberError::Config(
                "--tensor-parallel-size and --data-parallel-size must be at least 1".into(),
            ))
        }
        1 => {
            let model = build(&weights, &ctx)?;
            (Box::new(model), vec![weights.held_bytes()])
        }
        _ => {
            let mut ranks = Vec::with_capacity(world);
            let mut bytes = Vec::with_capacity(world);
            // One communicator group over every rank, or one per tensor-parallel replica.
            let mut comms = Vec::with_capacity(world);
            let mut backend = "threads";
            let per_group = if data_parallel && group > 1 {
                group
            } else {
                world
            };
            for devices in rank_devices.chunks(per_group) {
                let (group_comms, b) = communicators(devices);
                comms.extend(group_comms);
                backend = b;
            }
            // Experts partitioned over replicas: one more group, over every rank.
            let mut experts_comms: Vec<Option<Arc<dyn Communicator>>> = vec![None; world];
            if per_group < world && opts.enable_expert_parallel {
                experts_comms = communicators(&rank_devices)
                    .0
                    .into_iter()
                    .map(Some)
                    .collect();
            }
            for ((comm, experts_comm), device) in
                comms.into_iter().zip(experts_comms).zip(&rank_devices)
            {
                let rank_weights = weights.on_device(device);
                let rank_ctx = ctx.for_rank(RankContext {
                    comm: comm.clone(),
                    expert_parallel: opts.enable_expert_parallel,
                    redundant_experts: opts.num_redundant_experts,
                    // Replicas of tensor-parallel groups shard within their group.
                    data_parallel: data_parallel && group == 1,
                    experts_comm,
                });
                ranks.push((build(&rank_weights, &rank_ctx)?, comm));
                bytes.push(rank_weights.held_bytes());
            }
            tracing::info!(
                ranks = world,
                expert_parallel = opts.enable_expert_parallel,
                data_parallel,
                devices = ?rank_devices.iter().map(Device::location).collect::<Vec<_>>(),
                collectives = backend,
                rank_weights_gib = ?bytes.iter().map(|&b| b as f64 / (1u64 << 30) as f64).collect::<Vec<_>>(),
                "sharded over {world} ranks (threads of this process, in lock-step)"
            );
            let mut sharded = if data_parallel {
                ShardedModel::grouped(ranks, group)?.data_parallel(opts.enable_expert_parallel)
            } else {
                ShardedModel::new(ranks)?
            }
            .on_devices(rank_devices.clone());
            if opts.enable_expert_parallel && opts.eplb_step_interval > 0 {
                sharded = sharded.with_rebalancing(
                    ctx.expert_load.clone(),
                    opts.eplb_step_interval,
                    opts.eplb_window_size,
                );
            }
            (Box::new(sharded), bytes)
        }
    };
    let weight_bytes = rank_weight_bytes.iter().sum();
    tracing::info!(
        weights_gib = weight_bytes as f64 / (1u64 << 30) as f64,
        weight_bytes,
        online_fp8,
        "memory: weights held after load{}",
        if online_fp8 {
            " (projections in fp8 e4m3 with per-channel f32 scales; embeddings, norms, router, LM head in the model dtype)"
        } else {
            ""
        }
    );
    Ok(LoadedModel {
        weight_bytes,
        rank_weight_bytes,
        expert_load: ctx.expert_load.clone(),
        kernel_calls: ctx.kernel_calls.clone(),
        kv_cache_dtype: match opts.kv_cache_dtype {
            KvCacheDtype::Auto => dtype,
            KvCacheDtype::Fp8E4m3 => DType::F8E4M3,
            KvCacheDtype::Fp8E5m2 => crate::cache::kv_cache::E5M2_STORAGE,
        },
        eos_token_ids: eos_token_ids(&dir, &config)?,
        device: opts.device.clone(),
        rank_devices,
        attention_backend: opts.attention_backend,
        moe_backend: opts.moe_backend,
        dir,
        config,
        model,
        dtype,
        max_model_len,
        task,
    })
}

/// One communicator per rank, and what carries them: NCCL for ranks on separate GPUs where
/// libnccl opens, else threads exchanging tensors (through the host between GPUs).
fn communicators(devices: &[Device]) -> (Vec<Arc<dyn Communicator>>, &'static str) {
    #[cfg(feature = "cuda")]
    if devices.len() > 1 && devices.iter().all(Device::is_cuda) {
        match crate::parallel::nccl::ranks(devices) {
            Ok(ranks) => {
                tracing::info!(
                    nccl = crate::parallel::nccl::version().unwrap_or_default(),
                    "collectives over NCCL"
                );
                let comms = ranks
                    .into_iter()
                    .map(|r| Arc::new(r) as Arc<dyn Communicator>)
                    .collect();
                return (comms, "nccl");
            }
            Err(e) => tracing::warn!(
                "NCCL is not available ({e}); the ranks exchange tensors through host copies, \
                 which is correct but slow"
            ),
        }
    }
    let comms = ThreadGroup::on_devices(devices)
        .into_iter()
        .map(|r| Arc::new(r) as Arc<dyn Communicator>)
        .collect();
    (comms, "threads")
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use super::*;

    #[test]
    fn quantization_flag_must_match_the_checkpoint() {
        let int4 = Some(WeightQuantization::PackedInt {
            num_bits: 4,
            group_size: Some(32),
            symmetric: true,
        });
        let fp8 = Some(WeightQuantization::Fp8Block([128, 128]));
        let ct = QuantizationRequest::Checkpoint("compressed-tensors");
        assert!(check_quantization(QuantizationRequest::Auto, int4).is_ok());
        assert!(check_quantization(ct, int4).is_ok());
        assert!(check_quantization(QuantizationRequest::Fp8, fp8).is_ok());
        let err = check_quantization(QuantizationRequest::Fp8, int4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("compressed-tensors") && err.contains("auto"),
            "{err}"
        );
        let err = check_quantization(ct, None).unwrap_err().to_string();
        assert!(err.contains("unquantized"), "{err}");
        // fp8 on an unquantized checkpoint is online FP8; on a block-FP8 one, the checkpoint as is.
        assert!(check_quantization(QuantizationRequest::Fp8, None).unwrap());
        assert!(!check_quantization(QuantizationRequest::Fp8, fp8).unwrap());
    }

    #[test]
    fn dtype_names() {
        assert_eq!(parse_dtype("auto").unwrap(), None);
        assert_eq!(parse_dtype("bfloat16").unwrap(), Some(DType::BF16));
        assert_eq!(parse_dtype("float32").unwrap(), Some(DType::F32));
        let err = parse_dtype("float8").unwrap_err().to_string();
        assert!(err.contains("float8") && err.contains("bfloat16"), "{err}");
    }

    /// On the CPU `auto` follows the weights' stored dtype: a bf16 checkpoint stays bf16, f32
    /// stays f32, f16 and dummy weights compute in f32; a GPU follows `torch_dtype`.
    #[test]
    fn auto_dtype_on_the_cpu_is_the_stored_one() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/qwen3-tiny");
        let files = safetensors_files(&dir).unwrap();
        let stored = crate::loading::checkpoint::stored_float_dtype(&files).unwrap();
        assert_eq!(
            stored,
            Some(DType::BF16),
            "the tiny checkpoints are stored in bf16"
        );
        let cfg = read_config(&dir, None).unwrap();
        let cpu = Device::Cpu;
        for (stored, want) in [
            (Some(DType::BF16), DType::BF16),
            (Some(DType::F32), DType::F32),
            (Some(DType::F16), DType::F32),
            (None, DType::F32),
        ] {
            assert_eq!(resolve_dtype(None, &cfg, &cpu, stored).unwrap(), want);
        }
        // Counted in elements: an f32 checkpoint with a few bf16 tensors is f32.
        let path =
            std::env::temp_dir().join(format!("ember-f32-{}.safetensors", std::process::id()));
        let tensors = std::collections::HashMap::from([
            (
                "w".to_string(),
                Tensor::zeros((8, 8), DType::F32, &cpu).unwrap(),
            ),
            (
                "n".to_string(),
                Tensor::zeros(8, DType::BF16, &cpu).unwrap(),
            ),
        ]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let stored = crate::loading::checkpoint::stored_float_dtype(std::slice::from_ref(&path));
        std::fs::remove_file(&path).ok();
        assert_eq!(stored.unwrap(), Some(DType::F32));
        let asked = resolve_dtype(Some(DType::F32), &cfg, &cpu, Some(DType::BF16)).unwrap();
        assert_eq!(asked, DType::F32, "--dtype wins");
    }
}
