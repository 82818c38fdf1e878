//! Micro-benchmarks of the engine's per-step CPU work: one scheduler step over 1,000 running
//! decodes, the batch the runner builds from it, and the sampler on a Qwen3-vocab logits row.
//!
//! Run with `cargo bench -p ember-engine --bench engine`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::Device;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ember_core::{EngineRequest, SamplingParams};
use ember_engine::sampler::{log_softmax_top, sample, SequenceRng};
use ember_engine::scheduler::{Scheduler, SchedulerConfig, SchedulerOutput};
use ember_engine::sequence::Sequence;
use ember_models::{ForwardBatch, SequenceInput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const RUNNING: usize = 1_000;
const BLOCK_SIZE: usize = 16;
/// Prompts are 480..=520 tokens, so blocks fill on different steps as in a live server.
const PROMPT_TOKENS: std::ops::RangeInclusive<usize> = 480..=520;
/// A shared system prompt, so prefix-cache blocks are shared by reference count.
const SYSTEM_PROMPT_TOKENS: usize = 128;
/// Steps run on one scheduler before it is rebuilt, keeping contexts near 500 tokens.
const STEPS_PER_SCHEDULER: u64 = 64;
/// Qwen3's vocabulary.
const VOCAB: usize = 151_936;

fn sequence(id: u64, prompt: Vec<u32>, max_tokens: usize) -> Sequence {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // The scheduler never reads the receiver; keeping it alive keeps the request "connected".
    std::mem::forget(rx);
    Sequence::new(EngineRequest {
        id,
        prompt_token_ids: prompt,
        params: SamplingParams::greedy(max_tokens),
        eos_token_ids: vec![],
        lora_name: None,
        output: tx,
    })
}

/// A scheduler with `RUNNING` sequences whose prompts are computed and cached, as after their
/// prefill and first sampled token (no model runs; the bookkeeping alone marks them computed).
/// About 1 in 10 ends within `STEPS_PER_SCHEDULER` steps, so `finish` and the eviction of
/// freed cached blocks are exercised too.
fn steady_decode_scheduler(seed: u64) -> Scheduler {
    let mut rng = StdRng::seed_from_u64(seed);
    let blocks_per_seq = (PROMPT_TOKENS.end() + STEPS_PER_SCHEDULER as usize).div_ceil(BLOCK_SIZE);
    let cfg = SchedulerConfig {
        max_num_batched_tokens: usize::MAX,
        max_num_seqs: RUNNING,
        block_size: BLOCK_SIZE,
        enable_prefix_caching: true,
        max_loras: 8,
    };
    let mut s = Scheduler::new(cfg, RUNNING * blocks_per_seq);
    let system: Vec<u32> = (0..SYSTEM_PROMPT_TOKENS)
        .map(|_| rng.random_range(0..VOCAB as u32))
        .collect();
    for id in 0..RUNNING as u64 {
        let len = rng.random_range(PROMPT_TOKENS);
        let mut prompt = system.clone();
        prompt.extend((SYSTEM_PROMPT_TOKENS..len).map(|_| rng.random_range(0..VOCAB as u32)));
        let max_tokens = if id % 10 == 9 {
            rng.random_range(2..=STEPS_PER_SCHEDULER as usize)
        } else {
            usize::MAX
        };
        s.add(sequence(id, prompt, max_tokens));
        // Prefill the first alone so the others find the system prompt in the prefix cache.
        if id == 0 || id + 1 == RUNNING as u64 {
            let out = s.schedule();
            complete(&mut s, &out, 0);
        }
    }
    assert_eq!(
        s.num_running(),
        RUNNING,
        "every sequence is admitted and none is done"
    );
    s
}

/// What `Engine::step` does around the model: schedule (each sequence's new tokens and block
/// table), then advance, "sample" a token, cache filled blocks and finish the done. Returns the
/// scheduler's output.
fn engine_step(s: &mut Scheduler, token: u32) -> SchedulerOutput {
    let out = s.schedule();
    complete(s, &out, token);
    out
}

/// The engine's bookkeeping after a forward: advances each scheduled sequence, appends `token`
/// to those caught up (the model's sample), caches newly filled blocks and finishes the done.
fn complete(s: &mut Scheduler, out: &SchedulerOutput, token: u32) {
    let mut finished = Vec::new();
    for (seq, chunk) in s.scheduled_mut(out).into_iter().zip(&out.scheduled) {
        seq.num_computed += chunk.token_ids.len();
        if seq.num_computed == seq.len() {
            seq.output.push(token);
            if seq.check_finished(usize::MAX).is_some() {
                finished.push(seq.id);
            }
        }
    }
    s.update_from_output(out, &finished);
}

fn bench_scheduler(c: &mut Criterion) {
    c.bench_function(
        "scheduler_step/1000_decodes_ctx500_bs16_prefix_cache",
        |b| {
            // Timed: the steps only; rebuilding the scheduler every STEPS_PER_SCHEDULER is not.
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                let mut done = 0;
                let mut seed = 0;
                while done < iters {
                    let mut s = steady_decode_scheduler(seed);
                    seed += 1;
                    let steps = STEPS_PER_SCHEDULER.min(iters - done);
                    let start = Instant::now();
                    for step in 0..steps {
                        black_box(engine_step(&mut s, step as u32));
                    }
                    spent += start.elapsed();
                    done += steps;
                    assert_eq!(
                        s.num_preemptions(),
                        0,
                        "the cache is sized for no preemption"
                    );
                }
                spent
            })
        },
    );

    // The runner's CPU share of a decode step: flattening the scheduler output into a ForwardBatch
    // (positions, slots, every sequence's context slots) before any model work.
    let mut s = steady_decode_scheduler(0);
    let out = s.schedule();
    let inputs: Vec<SequenceInput<'_>> = out
        .scheduled
        .iter()
        .map(|chunk| SequenceInput {
            token_ids: &chunk.token_ids,
            num_computed: chunk.num_computed,
            block_table: &chunk.block_table,
            all_logits: false,
            adapter: None,
        })
        .collect();
    c.bench_function("forward_batch_new/1000_decodes_ctx500_bs16", |b| {
        b.iter(|| ForwardBatch::new(black_box(&inputs), BLOCK_SIZE, &Device::Cpu).unwrap())
    });
}

