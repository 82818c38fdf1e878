//! CUDA graphs for decode steps (`--cuda-graph-sizes`; `--enforce-eager` turns them off).
//!
//! A decode step launches a few kernels per layer, each costing the host microseconds to queue;
//! at small batches that, not the GPU, bounds the step. A graph records the whole forward once
//! and replays it with one launch. The graph reads fixed buffers, so each replay first rewrites
//! them in place:
//! - a step of `n` decodes runs in the graph of the smallest captured size `B >= n`; rows `n..B`
//!   are placeholders (token 0 at position 0) whose K/V goes to the scratch block, a cache block
//!   the scheduler never hands out, as an idle data-parallel rank's row does, and that the fused
//!   MoE routes to no expert (the routing kernel reads the step's row count from the device), so
//!   padding reads no expert's weights;
//! - the graph's batch holds the token ids, positions and slots; its paged metadata (block
//!   tables `max_blocks` wide, enough for `--max-model-len`, of which a replay rewrites only
//!   the columns the step's longest context needs, and each row's context length) is what every
//!   layer's attention kernel reads, the paged and the MLA kernel alike;
//! - the logits land in a buffer the graph owns; a replay returns a view of its first `n` rows,
//!   valid until the next replay.
//!
//! Only steps that need nothing else run as graphs: decodes only (one token and one logits row
//! each), no LoRA adapter, one rank. Anything in the forward that depends on the host's view of
//! the step fails the capture instead of being frozen into it: candle refuses device-to-host
//! reads and uncached uploads while capturing, ember's uploads and the attention paths that
//! walk the sequences on the host refuse
//! ([`crate::step::mode::StepMode::refuse`]). A failed capture turns graphs off with a
//! warning, and steps run eagerly. The first replay of each size is checked against the eager
//! forward of the same step before the graph is trusted.
//!
//! Every size is captured when the engine's thread starts (as vLLM does), on that thread:
//! candle keeps the small uploads a capture reads in a per-thread cache.

use crate::step::batch::{ForwardBatch, SequenceInput};

/// Decode batch sizes captured when `--cuda-graph-sizes` is not given (those up to
/// `--max-num-seqs`, and that itself).
pub const DEFAULT_SIZES: [usize; 15] =
    [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256];

/// The sizes captured by default for a `max_num_seqs` batch: [`DEFAULT_SIZES`] up to it, and it
/// when it is below the largest.
pub fn default_sizes(max_num_seqs: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = DEFAULT_SIZES
        .into_iter()
        .filter(|&s| s <= max_num_seqs)
        .collect();
    if max_num_seqs > 0 && max_num_seqs < DEFAULT_SIZES[DEFAULT_SIZES.len() - 1] {
        sizes.push(max_num_seqs);
    }
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

/// Which decode steps run as graphs, and how their inputs are laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphPlan {
    /// Captured batch sizes, ascending.
    sizes: Vec<usize>,
    block_size: usize,
    /// Width of every graph's block tables: the blocks of the longest context.
    max_blocks: usize,
    /// The cache block placeholder rows write to.
    scratch_block: u32,
}

/// A decode step's inputs laid out for a graph of `bucket` rows: the step's sequences, then
/// placeholder rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepInputs {
    /// Token ids, positions and cache slots, `bucket` each.
    pub ints: Vec<u32>,
    /// `[bucket, table_width]` block tables: as wide as the step's longest context needs (the
    /// graph's tables are `max_blocks` wide; a replay rewrites only these columns, and no row
    /// reads past its context).
    pub block_tables: Vec<u32>,
    pub table_width: usize,
    /// Each row's sequence (its own row).
    pub token_seq: Vec<u32>,
    /// Each row's context length, its new token included.
    pub token_ctx: Vec<u32>,
}

