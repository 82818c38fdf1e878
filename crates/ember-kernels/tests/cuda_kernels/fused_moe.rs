use super::*;
use cudarc::driver::CudaView;
use ember_kernels::fused_moe::{self, ScaleBlocks, W4Params};
use ember_kernels::silu_and_mul;
use ember_kernels::w4a16::{self, W4a16Shape};
use ember_kernels::KernelError;

/// The fused MoE pipeline (align, grouped GEMM, SiLU-and-mul, grouped GEMM, weighted sum) on the
/// GPU against the CPU references, for Qwen3-30B-A3B-like and DeepSeek-like (narrower) layers.
/// The alignment must be identical; outputs within f32 1e-4 relative + 1e-5, or for bf16 (whose
/// intermediates round to bf16 on both sides, so an ulp flip upstream carries) 3 bf16 ulps
/// (3/128 relative) + 2e-3.
fn check_fused_moe<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    use ember_kernels::fused_moe::{self, GroupedGemmShape};
    let st = k.stream();
    let (rel, abs) = if T::KERNEL_SUFFIX == "bf16" {
        (3.0 / 128.0, 2e-3)
    } else {
        (1e-4, 1e-5)
    };
    // (tokens, experts, top_k, hidden, intermediate)
    for (tokens, experts, top_k, hidden, inter) in [
        (1, 128, 8, 256, 96),
        (37, 128, 8, 512, 96),
        (300, 64, 6, 200, 72),
    ] {
        let what = format!(
            "fused_moe_{} t{tokens} e{experts} k{top_k}",
            T::KERNEL_SUFFIX
        );
        // Distinct experts per token, drawn at random.
        let mut ids = Vec::with_capacity(tokens * top_k);
        for _ in 0..tokens {
            let mut all: Vec<u32> = (0..experts as u32).collect();
            for i in 0..top_k {
                let j = rng.random_range(i..experts);
                all.swap(i, j);
            }
            ids.extend_from_slice(&all[..top_k]);
        }
        let n = ids.len();
        let weights: Vec<f32> = (0..n).map(|_| rng.random_range(0.0f32..0.5)).collect();
        let x: Vec<T> = random(rng, tokens * hidden, -1.0, 1.0);
        let w1: Vec<T> = random(rng, experts * 2 * inter * hidden, -0.1, 0.1);
        let w2: Vec<T> = random(rng, experts * hidden * inter, -0.1, 0.1);
        let s1 = GroupedGemmShape {
            num_experts: experts,
            k_in: hidden,
            n_out: 2 * inter,
            block_m: 64,
            x_div: top_k,
            num_entries: n,
        };
        let s2 = GroupedGemmShape {
            k_in: inter,
            n_out: hidden,
            x_div: 1,
            ..s1
        };
        // CPU.
        let align = fused_moe::moe_align(&ids, experts, 64).unwrap();
        let mut h1 = vec![T::from_f32(0.0); n * 2 * inter];
        fused_moe::grouped_gemm(&mut h1, &x, &w1, &align, &s1).unwrap();
        let mut act = vec![T::from_f32(0.0); n * inter];
        silu_and_mul::silu_and_mul(&h1, inter, &mut act).unwrap();
        let mut h2 = vec![T::from_f32(0.0); n * hidden];
        fused_moe::grouped_gemm(&mut h2, &act, &w2, &align, &s2).unwrap();
        let mut cpu = vec![T::from_f32(0.0); tokens * hidden];
        fused_moe::moe_sum(&mut cpu, &h2, &weights, top_k, hidden).unwrap();
        // GPU.
        let dids = st.clone_htod(&ids).unwrap();
        let dalign = k.moe_align(&dids.as_view(), experts, 64).unwrap();
        assert_eq!(
            st.clone_dtoh(&dalign.sorted_ids).unwrap(),
            align.sorted_ids,
            "{what}: sorted ids"
        );
        assert_eq!(
            st.clone_dtoh(&dalign.expert_ids).unwrap(),
            align.expert_ids,
            "{what}: expert ids"
        );
        assert_eq!(
            st.clone_dtoh(&dalign.num_padded).unwrap(),
            vec![align.num_padded as u32],
            "{what}: padded rows"
        );
        // The per-expert token counters /metrics reads, added to twice.
        let mut want = vec![0u64; experts];
        fused_moe::count_experts(&mut want, &ids);
        fused_moe::count_experts(&mut want, &ids);
        let mut dcounts = st.alloc_zeros::<u64>(experts).unwrap();
        k.count_experts(&mut dcounts, &dids.as_view()).unwrap();
        k.count_experts(&mut dcounts, &dids.as_view()).unwrap();
        assert_eq!(
            st.clone_dtoh(&dcounts).unwrap(),
            want,
            "{what}: expert counts"
        );
        let (dx, dw1, dw2) = (
            st.clone_htod(&x).unwrap(),
            st.clone_htod(&w1).unwrap(),
            st.clone_htod(&w2).unwrap(),
        );
        let mut dh1 = st.alloc_zeros::<T>(h1.len()).unwrap();
        k.grouped_gemm(&mut dh1, &dx.as_view(), &dw1.as_view(), &dalign, &s1)
            .unwrap();
        let mut dact = st.alloc_zeros::<T>(act.len()).unwrap();
        k.silu_and_mul(&dh1.as_view(), inter, &mut dact).unwrap();
        let mut dh2 = st.alloc_zeros::<T>(h2.len()).unwrap();
        k.grouped_gemm(&mut dh2, &dact.as_view(), &dw2.as_view(), &dalign, &s2)
            .unwrap();
        let dweights = st.clone_htod(&weights).unwrap();
        let mut dout = st.alloc_zeros::<T>(cpu.len()).unwrap();
        k.moe_sum(
            &mut dout,
            &dh2.as_view(),
            &dweights.as_view(),
            top_k,
            hidden,
        )
        .unwrap();
        let gpu = st.clone_dtoh(&dout).unwrap();
        assert_within(&what, &gpu, &cpu, (rel, abs));
        eprintln!("{what}: matches");
    }
}

