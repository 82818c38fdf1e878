//! compressed-tensors `pack-quantized` integers (W4A16 / W8A16, as Kimi K2 Thinking ships its
//! experts): `num_bits`-bit values packed densely into int32 words, element `i` of a row at bit
//! `i * num_bits` of the row's little-endian bit stream, stored offset by `2^(num_bits-1)`.
//! Also GPTQ's and AWQ's own layouts ([`dequantize_gptq`], [`dequantize_awq`]): unsigned
//! fields, `32 / bits` to a word, with explicit zero points.

/// Unpacks `count` signed values from a bit stream whose `k`-th 32-bit word is `word(k)`.
fn unpack_stream(word: impl Fn(usize) -> u32, count: usize, num_bits: u32) -> Vec<i32> {
    let bits = num_bits as usize;
    let mask = (1u64 << bits) - 1;
    let offset = 1i32 << (bits - 1);
    (0..count)
        .map(|i| {
            let (w, shift) = (i * bits / 32, i * bits % 32);
            // Two words, so that a value straddling a word boundary (3, 5, 6, 7 bits) is whole.
            let pair = word(w) as u64
                | if shift + bits > 32 {
                    (word(w + 1) as u64) << 32
                } else {
                    0
                };
            ((pair >> shift) & mask) as i32 - offset
        })
        .collect()
}

/// Unpacks `[rows, words]` int32 `packed` into `[rows, cols]` signed values (packed along rows,
/// compressed-tensors' `packed_dim=1`, the weight's layout).
pub fn unpack_rows(packed: &[i32], rows: usize, cols: usize, num_bits: u32) -> Vec<i32> {
    let words = packed.len() / rows.max(1);
    (0..rows)
        .flat_map(|r| {
            let row = &packed[r * words..(r + 1) * words];
            unpack_stream(|k| row[k] as u32, cols, num_bits)
        })
        .collect()
}

/// Unpacks `[words, cols]` int32 `packed` into `[rows, cols]` signed values packed down each
/// column (`packed_dim=0`, the layout of asymmetric zero points).
pub fn unpack_columns(packed: &[i32], rows: usize, cols: usize, num_bits: u32) -> Vec<i32> {
    let mut out = vec![0; rows * cols];
    for c in 0..cols {
        for (r, v) in unpack_stream(|k| packed[k * cols + c] as u32, rows, num_bits)
            .into_iter()
            .enumerate()
        {
            out[r * cols + c] = v;
        }
    }
    out
}

/// `(q[r, c] - zero[r, g]) * scale[r, g]` in f32 with `g = group_of(c)`; exact, since the
/// integers and a 16-bit scale multiply without rounding (compressed-tensors computes in the
/// scale's dtype, which rounding this f32 result to that dtype reproduces bit for bit).
pub fn dequantize_groups(
    q: &[i32],
    scale: &[f32],
    zero: Option<&[i32]>,
    [rows, cols]: [usize; 2],
    groups: usize,
    group_of: impl Fn(usize) -> usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let g = r * groups + group_of(c);
            let z = zero.map_or(0, |z| z[g]);
            out.push((q[r * cols + c] - z) as f32 * scale[g]);
        }
    }
    out
}

/// The field `k` of a word holding `32 / bits` unsigned `bits`-bit fields, lowest first.
fn field(word: i32, k: usize, bits: u32) -> i32 {
    ((word as u32 >> (k as u32 * bits)) & ((1u32 << bits) - 1)) as i32
}

