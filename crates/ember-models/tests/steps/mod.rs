//! What the model tests of this folder share: loading a tiny checkpoint of `models/` in f32, and
//! running a fixed mix of prefill, decode and chunked steps through it for every logits row.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use ember_models::lora::LoraAdapter;
use ember_models::{ForwardBatch, KvCachePool, LoadOptions, LoadedModel, SequenceInput};

pub fn options(name: &str, tp: usize, ep: bool) -> LoadOptions {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name);
    let mut opts = LoadOptions::new(dir.to_string_lossy());
    opts.dtype = Some(DType::F32);
    opts.tensor_parallel_size = tp;
    opts.enable_expert_parallel = ep;
    opts
}

/// An f32 cache of 16 blocks of 4 tokens for each of the model's shards.
pub fn caches(loaded: &LoadedModel) -> Vec<KvCachePool> {
    let layers = loaded.model.config().num_hidden_layers;
    loaded
        .model
        .kv_cache_shards()
        .into_iter()
        .map(|w| KvCachePool::new(layers, 16, 4, w, DType::F32, &Device::Cpu).unwrap())
        .collect()
}

/// Every logits row of a two-sequence batch: a 9-token prefill (all rows) beside a 5-token
/// prompt, then a step decoding one token of each, then a 3-token chunk of the first beside a
/// decode of the second (blocks of 4 tokens, so chunks cross block boundaries).
pub fn run_steps(loaded: &LoadedModel) -> Vec<Vec<f32>> {
    let pair = SequencePair {
        a: &[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38],
        b: &[27, 18, 28, 1828, 45, 90, 45],
        tables: (&[0, 1, 2, 3], &[4, 5, 6, 7]),
        b_all_logits: false,
        b_adapter: None,
    };
    pair.run(
        loaded,
        &[((0, 9), (0, 5)), ((9, 10), (5, 6)), ((10, 13), (6, 7))],
    )
}

/// Two sequences stepped side by side, `a` first.
pub struct SequencePair<'a> {
    pub a: &'a [u32],
    pub b: &'a [u32],
    /// Their block tables (blocks of 4 tokens).
    pub tables: (&'a [u32], &'a [u32]),
    /// Whether `b`'s first step returns every row, as `a`'s does (else only its last).
    pub b_all_logits: bool,
    pub b_adapter: Option<&'a Arc<LoraAdapter>>,
}

impl SequencePair<'_> {
    /// The logits rows of each step `((a0, a1), (b0, b1))`, which computes `a[a0..a1]` and
    /// `b[b0..b1]`: every row of the first step, each sequence's last row after.
    pub fn run(&self, loaded: &LoadedModel, steps: &[StepSpans]) -> Vec<Vec<f32>> {
        let caches = caches(loaded);
        let mut rows = Vec::new();
        for (step, &((a0, a1), (b0, b1))) in steps.iter().enumerate() {
            let inputs = [
                SequenceInput {
                    token_ids: &self.a[a0..a1],
                    num_computed: a0,
                    block_table: self.tables.0,
                    all_logits: step == 0,
                    adapter: None,
                },
                SequenceInput {
                    token_ids: &self.b[b0..b1],
                    num_computed: b0,
                    block_table: self.tables.1,
                    all_logits: step == 0 && self.b_all_logits,
                    adapter: self.b_adapter,
                },
            ];
            let batch = ForwardBatch::new(&inputs, 4, &Device::Cpu).unwrap();
            let out = loaded.model.forward(&batch, &caches).unwrap();
            rows.extend(out.to_vec2::<f32>().unwrap());
        }
        rows
    }
}

/// The tokens one step computes of each sequence of a [`SequencePair`]: `(start, end)` of `a`,
/// then of `b`.
pub type StepSpans = ((usize, usize), (usize, usize));

pub fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
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
pub fn logprobs(rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
    rows.iter()
        .map(|r| {
            let max = r.iter().cloned().fold(f32::MIN, f32::max);
            let lse = max + r.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
            r.iter().map(|x| x - lse).collect()
        })
        .collect()
}

/// `models/qwen3-moe-tiny` rewritten with its experts fused as transformers 5 holds them
/// (`experts.gate_up_proj [E, 2I, H]`, gate rows first; `experts.down_proj [E, H, I]`).
pub fn fused_copy_of_qwen3_moe() -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/qwen3-moe-tiny");
    let dir = std::env::temp_dir().join(format!("ember-fused-qwen3-moe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut tensors = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "safetensors") {
            tensors.extend(candle_core::safetensors::load(&path, &Device::Cpu).unwrap());
        }
    }
    let mut fused = std::collections::HashMap::new();
    let mut experts: std::collections::BTreeMap<String, Vec<(usize, String, candle_core::Tensor)>> =
        Default::default();
    for (name, t) in tensors {
        match name.split_once(".mlp.experts.") {
            Some((layer, rest)) => {
                let (e, proj) = rest.split_once('.').unwrap();
                experts.entry(layer.to_string()).or_default().push((
                    e.parse().unwrap(),
                    proj.trim_end_matches(".weight").to_string(),
                    t,
                ));
            }
            None => {
                fused.insert(name, t);
            }
        }
    }
    for (layer, mut list) in experts {
        list.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        let of = |proj: &str| -> Vec<candle_core::Tensor> {
            list.iter()
                .filter(|x| x.1 == proj)
                .map(|x| x.2.clone())
                .collect()
        };
        let gate_up: Vec<_> = of("gate_proj")
            .iter()
            .zip(of("up_proj"))
            .map(|(g, u)| candle_core::Tensor::cat(&[g, &u], 0).unwrap())
            .collect();
        let stack = |ts: &[candle_core::Tensor]| candle_core::Tensor::stack(ts, 0).unwrap();
        fused.insert(format!("{layer}.mlp.experts.gate_up_proj"), stack(&gate_up));
        fused.insert(
            format!("{layer}.mlp.experts.down_proj"),
            stack(&of("down_proj")),
        );
    }
    candle_core::safetensors::save(&fused, dir.join("model.safetensors")).unwrap();
    dir
}
