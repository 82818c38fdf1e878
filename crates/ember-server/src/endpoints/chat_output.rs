//! A chat reply's text sorted into thinking (`reasoning_content`), answer (`content`) and tool
//! calls, whole or delta by delta. The thinking is split off first; tool calls are read only
//! from the answer.

use ember_core::FinishReason;

use crate::api::chat::{FunctionCall, FunctionCallChunk, ToolCall, ToolCallChunk};
use crate::reasoning_parser::{split_reasoning, ReasoningEvent, ReasoningStream};
use crate::tokenizer::TextTokenizer;
use crate::tool_parser::{parse_tool_calls, ToolCallFormat, ToolCallStream, ToolEvent};

/// How one request's replies are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ReplyFormat {
    /// Split `<think>...</think>` off the answer.
    pub reasoning: bool,
    /// The prompt left `<think>` open: the reply starts inside the thinking.
    pub starts_in_reasoning: bool,
    /// Read tool calls in this syntax.
    pub tools: Option<ToolCallFormat>,
    /// More than one call may be returned (`parallel_tool_calls`).
    pub parallel: bool,
    /// The ids of `<think>` and `</think>`, when each is one token (to count thinking tokens).
    think_ids: Option<(u32, u32)>,
}

/// A finished reply, sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub content: Option<String>,
    pub reasoning: Option<String>,
    pub tool_calls: Vec<ToolCall>,
}

impl ReplyFormat {
    /// A format reading thinking (when `reasoning`) and tool calls (when `tools`).
    pub fn new(
        tokenizer: &TextTokenizer,
        reasoning: bool,
        starts_in_reasoning: bool,
        tools: Option<ToolCallFormat>,
        parallel: bool,
    ) -> Self {
        let think_ids = tokenizer
            .token_id("<think>")
            .zip(tokenizer.token_id("</think>"));
        Self {
            reasoning,
            starts_in_reasoning: reasoning && starts_in_reasoning,
            tools,
            parallel,
            think_ids,
        }
    }

    /// Sorts a whole reply. Without parsers the text is the content as it is; a malformed tool
    /// call stays in the content.
    pub fn whole(&self, text: &str) -> Reply {
        let (reasoning, answer) = if self.reasoning {
            split_reasoning(text, self.starts_in_reasoning)
        } else {
            (None, Some(text.to_string()))
        };
        let answer = answer.unwrap_or_default();
        let Some(format) = self.tools else {
            return Reply {
                content: Some(answer),
                reasoning,
                tool_calls: Vec::new(),
            };
        };
        let (content, mut calls) = parse_tool_calls(format, &answer);
        if !self.parallel {
            calls.truncate(1);
        }
        let tool_calls: Vec<ToolCall> = calls
            .into_iter()
            .map(|call| ToolCall {
                id: call.id,
                kind: "function".into(),
                function: FunctionCall {
                    name: call.name,
                    arguments: call.arguments,
                },
            })
            .collect();
        let content = if tool_calls.is_empty() {
            Some(content.unwrap_or(answer))
        } else {
            content
        };
        Reply {
            content,
            reasoning,
            tool_calls,
        }
    }

    /// `tool_calls` when the reply called a tool (and was not cut off), else the engine's.
    pub fn finish_reason(called: bool, reason: FinishReason) -> &'static str {
        if called && reason != FinishReason::Length {
            "tool_calls"
        } else {
            reason.as_str()
        }
    }

    /// How many of a reply's tokens were thinking, its `</think>` included; `None` when no
    /// reasoning parser applies. Counted on the token ids, so whole and streamed replies agree.
    pub fn reasoning_tokens(&self, tokenizer: &TextTokenizer, token_ids: &[u32]) -> Option<usize> {
        if !self.reasoning {
            return None;
        }
        if let Some((open, close)) = self.think_ids {
            let opened = self.starts_in_reasoning || token_ids.first() == Some(&open);
            return Some(if opened {
                token_ids
                    .iter()
                    .position(|&id| id == close)
                    .map_or(token_ids.len(), |at| at + 1)
            } else {
                0
            });
        }
        // The tags are not single tokens: find the shortest prefix whose text closes the thinking.
        let text = |n: usize| tokenizer.decode(&token_ids[..n], false).unwrap_or_default();
        let opened =
            self.starts_in_reasoning || text(token_ids.len()).trim_start().starts_with("<think>");
        if !opened {
            return Some(0);
        }
        if !text(token_ids.len()).contains("</think>") {
            return Some(token_ids.len());
        }
        let (mut lo, mut hi) = (0, token_ids.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if text(mid).contains("</think>") {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Some(lo)
    }

    /// A streaming reader for one reply.
    pub fn stream(&self) -> ReplyStream {
        ReplyStream {
            reasoning: self
                .reasoning
                .then(|| ReasoningStream::new(self.starts_in_reasoning)),
            tools: self.tools.map(ToolCallStream::new),
            parallel: self.parallel,
            called: false,
        }
    }
}

/// What a piece of a streamed reply adds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ReplyDelta {
    pub content: Option<String>,
    pub reasoning: Option<String>,
    pub tool_calls: Vec<ToolCallChunk>,
}

