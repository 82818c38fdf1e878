use super::*;
use ember_kernels::rotary::{self, RotaryShape};

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
    check_f32_then_bf16(check_rotary::<f32>, check_rotary::<bf16>);
}
