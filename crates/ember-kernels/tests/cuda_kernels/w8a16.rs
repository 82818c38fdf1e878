use super::*;
use ember_kernels::w8a16::{self, W8a16Shape};

fn check_w8a16<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    let s = k.stream();
    // (m, n, k, block_n, block_k): DeepSeek's 128 x 128 blocks with ragged edges (320, 257, 129),
    // per-channel scales, one token, ragged row and warp tiles, and real shapes.
    for &(m, n, kk, block_n, block_k) in &[
        (1, 64, 128, 128, 128),
        (3, 33, 320, 128, 128),
        (9, 7, 64, 1, 64),
        (17, 129, 257, 128, 128),
        (8, 200, 7168, 128, 128),
        (1, 4096, 4096, 128, 128),
    ] {
        let shape = W8a16Shape {
            m,
            n,
            k: kk,
            block_n,
            block_k,
        };
        let what = format!("w8a16_gemm_{} {shape:?}", T::KERNEL_SUFFIX);
        // Every finite e4m3 code (0x7F and 0xFF are NaN).
        let w: Vec<u8> = (0..n * kk)
            .map(|_| loop {
                let b: u8 = rng.random();
                if b & 0x7F != 0x7F {
                    break b;
                }
            })
            .collect();
        let scales: Vec<f32> = (0..shape.scale_len())
            .map(|_| rng.random_range(0.001..0.1f32))
            .collect();
        let x: Vec<T> = random(rng, m * kk, -2.0, 2.0);
        let mut cpu = vec![T::from_f32(0.0); m * n];
        w8a16::w8a16_gemm(&x, &w, &scales, &shape, &mut cpu).unwrap();
        let (dx, dw, ds) = (
            s.clone_htod(&x).unwrap(),
            s.clone_htod(&w).unwrap(),
            s.clone_htod(&scales).unwrap(),
        );
        let mut dy = s.alloc_zeros::<T>(m * n).unwrap();
        k.w8a16_gemm(&dx.as_view(), &dw.as_view(), &ds.as_view(), &shape, &mut dy)
            .unwrap();
        let gpu = s.clone_dtoh(&dy).unwrap();
        assert_gemm_close(&what, [m, n], &gpu, &cpu, 1e-5, |r, j| {
            (0..kk)
                .map(|c| (x[r * kk + c].to_f32() * w8a16::weight(&w, &scales, &shape, j, c)).abs())
                .sum()
        });
        // The dequantized weight: the same f32 math and one rounding, so bit for bit.
        let mut cpu_w = vec![T::from_f32(0.0); n * kk];
        w8a16::dequantize(&w, &scales, &shape, &mut cpu_w).unwrap();
        let mut dwt = s.alloc_zeros::<T>(n * kk).unwrap();
        k.w8a16_dequant(&dw.as_view(), &ds.as_view(), &shape, &mut dwt)
            .unwrap();
        let gpu_w = s.clone_dtoh(&dwt).unwrap();
        assert_bits_equal(&format!("{what} dequant"), &gpu_w, &cpu_w);
    }
}

#[test]
fn w8a16_gemm_matches_the_cpu_reference() {
    check_f32_then_bf16(check_w8a16::<f32>, check_w8a16::<bf16>);
}