/// The grouped GEMM over e4m3 experts against its CPU reference: DeepSeek's 128 x 128 blocks
/// with ragged edges (n_out 320, k_in 200) and per-channel scales, one token (a decode: mostly
/// padding rows) to 300 tokens over 64 experts, as the first GEMM (x per token) and the second
/// (x per entry). Random finite e4m3 codes, scales ~1/64. Tolerance 1e-5 of the sum of |terms|
/// (f32 sums in another order), plus the output dtype's rounding.
fn check_grouped_w8a16<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    let deepseek = ScaleBlocks {
        block_n: 128,
        block_k: 128,
    };
    let per_channel = ScaleBlocks {
        block_n: 1,
        block_k: 256,
    };
    for (tokens, experts, top_k, n_out, k_in, blocks, x_div) in [
        (1, 64, 8, 320, 200, deepseek, 8),
        (37, 64, 6, 320, 200, deepseek, 1),
        (300, 16, 2, 96, 256, per_channel, 2),
    ] {
        let what = format!(
            "grouped_w8a16_{} t{tokens} e{experts} {blocks:?} x_div {x_div}",
            T::KERNEL_SUFFIX
        );
        let entries = RandomEntries::new(k, rng, [tokens, top_k, experts], [n_out, k_in], x_div);
        let (ids, s) = (&entries.ids, &entries.shape);
        let x: Vec<T> = random(rng, s.num_entries / x_div * k_in, -1.0, 1.0);
        let w: Vec<u8> = (0..experts * n_out * k_in)
            .map(|_| {
                let code: u8 = rng.random_range(0..0x7F);
                code | if rng.random_bool(0.5) { 0x80 } else { 0 }
            })
            .collect();
        let scales: Vec<f32> = (0..experts * blocks.per_expert(n_out, k_in))
            .map(|_| rng.random_range(0.005f32..0.03))
            .collect();
        let per = blocks.per_expert(n_out, k_in);
        let cols = k_in.div_ceil(blocks.block_k);
        let magnitude = |id: usize, j: usize| -> f32 {
            let e = ids[id] as usize;
            (0..k_in)
                .map(|c| {
                    let wv = ember_kernels::w8a16::e4m3_to_f32(w[(e * n_out + j) * k_in + c])
                        * scales[e * per + j / blocks.block_n * cols + c / blocks.block_k];
                    (x[id / x_div * k_in + c].to_f32() * wv).abs()
                })
                .sum()
        };
        check_packed_experts(k, &what, &entries, (&x, &w, &scales), &blocks, magnitude);
        eprintln!("{what}: matches");
    }
}

