//! Each CUDA kernel against its CPU reference on fresh random inputs (the seed is printed, so a
//! failure can be replayed with EMBER_KERNEL_TEST_SEED). Skipped, saying so, without a GPU.
//! Tolerance: f32 within 2e-5 relative (plus 1e-6 absolute): only the order of the f32 sum and
//! rsqrtf/expf differ; bf16 within one bf16 ulp of the reference (2^-7 relative, plus 1e-6).
//! Paged attention sums softmax-weighted rows in tiles (online rescaling, __expf): f32 within
//! 1e-4 relative plus 1e-5 absolute, bf16 one ulp plus 1e-3 absolute (outputs are O(1)).
//! RoPE does the same f32 products and sums on both sides (no FMA on the GPU): bit-identical.
//! Argmax only compares: exact, ties (lowest id) and NaN included. e5m2 conversions are exact too.
//! W4A16 GEMM dequantizes exactly and sums in another order: within 1e-5 of the sum of the
//! terms' magnitudes (plus one bf16 ulp of the result for bf16); W8A16 (e4m3 weights, block
//! scales) the same.
#![cfg(feature = "cuda")]

use ember_kernels::cuda::{CudaElement, CudaKernels};
use ember_kernels::paged_attention::{self, PagedAttentionBatch, PagedAttentionShape};
use ember_kernels::rotary::{self, RotaryShape};
use ember_kernels::w4a16::{self, W4a16Shape};
use ember_kernels::w8a16::{self, W8a16Shape};
use ember_kernels::{fp8_e5m2, moe_routing, rms_norm, sampling, scatter_rows, silu_and_mul};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Shapes (rows, hidden): one row, sizes under a warp, not a multiple of 32, and real hidden sizes.
const SHAPES: &[(usize, usize)] = &[(1, 8), (3, 33), (7, 1000), (64, 2048), (5, 4096), (2, 7168)];

fn kernels() -> Option<CudaKernels> {
    match CudaKernels::new(0) {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("skipping: no usable CUDA GPU 0 ({e})");
            None
        }
    }
}

fn rng() -> StdRng {
    let seed = std::env::var("EMBER_KERNEL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("EMBER_KERNEL_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

fn random<T: CudaElement>(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<T> {
    (0..n)
        .map(|_| T::from_f32(rng.random_range(lo..hi)))
        .collect()
}

/// Relative tolerance of one element type (see the file's doc).
fn rel_tol<T: CudaElement>() -> f32 {
    if T::KERNEL_SUFFIX == "bf16" {
        1.0 / 128.0
    } else {
        2e-5
    }
}

fn assert_close<T: CudaElement>(what: &str, gpu: &[T], cpu: &[T]) {
    assert_eq!(gpu.len(), cpu.len());
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        let (g, c) = (g.to_f32(), c.to_f32());
        let tol = rel_tol::<T>() * c.abs() + 1e-6;
        assert!(
            (g - c).abs() <= tol,
            "{what}[{i}]: GPU {g} vs CPU {c} (tolerance {tol})"
        );
    }
}

fn check_rms_norm<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    let s = k.stream();
    for &(rows, hidden) in SHAPES {
        let what = format!("rms_norm_{} [{rows}, {hidden}]", T::KERNEL_SUFFIX);
        let x: Vec<T> = random(rng, rows * hidden, -4.0, 4.0);
        let w: Vec<T> = random(rng, hidden, 0.5, 1.5);
        let mut cpu = vec![T::from_f32(0.0); x.len()];
        rms_norm::rms_norm(&x, &w, 1e-6, &mut cpu).unwrap();
        let (dx, dw) = (s.clone_htod(&x).unwrap(), s.clone_htod(&w).unwrap());
        let mut dout = s.alloc_zeros::<T>(x.len()).unwrap();
        k.rms_norm(&dx.as_view(), &dw.as_view(), 1e-6, &mut dout.as_view_mut())
            .unwrap();
        assert_close(&what, &s.clone_dtoh(&dout).unwrap(), &cpu);
    }
}

fn check_fused_add_rms_norm<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    let s = k.stream();
    for &(rows, hidden) in SHAPES {
        let what = format!("fused_add_rms_norm_{} [{rows}, {hidden}]", T::KERNEL_SUFFIX);
        let x: Vec<T> = random(rng, rows * hidden, -4.0, 4.0);
        let residual: Vec<T> = random(rng, rows * hidden, -4.0, 4.0);
        let w: Vec<T> = random(rng, hidden, 0.5, 1.5);
        let (mut cpu_residual, mut cpu) = (residual.clone(), vec![T::from_f32(0.0); x.len()]);
        rms_norm::fused_add_rms_norm(&x, &mut cpu_residual, &w, 1e-6, &mut cpu).unwrap();
        let (dx, dw) = (s.clone_htod(&x).unwrap(), s.clone_htod(&w).unwrap());
        let mut dres = s.clone_htod(&residual).unwrap();
        let mut dout = s.alloc_zeros::<T>(x.len()).unwrap();
        k.fused_add_rms_norm(
            &dx.as_view(),
            &mut dres.as_view_mut(),
            &dw.as_view(),
            1e-6,
            &mut dout.as_view_mut(),
        )
        .unwrap();
        // The stored sum is one f32 add and one rounding on both sides: bit-identical.
        let gpu_residual = s.clone_dtoh(&dres).unwrap();
        for (i, (g, c)) in gpu_residual.iter().zip(&cpu_residual).enumerate() {
            assert_eq!(
                g.to_f32().to_bits(),
                c.to_f32().to_bits(),
                "{what} residual[{i}]"
            );
        }
        assert_close(&what, &s.clone_dtoh(&dout).unwrap(), &cpu);
    }
}

fn check_silu_and_mul<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    let s = k.stream();
    for &(rows, d) in SHAPES {
        let what = format!("silu_and_mul_{} [{rows}, {d}]", T::KERNEL_SUFFIX);
        let input: Vec<T> = random(rng, rows * 2 * d, -8.0, 8.0);
        let mut cpu = vec![T::from_f32(0.0); rows * d];
        silu_and_mul::silu_and_mul(&input, d, &mut cpu).unwrap();
        let din = s.clone_htod(&input).unwrap();
        let mut dout = s.alloc_zeros::<T>(rows * d).unwrap();
        k.silu_and_mul(&din.as_view(), d, &mut dout).unwrap();
        assert_close(&what, &s.clone_dtoh(&dout).unwrap(), &cpu);
    }
}

#[test]
fn rms_norm_matches_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    check_rms_norm::<f32>(&k, &mut rng);
    check_rms_norm::<bf16>(&k, &mut rng);
}

#[test]
fn fused_add_rms_norm_matches_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    check_fused_add_rms_norm::<f32>(&k, &mut rng);
    check_fused_add_rms_norm::<bf16>(&k, &mut rng);
}

#[test]
fn silu_and_mul_matches_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    check_silu_and_mul::<f32>(&k, &mut rng);
    check_silu_and_mul::<bf16>(&k, &mut rng);
}

/// Rotary shapes (tokens, heads, head_dim, interleaved): Qwen3-30B-A3B queries and keys (128), a
/// head past one block of threads, DeepSeek's interleaved rope part of 64, and a tiny head.
const ROTARY_SHAPES: &[(usize, usize, usize, bool)] = &[
    (5, 32, 128, false),
    (3, 4, 128, false),
    (2, 7, 96, false),
    (9, 128, 64, true),
    (4, 1, 64, true),
    (1, 3, 2, false),
];

