//! Chooses one sequence's next token from the logits of one position, on the CPU: logit bias,
//! penalties, then argmax, or temperature, top-k, top-p, min-p and a draw from the request's
//! own random stream (vLLM's order; transformers' for the filters).

mod filters;
mod logprobs;
mod penalties;
mod rng;
#[cfg(test)]
mod test_support;

use ember_core::{SamplingParams, TokenMask};
use ember_kernels::sampling::{argmax, argmax_iter};

use filters::{candidates, draw, draw_filtered, scale_and_exp, weight_sum};
pub use logprobs::{log_softmax_top, with_logprobs, Sampled};
use penalties::{apply_bias_and_penalties, modifies_logits};
pub use rng::SequenceRng;

/// Chooses the next token from one position's vocab-sized `logits`.
///
/// Reported logprobs are those of the unmodified logits (vLLM's default); if every logit is
/// masked to -inf the result is token 0.
pub fn sample(
    logits: &[f32],
    params: &SamplingParams,
    prompt_tokens: &[u32],
    output_tokens: &[u32],
    rng: &mut SequenceRng,
) -> Sampled {
    let token_id = choose(logits, params, prompt_tokens, output_tokens, rng);
    with_logprobs(logits, token_id, params)
}

/// The token [`sample`] chooses, choosing only among the tokens `mask` allows (a grammar's next
/// tokens).
pub fn choose_masked(
    logits: &[f32],
    mask: Option<&TokenMask>,
    params: &SamplingParams,
    prompt_tokens: &[u32],
    output_tokens: &[u32],
    rng: &mut SequenceRng,
) -> u32 {
    let Some(mask) = mask else {
        return choose(logits, params, prompt_tokens, output_tokens, rng);
    };
    let allowed: Vec<f32> = logits
        .iter()
        .enumerate()
        .map(|(id, &logit)| {
            if mask.allows(id as u32) {
                logit
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    choose(&allowed, params, prompt_tokens, output_tokens, rng)
}

/// Whether masking only conditions `params`' distribution on the allowed set A, so that drawing
/// unmasked and keeping the draw when A holds it (drawing again under the mask when not) is
/// exactly [`choose_masked`]: P(x) = p(x) + (1 - p(A)) p(x) / p(A) = p(x) / p(A).
///
/// Greedy: an allowed argmax is the argmax over A (ties too: both take the lowest id). Bias,
/// penalties and temperature change each token's weight from its own logit alone, so they keep
/// this. Top-k, top-p and min-p pick their candidates against the whole vocabulary, a different
/// set once A is masked, so under them the first draw proves nothing.
pub fn masking_is_conditioning(params: &SamplingParams) -> bool {
    params.is_greedy() || (params.top_k == 0 && params.top_p >= 1.0 && params.min_p <= 0.0)
}

/// A first, unmasked draw ([`choose_first`]) that can be drawn again under a mask
/// ([`choose_again`]) without recomputing its weights.
pub struct Choice {
    /// The token drawn.
    pub token: u32,
    /// Plain temperature sampling's weights (`exp` of the scaled logits, the best at 1.0), kept
    /// for the second draw; `None` where the second draw recomputes.
    weights: Option<Vec<(u32, f32)>>,
}

/// The allowed mass below which [`choose_again`] recomputes its weights instead of reusing the
/// first draw's: relative to the best token's weight of 1.0, tokens whose f32 weight underflows
/// would then matter.
const MIN_REUSED_MASS: f64 = 1e-12;

/// [`choose_masked`] without a mask, keeping what a second draw under a mask can reuse.
pub fn choose_first(
    logits: &[f32],
    params: &SamplingParams,
    prompt_tokens: &[u32],
    output_tokens: &[u32],
    rng: &mut SequenceRng,
) -> Choice {
    if params.is_greedy() || !masking_is_conditioning(params) {
        let token = choose(logits, params, prompt_tokens, output_tokens, rng);
        return Choice {
            token,
            weights: None,
        };
    }
    let weights = weights(logits, params, prompt_tokens, output_tokens);
    let token = draw(&weights, rng.next_f64());
    Choice {
        token,
        weights: Some(weights),
    }
}

/// The token [`choose_masked`] with `mask` chooses after `first` (from [`choose_first`] on the
/// same inputs) was refused: under [`masking_is_conditioning`] the first draw's weights restricted
/// to the allowed tokens are the masked distribution, scaled, so only the draw is repeated. It
/// takes one number from `rng`, as [`choose_masked`] does.
pub fn choose_again(
    first: Choice,
    mask: &TokenMask,
    logits: &[f32],
    params: &SamplingParams,
    prompt_tokens: &[u32],
    output_tokens: &[u32],
    rng: &mut SequenceRng,
) -> u32 {
    if let Some(mut weights) = first.weights {
        weights.retain(|&(id, _)| mask.allows(id));
        if weight_sum(&weights) >= MIN_REUSED_MASS {
            return draw(&weights, rng.next_f64());
        }
    }
    choose_masked(
        logits,
        Some(mask),
        params,
        prompt_tokens,
        output_tokens,
        rng,
    )
}

/// Plain temperature sampling's weights: bias and penalties, temperature, `exp` relative to
/// the best (finite candidates only).
fn weights(
    logits: &[f32],
    params: &SamplingParams,
    prompt_tokens: &[u32],
    output_tokens: &[u32],
) -> Vec<(u32, f32)> {
    let mut candidates = candidates(logits);
    apply_bias_and_penalties(&mut candidates, params, prompt_tokens, output_tokens);
    scale_and_exp(&mut candidates, params);
    candidates
}

fn choose(
    logits: &[f32],
    params: &SamplingParams,
    prompt_tokens: &[u32],
    output_tokens: &[u32],
    rng: &mut SequenceRng,
) -> u32 {
    if params.is_greedy() && !modifies_logits(params) {
        return argmax(logits);
    }
    let mut candidates = candidates(logits);
    apply_bias_and_penalties(&mut candidates, params, prompt_tokens, output_tokens);
    if params.is_greedy() {
        return argmax_iter(candidates.iter().map(|&(_, logit)| logit));
    }
    draw_filtered(candidates, params, rng)
}

/// Whether `params` draws from the raw logits under temperature, top-k, top-p and min-p alone
/// (or greedily), with at most the raw logprobs: no bias or penalty. Such a token, and its
/// logprobs, can be drawn where the logits are ([`ember_models::sampling::sampled_token_ids`],
/// [`ember_models::sampling::token_logprobs`]).
pub fn is_plain_draw(params: &SamplingParams) -> bool {
    !modifies_logits(params)
}

/// Whether `params` picks the raw logits' argmax, with at most the raw logprobs: greedy, no bias
/// or penalty. Such a token can be chosen where the logits are
/// ([`ember_models::sampling::greedy_token_ids`], the same argmax as here).
pub fn is_plain_greedy(params: &SamplingParams) -> bool {
    params.is_greedy() && !modifies_logits(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_support::{chi_square, histogram, random, sample_one, tenths, CHI_SQUARE_3DF};

    #[test]
    fn greedy_picks_the_argmax_and_the_lowest_id_on_ties() {
        let greedy = SamplingParams::greedy(1);
        assert_eq!(sample_one(&[0.1, 2.0, -3.0, 1.9], &greedy), 1);
        assert_eq!(sample_one(&[1.0, 5.0, 5.0, 5.0], &greedy), 1);
        assert_eq!(sample_one(&[f32::NAN, -1.0, -0.5], &greedy), 2);
    }

    /// Draw first, and under `mask` again when refused: the loop the constrained path runs.
    fn first_then_again(
        logits: &[f32],
        mask: &TokenMask,
        params: &SamplingParams,
        rng: &mut SequenceRng,
    ) -> u32 {
        let first = choose_first(logits, params, &[], &[], rng);
        if mask.allows(first.token) {
            first.token
        } else {
            choose_again(first, mask, logits, params, &[], &[], rng)
        }
    }

    #[test]
    fn a_second_draw_reusing_the_first_draws_weights_is_the_masked_distribution() {
        // Tokens 1 and 3 allowed: 0.2 and 0.4 renormalised to 1/3 and 2/3, at temperature 1
        // and, squared, at 0.5 (4/20, 16/20); a penalty on token 3 moves weight to token 1.
        let mask = TokenMask::allowing(4, [1, 3]);
        let cases = [
            (
                random(SamplingParams::default()),
                [0.0, 1.0 / 3.0, 0.0, 2.0 / 3.0],
            ),
            (
                SamplingParams {
                    temperature: 0.5,
                    ..Default::default()
                },
                [0.0, 0.2, 0.0, 0.8],
            ),
            (
                random(SamplingParams {
                    logit_bias: vec![(3, -(2.0f32.ln()))],
                    ..Default::default()
                }),
                [0.0, 0.5, 0.0, 0.5],
            ),
        ];
        for (params, probs) in cases {
            let mut rng = SequenceRng::new(Some(3));
            let mut counts = vec![0; 4];
            for _ in 0..20_000 {
                counts[first_then_again(&tenths(), &mask, &params, &mut rng) as usize] += 1;
            }
            assert!(
                chi_square(&counts, &probs) < CHI_SQUARE_3DF,
                "{counts:?} vs {probs:?}"
            );
        }
    }

    #[test]
    fn a_second_draw_whose_allowed_weights_underflow_recomputes_them() {
        // The allowed tokens sit 200 below the best: exp(-200) is 0 in f32, so the first draw's
        // weights say nothing about them; the draw recomputes and keeps their 1 : 2 ratio.
        let logits = [0.0, -200.0, 50.0, -200.0 + 2.0f32.ln()];
        let mask = TokenMask::allowing(4, [1, 3]);
        let params = random(SamplingParams::default());
        let mut rng = SequenceRng::new(Some(5));
        let mut counts = vec![0; 4];
        for _ in 0..6000 {
            counts[first_then_again(&logits, &mask, &params, &mut rng) as usize] += 1;
        }
        assert!(
            chi_square(&counts, &[0.0, 1.0 / 3.0, 0.0, 2.0 / 3.0]) < CHI_SQUARE_3DF,
            "{counts:?}"
        );
    }

    #[test]
    fn a_seed_fixes_the_sequence_whatever_else_is_sampled() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams::default();
        let run = |seed: u64, interleave: bool| -> Vec<u32> {
            let mut rng = SequenceRng::new(Some(seed));
            let mut other = SequenceRng::new(None);
            (0..40)
                .map(|_| {
                    if interleave {
                        sample(&logits, &params, &[], &[], &mut other);
                    }
                    sample(&logits, &params, &[], &[], &mut rng).token_id
                })
                .collect()
        };
        assert_eq!(run(5, false), run(5, false));
        assert_eq!(
            run(5, false),
            run(5, true),
            "another request's draws must not interfere"
        );
        assert_ne!(run(5, false), run(6, false));
    }

    #[test]
    fn negative_infinite_logits_are_never_chosen_and_yield_no_nan() {
        let ninf = f32::NEG_INFINITY;
        let logits = [ninf, 0.0, ninf, 1.0, ninf];
        let params = random(SamplingParams {
            top_p: 0.9,
            min_p: 0.01,
            repetition_penalty: 1.2,
            presence_penalty: 0.5,
            logprobs: Some(5),
            ..Default::default()
        });
        let mut rng = SequenceRng::new(Some(3));
        for _ in 0..200 {
            let sampled = sample(&logits, &params, &[0, 1], &[2], &mut rng);
            assert!(matches!(sampled.token_id, 1 | 3), "{}", sampled.token_id);
            let lp = sampled.logprob.unwrap();
            assert!(lp.logprob.is_finite());
            assert_eq!(lp.top[0].0, 3);
            assert_eq!(lp.top[2].1, ninf);
            assert!(lp.top.iter().all(|t| !t.1.is_nan()));
        }
        // Every token masked: no panic, no NaN.
        let all_masked = [ninf; 3];
        let sampled = sample(&all_masked, &params, &[], &[], &mut rng);
        let lp = sampled.logprob.unwrap();
        assert!(lp.logprob == ninf && lp.top.iter().all(|t| t.1 == ninf));
        assert_eq!(sample_one(&all_masked, &SamplingParams::greedy(1)), 0);
        // +inf takes all the mass.
        let lp = log_softmax_top(&[1.0, f32::INFINITY], 1, 2);
        assert_eq!((lp.logprob, lp.top[0].0), (0.0, 1));
        assert!(lp.top[1].1 < -1e30);
        assert_eq!(histogram(&[1.0, f32::INFINITY], &params, 50), [0, 50]);
    }

    #[test]
    fn a_large_vocab_with_small_top_k_samples_within_the_top_k() {
        let vocab = 151_936;
        let logits: Vec<f32> = (0..vocab)
            .map(|i| ((i * 7919) % vocab) as f32 / vocab as f32 * 10.0)
            .collect();
        let params = random(SamplingParams {
            top_k: 5,
            top_p: 0.95,
            ..Default::default()
        });
        let mut best: Vec<u32> = (0..vocab as u32).collect();
        best.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let mut rng = SequenceRng::new(Some(11));
        for _ in 0..20 {
            let token = sample(&logits, &params, &[], &[], &mut rng).token_id;
            assert!(best[..5].contains(&token));
        }
    }
}
