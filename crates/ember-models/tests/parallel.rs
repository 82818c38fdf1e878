//! Sharded models (tensor and expert parallelism over the in-process threads backend) give the
//! logits of the unsharded model, for every family's tiny checkpoint: fp32, within 1e-4. The
//! kernel paths (packed weights, the fused MoE, ember's layer kernels) are checked in
//! `kernel_paths.rs`.

mod steps;

use candle_core::{DType, Device};
use ember_models::{load_model, ForwardBatch, KvCachePool, SequenceInput};
use steps::{fused_copy_of_qwen3_moe, logprobs, max_diff, options, run_steps};

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

/// Expert parallelism with `--num-redundant-experts`: copies of experts in the spare slots, kept
/// where they start (interval 0) or re-placed from the load before every step (`--enable-eplb`
/// at interval 1, so ranks load the experts moved to them mid-run; also without copies) or from
/// a window of one step, give the logprobs of one rank.
fn check_redundant_experts(name: &str) {
    let reference = logprobs(&run_steps(&load_model(&options(name, 1, false)).unwrap()));
    // (2, 0): no copies, the experts themselves re-placed over the ranks.
    for (ranks, redundant) in [(2, 2), (4, 4), (2, 6), (2, 0)] {
        // (interval, window): never; before every step; before step 3 from step 2's load alone.
        for (interval, window) in [(0, 0), (1, 0), (2, 1)] {
            let mut opts = options(name, ranks, true);
            opts.num_redundant_experts = redundant;
            opts.eplb_step_interval = interval;
            opts.eplb_window_size = window;
            let sharded = load_model(&opts).unwrap();
            let initial = sharded.expert_load.placements();
            assert!(!initial.is_empty(), "{name}: no placement recorded");
            let got = logprobs(&run_steps(&sharded));
            let diff = max_diff(&reference, &got);
            println!("{name} ep {ranks} +{redundant} copies, interval {interval}: max |Δ logprob| {diff:.2e}");
            assert!(
                diff < 1e-4,
                "{name} ep {ranks} +{redundant}, interval {interval}: {diff}"
            );
            let after = sharded.expert_load.placements();
            for (layer, copies) in &sharded.expert_load.replicas() {
                assert_eq!(copies.iter().sum::<usize>(), 8 + redundant, "layer {layer}");
                assert!(copies.iter().all(|&c| c >= 1), "layer {layer}: {copies:?}");
            }
            // Re-placing follows the load: some layer's experts moved off their initial slots.
            assert_eq!(
                initial != after,
                interval > 0,
                "{name} interval {interval}: {initial:?} then {after:?}"
            );
            let ranks_tokens = sharded.expert_load.rank_tokens().unwrap();
            assert_eq!(ranks_tokens.len(), ranks);
            let routed: u64 = sharded
                .expert_load
                .snapshot()
                .iter()
                .flat_map(|(_, c)| c)
                .sum();
            assert_eq!(ranks_tokens.iter().sum::<u64>(), routed);
        }
    }
}

#[test]
fn redundant_experts_match_one_rank() {
    for name in ["qwen3-moe-tiny", "deepseek-v3-tiny", "kimi-k2-tiny"] {
        check_redundant_experts(name);
    }
}

#[test]
fn redundant_experts_that_do_not_split_evenly_or_lack_expert_parallelism_are_refused() {
    let mut opts = options("qwen3-moe-tiny", 4, true);
    opts.num_redundant_experts = 2;
    let err = load_model(&opts)
        .err()
        .expect("10 slots over 4 ranks")
        .to_string();
    assert!(
        err.contains("8 routed experts plus 2 redundant copies"),
        "{err}"
    );
    let mut opts = options("qwen3-moe-tiny", 2, false);
    opts.num_redundant_experts = 2;
    let err = load_model(&opts)
        .err()
        .expect("no expert parallelism")
        .to_string();
    assert!(err.contains("--enable-expert-parallel"), "{err}");
}

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

#[test]
fn fused_expert_checkpoints_shard_like_per_expert_ones() {
    let dir = fused_copy_of_qwen3_moe();
    let reference = logprobs(&run_steps(
        &load_model(&options("qwen3-moe-tiny", 1, false)).unwrap(),
    ));
    for (tp, ep) in [(1, false), (2, false), (4, false), (2, true), (4, true)] {
        let mut opts = options("qwen3-moe-tiny", tp, ep);
        opts.model = dir.to_string_lossy().into_owned();
        let loaded = load_model(&opts).unwrap();
        let per_expert = load_model(&options("qwen3-moe-tiny", tp, ep)).unwrap();
        // Each rank holds (and so read) only its part, as with one tensor per expert.
        assert_eq!(
            loaded.rank_weight_bytes, per_expert.rank_weight_bytes,
            "tp {tp} ep {ep}"
        );
        let diff = max_diff(&reference, &logprobs(&run_steps(&loaded)));
        assert!(diff < 1e-4, "fused tp {tp} ep {ep}: max |Δ logprob| {diff}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_embedding_model_shards_to_the_same_hidden_states() {
    // Qwen3-Embedding (no LM head): the final-normed hidden states the pooling reads.
    let one = run_steps(&load_model(&options("qwen3-embedding-tiny", 1, false)).unwrap());
    for tp in [2, 4] {
        let got = run_steps(&load_model(&options("qwen3-embedding-tiny", tp, false)).unwrap());
        let diff = max_diff(&one, &got);
        assert!(diff < 1e-4, "tp {tp}: max |Δ hidden| {diff}");
    }
}