/// Same f32 products and sums, FMA contraction off on the GPU: f32 and bf16 agree bit for bit.
fn check_rotary<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    let s = k.stream();
    let rows = 5000;
    for &(tokens, heads, head_dim, interleaved) in ROTARY_SHAPES {
        let what = format!(
            "rotary_{} [{tokens}, {heads}, {head_dim}] interleaved {interleaved}",
            T::KERNEL_SUFFIX
        );
        let shape = RotaryShape {
            heads,
            head_dim,
            interleaved,
        };
        let half = head_dim / 2;
        let angles: Vec<f32> = (0..rows * half)
            .map(|_| rng.random_range(-50.0..50.0))
            .collect();
        // Scaled as YaRN's attention factor scales them, so the tables are not unit-norm.
        let cos: Vec<T> = angles.iter().map(|a| T::from_f32(a.cos() * 1.2)).collect();
        let sin: Vec<T> = angles.iter().map(|a| T::from_f32(a.sin() * 1.2)).collect();
        // Ragged positions, the last row included.
        let positions: Vec<u32> = (0..tokens)
            .map(|t| {
                if t == 0 {
                    rows as u32 - 1
                } else {
                    rng.random_range(0..rows as u32)
                }
            })
            .collect();
        let x: Vec<T> = random(rng, tokens * heads * head_dim, -3.0, 3.0);
        let mut cpu = vec![T::from_f32(0.0); x.len()];
        rotary::rotary_embedding(&x, &positions, &cos, &sin, &shape, &mut cpu).unwrap();
        let (dx, dcos, dsin) = (
            s.clone_htod(&x).unwrap(),
            s.clone_htod(&cos).unwrap(),
            s.clone_htod(&sin).unwrap(),
        );
        let mut dout = s.alloc_zeros::<T>(x.len()).unwrap();
        k.rotary_embedding(
            &dx.as_view(),
            &positions,
            &dcos.as_view(),
            &dsin.as_view(),
            &shape,
            &mut dout,
        )
        .unwrap();
        let gpu = s.clone_dtoh(&dout).unwrap();
        // The step-rows form over the same rows gathered: the same bits.
        let half = head_dim / 2;
        let gather = |t: &[T]| -> Vec<T> {
            positions
                .iter()
                .flat_map(|&p| t[p as usize * half..][..half].to_vec())
                .collect()
        };
        let (rcos, rsin) = (gather(&cos), gather(&sin));
        let mut cpu_rows = vec![T::from_f32(0.0); x.len()];
        rotary::rotary_embedding_rows(&x, &rcos, &rsin, &shape, &mut cpu_rows).unwrap();
        assert!(cpu_rows
            .iter()
            .zip(&cpu)
            .all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits()));
        let (drcos, drsin) = (s.clone_htod(&rcos).unwrap(), s.clone_htod(&rsin).unwrap());
        let mut drout = s.alloc_zeros::<T>(x.len()).unwrap();
        k.rotary_embedding_rows(
            &dx.as_view(),
            &drcos.as_view(),
            &drsin.as_view(),
            &shape,
            &mut drout,
        )
        .unwrap();
        assert!(
            s.clone_dtoh(&drout)
                .unwrap()
                .iter()
                .zip(&gpu)
                .all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits()),
            "{what}: the step-rows kernel differs"
        );
        for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
            assert_eq!(
                g.to_f32().to_bits(),
                c.to_f32().to_bits(),
                "{what}[{i}]: GPU {} vs CPU {}",
                g.to_f32(),
                c.to_f32()
            );
        }
    }
    // A position past the tables is refused on the host, before any launch.
    let shape = RotaryShape {
        heads: 1,
        head_dim: 4,
        interleaved: false,
    };
    let dx = s.clone_htod(&random::<T>(rng, 4, -1.0, 1.0)).unwrap();
    let table = s.clone_htod(&random::<T>(rng, 6, -1.0, 1.0)).unwrap();
    let mut dout = s.alloc_zeros::<T>(4).unwrap();
    let err = k
        .rotary_embedding(
            &dx.as_view(),
            &[3],
            &table.as_view(),
            &table.as_view(),
            &shape,
            &mut dout,
        )
        .unwrap_err();
    assert!(err.to_string().contains("past the tables' 3 rows"), "{err}");
}

#[test]
fn rotary_embedding_matches_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    check_rotary::<f32>(&k, &mut rng);
    check_rotary::<bf16>(&k, &mut rng);
}

/// Greedy sampling over real vocab sizes: random logits, and rows salted with ties of the max
/// (spread over threads and warps), NaNs, infinities and all-NaN rows.
#[test]
fn argmax_matches_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    let s = k.stream();
    for &(rows, vocab) in &[
        (1, 7),
        (3, 32),
        (5, 1000),
        (16, 151_936),
        (4, 129_280),
        (2, 163_840),
    ] {
        let mut logits: Vec<f32> = random(&mut rng, rows * vocab, -20.0, 20.0);
        for (r, row) in logits.chunks_exact_mut(vocab).enumerate() {
            match r % 4 {
                // The max at several scattered ids: the lowest must win.
                1 => {
                    for _ in 0..5 {
                        row[rng.random_range(0..vocab)] = 50.0;
                    }
                }
                // NaNs everywhere, one of them where the max was, and a -inf.
                2 => {
                    for _ in 0..vocab / 3 + 1 {
                        row[rng.random_range(0..vocab)] = f32::NAN;
                    }
                    row[rng.random_range(0..vocab)] = f32::NEG_INFINITY;
                }
                3 if r == 3 => row.fill(f32::NAN),
                3 => row[rng.random_range(0..vocab)] = f32::INFINITY,
                _ => {}
            }
        }
        let mut cpu = vec![0u32; rows];
        sampling::argmax_rows(&logits, vocab, &mut cpu).unwrap();
        let dlogits = s.clone_htod(&logits).unwrap();
        let mut dout = s.alloc_zeros::<u32>(rows).unwrap();
        k.argmax_rows(&dlogits.as_view(), vocab, &mut dout).unwrap();
        assert_eq!(
            s.clone_dtoh(&dout).unwrap(),
            cpu,
            "argmax [{rows}, {vocab}]"
        );
    }
    let d = s.clone_htod(&[1f32; 6]).unwrap();
    let mut out = s.alloc_zeros::<u32>(4).unwrap();
    assert!(k.argmax_rows(&d.as_view(), 4, &mut out).is_err());
}

/// e5m2 both ways over every magnitude it holds (subnormals to beyond its range, so saturation),
/// exact ties, infinities and NaN; and every one of the 256 codes decoded.
#[test]
fn e5m2_conversions_match_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    let s = k.stream();
    let mut x: Vec<f32> = (0..100_003)
        .map(|_| {
            let sign = if rng.random::<bool>() { -1.0 } else { 1.0 };
            sign * 2f32.powf(rng.random_range(-20.0..17.0)) * rng.random_range(1.0..2.0)
        })
        .collect();
    // Ties between neighbours (1.125 sits halfway between 1.0 and 1.25), specials.
    x.extend([
        1.125,
        1.375,
        2f32.powi(-17),
        3.0 * 2f32.powi(-17),
        53248.0,
        61440.0,
        0.0,
        -0.0,
    ]);
    x.extend([
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MAX,
    ]);
    let mut cpu = vec![0u8; x.len()];
    fp8_e5m2::encode_slice(&x, &mut cpu).unwrap();
    let dx = s.clone_htod(&x).unwrap();
    let mut dout = s.alloc_zeros::<u8>(x.len()).unwrap();
    k.e5m2_from_f32(&dx.as_view(), &mut dout).unwrap();
    let gpu = s.clone_dtoh(&dout).unwrap();
    for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
        assert_eq!(g, c, "e5m2 of {:e} (element {i})", x[i]);
    }
    let codes: Vec<u8> = (0..=255).collect();
    let mut cpu = vec![0f32; 256];
    fp8_e5m2::decode_slice(&codes, &mut cpu).unwrap();
    let dcodes = s.clone_htod(&codes).unwrap();
    let mut dout = s.alloc_zeros::<f32>(256).unwrap();
    k.e5m2_to_f32(&dcodes.as_view(), &mut dout).unwrap();
    for (b, (g, c)) in s.clone_dtoh(&dout).unwrap().iter().zip(&cpu).enumerate() {
        assert!(
            g.to_bits() == c.to_bits() || (g.is_nan() && c.is_nan()),
            "code {b}: {g} vs {c}"
        );
    }
}

/// fp8 cache writes: random bytes into scattered slots of a pool (one slot past it), row widths
/// from one MLA latent row to narrower than a warp; exact.
#[test]
fn scatter_rows_matches_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    let s = k.stream();
    for &(pool_rows, tokens, row_bytes) in &[(64, 5, 576), (1024, 37, 256), (16, 3, 7)] {
        let mut pool: Vec<u8> = (0..pool_rows * row_bytes).map(|_| rng.random()).collect();
        let rows: Vec<u8> = (0..tokens * row_bytes).map(|_| rng.random()).collect();
        let mut slots: Vec<u32> = (0..pool_rows as u32).collect();
        slots.sort_by_key(|_| rng.random::<u32>());
        slots.truncate(tokens - 1);
        slots.push(pool_rows as u32 + 3);
        let mut dpool = s.clone_htod(&pool).unwrap();
        let (drows, dslots) = (s.clone_htod(&rows).unwrap(), s.clone_htod(&slots).unwrap());
        assert_eq!(
            scatter_rows::scatter_rows(&mut pool, &rows, &slots, row_bytes).unwrap(),
            1
        );
        k.scatter_rows(&mut dpool, &drows.as_view(), &dslots.as_view(), row_bytes)
            .unwrap();
        assert_eq!(
            s.clone_dtoh(&dpool).unwrap(),
            pool,
            "[{pool_rows}, {row_bytes}]"
        );
    }
}

