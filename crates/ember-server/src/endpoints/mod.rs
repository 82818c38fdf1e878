//! The handlers, one file per endpoint family, and the few helpers they share.

pub(crate) mod chat;
mod chat_output;
mod chat_tools;
pub(crate) mod completions;
pub(crate) mod embeddings;
pub(crate) mod lora;
pub(crate) mod models;
mod prompt_input;
mod render;
mod stream;

use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{parse_body, PerfMetrics, SamplingFields, Usage};
use crate::choice::Generated;
use crate::engine::ModelLimits;
use crate::error::ApiError;
use crate::generation::Timing;
use crate::sampling::GenerationPlan;
use crate::state::{AppState, ModelTarget};
use crate::structured::OutputFormat;
use render::EchoSpan;

/// A generation request after the checks every endpoint makes.
struct ParsedRequest<T> {
    /// The shared fields.
    fields: SamplingFields,
    /// The endpoint's own fields.
    own: T,
    limits: ModelLimits,
    plan: GenerationPlan,
    options: ResponseOptions,
    /// The LoRA adapter `model` names, in memory; `None` for the base model.
    adapter: Option<String>,
}

/// How to shape the answer, beyond what to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ResponseOptions {
    stream: bool,
    include_usage: bool,
    echo: Option<EchoSpan>,
    return_token_ids: bool,
    raw_output: bool,
    perf_metrics: bool,
}

impl ResponseOptions {
    fn from_fields(fields: &SamplingFields) -> Self {
        let echo = match (fields.echo_last, fields.echo) {
            (Some(n), _) if n > 0 => Some(EchoSpan::Last(usize::try_from(n).unwrap_or(usize::MAX))),
            (_, Some(true)) => Some(EchoSpan::All),
            _ => None,
        };
        Self {
            stream: fields.stream.unwrap_or(false),
            include_usage: fields
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            echo,
            return_token_ids: fields.return_token_ids.unwrap_or(false),
            raw_output: fields.raw_output.unwrap_or(false),
            perf_metrics: fields.perf_metrics_in_response.unwrap_or(false),
        }
    }
}

/// Parses both views of the body, checks `model` and validates the sampling fields; last, when
/// `model` names a LoRA adapter, brings it into memory (from disk if it was evicted).
async fn parse_generation_request<T: DeserializeOwned>(
    state: &AppState,
    body: &[u8],
) -> Result<ParsedRequest<T>, ApiError> {
    let fields: SamplingFields = parse_body(body)?;
    let own: T = parse_body(body)?;
    let target = state.resolve_model(&fields.model)?;
    let format = OutputFormat::from_response_format(fields.response_format.as_ref())?;
    let limits = state.shared().engine.limits();
    let mut plan = GenerationPlan::from_fields(&fields, limits)?;
    if let Some(format) = format {
        plan.params.constraint = Some(compile_format(state, format, "response_format").await?);
    }
    Ok(ParsedRequest {
        options: ResponseOptions::from_fields(&fields),
        adapter: adapter_of(state, target).await?,
        fields,
        own,
        limits,
        plan,
    })
}

/// The adapter a request runs with, made resident so that submitting it reads no file. It was
/// unloaded since `model` was resolved: 404, as if it had never been there.
async fn adapter_of(state: &AppState, target: ModelTarget) -> Result<Option<String>, ApiError> {
    let ModelTarget::Adapter(name) = target else {
        return Ok(None);
    };
    let Some(manager) = state.shared().engine.lora().cloned() else {
        return Err(ApiError::internal(
            "a LoRA adapter was resolved on a server without LoRA",
        ));
    };
    run_blocking(move || {
        manager
            .make_resident(&name)
            .map(|()| Some(name))
            .map_err(ApiError::from_ember)
    })
    .await
}

/// Compiles an output format off the async workers (the first one also builds the
/// tokenizer's trie); a grammar that does not compile is a 400 on `param`.
pub(crate) async fn compile_format(
    state: &AppState,
    format: OutputFormat,
    param: &'static str,
) -> Result<ember_core::Constraint, ApiError> {
    let state = state.clone();
    run_blocking(move || {
        let shared = state.shared();
        let limits = shared.engine.limits();
        let compiler = shared.grammars.get(
            &shared.tokenizer,
            &shared.engine.eos_token_ids(),
            limits.vocab_size,
        )?;
        format.compile(compiler, param)
    })
    .await
}

/// Runs CPU-heavy request preparation (template rendering, tokenizing long prompts) off the
/// async workers.
async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))?
}

/// Lowest logprob reported: JSON has no -inf (vLLM reports the same floor).
const LOGPROB_FLOOR: f32 = -9999.0;

/// A logprob fit for JSON.
fn reported_logprob(logprob: f32) -> f32 {
    logprob.max(LOGPROB_FLOOR)
}

/// A fresh response id such as `cmpl-3f2a...`.
fn response_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Usage of a request whose prompts have `prompt_lens` tokens and each gave `n` choices
/// (prompt-major in `generated`): prompts count once, cached tokens as the first choice saw them.
fn usage<'a>(
    prompt_lens: &[usize],
    n: usize,
    generated: impl IntoIterator<Item = &'a Generated>,
) -> Usage {
    let (mut completion, mut cached) = (0, 0);
    for (i, g) in generated.into_iter().enumerate() {
        completion += g.token_ids.len();
        if i % n.max(1) == 0 {
            cached += g.cached_prompt_tokens;
        }
    }
    Usage::new(prompt_lens.iter().sum(), completion, cached)
}

/// Fireworks' `perf_metrics` of a request.
fn perf_metrics(usage: &Usage, timing: Timing) -> PerfMetrics {
    PerfMetrics {
        prompt_tokens: usage.prompt_tokens,
        cached_prompt_tokens: usage.prompt_tokens_details.cached_tokens,
        server_time_to_first_token: timing.time_to_first_token.as_secs_f64(),
        server_processing_time: timing.processing.as_secs_f64(),
    }
}

/// A plain JSON answer with Fireworks' `fireworks-*` timing headers.
fn json_with_perf_headers(body: &impl Serialize, usage: &Usage, timing: Timing) -> Response {
    let mut response = Json(body).into_response();
    let metrics = perf_metrics(usage, timing);
    let headers = [
        ("fireworks-prompt-tokens", metrics.prompt_tokens.to_string()),
        (
            "fireworks-cached-prompt-tokens",
            metrics.cached_prompt_tokens.to_string(),
        ),
        (
            "fireworks-server-time-to-first-token",
            format!("{:.6}", metrics.server_time_to_first_token),
        ),
        (
            "fireworks-server-processing-time",
            format!("{:.6}", metrics.server_processing_time),
        ),
    ];
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
    response
}
