// The fused MoE's grouped GEMM over float8 e4m3 experts (DeepSeek-V3 / Kimi K2 FP8 checkpoints'
// 128 x 128 block scales, or one scale per output channel): out[id] = x[id / x_div] . W[e]^T for
// the entries of each 64-row block of the alignment, W[e] [n_out, k_in] e4m3 bytes times its
// block's f32 scale, decoded exactly through float16. As kernels/w8a16.cu, for decode-sized
// batches and for sm_80, where FP8 tensor cores do not exist: each warp owns one output column
// for a tile of 8 sorted rows (within one expert's block), its lanes split the inputs (coalesced
// bytes) and reduce with shuffles; padding rows are skipped. CPU reference and numerics:
// crates/ember-kernels/src/fused_moe.rs (grouped_w8a16).
#include "element.cuh"
#include "w8.cuh"
#include "warp.cuh"
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#define GW8_WARPS 4
#define GW8_ROWS 8
#define GW8_BLOCK_M 64

template <typename T>
__device__ void grouped_w8a16(T* __restrict__ out, const T* __restrict__ x,
                              const unsigned char* __restrict__ w, const float* __restrict__ scales,
                              const unsigned* __restrict__ sorted_ids,
                              const unsigned* __restrict__ expert_ids,
                              const unsigned* __restrict__ num_padded, int num_entries,
                              int num_experts, int k_in, int n_out, int x_div, int block_n,
                              int block_k) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j = blockIdx.y * GW8_WARPS + warp;
  const int r0 = blockIdx.x * GW8_ROWS;
  // Every branch below is uniform over the warp, so the shuffles stay full-warp.
  if (j >= n_out || r0 >= (int)*num_padded) return;
  const unsigned e = expert_ids[r0 / GW8_BLOCK_M];
  if (e >= (unsigned)num_experts) return;  // never from moe_align; a bad id reads no weights
  unsigned ids[GW8_ROWS];
  bool any = false;
#pragma unroll
  for (int r = 0; r < GW8_ROWS; ++r) {
    ids[r] = sorted_ids[r0 + r];
    any |= ids[r] < (unsigned)num_entries;
  }
  if (!any) return;
  const int scale_rows = (n_out + block_n - 1) / block_n;
  const int scale_cols = (k_in + block_k - 1) / block_k;
  const float* row_scales = scales + ((size_t)e * scale_rows + j / block_n) * scale_cols;
  const unsigned char* row_w = w + ((size_t)e * n_out + j) * k_in;
  float acc[GW8_ROWS];
#pragma unroll
  for (int r = 0; r < GW8_ROWS; ++r) acc[r] = 0.f;
  for (int c = lane; c < k_in; c += 32) {
    const float wv = e4m3_weight(row_w[c], row_scales[c / block_k]);
#pragma unroll
    for (int r = 0; r < GW8_ROWS; ++r) {
      if (ids[r] < (unsigned)num_entries)
        acc[r] = fmaf(load_f32(x[(size_t)(ids[r] / x_div) * k_in + c]), wv, acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < GW8_ROWS; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0 && ids[r] < (unsigned)num_entries) out[(size_t)ids[r] * n_out + j] = store_f32<T>(v);
  }
}

#define GROUPED_W8A16_KERNEL(T, SUFFIX)                                                           \
  extern "C" __global__ void grouped_w8a16_##SUFFIX(                                              \
      T* out, const T* x, const unsigned char* w, const float* scales, const unsigned* sorted_ids, \
      const unsigned* expert_ids, const unsigned* num_padded, int num_entries, int num_experts,    \
      int k_in, int n_out, int x_div, int block_n, int block_k) {                                  \
    grouped_w8a16<T>(out, x, w, scales, sorted_ids, expert_ids, num_padded, num_entries,          \
                     num_experts, k_in, n_out, x_div, block_n, block_k);                           \
  }

GROUPED_W8A16_KERNEL(float, f32)
GROUPED_W8A16_KERNEL(__nv_bfloat16, bf16)
