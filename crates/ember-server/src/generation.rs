//! Runs a request's choices on the engine: polls their outputs in turn, hands out each
//! choice's deltas as they become safe to show (streaming) or gathers the whole result (plain
//! responses), and tells the metrics how each choice ended. Both paths use the same code, so
//! a streamed answer is the plain one cut into pieces.

use std::future::poll_fn;
use std::task::Poll;
use std::time::{Duration, Instant};

use ember_core::RequestOutput;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::choice::{ChoiceJob, ChoiceState, Delta, Generated};
use crate::error::ApiError;
use crate::metrics::FinishedRequest;
use crate::shutdown::InFlight;
use crate::state::AppState;

/// One choice's update: its index in the request and what it added.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChoiceUpdate {
    pub index: usize,
    pub delta: Delta,
}

/// When a request's first token came and how long it took in all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Timing {
    /// From arrival to the first output of any choice.
    pub time_to_first_token: Duration,
    /// From arrival to now (or to the end, once finished).
    pub processing: Duration,
}

struct ChoiceRun {
    state: ChoiceState,
    /// Dropped as soon as the choice finishes (which cancels an engine request that a stop
    /// string ended early) or the request fails.
    rx: Option<UnboundedReceiver<RequestOutput>>,
    prompt_tokens: usize,
    first_output: Option<Instant>,
    /// Whether the metrics have seen this choice's end.
    recorded: bool,
}

/// A request's choices running on the engine. It owns their output receivers: dropping it
/// (a client that went away) cancels every engine request the same step.
pub(crate) struct Generation {
    state: AppState,
    runs: Vec<ChoiceRun>,
    /// The LoRA adapter every choice runs with, for the per-adapter metrics.
    lora_name: Option<String>,
    started: Instant,
    /// Which choice to poll first next time, so that no choice starves the others.
    poll_from: usize,
    _in_flight: InFlight,
}

impl Generation {
    /// Submits every job, run with the LoRA adapter named `adapter` when one is given. If one is refused (full queue,
    /// bad parameters), those already submitted are cancelled and the error returned.
    pub fn start(
        state: &AppState,
        jobs: &[ChoiceJob],
        adapter: Option<String>,
        started: Instant,
        in_flight: InFlight,
    ) -> Result<Self, ApiError> {
        let shared = state.shared();
        let eos = shared.engine.eos_token_ids();
        let mut runs = Vec::with_capacity(jobs.len());
        for job in jobs {
            let rx = shared
                .engine
                .submit(
                    job.prompt_ids.clone(),
                    job.params.clone(),
                    adapter.as_deref(),
                )
                .map_err(ApiError::from_ember)?;
            runs.push(ChoiceRun {
                state: ChoiceState::new(shared.tokenizer.clone(), job, &eos),
                rx: Some(rx),
                prompt_tokens: job.prompt_ids.len(),
                first_output: None,
                recorded: false,
            });
        }
        Ok(Self {
            state: state.clone(),
            runs,
            lora_name: adapter,
            started,
            poll_from: 0,
            _in_flight: in_flight,
        })
    }

    /// Number of choices.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// Choice `index` so far.
    pub fn generated(&self, index: usize) -> &Generated {
        self.runs[index].state.generated()
    }

    /// Whether every choice has finished.
    pub fn is_finished(&self) -> bool {
        self.runs.iter().all(|r| r.state.is_finished())
    }

    /// The next choice update with something to show, in arrival order; `None` once every
    /// choice has finished (or after an error was returned).
    pub async fn next_update(&mut self) -> Option<Result<ChoiceUpdate, ApiError>> {
        loop {
            let (index, output) = self.next_output().await?;
            let run = &mut self.runs[index];
            let Some(output) = output else {
                return Some(Err(self.fail(
                    index,
                    ApiError::internal(
                        "The engine stopped before finishing the request; see the server log",
                    ),
                )));
            };
            if run.first_output.is_none() {
                run.first_output = Some(Instant::now());
            }
            if let Err(e) = run.state.apply(output) {
                return Some(Err(self.fail(index, e)));
            }
            if run.state.is_finished() {
                run.rx = None;
                self.record(index, None);
            }
            let delta = self.runs[index].state.take_delta();
            if !delta.text.is_empty() || delta.finish_reason.is_some() {
                return Some(Ok(ChoiceUpdate { index, delta }));
            }
        }
    }

