//! `/v1/chat/completions` bodies: messages in, an assistant message out.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{ChoiceLogprobs, PerfMetrics, RawOutput, Usage};

/// Fields only `/chat/completions` has (the shared ones are in [`super::SamplingFields`]).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatFields {
    /// The conversation: objects with `role` and `content` (a string or text parts), plus
    /// `tool_calls`, `tool_call_id`, `name`, `reasoning_content` as the template reads them.
    pub messages: Option<Vec<Value>>,
    /// Function tools, `[{type: "function", function: {name, description, parameters}}]`.
    pub tools: Option<Vec<Value>>,
    /// The deprecated form of `tools` (`[{name, description, parameters}]`).
    pub functions: Option<Vec<Value>>,
    /// `none`, `auto`, `required` (Fireworks: `any`), or `{type: "function", function: {name}}`.
    pub tool_choice: Option<Value>,
    /// The deprecated form of `tool_choice`: `none`, `auto` or `{name}`.
    pub function_call: Option<Value>,
    /// Whether a reply may call several tools (default true).
    pub parallel_tool_calls: Option<bool>,
    /// `none`/`low`/`medium`/`high` (OpenAI also `minimal`/`xhigh`/`max`), a boolean, or
    /// Fireworks' integer: whether a thinking model thinks.
    pub reasoning_effort: Option<Value>,
    /// Fireworks' Anthropic-style switch: `{"type": "enabled" | "disabled"}`.
    pub thinking: Option<Value>,
    /// Fireworks: drop the earliest non-system messages until the prompt has at most this
    /// many tokens.
    pub prompt_truncate_len: Option<u64>,
    /// `true`/`false`; Fireworks' integer form is read as `top_logprobs`.
    pub logprobs: Option<Value>,
    /// Alternatives per token, 0-20; needs `logprobs: true`.
    pub top_logprobs: Option<u32>,
    /// Extra template variables, e.g. `{"enable_thinking": false}` for Qwen3.
    pub chat_template_kwargs: Option<Map<String, Value>>,
    /// Open an assistant turn after the messages (default true).
    pub add_generation_prompt: Option<bool>,
}

/// The response of `/chat/completions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    /// `chatcmpl-...`
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model as the request named it.
    pub model: String,
    /// `n` choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
    /// The prompt's token ids (`return_token_ids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// Fireworks' timings (`perf_metrics_in_response`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perf_metrics: Option<PerfMetrics>,
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Position in `choices`.
    pub index: usize,
    /// The assistant's message.
    pub message: ChatMessage,
    /// Present when the request asked for `logprobs`.
    pub logprobs: Option<ChoiceLogprobs>,
    /// `stop`, `length` or `tool_calls`.
    pub finish_reason: String,
    /// The generated token ids (`return_token_ids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    /// The raw prompt and completion (`raw_output`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_output: Option<RawOutput>,
}

/// One choice in a stream chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    /// Which choice this piece belongs to.
    pub index: usize,
    /// The role (first chunk), a piece of content, or nothing (the finishing chunk).
    pub delta: ChatDelta,
    /// Logprobs of this piece's tokens, when asked for.
    pub logprobs: Option<ChoiceLogprobs>,
    /// Set on the choice's last chunk.
    pub finish_reason: Option<String>,
    /// This piece's token ids (`return_token_ids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    /// On the last chunk (`raw_output`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_output: Option<RawOutput>,
}

/// What a chunk adds to the message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatDelta {
    /// `assistant`, in the first chunk only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The next piece of text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// The next piece of the thinking text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// New tool calls (name first) and further pieces of their arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallChunk>>,
}

impl ChatDelta {
    /// Whether the delta adds nothing.
    pub fn is_empty(&self) -> bool {
        self.role.is_none()
            && self.content.is_none()
            && self.reasoning_content.is_none()
            && self.tool_calls.is_none()
    }
}

/// A tool call the model made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// `call_...` (Kimi K2: `functions.NAME:IDX`), what the `tool` message answers to.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function and its arguments.
    pub function: FunctionCall,
}

/// The function of a tool call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The tool's name.
    pub name: String,
    /// The arguments, a JSON object as a string.
    pub arguments: String,
}

/// A piece of a streamed tool call: `id`, `type` and the name come once, in the call's first
/// piece; the arguments come in fragments that concatenate to the JSON string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallChunk {
    /// Which call of the message.
    pub index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub function: FunctionCallChunk,
}

/// The function part of a [`ToolCallChunk`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCallChunk {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// The generated assistant message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Always `assistant`.
    pub role: String,
    /// The answer; null when the reply is only tool calls.
    pub content: Option<String>,
    /// Always null.
    pub refusal: Option<String>,
    /// The thinking, split from the answer by the reasoning parser.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// The calls the reply makes (`finish_reason: tool_calls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// Per-token logprobs of a reply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<ChatTokenLogprob>,
    /// Always null.
    pub refusal: Option<Vec<ChatTokenLogprob>>,
}

/// A generated token, its logprob and the most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatTokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability; null only for an echoed first prompt token, which has no context.
    pub logprob: Option<f32>,
    /// Its UTF-8 bytes (exact even for part of a character).
    pub bytes: Vec<u8>,
    /// `top_logprobs` alternatives, most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// An alternative token at a position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
}
