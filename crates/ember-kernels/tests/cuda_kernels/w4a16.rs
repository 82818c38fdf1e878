use super::*;
use ember_kernels::w4a16::{self, W4a16Shape};

fn check_w4a16<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    let s = k.stream();
    // (m, n, k, group_size): one token, ragged tiles of rows and warps, the smallest group, and
    // real expert and dense shapes (DeepSeek-V3's 7168 hidden, Qwen3's 4096 at group 128).
    // The last two are FP4: NVFP4's groups of 16, MXFP4's of 32, their scales alone (`zeros`
    // off), as a symmetric int4 checkpoint's (zero point 8) before them.
    use ember_kernels::w4a16::W4Scales;
    for &(m, n, kk, group_size, f16_weights, e2m1, with_zeros, scale_kind) in &[
        (1, 64, 128, 32, false, false, true, W4Scales::F32),
        (3, 33, 256, 128, true, false, true, W4Scales::F32),
        (9, 7, 64, 2, false, false, true, W4Scales::F32),
        (8, 100, 2048, 128, true, false, true, W4Scales::F32),
        (17, 512, 7168, 32, false, false, true, W4Scales::F32),
        (1, 4096, 4096, 128, true, false, true, W4Scales::F32),
        (4, 2048, 7168, 32, false, false, false, W4Scales::F32),
        (5, 300, 7168, 16, false, true, false, W4Scales::F32),
        (2, 96, 2048, 32, false, true, false, W4Scales::F32),
        // FP4 scales in their bytes: NVFP4 (e4m3, either global convention), MXFP4 (e8m0).
        (5, 300, 7168, 16, false, true, false, W4Scales::E4m3Times),
        (3, 129, 2048, 16, false, true, false, W4Scales::E4m3Over),
        (9, 96, 2048, 32, false, true, false, W4Scales::Ue8m0),
    ] {
        let shape = W4a16Shape {
            m,
            n,
            k: kk,
            group_size,
            f16_weights,
            e2m1,
            zeros: with_zeros,
            scales: scale_kind,
        };
        let what = format!("w4a16_gemm_{} {shape:?}", T::KERNEL_SUFFIX);
        let groups = kk / group_size;
        let codes: Vec<u8> = (0..n * kk).map(|_| rng.random_range(0..16u8)).collect();
        let mut packed = w4a16::pack_codes(&codes, kk);
        let zeros: Vec<u8> = (0..n * groups).map(|_| rng.random_range(0..16u8)).collect();
        let scales: Vec<f32> = (0..n * groups)
            .map(|_| rng.random_range(0.001..0.1f32))
            .collect();
        let qparams: Vec<f32> = if scale_kind.in_bytes() {
            // Finite scale bytes after each row's codes, and a global per row.
            let bytes: Vec<u8> = (0..n * groups)
                .map(|_| match scale_kind {
                    W4Scales::Ue8m0 => rng.random_range(110..135u8),
                    _ => rng.random_range(0x08..0x70u8),
                })
                .collect();
            packed = w4a16::with_scale_bytes(&packed, &bytes, n, kk);
            (0..n)
                .map(|_| match scale_kind {
                    W4Scales::Ue8m0 => 1.0,
                    _ => rng.random_range(0.001..0.1f32),
                })
                .collect()
        } else if with_zeros {
            scales
                .iter()
                .zip(&zeros)
                .flat_map(|(&s, &z)| [s, f32::from(z)])
                .collect()
        } else {
            scales.clone()
        };
        let x: Vec<T> = random(rng, m * kk, -2.0, 2.0);
        let mut cpu = vec![T::from_f32(0.0); m * n];
        w4a16::w4a16_gemm(&x, &packed, &qparams, &shape, &mut cpu).unwrap();
        let (dx, dcodes) = (s.clone_htod(&x).unwrap(), s.clone_htod(&packed).unwrap());
        let dqparams = s.clone_htod(&qparams).unwrap();
        let mut dy = s.alloc_zeros::<T>(m * n).unwrap();
        k.w4a16_gemm(
            &dx.as_view(),
            &dcodes.as_view(),
            &dqparams.as_view(),
            &shape,
            &mut dy,
        )
        .unwrap();
        let gpu = s.clone_dtoh(&dy).unwrap();
        assert_gemm_close(&what, [m, n], &gpu, &cpu, 1e-5, |r, j| {
            (0..kk)
                .map(|c| {
                    (x[r * kk + c].to_f32() * w4a16::weight(&packed, &qparams, &shape, j, c)).abs()
                })
                .sum()
        });
        // The dequantized weight: the same f32 math and one rounding, so bit for bit.
        let mut cpu_w = vec![T::from_f32(0.0); n * kk];
        w4a16::dequantize(&packed, &qparams, &shape, &mut cpu_w).unwrap();
        let mut dw = s.alloc_zeros::<T>(n * kk).unwrap();
        k.w4a16_dequant(&dcodes.as_view(), &dqparams.as_view(), &shape, &mut dw)
            .unwrap();
        let gpu_w = s.clone_dtoh(&dw).unwrap();
        assert_bits_equal(&format!("{what} dequant"), &gpu_w, &cpu_w);
    }
}

#[test]
fn w4a16_gemm_matches_the_cpu_reference() {
    check_f32_then_bf16(check_w4a16::<f32>, check_w4a16::<bf16>);
}
