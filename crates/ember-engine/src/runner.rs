//! The model runner: owns the model and its KV cache, runs one flattened batch per step.
//! It never decides policy; the scheduler tells it what to run.

use ember_core::TokenLogprob;
use ember_core::{EmberError, Result};
use ember_kernels::sampling::DrawParams;
use ember_models::sampling::{greedy_token_ids, sampled_token_ids, token_logprobs};
use ember_models::{CausalLm, ForwardBatch, KvCachePool, LoadedModel, SequenceInput};

/// A loaded model plus its paged KV cache.
pub struct ModelRunner {
    model: Box<dyn CausalLm>,
    /// One pool per rank of a sharded model (each caches its own heads), all with the same
    /// blocks, so one block table addresses them all.
    caches: Vec<KvCachePool>,
    device: candle_core::Device,
    /// Each data-parallel rank's device, for a data-parallel model's split steps.
    rank_devices: Vec<candle_core::Device>,
    /// A data-parallel model's ranks (1 otherwise). With more than one, or with decode graphs,
    /// each cache holds one block more: the scratch block that placeholder rows (an idle rank's
    /// token, a graph's spare rows) write to.
    data_parallel: usize,
    num_blocks: usize,
    /// Whether forwards run on a worker of rayon's pool: a single-rank CPU model with at least
    /// two threads in the pool (ranks are threads that call into the pool themselves, and the
    /// worker blocked in a step must leave another to serve any other caller).
    forward_in_pool: bool,
    /// Decode steps as CUDA graphs (see `ember_models::step::cuda_graph`), where the model allows.
    #[cfg(feature = "cuda")]
    graphs: Option<ember_models::step::cuda_graph::DecodeGraphs>,
}

