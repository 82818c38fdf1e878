//! The model runner: owns the model and its KV cache, runs one flattened batch per step.
//! It never decides policy; the scheduler tells it what to run.

use ember_core::{EmberError, Result};
use ember_kernels::sampling::DrawParams;
use ember_models::greedy::{greedy_tokens, sampled_tokens};
use ember_models::{CausalLm, ForwardBatch, KvCachePool, LoadedModel, SequenceInput};

/// A loaded model plus its paged KV cache.
pub struct ModelRunner {
    model: Box<dyn CausalLm>,
    /// One pool per rank of a sharded model (each caches its own heads), all with the same
    /// blocks, so one block table addresses them all.
    caches: Vec<KvCachePool>,
    device: candle_core::Device,
    /// Each rank's device, for a data-parallel model's split steps.
    rank_devices: Vec<candle_core::Device>,
    /// A data-parallel model's ranks (1 otherwise); each cache then holds one block more, the
    /// scratch block an idle rank's placeholder token writes to.
    data_parallel: usize,
    num_blocks: usize,
}

impl ModelRunner {
    /// Allocates `num_blocks` cache blocks of `block_size` tokens for the model, on its device.
    pub fn new(loaded: LoadedModel, num_blocks: usize, block_size: usize) -> Result<Self> {
        let device = loaded.device.clone();
        let layers = loaded.model.config().num_hidden_layers;
        let data_parallel = loaded.model.data_parallel_size();
        let cache_blocks = num_blocks + usize::from(data_parallel > 1);
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
        Ok(Self {
            model: loaded.model,
            caches,
            device,
            rank_devices: loaded.rank_devices,
            data_parallel,
            num_blocks,
        })
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
        let logits = self.model.forward(batch, &self.caches)?;
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

    /// Runs the model over a prepared batch whose sequences each own one logits row and all
    /// decode greedily; returns each one's token (its row's argmax, the lowest id on ties),
    /// chosen on the model's device so only the ids come back.
    pub fn forward_greedy(&self, batch: &ForwardBatch) -> Result<Vec<u32>> {
        if batch.logits_per_sequence.iter().any(|&n| n != 1) {
            return Err(EmberError::Tensor(
                "greedy decoding needs exactly one logits row per sequence".into(),
            ));
        }
        let logits = self.model.forward(batch, &self.caches)?;
        greedy_tokens(&logits).map_err(|e| EmberError::Tensor(e.to_string()))
    }

    /// Runs the model over a prepared batch whose sequences each own one logits row; returns
    /// each one's token drawn under its `draws` entry on the model's device (greedy rows at
    /// temperature 0), so only the ids come back.
    pub fn forward_draw(&self, batch: &ForwardBatch, draws: &[DrawParams]) -> Result<Vec<u32>> {
        if batch.logits_per_sequence.iter().any(|&n| n != 1) || draws.len() != batch.sequences.len()
        {
            return Err(EmberError::Tensor(
                "device sampling needs exactly one logits row and one draw per sequence".into(),
            ));
        }
        let logits = self.model.forward(batch, &self.caches)?;
        sampled_tokens(&logits, draws).map_err(|e| EmberError::Tensor(e.to_string()))
    }

    /// Whether the model runs on a GPU.
    pub fn on_gpu(&self) -> bool {
        self.device.is_cuda()
    }
}
