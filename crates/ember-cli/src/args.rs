//! Command-line flags shared by the commands that load a model. Names follow vLLM's where
//! vLLM has the same knob, so its users' scripts carry over.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use ember_engine::EngineConfig;
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
    /// Tokens per KV cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Memory for the KV cache, in GiB.
    #[arg(long, default_value_t = 1.0)]
    pub kv_cache_memory: f64,
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
        Ok(opts)
    }

    /// Engine sizes from the flags.
    pub fn engine_config(&self) -> Result<EngineConfig> {
        if self.block_size == 0 || self.max_num_seqs == 0 || self.max_num_batched_tokens == 0 {
            bail!("--block-size, --max-num-seqs and --max-num-batched-tokens must be positive");
        }
        if !self.kv_cache_memory.is_finite() || self.kv_cache_memory <= 0.0 {
            bail!("--kv-cache-memory must be a positive number of GiB");
        }
        Ok(EngineConfig {
            block_size: self.block_size,
            num_blocks: self.num_gpu_blocks_override,
            kv_cache_bytes: (self.kv_cache_memory * (1u64 << 30) as f64) as usize,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            enable_prefix_caching: !self.no_enable_prefix_caching,
            max_waiting_requests: self.max_waiting_requests,
            lora: None,
        })
    }
}
