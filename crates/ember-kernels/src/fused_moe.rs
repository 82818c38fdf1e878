//! The pieces of a fused MoE layer on the GPU, as vLLM's fused_moe composes them: align the
//! step's (token, expert) entries by expert into blocks of `block_m` rows, run one grouped GEMM
//! over the blocks (each block multiplies by its expert's weight), apply SiLU-and-mul, the second
//! grouped GEMM, and sum each token's weighted expert outputs.
//!
//! Entries: with `top_k` experts per token, entry `i` is token `i / top_k`'s `i % top_k`-th
//! choice, `topk_ids[i]` its expert. Numerics, shared by the CPU references and
//! `kernels/fused_moe.cu`: load as f32, products summed in f32 (the bf16 kernel on tensor cores,
//! so in another order), one rounding to the storage dtype on store.

use crate::error::check_shape;
use crate::{Element, KernelError};

/// The step's entries ordered by expert (vLLM's `moe_align_block_size`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoeAlignment {
    /// Entry ids, each expert's in increasing order, its run padded with `num_entries` to a
    /// multiple of `block_m`; `capacity` long, the tail past `num_padded` padding too.
    pub sorted_ids: Vec<u32>,
    /// The expert of each block of `block_m` sorted rows (`capacity / block_m` long; blocks past
    /// `num_padded` hold 0 and are never read).
    pub expert_ids: Vec<u32>,
    /// Rows of `sorted_ids` in use: the sum over experts of their entries rounded up to `block_m`.
    pub num_padded: usize,
}

/// Rows the alignment of `num_entries` entries over `num_experts` may need: every expert's run
/// rounded up to `block_m`.
pub fn align_capacity(num_entries: usize, num_experts: usize, block_m: usize) -> usize {
    (num_entries + num_experts * (block_m - 1)).div_ceil(block_m) * block_m
}

fn check_align(topk_ids: &[u32], num_experts: usize, block_m: usize) -> Result<(), KernelError> {
    check_shape(
        num_experts > 0 && num_experts <= 1024 && block_m > 0 && block_m <= 1024,
        "moe_align",
        || format!("{num_experts} experts (1 to 1024), block_m {block_m} (1 to 1024)"),
    )?;
    if let Some(bad) = topk_ids.iter().find(|&&e| e as usize >= num_experts) {
        return Err(KernelError::Shape {
            op: "moe_align",
            message: format!("expert id {bad} of {num_experts} experts"),
        });
    }
    Ok(())
}

/// CPU reference of the alignment.
pub fn moe_align(
    topk_ids: &[u32],
    num_experts: usize,
    block_m: usize,
) -> Result<MoeAlignment, KernelError> {
    check_align(topk_ids, num_experts, block_m)?;
    let n = topk_ids.len();
    let cap = align_capacity(n, num_experts, block_m);
    let mut sorted_ids = Vec::with_capacity(cap);
    let mut expert_ids = Vec::with_capacity(cap / block_m);
    // Each expert's entries in order (the CPU kernel's grouping), padded to `block_m`.
    let groups = crate::moe_cpu::group_by_expert(topk_ids, num_experts)?;
    for e in 0..num_experts {
        let start = sorted_ids.len();
        sorted_ids.extend_from_slice(&groups.entries[groups.offsets[e]..groups.offsets[e + 1]]);
        let padded = (sorted_ids.len() - start).div_ceil(block_m) * block_m;
        sorted_ids.resize(start + padded, n as u32);
        expert_ids.extend(std::iter::repeat_n(e as u32, padded / block_m));
    }
    let num_padded = sorted_ids.len();
    sorted_ids.resize(cap, n as u32);
    expert_ids.resize(cap / block_m, 0);
    Ok(MoeAlignment {
        sorted_ids,
        expert_ids,
        num_padded,
    })
}

/// Sizes of a grouped GEMM: `x` rows of `k_in`, experts' weights `[num_experts, n_out, k_in]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupedGemmShape {
    pub num_experts: usize,
    pub k_in: usize,
    pub n_out: usize,
    pub block_m: usize,
    /// Entries per row of `x`: `top_k` when `x` holds tokens (the first GEMM), 1 when it holds
    /// entries (the second).
    pub x_div: usize,
    /// Entries of the step (`tokens * top_k`): `out` has this many rows.
    pub num_entries: usize,
}