/// GEMM outputs `[m, n]` within 1e-5 of the sum of their terms' magnitudes (the f32 sums run in
/// another order), plus one bf16 ulp of the result for bf16.
fn assert_gemm_close<T: CudaElement>(
    what: &str,
    [m, n]: [usize; 2],
    gpu: &[T],
    cpu: &[T],
    magnitude: impl Fn(usize, usize) -> f32,
) {
    for r in 0..m {
        for j in 0..n {
            let (g, c) = (gpu[r * n + j].to_f32(), cpu[r * n + j].to_f32());
            let ulp = if T::KERNEL_SUFFIX == "bf16" {
                c.abs() / 128.0
            } else {
                0.0
            };
            let tol = 1e-5 * magnitude(r, j) + ulp + 1e-6;
            assert!(
                (g - c).abs() <= tol,
                "{what} y[{r}, {j}]: GPU {g} vs CPU {c} (tolerance {tol})"
            );
        }
    }
}

/// The same bits, element by element.
fn assert_bits_equal<T: CudaElement>(what: &str, gpu: &[T], cpu: &[T]) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert_eq!(g.to_f32().to_bits(), c.to_f32().to_bits(), "{what}[{i}]");
    }
}

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
        assert_gemm_close(&what, [m, n], &gpu, &cpu, |r, j| {
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
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    check_w4a16::<f32>(&k, &mut rng);
    check_w4a16::<bf16>(&k, &mut rng);
}

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
        assert_gemm_close(&what, [m, n], &gpu, &cpu, |r, j| {
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
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    check_w8a16::<f32>(&k, &mut rng);
    check_w8a16::<bf16>(&k, &mut rng);
}

#[test]
fn ptxas_reported_every_kernel_for_every_architecture_without_spills() {
    let report = ember_kernels::cuda::PTXAS_RESOURCE_USAGE;
    for kernel in [
        "rms_norm_f32",
        "rms_norm_bf16",
        "fused_add_rms_norm_f32",
        "silu_and_mul_bf16",
        "rotary_embedding_f32",
        "rotary_embedding_bf16",
        "argmax_f32",
        "e5m2_from_f32",
        "e5m2_to_f32",
        "scatter_rows_u8",
        "w4a16_gemm_f32",
        "w4a16_gemm_bf16",
        "w8a16_gemm_f32",
        "w8a16_gemm_bf16",
        "w4a16_dequant_bf16",
        "w8a16_dequant_bf16",
        "mla_decode_f32",
        "mla_decode_bf16",
        "grouped_w8a16_f32",
        "grouped_w8a16_bf16",
        "grouped_w4a16_f32",
        "grouped_w4a16_bf16",
        "sample_rows_f32",
        "quant_fp8_groups_bf16",
        "w8a8_gemm_bf16",
        "grouped_w8a8_bf16",
        "rotary_embedding_rows_bf16",
        "paged_attention_bf16",
        "paged_attention_split_bf16",
        "paged_attention_merge_bf16",
        "mla_decode_split_bf16",
        "mla_decode_merge_bf16",
    ] {
        assert!(
            report.contains(&format!("::{kernel} ")),
            "{kernel} missing from:\n{report}"
        );
    }
    assert!(!report.contains("SPILL"), "a kernel spills:\n{report}");
}

/// Each GPU run (how it was launched, its output) within `rel · |cpu| + abs` of `cpu`.
fn assert_runs_match<T: CudaElement>(
    what: &str,
    runs: Vec<(String, Vec<T>)>,
    cpu: &[T],
    (rel, abs): (f32, f32),
    tokens: usize,
) {
    for (how, gpu) in runs {
        for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
            let (g, c) = (g.to_f32(), c.to_f32());
            let tol = rel * c.abs() + abs;
            assert!(
                (g - c).abs() <= tol,
                "{what}, {how}[{i}]: GPU {g} vs CPU {c} (tolerance {tol})"
            );
        }
        eprintln!("{what}, {how}: {tokens} tokens match");
    }
}

/// A batch mix for paged attention: per sequence, its cached positions before the step and the
/// new tokens it brings (1 = a decode), its blocks scattered over a pool.
struct Mix {
    name: &'static str,
    shape: PagedAttentionShape,
    /// (past, new) per sequence.
    seqs: &'static [(usize, usize)],
}

const MIXES: &[Mix] = &[
    Mix {
        // Qwen3-30B-A3B attention: 32 query heads over 4 kv heads of 128; decodes of ragged
        // lengths, one exactly at a block boundary, one past several tiles of 128.
        name: "gqa decode",
        shape: PagedAttentionShape {
            num_heads: 32,
            num_kv_heads: 4,
            head_dim: 128,
            v_dim: 128,
            block_size: 16,
            max_blocks: 0,
        },
        seqs: &[(0, 1), (15, 1), (16, 1), (100, 1), (700, 1)],
    },
    Mix {
        // Long decodes with few heads (a rank's share under tensor parallelism): the kernel
        // splits each context (flash-decoding) to fill the GPU.
        name: "long decodes, few heads",
        shape: PagedAttentionShape {
            num_heads: 4,
            num_kv_heads: 1,
            head_dim: 128,
            v_dim: 128,
            block_size: 16,
            max_blocks: 0,
        },
        seqs: &[(5000, 1), (1500, 1), (40, 1)],
    },
    Mix {
        // Prefill chunks next to decodes: a fresh prompt, a chunk after cached blocks, decodes.
        name: "mixed prefill and decode",
        shape: PagedAttentionShape {
            num_heads: 8,
            num_kv_heads: 2,
            head_dim: 64,
            v_dim: 64,
            block_size: 16,
            max_blocks: 0,
        },
        seqs: &[(0, 37), (48, 20), (9, 1), (130, 1)],
    },
    Mix {
        // MLA's absorbed decode shape: one latent "kv head" of 576 (512 + 64 rope) read by 16
        // heads, values 512 wide; block 64 as FlashMLA uses.
        name: "mla-shaped decode",
        shape: PagedAttentionShape {
            num_heads: 16,
            num_kv_heads: 1,
            head_dim: 576,
            v_dim: 512,
            block_size: 64,
            max_blocks: 0,
        },
        seqs: &[(3, 1), (200, 1), (63, 2)],
    },
];

fn check_paged_attention<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    let st = k.stream();
    let (rel, abs) = if T::KERNEL_SUFFIX == "bf16" {
        (1.0 / 128.0, 1e-3)
    } else {
        (1e-4, 1e-5)
    };
    for mix in MIXES {
        let mut shape = mix.shape;
        let block = shape.block_size;
        shape.max_blocks = mix
            .seqs
            .iter()
            .map(|(p, n)| (p + n).div_ceil(block))
            .max()
            .unwrap();
        let blocks_needed: usize = mix.seqs.iter().map(|(p, n)| (p + n).div_ceil(block)).sum();
        // A pool with spare blocks; each sequence's blocks drawn in a random order.
        let pool = blocks_needed + 7;
        let mut free: Vec<u32> = (0..pool as u32).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, rng.random_range(0..=i));
        }
        let mut tables = vec![0u32; mix.seqs.len() * shape.max_blocks];
        let (mut token_seq, mut token_ctx) = (vec![], vec![]);
        for (s, &(past, new)) in mix.seqs.iter().enumerate() {
            for b in 0..(past + new).div_ceil(block) {
                tables[s * shape.max_blocks + b] = free.pop().unwrap();
            }
            for i in 0..new {
                token_seq.push(s as u32);
                token_ctx.push((past + i + 1) as u32);
            }
        }
        let tokens = token_seq.len();
        let slots = pool * block;
        let q: Vec<T> = random(rng, tokens * shape.num_heads * shape.head_dim, -1.0, 1.0);
        let kc: Vec<T> = random(rng, slots * shape.num_kv_heads * shape.head_dim, -1.0, 1.0);
        let vc: Vec<T> = random(rng, slots * shape.num_kv_heads * shape.v_dim, -1.0, 1.0);
        let batch = PagedAttentionBatch {
            block_tables: &tables,
            token_seq: &token_seq,
            token_ctx: &token_ctx,
        };
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let mut cpu = vec![T::from_f32(0.0); tokens * shape.num_heads * shape.v_dim];
        paged_attention::paged_attention(&mut cpu, &q, &kc, &vc, &batch, scale, &shape).unwrap();
        let (dq, dk, dv) = (
            st.clone_htod(&q).unwrap(),
            st.clone_htod(&kc).unwrap(),
            st.clone_htod(&vc).unwrap(),
        );
        let mut dout = st.alloc_zeros::<T>(cpu.len()).unwrap();
        let dbatch = k
            .upload_paged_batch(&batch, shape.block_size, shape.max_blocks)
            .unwrap();
        k.paged_attention(
            &mut dout,
            &dq.as_view(),
            &dk.as_view(),
            &dv.as_view(),
            &dbatch,
            scale,
            &shape,
        )
        .unwrap();
        let auto = paged_attention::paged_attention_splits(&shape, tokens, 132);
        let mut runs = vec![(
            format!("auto ({auto} splits on 132 SMs)"),
            st.clone_dtoh(&dout).unwrap(),
        )];
        // The split form (flash-decoding), forced: some splits of the short contexts are empty.
        for splits in [2usize, 7, paged_attention::MAX_SPLITS] {
            let mut dout = st.alloc_zeros::<T>(cpu.len()).unwrap();
            k.paged_attention_with_splits(
                &mut dout,
                &dq.as_view(),
                &dk.as_view(),
                &dv.as_view(),
                &dbatch,
                scale,
                &shape,
                splits,
            )
            .unwrap();
            runs.push((format!("{splits} splits"), st.clone_dtoh(&dout).unwrap()));
        }
        let what = format!("paged_attention_{} {}", T::KERNEL_SUFFIX, mix.name);
        assert_runs_match(&what, runs, &cpu, (rel, abs), tokens);
    }
}

