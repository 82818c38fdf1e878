//! The dequantizing CPU references of the checkpoint weight formats: each turns a quantized
//! `<prefix>.weight` back into an f32 `[out, in]` matrix. They are the correctness oracle of
//! the packed kernels (GPU and CPU) and the path of `--packed-weights false` (the model then
//! holds the weight in the model dtype, 2 or 4 bytes a weight, and pays nothing per step to
//! decode it). By default the formats the packed kernels read are held as stored
//! ([`packed`], [`int4`], [`fp8_block`]).

pub mod fp4;
pub mod fp8;
pub mod fp8_block;
pub mod int4;
pub(crate) mod packed;
pub(crate) use packed::computes_in as packed_computes_in;
pub mod packed_int;

use candle_core::{DType, Device, Tensor};
use ember_core::{EmberError, Nvfp4Layout, Result, WeightQuantization};

use crate::loading::context::LoadContext;
use crate::loading::weights::Weights;

/// On a GPU, batches of at most this many rows multiply a packed weight with the GEMV kernels
/// (W4A16, W8A16), which read the weight once per 8 rows; larger ones (prefill) dequantize it on
/// the device and run a dense GEMM. Not yet tuned on a GPU. (The CPU's packed GEMM picks its
/// own path by row count.)
pub(crate) const GEMV_MAX_ROWS: usize = 16;

/// Dequantizes `<prefix>.weight` `[out_dim, in_dim]` to f32 on the CPU when the checkpoint
/// stores it quantized; `None` when it is stored plain (an ignored module: embeddings, router,
/// or whatever the checkpoint's ignore list kept in 16 bits).
pub fn dequantize_weight(
    weights: &Weights,
    ctx: &LoadContext,
    in_dim: usize,
    out_dim: usize,
) -> Result<Option<Tensor>> {
    let Some(scheme) = ctx.quantization else {
        return Ok(None);
    };
    let w = match scheme {
        WeightQuantization::Fp8Block(block) => {
            if weights.stored_dtype("weight") != Some(DType::F8E4M3)
                || !weights.contains("weight_scale_inv")
            {
                return Ok(None);
            }
            let (rows, cols) = (out_dim.div_ceil(block[0]), in_dim.div_ceil(block[1]));
            let weight = weights.read_as("weight", (out_dim, in_dim), DType::F32)?;
            let scale = weights.read_as("weight_scale_inv", (rows, cols), DType::F32)?;
            fp8::dequantize_fp8_blocks(&weight, &scale, block)
                .map_err(|e| dequant_err(weights, e))?
        }
        WeightQuantization::PackedInt {
            num_bits,
            group_size,
            symmetric,
        } => {
            if !weights.contains("weight_packed") {
                return Ok(None);
            }
            packed_int_weight(weights, [out_dim, in_dim], num_bits, group_size, symmetric)?
        }
        WeightQuantization::Nvfp4(layout) => {
            let (packed, global) = match layout {
                Nvfp4Layout::CompressedTensors => ("weight_packed", "weight_global_scale"),
                Nvfp4Layout::ModelOpt => ("weight", "weight_scale_2"),
            };
            if weights.stored_dtype(packed) != Some(DType::U8) {
                return Ok(None);
            }
            let codes = u8s(weights, packed, &[out_dim, in_dim / 2])?;
            let scale = f32s(
                weights,
                "weight_scale",
                &[out_dim, in_dim / 16],
                DType::F8E4M3,
            )?;
            let global = f32s(weights, global, &[1], DType::F32)?[0];
            // compressed-tensors stores the global scale inverted and divides; ModelOpt multiplies.
            let block_scale: Vec<f32> = match layout {
                Nvfp4Layout::CompressedTensors => scale.iter().map(|s| s / global).collect(),
                Nvfp4Layout::ModelOpt => scale.iter().map(|s| s * global).collect(),
            };
            let values = fp4::unpack_e2m1(&codes);
            from_vec(
                fp4::scale_groups(&values, &block_scale, in_dim, 16),
                [out_dim, in_dim],
            )?
        }
        WeightQuantization::Gptq {
            bits,
            group_size,
            v1,
        } => {
            if !weights.contains("qweight") {
                return Ok(None);
            }
            gptq_weight(weights, [out_dim, in_dim], bits, group_size, v1)?
        }
        WeightQuantization::Awq { group_size } => {
            if !weights.contains("qweight") {
                return Ok(None);
            }
            if !out_dim.is_multiple_of(8) || !in_dim.is_multiple_of(group_size) {
                return Err(EmberError::Weights(format!(
                    "{}: AWQ needs outputs in multiples of 8 and inputs in multiples of group_size {group_size}, got [{out_dim}, {in_dim}]",
                    weights.prefix()
                )));
            }
            let groups = in_dim / group_size;
            let qweight = i32s(weights, "qweight", &[in_dim, out_dim / 8])?;
            let qzeros = i32s(weights, "qzeros", &[groups, out_dim / 8])?;
            let scales = f32s(weights, "scales", &[groups, out_dim], DType::F16)?;
            let w = packed_int::dequantize_awq(
                &qweight,
                &qzeros,
                &scales,
                [out_dim, in_dim],
                group_size,
            );
            in_scale_dtype(weights, from_vec(w, [out_dim, in_dim])?)?
        }
        WeightQuantization::Mxfp4 => {
            if !weights.contains("weight_packed") {
                return Ok(None);
            }
            let codes = u8s(weights, "weight_packed", &[out_dim, in_dim / 2])?;
            let exps = u8s(weights, "weight_scale", &[out_dim, in_dim / 32])?;
            let block_scale: Vec<f32> = exps.into_iter().map(fp4::e8m0).collect();
            let values = fp4::unpack_e2m1(&codes);
            from_vec(
                fp4::scale_groups(&values, &block_scale, in_dim, 32),
                [out_dim, in_dim],
            )?
        }
    };
    Ok(Some(w))
}

