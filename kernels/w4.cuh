// The weights of 4-bit codes, shared by the W4A16 kernels (w4a16.cu, moe_w4a16.cu). CPU
// reference: crates/ember-kernels/src/w4a16.rs (code_value, weight).
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>

// One 4-bit code's weight before its scale: the integer less the zero point, or the e2m1 value
// (sign bit 3, magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6).
__device__ __forceinline__ float w4_value(unsigned int code, float zero, int e2m1) {
  if (!e2m1) return (float)code - zero;
  // Exponent bits e and mantissa bit m: m / 2 when e is 0, else (1 + m / 2) * 2^(e - 1), built
  // from its f32 bits (no lookup table, which ptxas puts on the stack).
  const unsigned int e = (code >> 1) & 3, m = code & 1;
  const float magnitude = e == 0 ? 0.5f * (float)m : __int_as_float(((e + 126u) << 23) | (m << 22));
  return (code & 8) ? -magnitude : magnitude;
}


// The two weights of one byte of codes (the even input in the low nibble) under its group's
// scale and zero point, rounded to float16 when `f16_weights`.
__device__ __forceinline__ void w4_pair(unsigned char byte, float scale, float zero, int e2m1,
                                        int f16_weights, float& w0, float& w1) {
  w0 = w4_value(byte & 15, zero, e2m1) * scale;
  w1 = w4_value(byte >> 4, zero, e2m1) * scale;
  if (f16_weights) {
    w0 = __half2float(__float2half_rn(w0));
    w1 = __half2float(__float2half_rn(w1));
  }
}

// Group g's scale and zero point (g counted over all rows): a (scale, zero) pair each, or with
// `zeros` off the scale alone and the zero point 8 (unused by e2m1).
__device__ __forceinline__ void w4_group(const float* __restrict__ qparams, long long g, int zeros,
                                         float& scale, float& zero) {
  if (zeros) {
    scale = qparams[2 * g];
    zero = qparams[2 * g + 1];
  } else {
    scale = qparams[g];
    zero = 8.f;
  }
}

// Where a weight's group scales are (W4Scales in w4a16.rs): f32s in qparams (0), or one byte
// per group after each row's k / 2 code bytes, under the row's f32 global in qparams: an e4m3
// times it (1) or divided by it (2), or an e8m0 power of two times it (3).
#define W4_SCALES_F32 0
#define W4_SCALES_E4M3_TIMES 1
#define W4_SCALES_E4M3_OVER 2
#define W4_SCALES_UE8M0 3

// Bytes of one row of codes: its code bytes, and its scale bytes under byte scales.
__device__ __forceinline__ long long w4_row_bytes(int k, int groups, int scales) {
  return (long long)(k / 2) + (scales == W4_SCALES_F32 ? 0 : groups);
}

// Row `row`'s group g (within the row) scale and zero point; `row_codes` are the row's bytes.
__device__ __forceinline__ void w4_row_group(const unsigned char* __restrict__ row_codes,
                                             const float* __restrict__ qparams, long long row,
                                             int k, int groups, int g, int zeros, int scales,
                                             float& scale, float& zero) {
  if (scales == W4_SCALES_F32) {
    w4_group(qparams, row * groups + g, zeros, scale, zero);
    return;
  }
  const unsigned char b = row_codes[k / 2 + g];
  const float global = qparams[row];
  zero = 8.f;
  if (scales == W4_SCALES_UE8M0) {
    // 2^(b - 127) from its bits; 0 is the subnormal 2^-127, 255 NaN.
    const float p = b == 0 ? __int_as_float(1 << 22)
                           : (b == 255 ? __int_as_float(0x7fc00000) : __int_as_float((int)b << 23));
    scale = p * global;
  } else {
    const __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)b, __NV_E4M3);
    const float s = __half2float(__half(h));
    scale = scales == W4_SCALES_E4M3_TIMES ? s * global : s / global;
  }
}

// The weight W[row, c] of a 4-bit matrix of rows of `k` inputs (`row` counted over every row of
// `codes`, so an expert's rows follow the one before), as a float: the shared dequantization of
// w4a16_dequant and the grouped tensor-core GEMM (fused_moe.cu).
__device__ __forceinline__ float w4_weight(const unsigned char* __restrict__ codes,
                                           const float* __restrict__ qparams, long long row,
                                           int c, int k, int group_size, int f16_weights,
                                           int e2m1, int zeros, int scales) {
  const int groups = k / group_size;
  const unsigned char* row_codes = codes + row * w4_row_bytes(k, groups, scales);
  const unsigned char byte = row_codes[c / 2];
  const unsigned int code = (c % 2 == 0) ? (byte & 15) : (byte >> 4);
  float s, z;
  w4_row_group(row_codes, qparams, row, k, groups, c / group_size, zeros, scales, s, z);
  float w = w4_value(code, z, e2m1) * s;
  if (f16_weights) w = __half2float(__float2half_rn(w));
  return w;
}
