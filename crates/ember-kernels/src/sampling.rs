//! Sampling over a batch of logits rows where the logits are, so a step copies back one token id
//! per sequence rather than its vocab-sized row: greedy (each row's argmax) and temperature
//! sampling with top-k, top-p and min-p ([`sample_rows`]).
//!
//! The greedy choice, shared by the CPU reference, the host sampler (ember-engine's `sampler`)
//! and `kernels/sampling.cu`: the first index of the largest value; NaN never wins; a row with no
//! number other than NaN gives 0. Exact (no arithmetic), so the kernel must agree bit for bit.
//!
//! The sampling rules, shared by [`sample_rows`] and `kernels/sampling.cu`'s `sample_rows_f32`
//! (vLLM's filters, in its order; ties at a cut are kept, as torch's `>=` keeps them):
//! - scores `s = logit / temperature` (f32 division); NaN is -inf, +inf the largest finite f32;
//! - weights `w = exp(s - max s)` in f32 (so the best is 1), and each weight's mass as a 64-bit
//!   fixed-point integer `floor(w · 2^40)`: every sum below is exact, in any order;
//! - top-k (`0 < k < vocab`): keep the scores at least the k-th largest (counted with repeats);
//! - top-p (`p < 1`): of those, keep the scores at least the largest `c` whose kept mass at or
//!   above `c` reaches `floor(p · total kept mass)`: the smallest best-first set with that mass;
//! - min-p (`> 0`): keep weights of at least `min_p` (relative to the best, whose weight is 1);
//! - draw: `target = floor(u · kept mass)` for the request's uniform `u` in [0, 1) (an f32), and
//!   the token is the lowest id whose running kept mass, in id order, passes `target`.
//!
//! The kernel's `expf` may differ from the host's `exp` by an ulp or two, so a weight at a cut or
//! a draw at a boundary may go the other way: the two agree on all but such near-ties.

use crate::error::check_shape;
use crate::KernelError;

/// Rows of an argmax call, or why `logits` is not `[rows, vocab]` for `out` `[rows]`.
pub fn argmax_shape(logits_len: usize, vocab: usize, out_len: usize) -> Result<usize, KernelError> {
    check_shape(vocab > 0, "argmax", || "vocab must be positive".to_string())?;
    check_shape(logits_len == out_len * vocab, "argmax", || {
        format!("logits has {logits_len} elements, expected {out_len} rows x vocab {vocab}")
    })?;
    Ok(out_len)
}

/// The first index of the largest value of `values`; NaN never wins; 0 when every value is NaN.
pub fn argmax(values: &[f32]) -> u32 {
    argmax_iter(values.iter().copied())
}

/// [`argmax`] over values read twice from an iterator (a sampler's `(id, logit)` candidates),
/// so callers need not copy them into a slice.
pub fn argmax_iter(values: impl Iterator<Item = f32> + Clone) -> u32 {
    // Two passes, so the max can vectorise.
    let max = values.clone().fold(f32::NEG_INFINITY, f32::max);
    values.into_iter().position(|v| v == max).unwrap_or(0) as u32
}

/// CPU reference: `out[r]` = [`argmax`] of row `r` of `logits` (`[rows, vocab]`).
pub fn argmax_rows(logits: &[f32], vocab: usize, out: &mut [u32]) -> Result<(), KernelError> {
    argmax_shape(logits.len(), vocab, out.len())?;
    for (row, out) in logits.chunks_exact(vocab).zip(out) {
        *out = argmax(row);
    }
    Ok(())
}

/// A logit as the logprobs see it: NaN is -inf, +inf the largest finite f32.
pub fn finite_or_neg_inf(logit: f32) -> f32 {
    if logit.is_nan() {
        f32::NEG_INFINITY
    } else {
        logit.min(f32::MAX)
    }
}

