//! Per-request sampling parameters, validated once at the edge.

use crate::constraint::Constraint;
use crate::error::{EmberError, Result};

/// How the next token of a request is chosen, and what is reported about it.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables it.
    pub top_k: usize,
    /// Drop tokens whose probability is below `min_p` times the top token's; 0 disables it.
    pub min_p: f32,
    /// Multiplicative penalty (>1 discourages) on tokens seen in the prompt or output; 1 disables it.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of tokens already generated.
    pub frequency_penalty: f32,
    /// Added to the logits of given token ids before sampling.
    pub logit_bias: Vec<(u32, f32)>,
    /// Seed for this request's random stream; `None` draws one.
    pub seed: Option<u64>,
    /// Maximum number of tokens to generate.
    pub max_tokens: usize,
    /// Generate at least this many tokens before honouring eos or stop ids.
    pub min_tokens: usize,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Extra token ids that end the request (besides the model's eos).
    pub stop_token_ids: Vec<u32>,
    /// Return the sampled token's logprob with this many top alternatives (`Some(0)`: only the token).
    pub logprobs: Option<usize>,
    /// Return logprobs of the prompt's tokens with this many top alternatives.
    pub prompt_logprobs: Option<usize>,
    /// A grammar or JSON schema the output must follow (structured output, forced tool calls).
    pub constraint: Option<Constraint>,
    /// Return the prompt's embedding (its last token's final hidden state) instead of generating;
    /// needs a model loaded for the embed task and `max_tokens` 0.
    pub embed: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            max_tokens: 16,
            min_tokens: 0,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            logprobs: None,
            prompt_logprobs: None,
            constraint: None,
            embed: false,
        }
    }
}

/// Most alternatives a caller may ask for per position.
pub const MAX_TOP_LOGPROBS: usize = 20;

fn check_range(name: &str, value: f32, lo: f32, hi: f32) -> Result<()> {
    if !value.is_finite() || value < lo || value > hi {
        return Err(EmberError::InvalidRequest(format!(
            "Invalid '{name}': expected a value between {lo} and {hi}, got {value}"
        )));
    }
    Ok(())
}

impl SamplingParams {
    /// Greedy decoding of `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            max_tokens,
            ..Self::default()
        }
    }

    /// An embedding request: the prompt is run once and nothing is generated.
    pub fn embedding() -> Self {
        Self {
            max_tokens: 0,
            embed: true,
            ..Self::default()
        }
    }

    /// Whether sampling reduces to argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 1e-5 || self.top_k == 1
    }

    /// Checks every field against its allowed range; the error names the parameter.
    pub fn validate(&self) -> Result<()> {
        if self.embed && self.max_tokens > 0 {
            return Err(EmberError::InvalidRequest(
                "an embedding request generates nothing; its max_tokens must be 0".into(),
            ));
        }
        check_range("temperature", self.temperature, 0.0, 2.0)?;
        check_range("top_p", self.top_p, 0.0, 1.0)?;
        if self.top_p == 0.0 {
            return Err(EmberError::InvalidRequest(
                "Invalid 'top_p': must be greater than 0".into(),
            ));
        }
        check_range("min_p", self.min_p, 0.0, 1.0)?;
        check_range("repetition_penalty", self.repetition_penalty, 0.0, 2.0)?;
        if self.repetition_penalty == 0.0 {
            return Err(EmberError::InvalidRequest(
                "Invalid 'repetition_penalty': must be greater than 0".into(),
            ));
        }
        check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        for (id, bias) in &self.logit_bias {
            if !bias.is_finite() || !(-100.0..=100.0).contains(bias) {
                return Err(EmberError::InvalidRequest(format!(
                    "Invalid 'logit_bias': bias for token {id} must be between -100 and 100, got {bias}"
                )));
            }
        }
        for (name, value) in [
            ("logprobs", self.logprobs),
            ("top_logprobs", self.prompt_logprobs),
        ] {
            if value.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
                return Err(EmberError::InvalidRequest(format!(
                    "Invalid '{name}': at most {MAX_TOP_LOGPROBS} alternatives may be requested"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_not_greedy() {
        let p = SamplingParams::default();
        p.validate().unwrap();
        assert!(!p.is_greedy());
        assert!(SamplingParams::greedy(4).is_greedy());
        SamplingParams::embedding().validate().unwrap();
        let generating_embedding = SamplingParams {
            max_tokens: 1,
            ..SamplingParams::embedding()
        };
        assert!(generating_embedding.validate().is_err());
    }

    #[test]
    fn out_of_range_values_name_the_parameter() {
        let p = SamplingParams {
            temperature: 3.0,
            ..Default::default()
        };
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("'temperature'"));
        let p = SamplingParams {
            top_p: f32::NAN,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("'top_p'"));
        let p = SamplingParams {
            logit_bias: vec![(3, 101.0)],
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("logit_bias"));
    }
}
