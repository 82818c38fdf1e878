//! Command-line flags shared by the commands that load a model. Names follow vLLM's where
//! vLLM has the same knob, so its users' scripts carry over.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use ember_engine::{EngineConfig, LoraConfig};
use ember_models::{LoadFormat, LoadOptions};

/// The bundled demo model: `models/qwen3-moe-tiny` under the working directory, else in the
/// source tree the binary was built from.
pub fn default_model() -> String {
    let local = PathBuf::from("models/qwen3-moe-tiny");
    if local.join("config.json").is_file() {
        return local.to_string_lossy().into_owned();
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/qwen3-moe-tiny")
        .to_string_lossy()
        .into_owned()
}

/// Which checkpoint to load and how.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Checkpoint directory or Hugging Face Hub id in the local cache (default: the bundled demo model).
    #[arg(long)]
    pub model: Option<String>,
    /// Directory with tokenizer.json and the chat template (default: the model's own), e.g.
    /// for a `--load-format dummy` config that ships none.
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Weight and activation dtype: auto (the checkpoint's on GPU, float32 on CPU), bfloat16, float16 or float32.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Weight quantization: auto (what config.json's quantization_config says: block fp8,
    /// compressed-tensors pack-quantized INT4/INT8, NVFP4, MXFP4, modelopt NVFP4, GPTQ, AWQ), or
    /// the method the checkpoint must have (fp8, compressed-tensors, modelopt, gptq, awq). fp8 on an unquantized
    /// checkpoint is online FP8: attention, MLP and expert projections quantized at load to e4m3
    /// with one scale per output channel.
    #[arg(long, default_value = "auto")]
    pub quantization: String,
    /// `auto`/`safetensors` reads the weights; `dummy` makes random ones from config.json.
    #[arg(long, default_value = "auto")]
    pub load_format: String,
    /// JSON object merged over config.json, e.g. '{"num_hidden_layers": 2}'.
    #[arg(long)]
    pub hf_overrides: Option<String>,
    /// Longest prompt + completion in tokens (default: the model's max_position_embeddings).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Seed of dummy weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// What to serve: auto (embed for an embedding checkpoint such as Qwen3-Embedding, detected
    /// from its sentence-transformers pooling files or a bare `*Model` architecture; else
    /// generate), generate, or embed (`/v1/embeddings` only). vLLM's `--runner pooling` works too.
    #[arg(long, alias = "runner", default_value = "auto")]
    pub task: String,
    /// KV cache element type: auto (the model dtype), fp8 / fp8_e4m3 (e4m3), or fp8_e5m2: one
    /// byte per element, scaled by the checkpoint's k/v scales (1.0 without them, as vLLM) and
    /// dequantized when attention reads it.
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: String,
    /// With --kv-cache-dtype fp8: compute each attention layer's cache scales from the first
    /// keys and values it writes (max |k| / 200, max |v| / 100, as vLLM) instead of taking the
    /// checkpoint's or 1.0.
    #[arg(long)]
    pub calculate_kv_scales: bool,
    /// Where the model runs: auto, cpu, or cuda[:N]. auto is GPU 0 when ember was built with
    /// `--features cuda` and a GPU opens, else the CPU; cuda on a CPU-only build is an error.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Attention: tensor (candle's ops on a GPU; the default) or ember (ember's paged attention
    /// kernel on a GPU, and MLA's decodes through ember's MLA kernel, its CPU reference on the
    /// CPU; f32/bf16 caches). Other attention on the CPU runs ember's CPU kernel or the tensor path.
    #[arg(long, default_value = "tensor")]
    pub attention_backend: String,
    /// Routed experts: auto (the default: fused on the CPU, experts on a GPU), experts (each
    /// expert's MLP over its rows, routed on the host) or fused (router, alignment, grouped GEMMs
    /// and weighted sum as ember's fused MoE kernels, logits kept on the device; for dense
    /// f32/bf16 experts or packed ones without expert parallelism, the rest run as experts; a
    /// fused layer counts /metrics' per-expert tokens on the GPU, read when scraped). On the CPU
    /// the fused experts run as ember's blocked CPU kernel, on every core.
    #[arg(long, default_value = "auto")]
    pub moe_backend: String,
    /// RMSNorm (fused with the residual add before it), SiLU-and-mul (over one fused gate/up
    /// GEMM) and RoPE: candle (candle's ops; the default) or ember (ember's kernels, for f32 and
    /// bf16; on the CPU their references).
    #[arg(long, default_value = "candle")]
    pub layer_kernels: String,
    /// Block-FP8 projections (DeepSeek-V3, Kimi K2, Qwen3 -FP8 checkpoints, 128-input scale
    /// blocks): w8a16 (activations in the model dtype, weights decoded in the GEMM; the default)
    /// or w8a8 (activations quantized per token and 128-input group to e4m3, FP8 tensor cores on
    /// sm_89 and up, as the checkpoints were trained; w8a16 on a GPU without them, with a warning).
    #[arg(long, default_value = "w8a16")]
    pub fp8_gemm: String,
    /// Hold 4-bit (INT4, GPTQ, AWQ, NVFP4, MXFP4) and FP8 (block FP8, online --quantization
    /// fp8) projections as stored and multiply them by ember's packed kernels (`--packed-weights`
    /// or `true`, the default on every device), or dequantize them at load to the model dtype
    /// (`false`: 2 or 4 bytes a weight).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub packed_weights: Option<bool>,
    /// Ranks to shard the model over (tensor parallelism: attention heads, MLP channels and the
    /// vocabulary split, one all-reduce per block). Without GPUs the ranks are threads of this
    /// process over the in-process collectives backend.
    #[arg(long, short = 't', default_value_t = 1)]
    pub tensor_parallel_size: usize,
    /// Ranks that each serve their own requests with the whole model and their own KV cache
    /// (data parallelism); with --enable-expert-parallel they partition the routed experts and
    /// meet in them (DeepSeek's DP attention: MLA's latent cache is not replicated). With
    /// --tensor-parallel-size T each is a replica sharded over T ranks (the experts, with
    /// --enable-expert-parallel, partitioned over all of them).
    #[arg(long, short = 'd', visible_alias = "dp", default_value_t = 1)]
    pub data_parallel_size: usize,
    /// Partition routed experts across the ranks (expert parallelism: tokens sent to their
    /// experts' owners by all-to-all, shared experts replicated) instead of splitting each.
    #[arg(long)]
    pub enable_expert_parallel: bool,
    /// Expert-parallel load balancing (DeepSeek's EPLB): every --eplb-step-interval steps,
    /// re-place the experts (and their --num-redundant-experts copies) over the ranks for the
    /// per-expert load seen since the last time.
    #[arg(long)]
    pub enable_eplb: bool,
    /// With --enable-eplb: extra expert slots over the expert-parallel ranks, each holding a
    /// copy of a hot expert; a token routed to a copied expert goes to one of its copies. The
    /// routed experts plus these must split evenly over the ranks.
    #[arg(long, default_value_t = 0)]
    pub num_redundant_experts: usize,
    /// With --enable-eplb: engine steps between re-placements.
    #[arg(long, default_value_t = 3000)]
    pub eplb_step_interval: u64,
    /// With --enable-eplb: each re-placement weighs the load of this many last steps (at most
    /// the interval).
    #[arg(long, default_value_t = 1000)]
    pub eplb_window_size: u64,
    /// vLLM's newer form of the EPLB flags, a JSON object with any of `window_size`,
    /// `step_interval`, `num_redundant_experts` (and `log_balancedness`, accepted and ignored:
    /// /metrics shows the balance); its keys win over the flags above.
    #[arg(long)]
    pub eplb_config: Option<String>,
    /// Tokens per KV cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Memory for the KV cache, in GiB. Default: 1 GiB on the CPU; on a GPU, what
    /// --gpu-memory-utilization leaves.
    #[arg(long)]
    pub kv_cache_memory: Option<f64>,
    /// On a GPU, the share of its memory ember may use (weights, step activations and the KV
    /// cache, which gets the rest), as vLLM's flag of the same name.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Number of KV cache blocks (overrides --kv-cache-memory).
    #[arg(long)]
    pub num_gpu_blocks_override: Option<usize>,
    /// Most sequences in one step.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Most tokens (prefill chunks plus decodes) in one step.
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Requests allowed to wait for room; past it new requests get 429 with Retry-After.
    #[arg(long, default_value_t = 4096)]
    pub max_waiting_requests: usize,
    /// Turn off reuse of KV blocks across requests that share a prompt prefix.
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// Run every step eagerly: no CUDA graphs for decode steps.
    #[arg(long)]
    pub enforce_eager: bool,
    /// Batch sizes whose decode steps are captured as CUDA graphs, each the first time a step
    /// of up to that many sequences comes (a step of n runs in the smallest size >= n), e.g.
    /// `1,2,4,8`. Default: 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, those up
    /// to --max-num-seqs and it. Graphs serve a model on one GPU with --attention-backend ember
    /// (and --moe-backend fused for an MoE); other steps and models run eagerly.
    #[arg(long, value_delimiter = ',')]
    pub cuda_graph_sizes: Vec<usize>,
    #[command(flatten)]
    pub lora: LoraArgs,
}

/// LoRA serving limits (vLLM's flags of the same names).
#[derive(Args, Debug, Clone)]
pub struct LoraArgs {
    /// Serve LoRA adapters: requests pick one by `model`; adapters come from --lora-modules or
    /// `POST /v1/load_lora_adapter`.
    #[arg(long)]
    pub enable_lora: bool,
    /// Most distinct adapters in one engine step (with --enable-lora).
    #[arg(long, default_value_t = 8)]
    pub max_loras: usize,
    /// Adapters kept in host memory, least recently used dropped first and read again on next
    /// use; at least --max-loras (default: 32, or --max-loras if larger).
    #[arg(long)]
    pub max_cpu_loras: Option<usize>,
    /// Largest adapter rank accepted (with --enable-lora).
    #[arg(long, default_value_t = 64)]
    pub max_lora_rank: usize,
}

/// `--max-cpu-loras` when not given.
const DEFAULT_MAX_CPU_LORAS: usize = 32;

impl LoraArgs {
    /// The engine's LoRA limits; `None` without --enable-lora.
    pub fn config(&self) -> Result<Option<LoraConfig>> {
        if !self.enable_lora {
            return Ok(None);
        }
        if self.max_loras == 0 || self.max_lora_rank == 0 {
            bail!("--max-loras and --max-lora-rank must be at least 1");
        }
        let max_cpu_loras = self
            .max_cpu_loras
            .unwrap_or(DEFAULT_MAX_CPU_LORAS.max(self.max_loras));
        if max_cpu_loras < self.max_loras {
            bail!(
                "--max-cpu-loras {max_cpu_loras} is below --max-loras {}: adapters of one step \
                 must all fit in memory; raise --max-cpu-loras or lower --max-loras",
                self.max_loras
            );
        }
        Ok(Some(LoraConfig {
            max_loras: self.max_loras,
            max_cpu_loras,
            max_lora_rank: self.max_lora_rank,
        }))
    }
}

/// One adapter of `--lora-modules`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    /// The name requests use as `model`.
    pub name: String,
    /// The PEFT adapter directory.
    pub path: PathBuf,
    /// The served base model name it belongs to (vLLM's JSON form); any served name is accepted.
    pub base_model_name: Option<String>,
}

