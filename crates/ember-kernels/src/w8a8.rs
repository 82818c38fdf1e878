//! W8A8 FP8 GEMM, as DeepSeek-V3 / Kimi K2 FP8 checkpoints were trained to run: activations
//! quantized on the fly to e4m3 per token and per group of 128 input channels (one f32 scale each,
//! `amax / 448`), weights e4m3 with `block_n x block_k` block scales (`block_k` must be the
//! activation group, 128), and `y[r, j] = Σ_kb (Σ_{c in kb} qa[r, c] · qw[j, c]) · sa[r, kb] ·
//! sw[j / block_n, kb]`: e4m3 products summed per 128-channel block, then scaled and added in f32
//! (DeepSeek's promotion every 128 products). On Hopper and Blackwell (sm_89 and up) the inner
//! sums run on FP8 tensor cores (`kernels/w8a8.cu`, `mma.sync` m16n8k32); sm_80 has none, and
//! keeps the W8A16 path.
//!
//! Numerics shared with the kernels: [`quantize_groups`] is bit-exact (the scale in f32, `x /
//! scale` in f32, rounded to nearest even and saturated to ±448 as `__nv_cvt_float_to_fp8` does
//! with `__NV_SATFINITE`); every e4m3 product is exact in f32, so each block's inner sum differs
//! only by the order (and the tensor cores' accumulation) of its additions.

use crate::error::check_shape;
use crate::w8a16::e4m3_to_f32;
use crate::{Element, KernelError};

/// float8_e4m3fn's largest finite value.
pub const E4M3_MAX: f32 = 448.0;
/// Input channels per activation scale (and the weights' `block_k`).
pub const GROUP: usize = 128;
/// The smallest activation scale, as vLLM's `per_token_group_quant_fp8` floors `amax` (1e-10 /
/// 448): an all-zero group gets a finite scale.
pub const MIN_AMAX: f32 = 1e-10;

/// The sizes of one W8A8 GEMM: `x` `[m, k]`, `W` `[n, k]` with `block_n x 128` scale blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct W8a8Shape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub block_n: usize,
}

impl W8a8Shape {
    /// Activation scales: one per row and group of 128 inputs (the last group may be partial).
    pub fn act_scale_len(&self) -> usize {
        self.m * self.k.div_ceil(GROUP)
    }

    /// Weight scales: `[ceil(n / block_n), ceil(k / 128)]`.
    pub fn weight_scale_len(&self) -> usize {
        self.n.div_ceil(self.block_n.max(1)) * self.k.div_ceil(GROUP)
    }
}

/// Checks a call's buffers.
pub fn w8a8_shape(
    s: &W8a8Shape,
    qa_len: usize,
    sa_len: usize,
    qw_len: usize,
    sw_len: usize,
    y_len: usize,
) -> Result<(), KernelError> {
    check_shape(s.block_n > 0 && s.k > 0, "w8a8_gemm", || {
        format!("{s:?}: block_n and k must be positive")
    })?;
    for (what, len, want) in [
        ("activations", qa_len, s.m * s.k),
        ("activation scales", sa_len, s.act_scale_len()),
        ("weights", qw_len, s.n * s.k),
        ("weight scales", sw_len, s.weight_scale_len()),
        ("y", y_len, s.m * s.n),
    ] {
        check_shape(len == want, "w8a8_gemm", || {
            format!("{what} have {len} elements, expected {want} for {s:?}")
        })?;
    }
    Ok(())
}

/// f32 to e4m3, rounded to nearest even and saturated to ±448 (NaN stays NaN).
pub fn f32_to_e4m3(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7F;
    }
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs().min(E4M3_MAX);
    // Codes 0x00..=0x7E are the non-negative finite values in increasing order.
    let (mut lo, mut hi) = (0u8, 0x7E);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if e4m3_to_f32(mid) <= a {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (dl, dh) = (a - e4m3_to_f32(lo), e4m3_to_f32(hi) - a);
    let code = if dl < dh || (dl == dh && lo % 2 == 0) {
        lo
    } else {
        hi
    };
    sign | code
}

