//! FP4 (e2m1) weights: two values a byte, the low nibble first; one sign bit, two exponent
//! bits, one mantissa bit. NVFP4 scales 16 of them by a float8_e4m3fn and a global f32;
//! MXFP4 scales 32 by a power of two (e8m0, bias 127).

/// The magnitudes of e2m1 codes 0-7; bit 3 is the sign.
const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// The value of one 4-bit e2m1 code.
pub fn e2m1(code: u8) -> f32 {
    let magnitude = E2M1[(code & 7) as usize];
    if code & 8 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// Unpacks bytes into e2m1 values, low nibble first (`[rows, cols / 2]` -> `[rows, cols]`).
pub fn unpack_e2m1(packed: &[u8]) -> Vec<f32> {
    packed
        .iter()
        .flat_map(|b| [e2m1(b & 0x0f), e2m1(b >> 4)])
        .collect()
}

/// The power of two an e8m0 code stands for (`2^(code - 127)`; 255 is NaN): the kernels'.
pub use ember_kernels::w4a16::e8m0;

/// `values[r, c] * block_scale[r, c / group]` for `[rows, cols]` values.
pub fn scale_groups(values: &[f32], block_scale: &[f32], cols: usize, group: usize) -> Vec<f32> {
    let groups = cols / group;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| v * block_scale[(i / cols) * groups + (i % cols) / group])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e2m1_codes_cover_the_eight_magnitudes_and_their_negatives() {
        let all: Vec<f32> = (0..16).map(e2m1).collect();
        assert_eq!(
            all,
            [
                0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0,
                -6.0
            ]
        );
        assert_eq!(unpack_e2m1(&[0x71, 0x9f]), vec![0.5, 6.0, -6.0, -0.5]);
    }

    #[test]
    fn e8m0_codes_are_powers_of_two_around_bias_127() {
        assert_eq!(e8m0(127), 1.0);
        assert_eq!(e8m0(130), 8.0);
        assert_eq!(e8m0(120), 2f32.powi(-7));
        assert_eq!(e8m0(0), 2f32.powi(-127));
        assert_eq!(e8m0(254), 2f32.powi(127));
        assert!(e8m0(255).is_nan());
    }

    #[test]
    fn each_group_takes_its_own_scale() {
        let v = [1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 1.0];
        assert_eq!(
            scale_groups(&v, &[1.0, 10.0, 0.5, 2.0], 4, 2),
            vec![1.0, 2.0, 30.0, 40.0, 0.5, 0.5, 2.0, 2.0]
        );
    }
}
