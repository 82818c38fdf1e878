//! fp8 e5m2 (1 sign, 5 exponent, 2 mantissa bits; bias 15; the top byte of an f16), the
//! `--kv-cache-dtype fp8_e5m2` storage: its range (±57344) needs no scale where e4m3's (±448)
//! may, at one mantissa bit less. Candle has no e5m2 dtype, so the cache holds the bytes as u8
//! and these ops convert.
//!
//! The conversion, shared by the CPU reference and `kernels/fp8_e5m2.cu` (CUDA's
//! `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2)`, as vLLM's cache writes): round to
//! nearest, ties to even; beyond ±57344, infinities included, saturate to ±57344. NaN becomes
//! 0x7F. Decoding is exact.

use crate::error::check_shape;
use crate::KernelError;

/// The largest finite e5m2 value.
pub const E5M2_MAX: f32 = 57344.0;

/// `x` as e5m2 bits (see the module doc).
pub fn encode(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = ((x.to_bits() >> 31) as u8) << 7;
    let a = x.abs();
    if a >= E5M2_MAX {
        return sign | 0x7B;
    }
    // Below 2^-14, e5m2 is subnormal: multiples of 2^-16. Scaling by 2^16 is exact, and the
    // rounded multiple is the code itself (4 is the smallest normal, exponent 1).
    if a < f32::from_bits(113 << 23) {
        return sign | (a * 65536.0).round_ties_even() as u8;
    }
    // Normal: re-bias the exponent (127 -> 15) and keep 2 of the 23 mantissa bits, rounding
    // the dropped 21 to nearest even; a carry moves into the exponent as it should.
    let bits = a.to_bits() - (112 << 23);
    let (kept, dropped) = (bits >> 21, bits & 0x1F_FFFF);
    let half = 0x10_0000;
    let rounded = if dropped > half || (dropped == half && kept & 1 == 1) {
        kept + 1
    } else {
        kept
    };
    sign | rounded as u8
}

/// The value of e5m2 bits `b` (exact: e5m2 is the top byte of an f16).
pub fn decode(b: u8) -> f32 {
    half::f16::from_bits(u16::from(b) << 8).to_f32()
}

/// CPU reference: `out[i] = encode(x[i])`.
pub fn encode_slice(x: &[f32], out: &mut [u8]) -> Result<(), KernelError> {
    check_shape(x.len() == out.len(), "e5m2_from_f32", || {
        format!("x has {} elements, out {}", x.len(), out.len())
    })?;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = encode(v);
    }
    Ok(())
}

/// CPU reference: `out[i] = decode(x[i])`.
pub fn decode_slice(x: &[u8], out: &mut [f32]) -> Result<(), KernelError> {
    check_shape(x.len() == out.len(), "e5m2_to_f32", || {
        format!("x has {} elements, out {}", x.len(), out.len())
    })?;
    for (o, &b) in out.iter_mut().zip(x) {
        *o = decode(b);
    }
    Ok(())
}

