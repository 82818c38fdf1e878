use super::*;
use ember_kernels::silu_and_mul;

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
fn silu_and_mul_matches_the_cpu_reference() {
    check_f32_then_bf16(check_silu_and_mul::<f32>, check_silu_and_mul::<bf16>);
}
