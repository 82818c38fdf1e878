//! Sharded models (tensor and expert parallelism over the in-process threads backend) give the
//! logits of the unsharded model, for every family's tiny checkpoint: fp32, within 1e-4.

use std::path::PathBuf;

use candle_core::{DType, Device};
use ember_models::{
    load_model, ForwardBatch, KvCachePool, LoadOptions, LoadedModel, SequenceInput,
};

fn options(name: &str, tp: usize, ep: bool) -> LoadOptions {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name);
    let mut opts = LoadOptions::new(dir.to_string_lossy());
    opts.dtype = Some(DType::F32);
    opts.tensor_parallel_size = tp;
    opts.enable_expert_parallel = ep;
    opts
}

/// Every logits row of a two-sequence batch: a 9-token prefill (all rows) beside a 5-token
/// prompt, then a step decoding one token of each, then a 3-token chunk of the first beside a
/// decode of the second (blocks of 4 tokens, so chunks cross block boundaries).
fn run_steps(loaded: &LoadedModel) -> Vec<Vec<f32>> {
    let layers = loaded.model.config().num_hidden_layers;
    let caches: Vec<KvCachePool> = loaded
        .model
        .kv_cache_shards()
        .into_iter()
        .map(|w| KvCachePool::new(layers, 16, 4, w, DType::F32, &Device::Cpu).unwrap())
        .collect();
    let a: Vec<u32> = vec![3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38];
    let b: Vec<u32> = vec![27, 18, 28, 1828, 45, 90, 45];
    let (ta, tb) = ([0u32, 1, 2, 3], [4u32, 5, 6, 7]);
    let steps: [((usize, usize), (usize, usize)); 3] =
        [((0, 9), (0, 5)), ((9, 10), (5, 6)), ((10, 13), (6, 7))];
    let mut rows = Vec::new();
    for (step, ((a0, a1), (b0, b1))) in steps.into_iter().enumerate() {
        let inputs = [
            SequenceInput {
                token_ids: &a[a0..a1],
                num_computed: a0,
                block_table: &ta,
                all_logits: step == 0,
                adapter: None,
            },
            SequenceInput {
                token_ids: &b[b0..b1],
                num_computed: b0,
                block_table: &tb,
                all_logits: false,
                adapter: None,
            },
        ];
        let batch = ForwardBatch::new(&inputs, 4, &Device::Cpu).unwrap();
        let out = loaded.model.forward(&batch, &caches).unwrap();
        rows.extend(out.to_vec2::<f32>().unwrap());
    }
    rows
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// Log-softmax of each row, as the API reports logprobs.
fn logprobs(rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
    rows.iter()
        .map(|r| {
            let max = r.iter().cloned().fold(f32::MIN, f32::max);
            let lse = max + r.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
            r.iter().map(|x| x - lse).collect()
        })
        .collect()
}

fn check_family(name: &str, layouts: &[(usize, bool)]) {
    let reference = logprobs(&run_steps(&load_model(&options(name, 1, false)).unwrap()));
    for &(tp, ep) in layouts {
        let sharded = load_model(&options(name, tp, ep)).unwrap();
        assert_eq!(sharded.rank_weight_bytes.len(), tp);
        let got = logprobs(&run_steps(&sharded));
        let diff = max_diff(&reference, &got);
        println!("{name} tp {tp} ep {ep}: max |Δ logprob| {diff:.2e}");
        assert!(
            diff < 1e-4,
            "{name} tp {tp} ep {ep}: max |Δ logprob| {diff}"
        );
    }
}

const LAYOUTS: [(usize, bool); 4] = [(2, false), (4, false), (2, true), (4, true)];

#[test]
fn qwen3_dense_shards_match_one_rank() {
    // 2 key/value heads: at 4 ranks each is replicated on two.
    check_family("qwen3-tiny", &[(2, false), (4, false)]);
}

#[test]
fn qwen3_moe_shards_match_one_rank() {
    check_family("qwen3-moe-tiny", &LAYOUTS);
}

#[test]
fn deepseek_v3_shards_match_one_rank() {
    check_family("deepseek-v3-tiny", &LAYOUTS);
}

#[test]
fn kimi_k2_shards_match_one_rank() {
    check_family("kimi-k2-tiny", &LAYOUTS);
}

#[test]
fn deepseek_v2_lite_shards_match_one_rank() {
    // No q_lora_rank: the query projection itself is split by heads.
    check_family("deepseek-v2-lite-tiny", &LAYOUTS);
}

#[test]
fn a_failing_rank_fails_the_step_and_the_model_without_hanging() {
    let loaded = load_model(&options("qwen3-tiny", 2, false)).unwrap();
    let layers = loaded.model.config().num_hidden_layers;
    let widths = loaded.model.kv_cache_shards();
    // Rank 1's cache is one block short of the block the step writes: rank 1 fails alone while
    // rank 0 waits for it at the first all-reduce.
    let caches = vec![
        KvCachePool::new(layers, 4, 4, widths[0], DType::F32, &Device::Cpu).unwrap(),
        KvCachePool::new(layers, 1, 4, widths[1], DType::F32, &Device::Cpu).unwrap(),
    ];
    let tokens = [3u32, 14, 15];
    let input = SequenceInput {
        token_ids: &tokens,
        num_computed: 0,
        block_table: &[3],
        all_logits: false,
        adapter: None,
    };
    let batch = ForwardBatch::new(&[input], 4, &Device::Cpu).unwrap();
    let started = std::time::Instant::now();
    let err = loaded
        .model
        .forward(&batch, &caches)
        .unwrap_err()
        .to_string();
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert!(err.contains("rank 1"), "{err}");
    assert!(loaded.model.failure().is_some_and(|f| f.contains("rank 1")));
    // The group cannot agree again: later steps fail at once, naming the first cause.
    let again = loaded
        .model
        .forward(&batch, &caches)
        .unwrap_err()
        .to_string();
    assert!(again.contains("rank 1"), "{again}");
}
