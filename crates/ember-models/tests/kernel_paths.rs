//! ember's kernel paths give the logits of candle's: 4-bit and block-FP8 projections held packed
//! (the default; on the CPU ember-kernels' packed GEMMs) against the same checkpoints
//! dequantized at load, online FP8, W8A8, the fused MoE against the experts one by one, ember's
//! layer kernels and MLA decode (their CPU references here), unsharded and sharded.

mod steps;

use std::path::PathBuf;

use candle_core::{DType, Device};
use ember_models::device::calls::Kernel;
use ember_models::{load_model, ForwardBatch, LoadOptions, LoadedModel, SequenceInput};
use steps::{
    caches, fused_copy_of_qwen3_moe, logprobs, max_diff, options, run_steps, SequencePair,
};

/// Every logits row of one 40-token prefill: batches past the packed weights' GEMV size, which
/// dequantize on the device and run a dense GEMM instead (on the CPU: tiles of weight rows).
fn run_prefill(loaded: &LoadedModel) -> Vec<Vec<f32>> {
    let caches = caches(loaded);
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 1900).collect();
    let table: Vec<u32> = (0..10).collect();
    let inputs = [SequenceInput {
        token_ids: &tokens,
        num_computed: 0,
        block_table: &table,
        all_logits: true,
        adapter: None,
    }];
    let batch = ForwardBatch::new(&inputs, 4, &Device::Cpu).unwrap();
    let out = loaded.model.forward(&batch, &caches).unwrap();
    out.to_vec2::<f32>().unwrap()
}

/// `options` with the quantized projections dequantized at load (`--packed-weights false`).
fn dequantized_options(name: &str, tp: usize) -> LoadOptions {
    let mut opts = options(name, tp, false);
    opts.packed_weights = Some(false);
    opts
}

/// Loads `name` dequantized at load and held packed (the default) at TP 1 and 2: the same
/// logprobs within `tol` on the steps and on a prefill past the GEMV size, and fewer bytes held
/// (below `at_most_tenths / 10` of the dequantized ones at TP 1).
fn check_held(name: &str, tol: f32, at_most_tenths: u64) {
    let one = load_model(&dequantized_options(name, 1)).unwrap();
    let (reference, prefill) = (logprobs(&run_steps(&one)), logprobs(&run_prefill(&one)));
    for tp in [1, 2] {
        let dequantized = load_model(&dequantized_options(name, tp)).unwrap();
        let packed = load_model(&options(name, tp, false)).unwrap();
        let diff = max_diff(&reference, &logprobs(&run_steps(&packed)))
            .max(max_diff(&prefill, &logprobs(&run_prefill(&packed))));
        println!(
            "{name} tp {tp}: max |Δ logprob| {diff:.2e}, weights {} B packed vs {} B",
            packed.weight_bytes, dequantized.weight_bytes
        );
        assert!(diff < tol, "{name} tp {tp}: max |Δ logprob| {diff}");
        let at_most = if tp == 1 { at_most_tenths } else { 10 };
        assert!(
            packed.weight_bytes * 10 < dequantized.weight_bytes * at_most,
            "{name} tp {tp}: {} B packed vs {} B dequantized",
            packed.weight_bytes,
            dequantized.weight_bytes
        );
    }
}

/// 4-bit routed experts (integer, or FP4: NVFP4, MXFP4) held packed and multiplied by the W4A16
/// op (ember-kernels' packed CPU GEMM here) give the logprobs of the same weights dequantized at
/// load, at TP 1 and 2 (column and row splits), and hold a fraction of the bytes. Both dequantize the same way (exact in f32; rounded to
/// float16 for GPTQ and AWQ, as their tools do), so they agree to the order of the f32 sums:
/// 1e-4. The GPTQ checkpoint uses activation order: its inputs are gathered.
///
/// The routed experts are 18% of these models' f32 bytes (the embeddings dominate); held packed
/// they take an eighth of that, plus their scales. At TP 2 each rank's half of down_proj's 32
/// inputs is not a whole group of 32: those stay dequantized.
#[test]
fn four_bit_projections_held_packed_give_the_dequantized_logprobs() {
    for name in [
        "kimi-k2-int4-tiny",
        "kimi-k2-gptq-tiny",
        "kimi-k2-awq-tiny",
        "kimi-k2-nvfp4-tiny",
        "kimi-k2-mxfp4-tiny",
    ] {
        check_held(name, 1e-4, 9);
    }
}

