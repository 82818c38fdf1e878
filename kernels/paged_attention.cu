// Paged attention for the flattened batch (prefill chunks and decodes alike): one thread block
// per (query token, query head); token t attends to the first token_ctx[t] positions of its
// sequence, read through the sequence's block table. Layouts, GQA and the numerics contract:
// crates/ember-kernels/src/paged_attention.rs (the CPU reference).
//
// The context is walked in tiles of blockDim.x positions: each thread scores one position of the
// tile (q in shared memory, a serial dot over head_dim), the block reduces the tile's max, and an
// online softmax rescales the running sum and the per-thread output accumulators by
// exp(m_old - m_new). Output dims are spread over the threads (d = tid, tid + blockDim.x, ...),
// so each value row is read coalesced. blockDim.x must be PA_THREADS.
//
// Over long contexts with few (token, head) pairs the split form (flash-decoding) adds a third
// grid dimension: block (t, h, s) walks only run s of token t's context (split_range in
// paged_attention.rs: whole tiles, each token's context cut into `splits` runs on the device, so
// a CUDA graph's launch splits whatever contexts it replays over) and writes its normalized
// output row, max and sum to f32 partials; paged_attention_merge then weighs the runs by
// l * exp(m - M) and writes out (split_softmax.cuh). The reference is paged_attention_split.
#include <float.h>

#include "element.cuh"
#include "split_softmax.cuh"
#include "warp.cuh"

#define PA_THREADS 128
// v_dim / PA_THREADS, rounded up: MAX_V_DIM (1024) in paged_attention.rs.
#define PA_MAX_V_PER_THREAD 8

template <typename T>
__device__ void paged_attention(T* __restrict__ out, const T* __restrict__ q,
                                const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                const unsigned* __restrict__ block_tables,
                                const unsigned* __restrict__ token_seq,
                                const unsigned* __restrict__ token_ctx, float scale, int num_heads,
                                int num_kv_heads, int head_dim, int v_dim, int block_size,
                                int max_blocks, int splits, float* __restrict__ part_out,
                                float* __restrict__ part_ml) {
  extern __shared__ float smem[];
  float* q_s = smem;                        // [head_dim]
  float* w_s = q_s + head_dim;              // [PA_THREADS]: the tile's weights
  unsigned* slot_s = (unsigned*)(w_s + PA_THREADS);  // [PA_THREADS]: the tile's slots
  float* scratch = (float*)(slot_s + PA_THREADS);    // [PA_THREADS / 32]

  const int t = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
  const int kv = h / (num_heads / num_kv_heads);
  const unsigned* table = block_tables + (size_t)token_seq[t] * max_blocks;
  const int ctx = (int)token_ctx[t];
  // This block's run of the context: all of it, or split blockIdx.z of `splits`.
  int lo = 0, hi = ctx;
  if (splits > 1) split_run(ctx, splits, blockIdx.z, PA_THREADS, &lo, &hi);

  const T* q_row = q + ((size_t)t * num_heads + h) * head_dim;
  for (int d = tid; d < head_dim; d += blockDim.x) q_s[d] = load_f32(q_row[d]);
  __syncthreads();

  float acc[PA_MAX_V_PER_THREAD];
#pragma unroll
  for (int i = 0; i < PA_MAX_V_PER_THREAD; ++i) acc[i] = 0.f;
  float m = -FLT_MAX, l = 0.f;

  for (int base = lo; base < hi; base += PA_THREADS) {
    const int p = base + tid;
    float s = -FLT_MAX;
    if (p < hi) {
      const unsigned slot = table[p / block_size] * (unsigned)block_size + (unsigned)(p % block_size);
      slot_s[tid] = slot;
      const T* k_row = k_cache + ((size_t)slot * num_kv_heads + kv) * head_dim;
      float dot = 0.f;
      for (int d = 0; d < head_dim; ++d) dot += q_s[d] * load_f32(k_row[d]);
      s = dot * scale;
    }
    const float m_new = fmaxf(m, block_max(s, scratch));
    const float alpha = __expf(m - m_new);
    w_s[tid] = p < hi ? __expf(s - m_new) : 0.f;
    __syncthreads();
    const int n = min(PA_THREADS, hi - base);
    float tile_sum = 0.f;
    for (int j = 0; j < n; ++j) tile_sum += w_s[j];
    l = l * alpha + tile_sum;
#pragma unroll
    for (int i = 0; i < PA_MAX_V_PER_THREAD; ++i) {
      const int d = tid + i * PA_THREADS;
      if (d < v_dim) {
        float a = acc[i] * alpha;
        for (int j = 0; j < n; ++j)
          a += w_s[j] * load_f32(v_cache[((size_t)slot_s[j] * num_kv_heads + kv) * v_dim + d]);
        acc[i] = a;
      }
    }
    m = m_new;
    __syncthreads();  // w_s and slot_s are rewritten by the next tile
  }
  if (splits == 1) {
    T* o = out + ((size_t)t * num_heads + h) * v_dim;
#pragma unroll
    for (int i = 0; i < PA_MAX_V_PER_THREAD; ++i) {
      const int d = tid + i * PA_THREADS;
      if (d < v_dim) o[d] = store_f32<T>(acc[i] / l);
    }
    return;
  }
  store_split<PA_MAX_V_PER_THREAD, PA_THREADS>(
      part_out, part_ml, ((size_t)t * num_heads + h) * splits + blockIdx.z, acc, m, l, v_dim);
}

#define PAGED_ATTENTION_KERNEL(T, SUFFIX)                                                        \
  extern "C" __global__ void __launch_bounds__(PA_THREADS) paged_attention_##SUFFIX(             \
      T* out, const T* q, const T* k_cache, const T* v_cache, const unsigned* block_tables,      \
      const unsigned* token_seq, const unsigned* token_ctx, float scale, int num_heads,          \
      int num_kv_heads, int head_dim, int v_dim, int block_size, int max_blocks) {               \
    paged_attention<T>(out, q, k_cache, v_cache, block_tables, token_seq, token_ctx, scale,      \
                       num_heads, num_kv_heads, head_dim, v_dim, block_size, max_blocks, 1,      \
                       nullptr, nullptr);                                                        \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(PA_THREADS) paged_attention_split_##SUFFIX(       \
      const T* q, const T* k_cache, const T* v_cache, const unsigned* block_tables,              \
      const unsigned* token_seq, const unsigned* token_ctx, float scale, int num_heads,          \
      int num_kv_heads, int head_dim, int v_dim, int block_size, int max_blocks, int splits,     \
      float* part_out, float* part_ml) {                                                         \
    paged_attention<T>(nullptr, q, k_cache, v_cache, block_tables, token_seq, token_ctx, scale,  \
                       num_heads, num_kv_heads, head_dim, v_dim, block_size, max_blocks, splits, \
                       part_out, part_ml);                                                       \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(PA_THREADS) paged_attention_merge_##SUFFIX(       \
      T* out, const float* part_out, const float* part_ml, int num_heads, int v_dim,             \
      int splits) {                                                                              \
    const size_t pair = (size_t)blockIdx.x * num_heads + blockIdx.y;                             \
    merge_splits<T>(out + pair * v_dim, part_out, part_ml, pair * splits, v_dim, splits);        \
  }

PAGED_ATTENTION_KERNEL(float, f32)
PAGED_ATTENTION_KERNEL(__nv_bfloat16, bf16)
