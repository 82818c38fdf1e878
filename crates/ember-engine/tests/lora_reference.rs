//! LoRA adapters against transformers + peft: every adapter in `models/lora/` must reproduce the
//! fp32 reference outputs recorded by `models/make_tiny_lora.py` through the real engine, alone
//! and in batches that mix adapters with each other and with the base model.

mod common;

use std::path::PathBuf;

use common::*;
use ember_engine::{EngineConfig, EngineHandle, LoraConfig};
use serde_json::Value;

/// (adapter, base model) of every fixture.
const ADAPTERS: [(&str, &str); 5] = [
    ("qwen3-tiny-attn-r8", "qwen3-tiny"),
    ("qwen3-tiny-mlp-r4-rslora", "qwen3-tiny"),
    ("qwen3-tiny-all-r16", "qwen3-tiny"),
    // Routed experts through transformers-5 fused `target_parameters`.
    ("qwen3-moe-tiny-experts", "qwen3-moe-tiny"),
    // MLA projections (kv_b_proj included: decode cannot use the absorbed base weights),
    // the dense MLP and the shared experts.
    ("deepseek-v3-tiny-mla", "deepseek-v3-tiny"),
];

fn adapter_dir(name: &str) -> PathBuf {
    model_dir("lora").join(name)
}

fn lora_engine(base: &str, cfg: EngineConfig) -> EngineHandle {
    start(
        base,
        EngineConfig {
            lora: Some(LoraConfig::default()),
            ..cfg
        },
    )
}

/// Registers the fixture adapter `name` under its own name, once; returns the name.
fn adapter<'a>(engine: &EngineHandle, name: &'a str) -> &'a str {
    let lora = engine.lora().expect("LoRA enabled");
    if !lora.contains(name) {
        lora.load(name, &adapter_dir(name)).unwrap();
    }
    name
}

fn lora_reference(name: &str) -> Value {
    reference(&format!("lora/{name}"))
}

/// Runs every reference prompt of `name` with its adapter (all submitted at once when
/// `batched`) and compares with transformers + peft.
fn check_adapter(name: &str, base: &str, cfg: EngineConfig, batched: bool) {
    let reference = lora_reference(name);
    assert_eq!(reference["base_model"], base);
    let engine = lora_engine(base, cfg);
    let a = adapter(&engine, name);
    let prompts = reference["prompts"].as_array().unwrap();
    let run = |p: &Value| {
        engine
            .submit_with_adapter(
                ids(&p["token_ids"]),
                greedy_params(greedy_steps(p)),
                Some(a),
            )
            .unwrap()
    };
    let results: Vec<Finished> = if batched {
        let receivers: Vec<_> = prompts.iter().map(run).collect();
        receivers.into_iter().map(collect).collect()
    } else {
        prompts.iter().map(|p| collect(run(p))).collect()
    };
    assert_matches_reference(name, prompts, &results);
}

#[test]
fn every_adapter_matches_transformers_and_peft_alone() {
    for (name, base) in ADAPTERS {
        check_adapter(name, base, EngineConfig::default(), false);
    }
}

#[test]
fn every_adapter_matches_transformers_and_peft_batched_and_chunked() {
    for (name, base) in ADAPTERS {
        let cfg = EngineConfig {
            max_num_batched_tokens: 24,
            block_size: 4,
            ..EngineConfig::default()
        };
        check_adapter(name, base, cfg, true);
    }
}

