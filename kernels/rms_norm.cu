// RMSNorm over the last dimension, alone and fused with the residual add before it.
// One block per row; blockDim.x is a multiple of 32 (at most 1024). CPU reference and the
// numerics contract: crates/ember-kernels/src/rms_norm.rs.
#include "element.cuh"
#include "warp.cuh"

// Sum of v over the block, returned to every thread.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  __shared__ float total;
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

// out[row] = x[row] * rsqrt(mean(x[row]^2) + eps) * weight
template <typename T>
__device__ void rms_norm(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ weight,
                         int hidden, float eps) {
  const size_t base = (size_t)blockIdx.x * hidden;
  float sum_sq = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = load_f32(x[base + i]);
    sum_sq += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq) / (float)hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    out[base + i] = store_f32<T>(load_f32(x[base + i]) * inv_rms * load_f32(weight[i]));
}

// residual[row] += x[row] (rounded to T, stored); out[row] = rms_norm(residual[row]).
// Each thread re-reads only the residual elements it wrote itself, so no barrier is needed between.
template <typename T>
__device__ void fused_add_rms_norm(T* __restrict__ out, T* __restrict__ residual, const T* __restrict__ x,
                                   const T* __restrict__ weight, int hidden, float eps) {
  const size_t base = (size_t)blockIdx.x * hidden;
  float sum_sq = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const T sum = store_f32<T>(load_f32(x[base + i]) + load_f32(residual[base + i]));
    residual[base + i] = sum;
    const float v = load_f32(sum);
    sum_sq += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq) / (float)hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    out[base + i] = store_f32<T>(load_f32(residual[base + i]) * inv_rms * load_f32(weight[i]));
}

#define RMS_NORM_KERNELS(T, SUFFIX)                                                                \
  extern "C" __global__ void rms_norm_##SUFFIX(T* out, const T* x, const T* weight, int hidden,    \
                                               float eps) {                                        \
    rms_norm<T>(out, x, weight, hidden, eps);                                                      \
  }                                                                                                \
  extern "C" __global__ void fused_add_rms_norm_##SUFFIX(T* out, T* residual, const T* x,          \
                                                         const T* weight, int hidden, float eps) { \
    fused_add_rms_norm<T>(out, residual, x, weight, hidden, eps);                                  \
  }

RMS_NORM_KERNELS(float, f32)
RMS_NORM_KERNELS(__nv_bfloat16, bf16)
