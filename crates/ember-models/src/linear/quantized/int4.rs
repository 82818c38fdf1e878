//! 4-bit weights kept packed in memory and multiplied by ember's W4A16 kernel
//! (`kernels/w4a16.cu`, [`ember_kernels::w4a16`]): half a byte per parameter plus one
//! (scale, zero point) pair per group, instead of the model dtype's 2 or 4 bytes.
//!
//! Every 4-bit layout this loader reads repacks into the kernel's one layout (codes, groups of
//! consecutive inputs): compressed-tensors `pack-quantized` 4-bit, GPTQ 4-bit and AWQ as unsigned
//! integers with zero points; NVFP4 (compressed-tensors and ModelOpt) and MXFP4 as e2m1 codes
//! with their scales as stored, one byte per group (e4m3 with the global scale per row, or the
//! e8m0 power of two), computed exactly as their dequantizer does.
//! A weight whose groups are not runs of consecutive inputs (GPTQ's activation order, a permuted
//! `g_idx`) has its inputs reordered so that they are, and the layer gathers its input's columns
//! in that order before the kernel (as exllama does). On the CPU the op runs ember-kernels'
//! packed CPU GEMM, whose results are tested against the dequantizing loaders'.

use candle_core::{DType, Tensor};
use ember_core::{EmberError, Nvfp4Layout, Result, WeightQuantization};
use ember_kernels::w4a16::{self, W4Scales, W4a16Shape};

use super::packed::{computes_in, PackedLinear};
use super::{e4m3_bytes, f32s, i32s, packed_int, read_group_map, u8s};
use crate::loading::context::LoadContext;
use crate::loading::weights::{tensor_bytes, Weights};
use crate::parallel::Split;

/// A weight `[n, k]` as the W4A16 kernel reads it, on the host.
struct Int4Parts {
    /// Unsigned codes `[n, k]`, one per byte (packed when uploaded).
    codes: Vec<u8>,
    /// `[n, groups]` scales and zero points.
    scales: Vec<f32>,
    zeros: Vec<f32>,
    n: usize,
    k: usize,
    group_size: usize,
    /// The inputs in the order `codes` holds them (activation order), if not the identity.
    order: Option<Vec<u32>>,
    /// Each weight rounds to float16, as GPTQ's and AWQ's dequantization in their float16
    /// scales' dtype does (and so the dequantizing loader, see `in_scale_dtype`).
    f16_weights: bool,
    /// The codes are e2m1 (FP4) values; `zeros` are unused.
    e2m1: bool,
    /// FP4's scales as their checkpoint stores them, one byte per group, when held so.
    scale_bytes: Option<ScaleBytes>,
}

/// FP4 group scales in their stored byte: `[n, groups]` e4m3 or e8m0 codes and the weight's
/// global scale, combined as `kind` says.
struct ScaleBytes {
    bytes: Vec<u8>,
    global: f32,
    kind: W4Scales,
}

/// Rows `0..n` of a `[n, groups]` matrix, each cut to its groups `g0..g0 + gl`.
fn group_columns<T: Copy>(v: &[T], n: usize, groups: usize, g0: usize, gl: usize) -> Vec<T> {
    (0..n)
        .flat_map(|r| v[r * groups + g0..r * groups + g0 + gl].iter().copied())
        .collect()
}

impl Int4Parts {
    /// The codes with each row's inputs in `order`, so that groups are runs.
    fn in_order(mut self) -> Self {
        if let Some(order) = &self.order {
            let k = self.k;
            self.codes = self
                .codes
                .chunks_exact(k)
                .flat_map(|row| order.iter().map(|&c| row[c as usize]).collect::<Vec<u8>>())
                .collect();
        }
        self
    }

    fn groups(&self) -> usize {
        self.k / self.group_size
    }

