//! The fused MoE's CUDA side after routing: the grouped GEMMs over the stacked experts (dense on
//! tensor cores or SIMT, packed e4m3 or 4-bit), SiLU-and-mul between them and each token's
//! weighted sum.

use super::*;

/// Routed rows per expert on average (a step's entries over the experts) from which a bf16 step
/// runs packed experts on tensor cores (weights dequantized into the tiles, each read once per
/// 64 rows) rather than the SIMT GEMV tiles (each read once per 8 rows). A first guess, to tune
/// on a GPU.
const TENSOR_CORE_ROWS_PER_EXPERT: usize = 8;

/// The fused MoE's kernels on one GPU, after routing.
pub(super) struct Cuda<'a> {
    pub(super) kernels: &'a ember_kernels::cuda::CudaKernels,
    pub(super) device: &'a candle_core::CudaDevice,
    pub(super) stack: &'a StackedExperts,
    pub(super) align: &'a ember_kernels::cuda::DeviceAlignment,
    pub(super) weights: &'a candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
    pub(super) shapes: (GroupedGemmShape, GroupedGemmShape),
}

impl Cuda<'_> {
    pub(super) fn experts<
        T: ember_kernels::cuda::CudaElement + candle_core::cuda_backend::CudaDType,
    >(
        &self,
        x: &candle_core::CudaStorage,
        x_range: std::ops::Range<usize>,
    ) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>> {
        let wrap = candle_core::Error::wrap;
        let (up, down) = self.shapes;
        let (k, align) = (self.kernels, self.align);
        let x = x.as_cuda_slice::<T>()?.slice(x_range);
        let mut h = self.device.alloc_zeros::<T>(up.num_entries * up.n_out)?;
        let mut act = self.device.alloc_zeros::<T>(up.num_entries * down.k_in)?;
        let mut y = self
            .device
            .alloc_zeros::<T>(down.num_entries * down.n_out)?;
        match &self.stack.weights {
            ExpertWeights::Dense { w13, w2 } => {
                let ((g13, l13), (g2, l2)) = (w13.storage_and_layout(), w2.storage_and_layout());
                let w13 = held_view::<T>(&g13, l13, "stacked gate/up weights")?;
                let w2 = held_view::<T>(&g2, l2, "stacked down weights")?;
                k.grouped_gemm(&mut h, &x, &w13, align, &up).map_err(wrap)?;
                k.silu_and_mul(&h.as_view(), down.k_in, &mut act)
                    .map_err(wrap)?;
                k.grouped_gemm(&mut y, &act.as_view(), &w2, align, &down)
                    .map_err(wrap)?;
            }
            ExpertWeights::Packed(packed) => {
                let guards = packed.stacked().map(|t| t.storage_and_layout());
                let bytes13 =
                    held_view::<u8>(&guards[0].0, guards[0].1, "stacked gate/up weights")?;
                let params13 = held_view::<f32>(&guards[1].0, guards[1].1, "their parameters")?;
                let bytes2 = held_view::<u8>(&guards[2].0, guards[2].1, "stacked down weights")?;
                let params2 = held_view::<f32>(&guards[3].0, guards[3].1, "their parameters")?;
                type View<'v, E> = candle_core::cuda_backend::cudarc::driver::CudaView<'v, E>;
                let gemm = |out: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
                            x: &View<'_, T>,
                            bytes: &View<'_, u8>,
                            params: &View<'_, f32>,
                            s: &GroupedGemmShape,
                            down: bool|
                 -> candle_core::Result<()> {
                    // Prefill-sized steps in bf16 dequantize into tensor-core tiles; decodes keep
                    // the SIMT kernels, which read each weight once for their few rows.
                    let tensor_cores = T::KERNEL_SUFFIX == "bf16"
                        && s.num_entries >= TENSOR_CORE_ROWS_PER_EXPERT * s.num_experts;
                    match packed.kind {
                        PackedKind::W8a16 { b13, b2, w8a8 } => {
                            let b = if down { b2 } else { b13 };
                            if !w8a8 && tensor_cores {
                                return k
                                    .grouped_w8a16_tc(out, x, bytes, params, align, s, &b)
                                    .map_err(wrap);
                            }
                            if !w8a8 {
                                return k
                                    .grouped_w8a16(out, x, bytes, params, align, s, &b)
                                    .map_err(wrap);
                            }
                            let rows = s.num_entries / s.x_div;
                            let groups = s.k_in.div_ceil(ember_kernels::w8a8::GROUP);
                            let mut qa = self.device.alloc_zeros::<u8>(rows * s.k_in)?;
                            let mut sa = self.device.alloc_zeros::<f32>(rows * groups)?;
                            k.quant_fp8_groups(x, s.k_in, &mut qa, &mut sa)
                                .map_err(wrap)?;
                            k.grouped_w8a8(
                                out,
                                &qa.as_view(),
                                &sa.as_view(),
                                bytes,
                                params,
                                align,
                                s,
                                b.block_n,
                            )
                            .map_err(wrap)
                        }
                        PackedKind::W4a16(p) if tensor_cores => k
                            .grouped_w4a16_tc(out, x, bytes, params, align, s, &p)
                            .map_err(wrap),
                        PackedKind::W4a16(p) => k
                            .grouped_w4a16(out, x, bytes, params, align, s, &p)
                            .map_err(wrap),
                    }
                };
                gemm(&mut h, &x, &bytes13, &params13, &up, false)?;
                k.silu_and_mul(&h.as_view(), down.k_in, &mut act)
                    .map_err(wrap)?;
                gemm(&mut y, &act.as_view(), &bytes2, &params2, &down, true)?;
            }
        }
        drop(h);
        let mut out = self
            .device
            .alloc_zeros::<T>(up.num_entries / up.x_div * down.n_out)?;
        k.moe_sum(
            &mut out,
            &y.as_view(),
            &self.weights.as_view(),
            up.x_div,
            down.n_out,
        )
        .map_err(wrap)?;
        Ok(out)
    }
}
