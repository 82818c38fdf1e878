//! The step's metadata for ember's attention kernels, built once per step from its batch on
//! the host and, on a GPU, checked and copied once for every layer to read: the paged kernel's
//! (every token's sequence and context, each sequence's block table) and MLA decode's (the
//! step's single-token decodes and theirs).

#[cfg(feature = "cuda")]
use std::sync::Arc;
use std::sync::Mutex;

#[cfg(feature = "cuda")]
use candle_core::CudaDevice;
use candle_core::Tensor;
#[cfg(feature = "cuda")]
use ember_kernels::cuda::DevicePagedBatch;
use ember_kernels::paged_attention::PagedAttentionBatch;

use crate::step::batch::ForwardBatch;
use crate::TensorResult;

#[cfg(feature = "cuda")]
/// The step's metadata on each GPU it runs on, uploaded by the first layer that needs it.
#[derive(Default)]
pub struct StepMetadata {
    paged: Mutex<Vec<(candle_core::cuda::DeviceId, Arc<StepPagedBatch>)>>,
}

#[cfg(feature = "cuda")]
impl std::fmt::Debug for StepMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepMetadata").finish_non_exhaustive()
    }
}

#[cfg(feature = "cuda")]
/// A step's paged attention metadata on one GPU, and its block tables' width.
pub(crate) struct StepPagedBatch {
    pub(crate) device: Arc<DevicePagedBatch>,
    pub(crate) max_blocks: usize,
}

#[cfg(feature = "cuda")]
impl StepMetadata {
    /// Hands every layer `meta` (tables `max_blocks` wide) as the step's metadata on `device`
    /// instead of uploading it: a CUDA graph's batch, whose metadata the graph rewrites in
    /// place before each replay.
    pub(crate) fn preset(
        &self,
        device: &CudaDevice,
        meta: Arc<DevicePagedBatch>,
        max_blocks: usize,
    ) {
        let mut uploaded = self.paged.lock().unwrap_or_else(|p| p.into_inner());
        uploaded.retain(|(id, _)| *id != device.id());
        uploaded.push((
            device.id(),
            Arc::new(StepPagedBatch {
                device: meta,
                max_blocks,
            }),
        ));
    }

    /// The batch's paged attention metadata on `device`: checked and copied once per step.
    pub(crate) fn paged(
        &self,
        batch: &ForwardBatch,
        device: &CudaDevice,
    ) -> candle_core::Result<Arc<StepPagedBatch>> {
        let mut uploaded = self.paged.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, meta)) = uploaded.iter().find(|(id, _)| *id == device.id()) {
            return Ok(meta.clone());
        }
        let host = batch.host_paged();
        let meta = Arc::new(StepPagedBatch {
            device: Arc::new(
                crate::device::kernels::kernels(device)?
                    .upload_paged_batch(&host.view(), batch.block_size, host.max_blocks)
                    .map_err(candle_core::Error::wrap)?,
            ),
            max_blocks: host.max_blocks,
        });
        uploaded.push((device.id(), meta.clone()));
        Ok(meta)
    }
}

/// The paged kernel's metadata of a step on the host: block tables `[sequences, max_blocks]`,
/// each token's sequence and the positions it sees. Built once per step
/// ([`ForwardBatch::host_paged`]) for the CPU kernel and the GPU upload alike.
#[derive(Debug)]
pub struct HostPagedBatch {
    pub block_tables: Vec<u32>,
    pub token_seq: Vec<u32>,
    pub token_ctx: Vec<u32>,
    pub max_blocks: usize,
}

impl HostPagedBatch {
    /// The metadata as the kernels take it.
    pub fn view(&self) -> PagedAttentionBatch<'_> {
        PagedAttentionBatch {
            block_tables: &self.block_tables,
            token_seq: &self.token_seq,
            token_ctx: &self.token_ctx,
        }
    }
}

/// [`HostPagedBatch`] of `batch`.
pub(crate) fn host_metadata(batch: &ForwardBatch) -> HostPagedBatch {
    let block_size = batch.block_size;
    let tokens = batch.num_tokens;
    let max_blocks = batch
        .sequences
        .iter()
        .map(|s| s.context_len.div_ceil(block_size))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut block_tables = vec![0u32; batch.sequences.len() * max_blocks];
    let (mut token_seq, mut token_ctx) = (vec![0u32; tokens], vec![0u32; tokens]);
    for (s, seq) in batch.sequences.iter().enumerate() {
        seq.write_block_table(&mut block_tables[s * max_blocks..]);
        let past = seq.context_len - seq.query_len;
        for i in 0..seq.query_len {
            token_seq[seq.query_start + i] = s as u32;
            token_ctx[seq.query_start + i] = (past + i + 1) as u32;
        }
    }
    HostPagedBatch {
        block_tables,
        token_seq,
        token_ctx,
        max_blocks,
    }
}