/// The log-probability of `token` under `log_softmax(row)` and the `k` most likely tokens with
/// theirs, best first, ties to the lower id: the one definition of reported logprobs (the host
/// sampler's, and the reference of `kernels/sampling.cu`'s `token_logprobs_f32`). Logits pass
/// through [`finite_or_neg_inf`]; exps are f32, their sum f64; a row of nothing but -inf gives
/// -inf everywhere.
pub fn log_softmax_top(row: &[f32], token: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let k = k.min(row.len());
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    let mut max = f32::NEG_INFINITY;
    for (id, &logit) in row.iter().enumerate() {
        let logit = finite_or_neg_inf(logit);
        max = max.max(logit);
        // Scanning in id order and inserting after equal values keeps ties at the lower id.
        if k > 0 && (top.len() < k || logit > top[k - 1].1) {
            let at = top.partition_point(|&(_, best)| best >= logit);
            top.insert(at, (id as u32, logit));
            top.truncate(k);
        }
    }
    let log_norm = if max == f32::NEG_INFINITY {
        f64::INFINITY
    } else {
        // exp in f32 keeps a 150k-vocab row cheap; summing in f64 keeps the result exact to ~1e-7.
        let sum: f64 = row
            .iter()
            .map(|&l| f64::from((finite_or_neg_inf(l) - max).exp()))
            .sum();
        f64::from(max) + sum.ln()
    };
    let logprob = |logit: f32| (f64::from(logit) - log_norm) as f32;
    let token_logit = row
        .get(token as usize)
        .copied()
        .map_or(f32::NEG_INFINITY, finite_or_neg_inf);
    (
        logprob(token_logit),
        top.into_iter().map(|(id, l)| (id, logprob(l))).collect(),
    )
}

/// f32s per row of [`token_logprobs_rows`]'s output for `k` alternatives: the token's logprob,
/// then each alternative's id (exact in f32 below 2^24) and logprob.
pub fn logprobs_width(k: usize) -> usize {
    1 + 2 * k
}

/// CPU reference of `token_logprobs_f32`: each row's [`log_softmax_top`] of its token
/// (`tokens[r]`) with `k` alternatives (at most the vocab), packed as [`logprobs_width`] says.
pub fn token_logprobs_rows(
    logits: &[f32],
    vocab: usize,
    tokens: &[u32],
    k: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let rows = argmax_shape(logits.len(), vocab, tokens.len())?;
    let k = k.min(vocab);
    check_shape(
        out.len() == rows * logprobs_width(k),
        "token_logprobs",
        || {
            format!(
                "out has {} elements, expected {rows} rows x {}",
                out.len(),
                logprobs_width(k)
            )
        },
    )?;
    for ((row, &token), out) in logits
        .chunks_exact(vocab)
        .zip(tokens)
        .zip(out.chunks_exact_mut(logprobs_width(k)))
    {
        let (lp, top) = log_softmax_top(row, token, k);
        out[0] = lp;
        for (j, (id, l)) in top.into_iter().enumerate() {
            out[1 + 2 * j] = id as f32;
            out[2 + 2 * j] = l;
        }
    }
    Ok(())
}

/// One row's sampling settings and its draw (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawParams {
    /// 0 (or less) is greedy: the row's [`argmax`], the filters and `uniform` unused.
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: u32,
    /// 1 keeps every token.
    pub top_p: f32,
    /// 0 keeps every token.
    pub min_p: f32,
    /// The request's uniform draw in [0, 1).
    pub uniform: f32,
}

/// Fixed-point scale of the masses: weights of at most 1 become integers of at most 2^40, and a
/// row of 2^23 tokens sums to under 2^63.
pub const MASS_ONE: f64 = (1u64 << 40) as f64;

/// Rows of a sampling call, or why the buffers do not fit.
pub fn sample_shape(
    logits_len: usize,
    vocab: usize,
    params_len: usize,
    out_len: usize,
) -> Result<usize, KernelError> {
    check_shape(vocab > 0 && vocab < 1 << 23, "sample_rows", || {
        format!("vocab {vocab} must be 1 to 2^23")
    })?;
    check_shape(
        logits_len == out_len * vocab && params_len == out_len,
        "sample_rows",
        || {
            format!(
            "logits has {logits_len} elements and {params_len} rows of params, expected {out_len} rows x vocab {vocab}"
        )
        },
    )?;
    Ok(out_len)
}

/// The score of a logit under `temperature`: NaN is -inf, +inf the largest finite value.
pub fn score(logit: f32, temperature: f32) -> f32 {
    let s = logit / temperature;
    if s.is_nan() {
        f32::NEG_INFINITY
    } else if s == f32::INFINITY {
        f32::MAX
    } else {
        s
    }
}

