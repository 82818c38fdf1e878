// W8A16 GEMM for decode-sized batches: y[m, n] = x[m, k] . W^T, W [n, k] stored as float8 e4m3
// bytes with one f32 scale per (block_n x block_k) block of W (DeepSeek's 128 x 128 blocks; one
// row by all of k for per-channel scales): W[j, c] = e4m3(w[j, c]) * scale[j / block_n][c / block_k].
// Each warp owns one output column for a tile of W8A16_ROWS rows of x; its lanes split the inputs
// (coalesced bytes), decode e4m3 exactly through float16 and reduce with shuffles. For sm_80,
// where FP8 tensor cores do not exist. CPU reference and numerics contract:
// crates/ember-kernels/src/w8a16.rs.
#include "element.cuh"
#include "w8.cuh"
#include "warp.cuh"
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#define W8A16_WARPS 4
#define W8A16_ROWS 8

template <typename T>
__device__ void w8a16_gemm(T* __restrict__ y, const T* __restrict__ x,
                           const unsigned char* __restrict__ w, const float* __restrict__ scales,
                           int m, int n, int k, int block_n, int block_k) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j = blockIdx.x * W8A16_WARPS + warp;
  const int r0 = blockIdx.y * W8A16_ROWS;
  // A whole warp shares j, so it leaves together and the shuffles below stay full-warp.
  if (j >= n) return;
  const int rows = min(W8A16_ROWS, m - r0);
  const int scale_cols = (k + block_k - 1) / block_k;
  const float* row_scales = scales + (long long)(j / block_n) * scale_cols;
  const unsigned char* row_w = w + (long long)j * k;
  float acc[W8A16_ROWS];
#pragma unroll
  for (int r = 0; r < W8A16_ROWS; ++r) acc[r] = 0.f;
  for (int c = lane; c < k; c += 32) {
    const float wv = e4m3_weight(row_w[c], row_scales[c / block_k]);
#pragma unroll
    for (int r = 0; r < W8A16_ROWS; ++r) {
      if (r < rows) acc[r] = fmaf(load_f32(x[(long long)(r0 + r) * k + c]), wv, acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < W8A16_ROWS; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0 && r < rows) y[(long long)(r0 + r) * n + j] = store_f32<T>(v);
  }
}

// The weight itself, W [n, k] in T, for batches too large for the GEMV above: the caller then
// runs a dense GEMM on it. One thread per weight, grid-stride.
template <typename T>
__device__ void w8a16_dequant(T* __restrict__ out, const unsigned char* __restrict__ w,
                              const float* __restrict__ scales, int n, int k, int block_n,
                              int block_k) {
  const long long total = (long long)n * k;
  const int scale_cols = (k + block_k - 1) / block_k;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long j = i / k;
    const int c = (int)(i % k);
    out[i] = store_f32<T>(e4m3_weight(w[i], scales[(j / block_n) * scale_cols + c / block_k]));
  }
}

#define W8A16_KERNEL(T, SUFFIX)                                                                  \
  extern "C" __global__ void w8a16_gemm_##SUFFIX(T* y, const T* x, const unsigned char* w,      \
                                                 const float* scales, int m, int n, int k,       \
                                                 int block_n, int block_k) {                     \
    w8a16_gemm<T>(y, x, w, scales, m, n, k, block_n, block_k);                                  \
  }                                                                                              \
  extern "C" __global__ void w8a16_dequant_##SUFFIX(T* out, const unsigned char* w,              \
                                                    const float* scales, int n, int k,           \
                                                    int block_n, int block_k) {                  \
    w8a16_dequant<T>(out, w, scales, n, k, block_n, block_k);                                   \
  }

W8A16_KERNEL(float, f32)
W8A16_KERNEL(__nv_bfloat16, bf16)
