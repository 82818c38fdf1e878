//! A request inside the engine: its tokens, its blocks, its progress.

use std::sync::Arc;

use ember_core::{
    EngineRequest, FinishReason, RequestOutput, SamplingParams, TokenConstraint, TokenLogprob,
};
use ember_models::LoraAdapter;
use tokio::sync::mpsc::UnboundedSender;

use crate::sampler::SequenceRng;

/// One request as the scheduler and runner see it.
pub struct Sequence {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub output: Vec<u32>,
    pub params: SamplingParams,
    pub eos_token_ids: Vec<u32>,
    /// Tokens whose K/V are in the cache.
    pub num_computed: usize,
    /// Blocks of its rank's KV cache (rank `dp_rank`'s).
    pub block_table: Vec<u32>,
    /// Under `--data-parallel-size`, the rank whose KV cache holds it (chosen at admission);
    /// 0 otherwise.
    pub dp_rank: usize,
    /// Prefix-cache hashes of the full blocks of `block_table`, in order.
    pub block_hashes: Vec<u64>,
    /// Prompt tokens whose KV came from the prefix cache at admission.
    pub num_cached_tokens: usize,
    pub rng: SequenceRng,
    /// Prompt logprobs gathered so far (first entry `None`), when requested.
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    /// The LoRA adapter it runs with; held until it finishes, even if the adapter is unloaded.
    pub adapter: Option<Arc<LoraAdapter>>,
    /// The live grammar of a constrained request (`params.constraint` started for this sequence).
    pub constraint: Option<Box<dyn TokenConstraint>>,
    /// Whether its grammar refused its last first draw: the next mask is then likely needed,
    /// so the step computes it during the forward.
    pub last_draw_refused: bool,
    sender: UnboundedSender<RequestOutput>,
}

impl Sequence {
    /// Takes over a request from the HTTP side.
    pub fn new(request: EngineRequest) -> Self {
        Self::with_adapter(request, None)
    }

    /// Takes over a request that runs with `adapter`.
    pub fn with_adapter(request: EngineRequest, adapter: Option<Arc<LoraAdapter>>) -> Self {
        let rng = SequenceRng::new(request.params.seed);
        let prompt_logprobs = request.params.prompt_logprobs.map(|_| vec![None]);
        let constraint = request.params.constraint.as_ref().map(|c| c.0.start());
        Self {
            id: request.id,
            prompt: request.prompt_token_ids,
            output: Vec::new(),
            params: request.params,
            eos_token_ids: request.eos_token_ids,
            num_computed: 0,
            block_table: Vec::new(),
            dp_rank: 0,
            block_hashes: Vec::new(),
            num_cached_tokens: 0,
            rng,
            prompt_logprobs,
            adapter,
            constraint,
            last_draw_refused: false,
            sender: request.output,
        }
    }

    /// The adapter's id in prefix-cache keys (0 for the base model).
    pub fn adapter_id(&self) -> u64 {
        self.adapter.as_ref().map_or(0, |a| a.id())
    }

    /// Prompt and generated tokens.
    pub fn len(&self) -> usize {
        self.prompt.len() + self.output.len()
    }

    /// Never true: a sequence always has a prompt (checked at submission).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The token at position `pos` of prompt + output.
    pub fn token(&self, pos: usize) -> u32 {
        if pos < self.prompt.len() {
            self.prompt[pos]
        } else {
            self.output[pos - self.prompt.len()]
        }
    }

    /// Prompt and output tokens `[start, end)`.
    pub fn tokens(&self, start: usize, end: usize) -> Vec<u32> {
        (start..end).map(|p| self.token(p)).collect()
    }

    /// Whether the prefix cache may serve this sequence: prompt logprobs need every prompt
    /// token's logits, so such requests compute their whole prompt.
    pub fn may_use_prefix_cache(&self) -> bool {
        self.prompt_logprobs.is_none()
    }

    /// Whether the client stopped listening.
    pub fn is_abandoned(&self) -> bool {
        self.sender.is_closed()
    }

