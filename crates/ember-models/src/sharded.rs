//! A model sharded over the ranks of one parallel group, driven in lock-step: every step runs
//! each rank's shard on its own thread over the same batch (rank 0 on the caller's), the ranks
//! meet at their collectives, and rank 0's output (whole on every rank) is the step's result.
//!
//! A rank that fails, by error or panic, aborts the group: the others return from their
//! collectives with its reason instead of waiting, and the model reports itself failed so the
//! engine stops rather than step a group that can no longer agree.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use ember_core::{EmberError, ModelConfig, Result};

use crate::cache::kv_cache::KvCachePool;
use crate::families::decoder::DecoderModel;
use crate::lora::LoraTargets;
use crate::parallel::eplb::ExpertLoad;
use crate::parallel::Communicator;
use crate::step::batch::ForwardBatch;
use crate::CausalLm;

/// One shard per rank, each with its rank's communicator.
pub struct ShardedModel {
    ranks: Vec<(DecoderModel, Arc<dyn Communicator>)>,
    failed: Mutex<Option<String>>,
    /// Every rank's adaptable projections together: under expert parallelism each rank holds
    /// only its own experts.
    lora_targets: LoraTargets,
    /// Steps run so far, counting from 1.
    steps: AtomicU64,
    /// `EMBER_FAULT_INJECT=RANK:STEP`: rank RANK fails its STEP-th step, so tests can drive a
    /// real server through a rank failure. Unset in normal use.
    fault: Option<(usize, u64)>,
    /// With redundant experts: the load statistics to re-place the copies from, and every how
    /// many steps.
    rebalancing: Option<Rebalancing>,
    /// Each rank's device, when the ranks are spread over several GPUs: a rank whose device is
    /// not the batch's runs on a copy of the batch there.
    devices: Vec<Device>,
    /// `--data-parallel-size`: each rank runs its own sequences (see [`Self::data_parallel`]).
    data_parallel: bool,
    /// Whether an idle data-parallel rank must still run (its experts' all-to-alls).
    idle_ranks_meet: bool,
    /// Ranks per data-parallel rank: 1, or a tensor-parallel replica's size.
    replica: usize,
}

/// EPLB's schedule: re-place every `interval` steps, from the load of the last `window` steps.
struct Rebalancing {
    load: Arc<ExpertLoad>,
    interval: u64,
    window: u64,
}

/// Parses `EMBER_FAULT_INJECT` (`RANK:STEP`); a malformed value is ignored with a warning.
fn fault_from_env() -> Option<(usize, u64)> {
    let value = std::env::var("EMBER_FAULT_INJECT").ok()?;
    let parsed = value
        .split_once(':')
        .and_then(|(r, s)| Some((r.trim().parse().ok()?, s.trim().parse().ok()?)));
    match parsed {
        Some(fault) => {
            tracing::warn!(
                "EMBER_FAULT_INJECT={value}: rank {} will fail at step {}",
                fault.0,
                fault.1
            );
            Some(fault)
        }
        None => {
            tracing::warn!("EMBER_FAULT_INJECT={value} ignored: expected RANK:STEP");
            None
        }
    }
}

impl ShardedModel {
    /// The shards of ranks `0..n`, in rank order.
    pub fn new(ranks: Vec<(DecoderModel, Arc<dyn Communicator>)>) -> Result<Self> {
        if ranks.is_empty() {
            return Err(EmberError::Config(
                "a sharded model needs at least one rank".into(),
            ));
        }
        for (i, (_, comm)) in ranks.iter().enumerate() {
            if comm.rank() != i || comm.world_size() != ranks.len() {
                return Err(EmberError::Config(format!(
                    "shard {i} holds rank {} of {}; shards must be ranks 0..{} in order",
                    comm.rank(),
                    comm.world_size(),
                    ranks.len()
                )));
            }
        }
        Ok(Self::checked(ranks))
    }

    /// The model over shards whose ranks were checked.
    fn checked(ranks: Vec<(DecoderModel, Arc<dyn Communicator>)>) -> Self {
        let mut lora_targets = LoraTargets::default();
        for (model, _) in &ranks {
            lora_targets.merge(model.lora_targets());
        }
        Self {
            ranks,
            failed: Mutex::new(None),
            lora_targets,
            steps: AtomicU64::new(0),
            fault: fault_from_env(),
            rebalancing: None,
            devices: Vec::new(),
            data_parallel: false,
            idle_ranks_meet: true,
            replica: 1,
        }
    }