    /// A tensor-parallel rank's part: [`Split::Columns`] takes rows of W (outputs),
    /// [`Split::Rows`] columns (inputs, whole groups in input order only); `None` when the part
    /// cannot be held packed.
    fn slice(self, split: Option<Split>) -> Option<Self> {
        let (n, k, groups) = (self.n, self.k, self.groups());
        match split {
            None => Some(self),
            Some(Split::Columns { start, len }) => Some(Self {
                codes: self.codes[start * k..(start + len) * k].to_vec(),
                scales: self.scales[start * groups..(start + len) * groups].to_vec(),
                zeros: self.zeros[start * groups..(start + len) * groups].to_vec(),
                scale_bytes: self.scale_bytes.map(|b| ScaleBytes {
                    bytes: b.bytes[start * groups..(start + len) * groups].to_vec(),
                    ..b
                }),
                n: len,
                ..self
            }),
            // A rank's inputs must be whole groups to keep their scales, in input order.
            Some(Split::Rows { start, len })
                if self.order.is_none()
                    && start.is_multiple_of(self.group_size)
                    && len.is_multiple_of(self.group_size) =>
            {
                let (g0, gl) = (start / self.group_size, len / self.group_size);
                Some(Self {
                    codes: (0..n)
                        .flat_map(|r| self.codes[r * k + start..r * k + start + len].to_vec())
                        .collect(),
                    scales: group_columns(&self.scales, n, groups, g0, gl),
                    zeros: group_columns(&self.zeros, n, groups, g0, gl),
                    scale_bytes: self.scale_bytes.map(|b| ScaleBytes {
                        bytes: group_columns(&b.bytes, n, groups, g0, gl),
                        ..b
                    }),
                    k: len,
                    ..self
                })
            }
            Some(Split::Rows { .. }) => None,
        }
    }
}

