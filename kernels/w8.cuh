// An e4m3 byte's value times its block's scale, shared by the W8A16 kernels (w8a16.cu,
// moe_w8a16.cu): decoded exactly through float16. CPU reference: crates/ember-kernels/src/w8a16.rs.
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>

__device__ __forceinline__ float e4m3_weight(unsigned char byte, float scale) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)byte, __NV_E4M3);
  return __half2float(__half(h)) * scale;
}
