//! Bit-exact dequantization against the makers' own tools: `models/quantized-tensors/` holds
//! random weights quantized and packed by compressed-tensors (pack-quantized INT4/INT8, NVFP4,
//! MXFP4) and NVIDIA ModelOpt (NVFP4), with the tools' unpacked values and dequantized weights
//! (`models/make_quantized_tensors.py`), and torch's own float8_e4m3fn rounding of online FP8
//! (`models/make_fp8_channel_tensors.py`). Ours must equal theirs bit for bit, in their dtype.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ember_core::quantization::parse_quantization_config;
use ember_core::WeightQuantization;
use ember_models::linear::quantized::{dequantize_weight, fp4, fp8, packed_int};
use ember_models::loading::context::LoadContext;
use ember_models::loading::weights::Weights;

fn fixture(scheme: &str) -> (Weights, WeightQuantization) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/quantized-tensors");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{scheme}.json"))).unwrap())
            .unwrap();
    let q = parse_quantization_config(Some(&meta["quantization_config"]))
        .unwrap()
        .unwrap();
    let file = dir.join(format!("{scheme}.safetensors"));
    let weights = Weights::from_safetensors(&[file], DType::F32, &Device::Cpu).unwrap();
    (weights, q)
}

/// Layers loaded from a checkpoint stored in `q`.
fn stored_in(q: WeightQuantization) -> LoadContext {
    LoadContext {
        quantization: Some(q),
        ..LoadContext::default()
    }
}

fn floats(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Checks every `layer{i}` of `scheme`: unpacked codes, then the dequantized weight.
fn check(scheme: &str, expect: WeightQuantization, layers: usize) {
    let (weights, q) = fixture(scheme);
    assert_eq!(q, expect, "{scheme}");
    for i in 0..layers {
        let layer = weights.pp(format!("layer{i}"));
        let unpacked = layer.get_stored("unpacked").unwrap();
        let (rows, cols) = unpacked.dims2().unwrap();
        let want_codes = floats(&unpacked);
        let ours_codes: Vec<f32> = match q {
            WeightQuantization::PackedInt { num_bits, .. } => {
                let packed = layer.get_stored("weight_packed").unwrap();
                let packed: Vec<i32> = packed.flatten_all().unwrap().to_vec1().unwrap();
                packed_int::unpack_rows(&packed, rows, cols, num_bits)
                    .into_iter()
                    .map(|v| v as f32)
                    .collect()
            }
            _ => {
                let name = if layer.contains("weight_packed") {
                    "weight_packed"
                } else {
                    "weight"
                };
                let packed = layer.get_stored(name).unwrap();
                fp4::unpack_e2m1(&packed.flatten_all().unwrap().to_vec1::<u8>().unwrap())
            }
        };
        assert_eq!(ours_codes, want_codes, "{scheme} layer{i} unpacked");

        // The tool's dtype: bf16 for compressed-tensors (it dequantizes in the scale's dtype),
        // f32 for ModelOpt. Our f32 rounded to it must be the same bits, but for the sign of
        // zero: e2m1 code 8 is -0 to compressed-tensors and +0 in ModelOpt's table.
        assert_dequantized_as_the_tool(&layer, &stored_in(q), &format!("{scheme} layer{i}"), true);
    }
}

#[test]
fn compressed_tensors_int4_group32_symmetric_as_kimi_k2_thinking_ships() {
    let q = WeightQuantization::PackedInt {
        num_bits: 4,
        group_size: Some(32),
        symmetric: true,
    };
    check("int4-group32-symmetric", q, 3);
}

#[test]
fn compressed_tensors_int4_group128_with_zero_points() {
    let q = WeightQuantization::PackedInt {
        num_bits: 4,
        group_size: Some(128),
        symmetric: false,
    };
    check("int4-group128-asymmetric", q, 2);
}

#[test]
fn compressed_tensors_int4_with_gptq_activation_order() {
    // `actorder: group`: weight_g_idx maps each input column to its group (compressed-tensors
    // 0.12.2, the last versions that wrote it); contiguous groups would be 0.2-0.3 off.
    let q = WeightQuantization::PackedInt {
        num_bits: 4,
        group_size: Some(32),
        symmetric: true,
    };
    check("int4-group32-actorder", q, 2);
}

#[test]
fn compressed_tensors_int8_per_channel() {
    let q = WeightQuantization::PackedInt {
        num_bits: 8,
        group_size: None,
        symmetric: true,
    };
    check("int8-channel-symmetric", q, 2);
}

#[test]
fn compressed_tensors_nvfp4() {
    let q = WeightQuantization::Nvfp4(ember_core::Nvfp4Layout::CompressedTensors);
    check("nvfp4-compressed-tensors", q, 2);
}

#[test]
fn compressed_tensors_mxfp4() {
    check("mxfp4-compressed-tensors", WeightQuantization::Mxfp4, 2);
}

#[test]
fn modelopt_nvfp4() {
    let q = WeightQuantization::Nvfp4(ember_core::Nvfp4Layout::ModelOpt);
    check("nvfp4-modelopt", q, 2);
}

#[test]
fn a_misshaped_scale_is_named() {
    let (weights, q) = fixture("int4-group32-symmetric");
    // layer0 is [24, 64]: claiming 128 inputs makes the packed words and the scale disagree.
    let err = dequantize_weight(&weights.pp("layer0"), &stored_in(q), 128, 24)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer0.weight_packed") && err.contains("[24, 8]") && err.contains("[24, 16]"),
        "{err}"
    );
}