    /// Until `min_tokens` are out, the parameters for the next token with the tokens that would
    /// end the request banned (their logprobs are still reported from the raw logits); `None`
    /// once `params` apply as they are.
    pub fn params_banning_stops(&self) -> Option<SamplingParams> {
        if self.output.len() >= self.params.min_tokens {
            return None;
        }
        let mut params = self.params.clone();
        let eos = if self.params.ignore_eos {
            &[][..]
        } else {
            &self.eos_token_ids[..]
        };
        for &id in eos.iter().chain(&self.params.stop_token_ids) {
            params.logit_bias.push((id, f32::NEG_INFINITY));
        }
        Some(params)
    }

    /// Whether a step of `n` of this sequence's tokens can run on device-side greedy sampling:
    /// what it takes from the step is at most one token, its logits' plain argmax, and its raw
    /// logprobs (see [`crate::sampler::is_plain_greedy`]); a step that does not sample must not
    /// want the rows either (prompt logprobs, an embedding).
    pub fn takes_only_the_argmax(&self, n: usize) -> bool {
        if self.params.embed || self.prompt_logprobs.is_some() {
            return false;
        }
        !self.samples_after(n)
            || (crate::sampler::is_plain_greedy(&self.params)
                && self.constraint.is_none()
                && self.output.len() >= self.params.min_tokens)
    }

    /// Whether this step's chunk of `n` tokens needs nothing of its logits that a device draw
    /// cannot give: no sampling, or a draw under temperature, top-k, top-p and min-p alone, with
    /// its raw logprobs if asked (no bias, penalty, grammar or banned stop).
    pub fn takes_only_a_device_draw(&self, n: usize) -> bool {
        if self.params.embed || self.prompt_logprobs.is_some() {
            return false;
        }
        !self.samples_after(n)
            || (crate::sampler::is_plain_draw(&self.params)
                && self.constraint.is_none()
                && self.output.len() >= self.params.min_tokens)
    }

    /// This step's device draw for a chunk of `n` tokens (see [`Sequence::takes_only_a_device_draw`]):
    /// greedy when it does not sample or samples greedily, else its settings and the next
    /// uniform of its own stream (one per random step, as the host sampler draws).
    pub fn device_draw(&mut self, n: usize) -> ember_kernels::sampling::DrawParams {
        let p = &self.params;
        let greedy = ember_kernels::sampling::DrawParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            uniform: 0.0,
        };
        if !self.samples_after(n) || p.is_greedy() {
            return greedy;
        }
        // The largest f32 below 1, so the draw stays in [0, 1).
        let below_one = f32::from_bits(0x3F7F_FFFF);
        ember_kernels::sampling::DrawParams {
            temperature: p.temperature,
            top_k: u32::try_from(p.top_k).unwrap_or(u32::MAX),
            top_p: p.top_p,
            min_p: p.min_p,
            uniform: (self.rng.next_f64() as f32).min(below_one),
        }
    }

    /// Whether this step's `n` tokens bring the sequence up to date, so it samples its next token.
    pub fn samples_after(&self, n: usize) -> bool {
        self.num_computed + n >= self.len() && self.params.max_tokens > 0
    }

    /// Decides whether the token just appended ends the request.
    pub fn check_finished(&self, max_model_len: usize) -> Option<FinishReason> {
        let last = *self.output.last()?;
        let generated = self.output.len();
        // A constraint that is complete admits nothing more (its eos was allowed, not forced).
        if self.constraint.as_ref().is_some_and(|c| c.is_finished()) {
            return Some(FinishReason::Stop);
        }
        // ignore_eos drops only the model's eos; explicit stop ids still end the request.
        let is_eos = !self.params.ignore_eos && self.eos_token_ids.contains(&last);
        if generated >= self.params.min_tokens
            && (is_eos || self.params.stop_token_ids.contains(&last))
        {
            return Some(FinishReason::Stop);
        }
        if generated >= self.params.max_tokens || self.len() >= max_model_len {
            return Some(FinishReason::Length);
        }
        None
    }

    /// Sends an output; a closed channel is noticed on the next step.
    pub fn send(&self, output: RequestOutput) {
        let _ = self.sender.send(output);
    }

    /// The counts every output carries.
    pub fn output_template(&self) -> RequestOutput {
        RequestOutput {
            request_id: self.id,
            prompt_tokens: self.prompt.len(),
            cached_prompt_tokens: self.num_cached_tokens,
            completion_tokens: self.output.len(),
            ..RequestOutput::default()
        }
    }
}
