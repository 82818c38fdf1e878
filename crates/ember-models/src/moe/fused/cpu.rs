//! The fused MoE on the CPU: routing, then the experts through ember-kernels' blocked CPU
//! kernel (`moe_cpu`) over their dense or packed rows, or for W8A8 experts the references the
//! CUDA kernels are tested against.

use std::sync::atomic::Ordering;

use ember_kernels::cpu_dot::{DenseRows, DotWeight, WeightRows};
use ember_kernels::fused_moe::{self, MoeAlignment};
use ember_kernels::moe_cpu::{self, MoeCpuShape};
use ember_kernels::moe_routing;
use ember_kernels::packed_cpu::{W4Rows, W8Rows};
use ember_kernels::w8a16::W8a16Shape;
use ember_kernels::{silu_and_mul, Element, KernelError};

use super::*;

impl FusedMoeOp<'_> {
    /// The op on the CPU: routing, then the experts (see the module doc).
    pub(super) fn cpu(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        logits: &CpuStorage,
        logits_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let wrap = candle_core::Error::wrap;
        let logits = &logits.as_slice::<f32>()?
            [crate::device::kernels::contiguous_range(logits_layout, "router logits")?];
        let tokens = x_layout.shape().dims2()?.0;
        let entries = tokens * self.routing.top_k;
        let (bias, bias_layout) = self.bias.storage_and_layout();
        let bias = held_slice::<f32>(&bias, bias_layout, "router bias")?;
        let (mut ids, mut weights) = (vec![0u32; entries], vec![0f32; entries]);
        moe_routing::route(logits, bias, &self.routing, &mut ids, &mut weights).map_err(wrap)?;
        if let Some(counts) = self.stack.counts.as_ref().filter(|_| !self.placeholder) {
            for &e in &ids {
                if let Some(c) = counts.get(e as usize) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let range = crate::device::kernels::contiguous_range(x_layout, "fused MoE input")?;
        let routed = (ids.as_slice(), weights.as_slice());
        // W8A8 experts run the references; every other stack the blocked CPU kernel.
        let packed = match &self.stack.weights {
            ExpertWeights::Packed(packed) if packed.kind.w8a8() => packed,
            weights => {
                let out = match weights {
                    ExpertWeights::Dense { w13, w2 } => {
                        self.dense_cpu(x, range, routed, (w13, w2))?
                    }
                    ExpertWeights::Packed(packed) => self.packed_cpu(x, range, routed, packed)?,
                };
                self.stack.calls.count(Kernel::MoeCpu);
                return Ok((out, Shape::from((tokens, self.stack.hidden))));
            }
        };
        let align = fused_moe::moe_align(&ids, self.routing.num_experts, BLOCK_M).map_err(wrap)?;
        let shapes = self.shapes(tokens);
        let out = match x {
            CpuStorage::F32(x) => {
                CpuStorage::F32(w8a8_cpu(packed, &x[range], &align, &weights, shapes)?)
            }
            CpuStorage::BF16(x) => {
                CpuStorage::BF16(w8a8_cpu(packed, &x[range], &align, &weights, shapes)?)
            }
            _ => candle_core::bail!(
                "fused MoE takes f32 or bf16 inputs, not {:?}",
                candle_core::backend::BackendStorage::dtype(x)
            ),
        };
        Ok((out, Shape::from((tokens, self.stack.hidden))))
    }
    /// The blocked CPU kernel's sizes for the routed entries `ids`.
    fn cpu_shape(&self, ids: &[u32]) -> MoeCpuShape {
        MoeCpuShape {
            tokens: ids.len() / self.routing.top_k,
            top_k: self.routing.top_k,
            num_experts: self.stack.experts,
            hidden: self.stack.hidden,
            inter: self.stack.inter,
        }
    }

    /// The dense experts' weighted sum for `x[x_range]` routed to `ids` with `weights`, through
    /// ember-kernels' blocked CPU kernel.
    fn dense_cpu(
        &self,
        x: &CpuStorage,
        x_range: std::ops::Range<usize>,
        routed: (&[u32], &[f32]),
        (w13, w2): (&Tensor, &Tensor),
    ) -> candle_core::Result<CpuStorage> {
        let s = self.cpu_shape(routed.0);
        let (g13, l13) = w13.storage_and_layout();
        let (g2, l2) = w2.storage_and_layout();
        let (e, h, i) = (s.num_experts, s.hidden, s.inter);
        fn rows<W: DotWeight>(w: &[W], e: usize, k: usize) -> Vec<DenseRows<'_, W>> {
            w.chunks_exact(w.len() / e.max(1))
                .map(|w| DenseRows::new(w, k))
                .collect()
        }
        match (x, w13.dtype()) {
            (CpuStorage::F32(_), DType::F32) => {
                let w13 = held_slice::<f32>(&g13, l13, "stacked gate/up weights")?;
                let w2 = held_slice::<f32>(&g2, l2, "stacked down weights")?;
                rows_cpu(x, x_range, routed, (&rows(w13, e, h), &rows(w2, e, i)), &s)
            }
            (CpuStorage::BF16(_), DType::BF16) => {
                let w13 = held_slice::<half::bf16>(&g13, l13, "stacked gate/up weights")?;
                let w2 = held_slice::<half::bf16>(&g2, l2, "stacked down weights")?;
                rows_cpu(x, x_range, routed, (&rows(w13, e, h), &rows(w2, e, i)), &s)
            }
            (x, w) => candle_core::bail!(
                "fused MoE on the CPU takes f32 or bf16 inputs of the experts' dtype, not {:?} over {w:?}",
                candle_core::backend::BackendStorage::dtype(x)
            ),
        }
    }

    /// The packed experts' weighted sum (4-bit or e4m3 ones multiplied with bf16 or f32
    /// activations, not W8A8), through ember-kernels' blocked CPU kernel over their packed rows.
    fn packed_cpu(
        &self,
        x: &CpuStorage,
        x_range: std::ops::Range<usize>,
        routed: (&[u32], &[f32]),
        packed: &PackedExperts,
    ) -> candle_core::Result<CpuStorage> {
        let s = self.cpu_shape(routed.0);
        let (e, h, i) = (s.num_experts, s.hidden, s.inter);
        let guards = packed.stacked().map(|t| t.storage_and_layout());
        let bytes13 = held_slice::<u8>(&guards[0].0, guards[0].1, "stacked gate/up weights")?;
        let params13 = held_slice::<f32>(&guards[1].0, guards[1].1, "their parameters")?;
        let bytes2 = held_slice::<u8>(&guards[2].0, guards[2].1, "stacked down weights")?;
        let params2 = held_slice::<f32>(&guards[3].0, guards[3].1, "their parameters")?;
        // Each expert's rows: its part of the stacked bytes and parameters.
        fn rows<'a, R>(
            (bytes, params): (&'a [u8], &'a [f32]),
            e: usize,
            new: impl Fn(&'a [u8], &'a [f32]) -> std::result::Result<R, KernelError>,
        ) -> candle_core::Result<Vec<R>> {
            let (b, p) = (bytes.len() / e.max(1), params.len() / e.max(1));
            (0..e)
                .map(|x| new(&bytes[x * b..][..b], &params[x * p..][..p]))
                .collect::<std::result::Result<_, _>>()
                .map_err(candle_core::Error::wrap)
        }
        let (w13, w2) = ((bytes13, params13), (bytes2, params2));
        match packed.kind {
            PackedKind::W4a16(p) => {
                let (s13, s2) = (p.shape(2 * i, h), p.shape(h, i));
                let w13 = rows(w13, e, |b, q| W4Rows::new(b, q, &s13))?;
                let w2 = rows(w2, e, |b, q| W4Rows::new(b, q, &s2))?;
                rows_cpu(x, x_range, routed, (&w13, &w2), &s)
            }
            PackedKind::W8a16 { b13, b2, .. } => {
                let shape = |n, k, b: ScaleBlocks| W8a16Shape {
                    m: 0,
                    n,
                    k,
                    block_n: b.block_n,
                    block_k: b.block_k,
                };
                let (s13, s2) = (shape(2 * i, h, b13), shape(h, i, b2));
                let w13 = rows(w13, e, |b, q| W8Rows::new(b, q, &s13))?;
                let w2 = rows(w2, e, |b, q| W8Rows::new(b, q, &s2))?;
                rows_cpu(x, x_range, routed, (&w13, &w2), &s)
            }
        }
    }
}

