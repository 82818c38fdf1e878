// SiLU-and-mul over a fused gate/up projection: input [rows, 2*d] = [gate | up], out [rows, d].
// Grid-stride over the rows*d outputs. CPU reference and the numerics contract:
// crates/ember-kernels/src/silu_and_mul.rs.
#include "element.cuh"

template <typename T>
__device__ void silu_and_mul(T* __restrict__ out, const T* __restrict__ input, int d, long long n) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const long long row = i / d, col = i % d;
    const float g = load_f32(input[row * 2 * d + col]);
    const float u = load_f32(input[row * 2 * d + d + col]);
    out[i] = store_f32<T>(g / (1.f + expf(-g)) * u);
  }
}

#define SILU_AND_MUL_KERNEL(T, SUFFIX)                                                         \
  extern "C" __global__ void silu_and_mul_##SUFFIX(T* out, const T* input, int d, long long n) { \
    silu_and_mul<T>(out, input, d, n);                                                          \
  }

SILU_AND_MUL_KERNEL(float, f32)
SILU_AND_MUL_KERNEL(__nv_bfloat16, bf16)
