//! The flattened batch of one forward step: the new tokens of every scheduled sequence laid
//! end to end (prefill chunks and decode tokens alike), with the metadata attention needs to
//! read and write the paged KV cache. Built once per step and shared by every layer.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use ember_core::{EmberError, Result};

use crate::device::kernels::upload;
use crate::lora::{LoraAdapter, LoraRows, NO_ADAPTER};
use crate::step::mode::StepMode;
use crate::TensorResult;

/// One sequence's share of a step, as the scheduler describes it.
#[derive(Debug, Clone)]
pub struct SequenceInput<'a> {
    /// Tokens to run this step (a prompt chunk, or the one token being decoded).
    pub token_ids: &'a [u32],
    /// Tokens of this sequence already in the KV cache (the position of `token_ids[0]`).
    pub num_computed: usize,
    /// Physical KV block of each logical block; must cover `num_computed + token_ids.len()`.
    pub block_table: &'a [u32],
    /// Compute logits for every new token (prompt logprobs), not only the last.
    pub all_logits: bool,
    /// The LoRA adapter the sequence runs with; `None` for the base model.
    pub adapter: Option<&'a Arc<LoraAdapter>>,
}

impl<'a> SequenceInput<'a> {
    /// A stand-in sequence of one token at position 0 whose K/V goes to the one block of
    /// `scratch_table`, a block the scheduler never hands out: the rows that pad a step (an
    /// idle data-parallel rank's, a CUDA graph's spare rows) write there and are never read.
    pub fn placeholder(scratch_table: &'a [u32; 1]) -> Self {
        Self {
            token_ids: &[0],
            num_computed: 0,
            block_table: scratch_table,
            all_logits: false,
            adapter: None,
        }
    }
}

/// Per-sequence attention metadata, in device tensors ready for every layer.
#[derive(Debug)]
pub struct SequenceAttention {
    /// Row of the sequence's first new token in the flattened batch.
    pub query_start: usize,
    /// Number of new tokens.
    pub query_len: usize,
    /// The step's contexts, and this sequence's index among them (see
    /// [`SequenceAttention::block_table`], [`SequenceAttention::context_slots`] and
    /// [`SequenceAttention::causal_mask`]).
    contexts: (Arc<StepContexts>, usize),
    /// Tokens attended to: already computed plus new.
    pub context_len: usize,
    /// The sequence's LoRA adapter, for projections over its context (MLA's `kv_b_proj`).
    pub adapter: Option<Arc<LoraAdapter>>,
}

/// A step's contexts: each sequence's block table (the blocks covering its context), which
/// ember's kernels read; and, each built once for the step by the first layer that asks, every
/// context's cache slots position by position, on the host (for the CPU's kernel) and on the
/// device (for the tensor paths' gathers), and the additive causal masks of the sequences with
/// more than one new token (for the tensor paths). A step of 256 decodes over 4096 tokens has
/// 65,536 table entries but a million slots; a 2048-token chunk's mask is 16 MB.
#[derive(Debug)]
struct StepContexts {
    block_size: usize,
    /// Per sequence: its block table, context length and new tokens.
    seqs: Vec<ContextShape>,
    /// Where each sequence's slots start among all of them, and how many there are.
    offsets: Vec<usize>,
    total: usize,
    /// Where each sequence's mask starts among all of them (one with a single new token has
    /// none), and how many floats they take.
    mask_offsets: Vec<Option<usize>>,
    masks_len: usize,
    device: Device,
    host: std::sync::OnceLock<Vec<u32>>,
    uploaded: std::sync::OnceLock<Tensor>,
    masks: std::sync::OnceLock<Tensor>,
}

/// A sequence's block table, context length and new tokens.
#[derive(Debug, Clone)]
struct ContextShape {
    table: Vec<u32>,
    context_len: usize,
    query_len: usize,
}

impl StepContexts {
    fn new(block_size: usize, seqs: Vec<ContextShape>, device: &Device) -> Self {
        let (mut offsets, mut mask_offsets) = (Vec::new(), Vec::new());
        let (mut total, mut masks_len) = (0, 0);
        for seq in &seqs {
            offsets.push(total);
            total += seq.context_len;
            mask_offsets.push((seq.query_len > 1).then_some(masks_len));
            if seq.query_len > 1 {
                masks_len += seq.query_len * seq.context_len;
            }
        }
        Self {
            block_size,
            seqs,
            offsets,
            total,
            mask_offsets,
            masks_len,
            device: device.clone(),
            host: Default::default(),
            uploaded: Default::default(),
            masks: Default::default(),
        }
    }

