//! A projection `y = x · Wᵀ` on the CPU for the few rows of a decode step (attention's
//! projections, shared experts, the LM head): each weight row is read once per call, streamed
//! against all the rows while they sit in cache, on every core (rayon over blocks of output
//! channels). At one row it is a GEMV bound by memory bandwidth. The weight is any
//! [`WeightRows`] source: dense here ([`linear_cpu`]), packed in [`crate::packed_cpu`]. Larger
//! batches (prefill) are left to a cache-blocked GEMM (candle's for dense weights), which the
//! caller picks by row count.
//!
//! Numerics: inputs and weights widened (or decoded) to f32, products summed in f32 in lanes of
//! 8 (see [`crate::cpu_dot`]), one rounding of the output.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::cpu_dot::{run_task, use_fma, DenseRows, DotWeight, Task, WeightRows};
use crate::error::check_shape;
use crate::{Element, KernelError};

/// Output channels per task at least (fewer only when the weight has fewer).
const MIN_BLOCK: usize = 8;
/// Tasks per thread: enough that a slow core does not hold the others up.
const TASKS_PER_THREAD: usize = 4;

/// `y[r, j] = Σ_c x[r, c] · w[j, c]` for `x` `[m, k]`, `w` `[n, k]` (an `nn.Linear` weight) and
/// `y` `[m, n]`, all row-major.
pub fn linear_cpu<T: Element, W: DotWeight>(
    y: &mut [T],
    x: &[T],
    w: &[W],
    [m, n, k]: [usize; 3],
) -> Result<(), KernelError> {
    linear(use_fma(), y, x, w, [m, n, k])
}

/// [`linear_cpu`], compiled for AVX2 and FMA when `fma`.
fn linear<T: Element, W: DotWeight>(
    fma: bool,
    y: &mut [T],
    x: &[T],
    w: &[W],
    [m, n, k]: [usize; 3],
) -> Result<(), KernelError> {
    check_shape(
        y.len() == m * n && x.len() == m * k && w.len() == n * k,
        "linear_cpu",
        || {
            format!(
                "[m, n, k] = [{m}, {n}, {k}] needs y of {}, x of {}, w of {}; got {}, {}, {}",
                m * n,
                m * k,
                n * k,
                y.len(),
                x.len(),
                w.len()
            )
        },
    )?;
    if k == 0 {
        y.iter_mut().for_each(|v| *v = T::from_f32(0.0));
        return Ok(());
    }
    linear_rows(fma, y, x, &DenseRows::new(w, k), m);
    Ok(())
}

/// `y[r, j] = Σ_c x[r, c] · w[j, c]` over the `m` rows of `x` (`[m, w.k()]`) into `y`
/// (`[m, w.n()]`), lengths checked by the caller; compiled for AVX2 and FMA when `fma` and the
/// source allows it.
pub(crate) fn linear_rows<T: Element, S: WeightRows>(
    fma: bool,
    y: &mut [T],
    x: &[T],
    w: &S,
    m: usize,
) {
    let (n, k) = (w.n(), w.k());
    debug_assert!(y.len() == m * n && x.len() == m * k);
    if m == 0 || n == 0 {
        return;
    }
    let fma = fma && w.simd();
    let xf: Cow<[f32]> = match T::as_f32_slice(x) {
        Some(x) => Cow::Borrowed(x),
        None => Cow::Owned(x.iter().map(|v| v.to_f32()).collect()),
    };
    let tasks = rayon::current_num_threads() * TASKS_PER_THREAD;
    let block = n.div_ceil(tasks).max(MIN_BLOCK).next_multiple_of(2);
    // Channel-major ([n][m]) so that each task owns one contiguous block of the output.
    let mut y_t = vec![0f32; m * n];
    y_t.par_chunks_mut(block * m)
        .enumerate()
        .for_each(|(b, out)| {
            let job = Block {
                x: &xf,
                k,
                w,
                j0: b * block,
            };
            run_task(fma, &job, out);
        });
    if m == 1 {
        for (o, v) in y.iter_mut().zip(&y_t) {
            *o = T::from_f32(*v);
        }
    } else {
        for (j, col) in y_t.chunks_exact(m).enumerate() {
            for (r, &v) in col.iter().enumerate() {
                y[r * n + j] = T::from_f32(v);
            }
        }
    }
}

/// One task: a block of output channels (the weight rows from `j0` on) over every row of `x`.
struct Block<'a, S> {
    x: &'a [f32],
    k: usize,
    w: &'a S,
    j0: usize,
}