/// CPU reference of `quant_fp8_groups`: each row of `x` (`[m, k]`) in groups of 128 inputs, the
/// group's scale `max(amax, 1e-10) / 448` and its values `x / scale` as e4m3. Returns the bytes
/// `[m, k]` and the scales `[m, ceil(k / 128)]`.
pub fn quantize_groups<T: Element>(x: &[T], k: usize) -> Result<(Vec<u8>, Vec<f32>), KernelError> {
    check_shape(
        k > 0 && x.len().is_multiple_of(k),
        "quant_fp8_groups",
        || format!("x has {} elements, not rows of {k}", x.len()),
    )?;
    let mut q = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len() / k * k.div_ceil(GROUP));
    for row in x.chunks_exact(k) {
        for group in row.chunks(GROUP) {
            let amax = group.iter().fold(0f32, |m, v| m.max(v.to_f32().abs()));
            let scale = amax.max(MIN_AMAX) / E4M3_MAX;
            scales.push(scale);
            q.extend(group.iter().map(|v| f32_to_e4m3(v.to_f32() / scale)));
        }
    }
    Ok((q, scales))
}

/// CPU reference of `w8a8_gemm` (see the module doc): each block's e4m3 products summed in f32
/// in input order, then scaled and added in block order.
pub fn w8a8_gemm<T: Element>(
    qa: &[u8],
    sa: &[f32],
    qw: &[u8],
    sw: &[f32],
    s: &W8a8Shape,
    y: &mut [T],
) -> Result<(), KernelError> {
    w8a8_shape(s, qa.len(), sa.len(), qw.len(), sw.len(), y.len())?;
    let blocks = s.k.div_ceil(GROUP);
    for r in 0..s.m {
        for j in 0..s.n {
            let mut acc = 0f32;
            for kb in 0..blocks {
                let cols = kb * GROUP..((kb + 1) * GROUP).min(s.k);
                let inner: f32 = cols
                    .map(|c| e4m3_to_f32(qa[r * s.k + c]) * e4m3_to_f32(qw[j * s.k + c]))
                    .sum();
                acc += inner * sa[r * blocks + kb] * sw[(j / s.block_n) * blocks + kb];
            }
            y[r * s.n + j] = T::from_f32(acc);
        }
    }
    Ok(())
}

/// CPU reference of `grouped_w8a8`, the fused MoE's grouped GEMM over e4m3 experts under W8A8:
/// for every real entry `id` of the alignment, `out[id] = x[id / x_div] · W[e]ᵀ` with `x` given as
/// its quantized rows `qa` `[rows, k_in]` and scales `sa` `[rows, ceil(k_in / 128)]`, expert `e`'s
/// weights `qw` `[e, n_out, k_in]` and scales `sw` `[e, ceil(n_out / block_n), ceil(k_in / 128)]`,
/// summed as [`w8a8_gemm`] sums.
#[allow(clippy::too_many_arguments)]
pub fn grouped_w8a8<T: Element>(
    out: &mut [T],
    qa: &[u8],
    sa: &[f32],
    qw: &[u8],
    sw: &[f32],
    align: &crate::fused_moe::MoeAlignment,
    s: &crate::fused_moe::GroupedGemmShape,
    block_n: usize,
) -> Result<(), KernelError> {
    let lens = [out.len(), qa.len(), sa.len(), qw.len(), sw.len()];
    grouped_w8a8_shape(s, block_n, lens, align)?;
    let blocks = s.k_in.div_ceil(GROUP);
    let per_expert = s.n_out.div_ceil(block_n) * blocks;
    for (r, &id) in align.sorted_ids[..align.num_padded].iter().enumerate() {
        let id = id as usize;
        if id >= s.num_entries {
            continue;
        }
        let e = align.expert_ids[r / s.block_m] as usize;
        let row = id / s.x_div;
        for j in 0..s.n_out {
            let mut acc = 0f32;
            for kb in 0..blocks {
                let inner: f32 = (kb * GROUP..((kb + 1) * GROUP).min(s.k_in))
                    .map(|c| {
                        e4m3_to_f32(qa[row * s.k_in + c])
                            * e4m3_to_f32(qw[(e * s.n_out + j) * s.k_in + c])
                    })
                    .sum();
                acc += inner
                    * sa[row * blocks + kb]
                    * sw[e * per_expert + (j / block_n) * blocks + kb];
            }
            out[id * s.n_out + j] = T::from_f32(acc);
        }
    }
    Ok(())
}

/// Checks a grouped W8A8 GEMM's buffers by their lengths `[out, qa, sa, qw, sw]` (see
/// [`grouped_w8a8`]).
pub fn grouped_w8a8_shape(
    s: &crate::fused_moe::GroupedGemmShape,
    block_n: usize,
    [out_len, qa_len, sa_len, qw_len, sw_len]: [usize; 5],
    align: &crate::fused_moe::MoeAlignment,
) -> Result<(), KernelError> {
    check_shape(block_n > 0, "grouped_w8a8", || {
        "block_n must be positive".into()
    })?;
    crate::fused_moe::grouped_gemm_shape(s, out_len, qa_len, qw_len, align)?;
    let rows = s.num_entries / s.x_div;
    let blocks = s.k_in.div_ceil(GROUP);
    for (what, len, want) in [
        ("activation scales", sa_len, rows * blocks),
        (
            "weight scales",
            sw_len,
            s.num_experts * s.n_out.div_ceil(block_n) * blocks,
        ),
    ] {
        check_shape(len == want, "grouped_w8a8", || {
            format!("{what} have {len} elements, expected {want}")
        })?;
    }
    Ok(())
}