/// Block-FP8 projections held as stored and multiplied by the W8A16 op (ember-kernels' packed
/// CPU GEMM here) give the logprobs of the same checkpoint dequantized at load, at TP 1 and 2: both compute each
/// weight as e4m3 times its block's scale in f32, so they agree to the order of the f32 sums.
/// deepseek-v3-fp8-256-tiny has hidden 320: real 128 x 128 blocks with ragged edges. A rank's part
/// that does not start on a block boundary is dequantized instead (at TP 2 most of them here).
#[test]
fn block_fp8_projections_held_as_stored_give_the_dequantized_logprobs() {
    for name in [
        "deepseek-v3-fp8-tiny",
        "deepseek-v3-fp8-ue8m0-tiny",
        "deepseek-v3-fp8-256-tiny",
    ] {
        check_held(name, 1e-4, 8);
    }
}

/// `options` with the routed experts run one by one (`--moe-backend experts`; the CPU's default
/// fuses dense experts): the baseline the fused MoE is checked against.
fn experts_options(name: &str, tp: usize, ep: bool) -> LoadOptions {
    let mut opts = options(name, tp, ep);
    opts.moe_backend = ember_models::backends::MoeBackend::Experts;
    opts
}

fn fused_options(name: &str, tp: usize, ep: bool) -> LoadOptions {
    let mut opts = options(name, tp, ep);
    opts.moe_backend = ember_models::backends::MoeBackend::Fused;
    opts
}

