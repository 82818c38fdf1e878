//! One engine step, in the order it runs: schedule (plain [`SchedulerOutput`]) → prepare (the
//! runner's batch) → forward → sample → advance (record, send, finish). Each phase is one
//! function below.

use std::sync::atomic::Ordering;
use std::time::Instant;

use ember_core::{FinishReason, RequestOutput, TokenConstraint, TokenLogprob};
use ember_kernels::sampling::DrawParams;
use ember_models::{ForwardBatch, SequenceInput};

use super::Engine;
use crate::constrained::{needs_mask_first, sample_constrained, Draw, MaskResult, MaskWorker};
use crate::runner::ModelRunner;
use crate::sampler::{choose_masked, log_softmax_top, with_logprobs};
use crate::scheduler::SchedulerOutput;
use crate::sequence::Sequence;
use crate::stats::EngineStats;

impl Engine {
    /// Runs one step over what the scheduler picks; every request it finishes or fails has been
    /// sent its last output when it returns.
    pub(super) fn step(&mut self, timer: &mut StepTimer) {
        self.abort_abandoned();
        let Some(out) = self.schedule() else {
            return;
        };
        let mut seqs = self.scheduler.scheduled_mut(&out);
        let sampling = SamplingPlan::new(&mut seqs, &out, self.device_sampling);
        // Grammars whose masks the mask worker computes while the forward runs.
        let constrained = take_constraints(&mut seqs, &out);
        let inputs = step_inputs(&out, &seqs);
        timer.lap(0);
        self.masks.begin(constrained);
        let outputs = prepare(&self.runner, &out, &inputs).and_then(|batch| {
            timer.lap(1);
            forward(&self.runner, &batch, &sampling, &self.stats)
        });
        drop(inputs);
        let masks = collect_masks(&mut self.masks, &mut seqs);
        let outputs = match outputs {
            Ok(outputs) => outputs,
            Err(e) => {
                tracing::error!("forward failed: {e}");
                let ids: Vec<u64> = out.scheduled.iter().map(|c| c.request_id).collect();
                for seq in self.scheduler.finish(&ids) {
                    fail(&seq, &format!("internal error: {e}"));
                }
                return;
            }
        };
        timer.lap(2);
        let finished = advance_all(seqs, &out, outputs, masks, self.max_model_len, &self.stats);
        // `advance` already sent each finished request its last output.
        self.scheduler.update_from_output(&out, &finished);
        timer.lap(3);
    }

    /// Drops requests whose clients left, freeing their blocks this step.
    fn abort_abandoned(&mut self) {
        let aborted = self.scheduler.abort_abandoned();
        for id in &aborted {
            tracing::debug!(request = id, "client went away; aborted");
        }
        self.stats
            .aborted_requests
            .fetch_add(aborted.len() as u64, Ordering::Relaxed);
    }

    /// The step's sequences; `None` when nothing runs. Failing to schedule anything with nothing
    /// running means the head request can never run: it fails.
    fn schedule(&mut self) -> Option<SchedulerOutput> {
        let out = self.scheduler.schedule();
        if !out.scheduled.is_empty() {
            return Some(out);
        }
        if let Some(seq) = self.scheduler.take_unservable() {
            fail(
                &seq,
                "the request needs more KV cache blocks than the engine has; raise --kv-cache-memory",
            );
        }
        None
    }
}

/// Where a step's tokens are chosen, decided before the forward.
enum Sampling {
    /// Each sequence's logits rows come back to the host sampler.
    Host,
    /// Each sequence's token is its logits' argmax, taken on the model's device.
    DeviceArgmax,
    /// Each sequence's token is drawn on the model's device under its entry.
    DeviceDraws(Vec<DrawParams>),
}

/// How a step's tokens are chosen, and the logprobs each device-sampled token asks for.
struct SamplingPlan {
    sampling: Sampling,
    /// Per sequence, how many alternatives its token's logprobs list, when it asks for them.
    logprobs: Vec<Option<usize>>,
}