#[test]
fn paged_attention_matches_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    check_paged_attention::<f32>(&k, &mut rng);
    check_paged_attention::<bf16>(&k, &mut rng);
}

/// MLA in the absorbed form: DeepSeek-V3 / Kimi K2 latents (rank 512, rope 64) with a rank's 16
/// heads at TP 8 and all 128, decodes of ragged lengths (at and across block boundaries, past
/// several tiles of 128) next to a prefill chunk, blocks scattered over a pool; each launched as
/// the kernel picks, and split 3 and 32 ways (flash-decoding), a long TP 8 decode splitting by
/// itself. Random latents in [-1, 1] and queries scaled as the model's softmax scale does;
/// tolerance as paged attention's:
/// f32 1e-4 relative + 1e-5, bf16 1/128 relative + 1e-3 (one rounding of 8 significant bits).
type MlaMix = (&'static str, usize, &'static [(usize, usize)]);

fn check_mla_decode<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    use ember_kernels::mla_decode::{self, MlaShape};
    let st = k.stream();
    let (rel, abs) = if T::KERNEL_SUFFIX == "bf16" {
        (1.0 / 128.0, 1e-3)
    } else {
        (1e-4, 1e-5)
    };
    let block = 16;
    let mixes: [MlaMix; 3] = [
        (
            "tp8 decodes",
            16,
            &[(0, 1), (15, 1), (16, 1), (300, 1), (1000, 1)],
        ),
        // One long decode of a rank's 16 heads: split to fill the GPU.
        ("tp8 long decode", 16, &[(6000, 1)]),
        (
            "all heads, prefill chunk and decodes",
            128,
            &[(40, 9), (127, 1), (128, 1)],
        ),
    ];
    for (name, num_heads, seqs) in mixes {
        let max_blocks = seqs
            .iter()
            .map(|(p, n)| (p + n).div_ceil(block))
            .max()
            .unwrap();
        let shape = MlaShape {
            num_heads,
            rank: 512,
            rope_dim: 64,
            block_size: block,
            max_blocks,
        };
        let needed: usize = seqs.iter().map(|(p, n)| (p + n).div_ceil(block)).sum();
        let pool = needed + 5;
        let mut free: Vec<u32> = (0..pool as u32).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, rng.random_range(0..=i));
        }
        let mut tables = vec![0u32; seqs.len() * max_blocks];
        let (mut token_seq, mut token_ctx) = (vec![], vec![]);
        for (s, &(past, new)) in seqs.iter().enumerate() {
            for b in 0..(past + new).div_ceil(block) {
                tables[s * max_blocks + b] = free.pop().unwrap();
            }
            for i in 0..new {
                token_seq.push(s as u32);
                token_ctx.push((past + i + 1) as u32);
            }
        }
        let tokens = token_seq.len();
        let slots = pool * block;
        let q: Vec<T> = random(rng, tokens * num_heads * 576, -1.0, 1.0);
        let latent: Vec<T> = random(rng, slots * 512, -1.0, 1.0);
        let rope: Vec<T> = random(rng, slots * 64, -1.0, 1.0);
        let batch = PagedAttentionBatch {
            block_tables: &tables,
            token_seq: &token_seq,
            token_ctx: &token_ctx,
        };
        let scale = 1.0 / (192f32).sqrt();
        let mut cpu = vec![T::from_f32(0.0); tokens * num_heads * 512];
        mla_decode::mla_decode(&mut cpu, &q, &latent, &rope, &batch, scale, &shape).unwrap();
        let (dq, dl, dr) = (
            st.clone_htod(&q).unwrap(),
            st.clone_htod(&latent).unwrap(),
            st.clone_htod(&rope).unwrap(),
        );
        let dbatch = k.upload_paged_batch(&batch, block, max_blocks).unwrap();
        let mut dout = st.alloc_zeros::<T>(cpu.len()).unwrap();
        k.mla_decode(
            &mut dout,
            &dq.as_view(),
            &dl.as_view(),
            &dr.as_view(),
            &dbatch,
            scale,
            &shape,
        )
        .unwrap();
        let auto = mla_decode::mla_decode_splits(&shape, tokens, 132);
        let mut runs = vec![(
            format!("auto ({auto} splits on 132 SMs)"),
            st.clone_dtoh(&dout).unwrap(),
        )];
        // The split form, forced: the short contexts' last splits are empty.
        for splits in [3usize, 32] {
            let mut dout = st.alloc_zeros::<T>(cpu.len()).unwrap();
            k.mla_decode_with_splits(
                &mut dout,
                &dq.as_view(),
                &dl.as_view(),
                &dr.as_view(),
                &dbatch,
                scale,
                &shape,
                splits,
            )
            .unwrap();
            runs.push((format!("{splits} splits"), st.clone_dtoh(&dout).unwrap()));
        }
        let what = format!("mla_decode_{} {name}", T::KERNEL_SUFFIX);
        assert_runs_match(&what, runs, &cpu, (rel, abs), tokens);
    }
}

#[test]
fn mla_decode_matches_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    check_mla_decode::<f32>(&k, &mut rng);
    check_mla_decode::<bf16>(&k, &mut rng);
}

