//! Splitting a model's thinking (`<think>...</think>`) from its answer, whole or while streaming.
//!
//! Follows vLLM's qwen3 / deepseek_r1 parsers: the output may open with `<think>` (or the prompt
//! already did), everything up to `</think>` is reasoning, the rest is content. The newlines
//! the templates put around the tags (`<think>\n...\n</think>\n\n`) are layout and are dropped.

use std::mem;

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// The reasoning syntax a model family writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningFormat {
    /// `<think>...</think>`: Qwen3, DeepSeek V3.1 thinking, Kimi K2 Thinking, DeepSeek R1.
    Think,
}

impl ReasoningFormat {
    /// Parses a CLI name: `qwen3`, `deepseek_r1`, `deepseek_v3`, `kimi_k2` or `think`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "qwen3" | "deepseek_r1" | "deepseek_v3" | "kimi_k2" | "think" => Some(Self::Think),
            _ => None,
        }
    }

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Think => "think",
        }
    }

    /// The default for a checkpoint: `Think` when its chat template knows `</think>`.
    ///
    /// Every family we serve thinks in the same tags, so only the template tells whether a
    /// checkpoint thinks at all; `model_type` is taken for families that will differ.
    pub fn detect(model_type: &str, chat_template: Option<&str>) -> Option<Self> {
        let _ = model_type;
        chat_template
            .filter(|template| template.contains(CLOSE))
            .map(|_| Self::Think)
    }
}

/// Whether the rendered prompt left a `<think>` open, so the output starts inside reasoning
/// (DeepSeek V3.1 thinking ends its prompt with `<think>`; Qwen3's no-think prompt closes it).
pub fn prompt_opens_reasoning(prompt_text: &str) -> bool {
    prompt_text
        .rfind(OPEN)
        .is_some_and(|at| !prompt_text[at..].contains(CLOSE))
}

/// Splits a whole output into (reasoning, content), each None when empty.
///
/// `starts_in_reasoning`: the prompt already opened `<think>` (see [`prompt_opens_reasoning`]).
pub fn split_reasoning(text: &str, starts_in_reasoning: bool) -> (Option<String>, Option<String>) {
    let mut stream = ReasoningStream::new(starts_in_reasoning);
    let mut events = stream.push(text);
    events.extend(stream.finish());
    let (mut reasoning, mut content) = (String::new(), String::new());
    for event in events {
        match event {
            ReasoningEvent::Reasoning(text) => reasoning.push_str(&text),
            ReasoningEvent::Content(text) => content.push_str(&text),
        }
    }
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    (non_empty(reasoning), non_empty(content))
}

/// A piece of streamed output, already sorted into reasoning or answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReasoningEvent {
    /// Text for `reasoning_content`.
    Reasoning(String),
    /// Text for `content`.
    Content(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the first non-whitespace: the output may still open with `<think>`.
    Opening,
    Reasoning,
    Content,
}

/// Streaming reasoning splitter: feed it text deltas, get reasoning and content back.
#[derive(Debug)]
pub struct ReasoningStream {
    phase: Phase,
    starts_in_reasoning: bool,
    /// Received text not yet sorted (leading whitespace, a possible tag prefix).
    buf: String,
    /// Newlines at the start of reasoning or content are layout; drop them.
    skip_newlines: bool,
    /// Trailing newlines of reasoning, sent only if more reasoning follows.
    pending_newlines: String,
}

impl ReasoningStream {
    /// A splitter for one generation; `starts_in_reasoning` as for [`split_reasoning`].
    pub fn new(starts_in_reasoning: bool) -> Self {
        Self {
            phase: Phase::Opening,
            starts_in_reasoning,
            buf: String::new(),
            // Reasoning the prompt opened begins with the template's newline too.
            skip_newlines: starts_in_reasoning,
            pending_newlines: String::new(),
        }
    }