impl<S: WeightRows> Task for Block<'_, S> {
    /// Writes the block's channels, channel-major (`[channels][m]`), into `out`.
    #[inline(always)]
    fn run<const FMA: bool>(&self, out: &mut [f32]) {
        let k = self.k;
        let m = self.x.len() / k;
        let channels = out.len() / m;
        let row = |r: usize| &self.x[r * k..][..k];
        let mut j = 0;
        while j + 1 < channels {
            let js = [self.j0 + j, self.j0 + j + 1];
            let (a, b) = out[j * m..(j + 2) * m].split_at_mut(m);
            self.w.row_dots::<2, FMA>(&row, 0..m, js, |r, [da, db]| {
                a[r] = da;
                b[r] = db;
            });
            j += 2;
        }
        if j < channels {
            let col = &mut out[j * m..(j + 1) * m];
            self.w
                .row_dots::<1, FMA>(&row, 0..m, [self.j0 + j], |r, [d]| col[r] = d);
        }
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// The plain reference: each output a sequential f32 sum over the widened inputs.
    fn reference(x: &[f32], w: &[f32], [m, n, k]: [usize; 3]) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                y[r * n + j] = (0..k).map(|c| x[r * k + c] * w[j * k + c]).sum();
            }
        }
        y
    }

    fn uniform(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// Shapes with edges: one row, rows past a tile, channels odd and fewer than a block, `k`
    /// not a multiple of the 8 lanes, a weight split into many tasks.
    const SHAPES: [[usize; 3]; 5] = [
        [1, 1, 1],
        [1, 37, 19],
        [3, 9, 64],
        [7, 130, 67],
        [16, 1001, 40],
    ];

    /// f32, with AVX2/FMA where the CPU has them and portable: within 1e-5 per input
    /// channel of the reference (another summation order).
    #[test]
    fn f32_matches_the_reference() {
        for fma in [use_fma(), false] {
            for (i, &[m, n, k]) in SHAPES.iter().enumerate() {
                let (x, w) = (uniform(m * k, i as u64), uniform(n * k, 100 + i as u64));
                let want = reference(&x, &w, [m, n, k]);
                let mut got = vec![0f32; m * n];
                linear(fma, &mut got, &x, &w, [m, n, k]).unwrap();
                for (g, v) in got.iter().zip(&want) {
                    assert!(
                        (g - v).abs() <= 1e-5 * (1.0 + k as f32),
                        "fma {fma}, {m}x{n}x{k}: {g} vs {v}"
                    );
                }
            }
        }
    }

    /// bf16 inputs and weights: within one bf16 rounding of the output (2⁻⁸ relative) of the
    /// reference run in f32 on the same widened values, plus the f32 tolerance.
    #[test]
    fn bf16_matches_the_reference_within_one_rounding() {
        for (i, &[m, n, k]) in SHAPES.iter().enumerate() {
            let to_bf16 = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
            let x = to_bf16(uniform(m * k, 10 + i as u64));
            let w = to_bf16(uniform(n * k, 200 + i as u64));
            let widen = |v: &[bf16]| v.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
            let want = reference(&widen(&x), &widen(&w), [m, n, k]);
            let mut got = vec![bf16::ZERO; m * n];
            linear_cpu(&mut got, &x, &w, [m, n, k]).unwrap();
            for (g, v) in got.iter().zip(&want) {
                let g = g.to_f32();
                assert!(
                    (g - v).abs() <= 1e-5 * (1.0 + k as f32) + v.abs() / 256.0,
                    "{m}x{n}x{k}: {g} vs {v}"
                );
            }
        }
    }

    /// f32 inputs against bf16 weights (a 16-bit checkpoint held as stored under f32
    /// activations): the reference on the widened weights, within the f32 tolerance.
    #[test]
    fn bf16_weights_under_f32_inputs_match_the_reference() {
        let [m, n, k] = SHAPES[3];
        let x = uniform(m * k, 5);
        let w: Vec<bf16> = uniform(n * k, 6).into_iter().map(bf16::from_f32).collect();
        let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let want = reference(&x, &wf, [m, n, k]);
        let mut got = vec![0f32; m * n];
        linear_cpu(&mut got, &x, &w, [m, n, k]).unwrap();
        for (g, v) in got.iter().zip(&want) {
            assert!((g - v).abs() <= 1e-5 * (1.0 + k as f32), "{g} vs {v}");
        }
    }

    #[test]
    fn a_wrong_length_is_refused() {
        let mut y = vec![0f32; 5];
        let err = linear_cpu(&mut y, &[0f32; 8], &[0f32; 12], [2, 3, 4])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("needs y of 6") && err.contains("got 5"),
            "{err}"
        );
    }
}