/// `--moe-backend fused` (routing, alignment, grouped GEMMs and weighted sum as one op; on the
/// CPU the kernels' references) gives the logprobs of the experts run one by one, for every MoE
/// family's routing (softmax top-k with and without renormalisation, noaux_tc with its bias,
/// group-limited and plain greedy) in steps that mix prefill, decode and chunks and in a 40-token
/// prefill, at TP 1 and 2 (each rank's channel share of every expert); fp32, so within 1e-4.
/// The experts' MLPs become views of the stack: the model holds the same bytes.
#[test]
fn the_fused_moe_gives_the_logprobs_of_the_experts_one_by_one() {
    for name in [
        "qwen3-moe-tiny",
        "qwen3-moe-mixed-tiny",
        "deepseek-v3-tiny",
        "kimi-k2-tiny",
        "deepseek-v2-tiny",
        "deepseek-v2-lite-tiny",
    ] {
        for tp in [1, 2] {
            let experts = load_model(&experts_options(name, tp, false)).unwrap();
            let fused = load_model(&fused_options(name, tp, false)).unwrap();
            assert_eq!(
                fused.rank_weight_bytes, experts.rank_weight_bytes,
                "{name} tp {tp}"
            );
            let calls = || fused.kernel_calls.get(Kernel::FusedMoe);
            let before = calls();
            for run in [run_steps, run_prefill] {
                let want = logprobs(&run(&experts));
                let got = logprobs(&run(&fused));
                let diff = max_diff(&want, &got);
                println!("{name} tp {tp}: fused MoE max |Δ logprob| {diff:.2e}");
                assert!(diff < 1e-4, "{name} tp {tp}: max |Δ logprob| {diff}");
            }
            assert!(calls() > before, "{name} tp {tp}: the fused MoE never ran");
            // /metrics' per-expert token counts: the fused layers count what the experts did.
            let counts = experts.expert_load.snapshot();
            assert!(
                counts.iter().flat_map(|(_, c)| c).sum::<u64>() > 0,
                "{name}: no counts"
            );
            assert_eq!(
                fused.expert_load.snapshot(),
                counts,
                "{name} tp {tp}: tokens per expert"
            );
        }
    }
    // Checkpoints that store the experts fused, and expert parallelism (which the fused MoE
    // leaves to the experts one by one: the same logprobs still).
    let dir = fused_copy_of_qwen3_moe();
    let reference = logprobs(&run_steps(
        &load_model(&experts_options("qwen3-moe-tiny", 1, false)).unwrap(),
    ));
    for (tp, ep) in [(1, false), (2, false), (2, true)] {
        let mut opts = fused_options("qwen3-moe-tiny", tp, ep);
        opts.model = dir.to_string_lossy().into_owned();
        let diff = max_diff(
            &reference,
            &logprobs(&run_steps(&load_model(&opts).unwrap())),
        );
        assert!(
            diff < 1e-4,
            "fused checkpoint tp {tp} ep {ep}: max |Δ logprob| {diff}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// On the CPU the default `--moe-backend` (auto) runs dense experts as ember-kernels' blocked
/// CPU kernel (`moe_cpu`), with the same logprobs as the experts one by one (fp32, within 1e-4),
/// at TP 1 and 2, holding the same bytes and counting the same tokens per expert; under expert
/// parallelism the experts still run one by one.
#[test]
fn the_cpus_default_moe_is_the_blocked_kernel() {
    for name in ["qwen3-moe-tiny", "deepseek-v3-tiny"] {
        for tp in [1, 2] {
            let experts = load_model(&experts_options(name, tp, false)).unwrap();
            let auto = load_model(&options(name, tp, false)).unwrap();
            assert_eq!(auto.rank_weight_bytes, experts.rank_weight_bytes, "{name}");
            let calls = || auto.kernel_calls.get(Kernel::MoeCpu);
            let before = calls();
            for run in [run_steps, run_prefill] {
                let diff = max_diff(&logprobs(&run(&experts)), &logprobs(&run(&auto)));
                println!("{name} tp {tp}: CPU MoE max |Δ logprob| {diff:.2e}");
                assert!(diff < 1e-4, "{name} tp {tp}: max |Δ logprob| {diff}");
            }
            assert!(calls() > before, "{name} tp {tp}: the CPU MoE never ran");
            assert_eq!(experts.kernel_calls.get(Kernel::MoeCpu), 0, "{name}");
            assert_eq!(
                auto.expert_load.snapshot(),
                experts.expert_load.snapshot(),
                "{name} tp {tp}: tokens per expert"
            );
        }
        let ep = load_model(&options(name, 2, true)).unwrap();
        run_steps(&ep);
        assert_eq!(ep.kernel_calls.get(Kernel::MoeCpu), 0, "{name} ep");
    }
}

/// On quantized checkpoints the CPU's default holds the experts packed and runs them as the
/// blocked CPU kernel over their packed rows (4-bit integers, e2m1 with e4m3 scale bytes, e4m3
/// blocks), with the logprobs of the same experts one by one (fp32, within 1e-4), holding the
/// same bytes.
#[test]
fn the_cpus_default_moe_runs_packed_experts_through_the_blocked_kernel() {
    for name in [
        "kimi-k2-int4-tiny",
        "kimi-k2-nvfp4-tiny",
        "deepseek-v3-fp8-tiny",
    ] {
        let experts = load_model(&experts_options(name, 1, false)).unwrap();
        let auto = load_model(&options(name, 1, false)).unwrap();
        assert_eq!(auto.rank_weight_bytes, experts.rank_weight_bytes, "{name}");
        let calls = || auto.kernel_calls.get(Kernel::MoeCpu);
        let before = calls();
        for run in [run_steps, run_prefill] {
            let diff = max_diff(&logprobs(&run(&experts)), &logprobs(&run(&auto)));
            println!("{name}: CPU MoE over packed experts max |Δ logprob| {diff:.2e}");
            assert!(diff < 1e-4, "{name}: max |Δ logprob| {diff}");
        }
        assert!(calls() > before, "{name}: the CPU MoE never ran");
    }
}

/// A step whose adapter adapts the experts runs them one by one (the fused MoE has no adapter
/// path), so adapted rows keep their deltas: the same logprobs as the experts backend, and not
/// those of the base model.
#[test]
fn adapted_experts_leave_the_fused_moe_for_the_step() {
    let run =
        |loaded: &LoadedModel, adapted| run_adapted(loaded, "qwen3-moe-tiny-experts", adapted);
    let experts = load_model(&experts_options("qwen3-moe-tiny", 1, false)).unwrap();
    let fused = load_model(&fused_options("qwen3-moe-tiny", 1, false)).unwrap();
    let diff = max_diff(&run(&experts, true), &run(&fused, true));
    assert!(diff < 1e-4, "adapted: max |Δ logprob| {diff}");
    let moved = max_diff(&run(&fused, true), &run(&fused, false));
    assert!(moved > 1e-3, "the adapter changed nothing ({moved})");
}

/// `--layer-kernels ember`: RMSNorm fused with the residual add, one gate/up GEMM with
/// SiLU-and-mul, and the step-rows RoPE (rotate-half, interleaved, YaRN) as ember's ops (their CPU
/// references here) give candle's logprobs for every family, at TP 1 and 2, alone and with the
/// fused MoE; fp32, so within 1e-4. Every op must have run.
#[test]
fn ember_layer_kernels_give_the_logprobs_of_candles_ops() {
    use ember_models::backends::LayerKernels;
    for name in [
        "qwen3-tiny",
        "qwen3-moe-tiny",
        "qwen3-moe-mixed-tiny",
        "deepseek-v3-tiny",
        "kimi-k2-tiny",
        "deepseek-v2-lite-tiny",
        "deepseek-v2-tiny",
    ] {
        for (tp, fused) in [(1, false), (2, false), (1, true)] {
            let candle = load_model(&options(name, tp, false)).unwrap();
            let mut opts = if fused {
                fused_options(name, tp, false)
            } else {
                experts_options(name, tp, false)
            };
            opts.layer_kernels = LayerKernels::Ember;
            let ember = load_model(&opts).unwrap();
            assert_eq!(
                ember.rank_weight_bytes, candle.rank_weight_bytes,
                "{name} tp {tp}"
            );
            let calls = || {
                [
                    Kernel::RmsNorm,
                    Kernel::AddRmsNorm,
                    Kernel::SiluAndMul,
                    Kernel::Rotary,
                ]
                .map(|k| ember.kernel_calls.get(k))
            };
            let before = calls();
            for run in [run_steps, run_prefill] {
                let diff = max_diff(&logprobs(&run(&candle)), &logprobs(&run(&ember)));
                println!(
                    "{name} tp {tp} fused {fused}: ember layer kernels max |Δ logprob| {diff:.2e}"
                );
                assert!(
                    diff < 1e-4,
                    "{name} tp {tp} fused {fused}: max |Δ logprob| {diff}"
                );
            }
            let after = calls();
            // Every op ran; SiLU-and-mul only where some MLP runs one by one (dense layers, shared
            // experts, or experts without the fused MoE, whose own kernel combines the halves).
            for (op, (a, b)) in ["rms_norm", "add_rms_norm", "silu_and_mul", "rotary"]
                .iter()
                .zip(after.iter().zip(before))
            {
                let may_skip = *op == "silu_and_mul" && fused && name.starts_with("qwen3-moe-tiny");
                assert!(
                    may_skip || a > &b,
                    "{name} tp {tp} fused {fused}: {op} never ran"
                );
            }
        }
    }
}

/// A row whose adapter adapts gate_proj or up_proj runs them apart (the fused gate/up GEMM has no
/// adapter path): the same logprobs as candle's ops with the adapter, not the base model's.
#[test]
fn adapted_gate_and_up_leave_the_fused_gemm_for_the_step() {
    use ember_models::backends::LayerKernels;
    let run =
        |loaded: &LoadedModel, adapted| run_adapted(loaded, "qwen3-tiny-mlp-r4-rslora", adapted);
    let candle = load_model(&options("qwen3-tiny", 1, false)).unwrap();
    let mut opts = options("qwen3-tiny", 1, false);
    opts.layer_kernels = LayerKernels::Ember;
    let ember = load_model(&opts).unwrap();
    let diff = max_diff(&run(&candle, true), &run(&ember, true));
    assert!(diff < 1e-4, "adapted: max |Δ logprob| {diff}");
    let moved = max_diff(&run(&ember, true), &run(&ember, false));
    assert!(moved > 1e-3, "the adapter changed nothing ({moved})");
}

/// The logprobs of a two-sequence prefill then decode whose second sequence takes the adapter
/// in `models/lora/<adapter_dir>` when `adapted`.
fn run_adapted(loaded: &LoadedModel, adapter_dir: &str, adapted: bool) -> Vec<Vec<f32>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/lora")
        .join(adapter_dir);
    let adapter = std::sync::Arc::new(
        ember_models::lora::LoraAdapter::load(
            &dir,
            "adapter",
            1,
            loaded.model.lora_targets(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap(),
    );
    // A prefill of both, then a decode of both: the second sequence takes the adapter.
    let pair = SequencePair {
        a: &[3, 14, 15, 92, 65, 35],
        b: &[27, 18, 28],
        tables: (&[0, 1], &[2, 3]),
        b_all_logits: true,
        b_adapter: adapted.then_some(&adapter),
    };
    let rows = pair.run(loaded, &[((0, 5), (0, 2)), ((5, 6), (2, 3))]);
    logprobs(&rows)
}

/// `--attention-backend ember` on MLA: the step's single-token decodes through ember's MLA decode
/// op (absorbed over the latent cache, every decode in one call) and its prefill chunks through
/// the prefill attention op (the context expanded, causal attention in one call; both their CPU
/// references here) give the tensor path's logprobs for DeepSeek-V3, Kimi K2 and V2 (YaRN) at
/// TP 1 and 2; fp32, so within 1e-4. A decode whose adapter adapts kv_b_proj sends the layer's
/// decodes back to the tensor path, keeping its delta; its prefill expands with the adapter.
#[test]
fn embers_mla_decode_gives_the_tensor_paths_logprobs() {
    use ember_models::backends::AttentionBackend;
    for name in [
        "deepseek-v3-tiny",
        "kimi-k2-tiny",
        "deepseek-v2-lite-tiny",
        "deepseek-v2-tiny",
    ] {
        for tp in [1, 2] {
            let tensor = load_model(&options(name, tp, false)).unwrap();
            let mut opts = options(name, tp, false);
            opts.attention_backend = AttentionBackend::Ember;
            let ember = load_model(&opts).unwrap();
            let calls = || ember.kernel_calls.get(Kernel::MlaDecode);
            let prefill_calls = || ember.kernel_calls.get(Kernel::MlaPrefill);
            let (before, prefills) = (calls(), prefill_calls());
            let diff = max_diff(
                &logprobs(&run_steps(&tensor)),
                &logprobs(&run_steps(&ember)),
            )
            .max(max_diff(
                &logprobs(&run_prefill(&tensor)),
                &logprobs(&run_prefill(&ember)),
            ));
            println!("{name} tp {tp}: MLA kernels max |Δ logprob| {diff:.2e}");
            assert!(diff < 1e-4, "{name} tp {tp}: max |Δ logprob| {diff}");
            assert!(
                calls() > before,
                "{name} tp {tp}: the MLA decode op never ran"
            );
            assert!(
                prefill_calls() > prefills,
                "{name} tp {tp}: the prefill attention op never ran"
            );
        }
    }
    let tensor = load_model(&options("deepseek-v3-tiny", 1, false)).unwrap();
    let mut opts = options("deepseek-v3-tiny", 1, false);
    opts.attention_backend = AttentionBackend::Ember;
    let ember = load_model(&opts).unwrap();
    let want = run_adapted(&tensor, "deepseek-v3-tiny-mla", true);
    let diff = max_diff(&want, &run_adapted(&ember, "deepseek-v3-tiny-mla", true));
    assert!(diff < 1e-4, "adapted: max |Δ logprob| {diff}");
    let moved = max_diff(&want, &run_adapted(&ember, "deepseek-v3-tiny-mla", false));
    assert!(moved > 1e-3, "the adapter changed nothing ({moved})");
}

/// The fused MoE over FP8 checkpoints' experts held as stored (e4m3 bytes and block scales):
/// the grouped W8A16 GEMM (on the CPU the blocked kernel over the packed rows) gives the
/// logprobs of the same packed experts run one by one, holding the same bytes; fp32, 1e-4.
/// deepseek-v3-fp8-256-tiny has real 128 x 128 blocks with ragged edges, and 192 intermediate
/// channels: its up rows would start inside a scale block of the stacked gate/up rows, so its
/// experts run one by one (the real checkpoints' 768, 2048 and their TP shares stack). At TP 2
/// a rank's part off a block boundary is dequantized, and such a layer stacks dense or runs one
/// by one.
#[test]
fn the_fused_moe_over_fp8_experts_gives_their_logprobs_one_by_one() {
    check_fused_packed(&[
        ("deepseek-v3-fp8-tiny", true),
        ("deepseek-v3-fp8-ue8m0-tiny", true),
        ("deepseek-v3-fp8-256-tiny", false),
    ]);
}

/// The fused MoE over 4-bit experts held packed (integer with zero points, AWQ's float16
/// weights, NVFP4 and MXFP4 as e2m1): the grouped W4A16 GEMM (on the CPU the blocked kernel
/// over the packed rows) gives the logprobs of the same packed experts run one by one; fp32,
/// within 1e-4. GPTQ with activation
/// order gathers each expert's inputs in its own order, so those experts run one by one.
#[test]
fn the_fused_moe_over_four_bit_experts_gives_their_logprobs_one_by_one() {
    check_fused_packed(&[
        ("kimi-k2-int4-tiny", true),
        ("kimi-k2-awq-tiny", true),
        ("kimi-k2-nvfp4-tiny", true),
        ("kimi-k2-mxfp4-tiny", true),
        ("kimi-k2-gptq-tiny", false),
        ("kimi-k2-int4-actorder-tiny", false),
    ]);
}

/// Packed experts under the fused MoE against the same packed experts one by one, at TP 1 and
/// 2; `stacks`: whether the fused MoE runs at TP 1.
fn check_fused_packed(models: &[(&str, bool)]) {
    for &(name, stacks) in models {
        for tp in [1, 2] {
            let experts = load_model(&experts_options(name, tp, false)).unwrap();
            let fused = load_model(&fused_options(name, tp, false)).unwrap();
            assert_eq!(
                fused.rank_weight_bytes, experts.rank_weight_bytes,
                "{name} tp {tp}"
            );
            let calls = || fused.kernel_calls.get(Kernel::FusedMoe);
            let before = calls();
            for run in [run_steps, run_prefill] {
                let diff = max_diff(&logprobs(&run(&experts)), &logprobs(&run(&fused)));
                println!("{name} tp {tp}: fused packed MoE max |Δ logprob| {diff:.2e}");
                assert!(diff < 1e-4, "{name} tp {tp}: max |Δ logprob| {diff}");
            }
            if tp == 1 {
                assert_eq!(
                    calls() > before,
                    stacks,
                    "{name}: the fused MoE ran: {}",
                    !stacks
                );
            }
        }
    }
}

/// Online FP8 (`--quantization fp8`) held for the W8A16 kernels (the default: e4m3 bytes with
/// one scale block per output row) gives the logprobs of online FP8 dequantized per matmul
/// (`--packed-weights false`), with the same bytes held; and its MoE experts stack for the fused
/// MoE's grouped W8A16 GEMM. fp32, within 1e-4.
#[test]
fn online_fp8_held_for_the_w8a16_kernels_gives_the_dequantized_logprobs() {
    use ember_models::backends::MoeBackend;
    for name in ["qwen3-tiny", "qwen3-moe-tiny", "deepseek-v3-tiny"] {
        let mut opts = options(name, 1, false);
        opts.quantization = ember_core::QuantizationRequest::Fp8;
        opts.packed_weights = Some(false);
        let dequantized = load_model(&opts).unwrap();
        opts.packed_weights = None;
        opts.moe_backend = MoeBackend::Experts;
        let packed = load_model(&opts).unwrap();
        opts.moe_backend = MoeBackend::Fused;
        let fused = load_model(&opts).unwrap();
        assert_eq!(
            packed.rank_weight_bytes, dequantized.rank_weight_bytes,
            "{name}"
        );
        for run in [run_steps, run_prefill] {
            let want = logprobs(&run(&dequantized));
            let diff = max_diff(&want, &logprobs(&run(&packed)));
            assert!(diff < 1e-4, "{name} packed: max |Δ logprob| {diff}");
            let calls = || fused.kernel_calls.get(Kernel::FusedMoe);
            let before = calls();
            let diff = max_diff(&want, &logprobs(&run(&fused)));
            assert!(diff < 1e-4, "{name} fused: max |Δ logprob| {diff}");
            let moe = name != "qwen3-tiny";
            assert_eq!(calls() > before, moe, "{name}: the fused MoE ran: {}", !moe);
            println!("{name}: online FP8 held packed and fused within {diff:.2e}");
        }
    }
}

/// `--fp8-gemm w8a8` on the FP8 checkpoints held as stored, and on online FP8 (each row's scale
/// repeated over its 128-input blocks): every FP8 projection quantizes
/// its activations per token and 128-input group to e4m3 and runs the FP8 GEMM (its CPU
/// references here), through prefill, decode and chunks, at TP 1 and 2, holding the same bytes.
/// Each projection is exact against fake-quantized activations times the decoded weight (the unit
/// test in `quantized::packed`); here the whole model runs and moves from W8A16 by what e4m3
/// activations cost. That is large on these random tiny checkpoints: e4m3 keeps 3 mantissa bits
/// to bf16's 7, and running deepseek-v3-fp8-tiny in bf16 instead of f32 already moves the 40-token
/// prefill's likely logprobs by 0.08 on average and 3.7 at most (measured once); W8A8 moves them
/// by 0.34 to 0.78 on average and up to 13. The bounds, 1.0 on average and 20 at most over the
/// tokens W8A16 gives 1e-3 or more, catch a wrongly wired GEMM, and the logprobs must move (the
/// path ran).
#[test]
fn w8a8_fp8_gemm_stays_within_activation_rounding_of_w8a16() {
    const MAX: f32 = 20.0;
    const MEAN: f32 = 1.0;
    // (checkpoint, online FP8): the block-FP8 checkpoints, and online FP8 of a bf16 one.
    for (name, online) in [
        ("deepseek-v3-fp8-tiny", false),
        ("deepseek-v3-fp8-ue8m0-tiny", false),
        ("deepseek-v3-fp8-256-tiny", false),
        ("qwen3-moe-tiny", true),
    ] {
        for tp in [1, 2] {
            let mut opts = options(name, tp, false);
            if online {
                opts.quantization = ember_core::QuantizationRequest::Fp8;
            }
            let w8a16 = load_model(&opts).unwrap();
            opts.fp8_gemm = ember_models::backends::Fp8Gemm::W8a8;
            let w8a8 = load_model(&opts).unwrap();
            if !online {
                assert_eq!(
                    w8a8.rank_weight_bytes, w8a16.rank_weight_bytes,
                    "{name} tp {tp}"
                );
            }
            for run in [run_steps, run_prefill] {
                let (a, b) = (logprobs(&run(&w8a16)), logprobs(&run(&w8a8)));
                // Over the tokens W8A16 gives at least 1e-3 (the tail's logprobs are noise).
                let likely: Vec<f32> = a
                    .iter()
                    .zip(&b)
                    .flat_map(|(x, y)| {
                        x.iter()
                            .zip(y)
                            .filter(|(p, _)| **p > (1e-3f32).ln())
                            .map(|(p, q)| (p - q).abs())
                    })
                    .collect();
                let max = likely.iter().copied().fold(0f32, f32::max);
                let mean = likely.iter().sum::<f32>() / likely.len() as f32;
                let argmax = |r: &Vec<f32>| {
                    r.iter()
                        .enumerate()
                        .max_by(|x, y| x.1.total_cmp(y.1))
                        .map(|(i, _)| i)
                };
                let agree = a
                    .iter()
                    .zip(&b)
                    .filter(|(x, y)| argmax(x) == argmax(y))
                    .count();
                println!(
                    "{name} tp {tp}: W8A8 vs W8A16 over likely tokens max |Δ logprob| {max:.3e}, mean {mean:.3e}; top token agrees on {agree} of {} rows",
                    a.len()
                );
                assert!(
                    max < MAX && mean < MEAN,
                    "{name} tp {tp}: max {max}, mean {mean}"
                );
                assert!(max > 1e-4, "{name} tp {tp}: W8A8 changed nothing");
            }
        }
    }
}

/// The fused MoE under `--fp8-gemm w8a8`: FP8 experts stack with their W8A8 flag and run the
/// grouped W8A8 GEMM (its CPU reference here), quantizing each token's (then each entry's)
/// activations per 128-input group, as the experts one by one quantize the same rows: the same
/// logprobs within 1e-4, for the block-FP8 checkpoints and online FP8.
#[test]
fn the_fused_moe_under_w8a8_gives_the_experts_w8a8_logprobs() {
    use ember_models::backends::Fp8Gemm;
    use ember_models::backends::MoeBackend;
    for (name, online) in [
        ("deepseek-v3-fp8-tiny", false),
        ("deepseek-v3-fp8-ue8m0-tiny", false),
        ("qwen3-moe-tiny", true),
    ] {
        let mut opts = experts_options(name, 1, false);
        opts.fp8_gemm = Fp8Gemm::W8a8;
        if online {
            opts.quantization = ember_core::QuantizationRequest::Fp8;
        }
        let experts = load_model(&opts).unwrap();
        opts.moe_backend = MoeBackend::Fused;
        let fused = load_model(&opts).unwrap();
        opts.fp8_gemm = Fp8Gemm::W8a16;
        let fused_w8a16 = load_model(&opts).unwrap();
        let calls = || fused.kernel_calls.get(Kernel::FusedMoe);
        let before = calls();
        for run in [run_steps, run_prefill] {
            let want = logprobs(&run(&experts));
            let diff = max_diff(&want, &logprobs(&run(&fused)));
            println!("{name}: fused W8A8 MoE max |Δ logprob| {diff:.2e}");
            assert!(diff < 1e-4, "{name}: max |Δ logprob| {diff}");
            // And it is W8A8: W8A16 gives other logprobs.
            let moved = max_diff(&want, &logprobs(&run(&fused_w8a16)));
            assert!(moved > 1e-3, "{name}: W8A8 and W8A16 agree ({moved})");
        }
        assert!(calls() > before, "{name}: the fused MoE never ran");
    }
}