    /// Runs every choice to its end; the results come back in job order.
    pub async fn run_to_end(mut self) -> Result<(Vec<Generated>, Timing), ApiError> {
        while let Some(update) = self.next_update().await {
            update?;
        }
        let timing = self.timing();
        let runs = std::mem::take(&mut self.runs);
        Ok((
            runs.into_iter().map(|r| r.state.into_generated()).collect(),
            timing,
        ))
    }

    /// Time to the first output of any choice, and time since arrival.
    pub fn timing(&self) -> Timing {
        let processing = self.started.elapsed();
        let first = self.runs.iter().filter_map(|r| r.first_output).min();
        Timing {
            time_to_first_token: first.map_or(processing, |t| t.duration_since(self.started)),
            processing,
        }
    }

    /// Waits for the next output of any unfinished choice; `None` when none is left. A closed
    /// channel comes back as `(index, None)`.
    async fn next_output(&mut self) -> Option<(usize, Option<RequestOutput>)> {
        if self.runs.iter().all(|r| r.rx.is_none()) {
            return None;
        }
        let count = self.runs.len();
        let from = self.poll_from;
        let runs = &mut self.runs;
        let (index, output) = poll_fn(|cx| {
            for offset in 0..count {
                let index = (from + offset) % count;
                if let Some(rx) = runs[index].rx.as_mut() {
                    if let Poll::Ready(output) = rx.poll_recv(cx) {
                        return Poll::Ready((index, output));
                    }
                }
            }
            Poll::Pending
        })
        .await;
        self.poll_from = (index + 1) % count;
        Some((index, output))
    }

    /// Cancels every choice after choice `index` failed with `error`.
    fn fail(&mut self, index: usize, error: ApiError) -> ApiError {
        self.record(index, Some("error"));
        for run in &mut self.runs {
            run.rx = None;
        }
        error
    }

    /// Tells the metrics how choice `index` ended (`reason` overrides its finish reason).
    fn record(&mut self, index: usize, reason: Option<&'static str>) {
        let run = &mut self.runs[index];
        if run.recorded {
            return;
        }
        run.recorded = true;
        let generated = run.state.generated();
        self.state.shared().metrics.record(&FinishedRequest {
            finished_reason: reason.unwrap_or(generated.finish_reason.as_str()),
            prompt_tokens: run.prompt_tokens,
            generation_tokens: generated.token_ids.len(),
            time_to_first_token: run.first_output.map(|t| t.duration_since(self.started)),
            e2e_latency: self.started.elapsed(),
            lora_name: self.lora_name.as_deref(),
        });
    }
}

