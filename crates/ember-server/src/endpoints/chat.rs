//! `POST /v1/chat/completions`: messages through the chat template, one assistant reply per
//! choice, as one JSON body or as a stream of chunks.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::Response;
use ember_core::EmberError;
use serde_json::Value;

use super::chat_output::{ReplyFormat, ReplyStream};
use super::chat_tools::{
    forced_call_grammar, thinking_enabled, thinking_kwargs, thinking_requested, ThinkingPrefix,
    ToolChoice, ToolRequest,
};
use super::render::{raw_output, ChoiceRenderer, Echo, LogprobsFormat};
use super::stream::{sse_response, ChunkWriter, StreamSpec};
use super::{
    compile_format, json_with_perf_headers, parse_generation_request, perf_metrics, response_id,
    run_blocking, usage, ParsedRequest, ResponseOptions,
};
use crate::api::chat::{
    ChatChoice, ChatChunkChoice, ChatDelta, ChatFields, ChatMessage, ChatResponse,
};
use crate::api::{unix_now, CompletionTokensDetails, JsonBody};
use crate::choice::{ChoiceJob, Delta, Generated};
use crate::error::ApiError;
use crate::generation::Generation;
use crate::reasoning_parser::prompt_opens_reasoning;
use crate::sampling::GenerationPlan;
use crate::state::AppState;
use crate::structured::OutputFormat;
use crate::tokenizer::TextTokenizer;
use crate::tool_parser::ToolCallFormat;

/// Most alternatives `top_logprobs` may ask for.
const MAX_TOP_LOGPROBS: u32 = 20;
/// Roles `prompt_truncate_len` never drops.
const SYSTEM_ROLES: [&str; 2] = ["system", "developer"];

/// The handler.
pub(crate) async fn chat_completions(
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
    } = parse_generation_request::<ChatFields>(&state, &body).await?;
    let shared = state.shared();
    if plan.requested_max_tokens == Some(0) {
        return Err(ApiError::invalid_param(
            if fields.max_tokens.is_some() {
                "max_tokens"
            } else {
                "max_completion_tokens"
            },
            "Invalid 'max_tokens': a reply needs at least 1 token",
        ));
    }
    let tools = ToolRequest::from_fields(&own)?;
    let thinking = thinking_requested(&own)?;
    let tool_format = match &tools {
        Some(tools) if tools.choice != ToolChoice::None => Some(shared.tool_format.ok_or_else(|| {
            ApiError::invalid_param(
                "tools",
                "Invalid 'tools': this model has no tool-call format; start the server with --tool-call-parser (hermes, deepseek_v3, deepseek_v31 or kimi_k2) to call tools",
            )
        })?),
        _ => None,
    };
    if tools.as_ref().is_some_and(ToolRequest::forced) && plan.params.constraint.is_some() {
        return Err(ApiError::invalid_param(
            "tool_choice",
            "Invalid 'tool_choice': a required tool call cannot be combined with 'response_format'",
        ));
    }
    let logprobs = chat_logprobs(&own)?;
    plan.params.logprobs = logprobs.map(LogprobsFormat::top);
    if options.echo.is_some() {
        plan.params.prompt_logprobs = plan.params.logprobs;
    }

    let template_tools = tools.as_ref().and_then(ToolRequest::template_tools);
    let prompt = {
        let state = state.clone();
        run_blocking(move || chat_prompt(&state, own, template_tools, thinking)).await?
    };
    let reply = reply_format(&state, &prompt, tools.as_ref(), tool_format, &mut plan).await?;
    let max_tokens =
        plan.max_tokens_for(prompt.ids.len(), None, limits.max_model_len, "messages")?;
    let jobs: Vec<ChoiceJob> = (0..plan.n)
        .map(|index| ChoiceJob {
            prompt_ids: prompt.ids.clone(),
            params: plan.choice_params(max_tokens, index),
            stop: plan.stop.clone(),
            skip_special_tokens: plan.skip_special_tokens,
            prompt_only: false,
        })
        .collect();
    let generation = Generation::start(&state, &jobs, adapter, started, in_flight)?;
    let mut writer = ChatWriter::new(
        shared.tokenizer.clone(),
        prompt,
        plan.n,
        logprobs,
        options,
        reply,
    );
    if options.stream {
        let mut spec = StreamSpec::new(
            "chatcmpl",
            "chat.completion.chunk",
            fields.model,
            &options,
            vec![writer.prompt.ids.len()],
            plan.n,
        );
        spec.prompt_token_ids = options.return_token_ids.then(|| writer.prompt.ids.clone());
        return Ok(sse_response(generation, writer, spec));
    }

    let (generated, timing) = generation.run_to_end().await?;
    let mut usage = usage(&[writer.prompt.ids.len()], plan.n, &generated);
    usage.completion_tokens_details = writer.usage_details(generated.iter());
    let choices = generated
        .iter()
        .enumerate()
        .map(|(index, g)| writer.whole(index, g))
        .collect();
    let body = ChatResponse {
        id: response_id("chatcmpl"),
        object: "chat.completion".into(),
        created: unix_now(),
        model: fields.model,
        choices,
        prompt_token_ids: options.return_token_ids.then(|| writer.prompt.ids.clone()),
        perf_metrics: options.perf_metrics.then(|| perf_metrics(&usage, timing)),
        usage,
    };
    Ok(json_with_perf_headers(&body, &body.usage, timing))
}

