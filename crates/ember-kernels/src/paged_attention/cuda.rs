//! The launchers of paged attention: a step's metadata checked and copied to the GPU once
//! ([`DevicePagedBatch`]), [`super::paged_attention`] on it, and the launch of the split
//! softmax that paged attention and MLA decode share ([`AttentionCall`]).

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, CudaView, LaunchConfig, PushKernelArg};

use super::{
    check_extent, check_splits, paged_attention_dims, paged_attention_splits, paged_batch_extent,
    BatchExtent, PagedAttentionBatch, PagedAttentionShape,
};
use crate::cuda::{grid_launch, int32, kernel, too_big, CudaElement, CudaKernels};
use crate::error::check_shape;
use crate::KernelError;

/// Threads per block of `kernels/paged_attention.cu` (its `PA_THREADS`).
const PA_THREADS: u32 = 128;

/// A step's paged attention metadata on the GPU ([`CudaKernels::upload_paged_batch`]).
pub struct DevicePagedBatch {
    block_tables: CudaSlice<u32>,
    token_seq: CudaSlice<u32>,
    token_ctx: CudaSlice<u32>,
    /// Entries of `block_tables` in use (the staged buffer may be longer).
    table_len: usize,
    extent: BatchExtent,
    block_size: usize,
    max_blocks: usize,
}

impl DevicePagedBatch {
    /// What the metadata needs of a call's buffers.
    pub fn extent(&self) -> BatchExtent {
        self.extent
    }

    /// Errs unless the metadata was made for blocks of `block_size` and tables `max_blocks`
    /// wide (what `op`'s call reads it as).
    pub(crate) fn check_made_for(
        &self,
        op: &'static str,
        block_size: usize,
        max_blocks: usize,
    ) -> Result<(), KernelError> {
        check_shape(
            block_size == self.block_size && max_blocks == self.max_blocks,
            op,
            || {
                format!(
                    "the metadata was made for blocks of {} and tables of {}, not {block_size} and \
                     {max_blocks}",
                    self.block_size, self.max_blocks
                )
            },
        )
    }
}

impl CudaKernels {
    /// A call's metadata checked on the host ([`paged_batch_extent`]) and copied to the GPU once,
    /// for every layer of a step to read.
    pub fn upload_paged_batch(
        &self,
        batch: &PagedAttentionBatch<'_>,
        block_size: usize,
        max_blocks: usize,
    ) -> Result<DevicePagedBatch, KernelError> {
        let extent = paged_batch_extent(batch, block_size, max_blocks)?;
        Ok(DevicePagedBatch {
            block_tables: self.stage(batch.block_tables)?,
            token_seq: self.stage(batch.token_seq)?,
            token_ctx: self.stage(batch.token_ctx)?,
            table_len: batch.block_tables.len(),
            extent,
            block_size,
            max_blocks,
        })
    }

    /// [`Self::upload_paged_batch`] for metadata a CUDA graph keeps and rewrites before each
    /// replay ([`Self::rewrite_paged_batch`]): its extent claims every block of a cache of
    /// `cache_blocks` blocks, so the launches check, once at capture, that the cache holds them
    /// all, and each rewrite is checked on the host to read no block beyond them.
    pub fn upload_paged_batch_bounded(
        &self,
        batch: &PagedAttentionBatch<'_>,
        block_size: usize,
        max_blocks: usize,
        cache_blocks: usize,
    ) -> Result<DevicePagedBatch, KernelError> {
        let mut meta = self.upload_paged_batch(batch, block_size, max_blocks)?;
        check_bound(&meta.extent, cache_blocks)?;
        meta.extent.blocks_read = cache_blocks;
        Ok(meta)
    }

    /// Replaces the contents of `meta` (made by [`Self::upload_paged_batch_bounded`]) with
    /// `batch`, in place: the same tokens and sequences, checked like an upload, reading no block
    /// beyond the bound `meta` was made with. `batch`'s tables may be narrower than `meta`'s
    /// (`width` columns, enough for every context it holds): only those columns are copied, and
    /// what is left beyond them is never read.
    pub fn rewrite_paged_batch(
        &self,
        meta: &DevicePagedBatch,
        batch: &PagedAttentionBatch<'_>,
        width: usize,
    ) -> Result<(), KernelError> {
        const OP: &str = "paged_attention";
        check_shape((1..=meta.max_blocks).contains(&width), OP, || {
            format!(
                "tables {width} wide; the metadata's are {}",
                meta.max_blocks
            )
        })?;
        let extent = paged_batch_extent(batch, meta.block_size, width)?;
        let rows = meta.table_len / meta.max_blocks;
        check_shape(
            extent.tokens == meta.extent.tokens && batch.block_tables.len() == rows * width,
            OP,
            || {
                format!(
                    "rewriting metadata of {} tokens and {rows} tables with {} and {} entries \
                     ({width} a table)",
                    meta.extent.tokens,
                    extent.tokens,
                    batch.block_tables.len()
                )
            },
        )?;
        check_bound(&extent, meta.extent.blocks_read)?;
        self.write_rows(
            &meta.block_tables,
            meta.max_blocks,
            batch.block_tables,
            width,
        )?;
        self.write_at(&meta.token_seq, 0, batch.token_seq)?;
        self.write_at(&meta.token_ctx, 0, batch.token_ctx)
    }