/// Checks a grouped GEMM's buffers and alignment against `s`.
pub fn grouped_gemm_shape(
    s: &GroupedGemmShape,
    out_len: usize,
    x_len: usize,
    w_len: usize,
    align: &MoeAlignment,
) -> Result<(), KernelError> {
    const OP: &str = "grouped_gemm";
    check_shape(
        s.k_in > 0 && s.n_out > 0 && s.x_div > 0 && s.num_experts > 0 && s.block_m > 0,
        OP,
        || format!("{s:?}: every size must be positive"),
    )?;
    check_shape(s.block_m == 64, OP, || {
        format!("block_m {} (the kernel's tiles are 64 rows)", s.block_m)
    })?;
    check_shape(
        s.num_entries.is_multiple_of(s.x_div) && x_len == s.num_entries / s.x_div * s.k_in,
        OP,
        || {
            format!(
                "x has {x_len} elements for {} entries / {} x {}",
                s.num_entries, s.x_div, s.k_in
            )
        },
    )?;
    check_shape(w_len == s.num_experts * s.n_out * s.k_in, OP, || {
        format!(
            "weights have {w_len} elements, expected {} x {} x {}",
            s.num_experts, s.n_out, s.k_in
        )
    })?;
    check_shape(out_len == s.num_entries * s.n_out, OP, || {
        format!(
            "out has {out_len} elements, expected {} x {}",
            s.num_entries, s.n_out
        )
    })?;
    let cap = align_capacity(s.num_entries, s.num_experts, s.block_m);
    check_shape(
        align.sorted_ids.len() == cap
            && align.expert_ids.len() == cap / s.block_m
            && align.num_padded <= cap
            && align.num_padded.is_multiple_of(s.block_m),
        OP,
        || "the alignment does not match the entries, experts and block_m".into(),
    )?;
    Ok(())
}

/// CPU reference: `out[id] = x[id / x_div] · W[expert]ᵀ` for every real entry `id` of the
/// alignment's rows (the rows of each expert's block).
pub fn grouped_gemm<T: Element>(
    out: &mut [T],
    x: &[T],
    w: &[T],
    align: &MoeAlignment,
    s: &GroupedGemmShape,
) -> Result<(), KernelError> {
    grouped_gemm_shape(s, out.len(), x.len(), w.len(), align)?;
    grouped_rows(out, x, align, s, |e, n, c| {
        w[(e * s.n_out + n) * s.k_in + c].to_f32()
    });
    Ok(())
}

/// The grouped GEMMs' common loop: `out[id, n] = Σ_c x[id / x_div, c] · weight(e, n, c)` over
/// the alignment's real entries, `e` each one's expert, products summed in f32 in input order.
fn grouped_rows<T: Element>(
    out: &mut [T],
    x: &[T],
    align: &MoeAlignment,
    s: &GroupedGemmShape,
    weight: impl Fn(usize, usize, usize) -> f32,
) {
    for (r, &id) in align.sorted_ids[..align.num_padded].iter().enumerate() {
        let id = id as usize;
        if id >= s.num_entries {
            continue;
        }
        let e = align.expert_ids[r / s.block_m] as usize;
        let x_row = &x[id / s.x_div * s.k_in..][..s.k_in];
        for n in 0..s.n_out {
            let acc: f32 = x_row
                .iter()
                .enumerate()
                .map(|(c, a)| a.to_f32() * weight(e, n, c))
                .sum();
            out[id * s.n_out + n] = T::from_f32(acc);
        }
    }
}

/// Scale blocks of a grouped W8A16 GEMM's experts: `block_n x block_k` of each `[n_out, k_in]`
/// weight (DeepSeek's 128 x 128; `1 x k_in` for one scale per output channel), edges partial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleBlocks {
    pub block_n: usize,
    pub block_k: usize,
}