fn packed_int_weight(
    weights: &Weights,
    [rows, cols]: [usize; 2],
    num_bits: u32,
    group_size: Option<usize>,
    symmetric: bool,
) -> Result<Tensor> {
    let words = (cols * num_bits as usize).div_ceil(32);
    let packed = i32s(weights, "weight_packed", &[rows, words])?;
    if weights.contains("weight_shape") {
        let shape = stored(weights, "weight_shape", &[2])?
            .to_dtype(DType::I64)
            .and_then(|t| t.to_vec1::<i64>())
            .map_err(|e| dequant_err(weights, e))?;
        if shape != [rows as i64, cols as i64] {
            return Err(EmberError::Weights(format!(
                "{}.weight_shape is {shape:?}, expected [{rows}, {cols}]",
                weights.prefix()
            )));
        }
    }
    let groups = group_size.map_or(1, |g| cols.div_ceil(g));
    let scale = f32s(weights, "weight_scale", &[rows, groups], DType::F32)?;
    let q = packed_int::unpack_rows(&packed, rows, cols, num_bits);
    let zero = if symmetric {
        None
    } else {
        let zp_words = (rows * num_bits as usize).div_ceil(32);
        let zp = i32s(weights, "weight_zero_point", &[zp_words, groups])?;
        Some(packed_int::unpack_columns(&zp, rows, groups, num_bits))
    };
    // GPTQ's activation order (compressed-tensors `actorder: group`): `weight_g_idx[c]` is column
    // c's group; otherwise groups are runs of `group_size` columns.
    let g_idx = match group_size {
        Some(_) => read_group_map(weights, "weight_g_idx", cols, groups)?,
        None => None,
    };
    let group_of = |c: usize| group_of(g_idx.as_deref(), group_size, c);
    let w =
        packed_int::dequantize_groups(&q, &scale, zero.as_deref(), [rows, cols], groups, group_of);
    from_vec(w, [rows, cols])
}

fn gptq_weight(
    weights: &Weights,
    [out, inputs]: [usize; 2],
    bits: u32,
    group_size: Option<usize>,
    v1: bool,
) -> Result<Tensor> {
    let per_word = (32 / bits) as usize;
    if !inputs.is_multiple_of(per_word) {
        return Err(EmberError::Weights(format!(
            "{}: GPTQ packs {per_word} inputs to a word, and {inputs} inputs do not divide",
            weights.prefix()
        )));
    }
    let groups = group_size.map_or(1, |g| inputs.div_ceil(g));
    let qweight = i32s(weights, "qweight", &[inputs / per_word, out])?;
    let qzeros = i32s(weights, "qzeros", &[groups, out.div_ceil(per_word)])?;
    let scales = f32s(weights, "scales", &[groups, out], DType::F16)?;
    // `g_idx` maps each input to its group; activation order (desc_act) permutes it. A
    // checkpoint without it has groups of consecutive inputs.
    let g_idx = read_group_map(weights, "g_idx", inputs, groups)?;
    let group_of = |i: usize| group_of(g_idx.as_deref(), group_size, i);
    let w = packed_int::dequantize_gptq(
        &qweight,
        &qzeros,
        &scales,
        [out, inputs],
        bits,
        v1,
        group_of,
    );
    in_scale_dtype(weights, from_vec(w, [out, inputs])?)
}