/// Parses one `--lora-modules` value: `name=path`, or vLLM's JSON
/// `{"name": ..., "path": ..., "base_model_name": ...}`.
pub fn parse_lora_module(value: &str) -> std::result::Result<LoraModule, String> {
    let value = value.trim();
    if value.starts_with('{') {
        return parse_lora_module_json(value);
    }
    match value.split_once('=') {
        Some((name, path)) if !name.trim().is_empty() && !path.trim().is_empty() => {
            Ok(LoraModule {
                name: name.trim().to_string(),
                path: PathBuf::from(path.trim()),
                base_model_name: None,
            })
        }
        _ => Err(format!(
            "expected name=path or a JSON object {{\"name\": ..., \"path\": ...}}, got {value:?}"
        )),
    }
}

fn parse_lora_module_json(value: &str) -> std::result::Result<LoraModule, String> {
    let json: serde_json::Value =
        serde_json::from_str(value).map_err(|e| format!("invalid JSON {value:?}: {e}"))?;
    let object = json
        .as_object()
        .ok_or_else(|| format!("expected a JSON object, got {value}"))?;
    let string = |key: &str| -> std::result::Result<Option<String>, String> {
        match object.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
            Some(other) => Err(format!("\"{key}\" must be a non-empty string, got {other}")),
        }
    };
    for key in object.keys() {
        // vLLM's is_3d_lora_weight is accepted and not needed: fused expert adapters are
        // recognised from their tensors.
        if !["name", "path", "base_model_name", "is_3d_lora_weight"].contains(&key.as_str()) {
            return Err(format!(
                "unknown key \"{key}\" in {value}; use name, path and base_model_name"
            ));
        }
    }
    let required =
        |key: &str| string(key)?.ok_or_else(|| format!("\"{key}\" is missing in {value}"));
    Ok(LoraModule {
        name: required("name")?,
        path: PathBuf::from(required("path")?),
        base_model_name: string("base_model_name")?,
    })
}

