// The weight of a 4-bit code before its scale, shared by the W4A16 kernels (w4a16.cu,
// moe_w4a16.cu). CPU reference: crates/ember-kernels/src/w4a16.rs (code_value).
#pragma once

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

