//! Constrained decoding through the real engine: a request's [`TokenConstraint`] decides which
//! tokens it may sample, in batches that mix constrained and free requests, and its errors end
//! only that request.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use ember_core::{
    Constraint, ConstraintSpec, FinishReason, SamplingParams, TokenConstraint, TokenMask,
};
use ember_engine::EngineConfig;

const VOCAB: usize = 2048;

/// Forces one exact token sequence, then is finished.
struct Forced {
    tokens: Vec<u32>,
    at: usize,
}

impl TokenConstraint for Forced {
    fn allowed_tokens(&mut self) -> Result<TokenMask, String> {
        Ok(TokenMask::allowing(
            VOCAB,
            self.tokens.get(self.at).copied(),
        ))
    }
    fn accept_token(&mut self, token: u32) -> Result<(), String> {
        if self.tokens.get(self.at) != Some(&token) {
            return Err(format!("token {token} was not allowed"));
        }
        self.at += 1;
        Ok(())
    }
    fn is_finished(&self) -> bool {
        self.at == self.tokens.len()
    }
}

/// Allows the ids in `lo..hi` forever; or fails at once.
struct Range {
    lo: u32,
    hi: u32,
    broken: bool,
}

impl TokenConstraint for Range {
    fn allowed_tokens(&mut self) -> Result<TokenMask, String> {
        if self.broken {
            return Err("this grammar is broken".into());
        }
        Ok(TokenMask::allowing(VOCAB, self.lo..self.hi))
    }
    fn accept_token(&mut self, token: u32) -> Result<(), String> {
        assert!(
            (self.lo..self.hi).contains(&token),
            "{token} was sampled outside the mask"
        );
        Ok(())
    }
    fn is_finished(&self) -> bool {
        false
    }
}

struct Spec<F: Fn() -> Box<dyn TokenConstraint> + Send + Sync>(F);

impl<F: Fn() -> Box<dyn TokenConstraint> + Send + Sync> ConstraintSpec for Spec<F> {
    fn start(&self) -> Box<dyn TokenConstraint> {
        (self.0)()
    }
    fn describe(&self) -> String {
        "test".into()
    }
}

fn constraint(f: impl Fn() -> Box<dyn TokenConstraint> + Send + Sync + 'static) -> Constraint {
    Constraint(Arc::new(Spec(f)))
}

fn prompt() -> Vec<u32> {
    vec![5, 17, 300, 42, 9, 77]
}

#[test]
fn a_forced_sequence_is_generated_exactly_and_stops_when_complete() {
    let engine = start("qwen3-moe-tiny", EngineConfig::default());
    let forced = vec![1000, 3, 1999, 3, 250];
    let expected = forced.clone();
    let params = SamplingParams {
        temperature: 1.0,
        seed: Some(7),
        logprobs: Some(0),
        constraint: Some(constraint(move || {
            Box::new(Forced {
                tokens: forced.clone(),
                at: 0,
            })
        })),
        ..SamplingParams::greedy(32)
    };
    let free = collect(
        engine
            .submit(
                prompt(),
                SamplingParams {
                    logprobs: Some(0),
                    ..SamplingParams::greedy(5)
                },
            )
            .unwrap(),
    );
    let done = collect(engine.submit(prompt(), params).unwrap());
    assert_eq!(done.tokens, expected);
    assert_eq!(done.finish, FinishReason::Stop);
    // Logprobs are the model's, not the mask's: forced tokens the model dislikes score low,
    // and where the grammar agrees with greedy the logprob is the free run's.
    assert!(done.logprobs.iter().all(|&lp| lp < 0.0 && lp.is_finite()));
    assert_ne!(
        free.tokens[0], expected[0],
        "pick a forced token that greedy would not choose"
    );
}

#[test]
fn constrained_and_free_requests_share_batches_without_affecting_each_other() {
    let engine = start("qwen3-moe-tiny", EngineConfig::default());
    let free_params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(12)
    };
    let alone = collect(engine.submit(prompt(), free_params.clone()).unwrap());
    let ranged = SamplingParams {
        temperature: 1.0,
        seed: Some(3),
        ignore_eos: true,
        constraint: Some(constraint(|| {
            Box::new(Range {
                lo: 100,
                hi: 110,
                broken: false,
            })
        })),
        ..SamplingParams::greedy(12)
    };
    let broken = SamplingParams {
        constraint: Some(constraint(|| {
            Box::new(Range {
                lo: 0,
                hi: 1,
                broken: true,
            })
        })),
        ..SamplingParams::greedy(12)
    };
    let receivers: Vec<_> = (0..6)
        .map(|i| {
            let params = match i % 3 {
                0 => free_params.clone(),
                1 => ranged.clone(),
                _ => broken.clone(),
            };
            engine.submit(prompt(), params).unwrap()
        })
        .collect();
    for (i, mut rx) in receivers.into_iter().enumerate() {
        match i % 3 {
            0 => assert_eq!(collect(rx).tokens, alone.tokens, "free request {i}"),
            1 => {
                let done = collect(rx);
                assert_eq!(done.tokens.len(), 12);
                assert!(
                    done.tokens.iter().all(|t| (100..110).contains(t)),
                    "{:?}",
                    done.tokens
                );
            }
            _ => {
                let mut last = None;
                while let Some(out) = rx.blocking_recv() {
                    if out.finish_reason.is_some() {
                        last = Some(out);
                        break;
                    }
                }
                let last = last.expect("the broken request finishes");
                assert_eq!(last.finish_reason, Some(FinishReason::Error));
                assert!(
                    last.error
                        .as_deref()
                        .unwrap_or("")
                        .contains("this grammar is broken"),
                    "{:?}",
                    last.error
                );
            }
        }
    }
}

