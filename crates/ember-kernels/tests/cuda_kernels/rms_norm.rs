use super::*;
use ember_kernels::rms_norm;

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

#[test]
fn rms_norm_matches_the_cpu_reference() {
    check_f32_then_bf16(check_rms_norm::<f32>, check_rms_norm::<bf16>);
}

#[test]
fn fused_add_rms_norm_matches_the_cpu_reference() {
    check_f32_then_bf16(
        check_fused_add_rms_norm::<f32>,
        check_fused_add_rms_norm::<bf16>,
    );
}