/// The conversation as the model sees it.
#[derive(Debug, Clone)]
struct ChatPrompt {
    text: String,
    ids: Vec<u32>,
    /// Whether the template was asked to let the model think.
    thinking: bool,
}

/// How the replies are read back (thinking, tool calls), and for a forced call the grammar
/// that decodes it; special tokens are kept when the parsers need them.
async fn reply_format(
    state: &AppState,
    prompt: &ChatPrompt,
    tools: Option<&ToolRequest>,
    tool_format: Option<ToolCallFormat>,
    plan: &mut GenerationPlan,
) -> Result<ReplyFormat, ApiError> {
    let shared = state.shared();
    let reasoning = shared.reasoning_format.is_some();
    let starts_in_reasoning = reasoning && prompt_opens_reasoning(&prompt.text);
    let reply = ReplyFormat::new(
        &shared.tokenizer,
        reasoning,
        starts_in_reasoning,
        tool_format,
        tools.is_none_or(|t| t.parallel),
    );
    if let (Some(forced), Some(format)) = (tools.filter(|t| t.forced()), tool_format) {
        // A thinking model may think before it calls, unless the prompt closed the thinking
        // (Qwen3 without thinking, DeepSeek V3.1's default).
        let closed = prompt.text.trim_end().ends_with("</think>");
        let prefix = match (reasoning, starts_in_reasoning, prompt.thinking && !closed) {
            (false, _, _) => ThinkingPrefix::None,
            (true, true, _) => ThinkingPrefix::Open,
            (true, false, true) => ThinkingPrefix::Optional,
            (true, false, false) => ThinkingPrefix::None,
        };
        let eos = shared.engine.eos_token_ids();
        let grammar = forced_call_grammar(forced, format, &shared.tokenizer, prefix, &eos);
        plan.params.constraint =
            Some(compile_format(state, OutputFormat::Lark(grammar), "tools").await?);
    }
    if hides_markers(&shared.tokenizer, reasoning, tool_format) {
        plan.skip_special_tokens = false;
    }
    Ok(reply)
}

/// Whether decoding with special tokens skipped would hide the markers a parser reads
/// (DeepSeek's and Kimi's tool-call markers are special tokens); then they are kept.
fn hides_markers(
    tokenizer: &TextTokenizer,
    reasoning: bool,
    tools: Option<ToolCallFormat>,
) -> bool {
    let mut markers: Vec<&str> = Vec::new();
    if reasoning {
        markers.extend(["<think>", "</think>"]);
    }
    if let Some(format) = tools {
        markers.push(format.section_start());
    }
    markers.into_iter().any(|marker| {
        tokenizer.token_id(marker).is_some_and(|id| {
            tokenizer
                .decode(&[id], true)
                .is_ok_and(|text| text.is_empty())
        })
    })
}

