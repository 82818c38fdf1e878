// Sampling where the logits are. Greedy: the argmax of each f32 logits row [rows, vocab], one block per row. Each thread
// scans its strided share, then warps and the block reduce (value, index) pairs under one order:
// larger value first, lower index on ties, NaN never taken. A row with nothing but NaN gives 0.
// CPU reference and the contract: crates/ember-kernels/src/sampling.rs.
#include <float.h>
#include <math_constants.h>

#include "warp.cuh"

#define ARGMAX_THREADS 256
#define NO_INDEX 0xffffffffu

// Whether (v, i) comes before (best, best_i): NaN compares false both ways, so it is never taken.
__device__ __forceinline__ bool argmax_better(float v, unsigned i, float best, unsigned best_i) {
  return v > best || (v == best && i < best_i);
}

// The best (value, index) of the row under argmax_better's order among the indices `eligible`
// keeps, each valued by `value(logit)`, for any blockDim that is a multiple of 32 (at most 1024);
// every thread gets it (index NO_INDEX when nothing is eligible).
template <typename Value, typename Eligible>
__device__ void block_best(const float* row, int vocab, Value value, Eligible eligible,
                           float& best_v, unsigned& best_i) {
  __shared__ float warp_best[32];
  __shared__ unsigned warp_index[32];
  float best = -CUDART_INF_F;
  unsigned bi = NO_INDEX;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = value(row[i]);
    if (eligible(v, (unsigned)i) && argmax_better(v, (unsigned)i, best, bi)) {
      best = v;
      bi = (unsigned)i;
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float v = __shfl_down_sync(0xffffffffu, best, offset);
    const unsigned i = __shfl_down_sync(0xffffffffu, bi, offset);
    if (argmax_better(v, i, best, bi)) {
      best = v;
      bi = i;
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // the arrays may still be read from the previous call
  if (lane == 0) {
    warp_best[warp] = best;
    warp_index[warp] = bi;
  }
  __syncthreads();
  best = warp_best[0];
  bi = warp_index[0];
  for (int w = 1; w < (int)(blockDim.x >> 5); ++w) {
    if (argmax_better(warp_best[w], warp_index[w], best, bi)) {
      best = warp_best[w];
      bi = warp_index[w];
    }
  }
  best_v = best;
  best_i = bi;
}

// The row's argmax under argmax_better's order (0 for a row of nothing but NaN); every thread
// gets it.
__device__ unsigned block_argmax(const float* row, int vocab) {
  float v;
  unsigned i;
  block_best(
      row, vocab, [](float logit) { return logit; }, [](float, unsigned) { return true; }, v, i);
  return i == NO_INDEX ? 0u : i;
}

extern "C" __global__ void argmax_f32(unsigned* __restrict__ out, const float* __restrict__ logits,
                                      int vocab) {
  const unsigned best = block_argmax(logits + (size_t)blockIdx.x * vocab, vocab);
  if (threadIdx.x == 0) out[blockIdx.x] = best;
}

// --- Temperature sampling with top-k, top-p and min-p: one block of SAMPLE_THREADS per row. -----
// The rules and the CPU reference: crates/ember-kernels/src/sampling.rs (sample_rows). Every sum
// is over 64-bit fixed-point masses and every cut an exact radix select over order-preserving
// keys, so the result does not depend on the order threads add in.
#define SAMPLE_THREADS 512
#define MASS_ONE 1099511627776.0  // 2^40

__device__ __forceinline__ float sample_score(float logit, float t) {
  const float s = __fdiv_rn(logit, t);
  if (isnan(s)) return -CUDART_INF_F;
  if (s == CUDART_INF_F) return FLT_MAX;
  return s;
}

__device__ __forceinline__ unsigned sample_key(float s) {
  const unsigned b = __float_as_uint(s);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ unsigned long long sample_mass(float w) {
  return (unsigned long long)((double)w * MASS_ONE);
}

__device__ float sample_block_max(float v) {
  __shared__ float warp_max[32];
  __shared__ float result;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = -CUDART_INF_F;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) m = fmaxf(m, warp_max[w]);
    result = m;
  }
  __syncthreads();
  return result;
}

__device__ unsigned long long sample_block_sum(unsigned long long v) {
  __shared__ unsigned long long warp_sum[32];
  __shared__ unsigned long long result;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) warp_sum[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long s = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += warp_sum[w];
    result = s;
  }
  __syncthreads();
  return result;
}