    /// Replicas of one model, each sharded over `replica` ranks (tensor parallelism within a
    /// replica): shards `r·replica..(r+1)·replica` are ranks `0..replica` of their own group.
    /// With `replica` 1 the ranks form one group, as [`Self::new`] takes them.
    pub fn grouped(
        ranks: Vec<(DecoderModel, Arc<dyn Communicator>)>,
        replica: usize,
    ) -> Result<Self> {
        if replica <= 1 {
            return Self::new(ranks);
        }
        if ranks.is_empty() || !ranks.len().is_multiple_of(replica) {
            return Err(EmberError::Config(format!(
                "{} shards do not make replicas of {replica} ranks",
                ranks.len()
            )));
        }
        for (i, (_, comm)) in ranks.iter().enumerate() {
            if comm.rank() != i % replica || comm.world_size() != replica {
                return Err(EmberError::Config(format!(
                    "shard {i} holds rank {} of {}; each replica's shards must be ranks 0..{replica} in order",
                    comm.rank(),
                    comm.world_size(),
                )));
            }
        }
        let mut model = Self::checked(ranks);
        model.replica = replica;
        Ok(model)
    }

    /// Places rank r on `devices[r]` (its weights and cache are there; each step's batch is
    /// copied to it).
    pub fn on_devices(self, devices: Vec<Device>) -> Self {
        Self { devices, ..self }
    }

    /// Re-places the experts and their copies from `load` after every `interval` steps, weighing
    /// the last `window` of them (all `interval` when `window` is 0 or not smaller; see
    /// [`ExpertLoad::rebalance`]); between steps, so every rank sees the same placement.
    pub fn with_rebalancing(mut self, load: Arc<ExpertLoad>, interval: u64, window: u64) -> Self {
        self.rebalancing = (interval > 0).then_some(Rebalancing {
            load,
            interval,
            window,
        });
        self
    }

    /// Makes the ranks data-parallel: each step comes split by rank
    /// ([`ForwardBatch::split_data_parallel`]) and each rank runs its own share. With
    /// `meet_in_experts` (expert parallelism) a rank with nothing to run still runs a placeholder
    /// token to take part in the all-to-alls; without, it skips the step.
    pub fn data_parallel(self, meet_in_experts: bool) -> Self {
        Self {
            data_parallel: true,
            idle_ranks_meet: meet_in_experts,
            ..self
        }
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }

    fn run_rank(
        model: &DecoderModel,
        comm: &dyn Communicator,
        batch: &ForwardBatch,
        cache: &KvCachePool,
        injected: bool,
    ) -> Result<Tensor> {
        let rank = comm.rank();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            if injected {
                return Err(EmberError::Tensor(
                    "fault injected by EMBER_FAULT_INJECT".into(),
                ));
            }
            model.forward_rank(batch, cache)
        }));
        let reason = match outcome {
            Ok(Ok(out)) => return Ok(out),
            Ok(Err(e)) => format!("rank {rank} failed: {e}"),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic".into());
                format!("rank {rank} panicked: {what}")
            }
        };
        // Every group the rank takes part in, so no other rank waits for it in either.
        comm.abort(&reason);
        if let Some(experts) = model.experts_comm() {
            experts.abort(&reason);
        }
        Err(EmberError::Tensor(reason))
    }
}

/// The step's output rows in its sequences' order, from each rank's output over its own share
/// (rows in its part's order), on the step's device; idle ranks' placeholder rows are dropped.
fn combine_data_parallel(
    batch: &ForwardBatch,
    split: &crate::step::batch::DataParallelSplit,
    outputs: &[Tensor],
) -> candle_core::Result<Tensor> {
    let device = batch.token_ids.device();
    // Where each rank's rows start in the concatenation of the busy ranks' outputs.
    let mut starts = vec![0usize; outputs.len()];
    let mut busy = Vec::new();
    let mut at = 0;
    for (rank, out) in outputs.iter().enumerate() {
        if split.idle[rank] {
            continue;
        }
        starts[rank] = at;
        at += out.dim(0)?;
        busy.push(out.to_device(device)?);
    }
    // Each rank's first output row of each of its sequences.
    let first_rows: Vec<Vec<usize>> = split
        .parts
        .iter()
        .map(|p| {
            let mut row = 0;
            p.logits_per_sequence
                .iter()
                .map(|&n| {
                    let first = row;
                    row += n;
                    first
                })
                .collect()
        })
        .collect();
    let mut order: Vec<u32> = Vec::with_capacity(batch.logits_rows.dim(0)?);
    for (&(rank, index), &rows) in split.placement.iter().zip(&batch.logits_per_sequence) {
        let first = starts[rank] + first_rows[rank][index];
        order.extend((first..first + rows).map(|r| r as u32));
    }
    let all = Tensor::cat(&busy, 0)?;
    let n = order.len();
    let index = Tensor::from_vec(order, n, device)?;
    all.index_select(&index, 0)
}

impl CausalLm for ShardedModel {
    fn config(&self) -> &ModelConfig {
        self.ranks[0].0.config()
    }

    fn lora_targets(&self) -> &LoraTargets {
        &self.lora_targets
    }

