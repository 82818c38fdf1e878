// The fused MoE's grouped GEMM over 4-bit experts (compressed-tensors int4 such as Kimi K2
// Thinking's, GPTQ/AWQ without activation order, NVFP4/MXFP4 as e2m1 codes): out[id] =
// x[id / x_div] . W[e]^T for the entries of each 64-row block of the alignment, W[e] [n_out, k_in]
// as kernels/w4a16.cu holds one weight (codes two per byte, an f32 (scale, zero) pair per group,
// or FP4 scale bytes after each row's codes with an f32 global per row).
// Each warp owns one output column for a tile of 8 sorted rows (within one expert's block), its
// lanes split the inputs a byte at a time and reduce with shuffles; padding rows are skipped.
// CPU reference and numerics: crates/ember-kernels/src/fused_moe.rs (grouped_w4a16).
#include "element.cuh"
#include "w4.cuh"
#include "warp.cuh"
#include <cuda_fp16.h>

#define GW4_WARPS 4
#define GW4_ROWS 8
#define GW4_BLOCK_M 64

template <typename T>
__device__ void grouped_w4a16(T* __restrict__ out, const T* __restrict__ x,
                              const unsigned char* __restrict__ codes,
                              const float* __restrict__ qparams,
                              const unsigned* __restrict__ sorted_ids,
                              const unsigned* __restrict__ expert_ids,
                              const unsigned* __restrict__ num_padded, int num_entries,
                              int num_experts, int k_in, int n_out, int x_div, int group_size,
                              int f16_weights, int e2m1, int zeros, int scales) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j = blockIdx.y * GW4_WARPS + warp;
  const int r0 = blockIdx.x * GW4_ROWS;
  // Every branch below is uniform over the warp, so the shuffles stay full-warp.
  if (j >= n_out || r0 >= (int)*num_padded) return;
  const unsigned e = expert_ids[r0 / GW4_BLOCK_M];
  if (e >= (unsigned)num_experts) return;  // never from moe_align; a bad id reads no weights
  unsigned ids[GW4_ROWS];
  bool any = false;
#pragma unroll
  for (int r = 0; r < GW4_ROWS; ++r) {
    ids[r] = sorted_ids[r0 + r];
    any |= ids[r] < (unsigned)num_entries;
  }
  if (!any) return;
  const int groups = k_in / group_size;
  const size_t row = (size_t)e * n_out + j;
  const unsigned char* row_codes = codes + row * w4_row_bytes(k_in, groups, scales);
  float acc[GW4_ROWS];
#pragma unroll
  for (int r = 0; r < GW4_ROWS; ++r) acc[r] = 0.f;
  for (int b = lane; b < k_in / 2; b += 32) {
    const int c = 2 * b;
    // group_size is even, so both inputs of a byte share a group.
    float s, z;
    w4_row_group(row_codes, qparams, (long long)row, k_in, groups, c / group_size, zeros, scales,
                 s, z);
    float w0, w1;
    w4_pair(row_codes[b], s, z, e2m1, f16_weights, w0, w1);
#pragma unroll
    for (int r = 0; r < GW4_ROWS; ++r) {
      if (ids[r] < (unsigned)num_entries) {
        const T* xr = x + (size_t)(ids[r] / x_div) * k_in + c;
        acc[r] = fmaf(load_f32(xr[0]), w0, acc[r]);
        acc[r] = fmaf(load_f32(xr[1]), w1, acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < GW4_ROWS; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0 && ids[r] < (unsigned)num_entries) out[(size_t)ids[r] * n_out + j] = store_f32<T>(v);
  }
}

#define GROUPED_W4A16_KERNEL(T, SUFFIX)                                                         \
  extern "C" __global__ void grouped_w4a16_##SUFFIX(                                            \
      T* out, const T* x, const unsigned char* codes, const float* qparams,                     \
      const unsigned* sorted_ids, const unsigned* expert_ids, const unsigned* num_padded,       \
      int num_entries, int num_experts, int k_in, int n_out, int x_div, int group_size,         \
      int f16_weights, int e2m1, int zeros, int scales) {                                       \
    grouped_w4a16<T>(out, x, codes, qparams, sorted_ids, expert_ids, num_padded, num_entries,  \
                     num_experts, k_in, n_out, x_div, group_size, f16_weights, e2m1, zeros,     \
                     scales);                                                                   \
  }

GROUPED_W4A16_KERNEL(float, f32)
GROUPED_W4A16_KERNEL(__nv_bfloat16, bf16)
