//! OpenAI/Fireworks request and response bodies (see `shared/API.md`). Unknown fields are
//! accepted and ignored, as OpenAI clients send many.

pub mod chat;
pub mod completions;
pub mod embeddings;
mod json_body;

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use json_body::JsonBody;

use crate::error::ApiError;

/// Request fields shared by `/completions` and `/chat/completions`: which model, how to
/// sample, when to stop. Each endpoint parses its own fields from the same body.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    /// A served model name, or its `accounts/<acct>/models/<name>` form.
    pub model: String,
    /// Most tokens to generate.
    pub max_tokens: Option<u64>,
    /// Alias of `max_tokens` (newer OpenAI name).
    pub max_completion_tokens: Option<u64>,
    /// 0 to 2; 0 is greedy.
    pub temperature: Option<f32>,
    /// Nucleus mass in (0, 1].
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens; 0 or -1 disables.
    pub top_k: Option<i64>,
    /// Minimum probability relative to the most likely token.
    pub min_p: Option<f32>,
    /// Number of choices per prompt.
    pub n: Option<u32>,
    /// Seed for reproducible sampling; choice i of n uses `seed + i`.
    pub seed: Option<i64>,
    /// Up to 4 stop strings; the output ends before the first one found.
    pub stop: Option<StopStrings>,
    /// -2 to 2.
    pub presence_penalty: Option<f32>,
    /// -2 to 2.
    pub frequency_penalty: Option<f32>,
    /// Multiplicative penalty on seen tokens; 1 disables.
    pub repetition_penalty: Option<f32>,
    /// Token id (as a string) to a bias in -100..100 added to its logit.
    pub logit_bias: Option<HashMap<String, f32>>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: Option<bool>,
    /// Generate at least this many tokens before stopping on eos or stop ids.
    pub min_tokens: Option<u64>,
    /// Token ids that end the completion.
    pub stop_token_ids: Option<Vec<u32>>,
    /// Leave special tokens out of the text (default true).
    pub skip_special_tokens: Option<bool>,
    /// Answer with server-sent events, one chunk per piece of text.
    pub stream: Option<bool>,
    /// `{"include_usage": true}`: every chunk carries `"usage": null` and one last chunk with
    /// no choices carries the usage.
    pub stream_options: Option<StreamOptions>,
    /// Fireworks: `truncate` (default) lowers `max_tokens` to fit the context, `error` refuses.
    pub context_length_exceeded_behavior: Option<String>,
    /// Echo the prompt before the completion (completions; Fireworks also chat).
    pub echo: Option<bool>,
    /// Fireworks: echo only the prompt's last N tokens.
    pub echo_last: Option<u64>,
    /// Fireworks: `token_ids` on each choice and the prompt's `prompt_token_ids`.
    pub return_token_ids: Option<bool>,
    /// Fireworks: `raw_output` on each choice (the prompt and completion as the model saw them).
    pub raw_output: Option<bool>,
    /// Fireworks: `perf_metrics` in the body, or in the last chunk of a stream.
    pub perf_metrics_in_response: Option<bool>,
    /// `{"type": "text"}`; the structured types are refused until they are supported.
    pub response_format: Option<serde_json::Value>,
    /// An end-user id; accepted and ignored.
    pub user: Option<String>,
    /// Key-value tags; accepted and ignored.
    pub metadata: Option<serde_json::Value>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Add a final chunk with the usage (and `"usage": null` on the others).
    pub include_usage: Option<bool>,
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum StopStrings {
    /// `"stop": "\n"`
    One(String),
    /// `"stop": ["\n", "User:"]`
    Many(Vec<String>),
}

/// Token counts of a response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens, counted once per prompt (not per choice).
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// Sum of the two.
    pub total_tokens: usize,
    /// Breakdown of the prompt tokens.
    pub prompt_tokens_details: PromptTokensDetails,
    /// Breakdown of the completion tokens, when a reasoning parser applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

/// How many completion tokens were thinking.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionTokensDetails {
    /// Tokens of the reasoning, its closing tag included.
    pub reasoning_tokens: usize,
}

/// How many prompt tokens were served from the prefix cache.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

impl Usage {
    /// Usage from its three counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
            completion_tokens_details: None,
        }
    }
}

/// A choice's logprobs in the format the request asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ChoiceLogprobs {
    /// OpenAI chat: `{content: [{token, logprob, bytes, top_logprobs}], refusal}`.
    Chat(chat::ChatLogprobs),
    /// Legacy completions (also chat with Fireworks' integer `logprobs`).
    Legacy(completions::CompletionLogprobs),
}

/// Fireworks' `perf_metrics` (`perf_metrics_in_response`); times in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerfMetrics {
    /// Tokens in the prompts.
    #[serde(rename = "prompt-tokens")]
    pub prompt_tokens: usize,
    /// Of those, tokens served from the prefix cache.
    #[serde(rename = "cached-prompt-tokens")]
    pub cached_prompt_tokens: usize,
    /// From the request's arrival to its first generated token.
    #[serde(rename = "server-time-to-first-token")]
    pub server_time_to_first_token: f64,
    /// From the request's arrival to its end.
    #[serde(rename = "server-processing-time")]
    pub server_processing_time: f64,
}

