//! fp8 e5m2 as candle ops: f32 to e5m2 bytes (a `U8` tensor) and back, with ember-kernels'
//! CPU reference on the CPU and its `kernels/fp8_e5m2.cu` on CUDA (candle has no e5m2 dtype).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use ember_kernels::fp8_e5m2::{decode_slice, encode_slice};

use crate::device::kernels::cpu_input;
#[cfg(feature = "cuda")]
use crate::device::kernels::{cuda_input, device_kernels};

/// Who refuses a strided input.
const WHAT: &str = "e5m2 conversion";

/// `x` (any float dtype) as e5m2 bytes: nearest even, saturating to ±57344.
pub fn encode(x: &Tensor) -> candle_core::Result<Tensor> {
    x.to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&Convert::ToE5m2)
}

/// e5m2 bytes (`U8`) as f32 values.
pub fn decode(bytes: &Tensor) -> candle_core::Result<Tensor> {
    if bytes.dtype() != DType::U8 {
        candle_core::bail!("e5m2 bytes are u8, not {:?}", bytes.dtype());
    }
    bytes.contiguous()?.apply_op1_no_bwd(&Convert::FromE5m2)
}

enum Convert {
    ToE5m2,
    FromE5m2,
}

impl CustomOp1 for Convert {
    fn name(&self) -> &'static str {
        match self {
            Self::ToE5m2 => "ember-e5m2-from-f32",
            Self::FromE5m2 => "ember-e5m2-to-f32",
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let wrap = candle_core::Error::wrap;
        let storage = match self {
            Self::ToE5m2 => {
                let x = cpu_input::<f32>(storage, layout, WHAT)?;
                let mut out = vec![0u8; x.len()];
                encode_slice(x, &mut out).map_err(wrap)?;
                CpuStorage::U8(out)
            }
            Self::FromE5m2 => {
                let x = cpu_input::<u8>(storage, layout, WHAT)?;
                let mut out = vec![0f32; x.len()];
                decode_slice(x, &mut out).map_err(wrap)?;
                CpuStorage::F32(out)
            }
        };
        Ok((storage, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (device, kernels) = device_kernels(storage)?;
        let wrap = candle_core::Error::wrap;
        let out = match self {
            Self::ToE5m2 => {
                let x = cuda_input::<f32>(storage, layout, WHAT)?;
                let mut out = device.alloc_zeros::<u8>(x.len())?;
                kernels.e5m2_from_f32(&x, &mut out).map_err(wrap)?;
                candle_core::CudaStorage::wrap_cuda_slice(out, device)
            }
            Self::FromE5m2 => {
                let x = cuda_input::<u8>(storage, layout, WHAT)?;
                let mut out = device.alloc_zeros::<f32>(x.len())?;
                kernels.e5m2_to_f32(&x, &mut out).map_err(wrap)?;
                candle_core::CudaStorage::wrap_cuda_slice(out, device)
            }
        };
        Ok((out, layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn round_trips_through_bytes_from_a_strided_bf16_view() {
        let t = Tensor::new(&[[1.0f32, 9.0, -0.3], [1e6, 9.0, 1.125]], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let view = t.t().unwrap();
        let bytes = encode(&view).unwrap();
        assert_eq!(bytes.dtype(), DType::U8);
        assert_eq!(bytes.dims(), [3, 2]);
        // 1e6 saturates; 9 (between 8 and 10) and 1.125 (between 1 and 1.25) are ties: even;
        // bf16 -0.3 is -0.30078125, which rounds to -0.3125.
        assert_eq!(
            decode(&bytes).unwrap().to_vec2::<f32>().unwrap(),
            [[1.0, 57344.0], [8.0, 8.0], [-0.3125, 1.0]]
        );
        assert!(decode(&t).is_err());
    }
}
