//! Turning a model's tool-call output back into OpenAI tool calls, whole or while streaming.
//!
//! Each family writes calls in the syntax its chat template renders them in (Qwen3's hermes
//! `<tool_call>` JSON, DeepSeek V3 / V3.1 and Kimi K2 marker sections). One state machine,
//! [`ToolCallStream`], reads them all; [`parse_tool_calls`] runs it over a whole output.

mod json_scan;
mod stream;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub use stream::ToolCallStream;

/// The tool-call syntax a model family was trained to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallFormat {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (hermes style).
    Qwen3,
    /// `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n{...}\n```<｜tool▁call▁end｜>`.
    DeepSeekV3,
    /// `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>`.
    DeepSeekV31,
    /// `<|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{...}<|tool_call_end|>`.
    KimiK2,
}

impl ToolCallFormat {
    /// Parses a CLI name: `hermes` / `qwen3`, `deepseek_v3`, `deepseek_v31`, `kimi_k2`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "hermes" | "qwen3" => Some(Self::Qwen3),
            "deepseek_v3" => Some(Self::DeepSeekV3),
            "deepseek_v31" | "deepseek_v3.1" => Some(Self::DeepSeekV31),
            "kimi_k2" => Some(Self::KimiK2),
            _ => None,
        }
    }

    /// The CLI name (the one vLLM's `--tool-call-parser` uses).
    pub fn name(self) -> &'static str {
        match self {
            Self::Qwen3 => "hermes",
            Self::DeepSeekV3 => "deepseek_v3",
            Self::DeepSeekV31 => "deepseek_v31",
            Self::KimiK2 => "kimi_k2",
        }
    }

    /// The default for a checkpoint, from config.json's `model_type` and the chat template.
    ///
    /// The template decides when it renders tool calls, since V3 and V3.1 (and Kimi K2 on
    /// DeepSeek's architecture) share a model_type; otherwise the model_type does.
    pub fn detect(model_type: &str, chat_template: Option<&str>) -> Option<Self> {
        let template = chat_template.unwrap_or("");
        if template.contains(KIMI_SECTION_BEGIN) {
            return Some(Self::KimiK2);
        }
        if template.contains(DEEPSEEK_TOOL_SEP) {
            // V3 fences the arguments in ```json; V3.1 writes them bare.
            return Some(if template.contains("```json") {
                Self::DeepSeekV3
            } else {
                Self::DeepSeekV31
            });
        }
        if template.contains("<tool_call>") {
            return Some(Self::Qwen3);
        }
        match model_type {
            "qwen3" | "qwen3_moe" | "qwen2" | "qwen2_moe" => Some(Self::Qwen3),
            "deepseek_v3" => Some(Self::DeepSeekV3),
            "kimi_k2" => Some(Self::KimiK2),
            _ => None,
        }
    }

    /// The text that opens the tool calls (what constrained decoding forces for a required call).
    pub fn section_start(self) -> &'static str {
        stream::section_begin(self)
    }
}

const KIMI_SECTION_BEGIN: &str = "<|tool_calls_section_begin|>";
const DEEPSEEK_TOOL_SEP: &str = "<｜tool▁sep｜>";

/// One tool call read back from the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToolCall {
    /// `functions.NAME:IDX` as Kimi K2 wrote it; `call_` + 24 alphanumerics for the others.
    pub id: String,
    /// The function name.
    pub name: String,
    /// The arguments as compact JSON text, always an object.
    pub arguments: String,
}

/// What the stream can say about the text fed so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    /// Text for the message's content.
    Content(String),
    /// A call begins; its name is complete.
    CallStart {
        /// Position of the call in the message, from 0.
        index: usize,
        /// The call id (see [`ParsedToolCall::id`]).
        id: String,
        /// The function name.
        name: String,
    },
    /// More of a call's arguments; all fragments of a call concatenate to one JSON object.
    Arguments {
        /// The call the fragment belongs to.
        index: usize,
        /// The next piece of argument text.
        fragment: String,
    },
}