/// Shapes a request's choices, whole or as stream chunks.
struct ChatWriter {
    tokenizer: Arc<TextTokenizer>,
    prompt: ChatPrompt,
    renderers: Vec<ChoiceRenderer>,
    raw_output: bool,
    reply: ReplyFormat,
    /// Each choice's streaming reader.
    streams: Vec<ReplyStream>,
}

impl ChatWriter {
    fn new(
        tokenizer: Arc<TextTokenizer>,
        prompt: ChatPrompt,
        n: usize,
        logprobs: Option<LogprobsFormat>,
        options: ResponseOptions,
        reply: ReplyFormat,
    ) -> Self {
        let echo = options
            .echo
            .map(|span| Echo::of(span, &prompt.ids, Some(&prompt.text), &tokenizer));
        let renderers = (0..n)
            .map(|_| {
                ChoiceRenderer::new(
                    tokenizer.clone(),
                    echo.clone(),
                    logprobs,
                    options.return_token_ids,
                )
            })
            .collect();
        Self {
            tokenizer,
            prompt,
            renderers,
            raw_output: options.raw_output,
            streams: (0..n).map(|_| reply.stream()).collect(),
            reply,
        }
    }

    /// The thinking tokens of all choices, when a reasoning parser applies.
    fn usage_details<'a>(
        &self,
        generated: impl IntoIterator<Item = &'a Generated>,
    ) -> Option<CompletionTokensDetails> {
        let mut total = None;
        for g in generated {
            if let Some(n) = self.reply.reasoning_tokens(&self.tokenizer, &g.token_ids) {
                *total.get_or_insert(0) += n;
            }
        }
        total.map(|reasoning_tokens| CompletionTokensDetails { reasoning_tokens })
    }

    /// Choice `index` of a plain response.
    fn whole(&mut self, index: usize, g: &Generated) -> ChatChoice {
        let piece = self.renderers[index].piece(Delta::whole(g), g.prompt_logprobs.as_deref());
        // An echoed prompt leads the content as it is; only the reply is parsed.
        let echoed = &piece.text[..piece.text.len() - g.text.len()];
        let reply = self.reply.whole(&g.text);
        let content = match (echoed.is_empty(), reply.content) {
            (true, content) => content,
            (false, content) => Some(format!("{echoed}{}", content.unwrap_or_default())),
        };
        let called = !reply.tool_calls.is_empty();
        ChatChoice {
            index,
            message: ChatMessage {
                role: "assistant".into(),
                content,
                refusal: None,
                reasoning_content: reply.reasoning,
                tool_calls: called.then_some(reply.tool_calls),
            },
            logprobs: piece.logprobs,
            finish_reason: ReplyFormat::finish_reason(called, g.finish_reason).into(),
            token_ids: piece.token_ids,
            raw_output: self.raw_output(g),
        }
    }

    fn raw_output(&self, g: &Generated) -> Option<crate::api::RawOutput> {
        self.raw_output
            .then(|| raw_output(&self.tokenizer, &self.prompt.text, &self.prompt.ids, g))
    }
}

impl ChunkWriter for ChatWriter {
    type Choice = ChatChunkChoice;

    /// `delta: {"role": "assistant", "content": ""}` for every choice.
    fn opening(&mut self, choices: usize) -> Vec<ChatChunkChoice> {
        (0..choices)
            .map(|index| ChatChunkChoice {
                index,
                delta: ChatDelta {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                    ..ChatDelta::default()
                },
                logprobs: None,
                finish_reason: None,
                token_ids: None,
                raw_output: None,
            })
            .collect()
    }

