//! The memory plan is the loader's sharding, dry: for every tiny checkpoint it equals what each
//! rank of a real load holds, byte for byte; its FP8 and INT4 formats equal the published
//! checkpoints' tensor bytes. On the real DeepSeek-V3 and Kimi K2 shapes it then says what one
//! GPU of an 8-GPU node holds at TP8 and TP8+EP8.

use std::path::PathBuf;

use candle_core::DType;
use ember_core::ModelConfig;
use ember_models::loader::read_config;
use ember_models::parallel::memory_plan::{
    kv_cache_bytes_per_token, rank_weights, rank_weights_data_parallel, rank_weights_replicas,
    rank_weights_with_redundant_experts, RankWeights, WeightFormat,
};
use ember_models::{load_model, LoadFormat, LoadOptions};

fn model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name)
}

fn config(name: &str) -> ModelConfig {
    read_config(&model_dir(name), None).unwrap()
}

fn totals(plan: &[RankWeights]) -> Vec<u64> {
    plan.iter().map(RankWeights::total).collect()
}

/// Loading `name` with quantized projections dequantized (`--packed-weights false`): what the
/// plan's [`WeightFormat::Loaded`] describes.
fn dequantized(name: &str) -> LoadOptions {
    LoadOptions {
        packed_weights: Some(false),
        ..LoadOptions::new(model_dir(name).to_string_lossy())
    }
}

/// Every family's tiny checkpoint, and the quantized ones (dequantized at load).
const TINY: [&str; 7] = [
    "qwen3-tiny",
    "qwen3-moe-tiny",
    "deepseek-v3-tiny",
    "kimi-k2-tiny",
    "deepseek-v2-lite-tiny",
    "deepseek-v3-fp8-tiny",
    "kimi-k2-int4-tiny",
];

#[test]
fn the_plan_equals_what_every_rank_of_a_real_load_holds() {
    let layouts = [(1, false), (2, false), (4, false), (2, true), (4, true)];
    for name in TINY {
        let cfg = config(name);
        // Dummy weights hold every tensor they are asked for, so a V2 (greedy-routed) model
        // gets an e_score_correction_bias its checkpoint does not ship: checkpoint loads only.
        let formats: &[LoadFormat] = if name == "deepseek-v2-lite-tiny" {
            &[LoadFormat::Safetensors]
        } else {
            &[LoadFormat::Safetensors, LoadFormat::Dummy]
        };
        for (tp, ep) in layouts {
            for &load_format in formats {
                for dtype in [DType::F32, DType::BF16] {
                    let loaded = load_model(&LoadOptions {
                        dtype: Some(dtype),
                        load_format,
                        tensor_parallel_size: tp,
                        enable_expert_parallel: ep,
                        ..dequantized(name)
                    })
                    .unwrap();
                    let plan = rank_weights(&cfg, tp, ep, WeightFormat::Loaded(dtype)).unwrap();
                    assert_eq!(
                        totals(&plan),
                        loaded.rank_weight_bytes,
                        "{name} tp {tp} ep {ep} {load_format:?} {dtype:?}"
                    );
                }
            }
        }
    }
}