// The largest key K whose weight at or above it reaches `target`: `by_mass` weighs each token by
// its mass (of those with key >= `floor_key`), else by one.
__device__ unsigned sample_select(const float* row, int vocab, float t, float m,
                                  unsigned floor_key, unsigned long long target, bool by_mass) {
  __shared__ unsigned long long hist[256];
  __shared__ unsigned prefix_s;
  __shared__ unsigned long long remaining_s;
  __syncthreads();  // every thread has read the previous call's prefix_s
  if (threadIdx.x == 0) {
    prefix_s = 0;
    remaining_s = target;
  }
  unsigned mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += blockDim.x) hist[d] = 0;
    __syncthreads();
    const unsigned prefix = prefix_s;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float s = sample_score(row[i], t);
      const unsigned key = sample_key(s);
      if ((key & mask) == prefix && key >= floor_key) {
        const unsigned long long w = by_mass ? sample_mass(expf(s - m)) : 1ull;
        atomicAdd(&hist[(key >> shift) & 255u], w);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long acc = 0, remaining = remaining_s;
      int chosen = 0;
      for (int d = 255; d >= 0; --d) {
        if (hist[d] > 0 && acc + hist[d] >= remaining) {
          chosen = d;
          break;
        }
        acc += hist[d];
      }
      remaining_s = remaining - (acc < remaining ? acc : remaining);
      prefix_s = prefix | ((unsigned)chosen << shift);
    }
    mask |= 255u << shift;
    __syncthreads();
  }
  return prefix_s;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows_f32(unsigned* __restrict__ out, const float* __restrict__ logits,
                    const float* __restrict__ params, int vocab) {
  const float* row = logits + (size_t)blockIdx.x * vocab;
  const float* p = params + (size_t)blockIdx.x * 5;
  const float t = p[0], top_p = p[2], min_p = p[3], u = p[4];
  const unsigned top_k = (unsigned)p[1];
  if (!(t > 0.f)) {
    const unsigned best = block_argmax(row, vocab);
    if (threadIdx.x == 0) out[blockIdx.x] = best;
    return;
  }
  float m = -CUDART_INF_F;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, sample_score(row[i], t));
  m = sample_block_max(m);
  if (m == -CUDART_INF_F) {
    const unsigned best = block_argmax(row, vocab);
    if (threadIdx.x == 0) out[blockIdx.x] = best;
    return;
  }
  unsigned cut = 0;
  if (top_k > 0 && top_k < (unsigned)vocab) cut = sample_select(row, vocab, t, m, 0u, top_k, false);
  if (top_p < 1.f) {
    unsigned long long total = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float s = sample_score(row[i], t);
      if (sample_key(s) >= cut) total += sample_mass(expf(s - m));
    }
    total = sample_block_sum(total);
    const unsigned long long target = (unsigned long long)((double)top_p * (double)total);
    const unsigned cut_p = sample_select(row, vocab, t, m, cut, target, true);
    cut = cut_p > cut ? cut_p : cut;
  }
  // The kept tokens' masses, their total, then the first id whose running mass passes the target.
  unsigned long long total = 0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float s = sample_score(row[i], t);
    const float w = expf(s - m);
    if (sample_key(s) >= cut && (min_p <= 0.f || w >= min_p)) total += sample_mass(w);
  }
  total = sample_block_sum(total);
  if (total == 0) {
    const unsigned best = block_argmax(row, vocab);
    if (threadIdx.x == 0) out[blockIdx.x] = best;
    return;
  }
  const unsigned long long target = (unsigned long long)((double)u * (double)total);
  __shared__ unsigned long long warp_sums[32];
  __shared__ unsigned found;
  if (threadIdx.x == 0) found = NO_INDEX;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  unsigned long long base = 0;
  for (int start = 0; start < vocab; start += blockDim.x) {
    const int i = start + threadIdx.x;
    unsigned long long mass = 0;
    if (i < vocab) {
      const float s = sample_score(row[i], t);
      const float w = expf(s - m);
      if (sample_key(s) >= cut && (min_p <= 0.f || w >= min_p)) mass = sample_mass(w);
    }
    // Inclusive scan of the chunk's masses in id order.
    unsigned long long incl = mass;
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long up = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += up;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    unsigned long long before = base;
    for (int w = 0; w < warp; ++w) before += warp_sums[w];
    if (mass > 0 && before + incl > target && before + incl - mass <= target) atomicMin(&found, (unsigned)i);
    unsigned long long chunk = 0;
    for (int w = 0; w < warps; ++w) chunk += warp_sums[w];
    __syncthreads();
    if (found != NO_INDEX) break;
    base += chunk;
  }
  if (found == NO_INDEX) {
    const unsigned best = block_argmax(row, vocab);
    if (threadIdx.x == 0) out[blockIdx.x] = best;
    return;
  }
  if (threadIdx.x == 0) out[blockIdx.x] = found;
}