    fn kv_cache_shards(&self) -> Vec<(usize, usize)> {
        self.ranks
            .iter()
            .map(|(m, _)| m.kv_cache_row_widths())
            .collect()
    }

    fn forward(&self, batch: &ForwardBatch, caches: &[KvCachePool]) -> Result<Tensor> {
        if let Some(reason) = self.failure() {
            return Err(EmberError::Tensor(format!(
                "the model's ranks failed: {reason}"
            )));
        }
        if caches.len() != self.ranks.len() {
            return Err(EmberError::Tensor(format!(
                "{} ranks need one KV cache each, got {}",
                self.ranks.len(),
                caches.len()
            )));
        }
        let step = self.steps.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(Rebalancing {
            load,
            interval,
            window,
        }) = &self.rebalancing
        {
            // `done` steps have run. Re-place after each `interval` of them; the window opens
            // `window` steps before that.
            let done = step - 1;
            if (1..*interval).contains(window) && done % interval == interval - window {
                load.start_window();
            }
            if done > 0 && done.is_multiple_of(*interval) {
                let changed = load.rebalance();
                if changed > 0 {
                    tracing::info!(
                        step,
                        layers = changed,
                        "EPLB: re-placed the experts over the ranks"
                    );
                }
            }
        }
        let injected = |rank: usize| self.fault == Some((rank, step));
        let replica = self.replica;
        let split = match (&batch.data_parallel, self.data_parallel) {
            (Some(split), true) if split.parts.len() * replica == self.ranks.len() => Some(split),
            (None, false) => None,
            _ => {
                return Err(EmberError::Tensor(format!(
                    "a step for {} model of {} ranks must {}be split by data-parallel rank",
                    if self.data_parallel {
                        "a data-parallel"
                    } else {
                        "a tensor-parallel"
                    },
                    self.ranks.len(),
                    if self.data_parallel { "" } else { "not " }
                )))
            }
        };
        // What rank r runs: its data-parallel rank's share of the step (its group's, for a
        // tensor-parallel replica), else the whole step.
        let source = |rank: usize| -> &ForwardBatch {
            match split {
                Some(split) => &split.parts[rank / replica],
                None => batch,
            }
        };
        // ...again on the rank's own device, where that is not its source's.
        let copies = (0..self.ranks.len())
            .map(|rank| match self.devices.get(rank) {
                Some(device) if !source(rank).token_ids.device().same_device(device) => {
                    source(rank).to_device(device).map(Some)
                }
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let rank_batch = |rank: usize| -> &ForwardBatch {
            copies[rank].as_ref().unwrap_or_else(|| source(rank))
        };
        let idle = |rank: usize| split.is_some_and(|s| s.idle[rank / replica]);
        let results: Vec<Result<Tensor>> = std::thread::scope(|scope| {
            let others: Vec<_> = self.ranks[1..]
                .iter()
                .zip(&caches[1..])
                .enumerate()
                .map(|(i, ((model, comm), cache))| {
                    let fail = injected(i + 1);
                    let batch = rank_batch(i + 1);
                    let idle = idle(i + 1);
                    let skip = idle && !self.idle_ranks_meet;
                    scope.spawn(move || {
                        if skip {
                            return Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu)
                                .map_err(|e| EmberError::Tensor(e.to_string()));
                        }
                        Self::run_rank(model, comm.as_ref(), batch, cache, fail)
                    })
                })
                .collect();
            let (model, comm) = &self.ranks[0];
            let idle = idle(0);
            let mut results = vec![if idle && !self.idle_ranks_meet {
                Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu)
                    .map_err(|e| EmberError::Tensor(e.to_string()))
            } else {
                Self::run_rank(model, comm.as_ref(), rank_batch(0), &caches[0], injected(0))
            }];
            results.extend(others.into_iter().map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(EmberError::Tensor("a rank thread died".into())))
            }));
            results
        });
        // The first rank to fail names the cause; the others only saw the abort.
        let first_failure = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(|e| e.to_string())
            .find(|e| !e.contains("the parallel group failed"))
            .or_else(|| {
                results
                    .iter()
                    .find_map(|r| r.as_ref().err().map(|e| e.to_string()))
            });
        if let Some(reason) = first_failure {
            *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
            return Err(EmberError::Tensor(reason));
        }
        match split {
            Some(split) => {
                // Each data-parallel rank's output: its group's first rank's.
                let outputs = results
                    .into_iter()
                    .step_by(replica)
                    .collect::<Result<Vec<_>>>()?;
                combine_data_parallel(batch, split, &outputs)
                    .map_err(|e| EmberError::Tensor(e.to_string()))
            }
            None => results
                .into_iter()
                .next()
                .unwrap_or_else(|| Err(EmberError::Tensor("a sharded model without ranks".into()))),
        }
    }

    fn data_parallel_size(&self) -> usize {
        if self.data_parallel {
            self.ranks.len() / self.replica
        } else {
            1
        }
    }

    fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
