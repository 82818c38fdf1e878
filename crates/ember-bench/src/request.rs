//! One streamed request to an OpenAI-compatible endpoint, timed chunk by chunk as vLLM's
//! `async_request_openai_completions` / `_chat_completions` time it.
//!
//! A chunk counts as a token when it carries generated output: for completions every chunk
//! with choices (as vLLM counts; text may be empty for a held-back partial character), for chat
//! a delta with content, reasoning or tool calls. Chat role-only and finish-only chunks are not
//! tokens: ember and OpenAI send the role chunk before prefill, which vLLM's rule would count
//! as the first token. They still end the request's latency, as in vLLM.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
use serde_json::{json, Map, Value};

use crate::metrics::RequestOutput;
use crate::sse::{SseEvent, SseParser};

/// The request shape: `/v1/completions` or `/v1/chat/completions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// OpenAI completions: `prompt`, `max_tokens`, choices with `text`.
    #[value(name = "openai")]
    Completions,
    /// OpenAI chat completions: one user message, `max_completion_tokens`, choices with `delta`.
    #[value(name = "openai-chat")]
    Chat,
}

impl Backend {
    /// vLLM's name of the backend (`openai`, `openai-chat`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Completions => "openai",
            Backend::Chat => "openai-chat",
        }
    }
}

/// What every request of a run shares.
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    pub api_url: String,
    pub backend: Backend,
    pub model: String,
    pub ignore_eos: bool,
    /// Sent with every request; see [`run_headers`].
    pub headers: HeaderMap,
    /// Merged over the body last, as vLLM merges its sampling flags and `--extra-body`.
    pub extra_body: Map<String, Value>,
}

/// What differs between the requests of a run.
#[derive(Debug, Clone)]
pub struct RequestInput {
    pub prompt: String,
    pub prompt_len: usize,
    pub output_len: usize,
    /// Sent as `x-request-id` (vLLM's `--request-id-prefix` and the request's index).
    pub request_id: Option<String>,
}

/// The HTTP client of a run: TLS through rustls with the webpki roots, so `https://` endpoints
/// work with no system libraries; `insecure` accepts any certificate (vLLM's `--insecure`).
pub fn client(insecure: bool) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(6 * 3600))
        .danger_accept_invalid_certs(insecure)
        .build()
}

/// The headers of every request, in vLLM's order of precedence: `Authorization: Bearer
/// <api_key>`, then the `--header` pairs, which replace it when they name it too.
pub fn run_headers(api_key: Option<&str>, extra: &[(String, String)]) -> Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    if let Some(key) = api_key {
        let mut value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
            anyhow!(
                "the API key (--api-key or OPENAI_API_KEY) has characters a header cannot carry"
            )
        })?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    for (name, value) in extra {
        let name = HeaderName::from_bytes(name.as_bytes())
            .with_context(|| format!("--header {name:?} is not a valid header name"))?;
        let value = HeaderValue::from_str(value).with_context(|| {
            format!("--header {name}={value:?}: the value cannot go in a header")
        })?;
        headers.insert(name, value);
    }
    Ok(headers)
}

/// The headers of one request: the run's, then its `x-request-id`, which wins over a
/// `--header` of that name as in vLLM.
pub fn headers(template: &RequestTemplate, input: &RequestInput) -> HeaderMap {
    let mut headers = template.headers.clone();
    if let Some(id) = input.request_id.as_deref() {
        // An id that cannot go in a header is not sent; the prefix is the only free part.
        if let Ok(value) = HeaderValue::from_str(id) {
            headers.insert("x-request-id", value);
        }
    }
    headers
}

/// The JSON body: streamed, with usage in a final chunk, then `extra_body` over it.
pub fn payload(template: &RequestTemplate, input: &RequestInput) -> Value {
    let mut body = match template.backend {
        Backend::Completions => json!({
            "model": template.model,
            "prompt": input.prompt,
            "max_tokens": input.output_len,
        }),
        Backend::Chat => json!({
            "model": template.model,
            "messages": [{"role": "user", "content": input.prompt}],
            "max_completion_tokens": input.output_len,
        }),
    };
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    if template.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    if let Value::Object(fields) = &mut body {
        fields.extend(template.extra_body.clone());
    }
    body
}

