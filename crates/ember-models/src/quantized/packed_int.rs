//! compressed-tensors `pack-quantized` integers (W4A16 / W8A16, as Kimi K2 Thinking ships its
//! experts): `num_bits`-bit values packed densely into int32 words, element `i` of a row at bit
//! `i * num_bits` of the row's little-endian bit stream, stored offset by `2^(num_bits-1)`.

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
