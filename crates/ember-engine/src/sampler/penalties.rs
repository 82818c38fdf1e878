//! Logit bias and the repetition, frequency and presence penalties, applied before any choice.

use std::collections::HashMap;

use ember_core::SamplingParams;

/// Whether `params` changes logits before choosing: a bias or a penalty.
pub(super) fn modifies_logits(params: &SamplingParams) -> bool {
    !params.logit_bias.is_empty()
        || params.repetition_penalty != 1.0
        || params.presence_penalty != 0.0
        || params.frequency_penalty != 0.0
}

/// Applies `logit_bias`, then the repetition penalty (prompt and output tokens), then the
/// frequency and presence penalties (output tokens only). `candidates[i]` must be token `i`;
/// ids outside the vocab are ignored.
pub(super) fn apply_bias_and_penalties(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::test_support::{histogram, random, sample_one, tenths};
    use crate::sampler::{sample, SequenceRng};

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
}
