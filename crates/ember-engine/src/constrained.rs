//! The engine's side of constrained decoding: the thread that computes grammar masks while the
//! forward runs, and the sampling of a constrained sequence's next token.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};

use ember_core::{SamplingParams, TokenConstraint, TokenMask};

use crate::sampler::{
    choose_again, choose_first, choose_masked, masking_is_conditioning, Choice, SequenceRng,
};

/// A next-token mask, or why the grammar could not give one (the request then fails).
pub(crate) type MaskResult = Result<TokenMask, String>;

/// The constraints of one step, each with its position in the step's chunks.
type Job = Vec<(usize, Box<dyn TokenConstraint>)>;

/// One constraint back from the worker with its mask; `None` if the worker lost it.
pub(crate) type Masked = (usize, Option<Box<dyn TokenConstraint>>, MaskResult);

/// A long-lived thread, owned by the engine, that computes the masks of a step's constrained
/// sequences while the engine thread runs the forward: a thread per step would cost ~60 µs.
/// The engine hands over the constraints with [`Self::begin`] and takes them back with their
/// masks from [`Self::finish`]; the thread ends when the engine drops this.
pub(crate) struct MaskWorker {
    jobs: Sender<Job>,
    done: Receiver<Vec<Masked>>,
    /// The positions in flight, so a lost batch still fails its requests.
    in_flight: Vec<usize>,
    /// A batch computed on the engine thread because the worker was gone.
    computed: Option<Vec<Masked>>,
}

