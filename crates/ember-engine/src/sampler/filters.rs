//! Temperature, top-k, top-p and min-p over `(token id, weight)` candidates, and the one draw
//! from what they leave (transformers' order for the filters).

use std::cmp::Ordering;

use ember_core::SamplingParams;
use ember_kernels::sampling::finite_or_neg_inf;

use super::SequenceRng;

/// `(token id, logit)` for every token: the one working buffer of a draw.
pub(super) fn candidates(logits: &[f32]) -> Vec<(u32, f32)> {
    logits
        .iter()
        .enumerate()
        .map(|(id, &logit)| (id as u32, logit))
        .collect()
}

/// Temperature, then (without top-k) weights relative to the best; drops tokens at -inf.
pub(super) fn scale_and_exp(candidates: &mut Vec<(u32, f32)>, params: &SamplingParams) {
    for (_, logit) in candidates.iter_mut() {
        *logit = finite_or_neg_inf(*logit / params.temperature);
    }
    candidates.retain(|&(_, logit)| logit > f32::NEG_INFINITY);
    if params.top_k > 0 {
        move_best_to_front(candidates, params.top_k);
        candidates.truncate(params.top_k);
    }
    let max = candidates
        .iter()
        .fold(f32::NEG_INFINITY, |max, &(_, logit)| max.max(logit));
    for (_, value) in candidates.iter_mut() {
        *value = (*value - max).exp();
    }
}

/// Temperature, top-k, top-p, min-p, then one draw from what is left.
///
/// Selection reorders candidates deterministically, so a seed repeats its tokens.
pub(super) fn draw_filtered(
    mut candidates: Vec<(u32, f32)>,
    params: &SamplingParams,
    rng: &mut SequenceRng,
) -> u32 {
    scale_and_exp(&mut candidates, params);
    if params.top_p < 1.0 {
        // Validation keeps top_p above 0; the clamp keeps at least one token regardless.
        keep_nucleus(&mut candidates, params.top_p.max(f32::MIN_POSITIVE));
    }
    if params.min_p > 0.0 {
        // The best token's weight is exactly 1, so weights are already relative to it.
        let min_p = params.min_p.min(1.0);
        candidates.retain(|&(_, weight)| weight >= min_p);
    }
    draw(&candidates, rng.next_f64())
}

/// The candidate where `uniform` (in [0, 1)) falls in the cumulative weights; token 0 if none.
pub(super) fn draw(candidates: &[(u32, f32)], uniform: f64) -> u32 {
    let mut remaining = uniform * weight_sum(candidates);
    let mut last_positive = candidates.first().map_or(0, |&(id, _)| id);
    for &(id, weight) in candidates {
        if weight > 0.0 {
            if remaining < f64::from(weight) {
                return id;
            }
            remaining -= f64::from(weight);
            last_positive = id;
        }
    }
    last_positive
}

/// Keeps the smallest best-first set of candidates whose weight reaches `top_p` of the total.
///
/// Weights are bucketed by their leading float bits (monotone for positive floats), so one pass
/// finds the bucket the cut falls in and only that bucket is sorted, not the whole vocab.
fn keep_nucleus(candidates: &mut Vec<(u32, f32)>, top_p: f32) {
    const BUCKETS: usize = 2048; // 1.0 has bits 0x3F80_0000, bucket 2032.
    let bucket = |weight: f32| ((weight.to_bits() >> 19) as usize).min(BUCKETS - 1);
    let mut bucket_mass = [0.0f64; BUCKETS];
    for &(_, weight) in candidates.iter() {
        bucket_mass[bucket(weight)] += f64::from(weight);
    }
    let target = f64::from(top_p) * bucket_mass.iter().sum::<f64>();
    let (mut cut, mut mass) = (0, 0.0);
    for b in (0..BUCKETS).rev() {
        if mass + bucket_mass[b] >= target {
            cut = b;
            break;
        }
        mass += bucket_mass[b];
    }
    candidates.retain(|&(_, weight)| bucket(weight) >= cut);
    let mut above = 0;
    for i in 0..candidates.len() {
        if bucket(candidates[i].1) > cut {
            candidates.swap(above, i);
            above += 1;
        }
    }
    candidates[above..].sort_unstable_by(best_first);
    let mut end = candidates.len();
    for (i, &(_, weight)) in candidates.iter().enumerate().skip(above) {
        if mass >= target {
            end = i.max(1);
            break;
        }
        mass += f64::from(weight);
    }
    candidates.truncate(end);
}

/// Moves the `n` best candidates, in no order, to the front.
fn move_best_to_front(candidates: &mut [(u32, f32)], n: usize) {
    if n > 0 && n < candidates.len() {
        candidates.select_nth_unstable_by(n - 1, best_first);
    }
}

