//! The HTTP side's view of the engine: submit requests, read outputs from a channel.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::stats::{EngineStats, ExpertLoadSnapshot, StatsSnapshot};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use ember_core::{EmberError, EngineRequest, ModelTask, RequestOutput, Result, SamplingParams};
use ember_models::LoraAdapter;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::engine::Submission;
use crate::lora::LoraManager;

/// What the HTTP side needs to know about the loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Longest prompt + completion the engine accepts, in tokens.
    pub max_model_len: usize,
    /// End-of-sequence ids (config.json and generation_config.json merged).
    pub eos_token_ids: Vec<u32>,
    pub vocab_size: usize,
    /// Width of the hidden states, the length of an embedding.
    pub hidden_size: usize,
    /// What the model serves: generation requests, or embedding requests only.
    pub task: ModelTask,
}

/// A cheap, clonable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    sender: Sender<Submission>,
    next_id: Arc<AtomicU64>,
    info: Arc<ModelInfo>,
    stats: Arc<EngineStats>,
    max_waiting_requests: usize,
    lora: Option<Arc<LoraManager>>,
}

impl EngineHandle {
    pub(crate) fn new(
        sender: Sender<Submission>,
        info: ModelInfo,
        stats: Arc<EngineStats>,
        max_waiting_requests: usize,
        lora: Option<Arc<LoraManager>>,
    ) -> Self {
        Self {
            sender,
            next_id: Arc::new(AtomicU64::new(1)),
            info: Arc::new(info),
            stats,
            max_waiting_requests,
            lora,
        }
    }

    /// The LoRA manager, when the engine serves adapters (`--enable-lora`).
    pub fn lora(&self) -> Option<&Arc<LoraManager>> {
        self.lora.as_ref()
    }

    /// The engine's live counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Why the engine stopped serving for good, once it has: a rank of a sharded model failed,
    /// every request was ended with the reason, and the server should shut down.
    pub fn failure(&self) -> Option<String> {
        self.stats
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// [`EngineHandle::failure`] as a probe the caller keeps after handing the engine over.
    pub fn failure_probe(&self) -> impl Fn() -> Option<String> + Send + Sync + 'static {
        let stats = self.stats.clone();
        move || {
            stats
                .failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        }
    }

    /// Tokens routed to each expert of each MoE layer so far (load balance).
    pub fn expert_load(&self) -> ExpertLoadSnapshot {
        self.stats.expert_load()
    }

    /// The adapter registered as `name`, for a request to hold while it runs.
    fn adapter(&self, name: &str) -> Result<Arc<LoraAdapter>> {
        let lora = self.lora.as_ref().ok_or_else(|| {
            EmberError::InvalidRequest(format!(
                "the request names LoRA adapter '{name}', but LoRA adapters are not enabled; \
                 restart with --enable-lora"
            ))
        })?;
        lora.get(name)
    }

    /// Facts about the served model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Queues a request; outputs arrive on the returned receiver, the last one with a finish reason.
    /// Dropping the receiver cancels the request.
    pub fn submit(
        &self,
        prompt_token_ids: Vec<u32>,
        params: SamplingParams,
    ) -> Result<UnboundedReceiver<RequestOutput>> {
        self.submit_with_adapter(prompt_token_ids, params, None)
    }

    /// Like [`Self::submit`], running the request with the LoRA adapter registered as `adapter`
    /// (see [`LoraManager::load`]); it runs to its end even if the adapter is unloaded meanwhile.
    /// Reads the adapter from disk if it was evicted from memory (see
    /// [`LoraManager::make_resident`] to do that beforehand, off async workers).
    pub fn submit_with_adapter(
        &self,
        prompt_token_ids: Vec<u32>,
        params: SamplingParams,
        adapter: Option<&str>,
    ) -> Result<UnboundedReceiver<RequestOutput>> {
        params.validate()?;
        match (self.info.task, params.embed) {
            (ModelTask::Generate, true) => {
                return Err(EmberError::InvalidRequest(
                    "This model does not support embeddings; serve an embedding model \
                     (e.g. Qwen3-Embedding, or --task embed)"
                        .into(),
                ))
            }
            (ModelTask::Embed, false) => {
                return Err(EmberError::InvalidRequest(
                    "This model serves embeddings only (--task embed); use /v1/embeddings".into(),
                ))
            }
            _ => {}
        }
        if prompt_token_ids.is_empty() {
            return Err(EmberError::InvalidRequest(
                "the prompt must not be empty".into(),
            ));
        }
        if let Some(bad) = prompt_token_ids
            .iter()
            .find(|&&t| t as usize >= self.info.vocab_size)
        {
            return Err(EmberError::InvalidRequest(format!(
                "token id {bad} in the prompt is out of range for a vocabulary of {}",
                self.info.vocab_size
            )));
        }
        let total = prompt_token_ids.len() + params.max_tokens;
        if total > self.info.max_model_len {
            return Err(EmberError::InvalidRequest(format!(
                "The prompt is too long: {} tokens plus max_tokens {} exceed the model maximum context length: {}",
                prompt_token_ids.len(),
                params.max_tokens,
                self.info.max_model_len
            )));
        }
        let waiting = self.stats.snapshot().waiting;
        if waiting >= self.max_waiting_requests as u64 {
            return Err(EmberError::Overloaded(format!(
                "{waiting} requests are already waiting (--max-waiting-requests {}); retry later",
                self.max_waiting_requests
            )));
        }
        let resolved = adapter.map(|name| self.adapter(name)).transpose()?;
        let (tx, rx) = unbounded_channel();
        let request = EngineRequest {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            prompt_token_ids,
            params,
            eos_token_ids: self.info.eos_token_ids.clone(),
            lora_name: adapter.map(str::to_string),
            output: tx,
        };
        self.stats.unseen.fetch_add(1, Ordering::Relaxed);
        let submission = Submission {
            request,
            adapter: resolved,
        };
        if self.sender.send(submission).is_err() {
            self.stats.unseen.fetch_sub(1, Ordering::Relaxed);
            return Err(EmberError::Unavailable("the engine has stopped".into()));
        }
        Ok(rx)
    }
}
