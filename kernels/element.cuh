// Storage dtypes of ember's kernels: load as f32, compute in f32, round once on store
// (crates/ember-kernels/src/element.rs is the CPU side of the same contract).
#pragma once
#include <cuda_bf16.h>

template <typename T> __device__ __forceinline__ float load_f32(T v);
template <> __device__ __forceinline__ float load_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float load_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T store_f32(float v);
template <> __device__ __forceinline__ float store_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 store_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
