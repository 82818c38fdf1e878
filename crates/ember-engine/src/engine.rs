//! The engine thread: takes requests, runs scheduler steps through the model runner, samples,
//! and sends each request its outputs.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use ember_core::{EngineRequest, FinishReason, RequestOutput, Result, TokenLogprob};
use ember_models::{LoadedModel, LoraAdapter, SequenceInput};

use crate::constrained::{needs_mask_first, sample_constrained, Draw, MaskResult, MaskWorker};
use crate::handle::{EngineHandle, ModelInfo};
use crate::lora::{LoraConfig, LoraManager};
use crate::runner::ModelRunner;
use crate::sampler::{choose_masked, log_softmax_top, with_logprobs};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::sequence::Sequence;
use crate::stats::EngineStats;
use ember_kernels::sampling::DrawParams;

/// Sizes of the engine's batch and cache.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub block_size: usize,
    /// Cache blocks; `None` sizes the cache from `kv_cache_bytes`.
    pub num_blocks: Option<usize>,
    /// Memory given to the KV cache when `num_blocks` is not set (and, on a GPU, when
    /// `gpu_memory_utilization` is not either).
    pub kv_cache_bytes: usize,
    /// On a GPU: the share of its memory this engine may hold, weights, step and cache together;
    /// the cache gets what the share leaves (`--gpu-memory-utilization`). Ignored on the CPU.
    pub gpu_memory_utilization: Option<f64>,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Reuse KV of identical prompt prefixes across requests.
    pub enable_prefix_caching: bool,
    /// Requests allowed to wait for room before new ones are refused with `Overloaded`.
    pub max_waiting_requests: usize,
    /// Serve LoRA adapters (`--enable-lora`) within these limits.
    pub lora: Option<LoraConfig>,
    /// Draw sampled tokens where the logits are (temperature, top-k, top-p, min-p; see
    /// `ember_kernels::sampling`) when a step asks nothing else of them, copying back only the
    /// ids. `None`: on a GPU, where it saves copying every row; the CPU's host sampler
    /// otherwise. Greedy steps always take the argmax where the logits are.
    pub device_sampling: Option<bool>,
    /// Batch sizes whose decode steps run as CUDA graphs where the model allows (see
    /// `ember_models::step::cuda_graph`); empty, the default here (the CLI's is
    /// `ember_models::step::cuda_graph::default_sizes`), runs every step eagerly.
    pub cuda_graph_sizes: Vec<usize>,
}

/// A request on its way to the engine thread, with the adapter it runs with.
pub(crate) struct Submission {
    pub request: EngineRequest,
    pub adapter: Option<Arc<LoraAdapter>>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: None,
            kv_cache_bytes: 1 << 30,
            gpu_memory_utilization: None,
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            enable_prefix_caching: true,
            max_waiting_requests: 4096,
            lora: None,
            device_sampling: None,
            cuda_graph_sizes: Vec::new(),
        }
    }
}

/// The engine loop's state; lives on its own thread once started.
pub struct Engine {
    runner: ModelRunner,
    /// [`EngineConfig::device_sampling`], resolved.
    device_sampling: bool,
    scheduler: Scheduler,
    max_model_len: usize,
    requests: Receiver<Submission>,
    stats: Arc<EngineStats>,
    masks: MaskWorker,
}