impl Drop for Generation {
    /// Choices still running when the request is dropped were abandoned by the client.
    fn drop(&mut self) {
        for index in 0..self.runs.len() {
            self.record(index, Some("abort"));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ember_core::{FinishReason, TokenLogprob};

    use super::*;
    use crate::testing::{
        script, test_job, test_state, FakeEngine, EMOJI_HEAD, EMOJI_TAIL, HELLO, IM_END,
    };

    fn start(engine: &Arc<FakeEngine>, jobs: Vec<ChoiceJob>) -> Generation {
        let state = test_state(engine);
        let in_flight = state.shared().lifecycle.enter().unwrap();
        Generation::start(&state, &jobs, None, Instant::now(), in_flight).unwrap()
    }

    async fn run(script: Vec<u32>, jobs: Vec<ChoiceJob>) -> Vec<Generated> {
        start(&FakeEngine::new(script), jobs)
            .run_to_end()
            .await
            .unwrap()
            .0
    }

    /// Every update of a one-choice generation, in order.
    async fn updates(script: Vec<u32>, job: ChoiceJob) -> Vec<Delta> {
        let mut generation = start(&FakeEngine::new(script), vec![job]);
        let mut deltas = Vec::new();
        while let Some(update) = generation.next_update().await {
            deltas.push(update.unwrap().delta);
        }
        deltas
    }

    #[tokio::test]
    async fn eos_is_counted_but_not_shown() {
        // Even with special tokens shown, the eos that ended the reply is not.
        let mut j = test_job(10, &[]);
        j.skip_special_tokens = false;
        let out = run(vec![HELLO, EMOJI_HEAD, EMOJI_TAIL, IM_END, HELLO], vec![j]).await;
        assert_eq!(out[0].text, "hello😀");
        assert_eq!(out[0].token_ids, [HELLO, EMOJI_HEAD, EMOJI_TAIL, IM_END]);
        assert_eq!(out[0].logprobs.len(), 4);
        assert_eq!(out[0].finish_reason, FinishReason::Stop);
        assert_eq!(out[0].cached_prompt_tokens, 2);
        // So is an ordinary token given as a stop id.
        let mut j = test_job(10, &[]);
        j.params.stop_token_ids = vec![b'!' as u32];
        let out = run(script("ab!cd"), vec![j]).await;
        assert_eq!((out[0].text.as_str(), out[0].token_ids.len()), ("ab", 3));
    }

    #[tokio::test]
    async fn an_ignored_eos_is_ordinary_text() {
        let mut j = test_job(3, &[]);
        j.skip_special_tokens = false;
        j.params.ignore_eos = true;
        let out = run(vec![HELLO, IM_END, HELLO], vec![j]).await;
        assert_eq!(out[0].text, "hello<|im_end|>hello");
        assert_eq!(out[0].finish_reason, FinishReason::Length);
    }

    #[tokio::test]
    async fn max_tokens_ends_with_length_and_flushes_a_partial_character() {
        let out = run(vec![HELLO, EMOJI_HEAD, EMOJI_TAIL], vec![test_job(2, &[])]).await;
        assert_eq!(out[0].text, "hello\u{FFFD}");
        assert_eq!(out[0].finish_reason, FinishReason::Length);
    }

    #[tokio::test]
    async fn stop_string_cuts_text_and_ends_the_choice() {
        let out = run(
            script("hello world, more"),
            vec![test_job(20, &["o w", "zzz"])],
        )
        .await;
        assert_eq!(out[0].text, "hell");
        assert_eq!(out[0].finish_reason, FinishReason::Stop);
        // Tokens up to the one completing the stop string are kept, with their logprobs.
        assert_eq!(out[0].token_ids.len(), "hello w".len());
        assert_eq!(out[0].logprobs.len(), out[0].token_ids.len());
    }

    #[tokio::test]
    async fn prompt_only_drops_the_generated_token() {
        let mut j = test_job(1, &[]);
        j.prompt_only = true;
        j.params.prompt_logprobs = Some(0);
        let out = run(vec![HELLO], vec![j]).await;
        assert_eq!(out[0].text, "");
        assert!(out[0].token_ids.is_empty() && out[0].logprobs.is_empty());
        assert_eq!(out[0].finish_reason, FinishReason::Length);
        let prompt_logprobs = out[0].prompt_logprobs.as_ref().unwrap();
        assert_eq!(prompt_logprobs.len(), 2);
        assert!(prompt_logprobs[0].is_none());
        assert_eq!(prompt_logprobs[1].as_ref().unwrap().token_id, b'b' as u32);
    }

    #[tokio::test]
    async fn results_keep_job_order_and_an_unfinished_stream_is_an_error() {
        let out = run(
            vec![HELLO, IM_END],
            vec![test_job(1, &[]), test_job(2, &[])],
        )
        .await;
        assert_eq!(out[0].finish_reason, FinishReason::Length);
        assert_eq!(out[1].finish_reason, FinishReason::Stop);
        // The script runs out before max_tokens: the engine "died".
        let err = start(&FakeEngine::new(vec![HELLO]), vec![test_job(5, &[])])
            .run_to_end()
            .await
            .unwrap_err();
        assert_eq!(err.status, axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[tokio::test]
    async fn deltas_hold_back_a_possible_stop_string_and_never_show_it() {
        // "STOP" arrives one byte per token: "ST" and "STO" are held until they either
        // complete the stop string (then dropped) or turn out to be text.
        let deltas = updates(script("aSTxSTOP!"), test_job(20, &["STOP"])).await;
        let texts: Vec<&str> = deltas.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, ["a", "STx", ""]);
        assert_eq!(deltas[2].finish_reason, Some(FinishReason::Stop));
        // Every token up to the one completing "STOP" is handed out exactly once.
        let tokens: Vec<u32> = deltas.iter().flat_map(|d| d.token_ids.clone()).collect();
        assert_eq!(tokens, script("aSTxSTOP"));
        let logprobs: usize = deltas.iter().map(|d| d.logprobs.len()).sum();
        assert_eq!(logprobs, tokens.len());
    }

    #[tokio::test]
    async fn deltas_never_split_a_character_and_add_up_to_the_whole() {
        let j = test_job(10, &[]);
        let tokens = vec![HELLO, EMOJI_HEAD, EMOJI_TAIL, b'!' as u32, IM_END];
        let deltas = updates(tokens.clone(), j.clone()).await;
        let texts: Vec<&str> = deltas.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, ["hello", "😀", "!", ""]);
        assert!(texts.iter().all(|t| !t.contains('\u{FFFD}')));
        // The emoji's first half rides with its second; the eos goes with the finish.
        assert_eq!(deltas[1].token_ids, [EMOJI_HEAD, EMOJI_TAIL]);
        assert_eq!(deltas[3].token_ids, [IM_END]);
        assert_eq!(deltas[3].finish_reason, Some(FinishReason::Stop));
        let whole = run(tokens, vec![j]).await.remove(0);
        assert_eq!(texts.concat(), whole.text);
        let streamed: Vec<TokenLogprob> = deltas.into_iter().flat_map(|d| d.logprobs).collect();
        assert_eq!(streamed, whole.logprobs);
    }

    #[tokio::test]
    async fn choices_interleave_and_each_finishes_once() {
        let mut generation = start(
            &FakeEngine::new(script("abc")),
            vec![test_job(3, &[]), test_job(3, &[])],
        );
        let mut seen = Vec::new();
        while let Some(update) = generation.next_update().await {
            let update = update.unwrap();
            seen.push((update.index, update.delta.text, update.delta.finish_reason));
        }
        let of = |i: usize| -> Vec<(String, Option<FinishReason>)> {
            seen.iter()
                .filter(|s| s.0 == i)
                .map(|s| (s.1.clone(), s.2))
                .collect()
        };
        // The fake engine sends the finish reason in an output of its own.
        let expected = vec![
            ("a".to_string(), None),
            ("b".to_string(), None),
            ("c".to_string(), None),
            (String::new(), Some(FinishReason::Length)),
        ];
        assert_eq!((of(0), of(1)), (expected.clone(), expected));
        // Round robin: neither choice runs to its end before the other starts.
        assert_eq!((seen[0].0, seen[1].0), (0, 1));
        assert!(generation.is_finished());
    }

    #[tokio::test]
    async fn dropping_the_generation_closes_every_engine_channel() {
        let engine = FakeEngine::holding_open(script("abcdef"));
        let mut generation = start(&engine, vec![test_job(50, &[]), test_job(50, &[])]);
        let first = generation.next_update().await.unwrap().unwrap();
        assert_eq!(first.delta.text, "a");
        assert!(engine.open_senders().iter().all(|tx| !tx.is_closed()));
        drop(generation);
        let senders = engine.open_senders();
        assert_eq!(senders.len(), 2);
        assert!(senders.iter().all(|tx| tx.is_closed()));
    }
}