/// Temperature sampling with top-k / top-p / min-p on the GPU against its CPU reference: Qwen3's
/// 151,936-token vocabulary and a 2,048-token one, 256 rows each under mixed settings (greedy,
/// plain temperature, each filter alone and together) and fresh uniforms. The kernel's `expf`
/// may differ from the host's `exp` by an ulp, so a draw that lands within that of a boundary may
/// go the other way: at most 1% of the rows may differ. Then one row drawn 4,096 times at evenly
/// spaced uniforms: each token's frequency within 2e-3 of its softmax probability.
#[test]
fn sample_rows_matches_the_cpu_reference() {
    use ember_kernels::sampling::{self, DrawParams};
    let Some(k) = kernels() else { return };
    let st = k.stream();
    let mut rng = rng();
    for vocab in [151_936usize, 2_048] {
        let rows = 256;
        let logits: Vec<f32> = (0..rows * vocab)
            .map(|_| rng.random_range(-4.0f32..4.0) * rng.random_range(0.5f32..2.0))
            .collect();
        let params: Vec<DrawParams> = (0..rows)
            .map(|r| {
                let (top_k, top_p, min_p) = match r % 6 {
                    0 => (0, 1.0, 0.0),
                    1 => (50, 1.0, 0.0),
                    2 => (0, 0.9, 0.0),
                    3 => (0, 1.0, 0.05),
                    4 => (40, 0.8, 0.02),
                    _ => (1, 1.0, 0.0),
                };
                DrawParams {
                    temperature: if r % 13 == 0 {
                        0.0
                    } else {
                        rng.random_range(0.3f32..1.5)
                    },
                    top_k,
                    top_p,
                    min_p,
                    uniform: rng.random_range(0.0f32..1.0),
                }
            })
            .collect();
        let mut cpu = vec![0u32; rows];
        sampling::sample_rows(&logits, vocab, &params, &mut cpu).unwrap();
        let dl = st.clone_htod(&logits).unwrap();
        let mut dout = st.alloc_zeros::<u32>(rows).unwrap();
        k.sample_rows(&dl.as_view(), vocab, &params, &mut dout)
            .unwrap();
        let gpu = st.clone_dtoh(&dout).unwrap();
        let differ = gpu.iter().zip(&cpu).filter(|(g, c)| g != c).count();
        eprintln!("sample_rows vocab {vocab}: {differ} of {rows} rows differ");
        assert!(
            differ * 100 <= rows,
            "vocab {vocab}: {differ} of {rows} rows differ: {gpu:?} vs {cpu:?}"
        );
    }
    // One row, many draws: the frequencies are the softmax of logits / 0.7.
    let vocab = 64;
    let row: Vec<f32> = (0..vocab).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    let n = 4096;
    let logits: Vec<f32> = (0..n).flat_map(|_| row.clone()).collect();
    let params: Vec<DrawParams> = (0..n)
        .map(|i| DrawParams {
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            uniform: ((i as f64 + 0.5) / n as f64) as f32,
        })
        .collect();
    let dl = st.clone_htod(&logits).unwrap();
    let mut dout = st.alloc_zeros::<u32>(n).unwrap();
    k.sample_rows(&dl.as_view(), vocab, &params, &mut dout)
        .unwrap();
    let tokens = st.clone_dtoh(&dout).unwrap();
    let max = row.iter().copied().fold(f32::MIN, f32::max);
    let exp: Vec<f64> = row
        .iter()
        .map(|&l| (f64::from(l - max) / 0.7).exp())
        .collect();
    let sum: f64 = exp.iter().sum();
    for (id, e) in exp.iter().enumerate() {
        let freq = tokens.iter().filter(|&&t| t as usize == id).count() as f64 / n as f64;
        assert!(
            (freq - e / sum).abs() < 2e-3,
            "token {id}: {freq} vs {}",
            e / sum
        );
    }
}

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
    let rounding = if T::KERNEL_SUFFIX == "bf16" {
        1.0 / 128.0
    } else {
        0.0
    };
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
        for r in 0..m {
            for j in 0..n {
                let magnitude: f32 = (0..kk)
                    .map(|c| {
                        (e4(qa[r * kk + c])
                            * e4(qw[j * kk + c])
                            * sa[r * blocks + c / GROUP]
                            * sw[(j / block_n) * blocks + c / GROUP])
                            .abs()
                    })
                    .sum();
                let (g, c) = (gpu[r * n + j].to_f32(), cpu[r * n + j].to_f32());
                let tol = 1e-3 * magnitude + rounding * c.abs() + 1e-6;
                assert!(
                    (g - c).abs() <= tol,
                    "{what}[{r}, {j}]: GPU {g} vs CPU {c} (tolerance {tol})"
                );
            }
        }
        eprintln!("{what}: matches");
    }
}

/// The grouped W8A8 GEMM (the fused MoE's, over e4m3 experts) against its CPU reference: a decode
/// and 64 tokens over 64 experts, as the first GEMM (x per token) and the second (per entry);
/// 128 x 128 blocks (n 320, k 1000: ragged) and per-channel ones. Tolerance as `check_w8a8`.
fn check_grouped_w8a8<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    use ember_kernels::fused_moe::{self, GroupedGemmShape};
    use ember_kernels::w8a8::{self, GROUP};
    let st = k.stream();
    if !k.has_fp8_tensor_cores().unwrap() {
        eprintln!("SKIPPED grouped_w8a8: this GPU has no FP8 tensor cores");
        return;
    }
    let rounding = if T::KERNEL_SUFFIX == "bf16" {
        1.0 / 128.0
    } else {
        0.0
    };
    for (tokens, experts, top_k, n_out, k_in, block_n, x_div) in [
        (1, 64, 8, 320, 1000, 128, 8),
        (64, 64, 4, 320, 1024, 128, 1),
        (37, 16, 2, 96, 512, 1, 2),
    ] {
        let what = format!(
            "grouped_w8a8_{} t{tokens} e{experts} n{n_out} k{k_in} x_div {x_div}",
            T::KERNEL_SUFFIX
        );
        let n = tokens * top_k;
        let ids: Vec<u32> = (0..n)
            .map(|_| rng.random_range(0..experts as u32))
            .collect();
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
        let s = GroupedGemmShape {
            num_experts: experts,
            k_in,
            n_out,
            block_m: 64,
            x_div,
            num_entries: n,
        };
        let align = fused_moe::moe_align(&ids, experts, 64).unwrap();
        let mut cpu = vec![T::from_f32(0.0); n * n_out];
        w8a8::grouped_w8a8(&mut cpu, &qa, &sa, &qw, &sw, &align, &s, block_n).unwrap();
        let dids = st.clone_htod(&ids).unwrap();
        let dalign = k.moe_align(&dids.as_view(), experts, 64).unwrap();
        let (dqa, dsa) = (st.clone_htod(&qa).unwrap(), st.clone_htod(&sa).unwrap());
        let (dqw, dsw) = (st.clone_htod(&qw).unwrap(), st.clone_htod(&sw).unwrap());
        let mut dout = st.alloc_zeros::<T>(cpu.len()).unwrap();
        k.grouped_w8a8(
            &mut dout,
            &dqa.as_view(),
            &dsa.as_view(),
            &dqw.as_view(),
            &dsw.as_view(),
            &dalign,
            &s,
            block_n,
        )
        .unwrap();
        let gpu = st.clone_dtoh(&dout).unwrap();
        let e4 = ember_kernels::w8a16::e4m3_to_f32;
        for id in 0..n {
            let (e, row) = (ids[id] as usize, id / x_div);
            for j in 0..n_out {
                let magnitude: f32 = (0..k_in)
                    .map(|c| {
                        (e4(qa[row * k_in + c])
                            * e4(qw[(e * n_out + j) * k_in + c])
                            * sa[row * blocks + c / GROUP]
                            * sw[e * per + (j / block_n) * blocks + c / GROUP])
                            .abs()
                    })
                    .sum();
                let (g, c) = (gpu[id * n_out + j].to_f32(), cpu[id * n_out + j].to_f32());
                let tol = 1e-3 * magnitude + rounding * c.abs() + 1e-6;
                assert!(
                    (g - c).abs() <= tol,
                    "{what}[{id}, {j}]: GPU {g} vs CPU {c} (tolerance {tol})"
                );
            }
        }
        eprintln!("{what}: matches");
    }
}

#[test]
fn grouped_w8a8_matches_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    check_grouped_w8a8::<f32>(&k, &mut rng);
    check_grouped_w8a8::<bf16>(&k, &mut rng);
}

#[test]
fn w8a8_matches_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    check_w8a8::<f32>(&k, &mut rng);
    check_w8a8::<bf16>(&k, &mut rng);
}

/// Routing of real layer shapes: (name, config, tokens).
fn routing_cases() -> Vec<(&'static str, moe_routing::RoutingConfig)> {
    use moe_routing::{RoutingConfig, TopkMethod};
    let base = RoutingConfig {
        num_experts: 128,
        top_k: 8,
        n_group: 1,
        topk_group: 1,
        method: TopkMethod::Greedy,
        sigmoid: false,
        renormalize: true,
        scaling: 1.0,
    };
    vec![
        ("qwen3-30b-a3b softmax top-8", base),
        (
            "deepseek-v3 noaux_tc 8 groups of 32, 4 kept",
            RoutingConfig {
                num_experts: 256,
                n_group: 8,
                topk_group: 4,
                method: TopkMethod::NoauxTc,
                sigmoid: true,
                scaling: 2.5,
                ..base
            },
        ),
        (
            "kimi-k2 noaux_tc 384 experts, one group",
            RoutingConfig {
                num_experts: 384,
                method: TopkMethod::NoauxTc,
                sigmoid: true,
                scaling: 2.827,
                ..base
            },
        ),
        (
            "deepseek-v2 group-limited greedy",
            RoutingConfig {
                num_experts: 160,
                top_k: 6,
                n_group: 8,
                topk_group: 3,
                method: TopkMethod::GroupLimitedGreedy,
                renormalize: false,
                scaling: 16.0,
                ..base
            },
        ),
    ]
}

