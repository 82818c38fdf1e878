use super::*;
use ember_kernels::sampling;

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