    /// [`crate::paged_attention::paged_attention`] on the GPU, over metadata
    /// [`CudaKernels::upload_paged_batch`] checked and copied: the buffers are checked against
    /// it here (the tokens, and every block it reads against the cache's size).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention<T: CudaElement>(
        &self,
        out: &mut CudaSlice<T>,
        q: &CudaView<T>,
        k_cache: &CudaView<T>,
        v_cache: &CudaView<T>,
        batch: &DevicePagedBatch,
        scale: f32,
        shape: &PagedAttentionShape,
    ) -> Result<(), KernelError> {
        let tokens = q.len() / (shape.num_heads * shape.head_dim).max(1);
        let splits = paged_attention_splits(shape, tokens, self.sm_count);
        let inputs = [q, k_cache, v_cache];
        self.paged_attention_with_splits(out, inputs, batch, scale, shape, splits)
    }

    /// [`Self::paged_attention`] with each context cut into `splits` runs (1: not split; see
    /// [`crate::paged_attention::paged_attention_split`]), which it picks itself by
    /// [`paged_attention_splits`]; `inputs` are q and the two caches, in that order.
    pub fn paged_attention_with_splits<T: CudaElement>(
        &self,
        out: &mut CudaSlice<T>,
        inputs: [&CudaView<T>; 3],
        batch: &DevicePagedBatch,
        scale: f32,
        shape: &PagedAttentionShape,
        splits: usize,
    ) -> Result<(), KernelError> {
        let s = shape;
        check_splits("paged_attention", splits)?;
        batch.check_made_for("paged_attention", s.block_size, s.max_blocks)?;
        let [q, k_cache, v_cache] = inputs;
        let (tokens, blocks_in_cache) =
            paged_attention_dims(shape, q.len(), k_cache.len(), v_cache.len(), out.len())?;
        check_extent(&batch.extent, tokens, blocks_in_cache)?;
        if tokens == 0 {
            return Ok(());
        }
        let int = |what: &str, v: usize| int32("paged_attention", what, v);
        let args = [
            int("num_heads", s.num_heads)?,
            int("num_kv_heads", s.num_kv_heads)?,
            int("head_dim", s.head_dim)?,
            int("v_dim", s.v_dim)?,
            int("block_size", s.block_size)?,
            int("max_blocks", s.max_blocks)?,
        ];
        // q, the tile's weights and slots, and one float per warp.
        let shared = (s.head_dim + 2 * PA_THREADS as usize + PA_THREADS as usize / 32) * 4;
        let call = AttentionCall {
            op: "paged_attention",
            module: &self.paged_attention,
            tokens,
            num_heads: s.num_heads,
            v_dim: s.v_dim,
            threads: PA_THREADS,
            shared,
            splits,
        };
        // SAFETY: paged_attention_<T> and its _split/_merge kernels in
        // kernels/paged_attention.cu take the arguments launch_attention passes, with these six
        // ints (num_heads, num_kv_heads, head_dim, v_dim, block_size, max_blocks); the metadata
        // was checked when uploaded (each token's sequence and context fit the tables) and its
        // extent here against these buffers (every block read is in the cache), and
        // paged_attention_dims sized `out`, which bounds every index the kernels read and write.
        unsafe { self.launch_attention(&call, out, inputs, batch, scale, &args) }
    }
}

/// One launch of ember's paged attention kernels ([`CudaKernels::launch_attention`]).
pub(crate) struct AttentionCall<'a> {
    pub(crate) op: &'static str,
    pub(crate) module: &'a Arc<CudaModule>,
    pub(crate) tokens: usize,
    pub(crate) num_heads: usize,
    /// Width of each (token, head)'s output row.
    pub(crate) v_dim: usize,
    pub(crate) threads: u32,
    /// Dynamic shared memory of the attention kernel, in bytes.
    pub(crate) shared: usize,
    pub(crate) splits: usize,
}