/// GPTQ's unsigned codes `[out, in]` and zero points `[groups, out]` from `qweight`
/// `[in * bits / 32, out]` (packed down the input dimension) and `qzeros`
/// `[groups, out * bits / 32]`.
///
/// `v1` (`checkpoint_format: gptq`) zero words hold each zero less one, subtracted word-wise
/// when GPTQModel saves them; adding one to every field word-wise, as GPTQModel's loader does,
/// gives the zeros back exactly, borrows included (a zero of 0 is stored as 15 with a borrow).
pub fn gptq_codes(
    qweight: &[i32],
    qzeros: &[i32],
    [out, inputs]: [usize; 2],
    groups: usize,
    bits: u32,
    v1: bool,
) -> (Vec<u8>, Vec<f32>) {
    let per_word = (32 / bits) as usize;
    let zero_words = out.div_ceil(per_word);
    let ones = (0..per_word).fold(0u32, |w, k| w | 1 << (k as u32 * bits));
    let mut zeros = Vec::with_capacity(groups * out);
    for g in 0..groups {
        for o in 0..out {
            let word = qzeros[g * zero_words + o / per_word];
            let word = if v1 {
                (word as u32).wrapping_add(ones) as i32
            } else {
                word
            };
            zeros.push(field(word, o % per_word, bits) as f32);
        }
    }
    let mut codes = vec![0u8; out * inputs];
    for i in 0..inputs {
        let row = &qweight[(i / per_word) * out..(i / per_word + 1) * out];
        for o in 0..out {
            codes[o * inputs + i] = field(row[o], i % per_word, bits) as u8;
        }
    }
    (codes, zeros)
}

/// GPTQ's weight `[out, in]`: `w[o, i] = scales[g, o] * (q[i, o] - zero[g, o])` with
/// `g = group_of(i)`, from [`gptq_codes`]' inputs and `scales` `[groups, out]`.
#[allow(clippy::too_many_arguments)]
pub fn dequantize_gptq(
    qweight: &[i32],
    qzeros: &[i32],
    scales: &[f32],
    [out, inputs]: [usize; 2],
    bits: u32,
    v1: bool,
    group_of: impl Fn(usize) -> usize,
) -> Vec<f32> {
    let groups = scales.len() / out.max(1);
    let (codes, zeros) = gptq_codes(qweight, qzeros, [out, inputs], groups, bits, v1);
    dequantize_codes(&codes, &zeros, scales, [out, inputs], group_of)
}

/// `w[o, i] = (codes[o, i] - zeros[g, o]) * scales[g, o]` with `g = group_of(i)`.
fn dequantize_codes(
    codes: &[u8],
    zeros: &[f32],
    scales: &[f32],
    [out, inputs]: [usize; 2],
    group_of: impl Fn(usize) -> usize,
) -> Vec<f32> {
    let mut w = vec![0f32; out * inputs];
    for i in 0..inputs {
        let g = group_of(i);
        for o in 0..out {
            let q = f32::from(codes[o * inputs + i]);
            w[o * inputs + i] = (q - zeros[g * out + o]) * scales[g * out + o];
        }
    }
    w
}

/// Where AWQ's packing puts output column `8c + k` of a word: field `AWQ_FIELD[k]` (AutoAWQ
/// packs field `f` from column `[0, 2, 4, 6, 1, 3, 5, 7][f]`).
const AWQ_FIELD: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// AWQ's (GEMM) 4-bit codes `[out, in]` and zero points `[groups, out]` from `qweight`
/// `[in, out / 8]` and `qzeros` `[groups, out / 8]`, both packed along the output dimension in
/// AWQ's order.
pub fn awq_codes(
    qweight: &[i32],
    qzeros: &[i32],
    [out, inputs]: [usize; 2],
    groups: usize,
) -> (Vec<u8>, Vec<f32>) {
    let words = out / 8;
    let unpack = |row: &[i32], o: usize| field(row[o / 8], AWQ_FIELD[o % 8], 4);
    let zeros = (0..groups * out)
        .map(|i| unpack(&qzeros[(i / out) * words..(i / out + 1) * words], i % out) as f32)
        .collect();
    let mut codes = vec![0u8; out * inputs];
    for i in 0..inputs {
        let row = &qweight[i * words..(i + 1) * words];
        for o in 0..out {
            codes[o * inputs + i] = unpack(row, o) as u8;
        }
    }
    (codes, zeros)
}

