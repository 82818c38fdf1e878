//! Chooses one sequence's next token from the logits of one position, on the CPU: logit bias,
//! penalties, then argmax, or temperature, top-k, top-p, min-p and a draw from the request's
//! own random stream (vLLM's order; transformers' for the filters).

use std::cmp::Ordering;
use std::collections::HashMap;

use ember_core::{SamplingParams, TokenLogprob, TokenMask};
use ember_kernels::sampling::{argmax, argmax_iter, finite_or_neg_inf};

/// A request's own random stream, so that seeded sampling repeats whatever else shares the batch.
///
/// xoshiro256** seeded through splitmix64, written out here because `rand` does not promise a
/// stable stream for `StdRng` across versions. A random step draws exactly one number from it.
#[derive(Debug, Clone)]
pub struct SequenceRng {
    state: [u64; 4],
}

impl SequenceRng {
    /// A stream seeded from `seed` (usually `params.seed`), or from OS entropy when `None`.
    pub fn new(seed: Option<u64>) -> Self {
        let mut seed = seed.unwrap_or_else(rand::random);
        Self {
            state: std::array::from_fn(|_| splitmix64(&mut seed)),
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform draw from [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The chosen token and, when the request asked for logprobs, its place in the raw distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The chosen token.
    pub token_id: u32,
    /// Its logprob and top alternatives under `log_softmax` of the raw logits, if asked for.
    pub logprob: Option<TokenLogprob>,
}

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
    sample_masked(logits, None, params, prompt_tokens, output_tokens, rng)
}

/// Like [`sample`], choosing only among the tokens `mask` allows (a grammar's next tokens).
/// Logprobs are still those of the raw logits, so they show what the grammar overruled.
pub fn sample_masked(
    logits: &[f32],
    mask: Option<&TokenMask>,
    params: &SamplingParams,
    prompt_tokens: &[u32],
    output_tokens: &[u32],
    rng: &mut SequenceRng,
) -> Sampled {
    let token_id = choose_masked(logits, mask, params, prompt_tokens, output_tokens, rng);
    with_logprobs(logits, token_id, params)
}

/// The token [`sample_masked`] chooses, without its logprobs.
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

/// `token_id` as sampled from `logits`, with its logprobs when `params` asks for them.
pub fn with_logprobs(logits: &[f32], token_id: u32, params: &SamplingParams) -> Sampled {
    let logprob = params
        .logprobs
        .map(|k| log_softmax_top(logits, token_id, k));
    Sampled { token_id, logprob }
}

/// Whether masking only conditions `params`' distribution on the allowed set A, so that drawing
/// unmasked and keeping the draw when A holds it (drawing again under the mask when not) is
/// exactly [`sample_masked`]: P(x) = p(x) + (1 - p(A)) p(x) / p(A) = p(x) / p(A).
///
/// Greedy: an allowed argmax is the argmax over A (ties too: both take the lowest id). Bias,
/// penalties and temperature change each token's weight from its own logit alone, so they keep
/// this. Top-k, top-p and min-p pick their candidates against the whole vocabulary, a different
/// set once A is masked, so under them the first draw proves nothing.
pub fn masking_is_conditioning(params: &SamplingParams) -> bool {
    params.is_greedy() || (params.top_k == 0 && params.top_p >= 1.0 && params.min_p <= 0.0)
}

/// The log-probability of `token` under `log_softmax(logits)` and the `k` most likely tokens,
/// best first, ties to the lower id (ember-kernels' definition, which the device computes too).
/// Also serves prompt logprobs.
pub fn log_softmax_top(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let (logprob, top) = ember_kernels::sampling::log_softmax_top(logits, token, k);
    TokenLogprob {
        token_id: token,
        logprob,
        top,
    }
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

/// `(token id, logit)` for every token: the one working buffer of a draw.
fn candidates(logits: &[f32]) -> Vec<(u32, f32)> {
    logits
        .iter()
        .enumerate()
        .map(|(id, &logit)| (id as u32, logit))
        .collect()
}

/// Temperature, then (without top-k) weights relative to the best; drops tokens at -inf.
fn scale_and_exp(candidates: &mut Vec<(u32, f32)>, params: &SamplingParams) {
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

/// Whether `params` changes logits before choosing: a bias or a penalty.
fn modifies_logits(params: &SamplingParams) -> bool {
    !params.logit_bias.is_empty()
        || params.repetition_penalty != 1.0
        || params.presence_penalty != 0.0
        || params.frequency_penalty != 0.0
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

/// Applies `logit_bias`, then the repetition penalty (prompt and output tokens), then the
/// frequency and presence penalties (output tokens only). `candidates[i]` must be token `i`;
/// ids outside the vocab are ignored.
fn apply_bias_and_penalties(
    candidates: &mut [(u32, f32)],
    params: &SamplingParams,
    prompt_tokens: &[u32],
    output_tokens: &[u32],
) {
    for &(id, bias) in &params.logit_bias {
        if let Some((_, logit)) = candidates.get_mut(id as usize) {
            *logit += bias;
        }
    }
    let penalty = params.repetition_penalty;
    if penalty != 1.0 {
        // A bitset rather than a hash set: long prompts are scanned on every step.
        let mut seen = vec![0u64; candidates.len().div_ceil(64)];
        for &id in prompt_tokens.iter().chain(output_tokens) {
            let Some((_, logit)) = candidates.get_mut(id as usize) else {
                continue;
            };
            let (word, bit) = (id as usize / 64, 1u64 << (id % 64));
            if seen[word] & bit == 0 {
                seen[word] |= bit;
                *logit = if *logit > 0.0 {
                    *logit / penalty
                } else {
                    *logit * penalty
                };
            }
        }
    }
    if params.frequency_penalty != 0.0 || params.presence_penalty != 0.0 {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &id in output_tokens {
            *counts.entry(id).or_default() += 1;
        }
        for (id, count) in counts {
            if let Some((_, logit)) = candidates.get_mut(id as usize) {
                *logit -= params.frequency_penalty * count as f32;
                *logit -= params.presence_penalty;
            }
        }
    }
}

/// Temperature, top-k, top-p, min-p, then one draw from what is left.
///
/// Selection reorders candidates deterministically, so a seed repeats its tokens.
fn draw_filtered(
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
fn draw(candidates: &[(u32, f32)], uniform: f64) -> u32 {
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

fn weight_sum(candidates: &[(u32, f32)]) -> f64 {
    candidates.iter().map(|&(_, w)| f64::from(w)).sum()
}

fn best_first(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits whose softmax is exactly [0.1, 0.2, 0.3, 0.4].
    fn tenths() -> Vec<f32> {
        [1.0f32, 2.0, 3.0, 4.0].iter().map(|x| x.ln()).collect()
    }

    fn random(params: SamplingParams) -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            ..params
        }
    }

    fn sample_one(logits: &[f32], params: &SamplingParams) -> u32 {
        sample(logits, params, &[], &[], &mut SequenceRng::new(Some(0))).token_id
    }

    /// How often each token is drawn in `n` seeded draws.
    fn histogram(logits: &[f32], params: &SamplingParams, n: usize) -> Vec<usize> {
        let mut rng = SequenceRng::new(Some(7));
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[sample(logits, params, &[], &[], &mut rng).token_id as usize] += 1;
        }
        counts
    }

    /// Pearson's chi-square of observed counts against expected probabilities.
    fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
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
    const CHI_SQUARE_3DF: f64 = 16.27;

    fn adjusted(
        logits: &[f32],
        params: &SamplingParams,
        prompt: &[u32],
        output: &[u32],
    ) -> Vec<f32> {
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        apply_bias_and_penalties(&mut candidates, params, prompt, output);
        candidates.into_iter().map(|(_, l)| l).collect()
    }

    #[test]
    fn rng_stream_is_xoshiro256_starstar_seeded_by_splitmix64() {
        let mut state = 0;
        assert_eq!(splitmix64(&mut state), 0xe220_a839_7b1d_cdaf);
        let mut rng = SequenceRng::new(Some(0));
        let first: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(
            first,
            [
                0x99ec_5f36_cb75_f2b4,
                0xbf6e_1f78_4956_452a,
                0x1a5f_849d_4933_e6e0
            ]
        );
        let mut rng = SequenceRng::new(Some(42));
        assert_eq!(rng.next_u64(), 0x1578_0b2e_0c2e_c716);
        assert!((0..1000)
            .map(|_| rng.next_f64())
            .all(|u| (0.0..1.0).contains(&u)));
    }

    #[test]
    fn greedy_picks_the_argmax_and_the_lowest_id_on_ties() {
        let greedy = SamplingParams::greedy(1);
        assert_eq!(sample_one(&[0.1, 2.0, -3.0, 1.9], &greedy), 1);
        assert_eq!(sample_one(&[1.0, 5.0, 5.0, 5.0], &greedy), 1);
        assert_eq!(sample_one(&[f32::NAN, -1.0, -0.5], &greedy), 2);
    }

    #[test]
    fn logprobs_are_the_raw_log_softmax_with_best_first_alternatives() {
        let params = SamplingParams {
            logprobs: Some(2),
            logit_bias: vec![(0, 100.0)],
            ..SamplingParams::greedy(1)
        };
        let sampled = sample(&tenths(), &params, &[], &[], &mut SequenceRng::new(Some(1)));
        assert_eq!(sampled.token_id, 0, "the bias forces token 0");
        let lp = sampled.logprob.unwrap();
        assert_eq!(lp.token_id, 0);
        assert!(
            (lp.logprob - 0.1f32.ln()).abs() < 1e-6,
            "raw, not biased: {}",
            lp.logprob
        );
        assert_eq!(lp.top.len(), 2);
        assert_eq!((lp.top[0].0, lp.top[1].0), (3, 2));
        assert!((lp.top[0].1 - 0.4f32.ln()).abs() < 1e-6);
        assert!((lp.top[1].1 - 0.3f32.ln()).abs() < 1e-6);

        // log_softmax([1, 2, 3]) by hand: 1 - ln(e + e^2 + e^3) = -2.407606.
        let lp = log_softmax_top(&[1.0, 2.0, 3.0], 0, 0);
        assert!((lp.logprob - -2.407_606).abs() < 1e-6, "{}", lp.logprob);
        assert!(lp.top.is_empty());
        // Large logits do not overflow; ties list the lower id first; k past the vocab is clamped.
        let lp = log_softmax_top(&[1000.0, 1000.0, 999.0], 1, 5);
        assert!((lp.logprob - -0.861_994_8).abs() < 1e-5, "{}", lp.logprob);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn logprobs_of_a_large_vocab_match_an_f64_log_softmax() {
        let mut rng = SequenceRng::new(Some(4));
        let logits: Vec<f32> = (0..151_936)
            .map(|_| (rng.next_f64() * 60.0 - 30.0) as f32)
            .collect();
        let max = logits
            .iter()
            .fold(f64::NEG_INFINITY, |m, &l| m.max(f64::from(l)));
        let sum: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
        let exact = |id: usize| f64::from(logits[id]) - max - sum.ln();
        let lp = log_softmax_top(&logits, 12_345, 3);
        assert!((f64::from(lp.logprob) - exact(12_345)).abs() < 1e-5);
        for &(id, logprob) in &lp.top {
            assert!((f64::from(logprob) - exact(id as usize)).abs() < 1e-5);
        }
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
    fn repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        // Tokens 0 and 3 are in the prompt, 1 twice in the output (penalised once), 2 unseen.
        let logits = [3.0, -1.5, 1.0, 0.0];
        assert_eq!(
            adjusted(&logits, &params, &[0, 3], &[1, 1]),
            [1.5, -3.0, 1.0, 0.0]
        );
        let greedy = SamplingParams {
            temperature: 0.0,
            ..params
        };
        let pick = |logits: &[f32], prompt: &[u32]| {
            sample(logits, &greedy, prompt, &[], &mut SequenceRng::new(Some(0))).token_id
        };
        assert_eq!(pick(&[2.0, 1.5], &[0]), 1, "2 / 2 = 1 < 1.5");
        assert_eq!(pick(&[-1.0, -1.5], &[0]), 1, "-1 * 2 = -2 < -1.5");
    }

    #[test]
    fn frequency_and_presence_penalties_count_only_output_tokens() {
        let params = SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 1.0,
            ..Default::default()
        };
        // Token 2 generated twice: 2 * 0.5 + 1; token 1 once: 0.5 + 1; token 0 only in the prompt.
        let got = adjusted(&[1.0, 1.0, 1.0, 1.0], &params, &[0, 0], &[2, 1, 2]);
        assert_eq!(got, [1.0, -0.5, -1.0, 1.0]);
        let negative = SamplingParams {
            presence_penalty: -1.0,
            ..Default::default()
        };
        assert_eq!(adjusted(&[0.0, 0.0], &negative, &[], &[1]), [0.0, 1.0]);
    }

    #[test]
    fn logit_bias_forces_or_bans_a_token_and_out_of_vocab_ids_are_ignored() {
        let force = random(SamplingParams {
            logit_bias: vec![(0, 100.0), (99, 5.0)],
            ..Default::default()
        });
        assert_eq!(histogram(&tenths(), &force, 500), [500, 0, 0, 0]);
        let ban = SamplingParams {
            logit_bias: vec![(3, -100.0)],
            ..SamplingParams::greedy(1)
        };
        assert_eq!(sample_one(&tenths(), &ban), 2);
        let penalty = SamplingParams {
            repetition_penalty: 1.5,
            frequency_penalty: 1.0,
            ..ban
        };
        assert_eq!(adjusted(&[1.0], &penalty, &[7], &[9]), [1.0]);
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