    /// Feeds the next piece of generated text; returns what can be sorted already.
    pub fn push(&mut self, delta: &str) -> Vec<ReasoningEvent> {
        self.buf.push_str(delta);
        let mut out = Vec::new();
        let buf = mem::take(&mut self.buf);
        let mut pos = 0;
        while pos < buf.len() {
            match self.step(&buf[pos..], &mut out) {
                Some(n) => pos += n,
                None => break,
            }
        }
        self.buf = buf[pos..].to_string();
        out
    }

    /// Ends the generation: held-back text is sorted where it stands (a cut-off tag is text).
    pub fn finish(&mut self) -> Vec<ReasoningEvent> {
        let mut out = self.push("");
        let rest = mem::take(&mut self.buf);
        if self.in_reasoning() {
            self.emit_reasoning(&rest, &mut out);
        } else {
            self.emit_content(&rest, &mut out);
        }
        self.pending_newlines.clear();
        out
    }

    /// Whether text arriving now would be reasoning.
    pub fn in_reasoning(&self) -> bool {
        match self.phase {
            Phase::Opening => self.starts_in_reasoning,
            Phase::Reasoning => true,
            Phase::Content => false,
        }
    }

    /// Sorts a prefix of non-empty `rest`; returns its length (0 only with a change of phase),
    /// or None to wait for more text.
    fn step(&mut self, rest: &str, out: &mut Vec<ReasoningEvent>) -> Option<usize> {
        match self.phase {
            Phase::Opening => {
                let body = rest.trim_start();
                let ws = rest.len() - body.len();
                if body.starts_with(OPEN) {
                    self.phase = Phase::Reasoning;
                    self.skip_newlines = true;
                    return Some(ws + OPEN.len());
                }
                if OPEN.starts_with(body) {
                    return None;
                }
                // No tag: the whitespace belongs to whatever the output is.
                self.phase = if self.starts_in_reasoning {
                    self.skip_newlines = true;
                    Phase::Reasoning
                } else {
                    Phase::Content
                };
                Some(0)
            }
            Phase::Reasoning => {
                if let Some(at) = rest.find(CLOSE) {
                    self.emit_reasoning(&rest[..at], out);
                    self.pending_newlines.clear();
                    self.phase = Phase::Content;
                    self.skip_newlines = true;
                    return Some(at + CLOSE.len());
                }
                let safe = marker_prefix_start(rest, CLOSE);
                self.emit_reasoning(&rest[..safe], out);
                (safe > 0).then_some(safe)
            }
            Phase::Content => {
                self.emit_content(rest, out);
                Some(rest.len())
            }
        }
    }

    fn emit_reasoning(&mut self, text: &str, out: &mut Vec<ReasoningEvent>) {
        let text = self.skip_leading_newlines(text);
        let body = text.trim_end_matches('\n');
        if !body.is_empty() {
            let mut piece = mem::take(&mut self.pending_newlines);
            piece.push_str(body);
            push_event(out, ReasoningEvent::Reasoning(piece));
        }
        self.pending_newlines.push_str(&text[body.len()..]);
    }

    fn emit_content(&mut self, text: &str, out: &mut Vec<ReasoningEvent>) {
        let text = self.skip_leading_newlines(text);
        if !text.is_empty() {
            push_event(out, ReasoningEvent::Content(text.to_string()));
        }
    }

    fn skip_leading_newlines<'a>(&mut self, text: &'a str) -> &'a str {
        if !self.skip_newlines {
            return text;
        }
        let text = text.trim_start_matches('\n');
        self.skip_newlines = text.is_empty();
        text
    }
}

/// Appends to the last event when it is of the same kind, so events stay few.
fn push_event(out: &mut Vec<ReasoningEvent>, event: ReasoningEvent) {
    match (out.last_mut(), event) {
        (Some(ReasoningEvent::Reasoning(last)), ReasoningEvent::Reasoning(text))
        | (Some(ReasoningEvent::Content(last)), ReasoningEvent::Content(text)) => {
            last.push_str(&text)
        }
        (_, event) => out.push(event),
    }
}

