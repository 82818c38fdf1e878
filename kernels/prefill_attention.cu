// Causal attention of one sequence's prefill chunk over keys and values laid out contiguously
// (MLA's prefill, which expands the latent cache into per-head keys and values first): out[i, h]
// = softmax_j(scale . q[i, h] . k[j, h]) . v[j, h] over the keys j <= past + i, past = kv_len -
// q_len. FlashAttention-2's scheme on bf16 tensor cores (mma.sync m16n8k16, f32 accumulate): a
// block of 4 warps takes 64 query rows of one head, each warp 16 of them with its queries in
// registers; keys and values stream through shared memory 32 at a time, the scores stay in
// registers under an online softmax (rescaled by exp(m_old - m_new) per tile), the probabilities
// are rounded to bf16 for the product with the values. Head sizes up to 192 (keys) and 128
// (values), any multiple of 2 (the rest of a 16-wide step is zeros). CPU reference and its
// numerics: crates/ember-kernels/src/prefill_attention.rs.
#include <cuda_bf16.h>
#include <float.h>

#define PF_WARPS 4
#define PF_BM 64  // query rows per block: 16 a warp
#define PF_BN 32  // keys per tile
#define PF_MAXD 192
#define PF_MAXDV 128
#define PF_LDK (PF_MAXD + 8)  // shared row strides (bf16), padded against bank conflicts
#define PF_LDV (PF_MAXDV + 8)

__device__ __forceinline__ unsigned pf_pack(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return (unsigned)__bfloat16_as_ushort(lo) | ((unsigned)__bfloat16_as_ushort(hi) << 16);
}

__device__ __forceinline__ unsigned pf_pack_f32(float lo, float hi) {
  return pf_pack(__float2bfloat16_rn(lo), __float2bfloat16_rn(hi));
}

// c += a . b for a 16x16 (row) and b 16x8 (col) bf16 fragment, c 16x8 f32.
__device__ __forceinline__ void pf_mma(float c[4], const unsigned a[4], const unsigned b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

extern "C" __global__ void __launch_bounds__(PF_WARPS * 32) prefill_attention_bf16(
    __nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ q,
    const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v, int q_len,
    int kv_len, int heads, int dqk, int dv, float scale) {
  __shared__ __align__(16) __nv_bfloat16 Ks[PF_BN * PF_LDK];
  __shared__ __align__(16) __nv_bfloat16 Vs[PF_BN * PF_LDV];
  const int h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;  // the fragments' row group and thread in group
  const int q0 = blockIdx.x * PF_BM + warp * 16;
  const int past = kv_len - q_len;
  const long long k_stride = (long long)heads * dqk, v_stride = (long long)heads * dv;
  const __nv_bfloat16 zero = __float2bfloat16_rn(0.f);

  // This warp's queries as A fragments: rows q0 + g and q0 + g + 8, 16 inputs a step.
  unsigned qa[PF_MAXD / 16][4];
#pragma unroll
  for (int s = 0; s < PF_MAXD / 16; ++s) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = q0 + g + ((i & 1) ? 8 : 0), d = s * 16 + 2 * t + ((i & 2) ? 8 : 0);
      const __nv_bfloat16* row = q + (long long)r * k_stride + (long long)h * dqk;
      const bool in = r < q_len;
      qa[s][i] = pf_pack(in && d < dqk ? row[d] : zero, in && d + 1 < dqk ? row[d + 1] : zero);
    }
  }
  float o[PF_MAXDV / 8][4];