impl ModelArgs {
    /// The model path or id, defaulting to the demo model.
    pub fn model_name(&self) -> String {
        self.model.clone().unwrap_or_else(default_model)
    }

    /// Where tokenizer.json and the chat template are read from.
    pub fn tokenizer_dir(&self, model_dir: &std::path::Path) -> PathBuf {
        self.tokenizer
            .clone()
            .unwrap_or_else(|| model_dir.to_path_buf())
    }

    /// Loader options from the flags.
    /// The EPLB flags, with `--eplb-config`'s keys over them.
    fn eplb_settings(&self) -> Result<EplbSettings> {
        let mut settings = EplbSettings {
            window_size: self.eplb_window_size,
            step_interval: self.eplb_step_interval,
            num_redundant_experts: self.num_redundant_experts as u64,
        };
        if let Some(json) = &self.eplb_config {
            let value: serde_json::Value = serde_json::from_str(json)
                .map_err(|e| anyhow::anyhow!("--eplb-config is not JSON: {e}"))?;
            let Some(object) = value.as_object() else {
                bail!("--eplb-config must be a JSON object, not {value}");
            };
            for (key, v) in object {
                let field = match key.as_str() {
                    "window_size" => &mut settings.window_size,
                    "step_interval" => &mut settings.step_interval,
                    "num_redundant_experts" => &mut settings.num_redundant_experts,
                    // vLLM logs the balance with it; ember's /metrics always shows it.
                    "log_balancedness" if v.is_boolean() => continue,
                    other => bail!(
                        "--eplb-config has no key {other:?}; use window_size, step_interval, \
                         num_redundant_experts or log_balancedness"
                    ),
                };
                *field = v.as_u64().ok_or_else(|| {
                    anyhow::anyhow!("--eplb-config {key} must be a non-negative integer, not {v}")
                })?;
            }
        }
        Ok(settings)
    }