impl ScaleBlocks {
    /// Scales of one expert's `[n_out, k_in]` weight.
    pub fn per_expert(&self, n_out: usize, k_in: usize) -> usize {
        n_out.div_ceil(self.block_n.max(1)) * k_in.div_ceil(self.block_k.max(1))
    }
}

/// Checks a grouped W8A16 GEMM's buffers: as [`grouped_gemm_shape`] with `w` the experts' e4m3
/// bytes `[num_experts, n_out, k_in]` and `scales` `[num_experts, scale rows, scale columns]`.
pub fn grouped_w8a16_shape(
    s: &GroupedGemmShape,
    blocks: &ScaleBlocks,
    out_len: usize,
    x_len: usize,
    w_len: usize,
    scales_len: usize,
    align: &MoeAlignment,
) -> Result<(), KernelError> {
    check_shape(
        blocks.block_n > 0 && blocks.block_k > 0,
        "grouped_w8a16",
        || format!("scale blocks of {} x {}", blocks.block_n, blocks.block_k),
    )?;
    grouped_gemm_shape(s, out_len, x_len, w_len, align)?;
    let want = s.num_experts * blocks.per_expert(s.n_out, s.k_in);
    check_shape(scales_len == want, "grouped_w8a16", || {
        format!("scales have {scales_len} elements, expected {want} for {blocks:?}")
    })
}

/// CPU reference of the grouped GEMM over e4m3 experts: as [`grouped_gemm`], each weight its
/// e4m3 value times its block's scale in f32 (`crate::w8a16`'s numerics).
pub fn grouped_w8a16<T: Element>(
    out: &mut [T],
    x: &[T],
    w: &[u8],
    scales: &[f32],
    align: &MoeAlignment,
    s: &GroupedGemmShape,
    blocks: &ScaleBlocks,
) -> Result<(), KernelError> {
    grouped_w8a16_rounded(out, x, w, scales, align, s, blocks, false)
}

/// CPU reference of the tensor-core grouped GEMM over e4m3 experts (prefill): as
/// [`grouped_w8a16`], each weight rounded once to `T` (bf16) as the kernel's tiles hold it.
#[allow(clippy::too_many_arguments)]
pub fn grouped_w8a16_tc<T: Element>(
    out: &mut [T],
    x: &[T],
    w: &[u8],
    scales: &[f32],
    align: &MoeAlignment,
    s: &GroupedGemmShape,
    blocks: &ScaleBlocks,
) -> Result<(), KernelError> {
    grouped_w8a16_rounded(out, x, w, scales, align, s, blocks, true)
}

/// Rounds a dequantized weight to `T` when `round` (the tensor-core tiles' bf16).
fn as_stored<T: Element>(w: f32, round: bool) -> f32 {
    if round {
        T::from_f32(w).to_f32()
    } else {
        w
    }
}

#[allow(clippy::too_many_arguments)]
fn grouped_w8a16_rounded<T: Element>(
    out: &mut [T],
    x: &[T],
    w: &[u8],
    scales: &[f32],
    align: &MoeAlignment,
    s: &GroupedGemmShape,
    blocks: &ScaleBlocks,
    round: bool,
) -> Result<(), KernelError> {
    grouped_w8a16_shape(s, blocks, out.len(), x.len(), w.len(), scales.len(), align)?;
    let per_expert = blocks.per_expert(s.n_out, s.k_in);
    let scale_cols = s.k_in.div_ceil(blocks.block_k);
    grouped_rows(out, x, align, s, |e, n, c| {
        let scale = scales[e * per_expert + n / blocks.block_n * scale_cols + c / blocks.block_k];
        as_stored::<T>(
            crate::w8a16::e4m3_to_f32(w[(e * s.n_out + n) * s.k_in + c]) * scale,
            round,
        )
    });
    Ok(())
}

/// How a grouped W4A16 GEMM's experts are quantized (as [`crate::w4a16::W4a16Shape`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct W4Params {
    /// Inputs per scale and zero point; even, and divides `k_in`.
    pub group_size: usize,
    /// Each dequantized weight rounded to float16 (GPTQ, AWQ).
    pub f16_weights: bool,
    /// e2m1 (FP4) codes rather than integers less a zero point.
    pub e2m1: bool,
    /// A zero point after each scale (else the scales alone: zero point 8, or none for e2m1).
    pub zeros: bool,
    /// Where the group scales are (see [`crate::w4a16::W4Scales`]).
    pub scales: crate::w4a16::W4Scales,
}