/// An order-preserving key of a score: `a < b` exactly when `key(a) < key(b)`.
pub fn key(score: f32) -> u32 {
    let bits = score.to_bits();
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// A weight's fixed-point mass.
pub fn mass(weight: f32) -> u64 {
    (f64::from(weight) * MASS_ONE) as u64
}

/// CPU reference: `out[r]` = the token row `r` of `logits` (`[rows, vocab]`) draws under
/// `params[r]` (see the module doc for the rules).
pub fn sample_rows(
    logits: &[f32],
    vocab: usize,
    params: &[DrawParams],
    out: &mut [u32],
) -> Result<(), KernelError> {
    sample_shape(logits.len(), vocab, params.len(), out.len())?;
    for ((row, p), out) in logits.chunks_exact(vocab).zip(params).zip(out) {
        *out = sample_row(row, p);
    }
    Ok(())
}

fn sample_row(row: &[f32], p: &DrawParams) -> u32 {
    if p.temperature <= 0.0 {
        return argmax(row);
    }
    let scores: Vec<f32> = row.iter().map(|&l| score(l, p.temperature)).collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return argmax(row);
    }
    let weights: Vec<f32> = scores.iter().map(|&s| (s - max).exp()).collect();
    let keys: Vec<u32> = scores.iter().map(|&s| key(s)).collect();
    let mut kept: Vec<bool> = vec![true; row.len()];
    if p.top_k > 0 && (p.top_k as usize) < row.len() {
        let mut sorted = keys.clone();
        sorted.sort_unstable_by_key(|&k| std::cmp::Reverse(k));
        let cut = sorted[p.top_k as usize - 1];
        for (k, &key) in kept.iter_mut().zip(&keys) {
            *k &= key >= cut;
        }
    }
    if p.top_p < 1.0 {
        let mut by_key: Vec<(u32, u64)> = keys
            .iter()
            .zip(&weights)
            .zip(&kept)
            .filter(|(_, &k)| k)
            .map(|((&key, &w), _)| (key, mass(w)))
            .collect();
        let total: u64 = by_key.iter().map(|e| e.1).sum();
        let target = (f64::from(p.top_p) * total as f64) as u64;
        by_key.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        // The largest key whose mass at or above it reaches the target.
        let (mut acc, mut cut, mut i) = (0u64, 0u32, 0);
        while i < by_key.len() {
            let key = by_key[i].0;
            while i < by_key.len() && by_key[i].0 == key {
                acc += by_key[i].1;
                i += 1;
            }
            cut = key;
            if acc >= target {
                break;
            }
        }
        for (k, &key) in kept.iter_mut().zip(&keys) {
            *k &= key >= cut;
        }
    }
    if p.min_p > 0.0 {
        for (k, &w) in kept.iter_mut().zip(&weights) {
            *k &= w >= p.min_p;
        }
    }
    let masses: Vec<u64> = weights
        .iter()
        .zip(&kept)
        .map(|(&w, &k)| if k { mass(w) } else { 0 })
        .collect();
    let total: u64 = masses.iter().sum();
    if total == 0 {
        return argmax(row);
    }
    let target = (f64::from(p.uniform) * total as f64) as u64;
    let mut acc = 0u64;
    for (id, &m) in masses.iter().enumerate() {
        acc += m;
        if acc > target {
            return id as u32;
        }
    }
    argmax(row)
}