/// f32 bits of a tensor, zero's sign kept (torch and we must agree on it too).
fn bits(t: &Tensor) -> Vec<u32> {
    floats(t).into_iter().map(f32::to_bits).collect()
}

#[test]
fn online_fp8_per_channel_quantization_rounds_as_torch_float8_e4m3fn() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/quantized-tensors");
    let file = dir.join("fp8-channel.safetensors");
    let weights = Weights::from_safetensors(&[file], DType::F32, &Device::Cpu).unwrap();
    for i in 0..3 {
        let layer = weights.pp(format!("layer{i}"));
        let w = layer.get_stored("weight").unwrap();
        assert_eq!(w.dtype(), DType::BF16);
        let (q, scale) = fp8::quantize_per_channel(&w).unwrap();
        assert_eq!(q.dtype(), DType::F8E4M3);
        let want_q = layer.get_stored("qweight").unwrap();
        assert_eq!(want_q.dtype(), DType::F8E4M3);
        assert_eq!(
            bits(&scale),
            bits(&layer.get_stored("weight_scale").unwrap()),
            "layer{i} scales"
        );
        let (ours, theirs) = (bits(&q), bits(&want_q));
        let differing = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing,
            0,
            "layer{i}: {differing} of {} e4m3 codes differ",
            ours.len()
        );
        let deq = fp8::dequantize_per_channel(&q, &scale).unwrap();
        assert_eq!(
            bits(&deq),
            bits(&layer.get_stored("dequantized").unwrap()),
            "layer{i} dequantized"
        );
        // The fixture exercises subnormal codes and the ±448 bound, not only normal values.
        let codes = floats(&want_q);
        assert!(
            codes.iter().any(|v| v.abs() == 448.0),
            "layer{i} never saturates"
        );
        assert!(
            codes.iter().any(|v| *v != 0.0 && v.abs() < 2f32.powi(-6)),
            "layer{i} has no subnormal"
        );
    }
}

/// `layer`'s weight dequantized by us, rounded to the dtype of the tool's `dequantized`, has the
/// tool's bits (a zero of either sign matching either when `any_zero_sign`).
fn assert_dequantized_as_the_tool(
    layer: &Weights,
    ctx: &LoadContext,
    what: &str,
    any_zero_sign: bool,
) {
    let want = layer.get_stored("dequantized").unwrap();
    let (rows, cols) = want.dims2().unwrap();
    let ours = dequantize_weight(layer, ctx, cols, rows)
        .unwrap()
        .unwrap_or_else(|| panic!("{what} not seen as quantized"));
    let ours = floats(&ours.to_dtype(want.dtype()).unwrap());
    let want = floats(&want);
    let zero_either_sign = |a: f32, b: f32| any_zero_sign && a == 0.0 && b == 0.0;
    let differing = ours
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.to_bits() != b.to_bits() && !zero_either_sign(**a, **b))
        .count();
    assert_eq!(differing, 0, "{what}: {differing} of {} differ", want.len());
    assert!(want.iter().any(|v| *v != 0.0), "{what} is all zero");
}

/// Checks every `layer{i}` of a GPTQ or AWQ `scheme` (`models/make_gptq_awq_tensors.py`: packed
/// by GPTQModel 7.7.0 / AutoAWQ 0.2.9, dequantized by them in float16): ours rounded to float16
/// must be their bits.
fn check_dequantized(scheme: &str, expect: WeightQuantization, layers: usize) {
    let (weights, q) = fixture(scheme);
    assert_eq!(q, expect, "{scheme}");
    for i in 0..layers {
        let layer = weights.pp(format!("layer{i}"));
        assert_dequantized_as_the_tool(&layer, &stored_in(q), &format!("{scheme} layer{i}"), false);
    }
}

#[test]
fn gptq_int4_group32_symmetric_v1_as_most_gptq_checkpoints_ship() {
    let q = WeightQuantization::Gptq {
        bits: 4,
        group_size: Some(32),
        v1: true,
    };
    check_dequantized("gptq-int4-group32-symmetric", q, 2);
}

#[test]
fn gptq_int4_asymmetric_with_activation_order_and_v1_borrows() {
    // Zero points of 0 and 15 included: v1 stores them less one word-wise, with a borrow.
    let q = WeightQuantization::Gptq {
        bits: 4,
        group_size: Some(32),
        v1: true,
    };
    check_dequantized("gptq-int4-group32-asymmetric-actorder", q, 2);
}

#[test]
fn gptq_int8_per_channel_v2_and_int2() {
    let q = WeightQuantization::Gptq {
        bits: 8,
        group_size: None,
        v1: false,
    };
    check_dequantized("gptq-int8-channel-v2", q, 2);
    let q = WeightQuantization::Gptq {
        bits: 2,
        group_size: Some(16),
        v1: true,
    };
    check_dequantized("gptq-int2-group16-v1", q, 1);
}

#[test]
fn awq_int4_gemm_group32() {
    check_dequantized(
        "awq-int4-group32",
        WeightQuantization::Awq { group_size: 32 },
        2,
    );
}