/// Sorts a reply delta by delta; text that may still turn out to be a tag is held back.
pub(crate) struct ReplyStream {
    reasoning: Option<ReasoningStream>,
    tools: Option<ToolCallStream>,
    parallel: bool,
    called: bool,
}

impl ReplyStream {
    /// Reads the next piece of text; `last` flushes what was held back.
    pub fn push(&mut self, text: &str, last: bool) -> ReplyDelta {
        let mut delta = ReplyDelta::default();
        let mut answer = Vec::new();
        match &mut self.reasoning {
            Some(stream) => {
                let mut events = stream.push(text);
                if last {
                    events.extend(stream.finish());
                }
                for event in events {
                    match event {
                        ReasoningEvent::Reasoning(text) => append(&mut delta.reasoning, &text),
                        ReasoningEvent::Content(text) => answer.push(text),
                    }
                }
            }
            None => answer.push(text.to_string()),
        }
        let Some(tools) = &mut self.tools else {
            for text in answer {
                append(&mut delta.content, &text);
            }
            return delta;
        };
        let mut events: Vec<ToolEvent> = answer.iter().flat_map(|text| tools.push(text)).collect();
        if last {
            events.extend(tools.finish());
        }
        for event in events {
            match event {
                ToolEvent::Content(text) => append(&mut delta.content, &text),
                ToolEvent::CallStart { index, id, name } => {
                    if index > 0 && !self.parallel {
                        continue;
                    }
                    self.called = true;
                    delta.tool_calls.push(ToolCallChunk {
                        index,
                        id: Some(id),
                        kind: Some("function".into()),
                        function: FunctionCallChunk {
                            name: Some(name),
                            arguments: Some(String::new()),
                        },
                    });
                }
                ToolEvent::Arguments { index, fragment } => {
                    if index > 0 && !self.parallel {
                        continue;
                    }
                    match delta.tool_calls.last_mut() {
                        Some(chunk) if chunk.index == index => {
                            chunk
                                .function
                                .arguments
                                .get_or_insert_with(String::new)
                                .push_str(&fragment);
                        }
                        _ => delta.tool_calls.push(ToolCallChunk {
                            index,
                            id: None,
                            kind: None,
                            function: FunctionCallChunk {
                                name: None,
                                arguments: Some(fragment),
                            },
                        }),
                    }
                }
            }
        }
        delta
    }

    /// Whether a tool call has been sent.
    pub fn called(&self) -> bool {
        self.called
    }
}