/// The 4-bit parts of `<prefix>.weight` `[out_dim, in_dim]` when the checkpoint stores it in a
/// 4-bit layout whose groups are runs of consecutive inputs; `None` otherwise.
fn int4_parts(
    weights: &Weights,
    ctx: &LoadContext,
    in_dim: usize,
    out_dim: usize,
) -> Result<Option<Int4Parts>> {
    let (n, k) = (out_dim, in_dim);
    if !k.is_multiple_of(2) {
        return Ok(None);
    }
    // Inputs sorted by group, when the map is not already runs of `size`; `Err` when the
    // groups are not all `size` inputs (no order makes them runs).
    let order =
        |map: &Option<Vec<i64>>, size: usize| -> std::result::Result<Option<Vec<u32>>, ()> {
            let Some(map) = map else { return Ok(None) };
            if map.iter().enumerate().all(|(i, &g)| g as usize == i / size) {
                return Ok(None);
            }
            let mut order: Vec<u32> = (0..k as u32).collect();
            order.sort_by_key(|&i| map[i as usize]);
            let runs = order
                .iter()
                .enumerate()
                .all(|(i, &c)| map[c as usize] as usize == i / size);
            if runs {
                Ok(Some(order))
            } else {
                Err(())
            }
        };
    let parts = match ctx.quantization {
        Some(WeightQuantization::PackedInt {
            num_bits: 4,
            group_size,
            symmetric,
        }) if weights.contains("weight_packed") => {
            let size = group_size.unwrap_or(k);
            if !size.is_multiple_of(2) || !k.is_multiple_of(size) {
                return Ok(None);
            }
            let groups = k / size;
            let map = match group_size {
                Some(_) => read_group_map(weights, "weight_g_idx", k, groups)?,
                None => None,
            };
            let Ok(order) = order(&map, size) else {
                return Ok(None);
            };
            // Stored values are offset by 8: w = v * s, or (v - z) * s with signed zeros.
            let packed = i32s(weights, "weight_packed", &[n, k.div_ceil(8)])?;
            let values = packed_int::unpack_rows(&packed, n, k, 4);
            let zeros = if symmetric {
                vec![8.0; n * groups]
            } else {
                let zp = i32s(weights, "weight_zero_point", &[n.div_ceil(8), groups])?;
                packed_int::unpack_columns(&zp, n, groups, 4)
                    .into_iter()
                    .map(|z| (z + 8) as f32)
                    .collect()
            };
            Int4Parts {
                codes: values.into_iter().map(|v| (v + 8) as u8).collect(),
                scales: f32s(weights, "weight_scale", &[n, groups], DType::F32)?,
                zeros,
                n,
                k,
                group_size: size,
                order,
                f16_weights: false,
                e2m1: false,
                scale_bytes: None,
            }
        }
        Some(WeightQuantization::Gptq {
            bits: 4,
            group_size,
            v1,
        }) if weights.contains("qweight") => {
            let size = group_size.unwrap_or(k);
            if !size.is_multiple_of(2) || !k.is_multiple_of(size) || !k.is_multiple_of(8) {
                return Ok(None);
            }
            let groups = k / size;
            let map = read_group_map(weights, "g_idx", k, groups)?;
            let Ok(order) = order(&map, size) else {
                return Ok(None);
            };
            let qweight = i32s(weights, "qweight", &[k / 8, n])?;
            let qzeros = i32s(weights, "qzeros", &[groups, n.div_ceil(8)])?;
            let (codes, zeros) = packed_int::gptq_codes(&qweight, &qzeros, [n, k], groups, 4, v1);
            Int4Parts {
                codes,
                scales: f32s(weights, "scales", &[groups, n], DType::F16)
                    .map(|s| transpose(&s, groups, n))?,
                zeros: transpose(&zeros, groups, n),
                n,
                k,
                group_size: size,
                order,
                f16_weights: weights.stored_dtype("scales") == Some(DType::F16),
                e2m1: false,
                scale_bytes: None,
            }
        }
        Some(WeightQuantization::Awq { group_size })
            if weights.contains("qweight")
                && n.is_multiple_of(8)
                && k.is_multiple_of(group_size)
                && group_size.is_multiple_of(2) =>
        {
            let groups = k / group_size;
            let qweight = i32s(weights, "qweight", &[k, n / 8])?;
            let qzeros = i32s(weights, "qzeros", &[groups, n / 8])?;
            let (codes, zeros) = packed_int::awq_codes(&qweight, &qzeros, [n, k], groups);
            Int4Parts {
                codes,
                scales: f32s(weights, "scales", &[groups, n], DType::F16)
                    .map(|s| transpose(&s, groups, n))?,
                zeros: transpose(&zeros, groups, n),
                n,
                k,
                group_size,
                order: None,
                f16_weights: weights.stored_dtype("scales") == Some(DType::F16),
                e2m1: false,
                scale_bytes: None,
            }
        }
        Some(WeightQuantization::Nvfp4(layout)) => {
            let (packed, global) = match layout {
                Nvfp4Layout::CompressedTensors => ("weight_packed", "weight_global_scale"),
                Nvfp4Layout::ModelOpt => ("weight", "weight_scale_2"),
            };
            if weights.stored_dtype(packed) != Some(DType::U8) || !k.is_multiple_of(16) {
                return Ok(None);
            }
            let global = f32s(weights, global, &[1], DType::F32)?[0];
            // As the dequantizer: compressed-tensors divides by its global scale, ModelOpt multiplies.
            let kind = match layout {
                Nvfp4Layout::CompressedTensors => W4Scales::E4m3Over,
                Nvfp4Layout::ModelOpt => W4Scales::E4m3Times,
            };
            let bytes = match weights.stored_dtype("weight_scale") {
                Some(DType::F8E4M3 | DType::U8) => {
                    e4m3_bytes(weights, "weight_scale", &[n, k / 16])?
                }
                // Scales stored in another dtype are held as f32 (exact for e4m3 values).
                _ => return fp4_f32_scales(weights, packed, global, kind, n, k),
            };
            let scale_bytes = ScaleBytes {
                bytes,
                global,
                kind,
            };
            fp4_parts(u8s(weights, packed, &[n, k / 2])?, scale_bytes, n, k, 16)
        }
        Some(WeightQuantization::Mxfp4)
            if weights.contains("weight_packed") && k.is_multiple_of(32) =>
        {
            let scale_bytes = ScaleBytes {
                bytes: u8s(weights, "weight_scale", &[n, k / 32])?,
                global: 1.0,
                kind: W4Scales::Ue8m0,
            };
            fp4_parts(
                u8s(weights, "weight_packed", &[n, k / 2])?,
                scale_bytes,
                n,
                k,
                32,
            )
        }
        _ => return Ok(None),
    };
    Ok(Some(parts.in_order()))
}

/// FP4 parts from e2m1 bytes `[n, k / 2]` (low nibble first) and one scale byte per group.
fn fp4_parts(
    bytes: Vec<u8>,
    scale_bytes: ScaleBytes,
    n: usize,
    k: usize,
    group_size: usize,
) -> Int4Parts {
    let scales: Vec<f32> = scale_bytes
        .bytes
        .iter()
        .map(|&b| scale_bytes.kind.value(b, scale_bytes.global))
        .collect();
    Int4Parts {
        codes: bytes.iter().flat_map(|b| [b & 15, b >> 4]).collect(),
        zeros: vec![0.0; scales.len()],
        scales,
        n,
        k,
        group_size,
        order: None,
        f16_weights: false,
        e2m1: true,
        scale_bytes: Some(scale_bytes),
    }
}

