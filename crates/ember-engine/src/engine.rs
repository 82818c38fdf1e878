//! The engine thread: takes requests, runs scheduler steps through the model runner, samples,
//! and sends each request its outputs. One step's phases are in [`step`].

mod step;

use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use ember_core::{EngineRequest, Result};
use ember_models::{LoadedModel, LoraAdapter};

use crate::constrained::MaskWorker;
use crate::handle::{EngineHandle, ModelInfo};
use crate::lora::{LoraConfig, LoraManager};
use crate::runner::ModelRunner;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::sequence::Sequence;
use crate::stats::EngineStats;
use step::{fail, StepTimer};

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

/// A request on its way to the engine thread, with the adapter its `lora_name` names already
/// resolved (so that unloading the adapter later does not stop the request).
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
        for seq in self.scheduler.drain() {
            fail(&seq, &message);
        }
        *self.stats.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
        self.publish_stats();
    }

    fn accept(&mut self, submission: Submission) {
        self.stats.unseen.fetch_sub(1, Ordering::Relaxed);
        let seq = Sequence::with_adapter(submission.request, submission.adapter);
        self.scheduler.add(seq);
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        s.steps.fetch_add(1, Ordering::Relaxed);
        s.graph_steps
            .store(self.runner.graph_steps(), Ordering::Relaxed);
        let (blocks, free) = self.scheduler.kv_blocks();
        let (queries, hits) = self.scheduler.prefix_cache_stats();
        s.queued
            .store(self.scheduler.num_waiting() as u64, Ordering::Relaxed);
        s.kv_blocks_used
            .store((blocks - free) as u64, Ordering::Relaxed);
        s.prefix_cache_queries.store(queries, Ordering::Relaxed);
        s.prefix_cache_hits.store(hits, Ordering::Relaxed);
        s.preemptions
            .store(self.scheduler.num_preemptions(), Ordering::Relaxed);
        s.running
            .store(self.scheduler.num_running() as u64, Ordering::Release);
    }
}