impl Engine {
    /// Builds the runner and cache and starts the engine thread.
    pub fn start(loaded: LoadedModel, cfg: EngineConfig) -> Result<EngineHandle> {
        let model_cfg = loaded.model.config().clone();
        let expert_load = loaded.expert_load.clone();
        // Every rank of a sharded model caches its own heads of each block, on its own device:
        // the bytes a block takes on each device the ranks use.
        let mut per_device: Vec<(candle_core::Device, usize)> = Vec::new();
        for (rank, widths) in loaded.model.kv_cache_shards().into_iter().enumerate() {
            let bytes = ember_models::KvCachePool::bytes_per_block(
                model_cfg.num_hidden_layers,
                cfg.block_size,
                widths,
                // An fp8 cache holds twice the tokens of a bf16 one in the same memory.
                loaded.kv_cache_dtype,
            );
            let device = loaded.rank_devices.get(rank).unwrap_or(&loaded.device);
            match per_device.iter_mut().find(|(d, _)| d.same_device(device)) {
                Some((_, sum)) => *sum += bytes,
                None => per_device.push((device.clone(), bytes)),
            }
        }
        // As many blocks as the tightest device holds.
        let mut fitting = usize::MAX;
        for (device, per_block) in &per_device {
            let gpu = ember_models::device::gpu_memory(device)?;
            let kv_cache_bytes = match (cfg.num_blocks, cfg.gpu_memory_utilization, gpu) {
                (None, Some(utilization), Some((free, total))) => {
                    let graphs = match cfg.cuda_graph_sizes.iter().max() {
                        Some(&largest) if loaded.decode_graphs_possible() => {
                            ember_models::device::decode_graph_reserve_bytes(
                                &model_cfg,
                                loaded.dtype,
                                largest,
                            )
                        }
                        _ => 0,
                    };
                    let reserve = ember_models::device::activation_reserve_bytes(
                        &model_cfg,
                        loaded.dtype,
                        cfg.max_num_batched_tokens,
                        cfg.max_num_seqs,
                    ) + graphs;
                    let budget =
                        ember_models::device::kv_cache_budget(free, total, utilization, reserve)?;
                    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                    tracing::info!(
                        device = ?device.location(),
                        free_gib = gib(free),
                        total_gib = gib(total),
                        step_reserve_gib = gib(reserve),
                        kv_cache_gib = gib(budget),
                        "memory: KV cache sized by --gpu-memory-utilization {utilization}"
                    );
                    usize::try_from(budget).unwrap_or(usize::MAX)
                }
                _ => cfg.kv_cache_bytes,
            };
            fitting = fitting.min(kv_cache_bytes / (*per_block).max(1));
        }
        let num_blocks = cfg.num_blocks.unwrap_or(fitting);
        let max_model_len = loaded.max_model_len;
        // Every request that fits the context must be servable, if only alone.
        if num_blocks * cfg.block_size < max_model_len {
            return Err(ember_core::EmberError::Config(format!(
                "the KV cache holds {} tokens ({num_blocks} blocks of {}), fewer than one request of \
                 --max-model-len {max_model_len}; raise --kv-cache-memory or lower --max-model-len",
                num_blocks * cfg.block_size,
                cfg.block_size
            )));
        }
        let info = ModelInfo {
            max_model_len,
            eos_token_ids: loaded.eos_token_ids.clone(),
            vocab_size: model_cfg.vocab_size,
            hidden_size: model_cfg.hidden_size,
            task: loaded.task,
        };
        tracing::info!(
            num_blocks,
            block_size = cfg.block_size,
            "KV cache: {} tokens",
            num_blocks * cfg.block_size
        );
        let device = loaded.device.clone();
        let lora = cfg
            .lora
            .clone()
            .map(|lora_cfg| {
                LoraManager::new(
                    lora_cfg,
                    loaded.model.lora_targets().clone(),
                    loaded.dtype,
                    device.clone(),
                )
                .map(Arc::new)
            })
            .transpose()?;
        let max_loras = cfg.lora.as_ref().map_or(1, |l| l.max_loras);
        let data_parallel = loaded.model.data_parallel_size();
        let runner = ModelRunner::new(loaded, num_blocks, cfg.block_size, &cfg.cuda_graph_sizes)?;
        let scheduler = Scheduler::with_ranks(
            SchedulerConfig {
                max_num_batched_tokens: cfg.max_num_batched_tokens,
                max_num_seqs: cfg.max_num_seqs,
                block_size: cfg.block_size,
                enable_prefix_caching: cfg.enable_prefix_caching,
                max_loras,
            },
            num_blocks,
            data_parallel,
        );
        let (tx, rx) = channel();
        let stats = Arc::new(EngineStats {
            expert_load: expert_load.clone(),
            ..EngineStats::default()
        });
        stats
            .kv_blocks_total
            .store((num_blocks * data_parallel) as u64, Ordering::Relaxed);
        let masks = MaskWorker::start().map_err(|e| {
            ember_core::EmberError::Config(format!("cannot start the grammar mask thread: {e}"))
        })?;
        let engine = Engine {
            device_sampling: cfg.device_sampling.unwrap_or(runner.on_gpu()),
            runner,
            scheduler,
            max_model_len,
            requests: rx,
            stats: stats.clone(),
            masks,
        };
        std::thread::Builder::new()
            .name("ember-engine".into())
            .spawn(move || engine.run())
            .map_err(|e| {
                ember_core::EmberError::Config(format!("cannot start the engine thread: {e}"))
            })?;
        Ok(EngineHandle::new(
            tx,
            info,
            stats,
            cfg.max_waiting_requests,
            lora,
        ))
    }

