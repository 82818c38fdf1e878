//! Server-sent events off a byte stream that arrives in arbitrary pieces: an event may be split
//! across reads, or one read may hold several events.

/// One event: its `event:` type, if any, and its `data:` lines joined by newlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    /// Whether this is the OpenAI end-of-stream marker `data: [DONE]`.
    pub fn is_done(&self) -> bool {
        self.data.trim() == "[DONE]"
    }
}

/// Buffers bytes until a blank line completes an event.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
}

impl SseParser {
    /// An empty parser.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next piece of the body; the events it completes.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some((end, sep)) = find_blank_line(&self.buffer) {
            let block: Vec<u8> = self.buffer.drain(..end + sep).take(end).collect();
            events.extend(parse_block(&block));
        }
        events
    }

    /// The event left without its closing blank line when the body ended, if any.
    pub fn finish(&mut self) -> Option<SseEvent> {
        let block = std::mem::take(&mut self.buffer);
        parse_block(&block)
    }
}

/// Where the first event ends (`\n\n`, `\r\n\r\n` or `\r\r`) and the separator's length.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    (0..buf.len()).find_map(|i| {
        let rest = &buf[i..];
        if rest.starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else if rest.starts_with(b"\n\n") || rest.starts_with(b"\r\r") {
            Some((i, 2))
        } else {
            None
        }
    })
}

/// The event of one block of lines; `None` for a block of comments (`: ping`) or nothing.
fn parse_block(block: &[u8]) -> Option<SseEvent> {
    let text = String::from_utf8_lossy(block);
    let mut event = None;
    let mut data: Option<String> = None;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            },
            "event" => event = Some(value.to_string()),
            _ => {}
        }
    }
    data.map(|data| SseEvent { event, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(d: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: d.into(),
        }
    }

    #[test]
    fn events_split_across_reads_come_out_whole() {
        let body = b"data: {\"a\":1}\n\ndata: {\"b\":\n\ndata: [DONE]\n\n";
        for cut in 0..body.len() {
            let mut p = SseParser::new();
            let mut got = p.push(&body[..cut]);
            got.extend(p.push(&body[cut..]));
            assert_eq!(p.finish(), None, "cut {cut}");
            assert_eq!(
                got,
                vec![data("{\"a\":1}"), data("{\"b\":"), data("[DONE]")],
                "cut {cut}"
            );
            assert!(got[2].is_done());
        }
    }

    #[test]
    fn one_byte_at_a_time_with_crlf_comments_and_multiline_data() {
        let body =
            b": ping\r\n\r\nevent: error\r\ndata: {\"error\":\r\ndata: 1}\r\n\r\ndata:x\r\n\r\n";
        let mut p = SseParser::new();
        let got: Vec<SseEvent> = body.iter().flat_map(|b| p.push(&[*b])).collect();
        assert_eq!(
            got,
            vec![
                SseEvent {
                    event: Some("error".into()),
                    data: "{\"error\":\n1}".into()
                },
                data("x"),
            ]
        );
    }

    #[test]
    fn a_last_event_without_its_blank_line_is_flushed_at_the_end() {
        let mut p = SseParser::new();
        assert!(p.push(b"data: [DONE]").is_empty());
        assert!(p.finish().unwrap().is_done());
        assert_eq!(p.finish(), None);
    }
}