pub(super) fn weight_sum(candidates: &[(u32, f32)]) -> f64 {
    candidates.iter().map(|&(_, w)| f64::from(w)).sum()
}

fn best_first(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::test_support::{chi_square, histogram, random, tenths, CHI_SQUARE_3DF};
    use crate::sampler::{sample, SequenceRng};

    #[test]
    fn top_k_one_equals_greedy_and_top_k_two_keeps_the_two_best() {
        let logits = tenths();
        let top1 = random(SamplingParams {
            top_k: 1,
            ..Default::default()
        });
        for seed in 0..20 {
            let token =
                sample(&logits, &top1, &[], &[], &mut SequenceRng::new(Some(seed))).token_id;
            assert_eq!(token, 3);
        }
        let top2 = random(SamplingParams {
            top_k: 2,
            ..Default::default()
        });
        let counts = histogram(&logits, &top2, 20_000);
        assert!(
            chi_square(&counts, &[0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]) < CHI_SQUARE_3DF,
            "{counts:?}"
        );
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_the_mass() {
        let logits = tenths();
        let tiny = random(SamplingParams {
            top_p: 1e-6,
            ..Default::default()
        });
        assert_eq!(histogram(&logits, &tiny, 200), [0, 0, 0, 200]);
        // 0.4 < 0.5, 0.4 + 0.3 >= 0.5: tokens 3 and 2 remain, renormalised to 4/7 and 3/7.
        let half = random(SamplingParams {
            top_p: 0.5,
            ..Default::default()
        });
        let counts = histogram(&logits, &half, 20_000);
        assert!(
            chi_square(&counts, &[0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]) < CHI_SQUARE_3DF,
            "{counts:?}"
        );
    }

    #[test]
    fn top_p_over_equal_weights_keeps_the_lowest_ids() {
        // 1000 equal tokens: top_p 0.2995 keeps the 300 lowest ids (ties go to the lower id).
        let logits = vec![0.5f32; 1000];
        let params = random(SamplingParams {
            top_p: 0.2995,
            ..Default::default()
        });
        let counts = histogram(&logits, &params, 6000);
        assert!(counts[300..].iter().all(|&c| c == 0));
        assert!(counts[..300].iter().filter(|&&c| c > 0).count() > 280);
    }

    #[test]
    fn nucleus_keeps_the_same_set_as_a_full_sort() {
        let mut rng = SequenceRng::new(Some(9));
        for (len, top_p) in [
            (10, 0.5),
            (1000, 0.9),
            (5000, 0.3),
            (5000, 0.999),
            (300, 1e-6),
            (151_936, 0.95),
        ] {
            let weights: Vec<(u32, f32)> = (0..len)
                .map(|id| (id, (rng.next_f64() * 8.0 - 8.0).exp() as f32))
                .collect();
            let mut expected = weights.clone();
            expected.sort_by(best_first);
            let target = f64::from(top_p) * weight_sum(&weights);
            let mut mass = 0.0;
            let n = expected
                .iter()
                .take_while(|&&(_, w)| {
                    let keep = mass < target;
                    mass += f64::from(w);
                    keep
                })
                .count();
            let mut got = weights;
            keep_nucleus(&mut got, top_p);
            got.sort_by(best_first);
            assert_eq!(got, expected[..n], "len {len}, top_p {top_p}");
        }
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_best() {
        // Threshold 0.6 * 0.4 = 0.24: tokens 2 (0.3) and 3 (0.4) remain.
        let params = random(SamplingParams {
            min_p: 0.6,
            ..Default::default()
        });
        let counts = histogram(&tenths(), &params, 20_000);
        assert!(
            chi_square(&counts, &[0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]) < CHI_SQUARE_3DF,
            "{counts:?}"
        );
    }

    #[test]
    fn temperature_sharpens_or_flattens_the_distribution() {
        // Temperature 0.5 squares the probabilities: [1, 4, 9, 16] / 30.
        let cold = SamplingParams {
            temperature: 0.5,
            ..Default::default()
        };
        let counts = histogram(&tenths(), &cold, 30_000);
        let probs = [1.0 / 30.0, 4.0 / 30.0, 9.0 / 30.0, 16.0 / 30.0];
        assert!(chi_square(&counts, &probs) < CHI_SQUARE_3DF, "{counts:?}");
        // Temperature 2 takes square roots: sqrt([1, 2, 3, 4]) normalised.
        let hot = SamplingParams {
            temperature: 2.0,
            ..Default::default()
        };
        let counts = histogram(&tenths(), &hot, 30_000);
        let roots: Vec<f64> = (1..=4).map(|i| f64::from(i).sqrt()).collect();
        let sum: f64 = roots.iter().sum();
        let probs: Vec<f64> = roots.iter().map(|r| r / sum).collect();
        assert!(chi_square(&counts, &probs) < CHI_SQUARE_3DF, "{counts:?}");
    }
}
