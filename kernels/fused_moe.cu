// Fused MoE pieces: moe_align (entries sorted by expert, padded to blocks of 64), the grouped
// GEMM over those blocks (bf16 on tensor cores through WMMA, also over 4-bit and e4m3 experts
// dequantized into its tiles for prefill; f32 on the SIMT cores), and moe_sum (each token's
// weighted expert outputs). Layouts and the CPU references: crates/ember-kernels/src/fused_moe.rs.
#include <mma.h>

#include "element.cuh"
#include "w4.cuh"
#include "w8.cuh"

// --- moe_align: one block; thread e owns expert e (blockDim.x >= num_experts). ---------------
extern "C" __global__ void moe_align(unsigned* __restrict__ sorted_ids, unsigned* __restrict__ expert_ids,
                                     unsigned* __restrict__ num_padded,
                                     const unsigned* __restrict__ topk_ids, int num_entries,
                                     int num_experts, int block_m, int capacity) {
  __shared__ int start[1025];
  const int e = threadIdx.x;
  int count = 0;
  if (e < num_experts)
    for (int i = 0; i < num_entries; ++i) count += topk_ids[i] == (unsigned)e;
  if (e < num_experts) start[e + 1] = (count + block_m - 1) / block_m * block_m;
  __syncthreads();
  if (e == 0) {
    start[0] = 0;
    for (int x = 1; x <= num_experts; ++x) start[x] += start[x - 1];
    *num_padded = (unsigned)start[num_experts];
  }
  __syncthreads();
  const int total = start[num_experts];
  // Padding everywhere first (this thread's own run is rewritten below, in order).
  for (int r = threadIdx.x; r < capacity; r += blockDim.x) sorted_ids[r] = (unsigned)num_entries;
  for (int b = threadIdx.x; b < capacity / block_m; b += blockDim.x) expert_ids[b] = 0;
  __syncthreads();
  if (e < num_experts) {
    int at = start[e];
    for (int i = 0; i < num_entries; ++i)
      if (topk_ids[i] == (unsigned)e) sorted_ids[at++] = (unsigned)i;
    for (int b = start[e] / block_m; b < start[e + 1] / block_m; ++b) expert_ids[b] = (unsigned)e;
  }
  (void)total;
}

// --- grouped GEMM: out[id] = x[id / x_div] . W[e]^T for the entries of each 64-row block. -------
#define GG_BM 64
#define GG_BN 64
#define GG_BK 16

// bf16 on tensor cores: 4 warps, each a 32x32 quarter of the 64x64 tile as 2x2 WMMA 16x16x16,
// over any source of the weights: `weight(e, n, k)` is W[e][n, k] as a bf16 (stored as such, or
// dequantized from 4-bit codes or e4m3 bytes into the tile, once per 64 rows of a block).
template <typename Weight>
__device__ __forceinline__ void grouped_wmma_bf16(
    __nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ x,
    const unsigned* __restrict__ sorted_ids, const unsigned* __restrict__ expert_ids,
    const unsigned* __restrict__ num_padded, int num_entries, int num_experts, int k_in, int n_out,
    int x_div, Weight weight) {
  using namespace nvcuda;
  constexpr int LD = GG_BK + 8;   // 24 bf16: a multiple of 8, rows 48 bytes apart
  constexpr int LDC = GG_BN + 4;  // 68 floats
  __shared__ __align__(32) __nv_bfloat16 As[GG_BM * LD];
  __shared__ __align__(32) __nv_bfloat16 Bs[GG_BN * LD];
  __shared__ __align__(32) float Cs[GG_BM * LDC];
  __shared__ unsigned ids[GG_BM];

  const int m0 = blockIdx.x * GG_BM, n0 = blockIdx.y * GG_BN;
  if (m0 >= (int)*num_padded) return;
  const unsigned e = expert_ids[blockIdx.x];
  if (e >= (unsigned)num_experts) return;  // never from moe_align; a bad id reads no weights
  const int tid = threadIdx.x, warp = tid >> 5;
  const int wr = (warp >> 1) * 32, wc = (warp & 1) * 32;
  if (tid < GG_BM) ids[tid] = sorted_ids[m0 + tid];
  __syncthreads();

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int k0 = 0; k0 < k_in; k0 += GG_BK) {
    for (int idx = tid; idx < GG_BM * GG_BK; idx += blockDim.x) {
      const int r = idx / GG_BK, kk = idx % GG_BK, k = k0 + kk;
      const unsigned id = ids[r];
      As[r * LD + kk] = (id < (unsigned)num_entries && k < k_in)
                            ? x[(size_t)(id / x_div) * k_in + k]
                            : __float2bfloat16_rn(0.f);
      const int n = n0 + r;  // GG_BN == GG_BM: the same loop fills B's rows
      Bs[r * LD + kk] = (n < n_out && k < k_in) ? weight(e, n, k) : __float2bfloat16_rn(0.f);
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b[2];
    for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + (wr + 16 * i) * LD, LD);
    // B (k x n) column-major: element (k, n) at Bs[n * LD + k], W's rows as stored.
    for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bs + (wc + 16 * j) * LD, LD);
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wr + 16 * i) * LDC + wc + 16 * j, acc[i][j], LDC,
                              wmma::mem_row_major);
  __syncthreads();
  for (int idx = tid; idx < GG_BM * GG_BN; idx += blockDim.x) {
    const int r = idx / GG_BN, c = idx % GG_BN, n = n0 + c;
    const unsigned id = ids[r];
    if (id < (unsigned)num_entries && n < n_out)
      out[(size_t)id * n_out + n] = __float2bfloat16_rn(Cs[r * LDC + c]);
  }
}

