use super::*;

/// W8A8 FP8: the activation quantizer is bit-exact with its CPU reference (bytes and scales); the
/// tensor-core GEMM matches its reference within 1e-3 of the sum of |terms| (every e4m3 product is
/// exact; the tensor cores add each 32-input slice in their own order and precision) plus the
/// output dtype's rounding. Shapes: 1, 7 and 200 tokens; n 320 and 200 (ragged against the 64-wide
/// tiles); k 1024 and 1000 (a partial last group); DeepSeek's 128 x 128 weight blocks and
/// per-channel ones (block_n 1).
fn check_w8a8<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    use ember_kernels::w8a8::{self, W8a8Shape, GROUP};
    let st = k.stream();
    let tensor_cores = k.has_fp8_tensor_cores().unwrap();
    for (m, n, kk, block_n) in [
        (1, 320, 1024, 128),
        (7, 200, 1000, 128),
        (200, 320, 1024, 1),
    ] {
        let what = format!(
            "w8a8_{} m{m} n{n} k{kk} block_n {block_n}",
            T::KERNEL_SUFFIX
        );
        let x: Vec<T> = random(rng, m * kk, -3.0, 3.0);
        let (qa, sa) = w8a8::quantize_groups(&x, kk).unwrap();
        let dx = st.clone_htod(&x).unwrap();
        let mut dqa = st.alloc_zeros::<u8>(qa.len()).unwrap();
        let mut dsa = st.alloc_zeros::<f32>(sa.len()).unwrap();
        k.quant_fp8_groups(&dx.as_view(), kk, &mut dqa, &mut dsa)
            .unwrap();
        assert_eq!(st.clone_dtoh(&dqa).unwrap(), qa, "{what}: quantized bytes");
        assert_eq!(
            st.clone_dtoh(&dsa).unwrap(),
            sa,
            "{what}: activation scales"
        );
        let s = W8a8Shape {
            m,
            n,
            k: kk,
            block_n,
        };
        let qw: Vec<u8> = (0..n * kk)
            .map(|_| {
                let code: u8 = rng.random_range(0..0x7F);
                code | if rng.random_bool(0.5) { 0x80 } else { 0 }
            })
            .collect();
        let sw: Vec<f32> = (0..s.weight_scale_len())
            .map(|_| rng.random_range(0.001f32..0.01))
            .collect();
        let mut cpu = vec![T::from_f32(0.0); m * n];
        w8a8::w8a8_gemm(&qa, &sa, &qw, &sw, &s, &mut cpu).unwrap();
        if !tensor_cores {
            eprintln!("SKIPPED {what} GEMM: this GPU has no FP8 tensor cores");
            continue;
        }
        let (dqw, dsw) = (st.clone_htod(&qw).unwrap(), st.clone_htod(&sw).unwrap());
        let mut dy = st.alloc_zeros::<T>(m * n).unwrap();
        k.w8a8_gemm(
            &dqa.as_view(),
            &dsa.as_view(),
            &dqw.as_view(),
            &dsw.as_view(),
            &s,
            &mut dy,
        )
        .unwrap();
        let gpu = st.clone_dtoh(&dy).unwrap();
        let blocks = kk.div_ceil(GROUP);
        let e4 = ember_kernels::w8a16::e4m3_to_f32;
        assert_gemm_close(&what, [m, n], &gpu, &cpu, 1e-3, |r, j| {
            (0..kk)
                .map(|c| {
                    (e4(qa[r * kk + c])
                        * e4(qw[j * kk + c])
                        * sa[r * blocks + c / GROUP]
                        * sw[(j / block_n) * blocks + c / GROUP])
                        .abs()
                })
                .sum()
        });
        eprintln!("{what}: matches");
    }
}

/// The grouped W8A8 GEMM (the fused MoE's, over e4m3 experts) against its CPU reference: a decode
/// and 64 tokens over 64 experts, as the first GEMM (x per token) and the second (per entry);
/// 128 x 128 blocks (n 320, k 1000: ragged) and per-channel ones. Tolerance as `check_w8a8`.
fn check_grouped_w8a8<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    use ember_kernels::w8a8::{self, GROUP};
    let st = k.stream();
    if !k.has_fp8_tensor_cores().unwrap() {
        eprintln!("SKIPPED grouped_w8a8: this GPU has no FP8 tensor cores");
        return;
    }
    for (tokens, experts, top_k, n_out, k_in, block_n, x_div) in [
        (1, 64, 8, 320, 1000, 128, 8),
        (64, 64, 4, 320, 1024, 128, 1),
        (37, 16, 2, 96, 512, 1, 2),
    ] {
        let what = format!(
            "grouped_w8a8_{} t{tokens} e{experts} n{n_out} k{k_in} x_div {x_div}",
            T::KERNEL_SUFFIX
        );
        let entries = RandomEntries::new(k, rng, [tokens, top_k, experts], [n_out, k_in], x_div);
        let (ids, s) = (&entries.ids, &entries.shape);
        let n = s.num_entries;
        let rows = n / x_div;
        let x: Vec<T> = random(rng, rows * k_in, -3.0, 3.0);
        let (qa, sa) = w8a8::quantize_groups(&x, k_in).unwrap();
        let qw: Vec<u8> = (0..experts * n_out * k_in)
            .map(|_| rng.random_range(0..0x7Fu8))
            .collect();
        let blocks = k_in.div_ceil(GROUP);
        let per = n_out.div_ceil(block_n) * blocks;
        let sw: Vec<f32> = (0..experts * per)
            .map(|_| rng.random_range(0.001f32..0.01))
            .collect();
        let mut cpu = vec![T::from_f32(0.0); n * n_out];
        w8a8::grouped_w8a8(&mut cpu, &qa, &sa, &qw, &sw, &entries.align, s, block_n).unwrap();
        let (dqa, dsa) = (st.clone_htod(&qa).unwrap(), st.clone_htod(&sa).unwrap());
        let (dqw, dsw) = (st.clone_htod(&qw).unwrap(), st.clone_htod(&sw).unwrap());
        let mut dout = st.alloc_zeros::<T>(cpu.len()).unwrap();
        k.grouped_w8a8(
            &mut dout,
            &dqa.as_view(),
            &dsa.as_view(),
            &dqw.as_view(),
            &dsw.as_view(),
            &entries.dalign,
            s,
            block_n,
        )
        .unwrap();
        let gpu = st.clone_dtoh(&dout).unwrap();
        let e4 = ember_kernels::w8a16::e4m3_to_f32;
        assert_gemm_close(&what, [n, n_out], &gpu, &cpu, 1e-3, |id, j| {
            let (e, row) = (ids[id] as usize, id / x_div);
            (0..k_in)
                .map(|c| {
                    (e4(qa[row * k_in + c])
                        * e4(qw[(e * n_out + j) * k_in + c])
                        * sa[row * blocks + c / GROUP]
                        * sw[e * per + (j / block_n) * blocks + c / GROUP])
                        .abs()
                })
                .sum()
        });
        eprintln!("{what}: matches");
    }
}

#[test]
fn grouped_w8a8_matches_the_cpu_reference() {
    check_f32_then_bf16(check_grouped_w8a8::<f32>, check_grouped_w8a8::<bf16>);
}

#[test]
fn w8a8_matches_the_cpu_reference() {
    check_f32_then_bf16(check_w8a8::<f32>, check_w8a8::<bf16>);
}