#[test]
fn moe_routing_matches_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    let st = k.stream();
    for (name, cfg) in routing_cases() {
        for tokens in [1usize, 7, 300] {
            let logits: Vec<f32> = random(&mut rng, tokens * cfg.num_experts, -4.0, 4.0);
            let bias: Vec<f32> = random(&mut rng, cfg.num_experts, -0.1, 0.1);
            let (mut ids, mut w) = (
                vec![0u32; tokens * cfg.top_k],
                vec![0f32; tokens * cfg.top_k],
            );
            moe_routing::route(&logits, &bias, &cfg, &mut ids, &mut w).unwrap();
            let (dl, db) = (
                st.clone_htod(&logits).unwrap(),
                st.clone_htod(&bias).unwrap(),
            );
            let mut dids = st.alloc_zeros::<u32>(ids.len()).unwrap();
            let mut dw = st.alloc_zeros::<f32>(w.len()).unwrap();
            k.moe_routing(&dl.as_view(), &db.as_view(), &cfg, &mut dids, &mut dw, None)
                .unwrap();
            let (gids, gw) = (st.clone_dtoh(&dids).unwrap(), st.clone_dtoh(&dw).unwrap());
            // A graph's spare rows: tokens from `live` on retired, the rest routed the same.
            let live = tokens / 2;
            let dlive = st.clone_htod(&[live as u32]).unwrap();
            let mut rids = st.alloc_zeros::<u32>(ids.len()).unwrap();
            let mut rw = st.alloc_zeros::<f32>(w.len()).unwrap();
            k.moe_routing(
                &dl.as_view(),
                &db.as_view(),
                &cfg,
                &mut rids,
                &mut rw,
                Some(&dlive),
            )
            .unwrap();
            let (mut want_ids, mut want_w) = (gids.clone(), gw.clone());
            moe_routing::retire_rows(&mut want_ids, &mut want_w, &cfg, live);
            assert_eq!(
                st.clone_dtoh(&rids).unwrap(),
                want_ids,
                "{name} x{tokens}: live {live}"
            );
            assert_eq!(
                st.clone_dtoh(&rw).unwrap(),
                want_w,
                "{name} x{tokens}: live {live}"
            );
            // expf differs from the host's exp by an ulp or two and the softmax sums in another
            // order: a near-tie may rank the other way, at most one token in a thousand here.
            let flipped = (0..tokens)
                .filter(|&t| {
                    gids[t * cfg.top_k..][..cfg.top_k] != ids[t * cfg.top_k..][..cfg.top_k]
                })
                .count();
            assert!(
                flipped * 1000 <= tokens,
                "{name} x{tokens}: {flipped} tokens routed differently"
            );
            for t in 0..tokens {
                let r = t * cfg.top_k..(t + 1) * cfg.top_k;
                if gids[r.clone()] != ids[r.clone()] {
                    continue;
                }
                for i in r {
                    let tol = 1e-5 * w[i].abs() + 1e-6;
                    assert!(
                        (gw[i] - w[i]).abs() <= tol,
                        "{name} x{tokens} token {t}: weight GPU {} vs CPU {}",
                        gw[i],
                        w[i]
                    );
                }
            }
            eprintln!("{name} x{tokens}: routing matches");
        }
    }
}

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
        for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
            let (g, c) = (g.to_f32(), c.to_f32());
            let tol = rel * c.abs() + abs;
            assert!(
                (g - c).abs() <= tol,
                "{what}[{i}]: GPU {g} vs CPU {c} (tolerance {tol})"
            );
        }
        eprintln!("{what}: matches");
    }
}

/// The grouped GEMM over e4m3 experts against its CPU reference: DeepSeek's 128 x 128 blocks
/// with ragged edges (n_out 320, k_in 200) and per-channel scales, one token (a decode: mostly
/// padding rows) to 300 tokens over 64 experts, as the first GEMM (x per token) and the second
/// (x per entry). Random finite e4m3 codes, scales ~1/64. Tolerance 1e-5 of the sum of |terms|
/// (f32 sums in another order), plus the output dtype's rounding.
fn check_grouped_w8a16<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    use ember_kernels::fused_moe::{self, GroupedGemmShape, ScaleBlocks};
    let st = k.stream();
    let rounding = if T::KERNEL_SUFFIX == "bf16" {
        1.0 / 128.0
    } else {
        0.0
    };
    for (tokens, experts, top_k, n_out, k_in, blocks, x_div) in [
        (
            1,
            64,
            8,
            320,
            200,
            ScaleBlocks {
                block_n: 128,
                block_k: 128,
            },
            8,
        ),
        (
            37,
            64,
            6,
            320,
            200,
            ScaleBlocks {
                block_n: 128,
                block_k: 128,
            },
            1,
        ),
        (
            300,
            16,
            2,
            96,
            256,
            ScaleBlocks {
                block_n: 1,
                block_k: 256,
            },
            2,
        ),
    ] {
        let what = format!(
            "grouped_w8a16_{} t{tokens} e{experts} {blocks:?} x_div {x_div}",
            T::KERNEL_SUFFIX
        );
        let n = tokens * top_k;
        let ids: Vec<u32> = (0..n)
            .map(|_| rng.random_range(0..experts as u32))
            .collect();
        let rows = n / x_div;
        let x: Vec<T> = random(rng, rows * k_in, -1.0, 1.0);
        let w: Vec<u8> = (0..experts * n_out * k_in)
            .map(|_| {
                let code: u8 = rng.random_range(0..0x7F);
                code | if rng.random_bool(0.5) { 0x80 } else { 0 }
            })
            .collect();
        let scales: Vec<f32> = (0..experts * blocks.per_expert(n_out, k_in))
            .map(|_| rng.random_range(0.005f32..0.03))
            .collect();
        let s = GroupedGemmShape {
            num_experts: experts,
            k_in,
            n_out,
            block_m: 64,
            x_div,
            num_entries: n,
        };
        let align = fused_moe::moe_align(&ids, experts, 64).unwrap();
        let mut cpu = vec![T::from_f32(0.0); n * n_out];
        fused_moe::grouped_w8a16(&mut cpu, &x, &w, &scales, &align, &s, &blocks).unwrap();
        let dids = st.clone_htod(&ids).unwrap();
        let dalign = k.moe_align(&dids.as_view(), experts, 64).unwrap();
        let (dx, dw, ds) = (
            st.clone_htod(&x).unwrap(),
            st.clone_htod(&w).unwrap(),
            st.clone_htod(&scales).unwrap(),
        );
        let mut dout = st.alloc_zeros::<T>(cpu.len()).unwrap();
        k.grouped_w8a16(
            &mut dout,
            &dx.as_view(),
            &dw.as_view(),
            &ds.as_view(),
            &dalign,
            &s,
            &blocks,
        )
        .unwrap();
        let gpu = st.clone_dtoh(&dout).unwrap();
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
        assert_grouped_close(&what, [n, n_out], &gpu, &cpu, rounding, magnitude);
        if T::KERNEL_SUFFIX == "bf16" {
            // The tensor-core kernel (prefill) against its reference: weights rounded to bf16.
            let mut cpu = vec![T::from_f32(0.0); n * n_out];
            fused_moe::grouped_w8a16_tc(&mut cpu, &x, &w, &scales, &align, &s, &blocks).unwrap();
            k.grouped_w8a16_tc(
                &mut dout,
                &dx.as_view(),
                &dw.as_view(),
                &ds.as_view(),
                &dalign,
                &s,
                &blocks,
            )
            .unwrap();
            let gpu = st.clone_dtoh(&dout).unwrap();
            assert_grouped_close(
                &format!("{what} tc"),
                [n, n_out],
                &gpu,
                &cpu,
                rounding,
                magnitude,
            );
        }
        eprintln!("{what}: matches");
    }
}

/// Every row of a grouped GEMM's output within `1e-5 · magnitude(id, j)` (the sum of the
/// products' magnitudes: f32 sums in another order) plus the output dtype's `rounding`.
fn assert_grouped_close<T: CudaElement>(
    what: &str,
    [n, n_out]: [usize; 2],
    gpu: &[T],
    cpu: &[T],
    rounding: f32,
    magnitude: impl Fn(usize, usize) -> f32,
) {
    for id in 0..n {
        for j in 0..n_out {
            let (g, c) = (gpu[id * n_out + j].to_f32(), cpu[id * n_out + j].to_f32());
            let tol = 1e-5 * magnitude(id, j) + rounding * c.abs() + 1e-6;
            assert!(
                (g - c).abs() <= tol,
                "{what}[{id}, {j}]: GPU {g} vs CPU {c} (tolerance {tol})"
            );
        }
    }
}