/// `e` and its causes, joined by ": ": reqwest's own message leaves out why (a refused
/// connection, an unknown certificate issuer).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// What one stream chunk means to the timer.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    /// Generated output (possibly empty text).
    Token(String),
    /// Choices without output: a chat role or finish chunk.
    Empty,
    /// No choices (a usage-only chunk, say).
    NoChoices,
    /// An error event.
    Error(String),
}

/// Reads one chunk of `backend`'s stream.
pub fn classify(backend: Backend, data: &Value) -> Chunk {
    if let Some(error) = data.get("error").filter(|e| !e.is_null()) {
        let message = error["message"].as_str().map(str::to_string);
        return Chunk::Error(message.unwrap_or_else(|| error.to_string()));
    }
    let Some(choice) = data["choices"].as_array().and_then(|c| c.first()) else {
        return Chunk::NoChoices;
    };
    match backend {
        Backend::Completions => Chunk::Token(choice["text"].as_str().unwrap_or("").to_string()),
        Backend::Chat => {
            let delta = &choice["delta"];
            let content = delta["content"].as_str().unwrap_or("");
            let reasoning = delta["reasoning_content"].as_str().unwrap_or("");
            let tools = delta["tool_calls"]
                .as_array()
                .is_some_and(|t| !t.is_empty());
            if content.is_empty() && reasoning.is_empty() && !tools {
                Chunk::Empty
            } else {
                Chunk::Token(format!("{reasoning}{content}"))
            }
        }
    }
}

/// Folds the events of one stream into a [`RequestOutput`].
#[derive(Debug)]
pub struct StreamTimer {
    backend: Backend,
    sent: Instant,
    last_token: Option<Instant>,
    last_choice: Option<Instant>,
    done: bool,
    output: RequestOutput,
}

impl StreamTimer {
    /// A timer for a request sent at `sent`, `start_time` seconds into the run.
    pub fn new(backend: Backend, prompt_len: usize, sent: Instant, start_time: f64) -> Self {
        Self {
            backend,
            sent,
            last_token: None,
            last_choice: None,
            done: false,
            output: RequestOutput {
                prompt_len,
                start_time,
                ..Default::default()
            },
        }
    }

    /// Takes in one event that arrived at `at`.
    pub fn event(&mut self, event: &SseEvent, at: Instant) {
        if self.done || !self.output.error.is_empty() {
            return;
        }
        if event.is_done() {
            self.done = true;
            return;
        }
        let data: Value = match serde_json::from_str(&event.data) {
            Ok(v) => v,
            Err(e) => {
                return self.fail(format!("invalid JSON in the stream ({e}): {}", event.data))
            }
        };
        if let Some(usage) = data.get("usage").filter(|u| u.is_object()) {
            if let Some(n) = usage["completion_tokens"].as_u64() {
                self.output.usage_output_tokens = Some(n as usize);
            }
            if let Some(n) = usage["prompt_tokens"].as_u64() {
                self.output.prompt_len = n as usize;
            }
        }
        let chunk = match event.event.as_deref() {
            Some("error") => Chunk::Error(event.data.clone()),
            _ => classify(self.backend, &data),
        };
        match chunk {
            Chunk::Token(text) => {
                match self.last_token {
                    None => self.output.ttft = (at - self.sent).as_secs_f64(),
                    Some(prev) => self.output.itl.push((at - prev).as_secs_f64()),
                }
                self.last_token = Some(at);
                self.last_choice = Some(at);
                self.output.token_chunks += 1;
                self.output.generated_text.push_str(&text);
            }
            Chunk::Empty => self.last_choice = Some(at),
            Chunk::NoChoices => {}
            Chunk::Error(message) => self.fail(format!("error event in the stream: {message}")),
        }
    }

