// W8A8 FP8 GEMM on tensor cores (sm_89 and up: Ada, Hopper, Blackwell), DeepSeek-V3's scheme:
// activations quantized per token and per group of 128 inputs (quant_fp8_groups), weights e4m3
// with block_n x 128 block scales, and y = sum over 128-input blocks of (e4m3 inner products on
// tensor cores, mma.sync m16n8k32) x activation scale x weight scale, promoted to f32 every block.
// Each block of 4 warps computes a 64 x 64 tile of y, each warp 32 x 32 (2 x 4 mma tiles); the
// block's 64 rows of activations and of weights for one 128-input block sit in shared memory.
// The fused MoE's grouped GEMM over e4m3 experts runs the same tiles over one expert's 64-row
// blocks of the alignment. sm_80 has no FP8 tensor cores: there the GEMMs compile to nothing and
// the launchers refuse them.
// CPU reference and numerics: crates/ember-kernels/src/w8a8.rs.
#include "element.cuh"
#include <cuda_fp8.h>

#define W8A8_TILE 64
#define W8A8_GROUP 128
#define W8A8_LDS (W8A8_GROUP + 16)  // bytes per shared row: 4-byte aligned, spread over banks

// One warp per (row, group of 128 inputs): the group's amax, its scale amax / 448 (amax at least
// 1e-10) and its values x / scale as e4m3, rounded to nearest even and saturated.
template <typename T>
__device__ void quant_fp8_groups(unsigned char* __restrict__ q, float* __restrict__ scales,
                                 const T* __restrict__ x, int m, int k) {
  const int lane = threadIdx.x & 31;
  const long long item = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int groups = (k + W8A8_GROUP - 1) / W8A8_GROUP;
  if (item >= (long long)m * groups) return;  // a whole warp leaves together
  const int r = (int)(item / groups), g = (int)(item % groups);
  const int c0 = g * W8A8_GROUP;
  float v[4];
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int c = c0 + lane * 4 + i;
    v[i] = c < k ? load_f32(x[(long long)r * k + c]) : 0.f;
    amax = fmaxf(amax, fabsf(v[i]));
  }
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float scale = fmaxf(amax, 1e-10f) / 448.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int c = c0 + lane * 4 + i;
    if (c < k)
      q[(long long)r * k + c] =
          (unsigned char)__nv_cvt_float_to_fp8(v[i] / scale, __NV_SATFINITE, __NV_E4M3);
  }
  if (lane == 0) scales[(long long)r * groups + g] = scale;
}

// Four bytes of a row from `c`, zero past `k` (rows need not be 4-byte aligned).
__device__ __forceinline__ unsigned w8a8_word(const unsigned char* row, int c, int k) {
  unsigned w = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (c + i < k) w |= (unsigned)row[c + i] << (8 * i);
  return w;
}

// A 64 x 64 tile of output at columns n0..: row i of the tile reads activation row
// `a_rows[i]` and writes output row `y_rows[i]` (-1: a padding row, neither read nor written).
template <typename T>
__device__ void w8a8_tile(T* __restrict__ y, const unsigned char* __restrict__ qa,
                          const float* __restrict__ sa, const unsigned char* __restrict__ qw,
                          const float* __restrict__ sw, const int* a_rows, const int* y_rows,
                          int n, int k, int block_n, int n0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  __shared__ __align__(16) unsigned char As[W8A8_TILE * W8A8_LDS];
  __shared__ __align__(16) unsigned char Bs[W8A8_TILE * W8A8_LDS];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const int groups = (k + W8A8_GROUP - 1) / W8A8_GROUP;
  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  for (int kb = 0; kb < groups; ++kb) {
    const int k0 = kb * W8A8_GROUP;
    // 64 rows x 32 words of each operand; rows past m or n, and inputs past k, are zero.
    for (int idx = tid; idx < W8A8_TILE * (W8A8_GROUP / 4); idx += blockDim.x) {
      const int r = idx / (W8A8_GROUP / 4), w4 = idx % (W8A8_GROUP / 4);
      const int c = k0 + w4 * 4;
      const unsigned a = a_rows[r] >= 0 ? w8a8_word(qa + (long long)a_rows[r] * k, c, k) : 0u;
      const unsigned b = n0 + r < n ? w8a8_word(qw + (long long)(n0 + r) * k, c, k) : 0u;
      *(unsigned*)(As + r * W8A8_LDS + w4 * 4) = a;
      *(unsigned*)(Bs + r * W8A8_LDS + w4 * 4) = b;
    }
    __syncthreads();
    float part[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) part[i][j][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < W8A8_GROUP / 32; ++ks) {
      const int kc = ks * 32 + t * 4;
      unsigned a[2][4], b[4][2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const unsigned char* r0 = As + (wm + i * 16 + g) * W8A8_LDS;
        const unsigned char* r8 = r0 + 8 * W8A8_LDS;
        a[i][0] = *(const unsigned*)(r0 + kc);
        a[i][1] = *(const unsigned*)(r8 + kc);
        a[i][2] = *(const unsigned*)(r0 + kc + 16);
        a[i][3] = *(const unsigned*)(r8 + kc + 16);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const unsigned char* col = Bs + (wn + j * 8 + g) * W8A8_LDS;
        b[j][0] = *(const unsigned*)(col + kc);
        b[j][1] = *(const unsigned*)(col + kc + 16);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          asm volatile(
              "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
              "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
              : "+f"(part[i][j][0]), "+f"(part[i][j][1]), "+f"(part[i][j][2]), "+f"(part[i][j][3])
              : "r"(a[i][0]), "r"(a[i][1]), "r"(a[i][2]), "r"(a[i][3]), "r"(b[j][0]), "r"(b[j][1]));
    }
    // Promote the block's sums: times each row's activation scale and each column's weight scale.
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = wm + i * 16 + g + (e >= 2 ? 8 : 0);
          const int col = n0 + wn + j * 8 + t * 2 + (e & 1);
          if (a_rows[r] >= 0 && col < n)
            acc[i][j][e] += part[i][j][e] * sa[(long long)a_rows[r] * groups + kb] *
                            sw[(long long)(col / block_n) * groups + kb];
        }
    __syncthreads();  // the tiles are rewritten by the next block
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = wm + i * 16 + g + (e >= 2 ? 8 : 0);
        const int col = n0 + wn + j * 8 + t * 2 + (e & 1);
        if (y_rows[r] >= 0 && col < n) y[(long long)y_rows[r] * n + col] = store_f32<T>(acc[i][j][e]);
      }
#endif
}