/// The grouped GEMM over 4-bit experts against its CPU reference: Kimi K2 Thinking's int4
/// (group 32, symmetric zero 8), GPTQ-style asymmetric float16-rounded weights (group 128) and
/// NVFP4 e2m1 codes (group 16), a decode (mostly padding rows) to 300 tokens, as the first GEMM
/// and the second. Tolerance 1e-5 of the sum of |terms|, plus the output dtype's rounding.
fn check_grouped_w4a16<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    use ember_kernels::fused_moe::{self, GroupedGemmShape, W4Params};
    let st = k.stream();
    let rounding = if T::KERNEL_SUFFIX == "bf16" {
        1.0 / 128.0
    } else {
        0.0
    };
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
        let n = tokens * top_k;
        let ids: Vec<u32> = (0..n)
            .map(|_| rng.random_range(0..experts as u32))
            .collect();
        let x: Vec<T> = random(rng, n / x_div * k_in, -1.0, 1.0);
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
        let s = GroupedGemmShape {
            num_experts: experts,
            k_in,
            n_out,
            block_m: 64,
            x_div,
            num_entries: n,
        };
        let align = fused_moe::moe_align(&ids, experts, 64).unwrap();
        let mut cpu = vec![T::from_f32(0.0); n * n_out];
        fused_moe::grouped_w4a16(&mut cpu, &x, &codes, &qparams, &align, &s, &params).unwrap();
        let dids = st.clone_htod(&ids).unwrap();
        let dalign = k.moe_align(&dids.as_view(), experts, 64).unwrap();
        let (dx, dc, dq) = (
            st.clone_htod(&x).unwrap(),
            st.clone_htod(&codes).unwrap(),
            st.clone_htod(&qparams).unwrap(),
        );
        let mut dout = st.alloc_zeros::<T>(cpu.len()).unwrap();
        k.grouped_w4a16(
            &mut dout,
            &dx.as_view(),
            &dc.as_view(),
            &dq.as_view(),
            &dalign,
            &s,
            &params,
        )
        .unwrap();
        let gpu = st.clone_dtoh(&dout).unwrap();
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
        assert_grouped_close(&what, [n, n_out], &gpu, &cpu, rounding, magnitude);
        if T::KERNEL_SUFFIX == "bf16" {
            // The tensor-core kernel (prefill) against its reference: weights rounded to bf16.
            let mut cpu = vec![T::from_f32(0.0); n * n_out];
            fused_moe::grouped_w4a16_tc(&mut cpu, &x, &codes, &qparams, &align, &s, &params)
                .unwrap();
            k.grouped_w4a16_tc(
                &mut dout,
                &dx.as_view(),
                &dc.as_view(),
                &dq.as_view(),
                &dalign,
                &s,
                &params,
            )
            .unwrap();
            let gpu = st.clone_dtoh(&dout).unwrap();
            assert_grouped_close(
                &format!("{what} tc"),
                [n, n_out],
                &gpu,
                &cpu,
                rounding,
                magnitude,
            );
        }
        eprintln!("{what}: matches");
    }
}

#[test]
fn grouped_w4a16_matches_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    check_grouped_w4a16::<f32>(&k, &mut rng);
    check_grouped_w4a16::<bf16>(&k, &mut rng);
}

#[test]
fn grouped_w8a16_matches_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    check_grouped_w8a16::<f32>(&k, &mut rng);
    check_grouped_w8a16::<bf16>(&k, &mut rng);
}

#[test]
fn fused_moe_matches_the_cpu_references() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    check_fused_moe::<f32>(&k, &mut rng);
    check_fused_moe::<bf16>(&k, &mut rng);
}

/// MLA's prefill attention (causal, keys and values contiguous) on bf16 tensor cores against its
/// CPU reference: DeepSeek's heads (keys 192 = 128 + 64 rope, values 128) at a chunk alone, after
/// cached context, past one 64-row block and at 16 heads; the tiny checkpoints' heads (24 and 16,
/// not multiples of 16); one token. Random inputs in [-1, 1]. Tolerance 1e-2 of the largest
/// value (the probabilities round to bf16 before the product: about 2^-8 of it) plus the output's
/// bf16 rounding.
#[test]
fn prefill_attention_matches_the_cpu_reference() {
    use ember_kernels::prefill_attention::{self, PrefillShape};
    let Some(k) = kernels() else { return };
    let st = k.stream();
    let mut rng = rng();
    for (q_len, kv_len, heads, dqk, dv) in [
        (37, 37, 3, 192, 128),
        (100, 170, 2, 192, 128),
        (64, 64, 16, 192, 128),
        (130, 131, 2, 24, 16),
        (5, 300, 4, 64, 32),
        (1, 1, 2, 192, 128),
    ] {
        let shape = PrefillShape {
            q_len,
            kv_len,
            heads,
            dqk,
            dv,
        };
        let what = format!("prefill_attention {shape:?}");
        let q: Vec<bf16> = random(&mut rng, q_len * heads * dqk, -1.0, 1.0);
        let kk: Vec<bf16> = random(&mut rng, kv_len * heads * dqk, -1.0, 1.0);
        let v: Vec<bf16> = random(&mut rng, kv_len * heads * dv, -1.0, 1.0);
        let scale = 1.5 / (dqk as f32).sqrt();
        let mut cpu = vec![bf16::ZERO; q_len * heads * dv];
        prefill_attention::prefill_attention(&mut cpu, &q, &kk, &v, &shape, scale).unwrap();
        let (dq, dk, dvv) = (
            st.clone_htod(&q).unwrap(),
            st.clone_htod(&kk).unwrap(),
            st.clone_htod(&v).unwrap(),
        );
        let mut dout = st.alloc_zeros::<bf16>(cpu.len()).unwrap();
        k.prefill_attention(
            &mut dout,
            &dq.as_view(),
            &dk.as_view(),
            &dvv.as_view(),
            &shape,
            scale,
        )
        .unwrap();
        let gpu = st.clone_dtoh(&dout).unwrap();
        let vmax = v.iter().map(|x| x.to_f32().abs()).fold(0f32, f32::max);
        for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
            let (g, c) = (g.to_f32(), c.to_f32());
            let tol = 1e-2 * vmax + c.abs() / 128.0;
            assert!(
                (g - c).abs() <= tol,
                "{what}[{i}]: GPU {g} vs CPU {c} (tolerance {tol})"
            );
        }
        eprintln!("{what}: matches");
    }
}

/// The drawn tokens' logprobs and best alternatives on the GPU against the CPU reference (the
/// host sampler's definition): Qwen3's vocabulary and a small one with repeated logits (ties to
/// the lower id), NaN and ±inf, and a row of nothing but -inf; 0, 5 and 20 alternatives. Ids
/// exactly; logprobs within 1e-5 (f32 exps summed in f64 in another order).
#[test]
fn token_logprobs_match_the_cpu_reference() {
    use ember_kernels::sampling::{logprobs_width, token_logprobs_rows};
    let Some(k) = kernels() else { return };
    let st = k.stream();
    let mut rng = rng();
    for (rows, vocab) in [(3, 151_936), (6, 1000)] {
        let mut logits: Vec<f32> = (0..rows * vocab)
            .map(|_| (rng.random_range(-8.0f32..8.0) * 4.0).round() / 4.0)
            .collect();
        if vocab == 1000 {
            logits[7] = f32::NAN;
            logits[vocab + 3] = f32::INFINITY;
            logits[2 * vocab + 5] = f32::NEG_INFINITY;
            logits[3 * vocab..4 * vocab].fill(f32::NEG_INFINITY);
        }
        let tokens: Vec<u32> = (0..rows)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        for top in [0, 5, 20] {
            let what = format!("token_logprobs rows {rows} vocab {vocab} k {top}");
            let mut cpu = vec![0f32; rows * logprobs_width(top)];
            token_logprobs_rows(&logits, vocab, &tokens, top, &mut cpu).unwrap();
            let (dl, dt) = (
                st.clone_htod(&logits).unwrap(),
                st.clone_htod(&tokens).unwrap(),
            );
            let mut dout = st.alloc_zeros::<f32>(cpu.len()).unwrap();
            k.token_logprobs(&dl.as_view(), vocab, &dt.as_view(), top, &mut dout)
                .unwrap();
            let gpu = st.clone_dtoh(&dout).unwrap();
            for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
                let is_id = i % logprobs_width(top) % 2 == 1;
                let close = if is_id {
                    g == c
                } else {
                    (g == c) || (g - c).abs() <= 1e-5
                };
                assert!(close, "{what}[{i}]: GPU {g} vs CPU {c}");
            }
            eprintln!("{what}: matches");
        }
    }
}

