// The split form of attention over long contexts (flash-decoding), shared by paged_attention.cu
// and mla_decode.cu: block (t, h, s) walks only run s of token t's context and stores its
// normalized output row and its softmax's max and sum as f32 partials; a second kernel merges
// each (t, h)'s runs, weighing run s by l_s * exp(m_s - M). The reference is
// split_attend in crates/ember-kernels/src/paged_attention.rs.
#pragma once

#include <float.h>

#include "element.cuh"

// Run s of `splits` over a context of ctx positions: ceil(ctx / splits) rounded up to whole
// tiles of `tile` positions, so the last runs of a short context are empty (lo == hi == ctx).
__device__ __forceinline__ void split_run(int ctx, int splits, int s, int tile, int* lo, int* hi) {
  const int per = (ctx + splits - 1) / splits;
  const int len = max(1, (per + tile - 1) / tile) * tile;
  *lo = min(ctx, s * len);
  *hi = min(ctx, *lo + len);
}

// Stores partial `part` (a (token, head, split) index): its row acc / l (zeros for an empty
// run, whose m = -FLT_MAX and l = 0 weigh nothing in the merge), then m and l. Thread tid holds
// the row's dims tid, tid + THREADS, ... in acc.
template <int N, int THREADS>
__device__ __forceinline__ void store_split(float* __restrict__ part_out,
                                            float* __restrict__ part_ml, size_t part,
                                            const float (&acc)[N], float m, float l, int v_dim) {
  float* o = part_out + part * v_dim;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int d = threadIdx.x + i * THREADS;
    if (d < v_dim) o[d] = l > 0.f ? acc[i] / l : 0.f;
  }
  if (threadIdx.x == 0) {
    part_ml[2 * part] = m;
    part_ml[2 * part + 1] = l;
  }
}

// Merges the `splits` partials from `base` on into the v_dim values of `out`.
template <typename T>
__device__ void merge_splits(T* __restrict__ out, const float* __restrict__ part_out,
                             const float* __restrict__ part_ml, size_t base, int v_dim,
                             int splits) {
  float top = -FLT_MAX;
  for (int s = 0; s < splits; ++s) top = fmaxf(top, part_ml[2 * (base + s)]);
  float total = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float l = part_ml[2 * (base + s) + 1];
    if (l > 0.f) total += l * __expf(part_ml[2 * (base + s)] - top);
  }
  for (int d = threadIdx.x; d < v_dim; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float l = part_ml[2 * (base + s) + 1];
      if (l > 0.f) acc += l * __expf(part_ml[2 * (base + s)] - top) * part_out[(base + s) * v_dim + d];
    }
    out[d] = store_f32<T>(acc / total);
  }
}
