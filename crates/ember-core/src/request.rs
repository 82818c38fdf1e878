//! The two types where the HTTP side and the engine meet.

use tokio::sync::mpsc::UnboundedSender;

use crate::sampling::SamplingParams;

/// Why a request stopped generating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence or stop token (or a stop string, decided by the caller).
    Stop,
    /// `max_tokens` reached or the context is full.
    Length,
    /// The engine failed on this request; the message went with the output.
    Error,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Error => "error",
        }
    }
}

/// A token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// Most likely tokens at this position, best first, as (token id, logprob).
    pub top: Vec<(u32, f32)>,
}

/// Work for the engine: token ids in, a channel for the outputs.
#[derive(Debug)]
pub struct EngineRequest {
    /// Unique per engine; chosen by the caller.
    pub id: u64,
    pub prompt_token_ids: Vec<u32>,
    pub params: SamplingParams,
    /// End-of-sequence ids of the model (honoured unless `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    /// The LoRA adapter it runs with, by the name it was registered under; `None` runs the base
    /// model. The engine resolves the name.
    pub lora_name: Option<String>,
    /// Outputs go here; when the receiver is dropped the engine aborts the request.
    pub output: UnboundedSender<RequestOutput>,
}

/// What one engine step produced for one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestOutput {
    pub request_id: u64,
    /// Tokens generated this step (usually one).
    pub new_token_ids: Vec<u32>,
    /// Logprobs of `new_token_ids`, when the request asked for them.
    pub new_logprobs: Vec<TokenLogprob>,
    /// Logprobs of the prompt's tokens (the first is `None`), sent once with the first output.
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    /// An embedding request's result, on its last output: the final-normed hidden state of the
    /// prompt's last token, `hidden_size` floats, not yet L2-normalised.
    pub embedding: Option<Vec<f32>>,
    /// Set on the last output of the request.
    pub finish_reason: Option<FinishReason>,
    /// Error text when `finish_reason` is `Error`.
    pub error: Option<String>,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_prompt_tokens: usize,
    pub completion_tokens: usize,
}