/// The experts' weighted sum for `x[x_range]` (f32 or bf16) routed as `(ids, weights)`,
/// through ember-kernels' blocked CPU kernel over the experts' rows `(w13, w2)`.
fn rows_cpu<R: WeightRows>(
    x: &CpuStorage,
    x_range: std::ops::Range<usize>,
    (ids, weights): (&[u32], &[f32]),
    (w13, w2): (&[R], &[R]),
    s: &MoeCpuShape,
) -> candle_core::Result<CpuStorage> {
    fn run<T: Element, R: WeightRows>(
        x: &[T],
        (ids, weights): (&[u32], &[f32]),
        (w13, w2): (&[R], &[R]),
        s: &MoeCpuShape,
    ) -> candle_core::Result<Vec<T>> {
        let mut out = vec![T::from_f32(0.0); s.tokens * s.hidden];
        moe_cpu::fused_moe_rows(&mut out, x, ids, weights, w13, w2, s)
            .map_err(candle_core::Error::wrap)?;
        Ok(out)
    }
    let routed = (ids, weights);
    Ok(match x {
        CpuStorage::F32(x) => CpuStorage::F32(run(&x[x_range], routed, (w13, w2), s)?),
        CpuStorage::BF16(x) => CpuStorage::BF16(run(&x[x_range], routed, (w13, w2), s)?),
        x => candle_core::bail!(
            "fused MoE on the CPU takes f32 or bf16 inputs, not {:?}",
            candle_core::backend::BackendStorage::dtype(x)
        ),
    })
}