#pragma unroll
  for (int n = 0; n < PF_MAXDV / 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[n][i] = 0.f;
  float m[2] = {-FLT_MAX, -FLT_MAX}, l[2] = {0.f, 0.f};  // rows g and g + 8
  const int d_steps = (dqk + 15) / 16, v_tiles = (dv + 7) / 8;
  // Keys any row of the block sees.
  const int last_row = min(q_len - 1, (int)blockIdx.x * PF_BM + PF_BM - 1);
  const int kv_end = min(kv_len, past + last_row + 1);

  for (int kv0 = 0; kv0 < kv_end; kv0 += PF_BN) {
    __syncthreads();  // the last tile's readers are done
    for (int idx = threadIdx.x; idx < PF_BN * PF_MAXD; idx += blockDim.x) {
      const int r = idx / PF_MAXD, d = idx % PF_MAXD, key = kv0 + r;
      Ks[r * PF_LDK + d] =
          key < kv_len && d < dqk ? k[(long long)key * k_stride + (long long)h * dqk + d] : zero;
    }
    for (int idx = threadIdx.x; idx < PF_BN * PF_MAXDV; idx += blockDim.x) {
      const int r = idx / PF_MAXDV, d = idx % PF_MAXDV, key = kv0 + r;
      Vs[r * PF_LDV + d] =
          key < kv_len && d < dv ? v[(long long)key * v_stride + (long long)h * dv + d] : zero;
    }
    __syncthreads();
    if (q0 >= q_len) continue;  // no rows here; still meets every barrier

    // Scores of the 32 keys: 4 tiles of 8, c0/c1 row g, c2/c3 row g + 8, keys 2t and 2t + 1.
    float sc[PF_BN / 8][4];
#pragma unroll
    for (int n = 0; n < PF_BN / 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) sc[n][i] = 0.f;
#pragma unroll
    for (int s = 0; s < PF_MAXD / 16; ++s) {
      if (s >= d_steps) break;
#pragma unroll
      for (int n = 0; n < PF_BN / 8; ++n) {
        const __nv_bfloat16* kr = Ks + (n * 8 + g) * PF_LDK + s * 16 + 2 * t;
        const unsigned b[2] = {*reinterpret_cast<const unsigned*>(kr),
                               *reinterpret_cast<const unsigned*>(kr + 8)};
        pf_mma(sc[n], qa[s], b);
      }
    }
    // Causal mask and the online softmax.
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int n = 0; n < PF_BN / 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = i >> 1, key = kv0 + n * 8 + 2 * t + (i & 1);
        const int qi = q0 + g + 8 * row;
        const float s = (key < kv_len && key <= past + qi) ? sc[n][i] * scale : -INFINITY;
        sc[n][i] = s;
        mx[row] = fmaxf(mx[row], s);
      }
    float alpha[2], sum[2] = {0.f, 0.f};
#pragma unroll
    for (int row = 0; row < 2; ++row) {
      mx[row] = fmaxf(mx[row], __shfl_xor_sync(0xffffffffu, mx[row], 1));
      mx[row] = fmaxf(mx[row], __shfl_xor_sync(0xffffffffu, mx[row], 2));
      alpha[row] = __expf(m[row] - mx[row]);
      m[row] = mx[row];
    }
#pragma unroll
    for (int n = 0; n < PF_BN / 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float p = __expf(sc[n][i] - m[i >> 1]);
        sc[n][i] = p;
        sum[i >> 1] += p;
      }
#pragma unroll
    for (int row = 0; row < 2; ++row) {
      sum[row] += __shfl_xor_sync(0xffffffffu, sum[row], 1);
      sum[row] += __shfl_xor_sync(0xffffffffu, sum[row], 2);
      l[row] = l[row] * alpha[row] + sum[row];
    }
    // The probabilities as A fragments (16 keys a step): score tiles 2j and 2j + 1.
    unsigned pa[PF_BN / 16][4];
#pragma unroll
    for (int j = 0; j < PF_BN / 16; ++j) {
      pa[j][0] = pf_pack_f32(sc[2 * j][0], sc[2 * j][1]);
      pa[j][1] = pf_pack_f32(sc[2 * j][2], sc[2 * j][3]);
      pa[j][2] = pf_pack_f32(sc[2 * j + 1][0], sc[2 * j + 1][1]);
      pa[j][3] = pf_pack_f32(sc[2 * j + 1][2], sc[2 * j + 1][3]);
    }
#pragma unroll
    for (int n = 0; n < PF_MAXDV / 8; ++n) {
      if (n >= v_tiles) break;
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
#pragma unroll
      for (int j = 0; j < PF_BN / 16; ++j) {
        // B (keys x values): keys 2t, 2t + 1 (and + 8) of step j, value column n * 8 + g.
        const __nv_bfloat16* vc = Vs + (j * 16 + 2 * t) * PF_LDV + n * 8 + g;
        const unsigned b[2] = {pf_pack(vc[0], vc[PF_LDV]),
                               pf_pack(vc[8 * PF_LDV], vc[9 * PF_LDV])};
        pf_mma(o[n], pa[j], b);
      }
    }
  }
  if (q0 >= q_len) return;
#pragma unroll
  for (int row = 0; row < 2; ++row) {
    const int qi = q0 + g + 8 * row;
    if (qi >= q_len) continue;
    const float inv = l[row] > 0.f ? 1.f / l[row] : 0.f;
    __nv_bfloat16* orow = out + (long long)qi * v_stride + (long long)h * dv;
#pragma unroll
    for (int n = 0; n < PF_MAXDV / 8; ++n) {
      if (n >= v_tiles) break;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int c = n * 8 + 2 * t + i;
        if (c < dv) orow[c] = __float2bfloat16_rn(o[n][2 * row + i] * inv);
      }
    }
  }
}
