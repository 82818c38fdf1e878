//! The server's narrow view of the engine, so routes can be tested against a fake one.

use std::sync::Arc;

use ember_core::{ModelTask, RequestOutput, Result, SamplingParams};
use ember_engine::{EngineHandle, ExpertLoadSnapshot, LoraManager, StatsSnapshot};
use tokio::sync::mpsc::UnboundedReceiver;

/// What the HTTP side must know of the model to validate a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ModelLimits {
    /// Longest prompt + completion, in tokens.
    pub max_model_len: usize,
    /// Token ids must be below this (prompts given as ids, `logit_bias`, `stop_token_ids`).
    pub vocab_size: usize,
}

/// Submits token-level requests; implemented by [`EngineHandle`] and by tests' fake engine.
pub(crate) trait EngineClient: Send + Sync + 'static {
    /// The model's limits.
    fn limits(&self) -> ModelLimits;

    /// The model's end-of-sequence ids (a choice may end on one).
    fn eos_token_ids(&self) -> Vec<u32>;

    /// Length of the model's embeddings when it serves them (`--task embed`); `None` for a model
    /// that generates.
    fn embedding_size(&self) -> Option<usize> {
        None
    }

    /// Queues a request, run with the LoRA adapter registered as `adapter` when one is named;
    /// outputs stream on the receiver, dropping it cancels the request.
    fn submit(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        adapter: Option<&str>,
    ) -> Result<UnboundedReceiver<RequestOutput>>;

    /// The engine's live counters (running, waiting, KV blocks, ...), for `/metrics`.
    fn stats(&self) -> StatsSnapshot;

    /// The registered LoRA adapters; `None` when the engine runs without `--enable-lora`.
    fn lora(&self) -> Option<&Arc<LoraManager>>;

    /// Tokens routed to each expert of each MoE layer so far, when the model has experts.
    fn expert_load(&self) -> Option<ExpertLoadSnapshot> {
        None
    }
}

impl EngineClient for EngineHandle {
    fn limits(&self) -> ModelLimits {
        let info = self.info();
        ModelLimits {
            max_model_len: info.max_model_len,
            vocab_size: info.vocab_size,
        }
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.info().eos_token_ids.clone()
    }

    fn embedding_size(&self) -> Option<usize> {
        let info = self.info();
        (info.task == ModelTask::Embed).then_some(info.hidden_size)
    }

    fn submit(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        adapter: Option<&str>,
    ) -> Result<UnboundedReceiver<RequestOutput>> {
        EngineHandle::submit_with_adapter(self, prompt, params, adapter)
    }

    fn stats(&self) -> StatsSnapshot {
        EngineHandle::stats(self)
    }

    fn lora(&self) -> Option<&Arc<LoraManager>> {
        EngineHandle::lora(self)
    }

    fn expert_load(&self) -> Option<ExpertLoadSnapshot> {
        Some(EngineHandle::expert_load(self))
    }
}
