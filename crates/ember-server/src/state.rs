//! What every handler shares: the configuration, the engine, the tokenizer and chat template.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember_core::{EmberError, Result};
use ember_engine::{EngineHandle, LoraInfo, LoraManager};

use crate::api::unix_now;
use crate::chat_template::ChatTemplate;
use crate::engine::EngineClient;
use crate::error::ApiError;
use crate::metrics::ServerMetrics;
use crate::reasoning_parser::ReasoningFormat;
use crate::shutdown::Lifecycle;
use crate::structured::LazyCompiler;
use crate::tokenizer::TextTokenizer;
use crate::tool_parser::ToolCallFormat;

/// How the server presents the model and guards its API.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// Names a request's `model` may use; the first is the canonical one. Empty: the model
    /// directory's name.
    pub served_model_names: Vec<String>,
    /// When set, `/v1` and `/inference/v1` require `Authorization: Bearer <api_key>`.
    pub api_key: Option<String>,
    /// The model directory: `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`.
    pub model_dir: PathBuf,
    /// config.json's `model_type`, which picks the default parsers.
    pub model_type: String,
    /// `--tool-call-parser`: how the model's tool calls are read back.
    pub tool_call_parser: ParserChoice<ToolCallFormat>,
    /// `--reasoning-parser`: how the model's thinking is split from its answer.
    pub reasoning_parser: ParserChoice<ReasoningFormat>,
}

/// A parser flag: picked from the model, turned off, or named.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ParserChoice<T> {
    /// The model's own, from its `model_type` and chat template (none if it has none).
    #[default]
    Auto,
    /// No parsing: the raw text stays in `content`.
    Off,
    /// This one.
    Use(T),
}

impl<T: Copy> ParserChoice<T> {
    /// The parser in effect, `detected` standing for the model's own.
    pub fn resolve(self, detected: impl FnOnce() -> Option<T>) -> Option<T> {
        match self {
            Self::Auto => detected(),
            Self::Off => None,
            Self::Use(format) => Some(format),
        }
    }
}

/// The handlers' shared state; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

pub(crate) struct Shared {
    pub config: ServerConfig,
    pub engine: Arc<dyn EngineClient>,
    pub tokenizer: Arc<TextTokenizer>,
    /// `None` for a model without a chat template (chat requests get a 400).
    pub chat_template: Option<ChatTemplate>,
    /// Unix seconds at start, the `created` of the model cards.
    pub started: u64,
    pub metrics: ServerMetrics,
    /// Draining state and running requests, for graceful shutdown.
    pub lifecycle: Lifecycle,
    /// The grammar compiler for structured output, built on first use.
    pub grammars: LazyCompiler,
    /// How tool calls are read from the output; `None`: requests with tools are refused.
    pub tool_format: Option<ToolCallFormat>,
    /// How thinking is split from the answer; `None`: it stays in `content`.
    pub reasoning_format: Option<ReasoningFormat>,
}

impl AppState {
    /// Loads the tokenizer and chat template from `config.model_dir` and serves through `engine`.
    pub fn new(config: ServerConfig, engine: EngineHandle) -> Result<Self> {
        let tokenizer = TextTokenizer::from_dir(&config.model_dir)?;
        let chat_template = ChatTemplate::from_dir(&config.model_dir)?;
        if chat_template.is_none() {
            tracing::warn!(
                "{} has no chat template: /v1/chat/completions will refuse requests",
                config.model_dir.display()
            );
        }
        Ok(Self::from_parts(
            config,
            Arc::new(engine),
            tokenizer,
            chat_template,
        ))
    }