/// Splits a whole output into content (None when empty or whitespace) and tool calls.
///
/// Malformed output (bad JSON, unknown structure, a missing end marker) comes back whole as
/// content with no calls: half a call is worse for a client than none.
pub fn parse_tool_calls(
    format: ToolCallFormat,
    text: &str,
) -> (Option<String>, Vec<ParsedToolCall>) {
    let whole = || (non_blank(text.to_string()), Vec::new());
    let mut stream = ToolCallStream::new(format);
    let mut events = stream.push(text);
    events.extend(stream.finish());
    if stream.malformed() {
        return whole();
    }
    let mut content = String::new();
    let mut calls: Vec<ParsedToolCall> = Vec::new();
    for event in events {
        match event {
            ToolEvent::Content(text) => content.push_str(&text),
            ToolEvent::CallStart { id, name, .. } => calls.push(ParsedToolCall {
                id,
                name,
                arguments: String::new(),
            }),
            ToolEvent::Arguments { index, fragment } => match calls.get_mut(index) {
                Some(call) => call.arguments.push_str(&fragment),
                None => return whole(),
            },
        }
    }
    for call in &mut calls {
        match serde_json::from_str::<serde_json::Value>(&call.arguments) {
            Ok(value) if value.is_object() => call.arguments = value.to_string(),
            _ => return whole(),
        }
    }
    (non_blank(content), calls)
}

fn non_blank(text: String) -> Option<String> {
    if text.trim().is_empty() {
        None
    } else {
        Some(text)
    }
}

