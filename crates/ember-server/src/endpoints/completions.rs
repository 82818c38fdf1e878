//! `POST /v1/completions`: raw prompts (text or token ids), optional echo, legacy logprobs
//! and `best_of`, as one JSON body or as a stream of chunks.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::Response;
use serde_json::Value;

use super::prompt_input::{parse_prompt_input, PromptInput as Prompt};
use super::render::{raw_output, ChoiceRenderer, Echo, LogprobsFormat};
use super::stream::{sse_response, ChunkWriter, StreamSpec};
use super::{
    json_with_perf_headers, parse_generation_request, perf_metrics, response_id, run_blocking,
    usage, ParsedRequest, ResponseOptions,
};
use crate::api::completions::{CompletionChoice, CompletionFields, CompletionResponse};
use crate::api::{unix_now, JsonBody, RawOutput};
use crate::choice::{ChoiceJob, Delta, Generated};
use crate::error::ApiError;
use crate::generation::Generation;
use crate::state::AppState;
use crate::tokenizer::TextTokenizer;

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: usize = 16;
/// Most alternatives the legacy `logprobs` may ask for.
const MAX_LEGACY_LOGPROBS: u64 = 5;
/// Most candidates `best_of` may ask for (OpenAI's limit).
const MAX_BEST_OF: u32 = 20;

/// The handler.
pub(crate) async fn completions(
    State(state): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let in_flight = state.shared().lifecycle.enter()?;
    let ParsedRequest {
        fields,
        own,
        limits,
        mut plan,
        options,
        adapter,
    } = parse_generation_request::<CompletionFields>(&state, &body).await?;
    let shared = state.shared();
    if own.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param(
            "suffix",
            "Invalid 'suffix': insertion is not supported; send the request without 'suffix'",
        ));
    }
    let best_of = best_of(own.best_of, plan.n, options.stream)?;
    let logprobs = legacy_logprobs_count(own.logprobs.as_ref())?;
    // Ranking by cumulative logprob needs the sampled tokens' logprobs even when not returned.
    plan.params.logprobs = logprobs.or((best_of > plan.n).then_some(0));
    if options.echo.is_some() {
        plan.params.prompt_logprobs = logprobs;
    }
    let prompts = {
        let state = state.clone();
        run_blocking(move || {
            parse_prompts(own.prompt, &state.shared().tokenizer, limits.vocab_size)
        })
        .await?
    };

    let mut jobs = Vec::with_capacity(prompts.len() * best_of);
    for prompt in &prompts {
        let max_tokens = plan.max_tokens_for(
            prompt.ids.len(),
            Some(DEFAULT_MAX_TOKENS),
            limits.max_model_len,
            "prompt",
        )?;
        for index in 0..best_of {
            jobs.push(ChoiceJob {
                prompt_ids: prompt.ids.clone(),
                params: plan.choice_params(max_tokens.max(1), index),
                stop: plan.stop.clone(),
                skip_special_tokens: plan.skip_special_tokens,
                prompt_only: max_tokens == 0,
            });
        }
    }
    let generation = Generation::start(&state, &jobs, adapter, started, in_flight)?;
    let format = logprobs.map(|top| LogprobsFormat::Legacy { top });
    let prompt_lens: Vec<usize> = prompts.iter().map(|p| p.ids.len()).collect();
    let mut writer =
        CompletionWriter::new(shared.tokenizer.clone(), prompts, plan.n, format, options);
    if options.stream {
        let spec = StreamSpec::new(
            "cmpl",
            "text_completion",
            fields.model,
            &options,
            prompt_lens,
            plan.n,
        );
        return Ok(sse_response(generation, writer, spec));
    }

    let (generated, timing) = generation.run_to_end().await?;
    // Every candidate counts: `best_of` costs what it generates.
    let usage = usage(&prompt_lens, best_of, &generated);
    let choices = generated
        .chunks(best_of)
        .flat_map(|candidates| best_candidates(candidates, plan.n))
        .enumerate()
        .map(|(index, g)| writer.whole(index, g))
        .collect();
    let body = CompletionResponse {
        id: response_id("cmpl"),
        object: "text_completion".into(),
        created: unix_now(),
        model: fields.model,
        choices,
        perf_metrics: options.perf_metrics.then(|| perf_metrics(&usage, timing)),
        usage,
    };
    Ok(json_with_perf_headers(&body, &body.usage, timing))
}