/// Data-parallel ranks hold every layer whole and, under expert parallelism, their share of the
/// routed experts: the plan equals a real load rank by rank.
#[test]
fn the_plan_equals_what_every_data_parallel_rank_of_a_real_load_holds() {
    for name in TINY {
        let cfg = config(name);
        for (dp, ep) in [(2, false), (2, true), (4, true)] {
            if ep && cfg.moe.is_none() && cfg.deepseek.is_none() {
                continue;
            }
            let loaded = load_model(&LoadOptions {
                dtype: Some(DType::F32),
                data_parallel_size: dp,
                enable_expert_parallel: ep,
                ..dequantized(name)
            })
            .unwrap();
            let plan =
                rank_weights_data_parallel(&cfg, dp, ep, WeightFormat::Loaded(DType::F32)).unwrap();
            assert_eq!(
                totals(&plan),
                loaded.rank_weight_bytes,
                "{name} dp {dp} ep {ep}"
            );
            // Without expert parallelism each rank is the whole model.
            if !ep {
                let one = rank_weights(&cfg, 1, false, WeightFormat::Loaded(DType::F32)).unwrap();
                assert_eq!(plan[0], one[0], "{name} dp {dp}");
            }
        }
        // Two replicas, each tensor-parallel over two ranks: each holds a TP 2 rank's share.
        let loaded = load_model(&LoadOptions {
            dtype: Some(DType::F32),
            data_parallel_size: 2,
            tensor_parallel_size: 2,
            ..dequantized(name)
        })
        .unwrap();
        let tp2 = totals(&rank_weights(&cfg, 2, false, WeightFormat::Loaded(DType::F32)).unwrap());
        assert_eq!(
            loaded.rank_weight_bytes,
            [&tp2[..], &tp2[..]].concat(),
            "{name} dp 2 x tp 2"
        );
        let plan = rank_weights_replicas(&cfg, 2, 2, false, WeightFormat::Loaded(DType::F32));
        assert_eq!(
            totals(&plan.unwrap()),
            loaded.rank_weight_bytes,
            "{name} dp 2 x tp 2 plan"
        );
        // With the experts partitioned over the four ranks too.
        if cfg.moe.is_some() || cfg.deepseek.is_some() {
            let loaded = load_model(&LoadOptions {
                dtype: Some(DType::F32),
                data_parallel_size: 2,
                tensor_parallel_size: 2,
                enable_expert_parallel: true,
                ..dequantized(name)
            })
            .unwrap();
            let plan = rank_weights_replicas(&cfg, 2, 2, true, WeightFormat::Loaded(DType::F32));
            assert_eq!(
                totals(&plan.unwrap()),
                loaded.rank_weight_bytes,
                "{name} dp 2 x tp 2 + ep"
            );
        }
    }
}

/// With `--num-redundant-experts`, each expert-parallel rank holds its share of the copies too:
/// the plan equals what every rank of a real load holds, and the copies add whole experts.
#[test]
fn the_plan_counts_each_ranks_redundant_expert_copies() {
    for name in ["qwen3-moe-tiny", "deepseek-v3-tiny", "kimi-k2-tiny"] {
        let cfg = config(name);
        for (world, redundant) in [(2, 2), (4, 4), (2, 6)] {
            let loaded = load_model(&LoadOptions {
                dtype: Some(DType::F32),
                tensor_parallel_size: world,
                enable_expert_parallel: true,
                num_redundant_experts: redundant,
                ..dequantized(name)
            })
            .unwrap();
            let format = WeightFormat::Loaded(DType::F32);
            let plan = rank_weights_with_redundant_experts(&cfg, world, redundant, format).unwrap();
            assert_eq!(
                totals(&plan),
                loaded.rank_weight_bytes,
                "{name} ep {world} +{redundant}"
            );
            let plain = rank_weights(&cfg, world, true, format).unwrap();
            let experts = 8;
            assert_eq!(
                plan[0].routed_experts * experts as u64,
                plain[0].routed_experts * (experts + redundant) as u64,
                "{name}: {redundant} copies over {world} ranks"
            );
        }
        let err = rank_weights_with_redundant_experts(&cfg, 4, 2, WeightFormat::Loaded(DType::F32))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("plus 2 redundant copies do not split evenly over 4"),
            "{err}"
        );
    }
}

#[test]
fn attention_biases_split_with_their_columns_and_sit_on_rank_0_under_row_splits() {
    // No tiny checkpoint has attention biases; dummy weights make them for any config.
    let overrides = serde_json::json!({"attention_bias": true});
    for name in ["qwen3-tiny", "deepseek-v3-tiny", "kimi-k2-tiny"] {
        let cfg = read_config(&model_dir(name), Some(&overrides)).unwrap();
        for tp in [1, 2, 4] {
            let loaded = load_model(&LoadOptions {
                dtype: Some(DType::F32),
                load_format: LoadFormat::Dummy,
                hf_overrides: Some(overrides.clone()),
                tensor_parallel_size: tp,
                ..dequantized(name)
            })
            .unwrap();
            let plan = rank_weights(&cfg, tp, false, WeightFormat::Loaded(DType::F32)).unwrap();
            assert_eq!(totals(&plan), loaded.rank_weight_bytes, "{name} tp {tp}");
        }
    }
}