/// Allows the ids in `lo..hi`, counting the masks it computes and the tokens it takes when
/// asked about one token alone (only if `checks_one`; otherwise it always falls back).
struct Counted {
    lo: u32,
    hi: u32,
    checks_one: bool,
    masks: Arc<AtomicUsize>,
    taken_alone: Arc<AtomicUsize>,
}

impl TokenConstraint for Counted {
    fn allowed_tokens(&mut self) -> Result<TokenMask, String> {
        self.masks.fetch_add(1, Ordering::Relaxed);
        Ok(TokenMask::allowing(VOCAB, self.lo..self.hi))
    }
    fn accept_token(&mut self, token: u32) -> Result<(), String> {
        assert!(
            (self.lo..self.hi).contains(&token),
            "{token} is outside the mask"
        );
        Ok(())
    }
    fn try_accept_token(&mut self, token: u32) -> Result<bool, String> {
        let taken = self.checks_one && (self.lo..self.hi).contains(&token);
        if taken {
            self.taken_alone.fetch_add(1, Ordering::Relaxed);
        }
        Ok(taken)
    }
    fn is_finished(&self) -> bool {
        false
    }
}

/// Runs `params` constrained to `lo..hi` through `engine`: its tokens, masks computed and
/// tokens taken without a mask.
fn run_counted(
    engine: &ember_engine::EngineHandle,
    params: SamplingParams,
    (lo, hi): (u32, u32),
    checks_one: bool,
) -> (Vec<u32>, usize, usize) {
    let masks = Arc::new(AtomicUsize::new(0));
    let taken_alone = Arc::new(AtomicUsize::new(0));
    let (m, t) = (masks.clone(), taken_alone.clone());
    let params = SamplingParams {
        ignore_eos: true,
        constraint: Some(constraint(move || {
            Box::new(Counted {
                lo,
                hi,
                checks_one,
                masks: m.clone(),
                taken_alone: t.clone(),
            })
        })),
        ..params
    };
    let done = collect(engine.submit(prompt(), params).unwrap());
    assert!(
        done.tokens.iter().all(|t| (lo..hi).contains(t)),
        "{:?}",
        done.tokens
    );
    (
        done.tokens,
        masks.load(Ordering::Relaxed),
        taken_alone.load(Ordering::Relaxed),
    )
}

#[test]
fn sampling_first_picks_the_tokens_masking_first_picks() {
    let engine = start("qwen3-moe-tiny", EngineConfig::default());
    let steps = 16;
    // Half the vocabulary: the model's own choice is sometimes allowed, sometimes not.
    let half = (0, VOCAB as u32 / 2);
    let (greedy, masks, alone) = run_counted(&engine, SamplingParams::greedy(steps), half, true);
    assert!(alone > 0 && masks > 0, "{alone} taken alone, {masks} masks");
    assert_eq!(
        alone + masks,
        steps,
        "each step either took its draw or computed a mask"
    );
    // A grammar that cannot check one token: every step falls back to the mask, same tokens.
    let (fallback, masks, alone) = run_counted(&engine, SamplingParams::greedy(steps), half, false);
    assert_eq!((fallback, masks, alone), (greedy.clone(), steps, 0));
    // top-k masks first (on the mask thread, during the forward); at a near-zero temperature
    // it is the argmax under the mask, which is what greedy sampled first.
    let near_greedy = SamplingParams {
        temperature: 1e-4,
        top_k: VOCAB,
        seed: Some(1),
        ..SamplingParams::greedy(steps)
    };
    let (masked_first, masks, alone) = run_counted(&engine, near_greedy, half, true);
    assert_eq!((masked_first, masks, alone), (greedy, steps, 0));
}

#[test]
fn a_refused_first_draw_falls_back_to_the_mask() {
    let engine = start("qwen3-moe-tiny", EngineConfig::default());
    let steps = 24;
    let seeded = SamplingParams {
        temperature: 1.0,
        seed: Some(11),
        ..SamplingParams::greedy(steps)
    };
    // Ten tokens of 2048: almost every first draw is refused and drawn again under the mask.
    let (tokens, masks, alone) = run_counted(&engine, seeded.clone(), (100, 110), true);
    assert_eq!(tokens.len(), steps);
    assert!(masks >= steps - 2, "{masks} masks");
    assert_eq!(alone + masks, steps);
    // Whether the draw is taken alone or checked against the mask, the tokens are the same.
    let (again, ..) = run_counted(&engine, seeded, (100, 110), false);
    assert_eq!(again, tokens);
}
