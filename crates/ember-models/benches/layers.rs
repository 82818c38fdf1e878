//! Micro-benchmarks of single layers on dummy weights of the 1B test configs, float32 on the
//! CPU: Qwen3-MoE's sparse MoE block (decode and a prefill chunk), and one decode step of
//! grouped-query attention (qwen3-moe-1b) and of MLA (deepseek-v3-1b) over a paged cache
//! holding 16 sequences of 512 tokens.
//!
//! Run with `cargo bench -p ember-models --bench layers`.

use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode};
use ember_core::ModelConfig;
use ember_models::attention::gqa::Qwen3Attention;
use ember_models::attention::mla::MlaAttention;
use ember_models::cache::kv_cache::LayerKvCache;
use ember_models::layers::rope::{RopeRows, RotaryEmbedding};
use ember_models::loader::read_config;
use ember_models::loading::context::LoadContext;
use ember_models::loading::weights::Weights;
use ember_models::lora::LoraRows;
use ember_models::moe::SparseMoe;
use ember_models::step::mode::StepMode;
use ember_models::{ForwardBatch, KvCachePool, SequenceInput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BATCH: usize = 16;
const CONTEXT: usize = 512;
const BLOCK_SIZE: usize = 16;
/// Blocks per sequence: the context plus the token being decoded.
const BLOCKS_PER_SEQ: usize = (CONTEXT + 1).div_ceil(BLOCK_SIZE);

fn config(name: &str) -> ModelConfig {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/configs")
        .join(name);
    read_config(&dir, None).expect("the test configs are valid")
}

fn dummy_weights() -> Weights {
    Weights::dummy(0, DType::F32, &Device::Cpu)
}

/// `[rows, cols]` of seeded uniform values in [-1, 1), the scale of normalised hidden states.
fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Tensor::from_vec(values, (rows, cols), &Device::Cpu).expect("shape matches")
}

/// A cache of one layer whose `BATCH` sequences each hold `CONTEXT` tokens of random K/V rows,
/// and the decode batch of their next tokens (sequence `s` owns blocks `s * BLOCKS_PER_SEQ..`).
fn decode_setup(cfg: &ModelConfig) -> (KvCachePool, ForwardBatch, RopeRows) {
    let widths = cfg.kv_cache_row_widths();
    let pool = KvCachePool::new(
        1,
        BATCH * BLOCKS_PER_SEQ,
        BLOCK_SIZE,
        widths,
        DType::F32,
        &Device::Cpu,
    )
    .expect("the cache fits in memory");
    let tables: Vec<Vec<u32>> = (0..BATCH)
        .map(|s| ((s * BLOCKS_PER_SEQ) as u32..((s + 1) * BLOCKS_PER_SEQ) as u32).collect())
        .collect();
    let slots: Vec<u32> = tables
        .iter()
        .flat_map(|table| {
            (0..CONTEXT).map(move |pos| {
                table[pos / BLOCK_SIZE] * BLOCK_SIZE as u32 + (pos % BLOCK_SIZE) as u32
            })
        })
        .collect();
    let rows = slots.len();
    let slots = Tensor::new(slots, &Device::Cpu).expect("a vector");
    pool.layers[0]
        .write(
            &random(rows, widths.0, 1),
            &random(rows, widths.1, 2),
            &slots,
            &ember_models::cache::kv_cache::KvScales::default(),
        )
        .expect("slots are inside the pool");
    let tokens: Vec<[u32; 1]> = (0..BATCH as u32).map(|s| [s + 7]).collect();
    let inputs: Vec<SequenceInput<'_>> = tokens
        .iter()
        .zip(&tables)
        .map(|(token, table)| SequenceInput {
            token_ids: token,
            num_computed: CONTEXT,
            block_table: table,
            all_logits: false,
            adapter: None,
        })
        .collect();
    let batch =
        ForwardBatch::new(&inputs, BLOCK_SIZE, &Device::Cpu).expect("tables cover the context");
    let rope = RotaryEmbedding::new(cfg, 2 * CONTEXT, DType::F32, &Device::Cpu)
        .expect("rope tables build")
        .select(&batch.positions)
        .expect("positions are inside the tables");
    (pool, batch, rope)
}

/// Slow cases: every sample runs the same few iterations instead of criterion's growing counts.
fn slow<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    group
}

fn bench_moe(c: &mut Criterion) {
    let cfg = config("qwen3-moe-1b");
    let moe_cfg = cfg.moe.as_ref().expect("qwen3-moe-1b is a MoE");
    let moe = SparseMoe::load(
        &dummy_weights().pp("model.layers.0.mlp"),
        &LoadContext::default(),
        cfg.hidden_size,
        moe_cfg,
    )
    .expect("dummy weights have every shape");
    let mut group = slow(c, "qwen3_moe_block");
    for tokens in [1, 256] {
        let x = random(tokens, cfg.hidden_size, 3);
        group.bench_function(format!("{tokens}_tokens"), |b| {
            b.iter(|| {
                moe.forward(&x, &LoraRows::none(), &StepMode::default())
                    .expect("forward")
            })
        });
    }
    group.finish();
}

fn bench_attention(c: &mut Criterion) {
    let cfg = config("qwen3-moe-1b");
    let attn = Qwen3Attention::load(
        &dummy_weights().pp("model.layers.0.self_attn"),
        &LoadContext::default(),
        &cfg,
    )
    .expect("dummy weights have every shape");
    let (pool, batch, rope) = decode_setup(&cfg);
    let x = random(BATCH, cfg.hidden_size, 4);
    let cache: &LayerKvCache = &pool.layers[0];
    let mut group = slow(c, "gqa_attention_decode");
    group.bench_function(format!("qwen3_moe_1b/{BATCH}_seqs_ctx{CONTEXT}"), |b| {
        b.iter(|| attn.forward(&x, &batch, &rope, cache).expect("forward"))
    });
    group.finish();

    let cfg = config("deepseek-v3-1b");
    let ds = cfg
        .deepseek
        .as_ref()
        .expect("deepseek-v3-1b has MLA settings");
    let mla = MlaAttention::load(
        &dummy_weights().pp("model.layers.0.self_attn"),
        &LoadContext::default(),
        &cfg,
        ds,
    )
    .expect("dummy weights have every shape");
    let (pool, batch, rope) = decode_setup(&cfg);
    let x = random(BATCH, cfg.hidden_size, 5);
    let cache = &pool.layers[0];
    let mut group = slow(c, "mla_attention_decode");
    group.bench_function(format!("deepseek_v3_1b/{BATCH}_seqs_ctx{CONTEXT}"), |b| {
        b.iter(|| mla.forward(&x, &batch, &rope, cache).expect("forward"))
    });
    group.finish();
}

fn criterion_config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
}

criterion_group! {
    name = benches;
    config = criterion_config();
    targets = bench_moe, bench_attention
}
criterion_main!(benches);