/// Rows of roughly normal logits (std 3) with a few strong tokens, as a trained model's are.
fn random_logit_rows(rows: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows)
        .map(|_| {
            let mut row: Vec<f32> = (0..VOCAB)
                .map(|_| {
                    // Irwin–Hall: the sum of 12 uniforms is close to normal with variance 1.
                    let z: f32 = (0..12).map(|_| rng.random::<f32>()).sum::<f32>() - 6.0;
                    3.0 * z
                })
                .collect();
            for _ in 0..8 {
                row[rng.random_range(0..VOCAB)] += 12.0;
            }
            row
        })
        .collect()
}

fn bench_sampler(c: &mut Criterion) {
    // A pool of rows larger than the caches, cycled, so every call reads logits fresh from
    // memory as it would after a forward step.
    let rows = random_logit_rows(16, 7);
    let prompt: Vec<u32> = (0..500).collect();
    let output: Vec<u32> = (0..50).collect();
    let cases = [
        ("sampler/greedy", SamplingParams::greedy(16)),
        (
            "sampler/temp0.7_top_p0.9_top_k50",
            SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                top_k: 50,
                ..SamplingParams::default()
            },
        ),
        (
            "sampler/temp0.7_top_p0.9",
            SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                ..SamplingParams::default()
            },
        ),
        (
            "sampler/greedy_logprobs5",
            SamplingParams {
                logprobs: Some(5),
                ..SamplingParams::greedy(16)
            },
        ),
    ];
    for (name, params) in cases {
        let mut rng = SequenceRng::new(Some(1));
        let mut next = 0;
        c.bench_function(name, |b| {
            b.iter_batched(
                || {
                    next = (next + 1) % rows.len();
                    &rows[next]
                },
                |row| sample(row, &params, &prompt, &output, &mut rng),
                BatchSize::SmallInput,
            )
        });
    }
    let mut next = 0;
    c.bench_function("sampler/log_softmax_top5", |b| {
        b.iter_batched(
            || {
                next = (next + 1) % rows.len();
                &rows[next]
            },
            |row| log_softmax_top(row, 42, 5),
            BatchSize::SmallInput,
        )
    });
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_scheduler, bench_sampler
}
criterion_main!(benches);
