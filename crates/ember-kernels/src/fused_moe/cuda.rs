//! The launchers of the fused MoE's pieces: [`super::moe_align`] ([`DeviceAlignment`]), the
//! grouped GEMMs over plain, e4m3 and 4-bit experts, [`super::count_experts`] and
//! [`super::moe_sum`] on the GPU.

use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};

use super::{
    align_capacity, grouped_gemm_shape, grouped_w4a16_shape, grouped_w8a16_shape, moe_sum_shape,
    GroupedGemmShape, MoeAlignment, ScaleBlocks, W4Params,
};
use crate::cuda::{
    block_per_row, check_e4m3_bytes, elementwise_launch, grid_launch, grid_y_blocks, int32, kernel,
    too_big, CudaElement, CudaKernels,
};
use crate::error::check_shape;
use crate::KernelError;

/// Warps per block and sorted rows per tile of `kernels/moe_w8a16.cu` (`GW8_WARPS`, `GW8_ROWS`)
/// and of `kernels/moe_w4a16.cu` (`GW4_WARPS`, `GW4_ROWS`, the same).
const GW8_WARPS: u32 = 4;
const GW8_ROWS: usize = 8;

/// [`crate::fused_moe::MoeAlignment`] on the GPU: computed there, read by the grouped GEMM there.
pub struct DeviceAlignment {
    pub sorted_ids: CudaSlice<u32>,
    pub expert_ids: CudaSlice<u32>,
    /// One element: the rows in use.
    pub num_padded: CudaSlice<u32>,
    pub num_entries: usize,
    pub num_experts: usize,
    pub block_m: usize,
}

/// The experts a grouped GEMM over packed weights reads: e4m3 bytes with block scales
/// (`kernels/moe_w8a16.cu`) or 4-bit codes with their parameters (`kernels/moe_w4a16.cu`).
#[derive(Clone, Copy)]
enum PackedExperts<'a> {
    E4m3(&'a ScaleBlocks),
    FourBit(&'a W4Params),
}

impl PackedExperts<'_> {
    /// The kernel's name: the SIMT tiles', or with `tensor_cores` the bf16 WMMA tiles'.
    fn op(self, tensor_cores: bool) -> &'static str {
        match (self, tensor_cores) {
            (Self::E4m3(_), false) => "grouped_w8a16",
            (Self::E4m3(_), true) => "grouped_w8a16_tc",
            (Self::FourBit(_), false) => "grouped_w4a16",
            (Self::FourBit(_), true) => "grouped_w4a16_tc",
        }
    }

    /// Checks the buffers' lengths `[out, x, weights, their parameters]` against the shape, as
    /// the CPU reference does.
    fn check_lens(
        self,
        s: &GroupedGemmShape,
        [out, x, weights, params]: [usize; 4],
        host: &MoeAlignment,
    ) -> Result<(), KernelError> {
        match self {
            Self::E4m3(blocks) => grouped_w8a16_shape(s, blocks, out, x, weights, params, host),
            Self::FourBit(p) => grouped_w4a16_shape(s, p, out, x, weights, params, host),
        }
    }

    /// The ints the kernel takes after the shape's ([`grouped_ints`]).
    fn extra_ints(self, op: &'static str) -> Result<Vec<i32>, KernelError> {
        Ok(match self {
            Self::E4m3(blocks) => vec![
                int32(op, "block_n", blocks.block_n)?,
                int32(op, "block_k", blocks.block_k)?,
            ],
            Self::FourBit(p) => vec![
                int32(op, "group_size", p.group_size)?,
                i32::from(p.f16_weights),
                i32::from(p.e2m1),
                i32::from(p.zeros),
                p.scales.code(),
            ],
        })
    }
}

