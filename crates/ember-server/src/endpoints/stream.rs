//! Server-sent events for both generation endpoints: one `data: <chunk>` per choice update,
//! the usage where the request wants it, `data: [DONE]` at the end, and a
//! `data: {"error": ...}` event if the engine fails after the stream began.
//!
//! The event stream owns the [`Generation`] and with it the engine receivers: when the client
//! disconnects, hyper drops the body, and the engine aborts the requests on its next step.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::{perf_metrics, response_id, usage, ResponseOptions};
use crate::api::{unix_now, CompletionTokensDetails, StreamChunk, Usage};
use crate::choice::{Delta, Generated};
use crate::error::ApiError;
use crate::generation::Generation;

/// How an endpoint shapes the choices of its chunks.
pub(crate) trait ChunkWriter: Send + 'static {
    /// A choice of a chunk.
    type Choice: Serialize + Send;

    /// Choices sent before any output, given the number of choices.
    fn opening(&mut self, choices: usize) -> Vec<Self::Choice>;

    /// The choices (each its own chunk) for an update of choice `index`; `generated` is that
    /// choice so far.
    fn update(&mut self, index: usize, delta: Delta, generated: &Generated) -> Vec<Self::Choice>;

    /// The breakdown of the completion tokens, given every choice (none by default).
    fn usage_details(&self, generated: &[&Generated]) -> Option<CompletionTokensDetails> {
        let _ = generated;
        None
    }
}

/// What every chunk of a stream shares, and where the usage goes.
#[derive(Debug, Clone)]
pub(crate) struct StreamSpec {
    pub id: String,
    /// `chat.completion.chunk` or `text_completion`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// `stream_options.include_usage`: `"usage": null` on every chunk and a final usage chunk
    /// with no choices. Otherwise (Fireworks' default) the usage rides on the last chunk.
    pub include_usage: bool,
    /// `perf_metrics_in_response`: `perf_metrics` next to the usage.
    pub perf_metrics: bool,
    /// Token counts of the request's prompts, each with `n` choices (prompt-major).
    pub prompt_lens: Vec<usize>,
    pub n: usize,
    /// `prompt_token_ids` of the first chunk (chat with `return_token_ids`).
    pub prompt_token_ids: Option<Vec<u32>>,
}

impl StreamSpec {
    /// A stream of `object` chunks with a fresh `<id_prefix>-...` id, usage and perf metrics
    /// placed as `options` ask.
    pub fn new(
        id_prefix: &str,
        object: &'static str,
        model: String,
        options: &ResponseOptions,
        prompt_lens: Vec<usize>,
        n: usize,
    ) -> Self {
        Self {
            id: response_id(id_prefix),
            object,
            created: unix_now(),
            model,
            include_usage: options.include_usage,
            perf_metrics: options.perf_metrics,
            prompt_lens,
            n,
            prompt_token_ids: None,
        }
    }
}

/// The SSE response of `generation`.
pub(crate) fn sse_response<W: ChunkWriter>(
    generation: Generation,
    writer: W,
    spec: StreamSpec,
) -> Response {
    let stream = EventStream {
        generation,
        writer,
        spec,
        queue: VecDeque::new(),
        opened: false,
        done: false,
    };
    let events = futures_util::stream::unfold(stream, |mut stream| async move {
        let event = stream.next_event().await?;
        Some((Ok::<Event, Infallible>(event), stream))
    });
    Sse::new(events).into_response()
}

struct EventStream<W: ChunkWriter> {
    generation: Generation,
    writer: W,
    spec: StreamSpec,
    /// Events ready to go.
    queue: VecDeque<Event>,
    opened: bool,
    done: bool,
}

impl<W: ChunkWriter> EventStream<W> {
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            if !self.opened {
                self.opened = true;
                let mut prompt_token_ids = self.spec.prompt_token_ids.take();
                for choice in self.writer.opening(self.generation.len()) {
                    let mut chunk = self.chunk(vec![choice]);
                    chunk.prompt_token_ids = prompt_token_ids.take();
                    self.push(&chunk);
                }
                continue;
            }
            match self.generation.next_update().await {
                Some(Ok(update)) => {
                    let generated = self.generation.generated(update.index);
                    let choices = self.writer.update(update.index, update.delta, generated);
                    let last_update = self.generation.is_finished();
                    let count = choices.len();
                    for (i, choice) in choices.into_iter().enumerate() {
                        let mut chunk = self.chunk(vec![choice]);
                        if last_update && i + 1 == count && !self.spec.include_usage {
                            self.finish(&mut chunk);
                        }
                        self.push(&chunk);
                    }
                    if last_update && self.spec.include_usage {
                        let mut chunk = self.chunk(Vec::new());
                        self.finish(&mut chunk);
                        self.push(&chunk);
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!("stream failed: {}", error.body.error.message);
                    self.queue.push_back(json_event(&error.body));
                    self.end();
                }
                None => self.end(),
            }
        }
    }

    /// A chunk with `choices`, usage still to be decided.
    fn chunk(&self, choices: Vec<W::Choice>) -> StreamChunk<W::Choice> {
        StreamChunk {
            id: self.spec.id.clone(),
            object: self.spec.object,
            created: self.spec.created,
            model: self.spec.model.clone(),
            choices,
            prompt_token_ids: None,
            usage: self.spec.include_usage.then_some(None),
            perf_metrics: None,
        }
    }

    /// Puts the request's usage (and perf metrics) on `chunk`.
    fn finish(&self, chunk: &mut StreamChunk<W::Choice>) {
        let all: Vec<&Generated> = (0..self.generation.len())
            .map(|i| self.generation.generated(i))
            .collect();
        let mut usage: Usage = usage(&self.spec.prompt_lens, self.spec.n, all.iter().copied());
        usage.completion_tokens_details = self.writer.usage_details(&all);
        if self.spec.perf_metrics {
            chunk.perf_metrics = Some(perf_metrics(&usage, self.generation.timing()));
        }
        chunk.usage = Some(Some(usage));
    }

    fn push(&mut self, chunk: &StreamChunk<W::Choice>) {
        self.queue.push_back(json_event(chunk));
    }

    fn end(&mut self) {
        self.queue.push_back(Event::default().data("[DONE]"));
        self.done = true;
    }
}

/// `data: <json>`; a value that cannot be serialised becomes an error event.
fn json_event(value: &impl Serialize) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        Err(e) => {
            let error = ApiError::internal(format!("cannot serialise a stream chunk: {e}"));
            Event::default().data(
                serde_json::to_string(&error.body)
                    .unwrap_or_else(|_| r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#.into()),
            )
        }
    }
}
