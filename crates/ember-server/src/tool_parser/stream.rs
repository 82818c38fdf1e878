//! The incremental tool-call parser: one state machine that both the streaming and the
//! whole-output paths run, so the two can never disagree.

use std::mem;

use super::json_scan::{Scan, ValueScanner};
use super::{new_call_id, ToolCallFormat, ToolEvent};

/// A call header (name, id or V3's type line) longer than this is prose, not a call.
const HEADER_LIMIT: usize = 512;

/// The literal markers of one family; unused ones are empty.
struct Markers {
    /// Opens the tool-call section (Qwen3: opens one call).
    section_begin: &'static str,
    call_begin: &'static str,
    /// Ends the call header: V3's type, V3.1's name, Kimi's id.
    header_end: &'static str,
    call_end: &'static str,
    section_end: &'static str,
}

const DEEPSEEK: Markers = Markers {
    section_begin: "<｜tool▁calls▁begin｜>",
    call_begin: "<｜tool▁call▁begin｜>",
    header_end: "<｜tool▁sep｜>",
    call_end: "<｜tool▁call▁end｜>",
    section_end: "<｜tool▁calls▁end｜>",
};

const KIMI_K2: Markers = Markers {
    section_begin: "<|tool_calls_section_begin|>",
    call_begin: "<|tool_call_begin|>",
    header_end: "<|tool_call_argument_begin|>",
    call_end: "<|tool_call_end|>",
    section_end: "<|tool_calls_section_end|>",
};

const QWEN3: Markers = Markers {
    section_begin: "<tool_call>",
    call_begin: "",
    header_end: "",
    call_end: "</tool_call>",
    section_end: "",
};

fn markers(format: ToolCallFormat) -> &'static Markers {
    match format {
        ToolCallFormat::Qwen3 => &QWEN3,
        ToolCallFormat::DeepSeekV3 | ToolCallFormat::DeepSeekV31 => &DEEPSEEK,
        ToolCallFormat::KimiK2 => &KIMI_K2,
    }
}

/// The marker that opens a family's tool calls.
pub(super) fn section_begin(format: ToolCallFormat) -> &'static str {
    markers(format).section_begin
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Plain text, watching for the section marker.
    Content,
    /// Inside a section, between calls: whitespace, then a call or the section's end.
    SectionGap,
    /// The call header up to `header_end`.
    Header,
    /// DeepSeek V3: the function name, up to the newline.
    V3Name,
    /// DeepSeek V3: the opening ```json fence.
    V3OpenFence,
    /// Whitespace, then the `{` of the arguments.
    ArgsOpen,
    /// The arguments object, forwarded as it comes.
    Args,
    /// DeepSeek V3: the closing ``` fence.
    V3CloseFence,
    /// Whitespace, then `call_end`.
    CallEnd,
    /// Qwen3: the `{` of the call object.
    QwenOpen,
    /// Qwen3: a key of the call object.
    QwenKeyStart,
    QwenKey,
    QwenColon,
    QwenValueStart,
    /// Qwen3: the "name" value or a value we skip.
    QwenValue,
    QwenAfterValue,
    /// Qwen3: `</tool_call>`.
    QwenClose,
    /// Malformed output or a finished stream: everything is content from here on.
    Passthrough,
}

/// How far one step got through the buffered text.
enum Step {
    Advance(usize),
    Wait,
}

/// Streaming tool-call parser: feed it text deltas, get content and call events back.
#[derive(Debug)]
pub struct ToolCallStream {
    format: ToolCallFormat,
    state: State,
    /// Text received but not yet consumed (a possible marker prefix, an unfinished token).
    buf: String,
    /// Consumed text of the current section or call not yet sent as an event; it goes out as
    /// content if the structure turns out malformed.
    held_raw: String,
    /// Trailing whitespace of content, sent only once more content follows (dropped before a call).
    pending_ws: String,
    /// After a call, leading whitespace of the content that follows is dropped.
    skip_ws: bool,
    scanner: ValueScanner,
    /// A key, name or header still being read.
    scratch: String,
    /// Qwen3: the key whose value comes next.
    key: String,
    /// Index of the call whose CallStart was sent and whose end has not come.
    current: Option<usize>,
    /// Arguments text of the current call (validated when it closes).
    args_text: String,
    args_seen: bool,
    calls_in_section: usize,
    calls: usize,
    malformed: bool,
}