extern "C" __global__ void __launch_bounds__(128) grouped_gemm_bf16(
    __nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ x,
    const __nv_bfloat16* __restrict__ w, const unsigned* __restrict__ sorted_ids,
    const unsigned* __restrict__ expert_ids, const unsigned* __restrict__ num_padded,
    int num_entries, int num_experts, int k_in, int n_out, int x_div) {
  grouped_wmma_bf16(out, x, sorted_ids, expert_ids, num_padded, num_entries, num_experts, k_in,
                    n_out, x_div, [=](unsigned e, int n, int k) {
                      return w[((size_t)e * n_out + n) * k_in + k];
                    });
}

// Prefill over 4-bit experts (moe_w4a16.cu's layout): each weight dequantized as w4a16_dequant
// does, rounded once to bf16 in the tile. CPU reference: grouped_w4a16_tc in fused_moe.rs.
extern "C" __global__ void __launch_bounds__(128) grouped_w4a16_tc_bf16(
    __nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ x,
    const unsigned char* __restrict__ codes, const float* __restrict__ qparams,
    const unsigned* __restrict__ sorted_ids, const unsigned* __restrict__ expert_ids,
    const unsigned* __restrict__ num_padded, int num_entries, int num_experts, int k_in, int n_out,
    int x_div, int group_size, int f16_weights, int e2m1, int zeros, int scales) {
  grouped_wmma_bf16(out, x, sorted_ids, expert_ids, num_padded, num_entries, num_experts, k_in,
                    n_out, x_div, [=](unsigned e, int n, int k) {
                      return __float2bfloat16_rn(w4_weight(codes, qparams,
                                                           (long long)e * n_out + n, k, k_in,
                                                           group_size, f16_weights, e2m1, zeros,
                                                           scales));
                    });
}

// Prefill over e4m3 experts (moe_w8a16.cu's layout: block scales per expert): each weight
// decoded exactly, times its block's scale, rounded once to bf16 in the tile. CPU reference:
// grouped_w8a16_tc in fused_moe.rs.
extern "C" __global__ void __launch_bounds__(128) grouped_w8a16_tc_bf16(
    __nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ x,
    const unsigned char* __restrict__ w, const float* __restrict__ scales,
    const unsigned* __restrict__ sorted_ids, const unsigned* __restrict__ expert_ids,
    const unsigned* __restrict__ num_padded, int num_entries, int num_experts, int k_in, int n_out,
    int x_div, int block_n, int block_k) {
  const int scale_rows = (n_out + block_n - 1) / block_n;
  const int scale_cols = (k_in + block_k - 1) / block_k;
  grouped_wmma_bf16(out, x, sorted_ids, expert_ids, num_padded, num_entries, num_experts, k_in,
                    n_out, x_div, [=](unsigned e, int n, int k) {
                      const float s =
                          scales[((size_t)e * scale_rows + n / block_n) * scale_cols + k / block_k];
                      return __float2bfloat16_rn(
                          e4m3_weight(w[((size_t)e * n_out + n) * k_in + k], s));
                    });
}