/// The step's single-token decodes and the kernel's metadata for them.
pub struct MlaDecodeBatch {
    /// Indices of the decoding sequences in the batch, in order.
    pub seqs: Vec<usize>,
    /// Their tokens' rows in the flattened batch (u32, on the model's device).
    pub rows: Tensor,
    pub(crate) block_tables: Vec<u32>,
    pub(crate) token_seq: Vec<u32>,
    pub(crate) token_ctx: Vec<u32>,
    pub(crate) max_blocks: usize,
    pub(crate) block_size: usize,
    #[cfg(feature = "cuda")]
    pub(crate) uploaded: Mutex<
        Vec<(
            candle_core::cuda::DeviceId,
            Arc<ember_kernels::cuda::DevicePagedBatch>,
        )>,
    >,
    #[cfg(not(feature = "cuda"))]
    #[allow(dead_code)]
    pub(crate) uploaded: Mutex<()>,
}

impl std::fmt::Debug for MlaDecodeBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlaDecodeBatch")
            .field("seqs", &self.seqs)
            .finish_non_exhaustive()
    }
}

impl MlaDecodeBatch {
    /// The decodes of `batch` (sequences with one new token).
    pub fn new(batch: &ForwardBatch) -> TensorResult<Self> {
        Self::with_width(batch, None)
    }

    /// The decodes of `batch`, with block tables `max_blocks` wide (a CUDA graph's, whose
    /// metadata is rewritten in place for each replay), or as wide as the longest context.
    pub(crate) fn with_width(
        batch: &ForwardBatch,
        max_blocks: Option<usize>,
    ) -> TensorResult<Self> {
        let block_size = batch.block_size;
        let seqs: Vec<usize> = batch
            .sequences
            .iter()
            .enumerate()
            .filter(|(_, s)| s.query_len == 1)
            .map(|(i, _)| i)
            .collect();
        let needed = seqs
            .iter()
            .map(|&i| batch.sequences[i].context_len.div_ceil(block_size))
            .max()
            .unwrap_or(1)
            .max(1);
        let max_blocks = max_blocks.unwrap_or(needed);
        if needed > max_blocks {
            candle_core::bail!("a decode needs {needed} blocks; its tables hold {max_blocks}");
        }
        let mut block_tables = vec![0u32; seqs.len() * max_blocks];
        let (mut token_seq, mut token_ctx, mut rows) = (vec![], vec![], vec![]);
        for (j, &i) in seqs.iter().enumerate() {
            let seq = &batch.sequences[i];
            seq.write_block_table(&mut block_tables[j * max_blocks..]);
            token_seq.push(j as u32);
            token_ctx.push(seq.context_len as u32);
            rows.push(seq.query_start as u32);
        }
        Ok(Self {
            seqs,
            rows: crate::device::kernels::upload(rows, batch.token_ids.device())?,
            block_tables,
            token_seq,
            token_ctx,
            max_blocks,
            block_size,
            uploaded: Default::default(),
        })
    }

    /// Hands the kernel `meta` as these decodes' metadata on `device` instead of uploading it:
    /// a CUDA graph's, rewritten in place before each replay (tables as wide as these).
    #[cfg(feature = "cuda")]
    pub(crate) fn preset(
        &self,
        device: &candle_core::CudaDevice,
        meta: Arc<ember_kernels::cuda::DevicePagedBatch>,
    ) {
        let mut uploaded = self.uploaded.lock().unwrap_or_else(|p| p.into_inner());
        uploaded.retain(|(id, _)| *id != device.id());
        uploaded.push((device.id(), meta));
    }

    pub(crate) fn host(&self) -> PagedAttentionBatch<'_> {
        PagedAttentionBatch {
            block_tables: &self.block_tables,
            token_seq: &self.token_seq,
            token_ctx: &self.token_ctx,
        }
    }

    /// The metadata on `device`, checked and copied by the first layer that asks.
    #[cfg(feature = "cuda")]
    pub(crate) fn on_device(
        &self,
        device: &candle_core::CudaDevice,
    ) -> candle_core::Result<Arc<ember_kernels::cuda::DevicePagedBatch>> {
        let mut uploaded = self.uploaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, meta)) = uploaded.iter().find(|(id, _)| *id == device.id()) {
            return Ok(meta.clone());
        }
        let meta = Arc::new(
            crate::device::kernels::kernels(device)?
                .upload_paged_batch(&self.host(), self.block_size, self.max_blocks)
                .map_err(candle_core::Error::wrap)?,
        );
        uploaded.push((device.id(), meta.clone()));
        Ok(meta)
    }
}