impl ToolCallStream {
    /// A parser for one generation in the given family's format.
    pub fn new(format: ToolCallFormat) -> Self {
        Self {
            format,
            state: State::Content,
            buf: String::new(),
            held_raw: String::new(),
            pending_ws: String::new(),
            skip_ws: false,
            scanner: ValueScanner::new(),
            scratch: String::new(),
            key: String::new(),
            current: None,
            args_text: String::new(),
            args_seen: false,
            calls_in_section: 0,
            calls: 0,
            malformed: false,
        }
    }

    /// Feeds the next piece of generated text; returns what can be said about it already.
    pub fn push(&mut self, delta: &str) -> Vec<ToolEvent> {
        self.buf.push_str(delta);
        let mut out = Vec::new();
        self.run(&mut out);
        out
    }

    /// Ends the generation: held-back text goes out as content, and an unfinished call is
    /// flushed as content. Later pushes pass straight through as content.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut out = Vec::new();
        self.run(&mut out);
        let rest = mem::take(&mut self.buf);
        match self.state {
            State::Content => {
                self.emit_content(&rest, &mut out);
                let ws = mem::take(&mut self.pending_ws);
                // Whitespace around calls is layout, not an answer; with no calls it is the answer's.
                if self.calls == 0 {
                    push_content(&mut out, &ws);
                }
            }
            State::Passthrough => push_content(&mut out, &rest),
            _ => {
                self.fail(&rest, &mut out);
            }
        }
        self.state = State::Passthrough;
        out
    }

    /// How many calls have been started (CallStart events sent) so far.
    pub fn calls_emitted(&self) -> usize {
        self.calls
    }

    /// Whether the output broke the format somewhere (the rest then streamed as content).
    pub(super) fn malformed(&self) -> bool {
        self.malformed
    }

    fn run(&mut self, out: &mut Vec<ToolEvent>) {
        let buf = mem::take(&mut self.buf);
        let mut pos = 0;
        while pos < buf.len() {
            match self.step(&buf[pos..], out) {
                Step::Advance(n) => pos += n,
                Step::Wait => break,
            }
        }
        self.buf = buf[pos..].to_string();
    }

    /// Makes progress on non-empty `rest`; every Advance(0) comes with a change of state.
    fn step(&mut self, rest: &str, out: &mut Vec<ToolEvent>) -> Step {
        let m = markers(self.format);
        match self.state {
            State::Passthrough => {
                push_content(out, rest);
                Step::Advance(rest.len())
            }
            State::Content => self.content(rest, out),
            State::SectionGap => self.section_gap(rest, out),
            State::Header => self.read_until(rest, m.header_end, out),
            State::V3Name => self.read_until(rest, "\n", out),
            State::V3OpenFence => self.expect(rest, "```json", State::ArgsOpen, out),
            State::ArgsOpen | State::QwenKeyStart => {
                let ws = self.skip_whitespace(rest);
                if ws > 0 {
                    return Step::Advance(ws);
                }
                let (opener, next) = match self.state {
                    State::ArgsOpen => ('{', State::Args),
                    _ => ('"', State::QwenKey),
                };
                if !rest.starts_with(opener) {
                    return self.fail(rest, out);
                }
                self.scanner = ValueScanner::new();
                self.state = next;
                Step::Advance(0)
            }
            State::Args | State::QwenKey | State::QwenValue => self.scan_value(rest, out),
            State::V3CloseFence => self.expect(rest, "```", State::CallEnd, out),
            State::CallEnd => self.expect(rest, m.call_end, State::SectionGap, out),
            State::QwenOpen => self.expect(rest, "{", State::QwenKeyStart, out),
            State::QwenColon => self.expect(rest, ":", State::QwenValueStart, out),
            State::QwenValueStart => self.qwen_value_start(rest, out),
            State::QwenAfterValue => self.qwen_after_value(rest, out),
            State::QwenClose => self.expect(rest, m.call_end, State::Content, out),
        }
    }

    fn content(&mut self, rest: &str, out: &mut Vec<ToolEvent>) -> Step {
        let marker = markers(self.format).section_begin;
        if let Some(i) = rest.find(marker) {
            self.emit_content(&rest[..i], out);
            self.held_raw.push_str(marker);
            self.calls_in_section = 0;
            self.state = match self.format {
                ToolCallFormat::Qwen3 => {
                    self.key.clear();
                    self.args_seen = false;
                    State::QwenOpen
                }
                _ => State::SectionGap,
            };
            return Step::Advance(i + marker.len());
        }
        let safe = marker_prefix_start(rest, marker);
        if safe == 0 {
            return Step::Wait;
        }
        self.emit_content(&rest[..safe], out);
        Step::Advance(safe)
    }

    fn section_gap(&mut self, rest: &str, out: &mut Vec<ToolEvent>) -> Step {
        let ws = self.skip_whitespace(rest);
        if ws > 0 {
            return Step::Advance(ws);
        }
        let m = markers(self.format);
        if rest.starts_with(m.call_begin) {
            self.held_raw.push_str(m.call_begin);
            self.calls_in_section += 1;
            self.scratch.clear();
            self.args_text.clear();
            self.state = State::Header;
            return Step::Advance(m.call_begin.len());
        }
        // An empty section is not a way of calling nothing; treat it as malformed.
        if rest.starts_with(m.section_end) && self.calls_in_section > 0 {
            self.held_raw.clear();
            self.skip_ws = true;
            self.state = State::Content;
            return Step::Advance(m.section_end.len());
        }
        if m.call_begin.starts_with(rest) || m.section_end.starts_with(rest) {
            return Step::Wait;
        }
        self.fail(rest, out)
    }

    /// Reads a header field up to `end`, then acts on it by state.
    fn read_until(&mut self, rest: &str, end: &str, out: &mut Vec<ToolEvent>) -> Step {
        let Some(i) = rest.find(end) else {
            let safe = marker_prefix_start(rest, end);
            self.scratch.push_str(&rest[..safe]);
            self.held_raw.push_str(&rest[..safe]);
            if self.scratch.len() > HEADER_LIMIT {
                return self.fail(&rest[safe..], out).plus(safe);
            }
            return if safe == 0 {
                Step::Wait
            } else {
                Step::Advance(safe)
            };
        };
        self.scratch.push_str(&rest[..i]);
        self.held_raw.push_str(&rest[..i + end.len()]);
        let field = mem::take(&mut self.scratch);
        let field = field.trim();
        let consumed = i + end.len();
        let call = match (self.format, self.state) {
            // V3's header is the call type ("function"); the name follows on its own line.
            (ToolCallFormat::DeepSeekV3, State::Header) => {
                self.state = State::V3Name;
                return Step::Advance(consumed);
            }
            (ToolCallFormat::KimiK2, _) => kimi_name(field).map(|name| (field.to_string(), name)),
            _ => Some((new_call_id(), field.to_string())),
        };
        match call {
            Some((id, name)) if !name.is_empty() => {
                self.start_call(id, name, out);
                self.state = match self.format {
                    ToolCallFormat::DeepSeekV3 => State::V3OpenFence,
                    _ => State::ArgsOpen,
                };
                Step::Advance(consumed)
            }
            _ => self.fail(&rest[consumed..], out).plus(consumed),
        }
    }

    /// Skips whitespace, then requires `literal` and moves to `next`.
    fn expect(&mut self, rest: &str, literal: &str, next: State, out: &mut Vec<ToolEvent>) -> Step {
        let ws = self.skip_whitespace(rest);
        if ws > 0 {
            return Step::Advance(ws);
        }
        if rest.starts_with(literal) {
            self.held_raw.push_str(literal);
            if next == State::SectionGap || self.state == State::QwenClose {
                self.end_call();
            }
            if self.state == State::QwenClose {
                self.skip_ws = true;
            }
            self.state = next;
            return Step::Advance(literal.len());
        }
        if literal.starts_with(rest) {
            return Step::Wait;
        }
        self.fail(rest, out)
    }

    /// Feeds the scanner; on the value's end, hands it to `value_done`.
    fn scan_value(&mut self, rest: &str, out: &mut Vec<ToolEvent>) -> Step {
        let mut end = None;
        for (i, c) in rest.char_indices() {
            match self.scanner.feed(c) {
                Scan::More => {}
                Scan::End => {
                    end = Some(i + c.len_utf8());
                    break;
                }
                Scan::EndBefore => {
                    end = Some(i);
                    break;
                }
                Scan::Invalid => return self.fail(rest, out),
            }
        }
        let taken = end.unwrap_or(rest.len());
        let piece = &rest[..taken];
        if self.state == State::Args {
            self.emit_args(piece, out);
        } else {
            self.scratch.push_str(piece);
            self.held_raw.push_str(piece);
        }
        match end {
            None => Step::Advance(taken),
            Some(_) if self.value_done(out) => Step::Advance(taken),
            Some(_) => self.fail(&rest[taken..], out).plus(taken),
        }
    }

    /// A scanned value is complete: checks it and moves on; false when it is malformed.
    fn value_done(&mut self, out: &mut Vec<ToolEvent>) -> bool {
        match self.state {
            State::Args => {
                let is_object = serde_json::from_str::<serde_json::Value>(&self.args_text)
                    .is_ok_and(|v| v.is_object());
                self.state = match self.format {
                    ToolCallFormat::Qwen3 => State::QwenAfterValue,
                    ToolCallFormat::DeepSeekV3 => State::V3CloseFence,
                    _ => State::CallEnd,
                };
                is_object
            }
            State::QwenKey => {
                let key = serde_json::from_str::<String>(&mem::take(&mut self.scratch));
                self.state = State::QwenColon;
                match key {
                    Ok(key) => {
                        self.key = key;
                        true
                    }
                    Err(_) => false,
                }
            }
            _ => {
                let value = mem::take(&mut self.scratch);
                self.state = State::QwenAfterValue;
                if self.key != "name" {
                    return serde_json::from_str::<serde_json::Value>(&value).is_ok();
                }
                match serde_json::from_str::<String>(&value) {
                    Ok(name) if !name.is_empty() && self.current.is_none() => {
                        self.start_call(new_call_id(), name, out);
                        true
                    }
                    _ => false,
                }
            }
        }
    }

    fn qwen_value_start(&mut self, rest: &str, out: &mut Vec<ToolEvent>) -> Step {
        let ws = self.skip_whitespace(rest);
        if ws > 0 {
            return Step::Advance(ws);
        }
        let first = rest.chars().next();
        self.scanner = ValueScanner::new();
        self.scratch.clear();
        self.state = match self.key.as_str() {
            "arguments" if first == Some('{') && !self.args_seen => {
                self.args_seen = true;
                State::Args
            }
            "name" if first == Some('"') => State::QwenValue,
            "arguments" | "name" => return self.fail(rest, out),
            _ => State::QwenValue,
        };
        Step::Advance(0)
    }

    fn qwen_after_value(&mut self, rest: &str, out: &mut Vec<ToolEvent>) -> Step {
        let ws = self.skip_whitespace(rest);
        if ws > 0 {
            return Step::Advance(ws);
        }
        if rest.starts_with(',') {
            self.held_raw.push(',');
            self.state = State::QwenKeyStart;
            return Step::Advance(1);
        }
        if !rest.starts_with('}') || self.current.is_none() {
            return self.fail(rest, out);
        }
        self.held_raw.push('}');
        if !self.args_seen {
            // A call without "arguments" takes none; say so, so every call has an object.
            self.emit_args("{}", out);
        }
        self.state = State::QwenClose;
        Step::Advance(1)
    }

    /// Sends content, holding trailing whitespace back and dropping it around calls.
    fn emit_content(&mut self, text: &str, out: &mut Vec<ToolEvent>) {
        let mut text = text;
        if self.skip_ws {
            text = text.trim_start();
            if text.is_empty() {
                return;
            }
            self.skip_ws = false;
        }
        let body = text.trim_end();
        if !body.is_empty() {
            let mut piece = mem::take(&mut self.pending_ws);
            piece.push_str(body);
            push_content(out, &piece);
        }
        self.pending_ws.push_str(&text[body.len()..]);
    }

    fn emit_args(&mut self, piece: &str, out: &mut Vec<ToolEvent>) {
        self.args_text.push_str(piece);
        let Some(index) = self.current else {
            // Qwen3 with "arguments" before "name": keep them until the name is known.
            self.held_raw.push_str(piece);
            return;
        };
        if let Some(ToolEvent::Arguments {
            index: last,
            fragment,
        }) = out.last_mut()
        {
            if *last == index {
                fragment.push_str(piece);
                return;
            }
        }
        out.push(ToolEvent::Arguments {
            index,
            fragment: piece.to_string(),
        });
    }

    fn start_call(&mut self, id: String, name: String, out: &mut Vec<ToolEvent>) {
        self.pending_ws.clear();
        self.held_raw.clear();
        let index = self.calls;
        self.calls += 1;
        self.current = Some(index);
        out.push(ToolEvent::CallStart { index, id, name });
        if !self.args_text.is_empty() {
            let early = self.args_text.clone();
            self.args_text.clear();
            self.emit_args(&early, out);
        }
    }

    fn end_call(&mut self) {
        self.current = None;
        self.held_raw.clear();
        self.args_text.clear();
    }

    /// Consumes leading whitespace into the held raw text; returns its length.
    fn skip_whitespace(&mut self, rest: &str) -> usize {
        let ws = rest.len() - rest.trim_start().len();
        self.held_raw.push_str(&rest[..ws]);
        ws
    }

    /// The output broke the format: what was held back and all that follows is content.
    fn fail(&mut self, rest: &str, out: &mut Vec<ToolEvent>) -> Step {
        let mut text = mem::take(&mut self.pending_ws);
        text.push_str(&mem::take(&mut self.held_raw));
        text.push_str(rest);
        push_content(out, &text);
        self.current = None;
        self.malformed = true;
        self.state = State::Passthrough;
        Step::Advance(rest.len())
    }
}

impl Step {
    /// Adds bytes consumed before the step's own.
    fn plus(self, before: usize) -> Step {
        match self {
            Step::Advance(n) => Step::Advance(before + n),
            Step::Wait => Step::Advance(before),
        }
    }
}

/// Kimi's call id is `functions.NAME:IDX`; the name is what lies between.
fn kimi_name(id: &str) -> Option<String> {
    let (path, idx) = id.rsplit_once(':')?;
    if idx.is_empty() || !idx.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(path.strip_prefix("functions.").unwrap_or(path).to_string())
}

/// Where the longest suffix of `text` that could still grow into `marker` begins (`text.len()` if none).
pub(super) fn marker_prefix_start(text: &str, marker: &str) -> usize {
    let from = text.len().saturating_sub(marker.len().saturating_sub(1));
    (from..text.len())
        .filter(|&i| text.is_char_boundary(i))
        .find(|&i| marker.starts_with(&text[i..]))
        .unwrap_or(text.len())
}

/// Appends content to the last event when that is content too, so events stay few.
fn push_content(out: &mut Vec<ToolEvent>, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(ToolEvent::Content(last)) = out.last_mut() {
        last.push_str(text);
    } else {
        out.push(ToolEvent::Content(text.to_string()));
    }
}