    fn run(mut self) {
        self.runner.capture_graphs();
        loop {
            // Block while idle; otherwise take whatever has arrived and keep stepping.
            if !self.scheduler.has_work() {
                match self.requests.recv() {
                    Ok(req) => self.accept(req),
                    Err(_) => return,
                }
            }
            let start = Instant::now();
            loop {
                match self.requests.try_recv() {
                    Ok(req) => self.accept(req),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.scheduler.has_work() => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            let mut phases = StepTimer::new();
            self.step(&mut phases);
            if let Some(reason) = self.runner.failure() {
                self.stop_for_good(&reason);
                return;
            }
            let total = start.elapsed().as_nanos() as u64;
            let [schedule, prepare, forward, sample] = phases.spent;
            let other = total.saturating_sub(schedule + prepare + forward + sample);
            let spent = [schedule, prepare, forward, sample, other];
            for (slot, ns) in self.stats.step_time_ns.iter().zip(spent) {
                slot.fetch_add(ns, Ordering::Relaxed);
            }
            // Last, so a reader that sees the step's running count also sees its time and count.
            self.publish_stats();
        }
    }

    /// The model cannot run any more (its parallel group failed): ends every request with the
    /// reason, records it for the server (which shuts down), and leaves the loop.
    fn stop_for_good(&mut self, reason: &str) {
        tracing::error!("the engine stops: {reason}");
        let message = format!("the server is shutting down: {reason}");
        while let Ok(req) = self.requests.try_recv() {
            self.accept(req);
        }
        let running: Vec<usize> = (0..self.scheduler.running.len()).collect();
        for seq in self
            .scheduler
            .finish(running)
            .iter()
            .chain(self.scheduler.waiting.drain(..).collect::<Vec<_>>().iter())
        {
            fail(seq, &message);
        }
        *self.stats.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
        self.publish_stats();
    }

    fn accept(&mut self, submission: Submission) {
        self.stats.unseen.fetch_sub(1, Ordering::Relaxed);
        let seq = Sequence::with_adapter(submission.request, submission.adapter);
        self.scheduler.waiting.push_back(seq);
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        s.steps.fetch_add(1, Ordering::Relaxed);
        s.graph_steps
            .store(self.runner.graph_steps(), Ordering::Relaxed);
        let (blocks, free) = self.scheduler.kv_blocks();
        let (queries, hits) = self.scheduler.kv.iter().fold((0, 0), |(q, h), kv| {
            let p = kv.stats();
            (q + p.queries, h + p.hits)
        });
        s.queued
            .store(self.scheduler.waiting.len() as u64, Ordering::Relaxed);
        s.kv_blocks_used
            .store((blocks - free) as u64, Ordering::Relaxed);
        s.prefix_cache_queries.store(queries, Ordering::Relaxed);
        s.prefix_cache_hits.store(hits, Ordering::Relaxed);
        s.preemptions
            .store(self.scheduler.num_preemptions, Ordering::Relaxed);
        s.running
            .store(self.scheduler.running.len() as u64, Ordering::Release);
    }

    /// Drops requests whose clients left, freeing their blocks this step.
    fn abort_abandoned(&mut self) {
        let before = self.scheduler.waiting.len();
        self.scheduler.waiting.retain(|s| !s.is_abandoned());
        let mut aborted = before - self.scheduler.waiting.len();
        let gone: Vec<usize> = (0..self.scheduler.running.len())
            .filter(|&i| self.scheduler.running[i].is_abandoned())
            .collect();
        for seq in self.scheduler.finish(gone) {
            tracing::debug!(request = seq.id, "client went away; aborted");
            aborted += 1;
        }
        self.stats
            .aborted_requests
            .fetch_add(aborted as u64, Ordering::Relaxed);
    }

    fn step(&mut self, timer: &mut StepTimer) {
        self.abort_abandoned();
        let plan = self.scheduler.schedule();
        if plan.chunks.is_empty() {
            // Nothing fits even with an empty cache: the head request can never run.
            if self.scheduler.running.is_empty() {
                if let Some(seq) = self.scheduler.waiting.pop_front() {
                    fail(&seq, "the request needs more KV cache blocks than the engine has; raise --kv-cache-memory");
                }
            }
            return;
        }
        let pending = self.scheduler.step_tokens(&plan);
        // A step whose sequences take nothing from it but their logits' argmax picks the tokens
        // on the model's device and copies back only their ids (decided before the grammars
        // below leave their sequences).
        let greedy = plan
            .chunks
            .iter()
            .all(|&(i, n)| self.scheduler.running[i].takes_only_the_argmax(n));
        // Likewise a step whose samplers need only temperature, top-k, top-p and min-p: each
        // sampling sequence's uniform is drawn from its own stream now, as the host sampler
        // would draw it, and the tokens are drawn where the logits are.
        let draws: Option<Vec<DrawParams>> = (!greedy
            && self.device_sampling
            && plan
                .chunks
                .iter()
                .all(|&(i, n)| self.scheduler.running[i].takes_only_a_device_draw(n)))
        .then(|| {
            plan.chunks
                .iter()
                .map(|&(i, n)| self.scheduler.running[i].device_draw(n))
                .collect()
        });
        // Grammars of the sequences that sample this step and need their mask first, or whose
        // last first draw was refused (the others try their draw alone, see
        // `sample_constrained`): the mask worker computes them while the forward runs. Each is
        // keyed by its position in the step's chunks.
        let constrained: Vec<_> = plan
            .chunks
            .iter()
            .enumerate()
            .filter_map(|(k, &(i, n))| {
                let seq = &mut self.scheduler.running[i];
                if seq.samples_after(n) && (seq.last_draw_refused || needs_mask_first(&seq.params))
                {
                    seq.constraint.take().map(|c| (k, c))
                } else {
                    None
                }
            })
            .collect();
        let inputs: Vec<SequenceInput<'_>> = plan
            .chunks
            .iter()
            .zip(&pending)
            .map(|(&(i, _), tokens)| {
                let seq = &self.scheduler.running[i];
                SequenceInput {
                    token_ids: tokens,
                    num_computed: seq.num_computed,
                    block_table: &seq.block_table,
                    all_logits: seq.prompt_logprobs.is_some()
                        && seq.num_computed < seq.prompt.len(),
                    adapter: seq.adapter.as_ref(),
                }
            })
            .collect();
        timer.lap(0);
        self.masks.begin(constrained);
        let ranks: Vec<usize> = plan
            .chunks
            .iter()
            .map(|&(i, _)| self.scheduler.running[i].dp_rank)
            .collect();
        // Logprobs of the tokens a device step samples: computed where the logits are.
        let logprobs: Vec<Option<usize>> = plan
            .chunks
            .iter()
            .map(|&(i, n)| {
                let seq = &self.scheduler.running[i];
                seq.params.logprobs.filter(|_| seq.samples_after(n))
            })
            .collect();
        let logits = self
            .runner
            .prepare_ranked(&inputs, &ranks)
            .and_then(|batch| {
                timer.lap(1);
                if greedy || draws.is_some() {
                    let sampled =
                        self.runner
                            .forward_sampled(&batch, draws.as_deref(), &logprobs)?;
                    self.stats
                        .device_sampled_steps
                        .fetch_add(1, Ordering::Relaxed);
                    Ok(sampled
                        .into_iter()
                        .map(|(token, logprob)| StepOutput::Token(token, logprob))
                        .collect())
                } else {
                    let rows = self.runner.forward(&batch)?;
                    Ok(rows.into_iter().map(StepOutput::Rows).collect::<Vec<_>>())
                }
            });
        drop(inputs);
        let mut masks: Vec<Option<MaskResult>> = plan.chunks.iter().map(|_| None).collect();
        for (k, constraint, mask) in self.masks.finish() {
            self.scheduler.running[plan.chunks[k].0].constraint = constraint;
            masks[k] = Some(mask);
        }
        let logits = match logits {
            Ok(logits) => logits,
            Err(e) => {
                tracing::error!("forward failed: {e}");
                let failed: Vec<usize> = plan.chunks.iter().map(|&(i, _)| i).collect();
                for seq in self.scheduler.finish(failed) {
                    fail(&seq, &format!("internal error: {e}"));
                }
                return;
            }
        };
        timer.lap(2);
        let mut finished: Vec<usize> = Vec::new();
        for ((&(i, n), output), mask) in plan.chunks.iter().zip(logits).zip(masks) {
            let seq = &mut self.scheduler.running[i];
            let prompt_part = seq.prompt.len().saturating_sub(seq.num_computed).min(n);
            self.stats
                .prompt_tokens_computed
                .fetch_add(prompt_part as u64, Ordering::Relaxed);
            let done = advance(seq, n, &output, mask, self.max_model_len, &self.stats);
            self.scheduler.cache_computed_blocks(i);
            if done {
                finished.push(i);
            }
        }
        // `advance` already sent each finished request its last output.
        self.scheduler.finish(finished);
        timer.lap(3);
    }
}

/// Splits a step's wall time into schedule / prepare / forward / sample laps.
struct StepTimer {
    last: Instant,
    spent: [u64; 4],
}

impl StepTimer {
    fn new() -> Self {
        Self {
            last: Instant::now(),
            spent: [0; 4],
        }
    }

    /// Charges the time since the previous lap to `phase`.
    fn lap(&mut self, phase: usize) {
        let now = Instant::now();
        self.spent[phase] += (now - self.last).as_nanos() as u64;
        self.last = now;
    }
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
            let sampled = match constraint {
                Some(c) => sample_constrained(c.as_mut(), mask, draw, &mut seq.rng).map(
                    |(token, refused)| {
                        seq.last_draw_refused = refused;
                        token
                    },
                ),
                None => Err(mask
                    .and_then(|m| m.err())
                    .unwrap_or_else(|| "the grammar was lost".into())),
            };
            match sampled {
                Ok(token) => token,
                Err(e) => {
                    fail(seq, &format!("structured output failed: {e}"));
                    return true;
                }
            }
        }
    };
    let logprob = with_logprobs(row, token_id, params).logprob;
    emit(seq, out, token_id, logprob, max_model_len, stats)
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

fn fail(seq: &Sequence, message: &str) {
    let mut out = seq.output_template();
    out.finish_reason = Some(FinishReason::Error);
    out.error = Some(message.to_string());
    seq.send(out);
}