impl GraphPlan {
    /// Graphs of `sizes` rows (zeros dropped) over a cache of `block_size`-token blocks, for
    /// contexts up to `max_model_len`; placeholder rows write to `scratch_block`.
    pub fn new(
        sizes: &[usize],
        block_size: usize,
        max_model_len: usize,
        scratch_block: u32,
    ) -> Self {
        let mut sizes: Vec<usize> = sizes.iter().copied().filter(|&s| s > 0).collect();
        sizes.sort_unstable();
        sizes.dedup();
        Self {
            sizes,
            block_size,
            max_blocks: max_model_len.div_ceil(block_size.max(1)).max(1),
            scratch_block,
        }
    }

    /// The captured batch sizes, ascending.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// Width of the graphs' block tables.
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// The graph size `batch` runs in, or `None` when it does not run as a graph: it holds
    /// anything but single-token decodes with one logits row each, an adapter, a
    /// data-parallel split, a context past the tables, or more sequences than the largest
    /// size.
    pub fn bucket(&self, batch: &ForwardBatch) -> Option<usize> {
        let n = batch.sequences.len();
        let decodes_only = batch.num_tokens == n
            && batch.sequences.iter().all(|s| {
                s.query_len == 1 && s.context_len.div_ceil(self.block_size) <= self.max_blocks
            })
            && batch.logits_per_sequence.iter().all(|&l| l == 1);
        if n == 0
            || !decodes_only
            || !batch.lora.is_empty()
            || batch.data_parallel.is_some()
            || batch.block_size != self.block_size
        {
            return None;
        }
        self.sizes.iter().copied().find(|&s| s >= n)
    }

    /// The placeholder sequences a graph of `bucket` rows is captured over.
    pub fn placeholders<'a>(
        &self,
        bucket: usize,
        scratch_table: &'a [u32; 1],
    ) -> Vec<SequenceInput<'a>> {
        vec![SequenceInput::placeholder(scratch_table); bucket]
    }

    /// `batch`'s inputs (a step [`Self::bucket`] put in `bucket`) padded to `bucket` rows with
    /// placeholders, as the graph's buffers hold them.
    pub fn step_inputs(&self, batch: &ForwardBatch, bucket: usize) -> StepInputs {
        let needed = batch
            .sequences
            .iter()
            .map(|s| s.context_len.div_ceil(self.block_size))
            .max()
            .unwrap_or(1);
        self.inputs_with_width(batch, bucket, needed.clamp(1, self.max_blocks))
    }

    /// [`Self::step_inputs`] with tables `w` columns wide.
    fn inputs_with_width(&self, batch: &ForwardBatch, bucket: usize, w: usize) -> StepInputs {
        let n = batch.sequences.len();
        let pad = bucket.saturating_sub(n);
        let (tokens, positions, slots) = batch.host_inputs();
        let scratch_slot = self.scratch_block * self.block_size as u32;
        let mut ints = Vec::with_capacity(3 * bucket);
        for (run, filler) in [(tokens, 0), (positions, 0), (slots, scratch_slot)] {
            ints.extend_from_slice(run);
            ints.extend(std::iter::repeat_n(filler, pad));
        }
        let mut block_tables = vec![0u32; bucket * w];
        let mut token_ctx = Vec::with_capacity(bucket);
        for (s, seq) in batch.sequences.iter().enumerate() {
            seq.write_block_table(&mut block_tables[s * w..(s + 1) * w]);
            token_ctx.push(seq.context_len as u32);
        }
        for s in n..bucket {
            block_tables[s * w] = self.scratch_block;
            token_ctx.push(1);
        }
        StepInputs {
            ints,
            block_tables,
            table_width: w,
            token_seq: (0..bucket as u32).collect(),
            token_ctx,
        }
    }
}

/// Largest total variation distance between a graph's and the eager forward's next-token
/// distributions, on any row, that the first replay of a graph may show: bf16 noise between
/// differently tiled GEMMs stays far below it; a graph that froze part of its capture's step
/// does not.
pub const MAX_CHECK_DISTANCE: f32 = 0.05;