/// The launchers: [`encode_slice`] and [`decode_slice`] on the GPU.
#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, PushKernelArg};

    use crate::cuda::{elementwise_launch, CudaKernels};
    use crate::error::check_shape;
    use crate::KernelError;

    impl CudaKernels {
        /// [`crate::fp8_e5m2::encode_slice`] on the GPU: f32 to e5m2 bytes (nearest even,
        /// saturating).
        pub fn e5m2_from_f32(
            &self,
            x: &CudaView<'_, f32>,
            out: &mut CudaSlice<u8>,
        ) -> Result<(), KernelError> {
            // SAFETY: e5m2_from_f32(unsigned char*, const float*, long long) in
            // kernels/fp8_e5m2.cu.
            unsafe { self.e5m2_convert("e5m2_from_f32", x, out) }
        }

        /// [`crate::fp8_e5m2::decode_slice`] on the GPU: e5m2 bytes to f32 (exact).
        pub fn e5m2_to_f32(
            &self,
            x: &CudaView<'_, u8>,
            out: &mut CudaSlice<f32>,
        ) -> Result<(), KernelError> {
            // SAFETY: e5m2_to_f32(float*, const unsigned char*, long long) in kernels/fp8_e5m2.cu.
            unsafe { self.e5m2_convert("e5m2_to_f32", x, out) }
        }

        /// Launches `name` of `kernels/fp8_e5m2.cu` over equal-length `x` and `out`.
        ///
        /// # Safety
        /// `name` must take `(O* out, const I* x, long long n)`.
        unsafe fn e5m2_convert<I: DeviceRepr, O: DeviceRepr>(
            &self,
            name: &'static str,
            x: &CudaView<'_, I>,
            out: &mut CudaSlice<O>,
        ) -> Result<(), KernelError> {
            check_shape(x.len() == out.len(), name, || {
                format!("x has {} elements, out {}", x.len(), out.len())
            })?;
            let f = self.fp8_e5m2.load_function(name)?;
            let n = out.len() as i64;
            let mut launch = self.stream.launch_builder(&f);
            launch.arg(out).arg(x).arg(&n);
            // SAFETY: the caller names a kernel of this signature; both buffers hold n elements.
            unsafe { launch.launch(elementwise_launch(n)) }?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values and the bits `ml_dtypes.float8_e5m2` (0.7.0, round to nearest even) gives them:
    /// ties (1.125, 1.375, 2^-17, 3·2^-17, 53248), subnormals, the largest finite, negatives.
    const ML_DTYPES: [(f32, u8); 26] = [
        (0.0, 0),
        (-0.0, 128),
        (1.0, 60),
        (1.125, 60),
        (1.25, 61),
        (1.375, 62),
        (0.1, 46),
        (-0.3, 181),
        (3.3, 67),
        (100.0, 86),
        (57344.0, 123),
        (-57344.0, 251),
        (1.5e-5, 1),
        (7.6e-6, 0),
        (1.525_878_9e-5, 1),
        (7.629_394_5e-6, 0),
        (2.288_818_4e-5, 2),
        (1e-9, 0),
        (-2.5e-5, 130),
        (12345.6, 114),
        (0.000_976_562_5, 20),
        (1.0625, 60),
        (1.1875, 61),
        (1.907_348_6e-5, 1),
        (49152.0, 122),
        (53248.0, 122),
    ];

    #[test]
    fn encodes_as_ml_dtypes_rounds() {
        for (x, bits) in ML_DTYPES {
            assert_eq!(encode(x), bits, "{x:e}");
        }
    }

    #[test]
    fn saturates_beyond_the_largest_finite_and_maps_nan() {
        assert_eq!(encode(60000.0), 0x7B);
        assert_eq!(encode(-1e30), 0xFB);
        assert_eq!(encode(f32::INFINITY), 0x7B);
        assert_eq!(encode(f32::NEG_INFINITY), 0xFB);
        assert_eq!(encode(f32::NAN), 0x7F);
        assert_eq!(decode(0x7B), E5M2_MAX);
    }

    #[test]
    fn every_finite_code_decodes_and_encodes_back_to_itself() {
        for b in 0..=255u8 {
            let x = decode(b);
            if x.is_finite() {
                assert_eq!(encode(x), b, "code {b:#x} = {x:e}");
            }
        }
        assert_eq!(decode(60), 1.0);
        assert_eq!(decode(1), 2f32.powi(-16));
        assert!(decode(0x7C).is_infinite() && decode(0x7D).is_nan());
    }

    #[test]
    fn slices_convert_elementwise_and_check_lengths() {
        let mut bits = [0u8; 3];
        encode_slice(&[1.0, -0.3, 1e6], &mut bits).unwrap();
        assert_eq!(bits, [60, 181, 0x7B]);
        let mut back = [0f32; 3];
        decode_slice(&bits, &mut back).unwrap();
        assert_eq!(back, [1.0, -0.3125, 57344.0]);
        assert!(encode_slice(&[1.0], &mut bits).is_err());
        assert!(decode_slice(&bits, &mut back[..1]).is_err());
    }
}