/// A grouped GEMM over packed experts on the host: (out, x, weight bytes, their f32 parameters,
/// alignment, shape, format).
type PackedReference<T, F> = fn(
    &mut [T],
    &[T],
    &[u8],
    &[f32],
    &MoeAlignment,
    &GroupedGemmShape,
    &F,
) -> Result<(), KernelError>;

/// The same on the GPU.
type PackedLaunch<T, F> = fn(
    &CudaKernels,
    &mut CudaSlice<T>,
    &CudaView<T>,
    &CudaView<u8>,
    &CudaView<f32>,
    &DeviceAlignment,
    &GroupedGemmShape,
    &F,
) -> Result<(), KernelError>;

/// A format of packed experts (its parameters' type): its grouped GEMMs on the SIMT tiles and on
/// tensor cores, each as the CPU reference and the launcher.
trait PackedFormat: Sized {
    #[allow(clippy::type_complexity)]
    fn gemms<T: CudaElement>() -> ([PackedReference<T, Self>; 2], [PackedLaunch<T, Self>; 2]);
}

impl PackedFormat for ScaleBlocks {
    fn gemms<T: CudaElement>() -> ([PackedReference<T, Self>; 2], [PackedLaunch<T, Self>; 2]) {
        (
            [fused_moe::grouped_w8a16, fused_moe::grouped_w8a16_tc],
            [CudaKernels::grouped_w8a16, CudaKernels::grouped_w8a16_tc],
        )
    }
}

impl PackedFormat for W4Params {
    fn gemms<T: CudaElement>() -> ([PackedReference<T, Self>; 2], [PackedLaunch<T, Self>; 2]) {
        (
            [fused_moe::grouped_w4a16, fused_moe::grouped_w4a16_tc],
            [CudaKernels::grouped_w4a16, CudaKernels::grouped_w4a16_tc],
        )
    }
}

/// A grouped GEMM over packed experts of `format` (`weights` bytes and their f32 parameters) on
/// the GPU against its CPU reference: on the SIMT tiles, and for bf16 on tensor cores too
/// (against the reference with weights rounded to bf16). Every row within 1e-5 of
/// `magnitude(id, j)` (the sum of the products' magnitudes: f32 sums in another order) plus the
/// output dtype's rounding.
fn check_packed_experts<T: CudaElement, F: PackedFormat>(
    k: &CudaKernels,
    what: &str,
    entries: &RandomEntries,
    (x, weights, params): (&[T], &[u8], &[f32]),
    format: &F,
    magnitude: impl Fn(usize, usize) -> f32,
) {
    let (references, launches) = F::gemms::<T>();
    let (align, dalign, s) = (&entries.align, &entries.dalign, &entries.shape);
    let st = k.stream();
    let (dx, dw, dp) = (
        st.clone_htod(x).unwrap(),
        st.clone_htod(weights).unwrap(),
        st.clone_htod(params).unwrap(),
    );
    let dims = [s.num_entries, s.n_out];
    let mut dout = st.alloc_zeros::<T>(dims[0] * dims[1]).unwrap();
    let tiles: &[bool] = if T::KERNEL_SUFFIX == "bf16" {
        &[false, true]
    } else {
        &[false]
    };
    for &tensor_cores in tiles {
        let (reference, launch) = (
            references[tensor_cores as usize],
            launches[tensor_cores as usize],
        );
        let mut cpu_out = vec![T::from_f32(0.0); dims[0] * dims[1]];
        reference(&mut cpu_out, x, weights, params, align, s, format).unwrap();
        let (dx, dw, dp) = (dx.as_view(), dw.as_view(), dp.as_view());
        launch(k, &mut dout, &dx, &dw, &dp, dalign, s, format).unwrap();
        let gpu_out = st.clone_dtoh(&dout).unwrap();
        let what = match tensor_cores {
            false => what.to_string(),
            true => format!("{what} tc"),
        };
        assert_gemm_close(&what, dims, &gpu_out, &cpu_out, 1e-5, &magnitude);
    }
}