impl W4Params {
    /// One expert's `[n_out, k_in]` weight as the W4A16 kernels' shape.
    pub fn shape(&self, n_out: usize, k_in: usize) -> crate::w4a16::W4a16Shape {
        crate::w4a16::W4a16Shape {
            m: 0,
            n: n_out,
            k: k_in,
            group_size: self.group_size,
            f16_weights: self.f16_weights,
            e2m1: self.e2m1,
            zeros: self.zeros,
            scales: self.scales,
        }
    }
}

/// Checks a grouped W4A16 GEMM's buffers: as [`grouped_gemm_shape`] with `codes` the experts'
/// 4-bit codes `[num_experts, n_out, k_in / 2]` and `qparams` `[num_experts, n_out, groups, 2]`.
#[allow(clippy::too_many_arguments)]
pub fn grouped_w4a16_shape(
    s: &GroupedGemmShape,
    params: &W4Params,
    out_len: usize,
    x_len: usize,
    codes_len: usize,
    qparams_len: usize,
    align: &MoeAlignment,
) -> Result<(), KernelError> {
    const OP: &str = "grouped_w4a16";
    let g = params.group_size;
    check_shape(
        g > 0 && g.is_multiple_of(2) && s.k_in.is_multiple_of(g),
        OP,
        || format!("group size {g} must be even and divide k_in {}", s.k_in),
    )?;
    let shape = params.shape(s.n_out, s.k_in);
    // The experts' weights as the dense shape's: codes `k_in / 2` bytes a row (plus its scale
    // bytes), every expert's rows end to end.
    grouped_gemm_shape(
        s,
        out_len,
        x_len,
        codes_len / shape.row_bytes() * s.k_in,
        align,
    )?;
    let want = (
        s.num_experts * shape.codes_len(),
        s.num_experts * shape.qparams_len(),
    );
    check_shape((codes_len, qparams_len) == want, OP, || {
        format!("codes and qparams have {codes_len} and {qparams_len} elements, expected {want:?}")
    })
}

/// CPU reference of the grouped GEMM over 4-bit experts: as [`grouped_gemm`], each weight
/// dequantized as [`crate::w4a16::weight`] does.
#[allow(clippy::too_many_arguments)]
pub fn grouped_w4a16<T: Element>(
    out: &mut [T],
    x: &[T],
    codes: &[u8],
    qparams: &[f32],
    align: &MoeAlignment,
    s: &GroupedGemmShape,
    params: &W4Params,
) -> Result<(), KernelError> {
    grouped_w4a16_rounded(out, x, codes, qparams, align, s, params, false)
}

/// CPU reference of the tensor-core grouped GEMM over 4-bit experts (prefill): as
/// [`grouped_w4a16`], each weight rounded once to `T` (bf16) as the kernel's tiles hold it.
#[allow(clippy::too_many_arguments)]
pub fn grouped_w4a16_tc<T: Element>(
    out: &mut [T],
    x: &[T],
    codes: &[u8],
    qparams: &[f32],
    align: &MoeAlignment,
    s: &GroupedGemmShape,
    params: &W4Params,
) -> Result<(), KernelError> {
    grouped_w4a16_rounded(out, x, codes, qparams, align, s, params, true)
}

#[allow(clippy::too_many_arguments)]
fn grouped_w4a16_rounded<T: Element>(
    out: &mut [T],
    x: &[T],
    codes: &[u8],
    qparams: &[f32],
    align: &MoeAlignment,
    s: &GroupedGemmShape,
    params: &W4Params,
    round: bool,
) -> Result<(), KernelError> {
    grouped_w4a16_shape(
        s,
        params,
        out.len(),
        x.len(),
        codes.len(),
        qparams.len(),
        align,
    )?;
    let shape = params.shape(s.n_out, s.k_in);
    let (codes_per, params_per) = (shape.codes_len(), shape.qparams_len());
    grouped_rows(out, x, align, s, |e, n, c| {
        let (codes, qparams) = (
            &codes[e * codes_per..][..codes_per],
            &qparams[e * params_per..][..params_per],
        );
        as_stored::<T>(crate::w4a16::weight(codes, qparams, &shape, n, c), round)
    });
    Ok(())
}

