//! The CPU half of CUDA decode graphs (`ember_models::step::cuda_graph`): a decode step padded to a
//! graph's size with placeholder rows gives its sequences the logits the step alone gives, and
//! leaves their caches as the step alone does, step after step, for every family, with ember's
//! kernels' references (what graphs run with on a GPU). The GPU half, that a replay computes
//! the padded step, is `decode_graphs_match_the_eager_steps` in tests/cuda.rs.

mod common;

use common::model_dir;
use ember_engine::runner::ModelRunner;
use ember_models::backends::AttentionBackend;
use ember_models::backends::MoeBackend;
use ember_models::step::cuda_graph::GraphPlan;
use ember_models::{load_model, LoadOptions, SequenceInput};

/// Largest |padded − alone| allowed on a logit: the same f32 arithmetic, only the matmuls' row
/// counts differ.
const PAD_TOL: f32 = 1e-4;

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn padded_decode_steps_match_the_steps_alone() {
    let (block_size, blocks, per_seq) = (4usize, 48usize, 16usize);
    for name in [
        "qwen3-tiny",
        "qwen3-moe-tiny",
        "deepseek-v3-tiny",
        "kimi-k2-tiny",
        "deepseek-v2-lite-tiny",
    ] {
        let load = || {
            let mut opts = LoadOptions::new(model_dir(name).to_string_lossy());
            opts.dtype = Some(candle_core::DType::F32);
            opts.attention_backend = AttentionBackend::Ember;
            opts.moe_backend = MoeBackend::Fused;
            opts.max_model_len = Some(blocks * block_size);
            load_model(&opts).unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let vocab = load().config.vocab_size as u32;
        // Block `blocks` is the scratch block: in no table, written by placeholders only.
        let alone = ModelRunner::new(load(), blocks + 1, block_size, &[]).unwrap();
        let padded = ModelRunner::new(load(), blocks + 1, block_size, &[]).unwrap();
        let plan = GraphPlan::new(&[2, 8], block_size, blocks * block_size, blocks as u32);
        let scratch = [blocks as u32];

        let prompts: Vec<Vec<u32>> = (0..3u32)
            .map(|i| {
                (0..5 + 4 * i)
                    .map(|t| (t * 7 + i * 13 + 1) % vocab)
                    .collect()
            })
            .collect();
        let tables: Vec<Vec<u32>> = (0..3)
            .map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect())
            .collect();
        let prefill: Vec<SequenceInput<'_>> = prompts
            .iter()
            .zip(&tables)
            .map(|(p, t)| SequenceInput {
                token_ids: p,
                num_computed: 0,
                block_table: t,
                all_logits: false,
                adapter: None,
            })
            .collect();
        let first = alone.execute(&prefill).unwrap();
        assert_eq!(
            first,
            padded.execute(&prefill).unwrap(),
            "{name}: the same prefill"
        );
        let mut next: Vec<[u32; 1]> = first.iter().map(|rows| [argmax(&rows[0])]).collect();
        let mut computed: Vec<usize> = prompts.iter().map(Vec::len).collect();
        // Sequence 1 finishes after two steps; steps of 3, then 2 sequences.
        let mut live = vec![0usize, 1, 2];
        for step in 0..5 {
            if step == 2 {
                live.retain(|&s| s != 1);
            }
            let real: Vec<SequenceInput<'_>> = live
                .iter()
                .map(|&s| SequenceInput {
                    token_ids: &next[s],
                    num_computed: computed[s],
                    block_table: &tables[s],
                    all_logits: false,
                    adapter: None,
                })
                .collect();
            let batch = alone.prepare(&real).unwrap();
            let bucket = plan.bucket(&batch).expect("a graph step");
            assert_eq!(bucket, if live.len() == 2 { 2 } else { 8 });
            let mut with_placeholders = real.clone();
            with_placeholders.extend(plan.placeholders(bucket - real.len(), &scratch));
            let want = alone.forward(&batch).unwrap();
            let got = padded.execute(&with_placeholders).unwrap();
            assert_eq!(got.len(), bucket);
            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                let diff = w[0]
                    .iter()
                    .zip(&g[0])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff <= PAD_TOL,
                    "{name} step {step} row {i}: padded logits off by {diff} (tol {PAD_TOL})"
                );
            }
            for (i, &s) in live.iter().enumerate() {
                next[s] = [argmax(&want[i][0])];
                computed[s] += 1;
            }
        }
        eprintln!("{name}: decode steps padded to graph sizes match the steps alone");
    }
}