/// Bytes of the checkpoint's tensors that ember loads: multi-token-prediction layers (index ≥
/// `num_hidden_layers`) and compressed-tensors' `weight_shape` metadata left out.
fn checkpoint_tensor_bytes(name: &str, layers: usize) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(model_dir(name)).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        for (tensor, info) in metadata.tensors() {
            let layer = tensor
                .strip_prefix("model.layers.")
                .and_then(|rest| rest.split('.').next())
                .and_then(|l| l.parse::<usize>().ok());
            if layer.is_some_and(|l| l >= layers) || tensor.ends_with(".weight_shape") {
                continue;
            }
            total += (info.data_offsets.1 - info.data_offsets.0) as u64;
        }
    }
    total
}

#[test]
fn fp8_and_int4_formats_are_the_published_checkpoints_bytes() {
    // fp8-256-tiny's projections span several (and partial) 128x128 blocks.
    for (name, format) in [
        ("deepseek-v3-fp8-tiny", WeightFormat::Fp8Block),
        ("deepseek-v3-fp8-256-tiny", WeightFormat::Fp8Block),
        ("kimi-k2-int4-tiny", WeightFormat::Int4Experts),
    ] {
        let cfg = config(name);
        let [plan] = rank_weights(&cfg, 1, false, format).unwrap()[..] else {
            panic!("one rank")
        };
        // The absorbed-decode copies are made at load; the checkpoint has only kv_b_proj.
        assert_eq!(
            plan.total() - plan.mla_absorbed,
            checkpoint_tensor_bytes(name, cfg.num_hidden_layers),
            "{name}"
        );
    }
}

#[test]
fn one_rank_holds_every_parameter_once_plus_the_absorbed_copies() {
    let real = ["configs/deepseek-v3", "configs/kimi-k2"];
    for name in TINY.iter().chain(&real) {
        let cfg = config(name);
        let [plan] = rank_weights(&cfg, 1, false, WeightFormat::Loaded(DType::F32)).unwrap()[..]
        else {
            panic!("one rank")
        };
        assert_eq!(
            plan.total() - plan.mla_absorbed,
            4 * cfg.num_parameters(),
            "{name}"
        );
    }
}

/// Device memory as `nvidia-smi` reports it (memory.total): H100 SXM "80 GB", H200 "141 GB".
const H100: u64 = 81_559 << 20;
const H200: u64 = 143_771 << 20;

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// Rank 0's weights for `format` over 8 ranks (every rank holds the same: no biases here),
/// checked against the unsharded plan: what is split adds up across the ranks.
fn eight_ranks(name: &str, expert_parallel: bool, format: WeightFormat) -> RankWeights {
    let cfg = config(name);
    let ranks = rank_weights(&cfg, 8, expert_parallel, format).unwrap();
    assert!(ranks.iter().all(|r| *r == ranks[0]), "{name}: ranks differ");
    let one = rank_weights(&cfg, 1, false, format).unwrap()[0];
    let sum = |part: fn(&RankWeights) -> u64| ranks.iter().map(part).sum::<u64>();
    assert_eq!(sum(|r| r.routed_experts), one.routed_experts, "{name}");
    assert_eq!(sum(|r| r.embeddings), one.embeddings, "{name}");
    assert_eq!(sum(|r| r.dense_mlp), one.dense_mlp, "{name}");
    assert_eq!(sum(|r| r.mla_absorbed), one.mla_absorbed, "{name}");
    let r = ranks[0];
    let kv = kv_cache_bytes_per_token(&cfg, 8, 2).unwrap();
    println!(
        "{name} {format:?} tp8{}: {} per rank ({:.2} GiB) = attention {} + w_uk/w_uv {} + dense mlp {} + \
         routed experts {} + shared experts {} + embeddings/lm_head {} + norms/router {}; \
         bf16 KV cache {kv} B/token/rank; left on an H100 {}, on an H200 {} ({} tokens of KV)",
        if expert_parallel { "+ep8" } else { "" },
        gb(r.total()),
        r.total() as f64 / (1u64 << 30) as f64,
        gb(r.attention),
        gb(r.mla_absorbed),
        gb(r.dense_mlp),
        gb(r.routed_experts),
        gb(r.shared_experts),
        gb(r.embeddings),
        gb(r.norms_and_router),
        H100.checked_sub(r.total()).map_or("nothing".into(), gb),
        H200.checked_sub(r.total()).map_or("nothing".into(), gb),
        H200.saturating_sub(r.total()) / kv,
    );
    r
}

/// Bytes of KV cache one full-length sequence takes on a rank, `element_bytes` per value.
fn full_context_kv(name: &str, element_bytes: u64) -> u64 {
    let cfg = config(name);
    kv_cache_bytes_per_token(&cfg, 8, element_bytes).unwrap() * cfg.max_position_embeddings as u64
}