    /// A content chunk when there is text, then `delta: {}` with the finish reason when the
    /// choice ends (carrying the logprobs of a last token without text, such as the eos).
    fn update(
        &mut self,
        index: usize,
        delta: Delta,
        generated: &Generated,
    ) -> Vec<ChatChunkChoice> {
        let reply_text = delta.text.clone();
        let piece = self.renderers[index].piece(delta, generated.prompt_logprobs.as_deref());
        let echoed = &piece.text[..piece.text.len() - reply_text.len()];
        let parsed = self.streams[index].push(&reply_text, piece.finish_reason.is_some());
        let mut content = parsed.content;
        if !echoed.is_empty() {
            content = Some(format!("{echoed}{}", content.unwrap_or_default()));
        }
        let delta = ChatDelta {
            role: None,
            content,
            reasoning_content: parsed.reasoning,
            tool_calls: (!parsed.tool_calls.is_empty()).then_some(parsed.tool_calls),
        };
        let mut chunks = Vec::new();
        let mut tokens = Some((piece.logprobs, piece.token_ids));
        // Tokens whose text a parser holds back still report their logprobs and ids.
        let carries_tokens = tokens
            .as_ref()
            .is_some_and(|(l, t)| l.is_some() || t.is_some());
        if !delta.is_empty() || (carries_tokens && piece.finish_reason.is_none()) {
            let (logprobs, token_ids) = tokens.take().unwrap_or_default();
            chunks.push(ChatChunkChoice {
                index,
                delta,
                logprobs,
                finish_reason: None,
                token_ids,
                raw_output: None,
            });
        }
        if let Some(reason) = piece.finish_reason {
            let (logprobs, token_ids) = tokens.take().unwrap_or_default();
            let called = self.streams[index].called();
            chunks.push(ChatChunkChoice {
                index,
                delta: ChatDelta::default(),
                logprobs,
                finish_reason: Some(ReplyFormat::finish_reason(called, reason).into()),
                token_ids,
                raw_output: self.raw_output(generated),
            });
        }
        chunks
    }

    fn usage_details(&self, generated: &[&Generated]) -> Option<CompletionTokensDetails> {
        ChatWriter::usage_details(self, generated.iter().copied())
    }
}

/// The conversation rendered by the chat template and tokenized. With `prompt_truncate_len`
/// the earliest messages (never system ones, never the last) are dropped until it fits.
fn chat_prompt(
    state: &AppState,
    own: ChatFields,
    tools: Option<Value>,
    thinking: Option<bool>,
) -> Result<ChatPrompt, ApiError> {
    let shared = state.shared();
    let Some(template) = &shared.chat_template else {
        return Err(ApiError::invalid_request(
            "This model has no chat template: use /v1/completions with a raw prompt",
        ));
    };
    let mut messages = template_messages(own.messages)?;
    let mut kwargs = own.chat_template_kwargs.unwrap_or_default();
    if let Some(on) = thinking {
        thinking_kwargs(&mut kwargs, on);
    }
    let thinking = thinking_enabled(&kwargs);
    let add_generation_prompt = own.add_generation_prompt.unwrap_or(true);
    let render = |messages: &[Value]| -> Result<ChatPrompt, ApiError> {
        let text = template
            .render(
                &Value::Array(messages.to_vec()),
                tools.as_ref(),
                add_generation_prompt,
                &kwargs,
            )
            .map_err(|e| match e {
                EmberError::InvalidRequest(message) => ApiError::invalid_param("messages", message),
                other => ApiError::from_ember(other),
            })?;
        let ids = shared
            .tokenizer
            .encode(&text)
            .map_err(ApiError::from_ember)?;
        Ok(ChatPrompt {
            text,
            ids,
            thinking,
        })
    };
    let mut prompt = render(&messages)?;
    if let Some(limit) = own.prompt_truncate_len {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        while prompt.ids.len() > limit && drop_earliest_message(&mut messages) {
            prompt = render(&messages)?;
        }
    }
    Ok(prompt)
}