    /// Marks the request failed with `reason` (the first reason wins).
    pub fn fail(&mut self, reason: String) {
        if self.output.error.is_empty() {
            self.output.error = reason;
        }
    }

    /// The output once the body has ended.
    pub fn finish(mut self) -> RequestOutput {
        if self.output.error.is_empty() && self.last_token.is_none() {
            self.fail("the stream ended without a chunk of generated tokens".into());
        }
        self.output.success = self.output.error.is_empty();
        if let Some(last) = self.last_choice {
            self.output.latency = (last - self.sent).as_secs_f64();
        }
        self.output
    }
}

/// Sends `input` and times its stream; `run_start` is when the benchmark began.
pub async fn send(
    client: &reqwest::Client,
    template: &RequestTemplate,
    input: &RequestInput,
    run_start: Instant,
) -> RequestOutput {
    let sent = Instant::now();
    let mut timer = StreamTimer::new(
        template.backend,
        input.prompt_len,
        sent,
        (sent - run_start).as_secs_f64(),
    );
    let body = payload(template, input);
    let headers = headers(template, input);
    let attempt = || {
        client
            .post(&template.api_url)
            .headers(headers.clone())
            .json(&body)
    };
    // A kept-alive connection the server has just closed (llama-server closes them after a few
    // requests) fails before the request is read: retry that once on a fresh connection.
    let sent_result = match attempt().send().await {
        Err(e) if e.is_request() || e.is_connect() => attempt().send().await,
        other => other,
    };
    let mut response = match sent_result {
        Ok(r) => r,
        Err(e) => {
            timer.fail(format!("connection error: {}", error_chain(&e)));
            return timer.finish();
        }
    };
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(body);
        timer.fail(format!("HTTP {status}: {message}"));
        return timer.finish();
    }
    let mut parser = SseParser::new();
    loop {
        match response.chunk().await {
            Ok(Some(bytes)) => {
                let at = Instant::now();
                for event in parser.push(&bytes) {
                    timer.event(&event, at);
                }
            }
            Ok(None) => break,
            Err(e) => {
                timer.fail(format!("the stream broke: {e}"));
                break;
            }
        }
    }
    if let Some(event) = parser.finish() {
        timer.event(&event, Instant::now());
    }
    timer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn data(v: Value) -> SseEvent {
        SseEvent {
            event: None,
            data: v.to_string(),
        }
    }

    fn done() -> SseEvent {
        SseEvent {
            event: None,
            data: "[DONE]".into(),
        }
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn completions_are_timed_per_chunk_and_counted_by_usage() {
        let t0 = Instant::now();
        let mut timer = StreamTimer::new(Backend::Completions, 5, t0, 1.5);
        timer.event(
            &data(json!({"choices": [{"text": "a"}], "usage": null})),
            ms(t0, 100),
        );
        timer.event(
            &data(json!({"choices": [{"text": ""}], "usage": null})),
            ms(t0, 130),
        );
        timer.event(
            &data(json!({"choices": [{"text": "c", "finish_reason": "length"}]})),
            ms(t0, 170),
        );
        timer.event(
            &data(json!({"choices": [], "usage": {"prompt_tokens": 6, "completion_tokens": 3}})),
            ms(t0, 180),
        );
        timer.event(&done(), ms(t0, 181));
        timer.event(&data(json!({"choices": [{"text": "late"}]})), ms(t0, 200));
        let out = timer.finish();
        assert!(out.success, "{}", out.error);
        assert!((out.ttft - 0.1).abs() < 1e-9);
        assert_eq!(out.itl.len(), 2);
        assert!((out.itl[0] - 0.03).abs() < 1e-9 && (out.itl[1] - 0.04).abs() < 1e-9);
        assert!(
            (out.latency - 0.17).abs() < 1e-9,
            "the usage chunk does not end the request"
        );
        assert_eq!(
            (out.prompt_len, out.usage_output_tokens, out.token_chunks),
            (6, Some(3), 3)
        );
        assert_eq!((out.generated_text.as_str(), out.start_time), ("ac", 1.5));
    }

    #[test]
    fn chat_role_and_finish_chunks_are_not_tokens() {
        let t0 = Instant::now();
        let mut timer = StreamTimer::new(Backend::Chat, 5, t0, 0.0);
        let delta = |d: Value| data(json!({"choices": [{"index": 0, "delta": d}]}));
        timer.event(
            &delta(json!({"role": "assistant", "content": ""})),
            ms(t0, 1),
        );
        timer.event(&delta(json!({"content": "Hi"})), ms(t0, 50));
        timer.event(&delta(json!({"content": " there"})), ms(t0, 70));
        timer.event(&delta(json!({})), ms(t0, 75));
        timer.event(&done(), ms(t0, 76));
        let out = timer.finish();
        assert!(out.success);
        assert!(
            (out.ttft - 0.05).abs() < 1e-9,
            "TTFT is the first content, not the role chunk"
        );
        assert_eq!(out.itl.len(), 1);
        assert!((out.latency - 0.075).abs() < 1e-9);
        assert_eq!(
            (out.output_tokens(), out.generated_text.as_str()),
            (2, "Hi there")
        );
    }

    #[test]
    fn error_events_and_empty_streams_fail_with_a_reason() {
        let t0 = Instant::now();
        let mut timer = StreamTimer::new(Backend::Completions, 1, t0, 0.0);
        timer.event(&data(json!({"choices": [{"text": "a"}]})), ms(t0, 10));
        timer.event(
            &data(json!({"error": {"message": "engine died", "type": "internal"}})),
            ms(t0, 20),
        );
        let out = timer.finish();
        assert!(!out.success);
        assert!(out.error.contains("engine died"), "{}", out.error);

        let mut timer = StreamTimer::new(Backend::Chat, 1, t0, 0.0);
        let event = SseEvent {
            event: Some("error".into()),
            data: "{\"message\": \"overloaded\"}".into(),
        };
        timer.event(&event, ms(t0, 5));
        assert!(timer.finish().error.contains("overloaded"));

        let mut timer = StreamTimer::new(Backend::Completions, 1, t0, 0.0);
        timer.event(&done(), ms(t0, 5));
        let out = timer.finish();
        assert!(
            !out.success && out.error.contains("without a chunk"),
            "{}",
            out.error
        );

        let mut timer = StreamTimer::new(Backend::Completions, 1, t0, 0.0);
        timer.event(
            &SseEvent {
                event: None,
                data: "{not json".into(),
            },
            ms(t0, 5),
        );
        assert!(timer.finish().error.contains("invalid JSON"));
    }

    fn template(backend: Backend) -> RequestTemplate {
        RequestTemplate {
            api_url: "http://x/v1/completions".into(),
            backend,
            model: "m".into(),
            ignore_eos: true,
            headers: HeaderMap::new(),
            extra_body: Map::new(),
        }
    }

    fn input(request_id: Option<&str>) -> RequestInput {
        RequestInput {
            prompt: "p".into(),
            prompt_len: 1,
            output_len: 16,
            request_id: request_id.map(str::to_string),
        }
    }

    #[test]
    fn payloads_follow_the_endpoint() {
        let mut t = template(Backend::Completions);
        assert_eq!(
            payload(&t, &input(None)),
            json!({"model": "m", "prompt": "p", "max_tokens": 16, "stream": true,
                   "stream_options": {"include_usage": true}, "ignore_eos": true})
        );
        t.backend = Backend::Chat;
        t.ignore_eos = false;
        assert_eq!(
            payload(&t, &input(None)),
            json!({"model": "m", "messages": [{"role": "user", "content": "p"}],
                   "max_completion_tokens": 16, "stream": true,
                   "stream_options": {"include_usage": true}})
        );
    }

    #[test]
    fn the_extra_body_is_merged_over_the_payload_last() {
        let mut t = template(Backend::Completions);
        let extra = json!({"temperature": 0.5, "ignore_eos": false, "max_tokens": 3,
                           "chat_template_kwargs": {"enable_thinking": false}});
        t.extra_body = extra.as_object().unwrap().clone();
        let body = payload(&t, &input(None));
        assert_eq!(
            (
                &body["temperature"],
                &body["ignore_eos"],
                &body["max_tokens"]
            ),
            (&json!(0.5), &json!(false), &json!(3)),
            "a shallow merge in which the extra body wins, as vLLM's payload.update"
        );
        assert_eq!(body["chat_template_kwargs"]["enable_thinking"], false);
        assert_eq!(body["prompt"], "p");
    }

    #[test]
    fn headers_carry_the_key_then_the_flags_then_the_request_id() {
        let extra = [
            ("x-tenant".to_string(), "a".to_string()),
            ("X-Request-Id".to_string(), "mine".to_string()),
        ];
        let mut t = template(Backend::Completions);
        t.headers = run_headers(Some("sk-1"), &extra).unwrap();
        let h = headers(&t, &input(Some("bench-0a1b2c3d-7")));
        assert_eq!(h["authorization"], "Bearer sk-1");
        assert!(h["authorization"].is_sensitive());
        assert_eq!(h["x-tenant"], "a");
        assert_eq!(h["x-request-id"], "bench-0a1b2c3d-7", "the request id wins");
        assert_eq!(h.len(), 3);
        assert_eq!(headers(&t, &input(None))["x-request-id"], "mine");

        let own_auth = [("Authorization".to_string(), "Basic eA==".to_string())];
        let h = run_headers(Some("sk-1"), &own_auth).unwrap();
        assert_eq!(
            (h["authorization"].to_str().unwrap(), h.len()),
            ("Basic eA==", 1),
            "--header replaces the API key's header"
        );
        assert!(run_headers(None, &[]).unwrap().is_empty());

        let bad_name = [("bad name".to_string(), "v".to_string())];
        let e = run_headers(None, &bad_name).unwrap_err().to_string();
        assert!(e.contains("--header \"bad name\""), "{e}");
        let bad_value = [("x-a".to_string(), "line\nbreak".to_string())];
        let e = run_headers(None, &bad_value).unwrap_err().to_string();
        assert!(e.contains("x-a"), "{e}");
    }

    /// Whether an io error of `kind` is among `e`'s causes.
    fn caused_by(e: &reqwest::Error, kind: std::io::ErrorKind) -> bool {
        let mut source = std::error::Error::source(e);
        while let Some(cause) = source {
            if cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == kind)
            {
                return true;
            }
            source = cause.source();
        }
        false
    }

    #[tokio::test]
    async fn https_urls_are_dialled_and_spoken_to_in_tls() {
        let client = client(false).expect("the client builds with TLS");
        // Nothing listens on port 1: the request gets as far as the TCP connect. A build
        // without TLS stops before it, at "scheme is not http".
        let e = client
            .get("https://127.0.0.1:1/v1/models")
            .send()
            .await
            .unwrap_err();
        assert!(!e.is_builder(), "{}", error_chain(&e));
        assert!(
            e.is_connect() && caused_by(&e, std::io::ErrorKind::ConnectionRefused),
            "{}",
            error_chain(&e)
        );

        // A listener sees a TLS handshake record (type 22, version 3.x) open the connection.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}/v1/models", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            use std::io::Read;
            let (mut socket, _) = listener.accept().unwrap();
            let mut head = [0u8; 2];
            socket.read_exact(&mut head).unwrap();
            head
        });
        let e = client.get(&url).send().await.unwrap_err();
        assert_eq!(server.join().unwrap(), [0x16, 0x03]);
        assert!(e.is_connect(), "the handshake fails: {}", error_chain(&e));
    }
}