/// Each input's group from `name` (`[inputs]`: GPTQ's activation order), if the checkpoint
/// stores one, checked to name only the weight's `groups`.
pub(super) fn read_group_map(
    weights: &Weights,
    name: &str,
    inputs: usize,
    groups: usize,
) -> Result<Option<Vec<i64>>> {
    if weights.stored_dtype(name).is_none() {
        return Ok(None);
    }
    let map = stored(weights, name, &[inputs])?
        .to_dtype(DType::I64)
        .and_then(|t| t.to_vec1::<i64>())
        .map_err(|e| dequant_err(weights, e))?;
    if let Some(bad) = map.iter().find(|&&g| g < 0 || g as usize >= groups) {
        return Err(EmberError::Weights(format!(
            "{}.{name} names group {bad}, outside the weight's {groups} groups",
            weights.prefix()
        )));
    }
    Ok(Some(map))
}

/// Input `i`'s group: from the stored map, else runs of `group_size` (one group without).
pub(super) fn group_of(map: Option<&[i64]>, group_size: Option<usize>, i: usize) -> usize {
    match (map, group_size) {
        (Some(map), _) => map[i] as usize,
        (None, size) => size.map_or(0, |size| i / size),
    }
}

/// `w` rounded to the dtype of the checkpoint's `scales` (float16 as GPTQ and AWQ write them) and
/// back: their kernels and their tools dequantize in that dtype, so the weight the model holds
/// is theirs bit for bit rather than the exact product.
fn in_scale_dtype(weights: &Weights, w: Tensor) -> Result<Tensor> {
    match weights.stored_dtype("scales") {
        Some(dtype) if dtype != DType::F32 => w
            .to_dtype(dtype)
            .and_then(|w| w.to_dtype(DType::F32))
            .map_err(|e| dequant_err(weights, e)),
        _ => Ok(w),
    }
}

fn dequant_err(weights: &Weights, e: candle_core::Error) -> EmberError {
    EmberError::Weights(format!(
        "cannot dequantize `{}.weight`: {e}",
        weights.prefix()
    ))
}

fn from_vec(values: Vec<f32>, shape: [usize; 2]) -> Result<Tensor> {
    Tensor::from_vec(values, (shape[0], shape[1]), &Device::Cpu)
        .map_err(|e| EmberError::Tensor(e.to_string()))
}

/// Tensor `name` as stored, checked to hold `dims` (a scalar passes for `[1]`).
fn stored(weights: &Weights, name: &str, dims: &[usize]) -> Result<Tensor> {
    let t = weights.get_stored(name)?;
    let ok = t.dims() == dims || (dims == [1] && t.elem_count() == 1);
    if !ok {
        return Err(EmberError::Weights(format!(
            "tensor `{}.{name}` has shape {:?}, expected {dims:?}",
            weights.prefix(),
            t.dims()
        )));
    }
    Ok(t)
}

pub(super) fn i32s(weights: &Weights, name: &str, dims: &[usize]) -> Result<Vec<i32>> {
    typed(weights, name, dims, DType::I32)?
        .flatten_all()
        .and_then(|t| t.to_vec1::<i32>())
        .map_err(|e| dequant_err(weights, e))
}

pub(super) fn u8s(weights: &Weights, name: &str, dims: &[usize]) -> Result<Vec<u8>> {
    typed(weights, name, dims, DType::U8)?
        .flatten_all()
        .and_then(|t| t.to_vec1::<u8>())
        .map_err(|e| dequant_err(weights, e))
}

/// The bytes of a float8 e4m3 tensor (or of one stored as raw bytes), as stored.
pub(super) fn e4m3_bytes(weights: &Weights, name: &str, dims: &[usize]) -> Result<Vec<u8>> {
    let t = stored(weights, name, dims)?;
    match t.dtype() {
        DType::U8 => u8s(weights, name, dims),
        DType::F8E4M3 => t
            .flatten_all()
            .and_then(|t| t.to_vec1::<float8::F8E4M3>())
            .map(|v| v.into_iter().map(|x| x.to_bits()).collect())
            .map_err(|e| dequant_err(weights, e)),
        other => Err(EmberError::Weights(format!(
            "tensor `{}.{name}` is {other:?}, expected float8 e4m3",
            weights.prefix()
        ))),
    }
}

/// A float tensor as f32; `expected` is only checked when it is float8 (a 16- or 32-bit scale
/// converts exactly either way).
pub(super) fn f32s(
    weights: &Weights,
    name: &str,
    dims: &[usize],
    expected: DType,
) -> Result<Vec<f32>> {
    let t = if expected == DType::F8E4M3 {
        typed(weights, name, dims, expected)?
    } else {
        stored(weights, name, dims)?
    };
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| dequant_err(weights, e))
}

fn typed(weights: &Weights, name: &str, dims: &[usize], dtype: DType) -> Result<Tensor> {
    let t = stored(weights, name, dims)?;
    if t.dtype() != dtype {
        return Err(EmberError::Weights(format!(
            "tensor `{}.{name}` is {:?}, expected {dtype:?}",
            weights.prefix(),
            t.dtype()
        )));
    }
    Ok(t)
}
