// Rotary position embedding over a flattened batch, out of place: one block per token, its threads
// striding over the token's heads x head_dim/2 pairs. Rows of the tables by each token's position,
// or (the _rows kernels) the step's rows already gathered, row t for token t. Rotate-half or interleaved input; the output
// is always rotate-half. CPU reference and the numerics contract: crates/ember-kernels/src/rotary.rs.
#include "element.cuh"

template <typename T>
__device__ void rotary_embedding(T* __restrict__ out, const T* __restrict__ x,
                                 const unsigned* __restrict__ positions, const T* __restrict__ cos_table,
                                 const T* __restrict__ sin_table, int heads, int head_dim, int interleaved) {
  const int half = head_dim >> 1;
  const size_t token = blockIdx.x;
  // Without positions the tables hold the step's rows, one per token.
  const size_t row = (positions ? (size_t)positions[token] : token) * half;
  const size_t base = token * (size_t)heads * head_dim;
  for (int p = threadIdx.x; p < heads * half; p += blockDim.x) {
    const int head = p / half, i = p % half;
    const T* xh = x + base + (size_t)head * head_dim;
    T* oh = out + base + (size_t)head * head_dim;
    const float a = load_f32(interleaved ? xh[2 * i] : xh[i]);
    const float b = load_f32(interleaved ? xh[2 * i + 1] : xh[i + half]);
    const float c = load_f32(cos_table[row + i]), s = load_f32(sin_table[row + i]);
    // __fmul_rn/__fsub_rn/__fadd_rn keep nvcc from contracting into FMAs, as the CPU side rounds.
    oh[i] = store_f32<T>(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
    oh[i + half] = store_f32<T>(__fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
  }
}

#define ROTARY_KERNEL(T, SUFFIX)                                                                   \
  extern "C" __global__ void rotary_embedding_##SUFFIX(T* out, const T* x, const unsigned* positions, \
                                                       const T* cos_table, const T* sin_table,      \
                                                       int heads, int head_dim, int interleaved) {  \
    rotary_embedding<T>(out, x, positions, cos_table, sin_table, heads, head_dim, interleaved);     \
  }                                                                                                \
  extern "C" __global__ void rotary_embedding_rows_##SUFFIX(T* out, const T* x, const T* cos_rows,   \
                                                            const T* sin_rows, int heads,           \
                                                            int head_dim, int interleaved) {        \
    rotary_embedding<T>(out, x, nullptr, cos_rows, sin_rows, heads, head_dim, interleaved);         \
  }

ROTARY_KERNEL(float, f32)
ROTARY_KERNEL(__nv_bfloat16, bf16)
