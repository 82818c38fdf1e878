//! Each CUDA kernel against its CPU reference on fresh random inputs (the seed is printed, so a
//! failure can be replayed with EMBER_KERNEL_TEST_SEED). Skipped, saying so, without a GPU.
//! Tolerance: f32 within 2e-5 relative (plus 1e-6 absolute): only the order of the f32 sum and
//! rsqrtf/expf differ; bf16 within one bf16 ulp of the reference (2^-7 relative, plus 1e-6).
#![cfg(feature = "cuda")]

use ember_kernels::cuda::{CudaElement, CudaKernels};
use ember_kernels::{rms_norm, silu_and_mul};
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
        k.rms_norm(&dx, &dw, 1e-6, &mut dout).unwrap();
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
        k.fused_add_rms_norm(&dx, &mut dres, &dw, 1e-6, &mut dout)
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
        k.silu_and_mul(&din, d, &mut dout).unwrap();
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

#[test]
fn ptxas_reported_every_kernel_for_every_architecture_without_spills() {
    let report = ember_kernels::cuda::PTXAS_RESOURCE_USAGE;
    for kernel in [
        "rms_norm_f32",
        "rms_norm_bf16",
        "fused_add_rms_norm_f32",
        "silu_and_mul_bf16",
    ] {
        assert!(
            report.contains(&format!("::{kernel} ")),
            "{kernel} missing from:\n{report}"
        );
    }
    assert!(!report.contains("SPILL"), "a kernel spills:\n{report}");
}