    /// Every context's slots, end to end.
    fn host(&self) -> &[u32] {
        self.host.get_or_init(|| {
            let bs = self.block_size as u32;
            let mut slots = Vec::with_capacity(self.total);
            for seq in &self.seqs {
                slots.extend(
                    seq.table
                        .iter()
                        .flat_map(|&block| (0..bs).map(move |o| block * bs + o))
                        .take(seq.context_len),
                );
            }
            slots
        })
    }

    /// The same slots on the device.
    fn uploaded(&self) -> TensorResult<&Tensor> {
        if let Some(t) = self.uploaded.get() {
            return Ok(t);
        }
        let t = upload(self.host().to_vec(), &self.device)?;
        Ok(self.uploaded.get_or_init(|| t))
    }

    /// The causal masks, end to end, on the device.
    fn masks(&self) -> TensorResult<&Tensor> {
        if let Some(t) = self.masks.get() {
            return Ok(t);
        }
        let mut masks = vec![0f32; self.masks_len];
        for (seq, start) in self.seqs.iter().zip(&self.mask_offsets) {
            let Some(start) = *start else { continue };
            let (q, ctx) = (seq.query_len, seq.context_len);
            let mask = &mut masks[start..start + q * ctx];
            for i in 0..q {
                // Token i sees the cached positions and the new ones up to itself.
                mask[i * ctx + ctx - q + i + 1..(i + 1) * ctx].fill(f32::NEG_INFINITY);
            }
        }
        let t = upload(masks, &self.device)?;
        Ok(self.masks.get_or_init(|| t))
    }

    /// The same contexts on `device`, built there when asked.
    fn on(&self, device: &Device) -> Self {
        Self::new(self.block_size, self.seqs.clone(), device)
    }
}

impl SequenceAttention {
    /// The cache block of each of the context's blocks, in order.
    pub fn block_table(&self) -> &[u32] {
        let (contexts, i) = &self.contexts;
        &contexts.seqs[*i].table
    }

    /// Writes the sequence's block table into `row` (`row` may be longer, and the rest is left
    /// as it is).
    pub fn write_block_table(&self, row: &mut [u32]) {
        let table = self.block_table();
        let n = table.len().min(row.len());
        row[..n].copy_from_slice(&table[..n]);
    }

    /// Cache slots of all `context_len` tokens the new tokens attend to, in position order, on
    /// the host: for kernels that walk the cache themselves.
    pub fn context_slots_host(&self) -> &[u32] {
        let (contexts, i) = &self.contexts;
        &contexts.host()[contexts.offsets[*i]..][..self.context_len]
    }

    /// The same slots on the step's device (`[context_len]` u32), for gathers.
    pub fn context_slots(&self) -> TensorResult {
        let (contexts, i) = &self.contexts;
        contexts
            .uploaded()?
            .narrow(0, contexts.offsets[*i], self.context_len)
    }
}

/// Everything one forward step needs besides the weights and the cache.
#[derive(Debug)]
pub struct ForwardBatch {
    /// `[num_tokens]` u32 token ids.
    pub token_ids: Tensor,
    /// `[num_tokens]` u32 positions.
    pub positions: Tensor,
    /// `[num_tokens]` u32 cache slot each new token's K/V is written to.
    pub slot_mapping: Tensor,
    pub sequences: Vec<SequenceAttention>,
    /// `[num_logits]` u32 rows of the batch whose logits are computed, in sequence order.
    pub logits_rows: Tensor,
    /// For each sequence, how many logits rows it owns (1, or `query_len` with `all_logits`).
    pub logits_per_sequence: Vec<usize>,
    pub num_tokens: usize,
    /// The LoRA adapter of each token row (empty when the whole step runs the base model).
    pub lora: LoraRows,
    /// Tokens per cache block (slot = block · block_size + offset).
    pub block_size: usize,
    /// The step's decodes for MLA's kernel, built by the first layer that asks.
    pub(crate) mla_decodes: std::sync::OnceLock<Arc<crate::step::metadata::MlaDecodeBatch>>,
    /// The paged kernels' metadata on the host, built by the first layer that asks.
    host_paged: std::sync::OnceLock<crate::step::metadata::HostPagedBatch>,
    /// What ember's CUDA kernels copy to the GPU once per step for every layer to read.
    #[cfg(feature = "cuda")]
    pub(crate) device_metadata: crate::step::metadata::StepMetadata,
    /// Under `--data-parallel-size`, each rank's share of the step (see
    /// [`ForwardBatch::split_data_parallel`]); `None` for every other model.
    pub data_parallel: Option<DataParallelSplit>,
    /// Whether the step is a placeholder or being captured into a CUDA graph.
    pub mode: StepMode,
    /// The step's token ids, positions and slots on the host, in that order (`num_tokens` each).
    host_inputs: Arc<[u32]>,
    /// Every u32 of the step, as uploaded: the tensors above are views.
    ints: Tensor,
    /// Every sequence's context (see [`StepContexts`]).
    contexts: Arc<StepContexts>,
    layout: StepLayout,
}