/// One batch mixing the base model and three adapters (and, on each base, every prompt of each):
/// every request gets what it gets alone, and what transformers + peft computed.
#[test]
fn a_batch_mixing_base_and_adapters_gives_each_request_its_own_output() {
    let cases: [(&str, &[&str]); 3] = [
        (
            "qwen3-tiny",
            &[
                "qwen3-tiny-attn-r8",
                "qwen3-tiny-mlp-r4-rslora",
                "qwen3-tiny-all-r16",
            ],
        ),
        ("qwen3-moe-tiny", &["qwen3-moe-tiny-experts"]),
        ("deepseek-v3-tiny", &["deepseek-v3-tiny-mla"]),
    ];
    for (base, names) in cases {
        let engine = lora_engine(
            base,
            EngineConfig {
                max_num_batched_tokens: 32,
                block_size: 4,
                ..EngineConfig::default()
            },
        );
        // (adapter name or None for the base, its reference)
        let mut runs: Vec<(Option<&str>, Value)> = vec![(None, reference(base))];
        runs.extend(names.iter().map(|&n| (Some(n), lora_reference(n))));
        // Interleave requests of every model so that steps mix them row by row.
        let mut receivers = Vec::new();
        let longest = runs
            .iter()
            .map(|(_, r)| r["prompts"].as_array().unwrap().len())
            .max()
            .unwrap();
        for i in 0..longest {
            for (k, (name, r)) in runs.iter().enumerate() {
                let Some(p) = r["prompts"].as_array().unwrap().get(i) else {
                    continue;
                };
                let a = name.map(|n| adapter(&engine, n));
                let rx = engine
                    .submit_with_adapter(ids(&p["token_ids"]), greedy_params(greedy_steps(p)), a)
                    .unwrap();
                receivers.push((k, i, rx));
            }
        }
        let mut results: Vec<Vec<Option<Finished>>> = runs
            .iter()
            .map(|(_, r)| {
                (0..r["prompts"].as_array().unwrap().len())
                    .map(|_| None)
                    .collect()
            })
            .collect();
        for (k, i, rx) in receivers {
            results[k][i] = Some(collect(rx));
        }
        for ((name, r), got) in runs.iter().zip(results) {
            let got: Vec<Finished> = got.into_iter().map(Option::unwrap).collect();
            let label = format!("{base} + {} (mixed)", name.unwrap_or("base"));
            assert_matches_reference(&label, r["prompts"].as_array().unwrap(), &got);
        }
    }
}

/// With `max_loras` 1 two adapters cannot share a step, yet both complete correctly;
/// and an adapter's prompt never reuses the base model's cached KV.
#[test]
fn under_max_loras_one_two_adapters_both_complete_and_never_reuse_base_kv() {
    let name = "qwen3-tiny-attn-r8";
    let reference = lora_reference(name);
    let base_reference = common::reference("qwen3-tiny");
    let engine = start(
        "qwen3-tiny",
        EngineConfig {
            block_size: 4,
            lora: Some(LoraConfig {
                max_loras: 1,
                ..LoraConfig::default()
            }),
            ..EngineConfig::default()
        },
    );
    let attn = adapter(&engine, name);
    let mlp = adapter(&engine, "qwen3-tiny-mlp-r4-rslora");
    let mlp_reference = lora_reference("qwen3-tiny-mlp-r4-rslora");
    let p = &reference["prompts"][4];
    let prompt = ids(&p["token_ids"]);
    assert_eq!(prompt, ids(&base_reference["prompts"][4]["token_ids"]));
    let params = greedy_params(greedy_steps(p));
    // The base model first, so its blocks are cached; then both adapters at once.
    let base = collect(engine.submit(prompt.clone(), params.clone()).unwrap());
    let rx_attn = engine
        .submit_with_adapter(prompt.clone(), params.clone(), Some(attn))
        .unwrap();
    let rx_mlp = engine
        .submit_with_adapter(prompt.clone(), params, Some(mlp))
        .unwrap();
    let (got_attn, got_mlp) = (collect(rx_attn), collect(rx_mlp));
    assert_eq!(
        base.tokens,
        ids(&base_reference["prompts"][4]["greedy"]["token_ids"])
    );
    assert_eq!(got_attn.cached_prompt_tokens, 0, "adapter reused base KV");
    assert_eq!(got_mlp.cached_prompt_tokens, 0, "adapter reused base KV");
    assert_matches_reference(
        name,
        &reference["prompts"].as_array().unwrap()[4..5],
        &[got_attn],
    );
    assert_matches_reference(
        "qwen3-tiny-mlp-r4-rslora",
        &mlp_reference["prompts"].as_array().unwrap()[4..5],
        &[got_mlp],
    );
}
