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

use crate::batch::ForwardBatch;
use crate::decoder::DecoderModel;
use crate::kv_cache::KvCachePool;
use crate::lora::LoraTargets;
use crate::moe::ExpertLoad;
use crate::parallel::Communicator;
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
        let mut lora_targets = LoraTargets::default();
        for (model, _) in &ranks {
            lora_targets.merge(model.lora_targets());
        }
        Ok(Self {
            ranks,
            failed: Mutex::new(None),
            lora_targets,
            steps: AtomicU64::new(0),
            fault: fault_from_env(),
            rebalancing: None,
            devices: Vec::new(),
        })
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
        comm.abort(&reason);
        Err(EmberError::Tensor(reason))
    }
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
        // The batch again on each rank's own device, where that is not the batch's.
        let copies = (1..self.ranks.len())
            .map(|rank| match self.devices.get(rank) {
                Some(device) if !batch.token_ids.device().same_device(device) => {
                    batch.to_device(device).map(Some)
                }
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let results: Vec<Result<Tensor>> = std::thread::scope(|scope| {
            let others: Vec<_> = self.ranks[1..]
                .iter()
                .zip(&caches[1..])
                .zip(&copies)
                .enumerate()
                .map(|(i, (((model, comm), cache), copy))| {
                    let fail = injected(i + 1);
                    let batch = copy.as_ref().unwrap_or(batch);
                    scope.spawn(move || Self::run_rank(model, comm.as_ref(), batch, cache, fail))
                })
                .collect();
            let (model, comm) = &self.ranks[0];
            let mut results = vec![Self::run_rank(
                model,
                comm.as_ref(),
                batch,
                &caches[0],
                injected(0),
            )];
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
        results
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(EmberError::Tensor("a sharded model without ranks".into())))
    }

    fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