/// A step of a data-parallel model split by rank: each rank runs its own sequences over its own
/// KV cache, and a rank with none runs one scratch token so it still meets the others in the
/// experts' all-to-alls (without expert parallelism it skips the step instead).
#[derive(Debug)]
pub struct DataParallelSplit {
    /// Rank r's batch, on its device.
    pub parts: Vec<ForwardBatch>,
    /// Whether rank r's batch is the scratch token only (its output is dropped).
    pub idle: Vec<bool>,
    /// For each sequence of the step in order, its rank and its index in that rank's part.
    pub placement: Vec<(usize, usize)>,
}

/// What a step's batch keeps of the host's view: its contexts, each sequence's adapter, and the
/// token ids, positions and slots.
type StepHost = (Arc<StepContexts>, Vec<Option<Arc<LoraAdapter>>>, Arc<[u32]>);

/// Where a step's fields sit in its uploaded tensor, so a copy on another device can take
/// the same views.
#[derive(Debug, Clone)]
struct StepLayout {
    tokens: usize,
    logits: usize,
    sequences: Vec<SequenceLayout>,
}

#[derive(Debug, Clone)]
struct SequenceLayout {
    query_start: usize,
    query_len: usize,
    context_len: usize,
}

impl ForwardBatch {
    /// The paged kernels' metadata of the step on the host, made once for every layer.
    pub fn host_paged(&self) -> &crate::step::metadata::HostPagedBatch {
        self.host_paged
            .get_or_init(|| crate::step::metadata::host_metadata(self))
    }

    /// The step's single-token decodes and their metadata for MLA's kernel, made once.
    pub fn mla_decodes(&self) -> TensorResult<Arc<crate::step::metadata::MlaDecodeBatch>> {
        if let Some(d) = self.mla_decodes.get() {
            return Ok(d.clone());
        }
        self.mode
            .refuse("building MLA's decode metadata on the host")?;
        let d = Arc::new(crate::step::metadata::MlaDecodeBatch::new(self)?);
        Ok(self.mla_decodes.get_or_init(|| d).clone())
    }
}

impl SequenceAttention {
    /// Additive causal mask `[query_len, context_len]` (f32: 0 where visible, -inf after each
    /// token's own position); `None` for a single query token.
    pub fn causal_mask(&self) -> TensorResult<Option<Tensor>> {
        let (contexts, i) = &self.contexts;
        let Some(start) = contexts.mask_offsets[*i] else {
            return Ok(None);
        };
        contexts
            .masks()?
            .narrow(0, start, self.query_len * self.context_len)?
            .reshape((self.query_len, self.context_len))
            .map(Some)
    }

    /// `softmax(scores × scale + causal mask)` over the context, computed in f32 and returned in
    /// `dtype`; `scores` is `[..., query_len, context_len]`.
    pub fn masked_softmax(
        &self,
        scores: &Tensor,
        scale: f64,
        dtype: DType,
    ) -> candle_core::Result<Tensor> {
        let scores = (scores * scale)?.to_dtype(DType::F32)?;
        let scores = match self.causal_mask()? {
            Some(mask) => scores.broadcast_add(&mask)?,
            None => scores,
        };
        candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)
    }
}

fn tensor_err(e: candle_core::Error) -> EmberError {
    EmberError::Tensor(e.to_string())
}