/// CPU reference of `count_experts`: adds each entry's expert to `counts` (one per expert); ids
/// outside the experts are not counted.
pub fn count_experts(counts: &mut [u64], topk_ids: &[u32]) {
    for &e in topk_ids {
        if let Some(c) = counts.get_mut(e as usize) {
            *c += 1;
        }
    }
}

/// Checks a weighted sum's lengths: `y` `[tokens · top_k, hidden]`, `weights` `[tokens · top_k]`,
/// `out` `[tokens, hidden]`.
pub fn moe_sum_shape(
    out_len: usize,
    y_len: usize,
    weights_len: usize,
    top_k: usize,
    hidden: usize,
) -> Result<(), KernelError> {
    check_shape(
        top_k > 0 && hidden > 0 && y_len == weights_len * hidden && out_len * top_k == y_len,
        "moe_sum",
        || {
            format!("y {y_len} / weights {weights_len} / out {out_len} do not fit top_k {top_k} x hidden {hidden}")
        },
    )
}

/// CPU reference: `out[t] = Σ_j weights[t·top_k + j] · y[t·top_k + j]` (rows of `hidden`).
pub fn moe_sum<T: Element>(
    out: &mut [T],
    y: &[T],
    weights: &[f32],
    top_k: usize,
    hidden: usize,
) -> Result<(), KernelError> {
    moe_sum_shape(out.len(), y.len(), weights.len(), top_k, hidden)?;
    for (t, o) in out.chunks_exact_mut(hidden).enumerate() {
        for (d, o) in o.iter_mut().enumerate() {
            let acc: f32 = (0..top_k)
                .map(|j| weights[t * top_k + j] * y[(t * top_k + j) * hidden + d].to_f32())
                .sum();
            *o = T::from_f32(acc);
        }
    }
    Ok(())
}