impl MaskWorker {
    /// Starts the thread.
    pub fn start() -> std::io::Result<Self> {
        let (jobs, job_rx) = channel::<Job>();
        let (done_tx, done) = channel();
        std::thread::Builder::new()
            .name("ember-masks".into())
            .spawn(move || {
                for job in job_rx {
                    if done_tx.send(next_token_masks(job)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self {
            jobs,
            done,
            in_flight: Vec::new(),
            computed: None,
        })
    }

    /// Starts computing the masks of `constrained` (at most one batch at a time).
    pub fn begin(&mut self, constrained: Job) {
        self.in_flight = constrained.iter().map(|(k, _)| *k).collect();
        if constrained.is_empty() {
            return;
        }
        if let Err(returned) = self.jobs.send(constrained) {
            self.computed = Some(next_token_masks(returned.0));
        }
    }

    /// The batch of [`Self::begin`] with its masks, in order; waits for it.
    pub fn finish(&mut self) -> Vec<Masked> {
        let positions = std::mem::take(&mut self.in_flight);
        if let Some(computed) = self.computed.take() {
            return computed;
        }
        if positions.is_empty() {
            return Vec::new();
        }
        self.done.recv().unwrap_or_else(|_| {
            let lost = || Err("the grammar worker stopped".to_string());
            positions.into_iter().map(|k| (k, None, lost())).collect()
        })
    }
}

/// The next-token mask of each constraint, in order; a grammar that panics fails only its own.
fn next_token_masks(constrained: Job) -> Vec<Masked> {
    constrained
        .into_iter()
        .map(|(k, mut c)| {
            let mask = catch_unwind(AssertUnwindSafe(|| c.allowed_tokens()))
                .unwrap_or_else(|_| Err("the grammar engine panicked".into()));
            (k, Some(c), mask)
        })
        .collect()
}

/// Whether a sequence sampling with `params` needs its mask before sampling, so the step
/// computes it during the forward; otherwise [`sample_constrained`] samples first.
pub(crate) fn needs_mask_first(params: &SamplingParams) -> bool {
    !masking_is_conditioning(params)
}

/// The inputs of one sequence's next-token draw.
pub(crate) struct Draw<'a> {
    pub logits: &'a [f32],
    pub params: &'a SamplingParams,
    pub prompt: &'a [u32],
    pub output: &'a [u32],
    pub eos_token_ids: &'a [u32],
}

/// Samples a constrained sequence's next token and records it in `constraint` (an eos token,
/// which the engine handles, is not recorded); also says whether a first draw was refused.
///
/// Where [`masking_is_conditioning`] makes it exact, it samples from the unmasked
/// distribution first (llama.cpp's order) and keeps the draw if the grammar allows it, else
/// draws again under the mask: rejection sampling, so the distribution is the masked one, and
/// greedy picks the same token. Without `mask` it asks the grammar about that one token
/// first, so a grammar that agrees costs one token check instead of a mask over the
/// vocabulary; with `mask` (computed during the forward) it checks the draw against it. The
/// tokens are the same either way, so which sequences get a mask during the forward is only a
/// matter of speed. Random draws take a second number from the sequence's stream on a
/// refusal, so seeded outputs differ from a mask-first order, reproducibly. Otherwise (top-k,
/// top-p, min-p) it samples under the mask.
pub(crate) fn sample_constrained(
    constraint: &mut dyn TokenConstraint,
    mask: Option<MaskResult>,
    draw: Draw<'_>,
    rng: &mut SequenceRng,
) -> Result<(u32, bool), String> {
    let first_draw = |rng: &mut SequenceRng| {
        choose_first(draw.logits, draw.params, draw.prompt, draw.output, rng)
    };
    let is_eos = |token: u32| draw.eos_token_ids.contains(&token);
    let (mask, first): (TokenMask, Option<Choice>) = match mask {
        Some(mask) if needs_mask_first(draw.params) => (mask?, None),
        Some(mask) => (mask?, Some(first_draw(rng))),
        None if needs_mask_first(draw.params) => (constraint.allowed_tokens()?, None),
        None => {
            let first = first_draw(rng);
            if !is_eos(first.token) && constraint.try_accept_token(first.token)? {
                return Ok((first.token, false));
            }
            (constraint.allowed_tokens()?, Some(first))
        }
    };
    if mask.is_empty() {
        return Err("the grammar allows no next token".into());
    }
    let (token, refused) = match first {
        Some(first) if mask.allows(first.token) => (first.token, false),
        Some(first) => {
            let (logits, params) = (draw.logits, draw.params);
            let again = choose_again(first, &mask, logits, params, draw.prompt, draw.output, rng);
            (again, true)
        }
        None => {
            let token = choose_masked(
                draw.logits,
                Some(&mask),
                draw.params,
                draw.prompt,
                draw.output,
                rng,
            );
            (token, false)
        }
    };
    if !is_eos(token) {
        constraint.accept_token(token)?;
    }
    Ok((token, refused))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Allows only `token`; panics when asked if `token` is 0.
    struct Only(u32);

    impl TokenConstraint for Only {
        fn allowed_tokens(&mut self) -> Result<TokenMask, String> {
            assert!(self.0 != 0, "grammar bug");
            Ok(TokenMask::allowing(8, [self.0]))
        }
        fn accept_token(&mut self, _token: u32) -> Result<(), String> {
            Ok(())
        }
        fn is_finished(&self) -> bool {
            false
        }
    }

    #[test]
    fn the_worker_returns_each_batch_in_order_and_a_panic_fails_only_its_own() {
        let mut worker = MaskWorker::start().unwrap();
        for round in 0..3u32 {
            // Steps without constrained sequences in between must not shift the replies.
            worker.begin(Vec::new());
            assert!(worker.finish().is_empty());
            worker.begin(vec![(0, Box::new(Only(round + 1))), (2, Box::new(Only(0)))]);
            let done = worker.finish();
            assert_eq!(done.len(), 2);
            let (k, constraint, mask) = &done[0];
            assert_eq!((*k, constraint.is_some()), (0, true));
            assert_eq!(mask, &Ok(TokenMask::allowing(8, [round + 1])));
            let (k, constraint, mask) = &done[1];
            assert_eq!((*k, constraint.is_some()), (2, true));
            assert_eq!(mask, &Err("the grammar engine panicked".to_string()));
        }
    }
}