/// Drops the earliest message that is not a system prompt nor the last message, with the
/// tool results that answered it; false when none can go.
fn drop_earliest_message(messages: &mut Vec<Value>) -> bool {
    let role = |m: &Value| {
        m.get("role")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let last = messages.len().saturating_sub(1);
    let Some(at) = (0..last).find(|&i| !SYSTEM_ROLES.contains(&role(&messages[i]).as_str())) else {
        return false;
    };
    messages.remove(at);
    while at < messages.len().saturating_sub(1) && role(&messages[at]) == "tool" {
        messages.remove(at);
    }
    true
}

/// `logprobs` and `top_logprobs`: `true` gives the chat format, Fireworks' integer the legacy
/// format with that many alternatives (unless `top_logprobs` says otherwise); `None` when off.
fn chat_logprobs(fields: &ChatFields) -> Result<Option<LogprobsFormat>, ApiError> {
    let top = fields.top_logprobs;
    if let Some(t) = top.filter(|&t| t > MAX_TOP_LOGPROBS) {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            format!("Invalid 'top_logprobs': expected a value between 0 and {MAX_TOP_LOGPROBS}, got {t}"),
        ));
    }
    let enabled = match &fields.logprobs {
        None | Some(Value::Null) | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(LogprobsFormat::Chat {
            top: top.unwrap_or(0) as usize,
        }),
        Some(Value::Number(n)) => match n.as_u64().and_then(|k| u32::try_from(k).ok()) {
            Some(k) if k <= MAX_TOP_LOGPROBS => Some(LogprobsFormat::Legacy {
                top: top.unwrap_or(k) as usize,
            }),
            _ => {
                return Err(ApiError::invalid_param(
                    "logprobs",
                    format!("Invalid 'logprobs': got {n}"),
                ))
            }
        },
        Some(other) => {
            return Err(ApiError::invalid_param(
                "logprobs",
                format!("Invalid 'logprobs': expected a boolean, got {other}"),
            ))
        }
    };
    if enabled.is_none() && top.is_some_and(|t| t > 0) {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            "Invalid 'top_logprobs': it needs \"logprobs\": true",
        ));
    }
    Ok(enabled)
}

/// The messages as the template should see them: text parts joined into a string (templates
/// expect string content), and tool-call `arguments` sent as JSON strings parsed into objects
/// (templates serialise them with `tojson`, as in training).
fn template_messages(messages: Option<Vec<Value>>) -> Result<Vec<Value>, ApiError> {
    let Some(messages) = messages else {
        return Err(ApiError::invalid_param(
            "messages",
            "Missing required parameter: 'messages'",
        ));
    };
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "Invalid 'messages': the list is empty",
        ));
    }
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(i, mut message)| {
            let invalid = |what: String| {
                ApiError::invalid_param("messages", format!("Invalid 'messages[{i}]{what}"))
            };
            let Some(object) = message.as_object_mut() else {
                return Err(invalid(
                    "': expected an object with 'role' and 'content'".into(),
                ));
            };
            if !object.get("role").is_some_and(Value::is_string) {
                return Err(invalid("': 'role' must be a string".into()));
            }
            if let Some(Value::Array(parts)) = object.get("content") {
                let text = join_text_parts(parts).map_err(|(j, kind)| {
                    invalid(format!(
                        ".content[{j}]': only text content parts are supported, got {kind}"
                    ))
                })?;
                object.insert("content".into(), Value::String(text));
            }
            if let Some(Value::Array(calls)) = object.get_mut("tool_calls") {
                for call in calls {
                    parse_arguments(call);
                }
            }
            Ok(message)
        })
        .collect::<Result<Vec<Value>, ApiError>>()?;
    Ok(messages)
}

/// Joins `[{type: "text", text}]` parts with newlines; `Err((index, type))` at a non-text part.
fn join_text_parts(parts: &[Value]) -> Result<String, (usize, String)> {
    let texts = parts
        .iter()
        .enumerate()
        .map(|(j, part)| {
            let kind = part.get("type").and_then(Value::as_str).unwrap_or("text");
            match (kind, part.get("text").and_then(Value::as_str)) {
                ("text", Some(text)) => Ok(text),
                _ => Err((j, format!("{kind:?}"))),
            }
        })
        .collect::<Result<Vec<&str>, _>>()?;
    Ok(texts.join("\n"))
}