/// The grouped GEMM over 4-bit experts against its CPU reference: Kimi K2 Thinking's int4
/// (group 32, symmetric zero 8), GPTQ-style asymmetric float16-rounded weights (group 128) and
/// NVFP4 e2m1 codes (group 16), a decode (mostly padding rows) to 300 tokens, as the first GEMM
/// and the second. Tolerance 1e-5 of the sum of |terms|, plus the output dtype's rounding.
fn check_grouped_w4a16<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    use ember_kernels::w4a16::W4Scales;
    let int4 = W4Params {
        group_size: 32,
        f16_weights: false,
        e2m1: false,
        zeros: false,
        scales: W4Scales::F32,
    };
    let gptq = W4Params {
        group_size: 128,
        f16_weights: true,
        e2m1: false,
        zeros: true,
        scales: W4Scales::F32,
    };
    let fp4 = W4Params {
        group_size: 16,
        f16_weights: false,
        e2m1: true,
        zeros: false,
        scales: W4Scales::F32,
    };
    let nvfp4 = W4Params {
        scales: W4Scales::E4m3Times,
        ..fp4
    };
    let mxfp4 = W4Params {
        group_size: 32,
        scales: W4Scales::Ue8m0,
        ..fp4
    };
    for (tokens, experts, top_k, n_out, k_in, params, x_div) in [
        (1, 64, 8, 192, 256, int4, 8),
        (37, 64, 6, 96, 256, gptq, 1),
        (300, 16, 2, 160, 128, fp4, 2),
        (5, 32, 8, 96, 256, nvfp4, 8),
        (40, 16, 4, 64, 256, mxfp4, 1),
    ] {
        let what = format!(
            "grouped_w4a16_{} t{tokens} e{experts} {params:?} x_div {x_div}",
            T::KERNEL_SUFFIX
        );
        let entries = RandomEntries::new(k, rng, [tokens, top_k, experts], [n_out, k_in], x_div);
        let (ids, s) = (&entries.ids, &entries.shape);
        let x: Vec<T> = random(rng, s.num_entries / x_div * k_in, -1.0, 1.0);
        let groups = k_in / params.group_size;
        let shape = W4a16Shape {
            m: 0,
            n: n_out,
            k: k_in,
            group_size: params.group_size,
            f16_weights: params.f16_weights,
            e2m1: params.e2m1,
            zeros: params.zeros,
            scales: params.scales,
        };
        // Each row's codes, then (byte scales) its finite scale bytes.
        let codes: Vec<u8> = (0..experts * shape.codes_len())
            .map(
                |i| match (params.scales, i % shape.row_bytes() >= k_in / 2) {
                    (W4Scales::F32, _) | (_, false) => rng.random(),
                    (W4Scales::Ue8m0, true) => rng.random_range(115..130u8),
                    (_, true) => rng.random_range(0x08..0x70u8),
                },
            )
            .collect();
        let qparams: Vec<f32> = if params.scales.in_bytes() {
            (0..experts * n_out)
                .map(|_| rng.random_range(0.002f32..0.02))
                .collect()
        } else {
            (0..experts * n_out * groups)
                .flat_map(|_| {
                    let scale = rng.random_range(0.002f32..0.02);
                    if params.zeros {
                        vec![scale, rng.random_range(0..16) as f32]
                    } else {
                        vec![scale]
                    }
                })
                .collect()
        };
        let (codes_per, params_per) = (shape.codes_len(), shape.qparams_len());
        let magnitude = |id: usize, j: usize| -> f32 {
            let e = ids[id] as usize;
            let (ec, eq) = (
                &codes[e * codes_per..][..codes_per],
                &qparams[e * params_per..][..params_per],
            );
            (0..k_in)
                .map(|c| {
                    (x[id / x_div * k_in + c].to_f32() * w4a16::weight(ec, eq, &shape, j, c)).abs()
                })
                .sum()
        };
        check_packed_experts(
            k,
            &what,
            &entries,
            (&x, &codes, &qparams),
            &params,
            magnitude,
        );
        eprintln!("{what}: matches");
    }
}

#[test]
fn grouped_w4a16_matches_the_cpu_reference() {
    check_f32_then_bf16(check_grouped_w4a16::<f32>, check_grouped_w4a16::<bf16>);
}

#[test]
fn grouped_w8a16_matches_the_cpu_reference() {
    check_f32_then_bf16(check_grouped_w8a16::<f32>, check_grouped_w8a16::<bf16>);
}

#[test]
fn fused_moe_matches_the_cpu_references() {
    check_f32_then_bf16(check_fused_moe::<f32>, check_fused_moe::<bf16>);
}
