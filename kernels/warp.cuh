// Warp-level reductions shared by ember's kernels (the whole warp must be active).
#pragma once

// Sum of v over the 32 lanes of the warp, returned to every lane (a butterfly: lanes 16, 8, 4,
// 2, 1 apart, so every kernel that sums this way rounds the same way).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