// f32 on the SIMT cores: 256 threads, each a 4x4 patch of the 64x64 tile.
extern "C" __global__ void __launch_bounds__(256) grouped_gemm_f32(
    float* __restrict__ out, const float* __restrict__ x, const float* __restrict__ w,
    const unsigned* __restrict__ sorted_ids, const unsigned* __restrict__ expert_ids,
    const unsigned* __restrict__ num_padded, int num_entries, int num_experts, int k_in, int n_out,
    int x_div) {
  __shared__ float As[GG_BM][GG_BK + 1];
  __shared__ float Bs[GG_BN][GG_BK + 1];
  __shared__ unsigned ids[GG_BM];
  const int m0 = blockIdx.x * GG_BM, n0 = blockIdx.y * GG_BN;
  if (m0 >= (int)*num_padded) return;
  const unsigned e = expert_ids[blockIdx.x];
  if (e >= (unsigned)num_experts) return;  // never from moe_align; a bad id reads no weights
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  if (tid < GG_BM) ids[tid] = sorted_ids[m0 + tid];
  __syncthreads();
  float acc[4][4] = {};
  for (int k0 = 0; k0 < k_in; k0 += GG_BK) {
    for (int idx = tid; idx < GG_BM * GG_BK; idx += blockDim.x) {
      const int r = idx / GG_BK, kk = idx % GG_BK, k = k0 + kk;
      const unsigned id = ids[r];
      As[r][kk] = (id < (unsigned)num_entries && k < k_in) ? x[(size_t)(id / x_div) * k_in + k] : 0.f;
      const int n = n0 + r;
      Bs[r][kk] = (n < n_out && k < k_in) ? w[((size_t)e * n_out + n) * k_in + k] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < GG_BK; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += As[ty * 4 + i][kk] * Bs[tx * 4 + j][kk];
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const unsigned id = ids[ty * 4 + i];
    if (id >= (unsigned)num_entries) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tx * 4 + j;
      if (n < n_out) out[(size_t)id * n_out + n] = acc[i][j];
    }
  }
}

// --- moe_sum: out[t] = sum_j weights[t*top_k + j] * y[t*top_k + j]; one block per token. ------
template <typename T>
__device__ void moe_sum(T* __restrict__ out, const T* __restrict__ y, const float* __restrict__ weights,
                        int top_k, int hidden) {
  const int t = blockIdx.x;
  for (int d = threadIdx.x; d < hidden; d += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < top_k; ++j)
      acc += weights[t * top_k + j] * load_f32(y[((size_t)t * top_k + j) * hidden + d]);
    out[(size_t)t * hidden + d] = store_f32<T>(acc);
  }
}

#define MOE_SUM_KERNEL(T, SUFFIX)                                                              \
  extern "C" __global__ void moe_sum_##SUFFIX(T* out, const T* y, const float* weights, int top_k, \
                                              int hidden) {                                     \
    moe_sum<T>(out, y, weights, top_k, hidden);                                                 \
  }

MOE_SUM_KERNEL(float, f32)
MOE_SUM_KERNEL(__nv_bfloat16, bf16)

// --- count_experts: the step's entries per expert, added to running counters (/metrics). ------
// Grid-stride over the entries; an id outside the experts is not counted.
extern "C" __global__ void count_experts(unsigned long long* __restrict__ counts,
                                         const unsigned* __restrict__ topk_ids, int num_entries,
                                         int num_experts) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < num_entries; i += gridDim.x * blockDim.x) {
    const unsigned e = topk_ids[i];
    if (e < (unsigned)num_experts) atomicAdd(&counts[e], 1ull);
  }
}
