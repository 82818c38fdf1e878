//! Fixtures the sampler's tests share: known logits, seeded histograms and a chi-square check.

use ember_core::SamplingParams;

use super::{sample, SequenceRng};

/// Logits whose softmax is exactly [0.1, 0.2, 0.3, 0.4].
pub(super) fn tenths() -> Vec<f32> {
    [1.0f32, 2.0, 3.0, 4.0].iter().map(|x| x.ln()).collect()
}

/// `params` drawing at temperature 1.
pub(super) fn random(params: SamplingParams) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        ..params
    }
}

pub(super) fn sample_one(logits: &[f32], params: &SamplingParams) -> u32 {
    sample(logits, params, &[], &[], &mut SequenceRng::new(Some(0))).token_id
}

/// How often each token is drawn in `n` seeded draws.
pub(super) fn histogram(logits: &[f32], params: &SamplingParams, n: usize) -> Vec<usize> {
    let mut rng = SequenceRng::new(Some(7));
    let mut counts = vec![0; logits.len()];
    for _ in 0..n {
        counts[sample(logits, params, &[], &[], &mut rng).token_id as usize] += 1;
    }
    counts
}

/// Pearson's chi-square of observed counts against expected probabilities.
pub(super) fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    let mut chi = 0.0;
    for (&c, &p) in counts.iter().zip(probs) {
        if p == 0.0 {
            assert_eq!(c, 0, "drew a token of probability 0: {counts:?}");
        } else {
            let expected = p * n as f64;
            chi += (c as f64 - expected).powi(2) / expected;
        }
    }
    chi
}

/// 99.9th percentile of chi-square with 3 degrees of freedom.
pub(super) const CHI_SQUARE_3DF: f64 = 16.27;