impl SamplingPlan {
    /// A step whose sequences take nothing from it but their logits' argmax picks the tokens on
    /// the model's device and copies back only their ids. Likewise, with `device_sampling`, a
    /// step whose samplers need only temperature, top-k, top-p and min-p: each sampling
    /// sequence's uniform is drawn from its own stream now, as the host sampler would draw it.
    /// Decided before the grammars leave their sequences.
    fn new(seqs: &mut [&mut Sequence], out: &SchedulerOutput, device_sampling: bool) -> Self {
        let chunks = || {
            seqs.iter()
                .zip(&out.scheduled)
                .map(|(seq, c)| (seq, c.token_ids.len()))
        };
        let greedy = chunks().all(|(seq, n)| seq.takes_only_the_argmax(n));
        let draws =
            !greedy && device_sampling && chunks().all(|(seq, n)| seq.takes_only_a_device_draw(n));
        let logprobs = chunks()
            .map(|(seq, n)| seq.params.logprobs.filter(|_| seq.samples_after(n)))
            .collect();
        let sampling = if greedy {
            Sampling::DeviceArgmax
        } else if draws {
            Sampling::DeviceDraws(
                seqs.iter_mut()
                    .zip(&out.scheduled)
                    .map(|(seq, c)| seq.device_draw(c.token_ids.len()))
                    .collect(),
            )
        } else {
            Sampling::Host
        };
        Self { sampling, logprobs }
    }
}

/// The grammars of the sequences that sample this step and need their mask first, or whose last
/// first draw was refused (the others try their draw alone, see `sample_constrained`), taken
/// for the mask worker; each keyed by its place in the step.
fn take_constraints(
    seqs: &mut [&mut Sequence],
    out: &SchedulerOutput,
) -> Vec<(usize, Box<dyn TokenConstraint>)> {
    seqs.iter_mut()
        .zip(&out.scheduled)
        .enumerate()
        .filter_map(|(k, (seq, chunk))| {
            let wants_mask = seq.last_draw_refused || needs_mask_first(&seq.params);
            if seq.samples_after(chunk.token_ids.len()) && wants_mask {
                seq.constraint.take().map(|c| (k, c))
            } else {
                None
            }
        })
        .collect()
}

/// What the runner needs of each scheduled sequence: the scheduler's plain data, plus whether
/// it wants every row's logits (prompt logprobs) and the adapter it runs with.
fn step_inputs<'a>(out: &'a SchedulerOutput, seqs: &'a [&mut Sequence]) -> Vec<SequenceInput<'a>> {
    out.scheduled
        .iter()
        .zip(seqs)
        .map(|(chunk, seq)| SequenceInput {
            token_ids: &chunk.token_ids,
            num_computed: chunk.num_computed,
            block_table: &chunk.block_table,
            all_logits: seq.prompt_logprobs.is_some() && chunk.num_computed < seq.prompt.len(),
            adapter: seq.adapter.as_ref(),
        })
        .collect()
}