// Dense: rows m0.. of x and y.
template <typename T>
__device__ void w8a8_gemm(T* __restrict__ y, const unsigned char* __restrict__ qa,
                          const float* __restrict__ sa, const unsigned char* __restrict__ qw,
                          const float* __restrict__ sw, int m, int n, int k, int block_n) {
  __shared__ int rows[W8A8_TILE];
  const int m0 = blockIdx.x * W8A8_TILE;
  if (threadIdx.x < W8A8_TILE) rows[threadIdx.x] = m0 + (int)threadIdx.x < m ? m0 + (int)threadIdx.x : -1;
  __syncthreads();
  w8a8_tile<T>(y, qa, sa, qw, sw, rows, rows, n, k, block_n, blockIdx.y * W8A8_TILE);
}

// The fused MoE's grouped form: block b of the alignment (64 sorted rows, one expert's) reads
// the activation rows of its entries (entry / x_div) and writes its entries' rows, through the
// expert's weights and scales. Padding rows and blocks past num_padded do nothing.
template <typename T>
__device__ void grouped_w8a8(T* __restrict__ out, const unsigned char* __restrict__ qa,
                             const float* __restrict__ sa, const unsigned char* __restrict__ qw,
                             const float* __restrict__ sw, const unsigned* __restrict__ sorted_ids,
                             const unsigned* __restrict__ expert_ids,
                             const unsigned* __restrict__ num_padded, int num_entries,
                             int num_experts, int k_in, int n_out, int x_div, int block_n) {
  __shared__ int a_rows[W8A8_TILE], y_rows[W8A8_TILE];
  const int m0 = blockIdx.x * W8A8_TILE;
  if (m0 >= (int)*num_padded) return;
  const unsigned e = expert_ids[blockIdx.x];
  if (e >= (unsigned)num_experts) return;  // never from moe_align; a bad id reads no weights
  if (threadIdx.x < W8A8_TILE) {
    const unsigned id = sorted_ids[m0 + threadIdx.x];
    const bool real = id < (unsigned)num_entries;
    a_rows[threadIdx.x] = real ? (int)(id / (unsigned)x_div) : -1;
    y_rows[threadIdx.x] = real ? (int)id : -1;
  }
  __syncthreads();
  const int groups = (k_in + W8A8_GROUP - 1) / W8A8_GROUP;
  const long long scale_rows = (n_out + block_n - 1) / block_n;
  w8a8_tile<T>(out, qa, sa, qw + (long long)e * n_out * k_in, sw + (long long)e * scale_rows * groups,
               a_rows, y_rows, n_out, k_in, block_n, blockIdx.y * W8A8_TILE);
}

#define W8A8_KERNELS(T, SUFFIX)                                                                  \
  extern "C" __global__ void quant_fp8_groups_##SUFFIX(unsigned char* q, float* scales,         \
                                                       const T* x, int m, int k) {              \
    quant_fp8_groups<T>(q, scales, x, m, k);                                                     \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(128)                                              \
      w8a8_gemm_##SUFFIX(T* y, const unsigned char* qa, const float* sa, const unsigned char* qw, \
                         const float* sw, int m, int n, int k, int block_n) {                    \
    w8a8_gemm<T>(y, qa, sa, qw, sw, m, n, k, block_n);                                          \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(128) grouped_w8a8_##SUFFIX(                        \
      T* out, const unsigned char* qa, const float* sa, const unsigned char* qw, const float* sw, \
      const unsigned* sorted_ids, const unsigned* expert_ids, const unsigned* num_padded,        \
      int num_entries, int num_experts, int k_in, int n_out, int x_div, int block_n) {           \
    grouped_w8a8<T>(out, qa, sa, qw, sw, sorted_ids, expert_ids, num_padded, num_entries,       \
                    num_experts, k_in, n_out, x_div, block_n);                                   \
  }

W8A8_KERNELS(float, f32)
W8A8_KERNELS(__nv_bfloat16, bf16)