// --- Logprobs of the drawn tokens: one block of LOGPROB_THREADS per row. ------------------------
// As crates/ember-kernels/src/sampling.rs's log_softmax_top: logits through finite_or_neg_inf,
// exp in f32 and their sum in f64, the token's logprob and the k best tokens (value first, lower
// id on ties), found as k passes each taking the best after the previous one in that order. Out:
// per row [logprob, id_0, logprob_0, ..., id_k-1, logprob_k-1] (ids as exact f32s).
#define LOGPROB_THREADS 512

__device__ __forceinline__ float lp_value(float logit) {
  return isnan(logit) ? -CUDART_INF_F : fminf(logit, FLT_MAX);
}

extern "C" __global__ void __launch_bounds__(LOGPROB_THREADS)
    token_logprobs_f32(float* __restrict__ out, const float* __restrict__ logits,
                       const unsigned* __restrict__ tokens, int vocab, int k) {
  __shared__ float max_scratch[32];
  __shared__ double sums[32];
  const float* row = logits + (size_t)blockIdx.x * vocab;
  float* o = out + (size_t)blockIdx.x * (1 + 2 * k);
  float m = -CUDART_INF_F;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, lp_value(row[i]));
  m = block_max(m, max_scratch);
  double sum = 0.0;
  if (m != -CUDART_INF_F)
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) sum += (double)expf(lp_value(row[i]) - m);
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sums[warp] = sum;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += sums[w];
  const double log_norm = m == -CUDART_INF_F ? CUDART_INF : (double)m + log(total);
  if (threadIdx.x == 0) {
    const unsigned t = tokens[blockIdx.x];
    const float lt = t < (unsigned)vocab ? lp_value(row[t]) : -CUDART_INF_F;
    o[0] = (float)((double)lt - log_norm);
  }
  float after_v = CUDART_INF_F;
  unsigned after_i = NO_INDEX;
  for (int j = 0; j < k; ++j) {
    float v;
    unsigned i;
    // The best strictly after the previous one in the order.
    block_best(
        row, vocab, lp_value,
        [=](float x, unsigned id) { return x < after_v || (x == after_v && id > after_i); }, v,
        i);
    if (threadIdx.x == 0) {
      o[1 + 2 * j] = (float)i;
      o[2 + 2 * j] = (float)((double)v - log_norm);
    }
    after_v = v;
    after_i = i;
  }
}