#[test]
fn deepseek_v3_fp8_fits_an_h200_node_but_not_an_h100_node() {
    let v3 = "configs/deepseek-v3";
    for ep in [false, true] {
        let rank = eight_ranks(v3, ep, WeightFormat::Fp8Block).total();
        // 671B parameters at ~1 byte over 8 ranks, plus the replicated latent projections and
        // router: each H200 keeps room for a full 163840-token sequence's KV cache and more.
        assert!(rank + full_context_kv(v3, 2) < H200, "{rank}");
        // On an H100 the weights alone take more than its "80 GB" (decimal) and leave less than
        // a gigabyte of its 79.6 GiB, too little for the CUDA context, activations and KV
        // cache: DeepSeek-V3 in FP8 needs H200s, or more than one node of H100s.
        assert!(
            rank > 80_000_000_000 && H100.saturating_sub(rank) < 1 << 30,
            "{rank}"
        );
    }
    // In bf16 it fits neither.
    assert!(eight_ranks(v3, false, WeightFormat::Loaded(DType::BF16)).total() > H200);
    // EP8 with 32 redundant experts (288 slots, 36 experts a rank instead of 32): each copy is
    // one more FP8 expert of 3 x 7168 x 2048 values plus scales, ~44 MB a layer; 58 MoE layers
    // make 4 copies a rank 10.2 GB more, which still fits an H200 with a full sequence's cache.
    let cfg = config(v3);
    let plain = rank_weights(&cfg, 8, true, WeightFormat::Fp8Block).unwrap()[0];
    let copies =
        rank_weights_with_redundant_experts(&cfg, 8, 32, WeightFormat::Fp8Block).unwrap()[0];
    let extra = copies.total() - plain.total();
    println!(
        "deepseek-v3 fp8 ep8 + 32 redundant experts: {} a rank ({} more)",
        gb(copies.total()),
        gb(extra)
    );
    assert_eq!(extra * 8, plain.routed_experts);
    // DP8 + EP8 (DP attention): attention, dense layers, shared experts and embeddings whole on
    // every rank, the routed experts an eighth each; each rank caches only its own sequences.
    let dp = rank_weights_data_parallel(&cfg, 8, true, WeightFormat::Fp8Block).unwrap()[0];
    println!(
        "deepseek-v3 fp8 dp8 + ep8: {} a rank ({} more than tp8 + ep8)",
        gb(dp.total()),
        gb(dp.total() - plain.total())
    );
    assert_eq!(dp.routed_experts, plain.routed_experts);
    assert!(dp.total() + full_context_kv(v3, 2) < H200, "{}", dp.total());
    assert!(
        copies.total() + full_context_kv(v3, 2) < H200,
        "{}",
        copies.total()
    );
}

#[test]
fn kimi_k2_fits_an_h200_node_in_fp8_and_an_h100_node_in_int4() {
    let k2 = "configs/kimi-k2";
    for ep in [false, true] {
        // Kimi-K2-Instruct as published (block FP8): about 1.03 TB over 8 ranks.
        let fp8 = eight_ranks(k2, ep, WeightFormat::Fp8Block).total();
        assert!(fp8 + full_context_kv(k2, 2) < H200, "{fp8}");
        assert!(fp8 > H100, "{fp8}");
    }
    // Kimi-K2-Thinking as published: INT4 routed experts, the rest bf16 (the same shapes).
    // TP8 holds 76.3 GB a rank, under "80 GB", and leaves an H100 9.2 GB: a bf16 KV cache of
    // 131066 tokens, 6 short of one full-length sequence, or twice that with an fp8 cache.
    let tp = eight_ranks(k2, false, WeightFormat::Int4Experts).total();
    assert!(tp < 80_000_000_000, "{tp}");
    assert!(tp + full_context_kv(k2, 1) < H100, "{tp}");
    // EP8 replicates the bf16 shared experts (0.66 GB a rank becomes 5.3 GB): 80.9 GB, still
    // within an H100's 79.6 GiB but with 4.6 GB left, less than one bf16 full-length sequence.
    let ep = eight_ranks(k2, true, WeightFormat::Int4Experts).total();
    assert!(ep > 80_000_000_000 && ep < H100, "{ep}");
    assert!(H100 - ep < full_context_kv(k2, 2), "{ep}");
}
