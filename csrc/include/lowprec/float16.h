// Scalar conversions between float32 and the 16-bit float formats, bit-exact with PyTorch's
// (c10::Half, c10::BFloat16): round to nearest even, subnormals kept, NaN stays NaN. Used by
// the portable CPU path; the SIMD paths and CUDA use instructions that round the same way.
#pragma once

#include <cstdint>

#include "lowprec/common.h"

namespace lowprec {

LP_HOST_DEVICE inline float bf16_bits_to_float(uint16_t bits) {
  return bits_to_float(static_cast<uint32_t>(bits) << 16);
}

// As c10::BFloat16: NaN becomes the canonical quiet NaN 0x7FC0; otherwise round to nearest even.
LP_HOST_DEVICE inline uint16_t float_to_bf16_bits(float x) {
  if (x != x) return 0x7FC0;
  const uint32_t bits = float_to_bits(x);
  const uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

// IEEE half -> float (from the FP16 library by Marat Dukhan, as c10 uses): exact.
inline float fp16_bits_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal numbers: move the exponent and mantissa into place and rebias by multiplication.
  const uint32_t exp_offset = 0xE0u << 23;
  const float normalized = bits_to_float((two_w >> 4) + exp_offset) * 0x1.0p-112f;
  // Subnormals: place the mantissa under a magic exponent and subtract the implicit one.
  const uint32_t magic_mask = 126u << 23;
  const float denormalized = bits_to_float((two_w >> 17) | magic_mask) - 0.5f;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result = sign | (two_w < denormalized_cutoff ? float_to_bits(denormalized)
                                                              : float_to_bits(normalized));
  return bits_to_float(result);
}

// float -> IEEE half, round to nearest even, overflow to inf (FP16 library, as c10 uses).
inline uint16_t float_to_fp16_bits(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  const uint32_t w = float_to_bits(f);
  float base = (bits_to_float(w & 0x7FFFFFFFu) * scale_to_inf) * scale_to_zero;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

}  // namespace lowprec