    pub fn load_options(&self) -> Result<LoadOptions> {
        let mut opts = LoadOptions::new(self.model_name());
        opts.dtype = ember_models::loader::parse_dtype(&self.dtype)?;
        opts.load_format = match self.load_format.as_str() {
            "auto" | "safetensors" => LoadFormat::Safetensors,
            "dummy" => LoadFormat::Dummy,
            other => bail!("unknown --load-format {other:?}; use auto, safetensors or dummy"),
        };
        opts.hf_overrides = self
            .hf_overrides
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .context("--hf-overrides is not valid JSON")?;
        opts.max_model_len = self.max_model_len;
        opts.seed = self.seed;
        opts.task = ember_core::ModelTask::parse(&self.task)?;
        opts.quantization = ember_core::QuantizationRequest::parse(&self.quantization)?;
        opts.kv_cache_dtype = ember_core::KvCacheDtype::parse(&self.kv_cache_dtype)?;
        opts.calculate_kv_scales = self.calculate_kv_scales;
        if self.calculate_kv_scales && opts.kv_cache_dtype == ember_core::KvCacheDtype::Auto {
            tracing::warn!("--calculate-kv-scales has no effect without --kv-cache-dtype fp8");
        }
        opts.device = parse_device(&self.device)?;
        opts.attention_backend =
            ember_models::backends::AttentionBackend::parse(&self.attention_backend)?;
        opts.moe_backend = ember_models::backends::MoeBackend::parse(&self.moe_backend)?;
        opts.layer_kernels = ember_models::backends::LayerKernels::parse(&self.layer_kernels)?;
        opts.fp8_gemm = ember_models::backends::Fp8Gemm::parse(&self.fp8_gemm)?;
        opts.packed_weights = self.packed_weights;
        if self.tensor_parallel_size == 0 {
            bail!("--tensor-parallel-size must be at least 1");
        }
        opts.tensor_parallel_size = self.tensor_parallel_size;
        if self.data_parallel_size == 0 {
            bail!("--data-parallel-size must be at least 1");
        }
        opts.data_parallel_size = self.data_parallel_size;
        opts.enable_expert_parallel = self.enable_expert_parallel;
        let eplb = self.eplb_settings()?;
        if eplb.num_redundant_experts > 0 && !self.enable_eplb {
            bail!("--num-redundant-experts needs --enable-eplb (as vLLM), with --enable-expert-parallel");
        }
        if self.enable_eplb {
            if !(self.enable_expert_parallel
                && self.tensor_parallel_size * self.data_parallel_size > 1)
            {
                bail!("--enable-eplb needs --enable-expert-parallel over more than one rank (--tensor-parallel-size or --data-parallel-size above 1)");
            }
            if eplb.step_interval == 0 || eplb.window_size == 0 {
                bail!("--eplb-step-interval and --eplb-window-size must be positive");
            }
            if eplb.window_size > eplb.step_interval {
                bail!(
                    "--eplb-window-size {} is longer than --eplb-step-interval {}",
                    eplb.window_size,
                    eplb.step_interval
                );
            }
            opts.eplb_step_interval = eplb.step_interval;
            opts.eplb_window_size = eplb.window_size;
        }
        opts.num_redundant_experts = usize::try_from(eplb.num_redundant_experts)
            .context("--num-redundant-experts is too large")?;
        Ok(opts)
    }

