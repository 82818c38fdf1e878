// fp8 e5m2 conversions for the KV cache (stored as bytes): f32 -> e5m2 rounding to nearest even
// and saturating to +-57344 (CUDA's __NV_SATFINITE, as vLLM's cache writes), and e5m2 -> f32
// (exact). Grid-stride over n elements. CPU reference and the contract:
// crates/ember-kernels/src/fp8_e5m2.rs.
#include <cuda_fp16.h>
#include <cuda_fp8.h>

extern "C" __global__ void e5m2_from_f32(unsigned char* __restrict__ out, const float* __restrict__ x,
                                         long long n) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const float v = x[i];
    // The intrinsic's NaN is 0x7f or 0xff by sign; the contract is 0x7f.
    out[i] = isnan(v) ? (unsigned char)0x7f
                      : (unsigned char)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E5M2);
  }
}

extern "C" __global__ void e5m2_to_f32(float* __restrict__ out, const unsigned char* __restrict__ x,
                                       long long n) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    __half_raw h;
    h.x = (unsigned short)x[i] << 8;
    out[i] = __half2float(__half(h));
  }
}
