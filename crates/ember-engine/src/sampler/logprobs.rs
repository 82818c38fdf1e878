//! What a request learns about the token it got: its logprob under the raw logits and the most
//! likely alternatives (vLLM's default: logprobs of the unmodified logits).

use ember_core::{SamplingParams, TokenLogprob};

/// The chosen token and, when the request asked for logprobs, its place in the raw distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The chosen token.
    pub token_id: u32,
    /// Its logprob and top alternatives under `log_softmax` of the raw logits, if asked for.
    pub logprob: Option<TokenLogprob>,
}

/// `token_id` as sampled from `logits`, with its logprobs when `params` asks for them.
pub fn with_logprobs(logits: &[f32], token_id: u32, params: &SamplingParams) -> Sampled {
    let logprob = params
        .logprobs
        .map(|k| log_softmax_top(logits, token_id, k));
    Sampled { token_id, logprob }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::test_support::tenths;
    use crate::sampler::{sample, SequenceRng};

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
}