impl ModelRunner {
    /// Allocates `num_blocks` cache blocks of `block_size` tokens for the model, on its device.
    /// Decode steps of up to the largest of `graph_sizes` sequences run as CUDA graphs of those
    /// sizes where [`LoadedModel::decode_graphs_possible`] (none: every step eager).
    pub fn new(
        loaded: LoadedModel,
        num_blocks: usize,
        block_size: usize,
        graph_sizes: &[usize],
    ) -> Result<Self> {
        let device = loaded.device.clone();
        let layers = loaded.model.config().num_hidden_layers;
        let data_parallel = loaded.model.data_parallel_size();
        let graphs = !graph_sizes.is_empty() && loaded.decode_graphs_possible();
        if !graph_sizes.is_empty() && !graphs && loaded.device.is_cuda() {
            tracing::info!(
                "decode steps run eagerly: CUDA graphs need one rank, ember's attention kernels \
                 (--attention-backend ember) over a cache in the model's dtype and, for an MoE \
                 model, --moe-backend fused"
            );
        }
        let cache_blocks = num_blocks + usize::from(data_parallel > 1 || graphs);
        #[cfg(feature = "cuda")]
        let graphs = graphs
            .then(|| {
                ember_models::step::cuda_graph::DecodeGraphs::new(
                    ember_models::step::cuda_graph::GraphPlan::new(
                        graph_sizes,
                        block_size,
                        // No sequence outgrows the cache, whatever the model's context.
                        loaded.max_model_len.min(num_blocks * block_size),
                        num_blocks as u32,
                    ),
                    &device,
                    cache_blocks,
                )
            })
            .flatten();
        #[cfg(not(feature = "cuda"))]
        let _ = graphs;
        // Each rank's cache on its own device.
        let caches = loaded
            .model
            .kv_cache_shards()
            .into_iter()
            .enumerate()
            .map(|(rank, widths)| {
                KvCachePool::with_storage(
                    layers,
                    cache_blocks,
                    block_size,
                    widths,
                    loaded.dtype,
                    loaded.kv_cache_dtype,
                    loaded.rank_devices.get(rank).unwrap_or(&device),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        // Each data-parallel rank's device: its first rank's (a tensor-parallel replica copies
        // its share of the step to its other ranks).
        let per_replica = (loaded.rank_devices.len() / data_parallel.max(1)).max(1);
        let rank_devices = loaded
            .rank_devices
            .iter()
            .step_by(per_replica)
            .cloned()
            .collect();
        let forward_in_pool =
            device.is_cpu() && caches.len() == 1 && rayon::current_num_threads() >= 2;
        Ok(Self {
            model: loaded.model,
            caches,
            device,
            rank_devices,
            data_parallel,
            num_blocks,
            forward_in_pool,
            #[cfg(feature = "cuda")]
            graphs,
        })
    }

    /// Captures every decode graph now, so that no step waits for one (a size not captured yet
    /// is captured by its first step). Call it from the thread that runs the steps: candle keeps
    /// the small uploads a capture reads in that thread's cache. Returns the sizes captured.
    pub fn capture_graphs(&self) -> Vec<usize> {
        #[cfg(feature = "cuda")]
        if let Some(graphs) = &self.graphs {
            return graphs.capture_all(&|b: &ForwardBatch| self.model.forward(b, &self.caches));
        }
        Vec::new()
    }

    /// The step's logits: from a CUDA graph's replay where the step runs as one, else from the
    /// model's forward.
    fn logits(&self, batch: &ForwardBatch) -> Result<candle_core::Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(graphs) = &self.graphs {
            let forward = |b: &ForwardBatch| self.model.forward(b, &self.caches);
            if let Some(logits) = graphs.run(batch, &forward)? {
                return Ok(logits);
            }
        }
        if self.forward_in_pool {
            // On a worker of the one CPU pool, the forward's kernels push their tasks to this
            // thread's own queue instead of waking the pool from outside ~100 times a step.
            return rayon::scope(|_| self.model.forward(batch, &self.caches));
        }
        self.model.forward(batch, &self.caches)
    }

    /// Steps this runner's decode graphs have served.
    pub fn graph_steps(&self) -> u64 {
        #[cfg(feature = "cuda")]
        if let Some(graphs) = &self.graphs {
            return graphs.replays();
        }
        0
    }

    /// Block size of the cache.
    pub fn block_size(&self) -> usize {
        self.caches[0].block_size
    }

    /// Why the model can no longer run (a rank failed), if it cannot.
    pub fn failure(&self) -> Option<String> {
        self.model.failure()
    }

    /// Runs one step; returns, per input, its logits rows (one, or one per token with `all_logits`);
    /// an embedding model's rows are hidden states.
    pub fn execute(&self, inputs: &[SequenceInput<'_>]) -> Result<Vec<Vec<Vec<f32>>>> {
        self.forward(&self.prepare(inputs)?)
    }

    /// Builds the step's batch: positions, slots and attention metadata as device tensors.
    pub fn prepare(&self, inputs: &[SequenceInput<'_>]) -> Result<ForwardBatch> {
        ForwardBatch::new(inputs, self.block_size(), &self.device)
    }

    /// [`Self::prepare`] for sequences on data-parallel ranks `ranks` (one per input): split by
    /// rank for a data-parallel model, the same as `prepare` for any other.
    pub fn prepare_ranked(
        &self,
        inputs: &[SequenceInput<'_>],
        ranks: &[usize],
    ) -> Result<ForwardBatch> {
        if self.data_parallel <= 1 {
            return self.prepare(inputs);
        }
        ForwardBatch::split_data_parallel(
            inputs,
            ranks,
            self.block_size(),
            &self.rank_devices,
            self.num_blocks as u32,
        )
    }

    /// Runs the model over a prepared batch; returns, per sequence, its logits rows.
    pub fn forward(&self, batch: &ForwardBatch) -> Result<Vec<Vec<Vec<f32>>>> {
        let logits = self.logits(batch)?;
        let mut rows = logits
            .to_vec2::<f32>()
            .map_err(|e| EmberError::Tensor(e.to_string()))?
            .into_iter();
        Ok(batch
            .logits_per_sequence
            .iter()
            .map(|&n| rows.by_ref().take(n).collect())
            .collect())
    }

    /// Runs the model over a prepared batch whose sequences each own one logits row, and picks
    /// each one's token where the logits are: its row's argmax (the lowest id on ties) without
    /// `draws`, else drawn under its entry (greedy rows at temperature 0). `logprobs[i]` asks for
    /// sequence i's token's logprob and that many best alternatives, computed there too (the host
    /// sampler's definition). Only ids and logprobs come back.
    pub fn forward_sampled(
        &self,
        batch: &ForwardBatch,
        draws: Option<&[DrawParams]>,
        logprobs: &[Option<usize>],
    ) -> Result<Vec<(u32, Option<TokenLogprob>)>> {
        let rows = batch.sequences.len();
        if batch.logits_per_sequence.iter().any(|&n| n != 1)
            || draws.is_some_and(|d| d.len() != rows)
            || logprobs.len() != rows
        {
            return Err(EmberError::Tensor(
                "device sampling needs exactly one logits row, draw and logprobs request per sequence"
                    .into(),
            ));
        }
        let logits = self.logits(batch)?;
        let tensor = |e: candle_core::Error| EmberError::Tensor(e.to_string());
        let ids = match draws {
            Some(draws) => sampled_token_ids(&logits, draws),
            None => greedy_token_ids(&logits),
        }
        .map_err(tensor)?;
        let top = logprobs.iter().flatten().copied().max();
        let lp_rows = top
            .map(|k| token_logprobs(&logits, &ids, k).and_then(|t| t.to_vec2::<f32>()))
            .transpose()
            .map_err(tensor)?;
        let tokens = ids.to_vec1::<u32>().map_err(tensor)?;
        Ok(tokens
            .into_iter()
            .zip(logprobs)
            .enumerate()
            .map(|(i, (token_id, k))| {
                let logprob = k.zip(lp_rows.as_ref()).map(|(k, rows)| {
                    let row = &rows[i];
                    TokenLogprob {
                        token_id,
                        logprob: row[0],
                        top: row[1..]
                            .chunks_exact(2)
                            .take(k)
                            .map(|p| (p[0] as u32, p[1]))
                            .collect(),
                    }
                });
                (token_id, logprob)
            })
            .collect())
    }

    /// Whether the model runs on a GPU.
    pub fn on_gpu(&self) -> bool {
        self.device.is_cuda()
    }
}