fn append(field: &mut Option<String>, text: &str) {
    if !text.is_empty() {
        field.get_or_insert_with(String::new).push_str(text);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::testing::fixture_dir;

    fn tokenizer() -> TextTokenizer {
        TextTokenizer::from_dir(&fixture_dir("qwen3-moe-tiny")).unwrap()
    }

    fn format(reasoning: bool, starts: bool, parallel: bool) -> ReplyFormat {
        ReplyFormat::new(
            &tokenizer(),
            reasoning,
            starts,
            Some(ToolCallFormat::Qwen3),
            parallel,
        )
    }

    const CALL: &str =
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": \"b}\"}}\n</tool_call>";

    /// Streams `text` in pieces of `size` bytes (on character boundaries) and adds the deltas up.
    fn streamed(format: &ReplyFormat, text: &str, size: usize) -> (Reply, bool) {
        let mut stream = format.stream();
        let (mut content, mut reasoning) = (None::<String>, None::<String>);
        let mut calls: Vec<ToolCall> = Vec::new();
        let chars: Vec<char> = text.chars().collect();
        let pieces: Vec<String> = chars.chunks(size).map(|c| c.iter().collect()).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let d = stream.push(piece, i + 1 == pieces.len());
            if let Some(t) = d.content {
                content.get_or_insert_with(String::new).push_str(&t);
            }
            if let Some(t) = d.reasoning {
                reasoning.get_or_insert_with(String::new).push_str(&t);
            }
            for chunk in d.tool_calls {
                if let Some(id) = chunk.id {
                    assert_eq!(chunk.index, calls.len(), "calls open in order");
                    calls.push(ToolCall {
                        id,
                        kind: chunk.kind.unwrap(),
                        function: FunctionCall {
                            name: chunk.function.name.unwrap(),
                            arguments: String::new(),
                        },
                    });
                }
                calls[chunk.index]
                    .function
                    .arguments
                    .push_str(&chunk.function.arguments.unwrap_or_default());
            }
        }
        let called = stream.called();
        (
            Reply {
                content,
                reasoning,
                tool_calls: calls,
            },
            called,
        )
    }

    fn compact(arguments: &str) -> String {
        serde_json::from_str::<Value>(arguments)
            .unwrap()
            .to_string()
    }

    #[test]
    fn thinking_then_calls_are_sorted_whole_and_streamed_alike() {
        let text = format!("<think>\nweather?\n</think>\n\nLet me check.\n{CALL}\n{CALL}");
        for parallel in [true, false] {
            let f = format(true, false, parallel);
            let whole = f.whole(&text);
            assert_eq!(whole.reasoning.as_deref(), Some("weather?"));
            assert_eq!(
                whole.content.as_deref().map(str::trim),
                Some("Let me check.")
            );
            assert_eq!(whole.tool_calls.len(), if parallel { 2 } else { 1 });
            assert_eq!(whole.tool_calls[0].function.arguments, r#"{"a":"b}"}"#);
            for size in [1, 2, 3, 7, 1000] {
                let (s, called) = streamed(&f, &text, size);
                assert!(called);
                assert_eq!(s.reasoning, whole.reasoning, "size {size}");
                assert_eq!(s.content.as_deref().map(str::trim), Some("Let me check."));
                assert_eq!(s.tool_calls.len(), whole.tool_calls.len());
                for (a, b) in s.tool_calls.iter().zip(&whole.tool_calls) {
                    assert_eq!(a.function.name, b.function.name);
                    assert_eq!(compact(&a.function.arguments), b.function.arguments);
                }
            }
        }
    }

    #[test]
    fn plain_replies_and_malformed_calls_stay_content() {
        let plain = ReplyFormat::new(&tokenizer(), false, false, None, true);
        let text = "<think>x</think> hi";
        assert_eq!(plain.whole(text).content.as_deref(), Some(text));
        assert_eq!(plain.reasoning_tokens(&tokenizer(), &[1, 2]), None);
        let broken = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": tru}}\n</tool_call>";
        let f = format(false, false, true);
        let whole = f.whole(broken);
        assert!(whole.tool_calls.is_empty());
        assert_eq!(whole.content.as_deref(), Some(broken));
        let (s, _) = streamed(&f, broken, 4);
        assert!(s.tool_calls.is_empty() || s.content.is_some());
    }

    #[test]
    fn a_prompt_opened_think_makes_the_reply_start_in_thinking() {
        let f = format(true, true, true);
        let whole = f.whole("plan\n</think>\n\nanswer");
        assert_eq!(whole.reasoning.as_deref(), Some("plan"));
        assert_eq!(whole.content.as_deref(), Some("answer"));
        assert_eq!(
            ReplyFormat::finish_reason(true, FinishReason::Stop),
            "tool_calls"
        );
        assert_eq!(
            ReplyFormat::finish_reason(true, FinishReason::Length),
            "length"
        );
        assert_eq!(
            ReplyFormat::finish_reason(false, FinishReason::Stop),
            "stop"
        );
    }

    #[test]
    fn thinking_tokens_are_counted_up_to_the_closing_tag() {
        let tok = tokenizer();
        let (open, close) = (
            tok.token_id("<think>").unwrap(),
            tok.token_id("</think>").unwrap(),
        );
        let f = format(true, false, true);
        assert_eq!(f.reasoning_tokens(&tok, &[open, 5, 6, close, 7]), Some(4));
        assert_eq!(f.reasoning_tokens(&tok, &[5, 6, 7]), Some(0));
        assert_eq!(f.reasoning_tokens(&tok, &[open, 5, 6]), Some(3));
        let opened = format(true, true, true);
        assert_eq!(opened.reasoning_tokens(&tok, &[5, close, 7]), Some(2));
        // Where the tags are text over several tokens, the prefix that closes them counts.
        let bytes = crate::testing::byte_level_tokenizer();
        let f = ReplyFormat::new(&bytes, true, false, None, true);
        let ids = crate::testing::script("<think>ab</think>cd");
        assert_eq!(f.reasoning_tokens(&bytes, &ids), Some(17));
        assert_eq!(
            f.reasoning_tokens(&bytes, &crate::testing::script("cd")),
            Some(0)
        );
    }
}
