// Greedy sampling: the argmax of each f32 logits row [rows, vocab], one block per row. Each thread
// scans its strided share, then warps and the block reduce (value, index) pairs under one order:
// larger value first, lower index on ties, NaN never taken. A row with nothing but NaN gives 0.
// CPU reference and the contract: crates/ember-kernels/src/sampling.rs.
#include <math_constants.h>

#define ARGMAX_THREADS 256
#define NO_INDEX 0xffffffffu

// Whether (v, i) comes before (best, best_i): NaN compares false both ways, so it is never taken.
__device__ __forceinline__ bool argmax_better(float v, unsigned i, float best, unsigned best_i) {
  return v > best || (v == best && i < best_i);
}

extern "C" __global__ void argmax_f32(unsigned* __restrict__ out, const float* __restrict__ logits,
                                      int vocab) {
  const float* row = logits + (size_t)blockIdx.x * vocab;
  float best = -CUDART_INF_F;
  unsigned best_i = NO_INDEX;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = row[i];
    if (argmax_better(v, (unsigned)i, best, best_i)) {
      best = v;
      best_i = (unsigned)i;
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float v = __shfl_down_sync(0xffffffffu, best, offset);
    const unsigned i = __shfl_down_sync(0xffffffffu, best_i, offset);
    if (argmax_better(v, i, best, best_i)) {
      best = v;
      best_i = i;
    }
  }
  __shared__ float warp_best[ARGMAX_THREADS / 32];
  __shared__ unsigned warp_index[ARGMAX_THREADS / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    warp_best[warp] = best;
    warp_index[warp] = best_i;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) {
      if (argmax_better(warp_best[w], warp_index[w], best, best_i)) {
        best = warp_best[w];
        best_i = warp_index[w];
      }
    }
    out[blockIdx.x] = best_i == NO_INDEX ? 0u : best_i;
  }
}