/// The cache slot of position `pos` under `block_table`.
pub fn slot_of(block_table: &[u32], block_size: usize, pos: usize) -> Result<u32> {
    let block = block_table.get(pos / block_size).ok_or_else(|| {
        EmberError::InvalidRequest(format!(
            "block table of {} blocks does not cover position {pos}",
            block_table.len()
        ))
    })?;
    Ok(*block * block_size as u32 + (pos % block_size) as u32)
}

impl ForwardBatch {
    /// Flattens the sequences of one step. Sequences with no new tokens are rejected.
    ///
    /// The step's metadata reaches the device in one copy, whatever the batch: its token ids,
    /// positions, slots and logits rows in one tensor, which the fields are views of. The
    /// contexts' slots and the causal masks, which only some attention paths read, are built and
    /// copied when first asked for ([`SequenceAttention::context_slots`],
    /// [`SequenceAttention::causal_mask`]).
    pub fn new(inputs: &[SequenceInput<'_>], block_size: usize, device: &Device) -> Result<Self> {
        let mut token_ids = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut logits_rows = Vec::new();
        let mut logits_per_sequence = Vec::with_capacity(inputs.len());
        let mut adapters: Vec<Arc<LoraAdapter>> = Vec::new();
        let mut row_adapter: Vec<u16> = Vec::new();
        // Every sequence's block table, context and new tokens.
        let mut contexts: Vec<ContextShape> = Vec::with_capacity(inputs.len());
        // Per sequence: query start and length, context length.
        let mut layout: Vec<(usize, usize, usize)> = Vec::with_capacity(inputs.len());
        for input in inputs {
            let query_len = input.token_ids.len();
            if query_len == 0 {
                return Err(EmberError::InvalidRequest(
                    "a scheduled sequence has no tokens to run".into(),
                ));
            }
            let query_start = token_ids.len();
            let context_len = input.num_computed + query_len;
            token_ids.extend_from_slice(input.token_ids);
            let adapter_index = match input.adapter {
                None => NO_ADAPTER,
                Some(adapter) => match adapters.iter().position(|a| a.id() == adapter.id()) {
                    Some(i) => i as u16,
                    None if adapters.len() + 1 >= NO_ADAPTER as usize => {
                        return Err(EmberError::InvalidRequest(format!(
                            "a step cannot mix more than {} LoRA adapters",
                            NO_ADAPTER - 1
                        )));
                    }
                    None => {
                        adapters.push(adapter.clone());
                        (adapters.len() - 1) as u16
                    }
                },
            };
            row_adapter.resize(row_adapter.len() + query_len, adapter_index);
            for pos in input.num_computed..context_len {
                positions.push(pos as u32);
                slots.push(slot_of(input.block_table, block_size, pos)?);
            }
            // The table must cover the context (the new tokens' slots checked it for them).
            slot_of(input.block_table, block_size, context_len - 1)?;
            contexts.push(ContextShape {
                table: input.block_table[..context_len.div_ceil(block_size)].to_vec(),
                context_len,
                query_len,
            });
            let rows = if input.all_logits { query_len } else { 1 };
            let first_row = query_start + query_len - rows;
            logits_rows.extend((first_row..query_start + query_len).map(|r| r as u32));
            logits_per_sequence.push(rows);
            layout.push((query_start, query_len, context_len));
        }
        let (t, l) = (token_ids.len(), logits_rows.len());
        let mut ints = token_ids;
        ints.extend_from_slice(&positions);
        ints.extend_from_slice(&slots);
        ints.extend_from_slice(&logits_rows);
        let host_inputs: Arc<[u32]> = ints[..3 * t].into();
        let ints = upload(ints, device).map_err(tensor_err)?;
        let contexts = Arc::new(StepContexts::new(block_size, contexts, device));
        let mut sequences = Vec::with_capacity(layout.len());
        let mut adapters_of = Vec::with_capacity(layout.len());
        for ((query_start, query_len, context_len), input) in layout.into_iter().zip(inputs) {
            sequences.push(SequenceLayout {
                query_start,
                query_len,
                context_len,
            });
            adapters_of.push(input.adapter.cloned());
        }
        let lora = if adapters.is_empty() {
            LoraRows::none()
        } else {
            LoraRows::new(adapters, row_adapter, device).map_err(tensor_err)?
        };
        let layout = StepLayout {
            tokens: t,
            logits: l,
            sequences,
        };
        Self::assemble(
            ints,
            layout,
            (contexts, adapters_of, host_inputs),
            logits_per_sequence,
            lora,
            block_size,
        )
    }

    /// The step of a data-parallel model: the whole batch on `devices[0]` (what the runner reads
    /// logits rows by), and each rank's sequences (`ranks[i]` is input i's) as its own batch on
    /// `devices[rank]`. A rank with no sequence this step gets one token written to
    /// `scratch_block`, a cache block the scheduler never hands out.
    pub fn split_data_parallel(
        inputs: &[SequenceInput<'_>],
        ranks: &[usize],
        block_size: usize,
        devices: &[Device],
        scratch_block: u32,
    ) -> Result<Self> {
        if ranks.len() != inputs.len() || ranks.iter().any(|&r| r >= devices.len()) {
            return Err(EmberError::Tensor(format!(
                "a data-parallel step of {} sequences has ranks {ranks:?} over {} devices",
                inputs.len(),
                devices.len()
            )));
        }
        let mut whole = Self::new(inputs, block_size, &devices[0])?;
        let scratch_table = [scratch_block];
        let mut parts = Vec::with_capacity(devices.len());
        let mut idle = Vec::with_capacity(devices.len());
        let mut placement = vec![(0, 0); inputs.len()];
        for (rank, device) in devices.iter().enumerate() {
            let mut mine = Vec::new();
            for (i, input) in inputs.iter().enumerate() {
                if ranks[i] == rank {
                    placement[i] = (rank, mine.len());
                    mine.push(input.clone());
                }
            }
            idle.push(mine.is_empty());
            if mine.is_empty() {
                mine.push(SequenceInput::placeholder(&scratch_table));
            }
            let mut part = Self::new(&mine, block_size, device)?;
            part.mode = StepMode::placeholder(idle[rank]);
            if !whole.lora.is_empty() {
                // Each of the part's rows' index in the whole step, for expert-parallel rows
                // that carry it to another rank.
                let mut step_rows = Vec::with_capacity(part.num_tokens);
                if !idle[rank] {
                    for (i, seq) in whole.sequences.iter().enumerate() {
                        if ranks[i] == rank {
                            let start = seq.query_start as u32;
                            step_rows.extend(start..start + seq.query_len as u32);
                        }
                    }
                } else {
                    step_rows.push(0);
                }
                part.lora = std::mem::take(&mut part.lora).within_step(&whole.lora, step_rows);
            }
            parts.push(part);
        }
        whole.data_parallel = Some(DataParallelSplit {
            parts,
            idle,
            placement,
        });
        Ok(whole)
    }

    /// The same step on `device`: its tensor copied there and the same views taken, for a rank
    /// of a sharded model on another GPU.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let ints = self.ints.to_device(device).map_err(tensor_err)?;
        let contexts = Arc::new(self.contexts.on(device));
        let adapters_of = self.sequences.iter().map(|s| s.adapter.clone()).collect();
        let lora = self.lora.to_device(device).map_err(tensor_err)?;
        let mut batch = Self::assemble(
            ints,
            self.layout.clone(),
            (contexts, adapters_of, self.host_inputs.clone()),
            self.logits_per_sequence.clone(),
            lora,
            self.block_size,
        )?;
        batch.mode = StepMode::placeholder(self.mode.placeholder);
        Ok(batch)
    }

    /// The batch over its uploaded tensors: each field a view at its place in `layout`.
    fn assemble(
        ints: Tensor,
        layout: StepLayout,
        (contexts, adapters_of, host_inputs): StepHost,
        logits_per_sequence: Vec<usize>,
        lora: LoraRows,
        block_size: usize,
    ) -> Result<Self> {
        let view = |start: usize, len: usize| ints.narrow(0, start, len).map_err(tensor_err);
        let mut sequences = Vec::with_capacity(layout.sequences.len());
        for (i, (seq, adapter)) in layout.sequences.iter().zip(adapters_of).enumerate() {
            sequences.push(SequenceAttention {
                query_start: seq.query_start,
                query_len: seq.query_len,
                contexts: (contexts.clone(), i),
                context_len: seq.context_len,
                adapter,
            });
        }
        let (t, l) = (layout.tokens, layout.logits);
        Ok(Self {
            token_ids: view(0, t)?,
            positions: view(t, t)?,
            slot_mapping: view(2 * t, t)?,
            sequences,
            logits_rows: view(3 * t, l)?,
            logits_per_sequence,
            num_tokens: t,
            lora,
            block_size,
            mla_decodes: Default::default(),
            host_paged: Default::default(),
            #[cfg(feature = "cuda")]
            device_metadata: Default::default(),
            data_parallel: None,
            mode: StepMode::default(),
            host_inputs,
            ints,
            contexts,
            layout,
        })
    }

    /// The step's token ids, positions and cache slots, as the host built them.
    pub fn host_inputs(&self) -> (&[u32], &[u32], &[u32]) {
        let t = self.num_tokens;
        let h = &self.host_inputs;
        (&h[..t], &h[t..2 * t], &h[2 * t..3 * t])
    }

    /// Replaces the step's token ids, positions and slots on the GPU with `inputs` (three runs
    /// of `num_tokens`, as [`Self::host_inputs`] lays them out), in place: every view of them
    /// sees the new values from the next launch on. What a CUDA graph captured over this batch
    /// reads at its next replay.
    #[cfg(feature = "cuda")]
    pub(crate) fn rewrite_inputs(
        &self,
        kernels: &ember_kernels::cuda::CudaKernels,
        inputs: &[u32],
    ) -> candle_core::Result<()> {
        if inputs.len() != 3 * self.num_tokens {
            candle_core::bail!(
                "rewriting a step of {} tokens with {} inputs",
                self.num_tokens,
                inputs.len()
            );
        }
        let (storage, layout) = self.ints.storage_and_layout();
        let candle_core::Storage::Cuda(cuda) = &*storage else {
            candle_core::bail!("only a step on a GPU is rewritten in place");
        };
        kernels
            .write_at(cuda.as_cuda_slice::<u32>()?, layout.start_offset(), inputs)
            .map_err(candle_core::Error::wrap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattens_prefill_chunks_and_decodes() {
        let prompt = [5u32, 6, 7];
        let decode = [9u32];
        let inputs = [
            SequenceInput {
                token_ids: &prompt,
                num_computed: 2,
                block_table: &[3, 1],
                all_logits: true,
                adapter: None,
            },
            SequenceInput {
                token_ids: &decode,
                num_computed: 4,
                block_table: &[0, 2],
                all_logits: false,
                adapter: None,
            },
        ];
        let batch = ForwardBatch::new(&inputs, 4, &Device::Cpu).unwrap();
        check_flattened(&batch);
        // A rank's copy of the step takes the same views of its own copy of the tensors.
        check_flattened(&batch.to_device(&Device::Cpu).unwrap());
    }

    fn check_flattened(batch: &ForwardBatch) {
        assert_eq!(batch.token_ids.to_vec1::<u32>().unwrap(), vec![5, 6, 7, 9]);
        assert_eq!(batch.positions.to_vec1::<u32>().unwrap(), vec![2, 3, 4, 4]);
        // Position 4 of the first sequence is in its second block (1): slot 1*4+0.
        assert_eq!(
            batch.slot_mapping.to_vec1::<u32>().unwrap(),
            vec![14, 15, 4, 8]
        );
        assert_eq!(
            batch.logits_rows.to_vec1::<u32>().unwrap(),
            vec![0, 1, 2, 3]
        );
        assert_eq!(batch.logits_per_sequence, vec![3, 1]);
        let mask = batch.sequences[0]
            .causal_mask()
            .unwrap()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(
            mask[0],
            vec![0.0, 0.0, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY]
        );
        assert_eq!(mask[2], vec![0.0; 5]);
        assert!(batch.sequences[1].causal_mask().unwrap().is_none());
        assert_eq!(
            batch.sequences[1]
                .context_slots()
                .unwrap()
                .to_vec1::<u32>()
                .unwrap(),
            vec![0, 1, 2, 3, 8]
        );
        assert_eq!(batch.sequences[1].context_slots_host(), [0, 1, 2, 3, 8]);
        assert_eq!(
            batch.sequences[0]
                .context_slots()
                .unwrap()
                .to_vec1::<u32>()
                .unwrap(),
            vec![12, 13, 14, 15, 4]
        );
        assert_eq!(
            (batch.sequences[1].query_start, batch.sequences[1].query_len),
            (3, 1)
        );
    }

    #[test]
    fn a_short_block_table_is_an_error() {
        let inputs = [SequenceInput {
            token_ids: &[1, 2],
            num_computed: 3,
            block_table: &[0],
            all_logits: false,
            adapter: None,
        }];
        assert!(ForwardBatch::new(&inputs, 4, &Device::Cpu).is_err());
    }
}
