// Expert routing for a batch of tokens: one thread block per token, router logits [tokens, E]
// (f32) to the top_k chosen experts and their weights. The rules (scores, the three top-k
// methods, tie-breaking, weights) and the CPU reference: crates/ember-kernels/src/moe_routing.rs.
//
// The token's scores and choice scores sit in shared memory; every ranking is k rounds of a
// block-wide argmax (larger value first, lower index on ties), the winner masked after each.
// blockDim.x is a multiple of 32, at most 1024.
#include <float.h>

#include "warp.cuh"

#define ROUTING_MAX_EXPERTS 1024
#define ROUTING_MAX_GROUPS 64
#define ROUTING_MAX_TOPK 32

// (value, index) with the ranking's order: a beats b if larger, or equal with a lower index.
__device__ __forceinline__ bool beats(float va, int ia, float vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

// Argmax of `values[0..n]` over the block; every thread gets the index. `sv`/`si` hold one
// entry per warp.
__device__ int block_argmax(const float* values, int n, float* sv, int* si) {
  float best = -FLT_MAX;
  int idx = 0x7fffffff;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    if (beats(values[i], i, best, idx)) {
      best = values[i];
      idx = i;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best, o);
    const int j = __shfl_xor_sync(0xffffffffu, idx, o);
    if (beats(v, j, best, idx)) {
      best = v;
      idx = j;
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // sv/si may still be read from the previous call
  if (lane == 0) {
    sv[warp] = best;
    si[warp] = idx;
  }
  __syncthreads();
  best = sv[0];
  idx = si[0];
  for (int w = 1; w < (int)(blockDim.x >> 5); ++w)
    if (beats(sv[w], si[w], best, idx)) {
      best = sv[w];
      idx = si[w];
    }
  return idx;
}

// method: 0 greedy, 1 group-limited greedy, 2 noaux_tc (bias-corrected, groups by top-2 sums).
// `live` (may be null): tokens from *live on are a CUDA graph's spare rows, routed to no expert
// (id num_experts, weight 0), which moe_align leaves out and count_experts does not count.
extern "C" __global__ void moe_routing(unsigned* __restrict__ ids, float* __restrict__ weights,
                                       const float* __restrict__ logits,
                                       const float* __restrict__ bias, int num_experts, int top_k,
                                       int n_group, int topk_group, int method, int sigmoid,
                                       int renormalize, float scaling,
                                       const unsigned* __restrict__ live) {
  __shared__ float scores[ROUTING_MAX_EXPERTS];
  __shared__ float choice[ROUTING_MAX_EXPERTS];
  __shared__ float group_score[ROUTING_MAX_GROUPS];
  __shared__ float sv[32];
  __shared__ int si[32];
  __shared__ int chosen[ROUTING_MAX_TOPK];
  __shared__ float red[32];

  const int t = blockIdx.x, e = num_experts;
  const float* row = logits + (size_t)t * e;
  if (live != nullptr && (unsigned)t >= *live) {
    for (int j = threadIdx.x; j < top_k; j += blockDim.x) {
      ids[(size_t)t * top_k + j] = (unsigned)e;
      weights[(size_t)t * top_k + j] = 0.f;
    }
    return;  // the whole block: before any barrier
  }

  if (sigmoid) {
    for (int i = threadIdx.x; i < e; i += blockDim.x) scores[i] = 1.f / (1.f + expf(-row[i]));
  } else {
    // Max-subtracted softmax: the max by argmax, the sum by a block reduction.
    for (int i = threadIdx.x; i < e; i += blockDim.x) choice[i] = row[i];
    __syncthreads();
    const float max = row[block_argmax(choice, e, sv, si)];
    float part = 0.f;
    for (int i = threadIdx.x; i < e; i += blockDim.x) {
      scores[i] = expf(row[i] - max);
      part += scores[i];
    }
    part = warp_sum(part);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = part;
    __syncthreads();
    float sum = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) sum += red[w];
    for (int i = threadIdx.x; i < e; i += blockDim.x) scores[i] = scores[i] / sum;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < e; i += blockDim.x)
    choice[i] = method == 2 ? scores[i] + bias[i] : scores[i];
  __syncthreads();

  if (method != 0) {
    const int per_group = e / n_group;
    // One thread per group: its best choice score, or the sum of its best two.
    for (int g = threadIdx.x; g < n_group; g += blockDim.x) {
      const float* c = choice + g * per_group;
      float b1 = -FLT_MAX, b2 = -FLT_MAX;
      int i1 = 0x7fffffff;
      for (int i = 0; i < per_group; ++i) {
        if (beats(c[i], i, b1, i1)) {
          b2 = b1;
          b1 = c[i];
          i1 = i;
        } else if (c[i] > b2 || c[i] == b2) {
          b2 = fmaxf(b2, c[i]);
        }
      }
      group_score[g] = method == 2 ? b1 + b2 : b1;
    }
    __syncthreads();
    // Keep the best topk_group groups: mark them by ranking rounds; the rest are masked.
    __shared__ int kept[ROUTING_MAX_GROUPS];
    for (int g = threadIdx.x; g < n_group; g += blockDim.x) kept[g] = 0;
    __syncthreads();
    for (int r = 0; r < topk_group; ++r) {
      const int g = block_argmax(group_score, n_group, sv, si);
      __syncthreads();
      if (threadIdx.x == 0) {
        kept[g] = 1;
        group_score[g] = -FLT_MAX;
      }
      __syncthreads();
    }
    for (int i = threadIdx.x; i < e; i += blockDim.x)
      if (!kept[i / per_group]) choice[i] = -INFINITY;
    __syncthreads();
  }

  for (int r = 0; r < top_k; ++r) {
    const int x = block_argmax(choice, e, sv, si);
    __syncthreads();
    if (threadIdx.x == 0) {
      chosen[r] = x;
      choice[x] = -INFINITY;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    float total = 1e-20f;
    for (int r = 0; r < top_k; ++r) total += scores[chosen[r]];
    for (int r = 0; r < top_k; ++r) {
      const float s = renormalize ? scores[chosen[r]] / total : scores[chosen[r]];
      ids[(size_t)t * top_k + r] = (unsigned)chosen[r];
      weights[(size_t)t * top_k + r] = s * scaling;
    }
  }
}