/// A fresh OpenAI-style call id: `call_` + 24 alphanumerics.
fn new_call_id() -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    const LEN: usize = 24;
    // Ids only need to be unique within a conversation; std's randomly keyed hasher over the
    // clock and a counter gives that without a random-number crate.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let keys = RandomState::new();
    let mut id = String::with_capacity(5 + LEN);
    id.push_str("call_");
    for round in 0u64..3 {
        let mut bits = keys.hash_one((nanos, count, round));
        // 62^10 < 2^64, so ten digits per hash are all well mixed; three hashes give 24.
        for _ in 0..10 {
            if id.len() < 5 + LEN {
                id.push(char::from(ALPHABET[(bits % 62) as usize]));
            }
            bits /= 62;
        }
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use ToolCallFormat::*;

    const ALL: [ToolCallFormat; 4] = [Qwen3, DeepSeekV3, DeepSeekV31, KimiK2];

    /// Renders content and calls the way each family's chat template writes an assistant turn.
    fn render(format: ToolCallFormat, content: &str, calls: &[(&str, &str)]) -> String {
        let mut out = content.to_string();
        match format {
            Qwen3 => {
                for (i, (name, args)) in calls.iter().enumerate() {
                    if i > 0 || !content.is_empty() {
                        out.push('\n');
                    }
                    out += &format!("<tool_call>\n{{\"name\": \"{name}\", \"arguments\": {args}}}\n</tool_call>");
                }
            }
            DeepSeekV3 => {
                out += "<｜tool▁calls▁begin｜>";
                for (i, (name, args)) in calls.iter().enumerate() {
                    if i > 0 {
                        out.push('\n');
                    }
                    out += &format!("<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args}\n```<｜tool▁call▁end｜>");
                }
                out += "<｜tool▁calls▁end｜>";
            }
            DeepSeekV31 => {
                out += "<｜tool▁calls▁begin｜>";
                for (name, args) in calls {
                    out += &format!(
                        "<｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{args}<｜tool▁call▁end｜>"
                    );
                }
                out += "<｜tool▁calls▁end｜>";
            }
            KimiK2 => {
                out += "<|tool_calls_section_begin|>";
                for (i, (name, args)) in calls.iter().enumerate() {
                    out += &format!("<|tool_call_begin|>functions.{name}:{i}<|tool_call_argument_begin|>{args}<|tool_call_end|>");
                }
                out += "<|tool_calls_section_end|>";
            }
        }
        out
    }

    const NESTED_ARGS: &str = r#"{"query": {"filter": "a}{b", "quote": "say \"hi\" {", "list": [1, {"x": null}]}, "path": "C:\\dir\\"}"#;
    const UNICODE_ARGS: &str = r#"{"city": "Zürich", "note": "東京 🌸 ｜tool▁sep｜"}"#;

    /// Well-formed outputs: (content written before the calls, calls).
    fn good_cases() -> Vec<(&'static str, Vec<(&'static str, &'static str)>)> {
        vec![
            (
                "Let me check.",
                vec![("get_weather", r#"{"city": "Paris"}"#)],
            ),
            (
                "",
                vec![
                    ("get_weather", r#"{"city": "Paris"}"#),
                    ("get_time", r#"{"zone": "Europe/Paris", "hour24": true}"#),
                ],
            ),
            ("", vec![("search", NESTED_ARGS)]),
            ("Wetter für Zürich 🌦", vec![("get_weather", UNICODE_ARGS)]),
            ("", vec![("noop", "{}")]),
        ]
    }

    /// A parse reduced to what must agree between paths: content and (id if the model wrote it, name, arguments value).
    type Outcome = (Option<String>, Vec<(Option<String>, String, Value)>);

    fn outcome(
        format: ToolCallFormat,
        content: Option<String>,
        calls: Vec<(String, String, String)>,
    ) -> Outcome {
        let calls = calls
            .into_iter()
            .map(|(id, name, args)| {
                let kept_id = (format == KimiK2).then_some(id);
                // Malformed streams may have sent broken arguments; keep them visible as a string.
                let args = serde_json::from_str(&args).unwrap_or(Value::String(args));
                (kept_id, name, args)
            })
            .collect();
        (content, calls)
    }

    fn parse(format: ToolCallFormat, text: &str) -> Outcome {
        let (content, calls) = parse_tool_calls(format, text);
        let calls = calls
            .into_iter()
            .map(|c| (c.id, c.name, c.arguments))
            .collect();
        outcome(format, content, calls)
    }

    /// Streams `pieces` and rebuilds content and calls from the events, checking event order.
    fn stream(format: ToolCallFormat, pieces: &[&str]) -> Outcome {
        let mut parser = ToolCallStream::new(format);
        let mut events = Vec::new();
        for piece in pieces {
            events.extend(parser.push(piece));
        }
        events.extend(parser.finish());
        let mut content = String::new();
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for event in events {
            match event {
                ToolEvent::Content(text) => content.push_str(&text),
                ToolEvent::CallStart { index, id, name } => {
                    assert_eq!(index, calls.len(), "calls start in order");
                    calls.push((id, name, String::new()));
                }
                ToolEvent::Arguments { index, fragment } => {
                    assert_eq!(
                        index + 1,
                        calls.len(),
                        "arguments follow their call's start"
                    );
                    calls[index].2.push_str(&fragment);
                }
            }
        }
        assert_eq!(parser.calls_emitted(), calls.len());
        let content = (!content.trim().is_empty()).then_some(content);
        outcome(format, content, calls)
    }

    /// Cuts text into pieces of the given char counts (cycled).
    fn split_by_chars(text: &str, mut size: impl FnMut() -> usize) -> Vec<&str> {
        let bounds: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect();
        let mut pieces = Vec::new();
        let mut at = 0;
        while at + 1 < bounds.len() {
            let next = (at + size().max(1)).min(bounds.len() - 1);
            pieces.push(&text[bounds[at]..bounds[next]]);
            at = next;
        }
        pieces
    }

    /// Every way of feeding `text` the tests use: whole, cut once anywhere, 1- and 3-char pieces, random pieces.
    fn feedings(text: &str) -> Vec<Vec<&str>> {
        let mut all = vec![vec![text]];
        for (i, _) in text.char_indices().skip(1) {
            all.push(vec![&text[..i], &text[i..]]);
        }
        all.push(split_by_chars(text, || 1));
        all.push(split_by_chars(text, || 3));
        for seed in 1..=20u64 {
            let mut state = seed;
            all.push(split_by_chars(text, move || {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 33) as usize % 9 + 1
            }));
        }
        all
    }

    #[test]
    fn qwen3_reads_hermes_json_after_content() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (content, calls) = parse_tool_calls(Qwen3, text);
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, r#"{"city":"Paris"}"#);
        assert!(calls[0].id.starts_with("call_"));
    }

    #[test]
    fn deepseek_v3_reads_the_fenced_json_after_the_name_line() {
        let text = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let (content, calls) = parse_tool_calls(DeepSeekV3, text);
        assert_eq!(content, None);
        let got: Vec<_> = calls
            .iter()
            .map(|c| (c.name.as_str(), c.arguments.as_str()))
            .collect();
        assert_eq!(
            got,
            [("get_weather", r#"{"city":"Paris"}"#), ("get_time", "{}")]
        );
    }

    #[test]
    fn deepseek_v31_reads_name_then_bare_json() {
        let text = "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let (content, calls) = parse_tool_calls(DeepSeekV31, text);
        assert_eq!(content.as_deref(), Some("Sure."));
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, r#"{"city":"Paris"}"#);
    }

    #[test]
    fn kimi_k2_keeps_the_call_id_the_model_wrote() {
        let text = "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|><|tool_calls_section_end|>";
        let (content, calls) = parse_tool_calls(KimiK2, text);
        assert_eq!(content, None);
        assert_eq!(calls[0].id, "functions.get_weather:0");
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, r#"{"city":"Paris"}"#);
    }

    #[test]
    fn every_family_parses_what_its_template_renders() {
        for format in ALL {
            for (content, calls) in good_cases() {
                let text = render(format, content, &calls);
                let (got_content, got_calls) = parse(format, &text);
                assert_eq!(
                    got_content.as_deref(),
                    (!content.is_empty()).then_some(content),
                    "{text}"
                );
                let names: Vec<_> = got_calls.iter().map(|c| c.1.as_str()).collect();
                let want: Vec<_> = calls.iter().map(|c| c.0).collect();
                assert_eq!(names, want, "{text}");
                for (got, (_, args)) in got_calls.iter().zip(&calls) {
                    assert_eq!(
                        got.2,
                        serde_json::from_str::<Value>(args).unwrap_or(Value::Null)
                    );
                }
            }
        }
    }

    #[test]
    fn streaming_gives_the_same_calls_for_every_way_of_cutting_the_text() {
        for format in ALL {
            for (content, calls) in good_cases() {
                let text = render(format, content, &calls);
                let whole = parse(format, &text);
                assert!(!whole.1.is_empty());
                for pieces in feedings(&text) {
                    assert_eq!(
                        stream(format, &pieces),
                        whole,
                        "{format:?} fed as {pieces:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn qwen3_accepts_arguments_written_before_the_name() {
        let text = "<tool_call>\n{\"arguments\": {\"q\": [1, 2]}, \"name\": \"search\", \"x\": 1}\n</tool_call>";
        let whole = parse(Qwen3, text);
        assert_eq!(
            whole.1,
            [(None, "search".to_string(), json!({"q": [1, 2]}))]
        );
        for pieces in feedings(text) {
            assert_eq!(stream(Qwen3, &pieces), whole);
        }
    }

    #[test]
    fn content_streams_at_once_except_a_possible_marker_prefix() {
        let mut parser = ToolCallStream::new(Qwen3);
        assert_eq!(
            parser.push("It is <tool"),
            [ToolEvent::Content("It is".into())]
        );
        assert_eq!(
            parser.push("kit time"),
            [ToolEvent::Content(" <toolkit time".into())]
        );
        assert_eq!(parser.finish(), []);
    }

    #[test]
    fn the_call_starts_as_soon_as_its_name_is_complete() {
        let mut parser = ToolCallStream::new(Qwen3);
        let events = parser.push("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"ci");
        let [ToolEvent::CallStart { index: 0, name, .. }, ToolEvent::Arguments { index: 0, fragment }] =
            events.as_slice()
        else {
            panic!("unexpected events {events:?}");
        };
        assert_eq!((name.as_str(), fragment.as_str()), ("get_weather", "{\"ci"));
        let mut parser = ToolCallStream::new(KimiK2);
        let events = parser.push("<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>");
        assert!(
            matches!(events.as_slice(), [ToolEvent::CallStart { index: 0, id, .. }] if id == "functions.f:0")
        );
    }

    #[test]
    fn output_without_calls_is_content_unchanged() {
        for format in ALL {
            for text in [
                "\n  Hello, 1 < 2 and <tool_calls <｜tool and <|tool are words.\n\n",
                "<",
            ] {
                assert_eq!(
                    parse_tool_calls(format, text),
                    (Some(text.to_string()), vec![])
                );
                for pieces in feedings(text) {
                    assert_eq!(stream(format, &pieces).0.as_deref(), Some(text));
                }
            }
        }
        assert_eq!(parse_tool_calls(Qwen3, " \n"), (None, vec![]));
    }

    /// Outputs that break each family's format in a different way.
    fn malformed_cases(format: ToolCallFormat) -> Vec<String> {
        let good = render(format, "Hi.", &[("f", r#"{"a": "b"}"#)]);
        let mut cases = vec![
            good.replace(r#"{"a": "b"}"#, r#"{"a": "b",}"#),
            good.replace(r#"{"a": "b"}"#, r#"{"a": tru}"#),
            good.replace(r#"{"a": "b"}"#, r#"["a"]"#),
            good.chars().take(good.chars().count() - 3).collect(),
            good[..good.find(r#""b""#).unwrap_or(0)].to_string(),
            format!(
                "Use {} to start a call, then prose.",
                format.section_start()
            ),
        ];
        let end_marker = match format {
            Qwen3 => "</tool_call>",
            DeepSeekV3 | DeepSeekV31 => "<｜tool▁calls▁end｜>",
            KimiK2 => "<|tool_calls_section_end|>",
        };
        cases.push(good.replace(end_marker, ""));
        match format {
            Qwen3 => {
                cases.push("<tool_call>\n{\"arguments\": {}}\n</tool_call>".into());
                cases.push(
                    "<tool_call>\n{\"name\": \"f\", \"arguments\": \"{}\"}\n</tool_call>".into(),
                );
                cases.push("<tool_call>\n{\"name\": \"f\", \"name\": \"g\"}\n</tool_call>".into());
            }
            DeepSeekV3 => cases.push(good.replace("```json\n", "")),
            DeepSeekV31 => cases.push(good.replace("<｜tool▁sep｜>", "")),
            KimiK2 => {
                cases.push(good.replace(":0", ""));
                cases.push("<|tool_calls_section_begin|><|tool_calls_section_end|>".into());
            }
        }
        cases
    }

    #[test]
    fn malformed_output_comes_back_whole_as_content_and_never_panics() {
        for format in ALL {
            for text in malformed_cases(format) {
                assert_eq!(
                    parse_tool_calls(format, &text),
                    (Some(text.clone()), vec![]),
                    "{format:?}"
                );
                for pieces in feedings(&text) {
                    let (content, calls) = stream(format, &pieces);
                    // Before a call has started, nothing is lost or changed; after, the rest is content.
                    if calls.is_empty() {
                        assert_eq!(
                            content.as_deref(),
                            Some(text.as_str()),
                            "{format:?} {pieces:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn names_round_trip_and_aliases_parse() {
        for format in ALL {
            assert_eq!(ToolCallFormat::from_name(format.name()), Some(format));
        }
        assert_eq!(ToolCallFormat::from_name("qwen3"), Some(Qwen3));
        assert_eq!(ToolCallFormat::from_name("llama3_json"), None);
    }

    #[test]
    fn detect_tells_families_apart_by_their_templates() {
        // Fragments of the real templates in models/chat_templates and qwen3's tokenizer_config.json.
        let v3 = r#"'<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n'"#;
        let v31 = r#"'<｜tool▁call▁begin｜>'+ tool['function']['name'] + '<｜tool▁sep｜>' + tool['function']['arguments']"#;
        let kimi = "<|tool_calls_section_begin|>{%- for tool_call in message['tool_calls'] -%}";
        let qwen = r#"{{- '<tool_call>\n{"name": "' }}"#;
        assert_eq!(
            ToolCallFormat::detect("deepseek_v3", Some(v3)),
            Some(DeepSeekV3)
        );
        assert_eq!(
            ToolCallFormat::detect("deepseek_v3", Some(v31)),
            Some(DeepSeekV31)
        );
        assert_eq!(
            ToolCallFormat::detect("deepseek_v3", Some(kimi)),
            Some(KimiK2)
        );
        assert_eq!(ToolCallFormat::detect("kimi_k2", Some(kimi)), Some(KimiK2));
        assert_eq!(ToolCallFormat::detect("qwen3_moe", Some(qwen)), Some(Qwen3));
        assert_eq!(ToolCallFormat::detect("qwen3", None), Some(Qwen3));
        assert_eq!(
            ToolCallFormat::detect("deepseek_v3", None),
            Some(DeepSeekV3)
        );
        assert_eq!(
            ToolCallFormat::detect("llama", Some("{{ messages }}")),
            None
        );
    }

    #[test]
    fn section_start_is_the_first_marker_a_call_writes() {
        for format in ALL {
            let text = render(format, "", &[("f", "{}")]);
            assert!(text.starts_with(format.section_start()), "{format:?}");
        }
    }

    #[test]
    fn generated_ids_are_call_and_24_alphanumerics_and_differ() {
        let (a, b) = (new_call_id(), new_call_id());
        for id in [&a, &b] {
            let tail = id.strip_prefix("call_").unwrap_or("");
            assert_eq!(tail.len(), 24, "{id}");
            assert!(tail.bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
        }
        assert_ne!(a, b);
    }
}