/// The largest total variation distance between the softmaxes of `a` and `b` (`[rows, vocab]`
/// logits), row by row.
pub fn distribution_distance(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> candle_core::Result<f32> {
    if a.dims() != b.dims() {
        candle_core::bail!(
            "comparing logits of shapes {:?} and {:?}",
            a.dims(),
            b.dims()
        );
    }
    let p = candle_nn::ops::softmax_last_dim(&a.to_dtype(candle_core::DType::F32)?)?;
    let q = candle_nn::ops::softmax_last_dim(&b.to_dtype(candle_core::DType::F32)?)?;
    ((p - q)?.abs()?.sum(1)? * 0.5)?.max(0)?.to_scalar::<f32>()
}

#[cfg(feature = "cuda")]
pub use device::DecodeGraphs;

#[cfg(feature = "cuda")]
mod device {
    use std::collections::hash_map::Entry;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use candle_core::cuda_backend::cudarc::driver::sys::{
        CUgraphInstantiate_flags, CUstreamCaptureMode,
    };
    use candle_core::cuda_backend::cudarc::driver::{CudaContext, CudaGraph, CudaSlice};
    use candle_core::{CudaDevice, DType, Device, Tensor};
    use ember_core::Result;
    use ember_kernels::cuda::DevicePagedBatch;
    use ember_kernels::paged_attention::PagedAttentionBatch;

    use super::{GraphPlan, StepInputs, MAX_CHECK_DISTANCE};
    use crate::step::batch::ForwardBatch;
    use crate::step::metadata::MlaDecodeBatch;

    /// A model's decode graphs on one GPU: each size captured by [`DecodeGraphs::capture_all`]
    /// (the engine calls it as its thread starts), or else by the first step of its size.
    pub struct DecodeGraphs {
        plan: GraphPlan,
        device: CudaDevice,
        /// Blocks of the KV cache, the scratch block included: what the graphs' metadata is
        /// bound to.
        cache_blocks: usize,
        state: Mutex<State>,
        /// Steps served by a replay.
        replays: std::sync::atomic::AtomicU64,
    }

    #[derive(Default)]
    struct State {
        graphs: HashMap<usize, Captured>,
        /// Why graphs are off, once a capture, a replay or a check failed.
        off: Option<String>,
    }

    /// One size's graph and what it reads and writes.
    struct Captured {
        graph: CudaGraph,
        /// The placeholder step it was captured over; its inputs are rewritten per replay.
        batch: ForwardBatch,
        /// Its paged metadata, which every attention layer of the graph reads.
        meta: Arc<DevicePagedBatch>,
        /// `[bucket, vocab]` f32 logits, written by each replay.
        logits: Tensor,
        /// How many of the rows are the step's (the rest skip the routed experts).
        live: Arc<CudaSlice<u32>>,
        /// Whether a replay has been checked against the eager forward.
        checked: bool,
    }

    // SAFETY: a `CudaGraph` holds raw driver handles, which CUDA lets any thread use as long as
    // calls on one graph are serialized; every use of these goes through `DecodeGraphs`'s mutex.
    unsafe impl Send for Captured {}

    /// Turns cudarc's per-buffer event tracking off while a graph is captured (its waits on
    /// events recorded outside the capture would fail it; one stream orders everything), and
    /// back on after.
    struct EventTrackingOff(Arc<CudaContext>, bool);

    impl EventTrackingOff {
        fn new(ctx: &Arc<CudaContext>) -> Self {
            let was = ctx.is_event_tracking();
            // SAFETY: every launch and copy of the capture goes on the one stream it captures;
            // nothing allocated during it outlives it, and tracking resumes after.
            unsafe { ctx.disable_event_tracking() };
            Self(ctx.clone(), was)
        }
    }

    impl Drop for EventTrackingOff {
        fn drop(&mut self) {
            if self.1 {
                // SAFETY: restores the context's setting from before the capture.
                unsafe { self.0.enable_event_tracking() };
            }
        }
    }

    fn wrap(e: impl std::fmt::Display) -> candle_core::Error {
        candle_core::Error::msg(e.to_string())
    }

    impl DecodeGraphs {
        /// Graphs of `plan` for a model on `device` over a cache of `cache_blocks` blocks (the
        /// scratch block included); `None` off a GPU or without sizes.
        pub fn new(plan: GraphPlan, device: &Device, cache_blocks: usize) -> Option<Self> {
            let Device::Cuda(gpu) = device else {
                return None;
            };
            (!plan.sizes().is_empty()).then(|| Self {
                plan,
                device: gpu.clone(),
                cache_blocks,
                state: Default::default(),
                replays: Default::default(),
            })
        }

        /// The sizes captured so far, ascending.
        pub fn captured(&self) -> Vec<usize> {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut sizes: Vec<usize> = state.graphs.keys().copied().collect();
            sizes.sort_unstable();
            sizes
        }

        /// Steps these graphs have served (replays trusted after their check).
        pub fn replays(&self) -> u64 {
            self.replays.load(std::sync::atomic::Ordering::Relaxed)
        }

        /// The logits of `batch` (`[sequences, vocab]` f32) from a graph replay, when `batch`
        /// runs as one; `None` when it runs eagerly (not a graph step, or graphs are off).
        /// `forward` is the model's eager forward: captured once per size and run to check a
        /// size's first replay. The tensor is valid until the next call. Every call, and
        /// [`Self::capture_all`], from one thread: candle keeps the small uploads a capture
        /// reads in the capturing thread's cache.
        pub fn run(
            &self,
            batch: &ForwardBatch,
            forward: &dyn Fn(&ForwardBatch) -> Result<Tensor>,
        ) -> Result<Option<Tensor>> {
            let Some(bucket) = self.plan.bucket(batch) else {
                return Ok(None);
            };
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if !self.ensure_captured(&mut state, bucket, forward) {
                return Ok(None);
            }
            let kernels = crate::device::kernels::kernels(&self.device)
                .map_err(|e| ember_core::EmberError::Tensor(e.to_string()))?;
            let inputs = self.plan.step_inputs(batch, bucket);
            let n = batch.sequences.len();
            let captured = state.graphs.get_mut(&bucket).expect("captured above");
            let replayed = captured.replay(&kernels, &inputs, n);
            let logits = match replayed {
                Ok(logits) => logits,
                Err(e) => {
                    return Ok(self.turn_off(
                        &mut state,
                        format!("replaying the graph of {bucket} rows failed: {e}"),
                    ));
                }
            };
            if captured.checked {
                self.replays
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(Some(logits));
            }
            // The first replay of this size: the eager forward of the same step (which writes
            // the same keys and values again) is the reference, and what the step returns.
            let graph_logits = logits
                .copy()
                .map_err(|e| ember_core::EmberError::Tensor(e.to_string()))?;
            let eager = forward(batch)?;
            match super::distribution_distance(&graph_logits, &eager) {
                Ok(d) if d <= MAX_CHECK_DISTANCE => {
                    tracing::info!(
                        rows = bucket,
                        distance = d,
                        "the CUDA graph of {bucket} rows agrees with the eager forward"
                    );
                    captured.checked = true;
                }
                Ok(d) => {
                    self.turn_off(
                        &mut state,
                        format!(
                            "the graph of {bucket} rows disagrees with the eager forward: its \
                             next-token distributions are {d} apart (total variation; at most \
                             {MAX_CHECK_DISTANCE} allowed)"
                        ),
                    );
                }
                Err(e) => {
                    self.turn_off(
                        &mut state,
                        format!("checking the graph of {bucket} rows failed: {e}"),
                    );
                }
            }
            Ok(Some(eager))
        }

        /// Captures every size of the plan now, smallest first (as vLLM does at start, so no
        /// serving step waits for a capture); stops, with graphs off, at the first that fails.
        /// Returns the sizes captured.
        pub fn capture_all(&self, forward: &dyn Fn(&ForwardBatch) -> Result<Tensor>) -> Vec<usize> {
            let started = Instant::now();
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            for &bucket in self.plan.sizes() {
                if !self.ensure_captured(&mut state, bucket, forward) {
                    return Vec::new();
                }
            }
            drop(state);
            let sizes = self.captured();
            tracing::info!(
                ms = started.elapsed().as_millis() as u64,
                // Against the engine's step reserve, logged with the KV cache's size.
                graph_memory_mib = self.graph_memory_high() >> 20,
                "captured CUDA graphs for decode steps of {sizes:?} rows"
            );
            sizes
        }

        /// The most GPU memory the device's graphs have held at once (the driver's high-water
        /// mark of graph allocations), in bytes; 0 when the driver does not say.
        fn graph_memory_high(&self) -> u64 {
            use candle_core::cuda_backend::cudarc::driver::sys;
            let stream = self.device.cuda_stream();
            let mut value = 0u64;
            // SAFETY: the attribute is a u64 the driver writes into `value`.
            let result = unsafe {
                sys::cuDeviceGetGraphMemAttribute(
                    stream.context().cu_device(),
                    sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH,
                    (&mut value as *mut u64).cast(),
                )
            };
            if result == sys::CUresult::CUDA_SUCCESS {
                value
            } else {
                0
            }
        }

        /// Whether the graph of `bucket` rows is there to replay: captured before, or now;
        /// false when graphs are off (a failed capture turns them off).
        fn ensure_captured(
            &self,
            state: &mut State,
            bucket: usize,
            forward: &dyn Fn(&ForwardBatch) -> Result<Tensor>,
        ) -> bool {
            if state.off.is_some() {
                return false;
            }
            let Entry::Vacant(slot) = state.graphs.entry(bucket) else {
                return true;
            };
            let started = Instant::now();
            match self.capture(bucket, forward) {
                Ok(captured) => {
                    tracing::debug!(
                        rows = bucket,
                        ms = started.elapsed().as_millis() as u64,
                        "captured a CUDA graph for decode steps of {bucket} rows"
                    );
                    slot.insert(captured);
                    true
                }
                Err(e) => {
                    self.turn_off(
                        state,
                        format!("capturing a decode step of {bucket} rows failed: {e}"),
                    );
                    false
                }
            }
        }

        /// Turns graphs off for good, saying why; every step runs eagerly from now on.
        fn turn_off(&self, state: &mut State, why: String) -> Option<Tensor> {
            tracing::warn!("CUDA graphs off, decode steps run eagerly: {why}");
            state.graphs.clear();
            state.off = Some(why);
            None
        }

        /// Captures the forward of a step of `bucket` placeholder rows: run once eagerly (which
        /// loads what the forward loads the first time and fills candle's parameter cache),
        /// then recorded.
        fn capture(
            &self,
            bucket: usize,
            forward: &dyn Fn(&ForwardBatch) -> Result<Tensor>,
        ) -> candle_core::Result<Captured> {
            let plan = &self.plan;
            let device = Device::Cuda(self.device.clone());
            let scratch = [plan.scratch_block];
            let batch = ForwardBatch::new(
                &plan.placeholders(bucket, &scratch),
                plan.block_size,
                &device,
            )
            .map_err(wrap)?;
            let kernels = crate::device::kernels::kernels(&self.device)?;
            // The placeholders' tables, as wide as the graph's.
            let host = plan.inputs_with_width(&batch, bucket, plan.max_blocks);
            let meta = Arc::new(
                kernels
                    .upload_paged_batch_bounded(
                        &paged(&host),
                        plan.block_size,
                        plan.max_blocks,
                        self.cache_blocks,
                    )
                    .map_err(wrap)?,
            );
            batch
                .device_metadata
                .preset(&self.device, meta.clone(), plan.max_blocks);
            let decodes = MlaDecodeBatch::with_width(&batch, Some(plan.max_blocks))?;
            decodes.preset(&self.device, meta.clone());
            let _ = batch.mla_decodes.set(Arc::new(decodes));

            // No live rows while warming up: every row skips the experts, whose kernels load all
            // the same (and count no placeholder's expert).
            let live = Arc::new(kernels.stage(&[0u32]).map_err(wrap)?);
            batch.mode.set_live_rows(&live);
            let _cache = self.device.enable_cuda_graph_htod_cache();
            let warm = forward(&batch).map_err(wrap)?.to_dtype(DType::F32)?;
            let logits = Tensor::zeros(warm.dims(), DType::F32, &device)?;
            // The copy the capture ends with, once eagerly too: whatever it loads, it loads now.
            logits.slice_set(&warm, 0, 0)?;
            drop(warm);
            let stream = self.device.cuda_stream();
            stream.synchronize().map_err(wrap)?;
            let graph = {
                let _tracking = EventTrackingOff::new(stream.context());
                stream
                    .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(wrap)?;
                let recorded = {
                    let _capturing = batch.mode.capture();
                    forward(&batch)
                        .map_err(wrap)
                        .and_then(|out| logits.slice_set(&out.to_dtype(DType::F32)?, 0, 0))
                };
                // Always leaves capture mode, whatever the forward did.
                let ended = stream.end_capture(CUgraphInstantiate_flags(0));
                recorded?;
                ended
                    .map_err(wrap)?
                    .ok_or_else(|| candle_core::Error::msg("the capture recorded no graph"))?
            };
            graph.upload().map_err(wrap)?;
            Ok(Captured {
                graph,
                batch,
                meta,
                logits,
                live,
                checked: false,
            })
        }
    }

    impl Captured {
        /// Rewrites the graph's inputs with `inputs`, replays it, and returns its logits'
        /// first `n` rows.
        fn replay(
            &self,
            kernels: &ember_kernels::cuda::CudaKernels,
            inputs: &StepInputs,
            n: usize,
        ) -> candle_core::Result<Tensor> {
            self.batch.rewrite_inputs(kernels, &inputs.ints)?;
            kernels
                .rewrite_paged_batch(&self.meta, &paged(inputs), inputs.table_width)
                .map_err(wrap)?;
            kernels.write_at(&self.live, 0, &[n as u32]).map_err(wrap)?;
            self.graph.launch().map_err(wrap)?;
            self.logits.narrow(0, 0, n)
        }
    }

    /// `inputs`' paged metadata as the kernels take it.
    fn paged(inputs: &StepInputs) -> PagedAttentionBatch<'_> {
        PagedAttentionBatch {
            block_tables: &inputs.block_tables,
            token_seq: &inputs.token_seq,
            token_ctx: &inputs.token_ctx,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn default_sizes_stop_at_the_batch_cap() {
        assert_eq!(default_sizes(1), vec![1]);
        assert_eq!(default_sizes(10), vec![1, 2, 4, 8, 10]);
        assert_eq!(default_sizes(256), DEFAULT_SIZES.to_vec());
        assert_eq!(default_sizes(1024), DEFAULT_SIZES.to_vec());
    }

    fn decodes<'a>(
        tokens: &'a [[u32; 1]],
        tables: &'a [Vec<u32>],
        computed: &[usize],
    ) -> Vec<SequenceInput<'a>> {
        tokens
            .iter()
            .zip(tables)
            .zip(computed)
            .map(|((t, table), &num_computed)| SequenceInput {
                token_ids: t,
                num_computed,
                block_table: table,
                all_logits: false,
                adapter: None,
            })
            .collect()
    }

    #[test]
    fn only_plain_decode_steps_run_as_graphs() {
        let plan = GraphPlan::new(&[4, 1, 2, 0, 2], 4, 16, 9);
        assert_eq!(plan.sizes(), &[1, 2, 4]);
        assert_eq!(plan.max_blocks(), 4);
        let tokens = [[5], [6], [7]];
        let tables = vec![vec![0, 1], vec![2], vec![3, 4, 5, 6]];
        let batch =
            |inputs: &[SequenceInput<'_>]| ForwardBatch::new(inputs, 4, &Device::Cpu).unwrap();
        let three = decodes(&tokens, &tables, &[5, 2, 12]);
        assert_eq!(plan.bucket(&batch(&three)), Some(4));
        assert_eq!(plan.bucket(&batch(&three[..2])), Some(2));
        assert_eq!(plan.bucket(&batch(&three[..1])), Some(1));
        // A prefill chunk, a prompt-logprobs decode, a context past the tables: eager.
        let prompt = [1u32, 2];
        let mut chunk = three.clone();
        chunk[1].token_ids = &prompt;
        assert_eq!(plan.bucket(&batch(&chunk)), None);
        let mut all_logits = three.clone();
        all_logits[0].all_logits = true;
        assert_eq!(
            plan.bucket(&batch(&all_logits)),
            Some(4),
            "one token, one row"
        );
        let long_tables = vec![vec![0, 1, 2, 3, 4]];
        let long = decodes(&tokens[..1], &long_tables, &[16]);
        assert_eq!(
            plan.bucket(&batch(&long)),
            None,
            "17 tokens need 5 blocks of 4"
        );
        // More sequences than the largest graph.
        let plan = GraphPlan::new(&[2], 4, 16, 9);
        assert_eq!(plan.bucket(&batch(&three)), None);
    }

    /// The inputs a graph replays with are those of the step padded with placeholders, built
    /// the eager way: the same token ids, positions, slots, tables and context lengths.
    #[test]
    fn step_inputs_are_the_padded_step() {
        let (block_size, scratch) = (4usize, 9u32);
        let plan = GraphPlan::new(&[8], block_size, 32, scratch);
        let tokens = [[5], [6], [7]];
        let tables = vec![vec![0, 1], vec![2], vec![3, 4, 5, 6]];
        let real = decodes(&tokens, &tables, &[5, 2, 12]);
        let step = ForwardBatch::new(&real, block_size, &Device::Cpu).unwrap();
        let inputs = plan.step_inputs(&step, 8);

        let scratch_table = [scratch];
        let mut padded = real.clone();
        padded.extend(plan.placeholders(5, &scratch_table));
        let eager = ForwardBatch::new(&padded, block_size, &Device::Cpu).unwrap();
        let ints: Vec<u32> = [&eager.token_ids, &eager.positions, &eager.slot_mapping]
            .iter()
            .flat_map(|t| t.to_vec1::<u32>().unwrap())
            .collect();
        assert_eq!(inputs.ints, ints);
        assert_eq!(&inputs.ints[8..11], &[5, 2, 12]);
        assert_eq!(inputs.ints[3 * 8 - 1], scratch * block_size as u32);
        // The longest context (13 tokens, blocks of 4) needs 4 of the graph's 8 columns.
        let w = inputs.table_width;
        assert_eq!((w, plan.max_blocks()), (4, 8));
        assert_eq!(inputs.block_tables.len(), 8 * w);
        for (s, seq) in eager.sequences.iter().enumerate() {
            let mut row = vec![0u32; w];
            seq.write_block_table(&mut row);
            assert_eq!(
                &inputs.block_tables[s * w..(s + 1) * w],
                &row[..],
                "row {s}"
            );
            assert_eq!(inputs.token_ctx[s] as usize, seq.context_len, "row {s}");
            assert_eq!(inputs.token_seq[s] as usize, s);
        }
        assert_eq!(&inputs.block_tables[2 * w..2 * w + 4], &[3, 4, 5, 6]);
        assert_eq!(inputs.block_tables[7 * w], scratch);
    }

    #[test]
    fn distribution_distance_is_total_variation() {
        let a = candle_core::Tensor::new(&[[0f32, 0.0], [10.0, -10.0]], &Device::Cpu).unwrap();
        let b = candle_core::Tensor::new(&[[0f32, 0.0], [-10.0, 10.0]], &Device::Cpu).unwrap();
        assert_eq!(distribution_distance(&a, &a).unwrap(), 0.0);
        let d = distribution_distance(&a, &b).unwrap();
        assert!((d - 1.0).abs() < 1e-6, "{d}");
        let c = candle_core::Tensor::new(&[[0f32, 0.0, 0.0]], &Device::Cpu).unwrap();
        assert!(distribution_distance(&a, &c).is_err());
    }
}