/// `best_of`: candidates per prompt, at least `n`; more than `n` cannot stream, since the best
/// are known only at the end.
fn best_of(requested: Option<u32>, n: usize, stream: bool) -> Result<usize, ApiError> {
    let Some(best_of) = requested.filter(|&b| b > 0) else {
        return Ok(n);
    };
    let invalid = |message: String| Err(ApiError::invalid_param("best_of", message));
    if best_of > MAX_BEST_OF {
        return invalid(format!(
            "Invalid 'best_of': expected a value between 1 and {MAX_BEST_OF}, got {best_of}"
        ));
    }
    let best_of = best_of as usize;
    if best_of < n {
        return invalid(format!(
            "Invalid 'best_of': it must be at least n ({n}), got {best_of}"
        ));
    }
    if stream && best_of > n {
        return invalid(
            "Invalid 'best_of': a stream cannot pick the best candidates; send best_of equal to n or stream: false"
                .into(),
        );
    }
    Ok(best_of)
}

/// The `n` candidates with the highest cumulative logprob, best first.
fn best_candidates(candidates: &[Generated], n: usize) -> Vec<&Generated> {
    let mut ranked: Vec<&Generated> = candidates.iter().collect();
    if candidates.len() > n {
        ranked.sort_by(|a, b| b.cumulative_logprob().total_cmp(&a.cumulative_logprob()));
        ranked.truncate(n);
    }
    ranked
}

/// Shapes a request's choices, whole or as stream chunks; choice `i` answers prompt `i / n`.
struct CompletionWriter {
    tokenizer: Arc<TextTokenizer>,
    prompts: Vec<Prompt>,
    n: usize,
    renderers: Vec<ChoiceRenderer>,
    options: ResponseOptions,
}

impl CompletionWriter {
    fn new(
        tokenizer: Arc<TextTokenizer>,
        prompts: Vec<Prompt>,
        n: usize,
        logprobs: Option<LogprobsFormat>,
        options: ResponseOptions,
    ) -> Self {
        let renderers = prompts
            .iter()
            .flat_map(|prompt| {
                let echo = options
                    .echo
                    .map(|span| Echo::of(span, &prompt.ids, prompt.text.as_deref(), &tokenizer));
                std::iter::repeat_n(echo, n)
            })
            .map(|echo| {
                ChoiceRenderer::new(tokenizer.clone(), echo, logprobs, options.return_token_ids)
            })
            .collect();
        Self {
            tokenizer,
            prompts,
            n,
            renderers,
            options,
        }
    }

    /// Choice `index` of a plain response.
    fn whole(&mut self, index: usize, g: &Generated) -> CompletionChoice {
        self.choice(index, Delta::whole(g), g)
    }

    /// Choice `index` with `delta` as its text; `g` is the choice so far.
    fn choice(&mut self, index: usize, delta: Delta, g: &Generated) -> CompletionChoice {
        let piece = self.renderers[index].piece(delta, g.prompt_logprobs.as_deref());
        let prompt = &self.prompts[index / self.n];
        let finished = piece.finish_reason.is_some();
        CompletionChoice {
            text: piece.text,
            index,
            logprobs: piece.logprobs,
            finish_reason: piece.finish_reason.map(|r| r.as_str().into()),
            prompt_token_ids: (self.options.return_token_ids && piece.first)
                .then(|| prompt.ids.clone()),
            token_ids: piece.token_ids,
            raw_output: (self.options.raw_output && finished).then(|| self.raw_output(prompt, g)),
        }
    }

    fn raw_output(&self, prompt: &Prompt, g: &Generated) -> RawOutput {
        let text = match &prompt.text {
            Some(text) => text.clone(),
            None => self
                .tokenizer
                .decode(&prompt.ids, false)
                .unwrap_or_default(),
        };
        raw_output(&self.tokenizer, &text, &prompt.ids, g)
    }
}

impl ChunkWriter for CompletionWriter {
    type Choice = CompletionChoice;

    fn opening(&mut self, _choices: usize) -> Vec<CompletionChoice> {
        Vec::new()
    }

    /// One chunk per update; the last carries the finish reason with the last text.
    fn update(
        &mut self,
        index: usize,
        delta: Delta,
        generated: &Generated,
    ) -> Vec<CompletionChoice> {
        vec![self.choice(index, delta, generated)]
    }
}

/// The `logprobs` field: an int 0-5, or a bool (Fireworks; `true` reads as 1, as pydantic does).
fn legacy_logprobs_count(value: Option<&Value>) -> Result<Option<usize>, ApiError> {
    let value = match value {
        None | Some(Value::Null) | Some(Value::Bool(false)) => return Ok(None),
        Some(Value::Bool(true)) => return Ok(Some(1)),
        Some(value) => value,
    };
    match value.as_u64() {
        Some(k) if k <= MAX_LEGACY_LOGPROBS => Ok(Some(k as usize)),
        _ => Err(ApiError::invalid_param(
            "logprobs",
            format!("Invalid 'logprobs': expected an integer between 0 and {MAX_LEGACY_LOGPROBS}, got {value}"),
        )),
    }
}