/// NVFP4 parts whose scales are not stored as e4m3 bytes: one f32 scale per group, combined
/// with the global scale as the dequantizer does.
fn fp4_f32_scales(
    weights: &Weights,
    packed: &str,
    global: f32,
    kind: W4Scales,
    n: usize,
    k: usize,
) -> Result<Option<Int4Parts>> {
    let scales = f32s(weights, "weight_scale", &[n, k / 16], DType::F8E4M3)?
        .into_iter()
        .map(|s| match kind {
            W4Scales::E4m3Over => s / global,
            _ => s * global,
        })
        .collect::<Vec<f32>>();
    Ok(Some(Int4Parts {
        codes: u8s(weights, packed, &[n, k / 2])?
            .iter()
            .flat_map(|b| [b & 15, b >> 4])
            .collect(),
        zeros: vec![0.0; scales.len()],
        scales,
        n,
        k,
        group_size: 16,
        order: None,
        f16_weights: false,
        e2m1: true,
        scale_bytes: None,
    }))
}

/// `[rows, cols]` row-major to `[cols, rows]`.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols)
        .flat_map(|c| (0..rows).map(move |r| v[r * cols + c]))
        .collect()
}

/// The rank's part `split` of `<prefix>.weight` held packed for the W4A16 kernel, when the
/// checkpoint stores it in a 4-bit layout the kernel reads and the model computes in f32 or
/// bf16; `None` to load it the usual way.
pub(crate) fn load(
    weights: &Weights,
    ctx: &LoadContext,
    in_dim: usize,
    out_dim: usize,
    split: Option<Split>,
    bias: Option<Tensor>,
) -> Result<Option<PackedLinear<W4a16Shape>>> {
    if !computes_in(weights.dtype()) {
        return Ok(None);
    }
    let Some(parts) = int4_parts(weights, ctx, in_dim, out_dim)?.and_then(|p| p.slice(split))
    else {
        return Ok(None);
    };
    let err = |e: candle_core::Error| {
        EmberError::Weights(format!(
            "cannot hold `{}.weight` as 4-bit: {e}",
            weights.prefix()
        ))
    };
    let mut packed = w4a16::pack_codes(&parts.codes, parts.k);
    // FP4 has no zero points, and a symmetric checkpoint's are all 8: the scales alone then.
    let zeros = !(parts.e2m1 || parts.zeros.iter().all(|&z| z == 8.0));
    let scales = parts.scale_bytes.as_ref().map_or(W4Scales::F32, |b| b.kind);
    let qparams: Vec<f32> = if let Some(b) = &parts.scale_bytes {
        // FP4 scale bytes after each row's codes, and the global scale per row.
        packed = w4a16::with_scale_bytes(&packed, &b.bytes, parts.n, parts.k);
        vec![b.global; parts.n]
    } else if zeros {
        parts
            .scales
            .iter()
            .zip(&parts.zeros)
            .flat_map(|(&s, &z)| [s, z])
            .collect()
    } else {
        parts.scales.clone()
    };
    let device = weights.device();
    let codes_len = packed.len();
    let codes = Tensor::from_vec(packed, codes_len, device).map_err(err)?;
    let qparams_len = qparams.len();
    let qparams = Tensor::from_vec(qparams, qparams_len, device).map_err(err)?;
    let order = match &parts.order {
        Some(order) => Some(Tensor::new(order.as_slice(), device).map_err(err)?),
        None => None,
    };
    weights.note_held(tensor_bytes(&codes) + tensor_bytes(&qparams));
    let shape = W4a16Shape {
        m: 0,
        n: parts.n,
        k: parts.k,
        group_size: parts.group_size,
        f16_weights: parts.f16_weights,
        e2m1: parts.e2m1,
        zeros,
        scales,
    };
    let layer = PackedLinear::new(codes, qparams, shape, bias, order, weights.dtype());
    Ok(Some(layer))
}