    /// Engine sizes from the flags.
    pub fn engine_config(&self) -> Result<EngineConfig> {
        if self.block_size == 0 || self.max_num_seqs == 0 || self.max_num_batched_tokens == 0 {
            bail!("--block-size, --max-num-seqs and --max-num-batched-tokens must be positive");
        }
        let kv_cache_memory = self.kv_cache_memory.unwrap_or(1.0);
        if !kv_cache_memory.is_finite() || kv_cache_memory <= 0.0 {
            bail!("--kv-cache-memory must be a positive number of GiB");
        }
        let utilization = self.gpu_memory_utilization;
        if !(utilization > 0.0 && utilization <= 1.0) {
            bail!("--gpu-memory-utilization {utilization} must be in (0, 1]");
        }
        Ok(EngineConfig {
            block_size: self.block_size,
            num_blocks: self.num_gpu_blocks_override,
            kv_cache_bytes: (kv_cache_memory * (1u64 << 30) as f64) as usize,
            // An explicit --kv-cache-memory wins; the engine ignores this on the CPU.
            gpu_memory_utilization: self.kv_cache_memory.is_none().then_some(utilization),
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            enable_prefix_caching: !self.no_enable_prefix_caching,
            max_waiting_requests: self.max_waiting_requests,
            lora: self.lora.config()?,
            // Sampled tokens drawn where the logits are on a GPU, on the host on the CPU.
            device_sampling: None,
            cuda_graph_sizes: self.cuda_graph_sizes()?,
        })
    }

    /// The decode batch sizes to capture as CUDA graphs (none under --enforce-eager).
    pub fn cuda_graph_sizes(&self) -> Result<Vec<usize>> {
        if self.enforce_eager {
            return Ok(Vec::new());
        }
        if self.cuda_graph_sizes.is_empty() {
            return Ok(ember_models::step::cuda_graph::default_sizes(
                self.max_num_seqs,
            ));
        }
        if let Some(bad) = self
            .cuda_graph_sizes
            .iter()
            .find(|&&s| s == 0 || s > self.max_num_seqs)
        {
            bail!(
                "--cuda-graph-sizes {bad}: each size must be between 1 and --max-num-seqs ({})",
                self.max_num_seqs
            );
        }
        Ok(self.cuda_graph_sizes.clone())
    }
}