/// `prompt`: a string, a list of strings, a token list, or a list of token lists.
fn parse_prompts(
    value: Option<Value>,
    tokenizer: &TextTokenizer,
    vocab_size: usize,
) -> Result<Vec<Prompt>, ApiError> {
    parse_prompt_input(value, "prompt", |text| tokenizer.encode(text), vocab_size)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testing::byte_level_tokenizer;

    fn prompts(value: Value) -> Result<Vec<Prompt>, ApiError> {
        parse_prompts(Some(value), &byte_level_tokenizer(), 300)
    }

    #[test]
    fn prompt_forms() {
        let one = prompts(json!("hello")).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].text.as_deref(), Some("hello"));
        assert_eq!(one[0].ids, [crate::testing::HELLO]);
        assert_eq!(prompts(json!(["a", "b"])).unwrap().len(), 2);
        let ids = prompts(json!([1, 2, 3])).unwrap();
        assert_eq!(
            (ids.len(), ids[0].ids.clone(), ids[0].text.clone()),
            (1, vec![1, 2, 3], None)
        );
        let lists = prompts(json!([[1], [2, 3]])).unwrap();
        assert_eq!(lists[1].ids, [2, 3]);
    }

    #[test]
    fn bad_prompts_are_400_on_prompt() {
        for bad in [
            json!([]),
            json!(""),
            json!([1, "a"]),
            json!(["a", 1]),
            json!([[1], 2]),
            json!([-1]),
            json!([300]),
            json!({"a": 1}),
            json!([[]]),
        ] {
            let e = prompts(bad.clone())
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            assert_eq!(e.body.error.param.as_deref(), Some("prompt"), "{bad}");
        }
        let e = parse_prompts(None, &byte_level_tokenizer(), 300)
            .err()
            .unwrap();
        assert_eq!(e.body.error.message, "Missing required parameter: 'prompt'");
    }

    #[test]
    fn logprobs_field() {
        assert_eq!(legacy_logprobs_count(None).unwrap(), None);
        assert_eq!(legacy_logprobs_count(Some(&json!(false))).unwrap(), None);
        assert_eq!(legacy_logprobs_count(Some(&json!(true))).unwrap(), Some(1));
        assert_eq!(legacy_logprobs_count(Some(&json!(0))).unwrap(), Some(0));
        assert_eq!(legacy_logprobs_count(Some(&json!(5))).unwrap(), Some(5));
        assert!(legacy_logprobs_count(Some(&json!(6))).is_err());
        assert!(legacy_logprobs_count(Some(&json!("2"))).is_err());
    }

    fn generated_with(logprobs: &[f32]) -> Generated {
        Generated {
            text: String::new(),
            token_ids: vec![1; logprobs.len()],
            logprobs: logprobs
                .iter()
                .map(|&logprob| ember_core::TokenLogprob {
                    token_id: 1,
                    logprob,
                    top: Vec::new(),
                })
                .collect(),
            prompt_logprobs: None,
            finish_reason: ember_core::FinishReason::Length,
            cached_prompt_tokens: 0,
        }
    }

    #[test]
    fn best_candidates_rank_by_cumulative_logprob() {
        let candidates = [
            generated_with(&[-1.0, -1.0]),
            generated_with(&[-0.5]),
            generated_with(&[-0.1, -0.2]),
        ];
        let best = best_candidates(&candidates, 2);
        assert_eq!(best, [&candidates[2], &candidates[1]]);
        // With as many candidates as choices, order is kept.
        assert_eq!(
            best_candidates(&candidates[..2], 2),
            [&candidates[0], &candidates[1]]
        );
    }

    #[test]
    fn best_of_bounds() {
        assert_eq!(best_of(None, 2, true).unwrap(), 2);
        assert_eq!(best_of(Some(0), 2, false).unwrap(), 2);
        assert_eq!(best_of(Some(5), 2, false).unwrap(), 5);
        assert_eq!(best_of(Some(2), 2, true).unwrap(), 2);
        for (requested, n, stream) in [(1, 2, false), (21, 1, false), (3, 2, true)] {
            let e = best_of(Some(requested), n, stream).unwrap_err();
            assert_eq!(e.body.error.param.as_deref(), Some("best_of"));
        }
    }
}