impl CudaKernels {
    /// [`crate::fused_moe::moe_align`] on the GPU. An id of `topk_ids` outside the experts is
    /// counted by none of them: its entry is dropped, never read out of bounds.
    pub fn moe_align(
        &self,
        topk_ids: &CudaView<u32>,
        num_experts: usize,
        block_m: usize,
    ) -> Result<DeviceAlignment, KernelError> {
        check_shape(
            num_experts > 0 && num_experts <= 1024 && block_m > 0 && block_m <= 1024,
            "moe_align",
            || format!("{num_experts} experts (1 to 1024), block_m {block_m} (1 to 1024)"),
        )?;
        let n = topk_ids.len();
        let cap = align_capacity(n, num_experts, block_m);
        let int =
            |what: &str, v: usize| i32::try_from(v).map_err(|_| too_big("moe_align", what, v));
        let args = [
            int("entries", n)?,
            num_experts as i32,
            block_m as i32,
            int("capacity", cap)?,
        ];
        let mut a = DeviceAlignment {
            sorted_ids: self.stream.alloc_zeros::<u32>(cap)?,
            expert_ids: self.stream.alloc_zeros::<u32>(cap / block_m)?,
            num_padded: self.stream.alloc_zeros::<u32>(1)?,
            num_entries: n,
            num_experts,
            block_m,
        };
        let f = self.fused_moe.load_function("moe_align")?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(&mut a.sorted_ids)
            .arg(&mut a.expert_ids)
            .arg(&mut a.num_padded)
            .arg(topk_ids);
        for x in &args {
            launch.arg(x);
        }
        let cfg = grid_launch((1, 1), num_experts.next_multiple_of(32) as u32);
        // SAFETY: matches moe_align(unsigned*, unsigned*, unsigned*, const unsigned*, int x 4) in
        // kernels/fused_moe.cu; the outputs hold `cap` rows and `cap / block_m` blocks, what any
        // counts of n entries over num_experts (<= 1024 threads) can fill.
        unsafe { launch.launch(cfg) }?;
        Ok(a)
    }

    /// [`crate::fused_moe::grouped_gemm`] on the GPU over an alignment [`CudaKernels::moe_align`]
    /// made (`shape.block_m` must be 64, its tiles' rows).
    pub fn grouped_gemm<T: CudaElement>(
        &self,
        out: &mut CudaSlice<T>,
        x: &CudaView<T>,
        w: &CudaView<T>,
        align: &DeviceAlignment,
        shape: &GroupedGemmShape,
    ) -> Result<(), KernelError> {
        let s = shape;
        let (cap, host) = self.check_alignment("grouped_gemm", align, s)?;
        grouped_gemm_shape(s, out.len(), x.len(), w.len(), &host)?;
        if s.num_entries == 0 {
            return Ok(());
        }
        let args = grouped_ints("grouped_gemm", s, &[])?;
        let bf16 = T::KERNEL_SUFFIX == "bf16";
        let f = kernel(&self.fused_moe, "grouped_gemm", T::KERNEL_SUFFIX)?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(out).arg(x).arg(w);
        push_alignment(&mut launch, align);
        for a in &args {
            launch.arg(a);
        }
        let mut cfg = wmma_tile_launch("grouped_gemm", cap, s)?;
        if !bf16 {
            cfg.block_dim.0 = 256;
        }
        // SAFETY: matches grouped_gemm_<T>(T*, const T*, const T*, const unsigned* x 3, int x 5);
        // the kernel reads x rows of ids < num_entries, weights of experts < num_experts and
        // writes rows of ids < num_entries, all bounded by the length checks above.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::fused_moe::grouped_w8a16_tc`] on the GPU: the grouped GEMM over e4m3 experts on
    /// bf16 tensor cores, each weight dequantized into the tile (prefill-sized batches; bf16 only).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_w8a16_tc<T: CudaElement, P: DeviceRepr>(
        &self,
        out: &mut CudaSlice<T>,
        x: &CudaView<T>,
        w: &CudaView<P>,
        scales: &CudaView<f32>,
        align: &DeviceAlignment,
        shape: &GroupedGemmShape,
        blocks: &ScaleBlocks,
    ) -> Result<(), KernelError> {
        let e4m3 = PackedExperts::E4m3(blocks);
        self.grouped_packed(true, e4m3, out, x, w, scales, align, shape)
    }