/// Where the longest suffix of `text` that could still grow into `marker` begins (`text.len()` if none).
fn marker_prefix_start(text: &str, marker: &str) -> usize {
    let from = text.len().saturating_sub(marker.len().saturating_sub(1));
    (from..text.len())
        .filter(|&i| text.is_char_boundary(i))
        .find(|&i| marker.starts_with(&text[i..]))
        .unwrap_or(text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (output, starts_in_reasoning, reasoning, content) — the rules, one line each.
    const CASES: &[(&str, bool, Option<&str>, Option<&str>)] = &[
        // Qwen3 thinking: the model opens the block itself; template newlines are dropped.
        (
            "<think>\nI should greet.\n</think>\n\nHello!",
            false,
            Some("I should greet."),
            Some("Hello!"),
        ),
        // DeepSeek V3.1 thinking: the prompt opened it.
        (
            "\nI should greet.\n</think>\n\nHello!",
            true,
            Some("I should greet."),
            Some("Hello!"),
        ),
        // No tag and not opened by the prompt: all answer, untouched.
        ("\nHello!\n", false, None, Some("\nHello!\n")),
        ("Hello!", false, None, Some("Hello!")),
        // Cut off by max_tokens while thinking.
        ("I was cut off\n", true, Some("I was cut off"), None),
        (
            "<think>\nstill thinking",
            false,
            Some("still thinking"),
            None,
        ),
        ("<think>a</thi", false, Some("a</thi"), None),
        // Only a leading tag opens reasoning; a tag in prose is prose.
        (
            "Tags like <think> stay content</think>.",
            false,
            None,
            Some("Tags like <think> stay content</think>."),
        ),
        ("x</think>y", false, None, Some("x</think>y")),
        // Whitespace before the opening tag, and a repeated tag after the prompt's, are layout.
        (" \n<think>a</think>b", false, Some("a"), Some("b")),
        ("<think>\nx</think>y", true, Some("x"), Some("y")),
        // Qwen3's empty block (enable_thinking=false) leaves no reasoning.
        ("<think>\n\n</think>\n\nHi", false, None, Some("Hi")),
        // Newlines inside reasoning stay; only the first </think> closes it.
        (
            "<think>a\n\nb\n</think>c</think>\nd",
            false,
            Some("a\n\nb"),
            Some("c</think>\nd"),
        ),
        ("<think>\nreason\n</think>\n\n", false, Some("reason"), None),
        ("", false, None, None),
        ("<thi", false, None, Some("<thi")),
        ("  <thi", true, Some("  <thi"), None),
        ("\n<thi", true, Some("<thi"), None),
        (
            "Zürich 🌸</think>\n答え",
            true,
            Some("Zürich 🌸"),
            Some("答え"),
        ),
    ];

    fn streamed(pieces: &[&str], starts_in_reasoning: bool) -> (Option<String>, Option<String>) {
        let mut stream = ReasoningStream::new(starts_in_reasoning);
        let mut events = Vec::new();
        for piece in pieces {
            events.extend(stream.push(piece));
        }
        events.extend(stream.finish());
        let (mut reasoning, mut content) = (None::<String>, None::<String>);
        for event in events {
            let (slot, text) = match event {
                ReasoningEvent::Reasoning(text) => (&mut reasoning, text),
                ReasoningEvent::Content(text) => (&mut content, text),
            };
            assert!(!text.is_empty(), "no empty events");
            slot.get_or_insert_with(String::new).push_str(&text);
        }
        (reasoning, content)
    }

    /// Whole, cut once at every char boundary, 1-char pieces and seeded random pieces.
    fn feedings(text: &str) -> Vec<Vec<&str>> {
        let bounds: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect();
        let mut all = vec![vec![text]];
        for (i, _) in text.char_indices().skip(1) {
            all.push(vec![&text[..i], &text[i..]]);
        }
        all.push(bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect());
        for seed in 1..=20u64 {
            let mut state = seed;
            let (mut at, mut pieces) = (0, Vec::new());
            while at + 1 < bounds.len() {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let next = (at + (state >> 33) as usize % 7 + 1).min(bounds.len() - 1);
                pieces.push(&text[bounds[at]..bounds[next]]);
                at = next;
            }
            all.push(pieces);
        }
        all
    }

    #[test]
    fn whole_outputs_split_by_the_rules() {
        for &(text, starts, reasoning, content) in CASES {
            let got = split_reasoning(text, starts);
            assert_eq!(
                (got.0.as_deref(), got.1.as_deref()),
                (reasoning, content),
                "{text:?} starts={starts}"
            );
        }
    }

    #[test]
    fn streaming_gives_the_same_split_for_every_way_of_cutting_the_text() {
        for &(text, starts, reasoning, content) in CASES {
            for pieces in feedings(text) {
                let got = streamed(&pieces, starts);
                assert_eq!(
                    (got.0.as_deref(), got.1.as_deref()),
                    (reasoning, content),
                    "{pieces:?} starts={starts}"
                );
            }
        }
    }

    #[test]
    fn streaming_holds_back_only_what_could_be_a_tag_or_layout() {
        let mut stream = ReasoningStream::new(false);
        assert_eq!(stream.push("<thi"), []);
        assert!(!stream.in_reasoning());
        assert_eq!(
            stream.push("nk>\nI thi"),
            [ReasoningEvent::Reasoning("I thi".into())]
        );
        assert!(stream.in_reasoning());
        assert_eq!(
            stream.push("nk.\n"),
            [ReasoningEvent::Reasoning("nk.".into())]
        );
        assert_eq!(stream.push("</th"), []);
        assert_eq!(
            stream.push("ink>\n\nHi"),
            [ReasoningEvent::Content("Hi".into())]
        );
        assert!(!stream.in_reasoning());
        assert_eq!(stream.finish(), []);
    }

    #[test]
    fn a_prompt_opens_reasoning_when_its_last_think_is_unclosed() {
        assert!(prompt_opens_reasoning("<｜User｜>Hi<｜Assistant｜><think>"));
        assert!(prompt_opens_reasoning("<|im_start|>assistant\n<think>\n"));
        assert!(!prompt_opens_reasoning(
            "<｜User｜>Hi<｜Assistant｜></think>"
        ));
        assert!(!prompt_opens_reasoning(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ));
        assert!(!prompt_opens_reasoning("<|im_start|>assistant\n"));
    }

    #[test]
    fn names_and_detection() {
        for name in ["qwen3", "deepseek_r1", "deepseek_v3", "kimi_k2", "think"] {
            assert_eq!(
                ReasoningFormat::from_name(name),
                Some(ReasoningFormat::Think)
            );
        }
        assert_eq!(
            ReasoningFormat::from_name(ReasoningFormat::Think.name()),
            Some(ReasoningFormat::Think)
        );
        assert_eq!(ReasoningFormat::from_name("hermes"), None);
        // Fragments of the Qwen3 and DeepSeek V3.1 templates; Kimi K2 (instruct) has no think tags.
        let qwen3 = r#"{{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' }}"#;
        let v31 = "{%- if not thinking %}{{'</think>'}}{%- else %}{{'<think>'}}{%- endif %}";
        let kimi = "<|im_assistant|>assistant<|im_middle|>";
        assert_eq!(
            ReasoningFormat::detect("qwen3_moe", Some(qwen3)),
            Some(ReasoningFormat::Think)
        );
        assert_eq!(
            ReasoningFormat::detect("deepseek_v3", Some(v31)),
            Some(ReasoningFormat::Think)
        );
        assert_eq!(ReasoningFormat::detect("kimi_k2", Some(kimi)), None);
        assert_eq!(ReasoningFormat::detect("qwen3", None), None);
    }
}