/// Parses `--device`: `cpu`; `cuda`/`cuda:N`, a GPU this build must be able to open; `auto`, GPU 0
/// if one opens, else the CPU.
pub fn parse_device(name: &str) -> Result<candle_core::Device> {
    let lower = name.to_ascii_lowercase();
    let ordinal = match lower.as_str() {
        "cpu" => return Ok(candle_core::Device::Cpu),
        "auto" => return Ok(ember_models::device::auto_device()),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("unknown --device {name:?}; use auto, cpu, cuda or cuda:N"),
        },
    };
    Ok(ember_models::device::open_cuda(ordinal)?)
}

/// `--enable-eplb`'s schedule and copies, from the flags and `--eplb-config`.
#[derive(Debug, PartialEq, Eq)]
struct EplbSettings {
    window_size: u64,
    step_interval: u64,
    num_redundant_experts: u64,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        lora: LoraArgs,
    }

    fn lora_config(args: &[&str]) -> Result<Option<LoraConfig>> {
        Cli::try_parse_from(std::iter::once("ember").chain(args.iter().copied()))?
            .lora
            .config()
    }

    #[derive(Parser)]
    struct ModelCli {
        #[command(flatten)]
        model: ModelArgs,
    }

    fn eplb(args: &[&str]) -> Result<EplbSettings> {
        let argv = ["ember", "--model", "m"]
            .into_iter()
            .chain(args.iter().copied());
        ModelCli::try_parse_from(argv)?.model.eplb_settings()
    }

    #[test]
    fn eplb_config_json_wins_over_the_flags_and_unknown_keys_are_named() {
        let flags = ["--eplb-window-size", "10", "--num-redundant-experts", "4"];
        assert_eq!(
            eplb(&flags).unwrap(),
            EplbSettings {
                window_size: 10,
                step_interval: 3000,
                num_redundant_experts: 4
            }
        );
        let json = r#"{"window_size": 500, "num_redundant_experts": 32, "log_balancedness": true}"#;
        let both = [&flags[..], &["--eplb-config", json]].concat();
        assert_eq!(
            eplb(&both).unwrap(),
            EplbSettings {
                window_size: 500,
                step_interval: 3000,
                num_redundant_experts: 32
            }
        );
        let err = eplb(&["--eplb-config", r#"{"windowsize": 5}"#])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no key \"windowsize\""), "{err}");
        let err = eplb(&["--eplb-config", r#"{"step_interval": -1}"#])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("step_interval must be a non-negative integer"),
            "{err}"
        );
        assert!(eplb(&["--eplb-config", "[1]"]).is_err());
        assert!(eplb(&["--eplb-config", r#"{"log_balancedness": 1}"#]).is_err());
    }

    fn graph_sizes(args: &[&str]) -> Result<Vec<usize>> {
        let argv = ["ember", "--model", "m"]
            .into_iter()
            .chain(args.iter().copied());
        ModelCli::try_parse_from(argv)?.model.cuda_graph_sizes()
    }

    #[test]
    fn cuda_graph_sizes_default_to_the_batch_cap_and_enforce_eager_turns_them_off() {
        assert_eq!(
            graph_sizes(&[]).unwrap(),
            ember_models::step::cuda_graph::DEFAULT_SIZES.to_vec()
        );
        assert_eq!(
            graph_sizes(&["--max-num-seqs", "20"]).unwrap(),
            vec![1, 2, 4, 8, 16, 20]
        );
        assert_eq!(
            graph_sizes(&["--cuda-graph-sizes", "8,1,4"]).unwrap(),
            vec![8, 1, 4]
        );
        assert!(graph_sizes(&["--enforce-eager"]).unwrap().is_empty());
        assert!(graph_sizes(&["--enforce-eager", "--cuda-graph-sizes", "4"])
            .unwrap()
            .is_empty());
        let err = graph_sizes(&["--max-num-seqs", "8", "--cuda-graph-sizes", "4,16"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--cuda-graph-sizes 16"), "{err}");
        assert!(graph_sizes(&["--cuda-graph-sizes", "0"]).is_err());
        assert!(graph_sizes(&["--cuda-graph-sizes", "x"]).is_err());
    }

    #[test]
    fn packed_weights_is_unset_a_bare_flag_or_a_bool() {
        let packed = |args: &[&str]| {
            let argv = ["ember", "--model", "m"]
                .into_iter()
                .chain(args.iter().copied());
            ModelCli::try_parse_from(argv).map(|c| c.model.load_options().unwrap().packed_weights)
        };
        assert_eq!(packed(&[]).unwrap(), None);
        assert_eq!(packed(&["--packed-weights"]).unwrap(), Some(true));
        assert_eq!(packed(&["--packed-weights", "false"]).unwrap(), Some(false));
        assert!(packed(&["--packed-weights", "maybe"]).is_err());
    }

    #[test]
    fn device_names_are_checked_and_cuda_is_a_clear_error_on_a_cpu_build() {
        assert!(parse_device("CPU").unwrap().is_cpu());
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("unknown --device"), "{err}");
        assert!(parse_device("tpu").is_err());
        if ember_models::device::cuda_built() {
            return;
        }
        assert!(parse_device("auto").unwrap().is_cpu());
        for gpu in ["cuda", "cuda:1"] {
            let err = parse_device(gpu).unwrap_err().to_string();
            assert!(
                err.contains("CPU only") && err.contains("--device cpu"),
                "{err}"
            );
        }
    }

    #[test]
    fn lora_limits_default_to_vllm_like_values_and_only_with_enable_lora() {
        assert!(lora_config(&[]).unwrap().is_none());
        let c = lora_config(&["--enable-lora"]).unwrap().unwrap();
        assert_eq!((c.max_loras, c.max_cpu_loras, c.max_lora_rank), (8, 32, 64));
        // The host cache grows with --max-loras unless given.
        let c = lora_config(&["--enable-lora", "--max-loras", "40"])
            .unwrap()
            .unwrap();
        assert_eq!((c.max_loras, c.max_cpu_loras), (40, 40));
        let c = lora_config(&[
            "--enable-lora",
            "--max-cpu-loras",
            "100",
            "--max-lora-rank",
            "8",
        ])
        .unwrap()
        .unwrap();
        assert_eq!((c.max_cpu_loras, c.max_lora_rank), (100, 8));
        let e = lora_config(&["--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--max-cpu-loras 2 is below --max-loras 4"),
            "{e}"
        );
        assert!(lora_config(&["--enable-lora", "--max-lora-rank", "0"]).is_err());
    }

    #[test]
    fn lora_modules_take_name_equals_path_and_vllm_json() {
        assert_eq!(
            parse_lora_module("sql=/adapters/sql-lora").unwrap(),
            LoraModule {
                name: "sql".into(),
                path: "/adapters/sql-lora".into(),
                base_model_name: None
            }
        );
        // Only the first '=' splits: paths may hold more.
        assert_eq!(
            parse_lora_module("a=dir/x=1,y").unwrap().path,
            PathBuf::from("dir/x=1,y")
        );
        assert_eq!(
            parse_lora_module(
                r#"{"name": "sql", "path": "/a/b", "base_model_name": "qwen3-tiny", "is_3d_lora_weight": false}"#
            )
            .unwrap(),
            LoraModule {
                name: "sql".into(),
                path: "/a/b".into(),
                base_model_name: Some("qwen3-tiny".into())
            }
        );
        assert_eq!(
            parse_lora_module(r#"{"name": "a", "path": "p", "base_model_name": null}"#)
                .unwrap()
                .base_model_name,
            None
        );
    }

    #[test]
    fn bad_lora_modules_say_what_is_wrong() {
        for (value, expected) in [
            ("sql", "expected name=path"),
            ("=path", "expected name=path"),
            ("sql=", "expected name=path"),
            ("{\"name\": \"a\"", "invalid JSON"),
            (r#"{"name": "a"}"#, "\"path\" is missing"),
            (
                r#"{"name": 1, "path": "p"}"#,
                "\"name\" must be a non-empty string",
            ),
            (
                r#"{"name": "a", "path": "p", "rank": 8}"#,
                "unknown key \"rank\"",
            ),
        ] {
            let e = parse_lora_module(value).unwrap_err();
            assert!(e.contains(expected), "{value}: {e}");
        }
    }
}