impl CudaKernels {
    /// Launches `<op>_<T>(T* out, const T* q, const T* a, const T* b, const unsigned*
    /// block_tables, const unsigned* token_seq, const unsigned* token_ctx, float scale, int...
    /// ints)` over a `(tokens, num_heads)` grid; split, `<op>_split_<T>(q, a, b, the tables,
    /// scale, ints..., int splits, float* part_out, float* part_ml)` over `(tokens, num_heads,
    /// splits)` into f32 partials it allocates, then `<op>_merge_<T>` (see [`Self::merge_splits`]).
    ///
    /// # Safety
    /// The op's kernels must take exactly these arguments, and `ints` with the buffers must bound
    /// every index they read and write, `out` holding `tokens · num_heads` rows of `v_dim`.
    pub(crate) unsafe fn launch_attention<T: CudaElement>(
        &self,
        call: &AttentionCall<'_>,
        out: &mut CudaSlice<T>,
        [q, a, b]: [&CudaView<T>; 3],
        batch: &DevicePagedBatch,
        scale: f32,
        ints: &[i32],
    ) -> Result<(), KernelError> {
        let c = call;
        check_shape(c.num_heads <= 65_535, c.op, || {
            format!("{} heads exceed the grid's 65535", c.num_heads)
        })?;
        let pairs = c.tokens * c.num_heads;
        let tokens = u32::try_from(c.tokens).map_err(|_| too_big(c.op, "tokens", c.tokens))?;
        let shared = u32::try_from(c.shared).map_err(|_| too_big(c.op, "head size", c.shared))?;
        let splits = int32(c.op, "splits", c.splits)?;
        let mut parts = None;
        let f = if c.splits > 1 {
            // Each (token, head, split)'s normalized row, then its max and sum.
            parts = Some((
                self.stream.alloc_zeros::<f32>(pairs * c.splits * c.v_dim)?,
                self.stream.alloc_zeros::<f32>(pairs * c.splits * 2)?,
            ));
            kernel(c.module, &format!("{}_split", c.op), T::KERNEL_SUFFIX)?
        } else {
            kernel(c.module, c.op, T::KERNEL_SUFFIX)?
        };
        let mut launch = self.stream.launch_builder(&f);
        if parts.is_none() {
            launch.arg(&mut *out);
        }
        launch
            .arg(q)
            .arg(a)
            .arg(b)
            .arg(&batch.block_tables)
            .arg(&batch.token_seq)
            .arg(&batch.token_ctx)
            .arg(&scale);
        for i in ints {
            launch.arg(i);
        }
        if let Some((part_out, part_ml)) = parts.as_mut() {
            launch.arg(&splits).arg(part_out).arg(part_ml);
        }
        let cfg = LaunchConfig {
            grid_dim: (tokens, c.num_heads as u32, c.splits as u32),
            block_dim: (c.threads, 1, 1),
            shared_mem_bytes: shared,
        };
        // SAFETY: the caller's contract; each split block writes its own row and pair of the
        // partials, sized above for every (token, head, split).
        unsafe { launch.launch(cfg) }?;
        let Some((part_out, part_ml)) = parts else {
            return Ok(());
        };
        let f = kernel(c.module, &format!("{}_merge", c.op), T::KERNEL_SUFFIX)?;
        let sizes = [
            int32(c.op, "num_heads", c.num_heads)?,
            int32(c.op, "v_dim", c.v_dim)?,
            splits,
        ];
        self.merge_splits(&f, out, (&part_out, &part_ml), (tokens, c.num_heads), sizes)
    }

    /// The split form's second pass (`merge_splits` in kernels/split_softmax.cuh) through `f`,
    /// a `<op>_merge_<T>(T* out, const float* part_out, const float* part_ml, int num_heads,
    /// int v_dim, int splits)` kernel: block (token, head) of `grid` merges that pair's
    /// partials into its row of `out`, which the caller has checked holds `tokens · heads`
    /// rows of v_dim; the partials hold `splits` rows (and max/sum pairs) per pair.
    fn merge_splits<T: CudaElement>(
        &self,
        f: &CudaFunction,
        out: &mut CudaSlice<T>,
        (part_out, part_ml): (&CudaSlice<f32>, &CudaSlice<f32>),
        (tokens, heads): (u32, usize),
        [num_heads, v_dim, splits]: [i32; 3],
    ) -> Result<(), KernelError> {
        let mut launch = self.stream.launch_builder(f);
        launch
            .arg(out)
            .arg(part_out)
            .arg(part_ml)
            .arg(&num_heads)
            .arg(&v_dim)
            .arg(&splits);
        let cfg = grid_launch((tokens, heads as u32), 128);
        // SAFETY: the argument list matches the merge kernels' signature above; each block reads
        // its pair's `splits` partials (written by the split launch before it on this stream)
        // and writes its pair's row of `out`, all within the sizes the callers allocated.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}

/// Errs unless metadata of `extent` reads only blocks below `cache_blocks`.
fn check_bound(extent: &BatchExtent, cache_blocks: usize) -> Result<(), KernelError> {
    check_shape(
        extent.blocks_read <= cache_blocks,
        "paged_attention",
        || {
            format!(
                "a token reads block {}; the metadata is bound to {cache_blocks} blocks",
                extent.blocks_read.saturating_sub(1)
            )
        },
    )
}