    pub(crate) fn from_parts(
        mut config: ServerConfig,
        engine: Arc<dyn EngineClient>,
        tokenizer: TextTokenizer,
        chat_template: Option<ChatTemplate>,
    ) -> Self {
        if config.served_model_names.is_empty() {
            let dir_name = config
                .model_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned());
            config
                .served_model_names
                .push(dir_name.unwrap_or_else(|| "ember".into()));
        }
        let template = chat_template.as_ref().map(ChatTemplate::source);
        let tool_format = config
            .tool_call_parser
            .resolve(|| ToolCallFormat::detect(&config.model_type, template));
        let reasoning_format = config
            .reasoning_parser
            .resolve(|| ReasoningFormat::detect(&config.model_type, template));
        tracing::info!(
            "tool-call parser: {}; reasoning parser: {}",
            tool_format.map_or("none", ToolCallFormat::name),
            reasoning_format.map_or("none", ReasoningFormat::name)
        );
        Self {
            inner: Arc::new(Shared {
                tool_format,
                reasoning_format,
                config,
                metrics: ServerMetrics::new(engine.clone()),
                lifecycle: Lifecycle::default(),
                grammars: LazyCompiler::default(),
                engine,
                tokenizer: Arc::new(tokenizer),
                chat_template,
                started: unix_now(),
            }),
        }
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.inner
    }

    /// The base model's served names, canonical first.
    pub fn served_model_names(&self) -> &[String] {
        &self.inner.config.served_model_names
    }

    /// What a request's `model` refers to: a LoRA adapter's name is tried before the base
    /// model's, each exactly and then in the `accounts/<acct>/models/<name>` form; an unknown
    /// name is a 404 naming what is served.
    pub(crate) fn resolve_model(
        &self,
        requested: &str,
    ) -> std::result::Result<ModelTarget, ApiError> {
        let names = &self.inner.config.served_model_names;
        let lora = self.inner.engine.lora();
        let bare = requested.split('#').next().unwrap_or(requested);
        if lora.is_some_and(|m| m.contains(bare)) {
            return Ok(ModelTarget::Adapter(bare.to_string()));
        }
        if names.iter().any(|n| n == bare) {
            return Ok(ModelTarget::Base);
        }
        let adapters: Vec<String> = lora
            .map(|m| m.list().into_iter().map(|info| info.name).collect())
            .unwrap_or_default();
        if let Some(name) = find_model(&adapters, requested) {
            return Ok(ModelTarget::Adapter(name.to_string()));
        }
        if find_model(names, requested).is_some() {
            return Ok(ModelTarget::Base);
        }
        let served: Vec<String> = names.iter().cloned().chain(adapters).collect();
        Err(ApiError::model_not_found(requested, &served))
    }

    /// The LoRA manager; an error telling how to enable LoRA when the server runs without it.
    pub(crate) fn lora_manager(&self) -> Result<&Arc<LoraManager>> {
        self.inner.engine.lora().ok_or_else(|| {
            EmberError::InvalidRequest(
                "LoRA adapters are not enabled on this server; restart it with --enable-lora"
                    .into(),
            )
        })
    }

    /// Registers the PEFT adapter in directory `path` under `name`, which requests then use as
    /// `model`. Reads and checks the adapter's files, so it blocks: call it off async workers.
    /// Errors name the fault: LoRA not enabled, a name taken (by an adapter or the base model),
    /// not an adapter directory, an adapter that does not fit the model, a rank too high.
    pub fn load_lora_adapter(&self, name: &str, path: &Path) -> Result<LoraInfo> {
        let manager = self.lora_manager()?;
        if find_model(self.served_model_names(), name).is_some() {
            return Err(EmberError::InvalidRequest(format!(
                "The lora adapter '{name}' conflicts with a served base model; pick another lora_name"
            )));
        }
        if name.contains('#') || name.trim() != name {
            return Err(EmberError::InvalidRequest(format!(
                "Invalid 'lora_name': {name:?} may not contain '#' or begin or end with whitespace"
            )));
        }
        manager.load(name, path)
    }

    /// Forgets adapter `name`; requests already running with it finish. A `NotFound` error when
    /// no adapter has that name.
    pub fn unload_lora_adapter(&self, name: &str) -> Result<()> {
        self.lora_manager()?.unload(name)
    }
}

/// What a request's `model` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ModelTarget {
    /// The base model, by one of its served names.
    Base,
    /// The registered LoRA adapter of this name.
    Adapter(String),
}

/// Matches `requested` against `names`: exactly, or in Fireworks' `accounts/<acct>/models/<name>`
/// form (a `#<deployment>` suffix ignored) by the name or the last segment of a served name.
fn find_model<'a>(names: &'a [String], requested: &str) -> Option<&'a str> {
    let requested = requested.split('#').next().unwrap_or(requested);
    if let Some(name) = names.iter().find(|n| n.as_str() == requested) {
        return Some(name);
    }
    let short = fireworks_model_name(requested)?;
    names
        .iter()
        .find(|n| n.as_str() == short || n.rsplit('/').next() == Some(short))
        .map(String::as_str)
}

/// `<name>` of `accounts/<acct>/models/<name>`.
fn fireworks_model_name(full: &str) -> Option<&str> {
    let rest = full.strip_prefix("accounts/")?;
    let (account, rest) = rest.split_once('/')?;
    let name = rest.strip_prefix("models/")?;
    (!account.is_empty() && !name.is_empty() && !name.contains('/')).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_match_exactly_or_in_fireworks_form() {
        let names = vec!["qwen3-tiny".to_string(), "Qwen/Qwen3-30B-A3B".to_string()];
        assert_eq!(find_model(&names, "qwen3-tiny"), Some("qwen3-tiny"));
        assert_eq!(
            find_model(&names, "Qwen/Qwen3-30B-A3B"),
            Some("Qwen/Qwen3-30B-A3B")
        );
        assert_eq!(
            find_model(&names, "accounts/fireworks/models/qwen3-tiny"),
            Some("qwen3-tiny")
        );
        assert_eq!(
            find_model(
                &names,
                "accounts/me/models/qwen3-tiny#accounts/me/deployments/d1"
            ),
            Some("qwen3-tiny")
        );
        assert_eq!(
            find_model(&names, "accounts/me/models/Qwen3-30B-A3B"),
            Some("Qwen/Qwen3-30B-A3B")
        );
        assert_eq!(find_model(&names, "qwen3"), None);
        assert_eq!(find_model(&names, "accounts/me/models/"), None);
        assert_eq!(find_model(&names, "accounts//models/qwen3-tiny"), None);
    }
}