/// The launchers: [`argmax_rows`], [`sample_rows`] and [`token_logprobs_rows`] on the GPU.
#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{CudaSlice, CudaView, PushKernelArg};

    use super::{argmax_shape, logprobs_width, sample_shape, DrawParams};
    use crate::cuda::{block_per_row, int32, CudaKernels};
    use crate::error::check_shape;
    use crate::KernelError;

    /// Threads per block of `argmax_f32` in `kernels/sampling.cu` (its `ARGMAX_THREADS`).
    const ARGMAX_THREADS: u32 = 256;
    /// Threads per block of `token_logprobs_f32` in `kernels/sampling.cu` (its `LOGPROB_THREADS`).
    const LOGPROB_THREADS: u32 = 512;
    /// Threads per block of `sample_rows_f32` in `kernels/sampling.cu` (its `SAMPLE_THREADS`).
    const SAMPLE_THREADS: u32 = 512;

    impl CudaKernels {
        /// [`crate::sampling::argmax_rows`] on the GPU: each f32 logits row's token id, so greedy
        /// decoding copies back `rows` ids instead of `rows x vocab` logits. `logits` is a view, as
        /// a tensor's rows may start inside its buffer.
        pub fn argmax_rows(
            &self,
            logits: &CudaView<'_, f32>,
            vocab: usize,
            out: &mut CudaSlice<u32>,
        ) -> Result<(), KernelError> {
            let rows = argmax_shape(logits.len(), vocab, out.len())?;
            if rows == 0 {
                return Ok(());
            }
            let cfg = block_per_row("argmax", "rows", rows, ARGMAX_THREADS)?;
            let vocab = int32("argmax", "vocab", vocab)?;
            let f = self.sampling.load_function("argmax_f32")?;
            let mut launch = self.stream.launch_builder(&f);
            launch.arg(out).arg(logits).arg(&vocab);
            // SAFETY: matches argmax_f32(unsigned*, const float*, int) in kernels/sampling.cu,
            // launched with its ARGMAX_THREADS; argmax_shape bounds every row it reads and writes.
            unsafe { launch.launch(cfg) }?;
            Ok(())
        }

        /// [`crate::sampling::sample_rows`] on the GPU: one token per row of f32 `logits`
        /// (`[rows, vocab]`), each row drawn under its `params` (copied over, five floats a row).
        pub fn sample_rows(
            &self,
            logits: &CudaView<f32>,
            vocab: usize,
            params: &[DrawParams],
            out: &mut CudaSlice<u32>,
        ) -> Result<(), KernelError> {
            let rows = sample_shape(logits.len(), vocab, params.len(), out.len())?;
            if rows == 0 {
                return Ok(());
            }
            let op = "sample_rows";
            let cfg = block_per_row(op, "rows", rows, SAMPLE_THREADS)?;
            let vocab_arg = int32(op, "vocab", vocab)?;
            let flat: Vec<f32> = params
                .iter()
                .flat_map(|p| [p.temperature, p.top_k as f32, p.top_p, p.min_p, p.uniform])
                .collect();
            let dparams = self.stage(&flat)?;
            let f = self.sampling.load_function("sample_rows_f32")?;
            let mut launch = self.stream.launch_builder(&f);
            launch.arg(out).arg(logits).arg(&dparams).arg(&vocab_arg);
            // SAFETY: matches sample_rows_f32(unsigned*, const float*, const float*, int) in
            // kernels/sampling.cu; sample_shape checked `rows` rows of `vocab` logits, five params
            // and one output per row (top_k below 2^23, exact as a float).
            unsafe { launch.launch(cfg) }?;
            Ok(())
        }

        /// [`crate::sampling::token_logprobs_rows`] on the GPU: each row's token's logprob and its
        /// `k` best alternatives (at most the vocab), packed per row as
        /// [`crate::sampling::logprobs_width`] says.
        pub fn token_logprobs(
            &self,
            logits: &CudaView<f32>,
            vocab: usize,
            tokens: &CudaView<u32>,
            k: usize,
            out: &mut CudaSlice<f32>,
        ) -> Result<(), KernelError> {
            let op = "token_logprobs";
            let rows = argmax_shape(logits.len(), vocab, tokens.len())?;
            let k = k.min(vocab);
            check_shape(out.len() == rows * logprobs_width(k), op, || {
                format!(
                    "out has {} elements for {rows} rows of {k} alternatives",
                    out.len()
                )
            })?;
            check_shape(vocab < 1 << 24, op, || {
                format!("vocab {vocab}: ids must be exact as f32")
            })?;
            if rows == 0 {
                return Ok(());
            }
            let cfg = block_per_row(op, "rows", rows, LOGPROB_THREADS)?;
            let (vocab_arg, k_arg) = (int32(op, "vocab", vocab)?, int32(op, "k", k)?);
            let f = self.sampling.load_function("token_logprobs_f32")?;
            let mut launch = self.stream.launch_builder(&f);
            launch
                .arg(out)
                .arg(logits)
                .arg(tokens)
                .arg(&vocab_arg)
                .arg(&k_arg);
            // SAFETY: matches token_logprobs_f32(float*, const float*, const unsigned*, int, int)
            // in kernels/sampling.cu; `rows` rows of `vocab` logits, one token and 1 + 2k outputs
            // each.
            unsafe { launch.launch(cfg) }?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(temperature: f32, top_k: u32, top_p: f32, min_p: f32, uniform: f32) -> DrawParams {
        DrawParams {
            temperature,
            top_k,
            top_p,
            min_p,
            uniform,
        }
    }

    /// How often each token comes out over `n` evenly spaced uniforms.
    fn frequencies(row: &[f32], p: DrawParams, n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; row.len()];
        for i in 0..n {
            let u = (i as f64 + 0.5) / n as f64;
            let mut out = [0u32];
            sample_rows(
                row,
                row.len(),
                &[DrawParams {
                    uniform: u as f32,
                    ..p
                }],
                &mut out,
            )
            .unwrap();
            counts[out[0] as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    #[test]
    fn draws_follow_the_softmax_of_the_tempered_logits() {
        let row = [0.0f32, 1.0, 2.0, 0.5];
        for t in [0.5f32, 1.0, 2.0] {
            let exp: Vec<f64> = row
                .iter()
                .map(|&l| (f64::from(l / t) - f64::from(2.0 / t)).exp())
                .collect();
            let sum: f64 = exp.iter().sum();
            let got = frequencies(&row, draw(t, 0, 1.0, 0.0, 0.0), 20_000);
            for (g, e) in got.iter().zip(&exp) {
                assert!((g - e / sum).abs() < 1e-3, "t {t}: {got:?} vs {exp:?}");
            }
        }
    }

    #[test]
    fn filters_keep_what_vllm_keeps() {
        // Probabilities ∝ exp: 0.1, 0.2, 0.4, 0.2, 0.1 (as weights 0.25, 0.5, 1, 0.5, 0.25).
        let row: Vec<f32> = [0.25f32, 0.5, 1.0, 0.5, 0.25]
            .iter()
            .map(|w| w.ln())
            .collect();
        let kept = |p: DrawParams| -> Vec<bool> {
            frequencies(&row, p, 4000)
                .iter()
                .map(|&f| f > 0.0)
                .collect()
        };
        // top-k 2: the best and both ties for second.
        assert_eq!(
            kept(draw(1.0, 2, 1.0, 0.0, 0.0)),
            [false, true, true, true, false]
        );
        assert_eq!(
            kept(draw(1.0, 1, 1.0, 0.0, 0.0)),
            [false, false, true, false, false]
        );
        // top-p 0.5: 0.4 alone falls short, with the tied 0.2s it passes.
        assert_eq!(
            kept(draw(1.0, 0, 0.5, 0.0, 0.0)),
            [false, true, true, true, false]
        );
        assert_eq!(
            kept(draw(1.0, 0, 0.39, 0.0, 0.0)),
            [false, false, true, false, false]
        );
        // min-p 0.3 of the best: the 0.25s go.
        assert_eq!(
            kept(draw(1.0, 0, 1.0, 0.3, 0.0)),
            [false, true, true, true, false]
        );
        // Together: top-k 4 (drops nothing but ties), top-p 0.9 of that.
        let f = frequencies(&row, draw(1.0, 3, 0.9, 0.0, 0.0), 4000);
        assert!(
            (f[2] - 0.5).abs() < 1e-3 && (f[1] - 0.25).abs() < 1e-3,
            "{f:?}"
        );
    }

    #[test]
    fn the_draw_walks_token_ids_in_order_and_greedy_takes_the_argmax() {
        // Masses 1, 1, 2 (of 4): u below 1/4 is token 0, below 1/2 token 1, the rest token 2.
        let row = [0.0f32, 0.0, 2f32.ln()];
        let one = |u: f32| {
            let mut out = [9u32];
            sample_rows(&row, 3, &[draw(1.0, 0, 1.0, 0.0, u)], &mut out).unwrap();
            out[0]
        };
        assert_eq!(
            [
                one(0.0),
                one(0.24),
                one(0.26),
                one(0.49),
                one(0.51),
                one(0.999)
            ],
            [0, 0, 1, 1, 2, 2]
        );
        let mut out = [9u32; 2];
        let logits = [1.0, f32::NAN, 3.0, 3.0, f32::NAN, f32::INFINITY];
        sample_rows(&logits, 3, &[draw(0.0, 0, 1.0, 0.0, 0.7); 2], &mut out).unwrap();
        assert_eq!(out, [2, 2]);
        // NaN never drawn; +inf is the largest finite score, so it takes all the mass.
        sample_rows(&logits, 3, &[draw(1.0, 0, 1.0, 0.0, 0.99); 2], &mut out).unwrap();
        assert_eq!(out, [2, 2]);
        assert!(sample_rows(&logits, 3, &[draw(1.0, 0, 1.0, 0.0, 0.5)], &mut out).is_err());
    }

    #[test]
    fn picks_the_first_of_tied_maxima() {
        assert_eq!(argmax(&[0.5, 2.0, -1.0, 2.0]), 1);
        assert_eq!(argmax(&[3.0, 3.0]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY, -1e30]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
    }

    #[test]
    fn nan_never_wins() {
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN, 0.5]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 1);
        assert_eq!(argmax(&[f32::NAN; 4]), 0);
        assert_eq!(argmax(&[1.0, f32::INFINITY, f32::NAN]), 1);
    }

    #[test]
    fn each_row_gets_its_own_argmax_and_shapes_are_checked() {
        let logits = [1.0, 9.0, 3.0, 7.0, 7.0, 0.0];
        let mut out = [u32::MAX; 2];
        argmax_rows(&logits, 3, &mut out).unwrap();
        assert_eq!(out, [1, 0]);
        assert!(argmax_rows(&logits, 4, &mut out).is_err());
        assert!(argmax_rows(&logits, 0, &mut []).is_err());
    }
}