/// The fused MoE over W8A8 experts on the CPU: the references the CUDA kernels are tested
/// against, after routing (every other stack runs `moe_cpu`, see [`FusedMoeOp::packed_cpu`]).
fn w8a8_cpu<T: Element + candle_core::WithDType>(
    packed: &PackedExperts,
    x: &[T],
    align: &MoeAlignment,
    weights: &[f32],
    (up, down): (GroupedGemmShape, GroupedGemmShape),
) -> candle_core::Result<Vec<T>> {
    let wrap = candle_core::Error::wrap;
    let PackedKind::W8a16 { b13, b2, .. } = packed.kind else {
        candle_core::bail!("fused MoE: W8A8 needs e4m3 experts");
    };
    let zero = T::from_f32(0.0);
    let mut h = vec![zero; up.num_entries * up.n_out];
    let mut act = vec![zero; up.num_entries * down.k_in];
    let mut y = vec![zero; down.num_entries * down.n_out];
    let guards = packed.stacked().map(|t| t.storage_and_layout());
    let bytes13 = held_slice::<u8>(&guards[0].0, guards[0].1, "stacked gate/up weights")?;
    let params13 = held_slice::<f32>(&guards[1].0, guards[1].1, "their parameters")?;
    let bytes2 = held_slice::<u8>(&guards[2].0, guards[2].1, "stacked down weights")?;
    let params2 = held_slice::<f32>(&guards[3].0, guards[3].1, "their parameters")?;
    let gemm = |out: &mut [T], x: &[T], bytes, params, s: &GroupedGemmShape, b: ScaleBlocks| {
        let (qa, sa) = ember_kernels::w8a8::quantize_groups(x, s.k_in)?;
        ember_kernels::w8a8::grouped_w8a8(out, &qa, &sa, bytes, params, align, s, b.block_n)
    };
    gemm(&mut h, x, bytes13, params13, &up, b13).map_err(wrap)?;
    silu_and_mul::silu_and_mul(&h, down.k_in, &mut act).map_err(wrap)?;
    gemm(&mut y, &act, bytes2, params2, &down, b2).map_err(wrap)?;
    let mut out = vec![zero; up.num_entries / up.x_div * down.n_out];
    fused_moe::moe_sum(&mut out, &y, weights, up.x_div, down.n_out).map_err(wrap)?;
    Ok(out)
}
