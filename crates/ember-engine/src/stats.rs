//! Live counters the engine publishes for `/metrics` and for admission control.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by the engine thread (writer) and the HTTP side (readers).
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Submitted requests the engine thread has not picked up yet.
    pub(crate) unseen: AtomicU64,
    /// Requests in the scheduler's waiting queue (new or preempted).
    pub(crate) queued: AtomicU64,
    pub(crate) running: AtomicU64,
    pub(crate) kv_blocks_total: AtomicU64,
    pub(crate) kv_blocks_used: AtomicU64,
    pub(crate) prefix_cache_queries: AtomicU64,
    pub(crate) prefix_cache_hits: AtomicU64,
    pub(crate) preemptions: AtomicU64,
    pub(crate) aborted_requests: AtomicU64,
    pub(crate) prompt_tokens_computed: AtomicU64,
    pub(crate) generation_tokens: AtomicU64,
    pub(crate) steps: AtomicU64,
    /// Steps whose tokens were all chosen on the model's device (greedy sampling there).
    pub(crate) device_sampled_steps: AtomicU64,
    /// Steps whose forward replayed a CUDA graph.
    pub(crate) graph_steps: AtomicU64,
    /// Wall time of the engine loop by phase, in nanoseconds, summed over steps.
    pub(crate) step_time_ns: [AtomicU64; 5],
    /// Why the engine stopped for good (a rank of a sharded model failed), once it has.
    pub(crate) failure: std::sync::Mutex<Option<String>>,
    /// Tokens routed to each expert of the model's MoE layers.
    pub(crate) expert_load: std::sync::Arc<ember_models::parallel::eplb::ExpertLoad>,
}

/// A MoE model's load balance at one moment, as plain counts (empty for a dense model).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpertLoadSnapshot {
    /// Tokens routed to each expert, by MoE layer index, in layer order (a token counts once
    /// per expert it picks).
    pub layers: Vec<(usize, Vec<u64>)>,
    /// Under expert parallelism, tokens each rank's experts processed, all layers together.
    pub rank_tokens: Option<Vec<u64>>,
    /// Under expert parallelism, each layer's copies of each expert (1 without redundancy).
    pub replicas: Vec<(usize, Vec<usize>)>,
}

/// The phases of one engine step, in the order [`StatsSnapshot::step_time_seconds`] lists them.
pub const STEP_PHASES: [&str; 5] = ["schedule", "prepare", "forward", "sample", "other"];

/// Index of the model's forward pass in [`STEP_PHASES`].
pub const FORWARD_PHASE: usize = 2;

/// A consistent-enough copy of [`EngineStats`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct StatsSnapshot {
    /// Requests not running: not yet picked up, waiting for room, or preempted.
    pub waiting: u64,
    pub running: u64,
    pub kv_blocks_total: u64,
    pub kv_blocks_used: u64,
    /// Prompt tokens looked up in the prefix cache, and how many were found.
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub preemptions: u64,
    /// Requests dropped because their client went away.
    pub aborted_requests: u64,
    /// Prompt tokens run through the model (cache hits excluded, recomputation included).
    pub prompt_tokens_computed: u64,
    pub generation_tokens: u64,
    pub steps: u64,
    /// Steps whose every token was the argmax taken on the model's device, so only token ids
    /// came back (every sequence greedy, with no logprobs, bias, penalty or grammar).
    pub device_sampled_steps: u64,
    /// Steps whose forward was a CUDA graph's replay (decode steps on one GPU with ember's
    /// kernels; see `ember_models::step::cuda_graph`).
    pub graph_steps: u64,
    /// Seconds spent, summed over steps, in each of [`STEP_PHASES`]: `schedule` (aborts,
    /// admission, block allocation, building the batch), `forward` (the model, logits to host),
    /// `sample` (sampling, logprobs, sending tokens, caching full blocks, finishing requests),
    /// `other` (taking new requests, publishing counters).
    pub step_time_seconds: [f64; 5],
}

impl EngineStats {
    /// Reads the experts' counters (draining those kept on a GPU).
    pub(crate) fn expert_load(&self) -> ExpertLoadSnapshot {
        let load = &self.expert_load;
        ExpertLoadSnapshot {
            layers: load.snapshot(),
            rank_tokens: load.rank_tokens(),
            replicas: load.replicas(),
        }
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        // `running` is stored last in a step (Release): reading it first (Acquire) makes the
        // step's counters and times visible with it.
        let running = self.running.load(Ordering::Acquire);
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            waiting: r(&self.unseen) + r(&self.queued),
            running,
            kv_blocks_total: r(&self.kv_blocks_total),
            kv_blocks_used: r(&self.kv_blocks_used),
            prefix_cache_queries: r(&self.prefix_cache_queries),
            prefix_cache_hits: r(&self.prefix_cache_hits),
            preemptions: r(&self.preemptions),
            aborted_requests: r(&self.aborted_requests),
            prompt_tokens_computed: r(&self.prompt_tokens_computed),
            generation_tokens: r(&self.generation_tokens),
            steps: r(&self.steps),
            device_sampled_steps: r(&self.device_sampled_steps),
            graph_steps: r(&self.graph_steps),
            step_time_seconds: std::array::from_fn(|i| r(&self.step_time_ns[i]) as f64 * 1e-9),
        }
    }
}

impl StatsSnapshot {
    /// Fraction of the engine's busy time spent outside the model's forward pass.
    pub fn overhead_fraction(&self) -> f64 {
        let total: f64 = self.step_time_seconds.iter().sum();
        if total == 0.0 {
            return 0.0;
        }
        1.0 - self.step_time_seconds[FORWARD_PHASE] / total
    }

    /// Fraction of KV blocks held by requests (cached-but-free blocks count as free).
    pub fn kv_usage(&self) -> f64 {
        self.kv_blocks_used as f64 / self.kv_blocks_total.max(1) as f64
    }
}
