// MLA attention in the absorbed form over the latent cache (DeepSeek-V2/V3, Kimi K2): one thread
// block per (query token, query head); token t attends to the first token_ctx[t] positions of its
// sequence, read through the sequence's block table. Every head shares one cached row per position:
// the latent c (kv_lora_rank) and the roped key k_r (rope_dim), in two caches. The score is
// scale * (q_latent . c + q_rope . k_r), the value is c itself. Layouts and the numerics contract:
// crates/ember-kernels/src/mla_decode.rs (the CPU reference).
//
// As paged_attention.cu: the context in tiles of blockDim.x positions, each thread scoring one
// position, an online softmax over the tiles, output dims spread over the threads (coalesced
// latent reads). blockDim.x must be MLA_THREADS. Over long contexts with few (token, head) pairs
// (a rank's 16 heads under tensor parallelism) the split form of split_softmax.cuh, as in
// paged_attention.cu; the reference is mla_decode_split.
#include <float.h>

#include "element.cuh"
#include "split_softmax.cuh"
#include "warp.cuh"

#define MLA_THREADS 128
// kv_lora_rank / MLA_THREADS, rounded up: MLA_MAX_RANK (1024) in mla_decode.rs.
#define MLA_MAX_V_PER_THREAD 8

template <typename T>
__device__ void mla_decode(T* __restrict__ out, const T* __restrict__ q,
                           const T* __restrict__ latent_cache, const T* __restrict__ rope_cache,
                           const unsigned* __restrict__ block_tables,
                           const unsigned* __restrict__ token_seq,
                           const unsigned* __restrict__ token_ctx, float scale, int num_heads,
                           int rank, int rope_dim, int block_size, int max_blocks, int splits,
                           float* __restrict__ part_out, float* __restrict__ part_ml) {
  extern __shared__ float smem[];
  const int q_dim = rank + rope_dim;
  float* q_s = smem;                                 // [rank + rope_dim]
  float* w_s = q_s + q_dim;                          // [MLA_THREADS]: the tile's weights
  unsigned* slot_s = (unsigned*)(w_s + MLA_THREADS);  // [MLA_THREADS]: the tile's slots
  float* scratch = (float*)(slot_s + MLA_THREADS);    // [MLA_THREADS / 32]

  const int t = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
  const unsigned* table = block_tables + (size_t)token_seq[t] * max_blocks;
  const int ctx = (int)token_ctx[t];
  // This block's run of the context: all of it, or split blockIdx.z of `splits`.
  int lo = 0, hi = ctx;
  if (splits > 1) split_run(ctx, splits, blockIdx.z, MLA_THREADS, &lo, &hi);

  const T* q_row = q + ((size_t)t * num_heads + h) * q_dim;
  for (int d = tid; d < q_dim; d += blockDim.x) q_s[d] = load_f32(q_row[d]);
  __syncthreads();

  float acc[MLA_MAX_V_PER_THREAD];
#pragma unroll
  for (int i = 0; i < MLA_MAX_V_PER_THREAD; ++i) acc[i] = 0.f;
  float m = -FLT_MAX, l = 0.f;

  for (int base = lo; base < hi; base += MLA_THREADS) {
    const int p = base + tid;
    float s = -FLT_MAX;
    if (p < hi) {
      const unsigned slot = table[p / block_size] * (unsigned)block_size + (unsigned)(p % block_size);
      slot_s[tid] = slot;
      const T* c_row = latent_cache + (size_t)slot * rank;
      const T* r_row = rope_cache + (size_t)slot * rope_dim;
      float dot = 0.f;
      for (int d = 0; d < rank; ++d) dot += q_s[d] * load_f32(c_row[d]);
      float rope = 0.f;
      for (int d = 0; d < rope_dim; ++d) rope += q_s[rank + d] * load_f32(r_row[d]);
      s = (dot + rope) * scale;
    }
    const float m_new = fmaxf(m, block_max(s, scratch));
    const float alpha = __expf(m - m_new);
    w_s[tid] = p < hi ? __expf(s - m_new) : 0.f;
    __syncthreads();
    const int n = min(MLA_THREADS, hi - base);
    float tile_sum = 0.f;
    for (int j = 0; j < n; ++j) tile_sum += w_s[j];
    l = l * alpha + tile_sum;
#pragma unroll
    for (int i = 0; i < MLA_MAX_V_PER_THREAD; ++i) {
      const int d = tid + i * MLA_THREADS;
      if (d < rank) {
        float a = acc[i] * alpha;
        for (int j = 0; j < n; ++j) a += w_s[j] * load_f32(latent_cache[(size_t)slot_s[j] * rank + d]);
        acc[i] = a;
      }
    }
    m = m_new;
    __syncthreads();  // w_s and slot_s are rewritten by the next tile
  }
  if (splits > 1) {
    store_split<MLA_MAX_V_PER_THREAD, MLA_THREADS>(
        part_out, part_ml, ((size_t)t * num_heads + h) * splits + blockIdx.z, acc, m, l, rank);
    return;
  }
  T* o = out + ((size_t)t * num_heads + h) * rank;
#pragma unroll
  for (int i = 0; i < MLA_MAX_V_PER_THREAD; ++i) {
    const int d = tid + i * MLA_THREADS;
    if (d < rank) o[d] = store_f32<T>(acc[i] / l);
  }
}

#define MLA_DECODE_KERNEL(T, SUFFIX)                                                               \
  extern "C" __global__ void __launch_bounds__(MLA_THREADS) mla_decode_##SUFFIX(                   \
      T* out, const T* q, const T* latent_cache, const T* rope_cache, const unsigned* block_tables, \
      const unsigned* token_seq, const unsigned* token_ctx, float scale, int num_heads, int rank,   \
      int rope_dim, int block_size, int max_blocks) {                                              \
    mla_decode<T>(out, q, latent_cache, rope_cache, block_tables, token_seq, token_ctx, scale,     \
                  num_heads, rank, rope_dim, block_size, max_blocks, 1, nullptr, nullptr);         \
  }                                                                                                \
  /* At most 96 registers: under __launch_bounds__ sm_100 ptxas picks 32 and spills f32. */    \
  extern "C" __global__ void __maxnreg__(96) mla_decode_split_##SUFFIX(                            \
      const T* q, const T* latent_cache, const T* rope_cache, const unsigned* block_tables,        \
      const unsigned* token_seq, const unsigned* token_ctx, float scale, int num_heads, int rank,  \
      int rope_dim, int block_size, int max_blocks, int splits, float* part_out, float* part_ml) { \
    mla_decode<T>(nullptr, q, latent_cache, rope_cache, block_tables, token_seq, token_ctx, scale, \
                  num_heads, rank, rope_dim, block_size, max_blocks, splits, part_out, part_ml);   \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(MLA_THREADS) mla_decode_merge_##SUFFIX(             \
      T* out, const float* part_out, const float* part_ml, int num_heads, int rank, int splits) {  \
    const size_t pair = (size_t)blockIdx.x * num_heads + blockIdx.y;                               \
    merge_splits<T>(out + pair * rank, part_out, part_ml, pair * splits, rank, splits);            \
  }

MLA_DECODE_KERNEL(float, f32)
MLA_DECODE_KERNEL(__nv_bfloat16, bf16)
