//! A request's own random stream, so that seeded sampling repeats whatever else shares the batch.

/// A request's own random stream, so that seeded sampling repeats whatever else shares the batch.
///
/// xoshiro256** seeded through splitmix64, written out here because `rand` does not promise a
/// stable stream for `StdRng` across versions. A random step draws exactly one number from it.
#[derive(Debug, Clone)]
pub struct SequenceRng {
    state: [u64; 4],
}

impl SequenceRng {
    /// A stream seeded from `seed` (usually `params.seed`), or from OS entropy when `None`.
    pub fn new(seed: Option<u64>) -> Self {
        let mut seed = seed.unwrap_or_else(rand::random);
        Self {
            state: std::array::from_fn(|_| splitmix64(&mut seed)),
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform draw from [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_stream_is_xoshiro256_starstar_seeded_by_splitmix64() {
        let mut state = 0;
        assert_eq!(splitmix64(&mut state), 0xe220_a839_7b1d_cdaf);
        let mut rng = SequenceRng::new(Some(0));
        let first: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(
            first,
            [
                0x99ec_5f36_cb75_f2b4,
                0xbf6e_1f78_4956_452a,
                0x1a5f_849d_4933_e6e0
            ]
        );
        let mut rng = SequenceRng::new(Some(42));
        assert_eq!(rng.next_u64(), 0x1578_0b2e_0c2e_c716);
        assert!((0..1000)
            .map(|_| rng.next_f64())
            .all(|u| (0.0..1.0).contains(&u)));
    }
}
