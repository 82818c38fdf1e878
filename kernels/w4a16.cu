// W4A16 GEMM for decode-sized batches: y[m, n] = x[m, k] . W^T, W [n, k] stored as unsigned 4-bit
// codes (two per byte, the even input in the low nibble) with one f32 (scale, zero point) pair
// per (output row, group of group_size inputs), or the scale alone with zero point 8 (`zeros` off),
// or FP4 scale bytes after each row's codes (`scales`, see w4.cuh):
// W[j, c] = (code - zero) * scale. Each warp
// owns one output column for a tile of W4A16_ROWS rows of x: its lanes split the inputs a byte at
// a time (coalesced), dequantize in registers and reduce with shuffles. CPU reference and the
// numerics contract: crates/ember-kernels/src/w4a16.rs.
#include "element.cuh"
#include "w4.cuh"
#include "warp.cuh"
#include <cuda_fp16.h>

#define W4A16_WARPS 4
#define W4A16_ROWS 8

template <typename T>
__device__ void w4a16_gemm(T* __restrict__ y, const T* __restrict__ x,
                           const unsigned char* __restrict__ codes,
                           const float* __restrict__ qparams, int m, int n, int k,
                           int group_size, int f16_weights, int e2m1, int zeros, int scales) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j = blockIdx.x * W4A16_WARPS + warp;
  const int r0 = blockIdx.y * W4A16_ROWS;
  // A whole warp shares j, so it leaves together and the shuffles below stay full-warp.
  if (j >= n) return;
  const int rows = min(W4A16_ROWS, m - r0);
  const int groups = k / group_size;
  const unsigned char* row_codes = codes + (long long)j * w4_row_bytes(k, groups, scales);
  float acc[W4A16_ROWS];
#pragma unroll
  for (int r = 0; r < W4A16_ROWS; ++r) acc[r] = 0.f;
  for (int b = lane; b < k / 2; b += 32) {
    const int c = 2 * b;
    // group_size is even, so both inputs of a byte share a group.
    float s, z;
    w4_row_group(row_codes, qparams, j, k, groups, c / group_size, zeros, scales, s, z);
    float w0, w1;
    w4_pair(row_codes[b], s, z, e2m1, f16_weights, w0, w1);
#pragma unroll
    for (int r = 0; r < W4A16_ROWS; ++r) {
      if (r < rows) {
        const T* xr = x + (long long)(r0 + r) * k + c;
        acc[r] = fmaf(load_f32(xr[0]), w0, acc[r]);
        acc[r] = fmaf(load_f32(xr[1]), w1, acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < W4A16_ROWS; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0 && r < rows) y[(long long)(r0 + r) * n + j] = store_f32<T>(v);
  }
}

// The weight itself, W [n, k] in T, for batches too large for the GEMV above: the caller then
// runs a dense GEMM on it. One thread per weight, grid-stride.
template <typename T>
__device__ void w4a16_dequant(T* __restrict__ out, const unsigned char* __restrict__ codes,
                              const float* __restrict__ qparams, int n, int k, int group_size,
                              int f16_weights, int e2m1, int zeros, int scales) {
  const long long total = (long long)n * k;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const float w = w4_weight(codes, qparams, i / k, (int)(i % k), k, group_size, f16_weights,
                              e2m1, zeros, scales);
    out[i] = store_f32<T>(w);
  }
}

#define W4A16_KERNEL(T, SUFFIX)                                                                  \
  extern "C" __global__ void w4a16_gemm_##SUFFIX(T* y, const T* x, const unsigned char* codes,  \
                                                 const float* qparams, int m, int n, int k,      \
                                                 int group_size, int f16_weights, int e2m1,      \
                                                 int zeros, int scales) {                        \
    w4a16_gemm<T>(y, x, codes, qparams, m, n, k, group_size, f16_weights, e2m1, zeros, scales); \
  }                                                                                              \
  extern "C" __global__ void w4a16_dequant_##SUFFIX(T* out, const unsigned char* codes,          \
                                                    const float* qparams, int n, int k,          \
                                                    int group_size, int f16_weights, int e2m1,   \
                                                    int zeros, int scales) {                     \
    w4a16_dequant<T>(out, codes, qparams, n, k, group_size, f16_weights, e2m1, zeros, scales);  \
  }

W4A16_KERNEL(float, f32)
W4A16_KERNEL(__nv_bfloat16, bf16)