/// The launchers of the fused MoE's pieces on the GPU, in a file of their own (with them this
/// would pass 800 lines).
#[cfg(feature = "cuda")]
pub(crate) mod cuda;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_sort_by_expert_in_order_and_pad_each_run() {
        // 3 tokens x top-2: entries 0..6 choose experts 2,0 | 0,1 | 2,0.
        let a = moe_align(&[2, 0, 0, 1, 2, 0], 3, 4).unwrap();
        assert_eq!(a.num_padded, 12);
        assert_eq!(&a.sorted_ids[..12], &[1, 2, 5, 6, 3, 6, 6, 6, 0, 4, 6, 6]);
        assert_eq!(&a.expert_ids[..3], &[0, 1, 2]);
        assert_eq!(a.sorted_ids.len(), align_capacity(6, 3, 4));
        assert!(moe_align(&[3], 3, 4).is_err());
    }

    /// Over e4m3 experts with 2 x 3 scale blocks (ragged edges), the grouped W8A16 GEMM is the
    /// grouped GEMM over the dequantized weights, bit for bit (the same f32 weights and sums).
    #[test]
    fn the_grouped_w8a16_gemm_is_the_grouped_gemm_over_dequantized_experts() {
        let (experts, n_out, k_in, tokens, top_k) = (3, 5, 7, 4, 2);
        let blocks = ScaleBlocks {
            block_n: 2,
            block_k: 3,
        };
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed >> 8
        };
        // Finite e4m3 codes only (0x7F / 0xFF are NaN).
        let w: Vec<u8> = (0..experts * n_out * k_in)
            .map(|_| (next() % 0x7F) as u8 | if next() % 2 == 0 { 0x80 } else { 0 })
            .collect();
        let scales: Vec<f32> = (0..experts * blocks.per_expert(n_out, k_in))
            .map(|_| (next() % 1000) as f32 / 4000.0 + 0.01)
            .collect();
        let x: Vec<f32> = (0..tokens * k_in)
            .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
            .collect();
        let ids: Vec<u32> = (0..tokens * top_k).map(|i| (i % experts) as u32).collect();
        let align = moe_align(&ids, experts, 64).unwrap();
        let s = GroupedGemmShape {
            num_experts: experts,
            k_in,
            n_out,
            block_m: 64,
            x_div: top_k,
            num_entries: tokens * top_k,
        };
        let per = blocks.per_expert(n_out, k_in);
        let cols = k_in.div_ceil(blocks.block_k);
        let dense: Vec<f32> = (0..experts * n_out * k_in)
            .map(|i| {
                let (e, n, c) = (i / (n_out * k_in), i / k_in % n_out, i % k_in);
                crate::w8a16::e4m3_to_f32(w[i])
                    * scales[e * per + n / blocks.block_n * cols + c / blocks.block_k]
            })
            .collect();
        let mut want = vec![0f32; tokens * top_k * n_out];
        grouped_gemm(&mut want, &x, &dense, &align, &s).unwrap();
        let mut got = vec![0f32; want.len()];
        grouped_w8a16(&mut got, &x, &w, &scales, &align, &s, &blocks).unwrap();
        assert_eq!(got, want);
        assert!(got.iter().any(|&v| v != 0.0));
        let err = grouped_w8a16(&mut got, &x, &w, &scales[1..], &align, &s, &blocks).unwrap_err();
        assert!(err.to_string().contains("scales"), "{err}");
    }

    /// Over 4-bit experts (integer with zero points, float16-rounded, and e2m1), the grouped
    /// W4A16 GEMM is the grouped GEMM over the dequantized weights, bit for bit.
    #[test]
    fn the_grouped_w4a16_gemm_is_the_grouped_gemm_over_dequantized_experts() {
        let (experts, n_out, k_in, tokens, top_k) = (3, 5, 8, 4, 2);
        let mut seed = 11u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed >> 8
        };
        let x: Vec<f32> = (0..tokens * k_in)
            .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
            .collect();
        let ids: Vec<u32> = (0..tokens * top_k)
            .map(|i| ((i * 2) % experts) as u32)
            .collect();
        let align = moe_align(&ids, experts, 64).unwrap();
        let s = GroupedGemmShape {
            num_experts: experts,
            k_in,
            n_out,
            block_m: 64,
            x_div: top_k,
            num_entries: tokens * top_k,
        };
        use crate::w4a16::W4Scales;
        for (f16_weights, e2m1, zeros, scales) in [
            (false, false, true, W4Scales::F32),
            (true, false, true, W4Scales::F32),
            (false, true, false, W4Scales::F32),
            (false, false, false, W4Scales::F32),
            (false, true, false, W4Scales::E4m3Times),
            (false, true, false, W4Scales::E4m3Over),
            (false, true, false, W4Scales::Ue8m0),
        ] {
            let params = W4Params {
                group_size: 4,
                f16_weights,
                e2m1,
                zeros,
                scales,
            };
            let shape = params.shape(n_out, k_in);
            // Every row's codes, then (byte scales) its scale bytes: finite e4m3 (0x08-0x6f) or
            // e8m0 powers of two from 2^-27 to 2^12.
            let codes: Vec<u8> = (0..experts * shape.codes_len())
                .map(|i| match (scales, i % shape.row_bytes() >= k_in / 2) {
                    (W4Scales::F32, _) | (_, false) => next() as u8,
                    (W4Scales::Ue8m0, true) => 100 + (next() % 40) as u8,
                    (_, true) => 8 + (next() % 0x68) as u8,
                })
                .collect();
            let qparams: Vec<f32> = (0..experts * shape.qparams_len())
                .map(|i| {
                    if zeros && i % 2 == 1 {
                        (next() % 16) as f32
                    } else {
                        (next() % 1000) as f32 / 7000.0 + 0.01
                    }
                })
                .collect();
            let per = (shape.codes_len(), shape.qparams_len());
            let dense: Vec<f32> = (0..experts * n_out * k_in)
                .map(|i| {
                    let (e, n, c) = (i / (n_out * k_in), i / k_in % n_out, i % k_in);
                    crate::w4a16::weight(
                        &codes[e * per.0..][..per.0],
                        &qparams[e * per.1..][..per.1],
                        &shape,
                        n,
                        c,
                    )
                })
                .collect();
            let mut want = vec![0f32; tokens * top_k * n_out];
            grouped_gemm(&mut want, &x, &dense, &align, &s).unwrap();
            let mut got = vec![0f32; want.len()];
            grouped_w4a16(&mut got, &x, &codes, &qparams, &align, &s, &params).unwrap();
            assert_eq!(got, want, "{params:?}");
            assert!(got.iter().any(|&v| v != 0.0));
        }
    }

    /// The tensor-core kernels' references: the grouped GEMM over each weight rounded once to
    /// the activations' dtype (bf16 for the kernels); in f32 that is the SIMT reference itself.
    #[test]
    fn the_tensor_core_references_round_each_weight_to_the_activations_dtype() {
        let (experts, n_out, k_in) = (2, 3, 8);
        let ids = [1u32, 0, 1];
        let align = moe_align(&ids, experts, 64).unwrap();
        let s = GroupedGemmShape {
            num_experts: experts,
            k_in,
            n_out,
            block_m: 64,
            x_div: 1,
            num_entries: ids.len(),
        };
        let blocks = ScaleBlocks {
            block_n: 1,
            block_k: k_in,
        };
        let w: Vec<u8> = (0..experts * n_out * k_in)
            .map(|i| (i * 37 % 0x70) as u8)
            .collect();
        // Scales that make most weights inexact in bf16.
        let scales: Vec<f32> = (0..experts * n_out)
            .map(|i| 0.3 + i as f32 * 0.017)
            .collect();
        let xf: Vec<f32> = (0..ids.len() * k_in)
            .map(|i| (i % 5) as f32 - 2.0)
            .collect();
        let mut simt = vec![0f32; ids.len() * n_out];
        let mut tc = simt.clone();
        grouped_w8a16(&mut simt, &xf, &w, &scales, &align, &s, &blocks).unwrap();
        grouped_w8a16_tc(&mut tc, &xf, &w, &scales, &align, &s, &blocks).unwrap();
        assert_eq!(tc, simt, "f32: nothing to round");
        let xb: Vec<half::bf16> = xf.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let dense: Vec<half::bf16> = (0..w.len())
            .map(|i| half::bf16::from_f32(crate::w8a16::e4m3_to_f32(w[i]) * scales[i / k_in]))
            .collect();
        let mut want = vec![half::bf16::ZERO; ids.len() * n_out];
        grouped_gemm(&mut want, &xb, &dense, &align, &s).unwrap();
        let mut got = want.clone();
        grouped_w8a16_tc(&mut got, &xb, &w, &scales, &align, &s, &blocks).unwrap();
        assert_eq!(got, want);
        let mut unrounded = want.clone();
        grouped_w8a16(&mut unrounded, &xb, &w, &scales, &align, &s, &blocks).unwrap();
        assert_ne!(got, unrounded, "the weights' rounding shows");
    }

    #[test]
    fn the_grouped_gemm_runs_each_entry_through_its_expert() {
        // 2 tokens x top-1, experts 1 and 0; k_in 2, n_out 1: W0 = [1 0], W1 = [0 1].
        let ids = [1u32, 0];
        let align = moe_align(&ids, 2, 64).unwrap();
        let s = GroupedGemmShape {
            num_experts: 2,
            k_in: 2,
            n_out: 1,
            block_m: 64,
            x_div: 1,
            num_entries: 2,
        };
        let mut out = [0f32; 2];
        grouped_gemm(
            &mut out,
            &[3.0, 4.0, 5.0, 6.0],
            &[1.0, 0.0, 0.0, 1.0],
            &align,
            &s,
        )
        .unwrap();
        assert_eq!(out, [4.0, 5.0]);
        let mut sum = [0f32; 1];
        moe_sum(&mut sum, &out, &[0.25, 0.5], 2, 1).unwrap();
        assert_eq!(sum, [3.5]);
    }
}