/// AWQ's weight `[out, in]`:
/// `w[o, i] = (q[i, o] - zero[i / group_size, o]) * scales[i / group_size, o]`.
pub fn dequantize_awq(
    qweight: &[i32],
    qzeros: &[i32],
    scales: &[f32],
    [out, inputs]: [usize; 2],
    group_size: usize,
) -> Vec<f32> {
    let groups = inputs / group_size;
    let (codes, zeros) = awq_codes(qweight, qzeros, [out, inputs], groups);
    dequantize_codes(&codes, &zeros, scales, [out, inputs], |i| i / group_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_bit_values_fill_each_word_from_the_low_nibble() {
        // Stored nibbles 0..15 (= values -8..7) in two words; the last word holds 2 of 8.
        let word = |nibbles: &[u32]| {
            nibbles
                .iter()
                .enumerate()
                .fold(0u32, |w, (i, n)| w | n << (4 * i)) as i32
        };
        let packed = [word(&[0, 1, 2, 3, 4, 5, 6, 7]), word(&[15, 8])];
        assert_eq!(
            unpack_rows(&packed, 1, 10, 4),
            vec![-8, -7, -6, -5, -4, -3, -2, -1, 7, 0]
        );
    }

    #[test]
    fn three_bit_values_straddle_word_boundaries() {
        // 11 values of 3 bits = 33 bits: value 10 has bits 30..33, two in word 0, one in word 1.
        let values: Vec<u64> = (0..11).map(|i| (i * 3 + 1) % 8).collect();
        let stream = values
            .iter()
            .enumerate()
            .fold(0u64, |s, (i, v)| s | v << (3 * i));
        let packed = [stream as u32 as i32, (stream >> 32) as u32 as i32];
        let want: Vec<i32> = values.iter().map(|v| *v as i32 - 4).collect();
        assert_eq!(unpack_rows(&packed, 1, 11, 3), want);
    }

    #[test]
    fn gptq_v1_zeros_carry_their_borrow_back() {
        // One input row of 8 outputs, 4-bit: q = 9 everywhere, scale 1. True zeros 0 and 3 for
        // outputs 0 and 1 stored v1 (less one, word-wise): 0 - 1 borrows from field 1.
        let qweight: Vec<i32> = vec![9; 8];
        let true_zeros = 3u32 << 4;
        let stored = true_zeros.wrapping_sub(0x1111_1111) as i32;
        let w = dequantize_gptq(&qweight, &[stored], &[1.0; 8], [8, 1], 4, true, |_| 0);
        assert_eq!(w[..2], [9.0, 6.0]);
        let v2 = dequantize_gptq(
            &qweight,
            &[true_zeros as i32],
            &[1.0; 8],
            [8, 1],
            4,
            false,
            |_| 0,
        );
        assert_eq!(w, v2);
    }

    #[test]
    fn awq_fields_follow_its_interleaved_order() {
        // Field f holds output column [0, 2, 4, 6, 1, 3, 5, 7][f]; write value = column.
        let order = [0u32, 2, 4, 6, 1, 3, 5, 7];
        let word = order
            .iter()
            .enumerate()
            .fold(0u32, |w, (f, &c)| w | c << (4 * f)) as i32;
        let w = dequantize_awq(&[word], &[0], &[1.0; 8], [8, 1], 1);
        assert_eq!(w, (0..8).map(|c| c as f32).collect::<Vec<_>>());
    }

    #[test]
    fn zero_points_unpack_down_columns_and_shift_the_groups() {
        // 2 rows x 2 groups of zero points packed down each column: one word per column.
        let packed = [(9 | 10 << 4), (6 | 7 << 4)];
        let zero = unpack_columns(&packed, 2, 2, 4);
        assert_eq!(zero, vec![1, -2, 2, -1]);
        let q = [3, 3, 3, 3, 0, 0, 0, 0];
        let scale = [0.5, 2.0, 1.0, 4.0];
        let w = dequantize_groups(&q, &scale, Some(&zero), [2, 4], 2, |c| c / 2);
        assert_eq!(w, vec![1.0, 1.0, 10.0, 10.0, -2.0, -2.0, 4.0, 4.0]);
    }
}