/// The launchers: [`quantize_groups`], [`w8a8_gemm`] and [`grouped_w8a8`] on the GPU.
#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, PushKernelArg};

    use super::{grouped_w8a8_shape, w8a8_shape, W8a8Shape, GROUP};
    use crate::cuda::{
        check_e4m3_bytes, grid_launch, grid_y_blocks, int32, kernel, too_big, CudaElement,
        CudaKernels, DeviceAlignment,
    };
    use crate::error::check_shape;
    use crate::fused_moe::cuda::{grouped_ints, push_alignment};
    use crate::fused_moe::GroupedGemmShape;
    use crate::KernelError;

    impl CudaKernels {
        /// Whether the GPU has FP8 tensor cores (compute capability 8.9 and up), which
        /// [`CudaKernels::w8a8_gemm`] needs.
        pub fn has_fp8_tensor_cores(&self) -> Result<bool, KernelError> {
            Ok(self.stream.context().compute_capability()? >= (8, 9))
        }

        /// Errs unless the GPU has FP8 tensor cores, which `op` runs on.
        fn check_fp8_tensor_cores(&self, op: &'static str) -> Result<(), KernelError> {
            check_shape(self.has_fp8_tensor_cores()?, op, || {
                "this GPU has no FP8 tensor cores (compute capability below 8.9)".into()
            })
        }

        /// [`crate::w8a8::quantize_groups`] on the GPU: `x` `[m, k]` to e4m3 bytes `q` `[m, k]` and
        /// scales `[m, ceil(k / 128)]`.
        pub fn quant_fp8_groups<T: CudaElement>(
            &self,
            x: &CudaView<T>,
            k: usize,
            q: &mut CudaSlice<u8>,
            scales: &mut CudaSlice<f32>,
        ) -> Result<(), KernelError> {
            const OP: &str = "quant_fp8_groups";
            check_shape(k > 0 && x.len().is_multiple_of(k), OP, || {
                format!("x has {} elements, not rows of {k}", x.len())
            })?;
            let m = x.len() / k;
            let groups = k.div_ceil(GROUP);
            check_shape(q.len() == m * k && scales.len() == m * groups, OP, || {
                format!(
                    "q has {} and scales {} elements for [{m}, {k}]",
                    q.len(),
                    scales.len()
                )
            })?;
            if m == 0 {
                return Ok(());
            }
            let (m_arg, k_arg) = (int32(OP, "m", m)?, int32(OP, "k", k)?);
            let items = m * groups;
            let blocks = u32::try_from(items.div_ceil(8)).map_err(|_| too_big(OP, "rows", m))?;
            let f = kernel(&self.w8a8, OP, T::KERNEL_SUFFIX)?;
            let mut launch = self.stream.launch_builder(&f);
            launch.arg(q).arg(scales).arg(x).arg(&m_arg).arg(&k_arg);
            // SAFETY: matches quant_fp8_groups_<T>(u8*, float*, const T*, int, int) in
            // kernels/w8a8.cu: one warp per (row, group), 8 a block; lengths checked above.
            unsafe { launch.launch(grid_launch((blocks, 1), 256)) }?;
            Ok(())
        }

        /// [`crate::w8a8::w8a8_gemm`] on FP8 tensor cores; `qw` e4m3 bytes as any one-byte element.
        /// Refused on a GPU without them ([`CudaKernels::has_fp8_tensor_cores`]).
        #[allow(clippy::too_many_arguments)]
        pub fn w8a8_gemm<T: CudaElement, P: DeviceRepr>(
            &self,
            qa: &CudaView<u8>,
            sa: &CudaView<f32>,
            qw: &CudaView<P>,
            sw: &CudaView<f32>,
            shape: &W8a8Shape,
            y: &mut CudaSlice<T>,
        ) -> Result<(), KernelError> {
            const OP: &str = "w8a8_gemm";
            check_e4m3_bytes::<P>(OP)?;
            w8a8_shape(shape, qa.len(), sa.len(), qw.len(), sw.len(), y.len())?;
            self.check_fp8_tensor_cores(OP)?;
            let s = shape;
            if s.m == 0 || s.n == 0 {
                return Ok(());
            }
            let int = |what: &str, v: usize| int32(OP, what, v);
            let args = [
                int("m", s.m)?,
                int("n", s.n)?,
                int("k", s.k)?,
                int("block_n", s.block_n)?,
            ];
            let f = kernel(&self.w8a8, OP, T::KERNEL_SUFFIX)?;
            let mut launch = self.stream.launch_builder(&f);
            launch.arg(y).arg(qa).arg(sa).arg(qw).arg(sw);
            for a in &args {
                launch.arg(a);
            }
            let m_tiles = u32::try_from(s.m.div_ceil(64)).map_err(|_| too_big(OP, "m", s.m))?;
            let cfg = grid_launch((m_tiles, grid_y_blocks(OP, "n", s.n, 64)?), 128);
            // SAFETY: matches w8a8_gemm_<T>(T*, const u8*, const float*, const u8*, const float*,
            // int x 4) in kernels/w8a8.cu, launched with its 128 threads; w8a8_shape bounds every
            // row, input and scale it reads, and it writes only rows < m and columns < n.
            unsafe { launch.launch(cfg) }?;
            Ok(())
        }

        /// [`crate::w8a8::grouped_w8a8`] on FP8 tensor cores over an alignment
        /// [`CudaKernels::moe_align`] made (`shape.block_m` must be 64); `qa`/`sa` the activation
        /// rows quantized by [`CudaKernels::quant_fp8_groups`].
        #[allow(clippy::too_many_arguments)]
        pub fn grouped_w8a8<T: CudaElement, P: DeviceRepr>(
            &self,
            out: &mut CudaSlice<T>,
            qa: &CudaView<u8>,
            sa: &CudaView<f32>,
            qw: &CudaView<P>,
            sw: &CudaView<f32>,
            align: &DeviceAlignment,
            shape: &GroupedGemmShape,
            block_n: usize,
        ) -> Result<(), KernelError> {
            const OP: &str = "grouped_w8a8";
            let s = shape;
            check_e4m3_bytes::<P>(OP)?;
            let (cap, host) = self.check_alignment(OP, align, s)?;
            let lens = [out.len(), qa.len(), sa.len(), qw.len(), sw.len()];
            grouped_w8a8_shape(s, block_n, lens, &host)?;
            self.check_fp8_tensor_cores(OP)?;
            if s.num_entries == 0 {
                return Ok(());
            }
            let args = grouped_ints(OP, s, &[int32(OP, "block_n", block_n)?])?;
            let f = kernel(&self.w8a8, OP, T::KERNEL_SUFFIX)?;
            let mut launch = self.stream.launch_builder(&f);
            launch.arg(out).arg(qa).arg(sa).arg(qw).arg(sw);
            push_alignment(&mut launch, align);
            for a in &args {
                launch.arg(a);
            }
            let blocks_n = grid_y_blocks(OP, "n_out", s.n_out, 64)?;
            let cfg = grid_launch(((cap / s.block_m) as u32, blocks_n), 128);
            // SAFETY: matches grouped_w8a8_<T>(T*, const u8*, const float*, const u8*, const
            // float*, const unsigned* x 3, int x 6) in kernels/w8a8.cu, launched with its 128
            // threads; the kernel reads activation rows of entries < num_entries and weights and
            // scales of experts < num_experts within the lengths checked above, and writes rows of
            // those entries.
            unsafe { launch.launch(cfg) }?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_encoding_rounds_to_nearest_even_and_saturates() {
        for code in 0..=0x7Eu8 {
            let v = e4m3_to_f32(code);
            assert_eq!(f32_to_e4m3(v), code, "{v}");
            assert_eq!(f32_to_e4m3(-v), code | 0x80, "-{v}");
        }
        // 1.0 (0x38) and 1.125 (0x39): the midpoint goes to the even code.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.07), 0x39);
        // 1.125 and 1.25: the midpoint 1.1875 goes to the even 1.25 (0x3A).
        assert_eq!(f32_to_e4m3(1.1875), 0x3A);
        assert_eq!(f32_to_e4m3(1e6), 0x7E);
        assert_eq!(f32_to_e4m3(-1e6), 0xFE);
        assert_eq!(f32_to_e4m3(2f32.powi(-11)), 0x00); // below half the smallest subnormal
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7F);
    }

    /// The encoder agrees with the float8 crate (candle's e4m3) on values across the range.
    #[test]
    fn e4m3_encoding_matches_the_float8_crate() {
        let mut v = 2f32.powi(-10);
        while v < 460.0 {
            for x in [v, -v, v * 1.03, v * 0.97] {
                let theirs = float8::F8E4M3::from_f32(x.clamp(-448.0, 448.0)).to_bits();
                assert_eq!(f32_to_e4m3(x), theirs, "{x}");
            }
            v *= 1.07;
        }
    }

    #[test]
    fn the_gemm_of_quantized_activations_approximates_the_f32_product() {
        let (m, n, k) = (3, 5, 300);
        let mut seed = 3u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        };
        let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| next() * 0.1).collect();
        let s = W8a8Shape {
            m,
            n,
            k,
            block_n: 2,
        };
        let (qa, sa) = quantize_groups(&x, k).unwrap();
        assert_eq!(sa.len(), s.act_scale_len());
        // Weights: per block of 2 x 128, scale amax / 448.
        let blocks = k.div_ceil(GROUP);
        let mut sw = vec![0f32; s.weight_scale_len()];
        for (b, scale) in sw.iter_mut().enumerate() {
            let (rb, kb) = (b / blocks, b % blocks);
            let amax = (rb * 2..(rb * 2 + 2).min(n))
                .flat_map(|j| (kb * GROUP..((kb + 1) * GROUP).min(k)).map(move |c| (j, c)))
                .fold(0f32, |a, (j, c)| a.max(w[j * k + c].abs()));
            *scale = amax / E4M3_MAX;
        }
        let qw: Vec<u8> = (0..n * k)
            .map(|i| f32_to_e4m3(w[i] / sw[(i / k / 2) * blocks + (i % k) / GROUP]))
            .collect();
        let mut y = vec![0f32; m * n];
        w8a8_gemm(&qa, &sa, &qw, &sw, &s, &mut y).unwrap();
        for r in 0..m {
            for j in 0..n {
                let exact: f32 = (0..k).map(|c| x[r * k + c] * w[j * k + c]).sum();
                let scale: f32 = (0..k).map(|c| (x[r * k + c] * w[j * k + c]).abs()).sum();
                assert!(
                    (y[r * n + j] - exact).abs() < 0.05 * scale,
                    "{r},{j}: {} vs {exact}",
                    y[r * n + j]
                );
            }
        }
        assert!(w8a8_gemm(&qa, &sa[1..], &qw, &sw, &s, &mut y).is_err());
    }

    /// The grouped form is the dense form per expert: each entry's row through its expert's
    /// weights and scales, as [`w8a8_gemm`] of that row alone.
    #[test]
    fn the_grouped_w8a8_gemm_is_the_dense_one_per_entry() {
        use crate::fused_moe::{moe_align, GroupedGemmShape};
        let (experts, n, k, tokens, top_k, block_n) = (3, 6, 200, 5, 2, 4);
        let mut seed = 9u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed >> 8
        };
        let x: Vec<f32> = (0..tokens * k)
            .map(|_| (next() % 2000) as f32 / 500.0 - 2.0)
            .collect();
        let (qa, sa) = quantize_groups(&x, k).unwrap();
        let qw: Vec<u8> = (0..experts * n * k)
            .map(|_| (next() % 0x7F) as u8)
            .collect();
        let dense = W8a8Shape {
            m: 1,
            n,
            k,
            block_n,
        };
        let per = dense.weight_scale_len();
        let sw: Vec<f32> = (0..experts * per)
            .map(|_| (next() % 100 + 1) as f32 / 1000.0)
            .collect();
        let ids: Vec<u32> = (0..tokens * top_k).map(|i| (i % experts) as u32).collect();
        let align = moe_align(&ids, experts, 64).unwrap();
        let s = GroupedGemmShape {
            num_experts: experts,
            k_in: k,
            n_out: n,
            block_m: 64,
            x_div: top_k,
            num_entries: tokens * top_k,
        };
        let mut got = vec![0f32; tokens * top_k * n];
        grouped_w8a8(&mut got, &qa, &sa, &qw, &sw, &align, &s, block_n).unwrap();
        let blocks = k.div_ceil(GROUP);
        for (id, &e) in ids.iter().enumerate() {
            let (e, row) = (e as usize, id / top_k);
            let mut want = vec![0f32; n];
            w8a8_gemm(
                &qa[row * k..][..k],
                &sa[row * blocks..][..blocks],
                &qw[e * n * k..][..n * k],
                &sw[e * per..][..per],
                &dense,
                &mut want,
            )
            .unwrap();
            assert_eq!(&got[id * n..][..n], &want[..], "entry {id}");
        }
    }
}