/// Step metadata staged through the page-locked ring: every upload arrives intact, for sizes in
/// one class and across classes, more uploads than the ring has buffers (each buffer reused
/// while earlier copies may still be in flight), and a size beyond staging (a pageable copy).
#[test]
fn staged_uploads_arrive_intact() {
    let Some(k) = kernels() else { return };
    let st = k.stream();
    let mut rng = rng();
    let mut sent = Vec::new();
    for round in 0..40 {
        let n = [1usize, 200, 256, 257, 5000, 70_000, 3_000_000][round % 7];
        let data: Vec<u32> = (0..n).map(|_| rng.random()).collect();
        let slice = k.stage(&data).unwrap();
        assert!(slice.len() >= n, "round {round}: {} < {n}", slice.len());
        sent.push((data, slice));
    }
    for (i, (data, slice)) in sent.iter().enumerate() {
        let back = st.clone_dtoh(slice).unwrap();
        assert_eq!(
            &back[..data.len()],
            &data[..],
            "upload {i} of {} elements",
            data.len()
        );
    }
    let floats: Vec<f32> = (0..999).map(|_| rng.random_range(-1.0..1.0)).collect();
    let back = st.clone_dtoh(&k.stage(&floats).unwrap()).unwrap();
    assert_eq!(&back[..floats.len()], &floats[..]);
}

/// `write_at` lands its elements at the offset and leaves the rest of the buffer as it was;
/// `write_rows` lands each row at its pitch and leaves the rest of the row.
#[test]
fn write_at_overwrites_only_its_range() {
    let Some(k) = kernels() else { return };
    let st = k.stream();
    let mut rng = rng();
    let base: Vec<u32> = (0..1000).map(|_| rng.random()).collect();
    let dst = st.clone_htod(&base).unwrap();
    let mut want = base.clone();
    for (offset, n) in [(0usize, 1usize), (17, 300), (999, 1), (500, 500)] {
        let data: Vec<u32> = (0..n).map(|_| rng.random()).collect();
        k.write_at(&dst, offset, &data).unwrap();
        want[offset..offset + n].copy_from_slice(&data);
    }
    assert!(
        k.write_at(&dst, 999, &[1, 2]).is_err(),
        "overruns the buffer"
    );
    assert_eq!(st.clone_dtoh(&dst).unwrap(), want);
    // Rows of 7 into rows 50 apart (a graph's block tables, rewritten to the width needed).
    let rows: Vec<u32> = (0..20 * 7).map(|_| rng.random()).collect();
    k.write_rows(&dst, 50, &rows, 7).unwrap();
    for (r, row) in rows.chunks(7).enumerate() {
        want[r * 50..r * 50 + 7].copy_from_slice(row);
    }
    assert_eq!(
        st.clone_dtoh(&dst).unwrap(),
        want,
        "only each row's first 7"
    );
    assert!(
        k.write_rows(&dst, 50, &rows, 70).is_err(),
        "wider than the pitch"
    );
    let too_many = vec![0u32; 21 * 7];
    assert!(
        k.write_rows(&dst, 50, &too_many, 7).is_err(),
        "past the buffer"
    );
}

/// Paged metadata rewritten in place ([`CudaKernels::rewrite_paged_batch`], whole tables or
/// only the columns the contexts need, as a 2D copy) is what the kernel reads next, launched
/// directly and replayed from a CUDA graph captured over the old metadata: a decode graph's
/// mechanism. Within paged attention's tolerance of the CPU
/// reference on the new metadata; rewrites of another size or past the bound are refused.
#[test]
fn a_graph_replays_over_rewritten_paged_metadata() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let Some(k) = kernels() else { return };
    let st = k.stream();
    let mut rng = rng();
    let shape = PagedAttentionShape {
        num_heads: 32,
        num_kv_heads: 4,
        head_dim: 128,
        v_dim: 128,
        block_size: 16,
        max_blocks: 64,
    };
    let (rows, pool) = (6usize, 200usize);
    let slots = pool * shape.block_size;
    let kc: Vec<f32> = random(
        &mut rng,
        slots * shape.num_kv_heads * shape.head_dim,
        -1.0,
        1.0,
    );
    let vc: Vec<f32> = random(
        &mut rng,
        slots * shape.num_kv_heads * shape.v_dim,
        -1.0,
        1.0,
    );
    let q: Vec<f32> = random(&mut rng, rows * shape.num_heads * shape.head_dim, -1.0, 1.0);
    let (dq, dk, dv) = (
        st.clone_htod(&q).unwrap(),
        st.clone_htod(&kc).unwrap(),
        st.clone_htod(&vc).unwrap(),
    );
    // One decode per row over a random context of random blocks.
    let step = |rng: &mut StdRng| {
        let mut tables = vec![0u32; rows * shape.max_blocks];
        let mut ctx = Vec::with_capacity(rows);
        for r in 0..rows {
            let len = rng.random_range(1..=shape.max_blocks * shape.block_size);
            for b in 0..len.div_ceil(shape.block_size) {
                tables[r * shape.max_blocks + b] = rng.random_range(0..pool as u32);
            }
            ctx.push(len as u32);
        }
        (tables, ctx)
    };
    let token_seq: Vec<u32> = (0..rows as u32).collect();
    let (tables, ctx) = step(&mut rng);
    fn decodes<'a>(
        tables: &'a [u32],
        token_seq: &'a [u32],
        ctx: &'a [u32],
    ) -> PagedAttentionBatch<'a> {
        PagedAttentionBatch {
            block_tables: tables,
            token_seq,
            token_ctx: ctx,
        }
    }
    let meta = k
        .upload_paged_batch_bounded(
            &decodes(&tables, &token_seq, &ctx),
            16,
            shape.max_blocks,
            pool,
        )
        .unwrap();
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let mut out = st
        .alloc_zeros::<f32>(rows * shape.num_heads * shape.v_dim)
        .unwrap();
    let launch = |out: &mut _| {
        k.paged_attention(
            out,
            &dq.as_view(),
            &dk.as_view(),
            &dv.as_view(),
            &meta,
            scale,
            &shape,
        )
        .unwrap()
    };
    st.synchronize().unwrap();
    st.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    launch(&mut out);
    let graph = st
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a graph");
    let check = |what: &str, gpu: &[f32], tables: &[u32], ctx: &[u32]| {
        let mut cpu = vec![0f32; gpu.len()];
        paged_attention::paged_attention(
            &mut cpu,
            &q,
            &kc,
            &vc,
            &decodes(tables, &token_seq, ctx),
            scale,
            &shape,
        )
        .unwrap();
        for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
            let tol = 1e-4 * c.abs() + 1e-5;
            assert!(
                (g - c).abs() <= tol,
                "{what}[{i}]: GPU {g} vs CPU {c} (tolerance {tol})"
            );
        }
    };
    for round in 0..6 {
        let (tables, ctx) = step(&mut rng);
        // Rounds 2 and up rewrite only the columns their contexts need (the graph path's).
        let width = if round < 2 {
            shape.max_blocks
        } else {
            ctx.iter()
                .map(|&c| (c as usize).div_ceil(shape.block_size))
                .max()
                .unwrap()
        };
        let narrow: Vec<u32> = tables
            .chunks(shape.max_blocks)
            .flat_map(|row| row[..width].to_vec())
            .collect();
        k.rewrite_paged_batch(&meta, &decodes(&narrow, &token_seq, &ctx), width)
            .unwrap();
        if round % 2 == 0 {
            graph.launch().unwrap();
        } else {
            launch(&mut out);
        }
        let gpu = st.clone_dtoh(&out).unwrap();
        check(
            &format!("round {round} ({width} columns)"),
            &gpu,
            &tables,
            &ctx,
        );
    }
    let (mut tables, ctx) = step(&mut rng);
    tables[0] = pool as u32;
    let w = shape.max_blocks;
    let err = k
        .rewrite_paged_batch(&meta, &decodes(&tables, &token_seq, &ctx), w)
        .unwrap_err();
    assert!(err.to_string().contains("bound to 200 blocks"), "{err}");
    let fewer = PagedAttentionBatch {
        block_tables: &tables[..(rows - 1) * w],
        token_seq: &token_seq[..rows - 1],
        token_ctx: &ctx[..rows - 1],
    };
    assert!(
        k.rewrite_paged_batch(&meta, &fewer, w).is_err(),
        "another size"
    );
    // Tables too narrow for a context are refused.
    let (tables, ctx) = step(&mut rng);
    let narrow: Vec<u32> = tables.chunks(w).map(|row| row[0]).collect();
    let long = ctx.iter().any(|&c| c as usize > shape.block_size);
    assert_eq!(
        k.rewrite_paged_batch(&meta, &decodes(&narrow, &token_seq, &ctx), 1)
            .is_err(),
        long
    );
    eprintln!("a graph over rewritten metadata matches the CPU reference, 6 rounds");
}