/// Builds the step's batch on the model's device(s), split by data-parallel rank.
fn prepare(
    runner: &ModelRunner,
    out: &SchedulerOutput,
    inputs: &[SequenceInput<'_>],
) -> ember_core::Result<ForwardBatch> {
    let ranks: Vec<usize> = out.scheduled.iter().map(|c| c.dp_rank).collect();
    runner.prepare_ranked(inputs, &ranks)
}

/// Runs the model over the batch: each sequence's token when `plan` chose the device, its
/// logits rows otherwise.
fn forward(
    runner: &ModelRunner,
    batch: &ForwardBatch,
    plan: &SamplingPlan,
    stats: &EngineStats,
) -> ember_core::Result<Vec<StepOutput>> {
    let draws = match &plan.sampling {
        Sampling::Host => {
            return Ok(runner
                .forward(batch)?
                .into_iter()
                .map(StepOutput::Rows)
                .collect())
        }
        Sampling::DeviceArgmax => None,
        Sampling::DeviceDraws(draws) => Some(&draws[..]),
    };
    let sampled = runner.forward_sampled(batch, draws, &plan.logprobs)?;
    stats.device_sampled_steps.fetch_add(1, Ordering::Relaxed);
    Ok(sampled
        .into_iter()
        .map(|(token, logprob)| StepOutput::Token(token, logprob))
        .collect())
}

/// Splits a step's wall time into schedule / prepare / forward / sample laps.
pub(super) struct StepTimer {
    last: Instant,
    pub(super) spent: [u64; 4],
}

impl StepTimer {
    pub(super) fn new() -> Self {
        Self {
            last: Instant::now(),
            spent: [0; 4],
        }
    }

    /// Charges the time since the previous lap to `phase`.
    pub(super) fn lap(&mut self, phase: usize) {
        let now = Instant::now();
        self.spent[phase] += (now - self.last).as_nanos() as u64;
        self.last = now;
    }
}

/// Gives the mask worker's grammars back to their sequences; returns each sequence's mask, when
/// the worker computed one for it.
fn collect_masks(worker: &mut MaskWorker, seqs: &mut [&mut Sequence]) -> Vec<Option<MaskResult>> {
    let mut masks: Vec<Option<MaskResult>> = seqs.iter().map(|_| None).collect();
    for (k, constraint, mask) in worker.finish() {
        seqs[k].constraint = constraint;
        masks[k] = Some(mask);
    }
    masks
}

/// [`advance`]s every sequence of the step by its chunk and output; returns the requests that
/// finished.
fn advance_all(
    seqs: Vec<&mut Sequence>,
    out: &SchedulerOutput,
    outputs: Vec<StepOutput>,
    masks: Vec<Option<MaskResult>>,
    max_model_len: usize,
    stats: &EngineStats,
) -> Vec<u64> {
    let mut finished = Vec::new();
    for (((seq, chunk), output), mask) in
        seqs.into_iter().zip(&out.scheduled).zip(outputs).zip(masks)
    {
        let n = chunk.token_ids.len();
        let prompt_part = seq.prompt.len().saturating_sub(seq.num_computed).min(n);
        stats
            .prompt_tokens_computed
            .fetch_add(prompt_part as u64, Ordering::Relaxed);
        if advance(seq, n, &output, mask, max_model_len, stats) {
            finished.push(seq.id);
        }
    }
    finished
}

/// What a step gives one sequence: its logits rows (hidden states for an embedding), or, on a
/// step that sampled greedily on the device, its token.
enum StepOutput {
    Rows(Vec<Vec<f32>>),
    /// The token and, when asked for, its logprobs (computed where the logits are).
    Token(u32, Option<TokenLogprob>),
}

/// Records a step's `n` computed tokens of `seq` and, once the sequence is caught up, samples
/// its next token and sends it (with the finish reason when it is the last); an embedding
/// request instead ends with its last row (the model's hidden state there) once its prompt is
/// in. `mask` is its grammar's mask when the step computed one. Returns whether the request is
/// done. A sampled token is counted in `stats` before it is sent, so a client that has its last
/// token also finds it in the counters.
fn advance(
    seq: &mut Sequence,
    n: usize,
    output: &StepOutput,
    mask: Option<MaskResult>,
    max_model_len: usize,
    stats: &EngineStats,
) -> bool {
    let first = seq.num_computed;
    seq.num_computed += n;
    let rows = match output {
        StepOutput::Rows(rows) => &rows[..],
        StepOutput::Token(..) => &[],
    };
    let mut out = seq.output_template();
    if let (Some(logprobs), Some(k)) = (seq.prompt_logprobs.as_mut(), seq.params.prompt_logprobs) {
        // Row j predicts position first + j + 1 when all rows were computed for this chunk.
        if rows.len() == n {
            for (j, row) in rows.iter().enumerate() {
                let target = first + j + 1;
                if target < seq.prompt.len() && logprobs.len() == target {
                    logprobs.push(Some(log_softmax_top(row, seq.prompt[target], k)));
                }
            }
        }
    }
    if seq.num_computed < seq.len() {
        return false;
    }
    out.prompt_logprobs = match &seq.prompt_logprobs {
        Some(lp) if seq.output.is_empty() && lp.len() == seq.prompt.len() => Some(lp.clone()),
        _ => None,
    };
    if seq.params.embed {
        let Some(row) = rows.last() else {
            fail(seq, "the model returned no hidden state");
            return true;
        };
        out.embedding = Some(row.clone());
        out.finish_reason = Some(FinishReason::Stop);
        seq.send(out);
        return true;
    }
    if seq.params.max_tokens == 0 {
        out.finish_reason = Some(FinishReason::Length);
        seq.send(out);
        return true;
    }
    if let StepOutput::Token(token_id, logprob) = output {
        // `takes_only_the_argmax` or `takes_only_a_device_draw` held: nothing banned, no
        // grammar; the logprobs, if asked for, came with the token.
        return emit(seq, out, *token_id, logprob.clone(), max_model_len, stats);
    }
    let Some(row) = rows.last() else {
        fail(seq, "the model returned no logits");
        return true;
    };
    match sample(seq, row, mask) {
        Ok((token_id, logprob)) => emit(seq, out, token_id, logprob, max_model_len, stats),
        Err(e) => {
            fail(seq, &format!("structured output failed: {e}"));
            true
        }
    }
}

/// Samples `seq`'s next token from its logits `row` on the host: its sampling parameters (stop
/// tokens banned until `min_tokens`), under its grammar when it has one (`mask` is the grammar's
/// mask when the step computed it). An error when the grammar fails.
fn sample(
    seq: &mut Sequence,
    row: &[f32],
    mask: Option<MaskResult>,
) -> std::result::Result<(u32, Option<TokenLogprob>), String> {
    let banned = seq.params_banning_stops();
    let params = banned.as_ref().unwrap_or(&seq.params);
    let token_id = match (seq.constraint.as_mut(), mask) {
        (None, None) => choose_masked(row, None, params, &seq.prompt, &seq.output, &mut seq.rng),
        (constraint, mask) => {
            let draw = Draw {
                logits: row,
                params,
                prompt: &seq.prompt,
                output: &seq.output,
                eos_token_ids: &seq.eos_token_ids,
            };
            // A mask without its constraint: the worker lost it, and `mask` says so.
            match constraint {
                Some(c) => {
                    let (token, refused) =
                        sample_constrained(c.as_mut(), mask, draw, &mut seq.rng)?;
                    seq.last_draw_refused = refused;
                    token
                }
                None => {
                    return Err(mask
                        .and_then(|m| m.err())
                        .unwrap_or_else(|| "the grammar was lost".into()))
                }
            }
        }
    };
    Ok((token_id, with_logprobs(row, token_id, params).logprob))
}

/// Appends the sampled `token_id` to `seq`, counts it and sends it (with the finish reason when
/// it is the last); returns whether the request is done.
fn emit(
    seq: &mut Sequence,
    mut out: RequestOutput,
    token_id: u32,
    logprob: Option<TokenLogprob>,
    max_model_len: usize,
    stats: &EngineStats,
) -> bool {
    seq.output.push(token_id);
    out.new_token_ids = vec![token_id];
    out.new_logprobs = logprob.into_iter().collect();
    out.completion_tokens = seq.output.len();
    out.finish_reason = seq.check_finished(max_model_len);
    let done = out.finish_reason.is_some();
    stats.generation_tokens.fetch_add(1, Ordering::Relaxed);
    seq.send(out);
    done
}

/// Ends `seq` with an error output carrying `message`.
pub(super) fn fail(seq: &Sequence, message: &str) {
    let mut out = seq.output_template();
    out.finish_reason = Some(FinishReason::Error);
    out.error = Some(message.to_string());
    seq.send(out);
}