/// Fireworks' `raw_output`: what the model saw and produced, before any parsing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawOutput {
    /// The prompt as rendered (one fragment: the whole prompt text).
    pub prompt_fragments: Vec<String>,
    /// The prompt's token ids.
    pub prompt_token_ids: Vec<u32>,
    /// Every generated token decoded, special tokens included.
    pub completion: String,
    /// Every generated token id.
    pub completion_token_ids: Vec<u32>,
}

/// One server-sent event of a stream; `object` is `chat.completion.chunk` or `text_completion`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamChunk<C> {
    /// The same for every chunk of a stream.
    pub id: String,
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model as the request named it.
    pub model: String,
    /// One choice per chunk; none in the usage chunk of `include_usage`.
    pub choices: Vec<C>,
    /// The prompt's token ids, in the first chunk (chat with `return_token_ids`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// Left out, `null` (every chunk but the last with `include_usage`) or the usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    /// With `perf_metrics_in_response`, on the chunk that carries the usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perf_metrics: Option<PerfMetrics>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    /// One card per served name.
    pub data: Vec<ModelCard>,
}

/// One served model (OpenAI `Model`, plus vLLM's `root`, `parent`, `max_model_len`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The name requests use as `model`.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix seconds when the server started.
    pub created: u64,
    /// Always `ember`.
    pub owned_by: String,
    /// Where the weights came from (the model directory).
    pub root: String,
    /// The base model of an adapter; null for a base model.
    pub parent: Option<String>,
    /// Context window in tokens.
    pub max_model_len: usize,
}

/// Parses one view of a request body; a type error names the field (`Invalid 'n': ...`).
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::invalid_request(
            "The request body must be a JSON object",
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let top_level = |p: &str| p.split(['.', '[']).next().unwrap_or(p).to_string();
        let message = inner.to_string();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::invalid_request(format!(
                "The request body is not valid JSON: {message}"
            ));
        }
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(field, _)| field)
        {
            let full = if path == "." {
                field.to_string()
            } else {
                format!("{path}.{field}")
            };
            return ApiError::invalid_param(
                &top_level(&full),
                format!("Missing required parameter: '{full}'"),
            );
        }
        if path == "." {
            ApiError::invalid_request(format!("Invalid request body: {message}"))
        } else {
            ApiError::invalid_param(&top_level(&path), format!("Invalid '{path}': {message}"))
        }
    })
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_ignored_and_stop_takes_both_forms() {
        let f: SamplingFields =
            parse_body(br#"{"model":"m","stop":"\n","store":true,"metadata":{"a":1},"top_k":-1}"#)
                .unwrap();
        assert_eq!(f.model, "m");
        assert_eq!(f.stop, Some(StopStrings::One("\n".into())));
        assert_eq!(f.top_k, Some(-1));
        let f: SamplingFields =
            parse_body(br#"{"model":"m","stop":["a","b"],"temperature":1}"#).unwrap();
        assert_eq!(
            f.stop,
            Some(StopStrings::Many(vec!["a".into(), "b".into()]))
        );
        assert_eq!(f.temperature, Some(1.0));
    }

    #[test]
    fn type_errors_name_the_field() {
        let e = parse_body::<SamplingFields>(br#"{"model":"m","max_tokens":"ten"}"#).unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert_eq!(e.body.error.param.as_deref(), Some("max_tokens"));
        assert!(e
            .body
            .error
            .message
            .starts_with("Invalid 'max_tokens': invalid type: string"));
        let e =
            parse_body::<SamplingFields>(br#"{"model":"m","stop_token_ids":[1,-2]}"#).unwrap_err();
        assert_eq!(e.body.error.param.as_deref(), Some("stop_token_ids"));
    }

    #[test]
    fn malformed_json_is_a_400_without_param() {
        let e = parse_body::<SamplingFields>(br#"{"model": "m""#).unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert_eq!(e.body.error.param, None);
        let e = parse_body::<SamplingFields>(br#"{"temperature": 1}"#).unwrap_err();
        assert_eq!(e.body.error.message, "Missing required parameter: 'model'");
        assert_eq!(e.body.error.param.as_deref(), Some("model"));
        let e = parse_body::<SamplingFields>(b"[1]").unwrap_err();
        assert_eq!(
            e.body.error.message,
            "The request body must be a JSON object"
        );
    }

    #[test]
    fn usage_totals() {
        let u = Usage::new(7, 3, 2);
        assert_eq!(u.total_tokens, 10);
        assert_eq!(
            serde_json::to_value(&u).unwrap(),
            serde_json::json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
                               "prompt_tokens_details": {"cached_tokens": 2}})
        );
    }
}