    /// [`crate::fused_moe::grouped_w4a16_tc`] on the GPU: the grouped GEMM over 4-bit experts on
    /// bf16 tensor cores, each weight dequantized into the tile (prefill-sized batches; bf16 only).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_w4a16_tc<T: CudaElement>(
        &self,
        out: &mut CudaSlice<T>,
        x: &CudaView<T>,
        codes: &CudaView<u8>,
        qparams: &CudaView<f32>,
        align: &DeviceAlignment,
        shape: &GroupedGemmShape,
        params: &W4Params,
    ) -> Result<(), KernelError> {
        let four_bit = PackedExperts::FourBit(params);
        self.grouped_packed(true, four_bit, out, x, codes, qparams, align, shape)
    }

    /// [`crate::fused_moe::grouped_w8a16`] on the GPU over an alignment
    /// [`CudaKernels::moe_align`] made (`shape.block_m` must be 64); `w` holds e4m3 bytes as any
    /// one-byte element.
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_w8a16<T: CudaElement, P: DeviceRepr>(
        &self,
        out: &mut CudaSlice<T>,
        x: &CudaView<T>,
        w: &CudaView<P>,
        scales: &CudaView<f32>,
        align: &DeviceAlignment,
        shape: &GroupedGemmShape,
        blocks: &ScaleBlocks,
    ) -> Result<(), KernelError> {
        let e4m3 = PackedExperts::E4m3(blocks);
        self.grouped_packed(false, e4m3, out, x, w, scales, align, shape)
    }

    /// [`crate::fused_moe::grouped_w4a16`] on the GPU over an alignment
    /// [`CudaKernels::moe_align`] made (`shape.block_m` must be 64).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_w4a16<T: CudaElement>(
        &self,
        out: &mut CudaSlice<T>,
        x: &CudaView<T>,
        codes: &CudaView<u8>,
        qparams: &CudaView<f32>,
        align: &DeviceAlignment,
        shape: &GroupedGemmShape,
        params: &W4Params,
    ) -> Result<(), KernelError> {
        let four_bit = PackedExperts::FourBit(params);
        self.grouped_packed(false, four_bit, out, x, codes, qparams, align, shape)
    }

    /// The grouped GEMM over `packed` experts on their SIMT tiles, or with `tensor_cores` on
    /// the bf16 WMMA tiles of `kernels/fused_moe.cu`: `weights` and their `params` (scales, or
    /// the 4-bit codes' parameters) per expert.
    #[allow(clippy::too_many_arguments)]
    fn grouped_packed<T: CudaElement, W: DeviceRepr>(
        &self,
        tensor_cores: bool,
        packed: PackedExperts<'_>,
        out: &mut CudaSlice<T>,
        x: &CudaView<T>,
        weights: &CudaView<W>,
        params: &CudaView<f32>,
        align: &DeviceAlignment,
        shape: &GroupedGemmShape,
    ) -> Result<(), KernelError> {
        let op = packed.op(tensor_cores);
        let s = shape;
        if let PackedExperts::E4m3(_) = packed {
            check_e4m3_bytes::<W>(op)?;
        }
        check_shape(!tensor_cores || T::KERNEL_SUFFIX == "bf16", op, || {
            "bf16 activations (tensor cores)".into()
        })?;
        let (cap, host) = self.check_alignment(op, align, s)?;
        let lens = [out.len(), x.len(), weights.len(), params.len()];
        packed.check_lens(s, lens, &host)?;
        if s.num_entries == 0 {
            return Ok(());
        }
        let args = grouped_ints(op, s, &packed.extra_ints(op)?)?;
        let module = if tensor_cores {
            &self.fused_moe
        } else if let PackedExperts::E4m3(_) = packed {
            &self.moe_w8a16
        } else {
            &self.moe_w4a16
        };
        let f = kernel(module, op, T::KERNEL_SUFFIX)?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(out).arg(x).arg(weights).arg(params);
        push_alignment(&mut launch, align);
        for a in &args {
            launch.arg(a);
        }
        let cfg = if tensor_cores {
            wmma_tile_launch(op, cap, s)?
        } else {
            grouped_tile_launch(op, cap, s)?
        };
        // SAFETY: grouped_w8a16_<T> (kernels/moe_w8a16.cu), grouped_w4a16_<T>
        // (kernels/moe_w4a16.cu) and their _tc_bf16 forms in kernels/fused_moe.cu (T is bf16
        // there, checked) take (T*, const T*, const u8*, const float*, const unsigned* x 3, int x
        // 5, then the extra ints: 2 for e4m3, 5 for 4 bits); they read x rows of ids <
        // num_entries, weights and params of experts < num_experts within the lengths checked
        // above, and write rows of ids < num_entries.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::fused_moe::count_experts`] on the GPU: `counts` (one per expert) += the entries
    /// of `topk_ids` per expert, asynchronously.
    pub fn count_experts(
        &self,
        counts: &mut CudaSlice<u64>,
        topk_ids: &CudaView<u32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "count_experts";
        let n = topk_ids.len();
        if n == 0 {
            return Ok(());
        }
        let (n_arg, e_arg) = (
            int32(OP, "entries", n)?,
            int32(OP, "experts", counts.len())?,
        );
        let f = self.fused_moe.load_function(OP)?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(counts).arg(topk_ids).arg(&n_arg).arg(&e_arg);
        // SAFETY: matches count_experts(u64*, const unsigned*, int, int) in kernels/fused_moe.cu;
        // it reads n ids and adds only to counters below counts.len().
        unsafe { launch.launch(elementwise_launch(n as i64)) }?;
        Ok(())
    }

    /// [`crate::fused_moe::moe_sum`] on the GPU.
    pub fn moe_sum<T: CudaElement>(
        &self,
        out: &mut CudaSlice<T>,
        y: &CudaView<T>,
        weights: &CudaView<f32>,
        top_k: usize,
        hidden: usize,
    ) -> Result<(), KernelError> {
        moe_sum_shape(out.len(), y.len(), weights.len(), top_k, hidden)?;
        let tokens = out.len() / hidden;
        if tokens == 0 {
            return Ok(());
        }
        let int = |what: &str, v: usize| int32("moe_sum", what, v);
        let (k_arg, h_arg) = (int("top_k", top_k)?, int("hidden", hidden)?);
        let f = kernel(&self.fused_moe, "moe_sum", T::KERNEL_SUFFIX)?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(out).arg(y).arg(weights).arg(&k_arg).arg(&h_arg);
        let cfg = block_per_row("moe_sum", "tokens", tokens, 256)?;
        // SAFETY: matches moe_sum_<T>(T*, const T*, const float*, int, int); lengths checked.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// Checks that `align` was made for `s`; the alignment's capacity.
    pub(crate) fn check_alignment(
        &self,
        op: &'static str,
        align: &DeviceAlignment,
        s: &GroupedGemmShape,
    ) -> Result<(usize, MoeAlignment), KernelError> {
        check_shape(
            align.num_entries == s.num_entries
                && align.num_experts == s.num_experts
                && align.block_m == s.block_m,
            op,
            || "the alignment was made for other entries, experts or block_m".into(),
        )?;
        let cap = align_capacity(s.num_entries, s.num_experts, s.block_m);
        // A host alignment of the same capacity, for the references' size checks.
        let host = MoeAlignment {
            sorted_ids: vec![0; cap],
            expert_ids: vec![0; cap / s.block_m.max(1)],
            num_padded: 0,
        };
        Ok((cap, host))
    }
}

/// The int arguments every grouped GEMM kernel starts with (entries, experts, k_in, n_out,
/// x_div), then `extra`.
pub(crate) fn grouped_ints(
    op: &'static str,
    s: &GroupedGemmShape,
    extra: &[i32],
) -> Result<Vec<i32>, KernelError> {
    let mut ints = vec![
        int32(op, "entries", s.num_entries)?,
        int32(op, "experts", s.num_experts)?,
        int32(op, "k_in", s.k_in)?,
        int32(op, "n_out", s.n_out)?,
        int32(op, "x_div", s.x_div)?,
    ];
    ints.extend_from_slice(extra);
    Ok(ints)
}

/// The launch of `kernels/fused_moe.cu`'s 64 x 64 grouped GEMM tiles: one block of 128 threads
/// (4 warps on tensor cores) per 64-row block of the alignment and 64 output columns.
fn wmma_tile_launch(
    op: &'static str,
    cap: usize,
    s: &GroupedGemmShape,
) -> Result<LaunchConfig, KernelError> {
    let blocks_n =
        u32::try_from(s.n_out.div_ceil(64)).map_err(|_| too_big(op, "n_out", s.n_out))?;
    Ok(grid_launch(((cap / s.block_m) as u32, blocks_n), 128))
}

/// Pushes an alignment's three device arrays (sorted ids, block experts, padded rows).
pub(crate) fn push_alignment<'a>(launch: &mut LaunchArgs<'a>, align: &'a DeviceAlignment) {
    launch
        .arg(&align.sorted_ids)
        .arg(&align.expert_ids)
        .arg(&align.num_padded);
}

/// The launch of kernels/moe_w8a16.cu and moe_w4a16.cu: a tile of `GW8_ROWS` sorted rows by
/// `GW8_WARPS` output columns per block.
fn grouped_tile_launch(
    op: &'static str,
    cap: usize,
    s: &GroupedGemmShape,
) -> Result<LaunchConfig, KernelError> {
    let tiles = u32::try_from(cap / GW8_ROWS).map_err(|_| too_big(op, "entries", s.num_entries))?;
    let blocks_n = grid_y_blocks(op, "n_out", s.n_out, GW8_WARPS as usize)?;
    Ok(grid_launch((tiles, blocks_n), 32 * GW8_WARPS))
}