/// `function.arguments` as an object when it is a JSON string of one.
fn parse_arguments(call: &mut Value) {
    let Some(arguments) = call.pointer_mut("/function/arguments") else {
        return;
    };
    if let Some(parsed) = arguments
        .as_str()
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
        .filter(Value::is_object)
    {
        *arguments = parsed;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::parse_body;

    fn fields(body: Value) -> ChatFields {
        parse_body(body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn logprobs_and_top_logprobs() {
        assert_eq!(chat_logprobs(&fields(json!({}))).unwrap(), None);
        assert_eq!(
            chat_logprobs(&fields(json!({"logprobs": true}))).unwrap(),
            Some(LogprobsFormat::Chat { top: 0 })
        );
        assert_eq!(
            chat_logprobs(&fields(json!({"logprobs": true, "top_logprobs": 3}))).unwrap(),
            Some(LogprobsFormat::Chat { top: 3 })
        );
        // Fireworks' integer form asks for the legacy format.
        assert_eq!(
            chat_logprobs(&fields(json!({"logprobs": 2}))).unwrap(),
            Some(LogprobsFormat::Legacy { top: 2 })
        );
        assert_eq!(
            chat_logprobs(&fields(json!({"logprobs": false, "top_logprobs": 0}))).unwrap(),
            None
        );
        let param = |body| chat_logprobs(&fields(body)).unwrap_err().body.error.param;
        assert_eq!(
            param(json!({"logprobs": true, "top_logprobs": 21})).as_deref(),
            Some("top_logprobs")
        );
        assert_eq!(
            param(json!({"top_logprobs": 2})).as_deref(),
            Some("top_logprobs")
        );
        assert_eq!(
            param(json!({"logprobs": "yes"})).as_deref(),
            Some("logprobs")
        );
    }

    #[test]
    fn messages_are_prepared_for_the_template() {
        let messages = template_messages(Some(vec![
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "not json"}}
            ]}),
        ]))
        .unwrap();
        assert_eq!(messages[0]["content"], "a\nb");
        assert_eq!(
            messages[1]["tool_calls"][0]["function"]["arguments"],
            json!({"x": 1})
        );
        assert_eq!(
            messages[1]["tool_calls"][1]["function"]["arguments"],
            "not json"
        );
    }

    #[test]
    fn bad_messages_are_400_on_messages() {
        let message = |m: Option<Vec<Value>>| template_messages(m).unwrap_err().body.error.message;
        assert_eq!(message(None), "Missing required parameter: 'messages'");
        assert_eq!(
            message(Some(vec![])),
            "Invalid 'messages': the list is empty"
        );
        assert_eq!(
            message(Some(vec![json!("hi")])),
            "Invalid 'messages[0]': expected an object with 'role' and 'content'"
        );
        assert_eq!(
            message(Some(vec![json!({"content": "hi"})])),
            "Invalid 'messages[0]': 'role' must be a string"
        );
        assert_eq!(
            message(Some(vec![json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]})])),
            "Invalid 'messages[0].content[0]': only text content parts are supported, got \"image_url\""
        );
    }

    #[test]
    fn truncation_drops_the_earliest_turns_but_keeps_system_and_last() {
        let roles = |messages: &[Value]| -> Vec<String> {
            messages
                .iter()
                .map(|m| m["role"].as_str().unwrap().to_string())
                .collect()
        };
        let mut messages = vec![
            json!({"role": "system", "content": "s"}),
            json!({"role": "user", "content": "u1"}),
            json!({"role": "assistant", "content": null, "tool_calls": []}),
            json!({"role": "tool", "content": "t"}),
            json!({"role": "user", "content": "u2"}),
        ];
        assert!(drop_earliest_message(&mut messages));
        assert_eq!(roles(&messages), ["system", "assistant", "tool", "user"]);
        // A dropped assistant turn takes its tool results with it.
        assert!(drop_earliest_message(&mut messages));
        assert_eq!(roles(&messages), ["system", "user"]);
        assert!(!drop_earliest_message(&mut messages));
    }
}
