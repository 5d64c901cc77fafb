// The LLM.int8 per-element rules (ARCHITECTURE.md §4, §4.1), shared by every C++ and CUDA
// kernel: row codes, outlier test and dequantization of the int32 accumulators. The
// definition they reproduce is lowprec_kernels/reference/int8.py:
//
//   scale = 127 / absmax                 (float32 IEEE division, once per row)
//   code  = clamp(rint(x * scale), ±127)  (half to even; a NaN product codes as 0)
//   y     = acc * row_stat * col_stat / 127²  (in float64, rounded once)
//
// An all-zero row has scale inf and codes 0 * inf = NaN -> 0; an infinite absmax has scale 0
// and codes 0 (inf * 0 = NaN -> 0); a NaN absmax codes every element as 0.
#pragma once

#include <math.h>

#include <cstdint>

#include "lowprec/common.h"

namespace lowprec {

// The largest code magnitude (codes never use -128), as the float the rules compute with.
constexpr float kInt8ScaleFloat = static_cast<float>(kInt8Scale);

LP_HOST_DEVICE inline float int8_row_scale(float absmax) {
  return kInt8ScaleFloat / absmax;
}

// rint(x * scale) clamped to ±127, as a float (an integer value); NaN -> 0.
LP_HOST_DEVICE inline float int8_code_value(float x, float scale) {
  const float v = rintf(x * scale);
  if (v != v) return 0.0f;
  return fminf(fmaxf(v, -kInt8ScaleFloat), kInt8ScaleFloat);
}

LP_HOST_DEVICE inline int8_t int8_encode(float x, float scale) {
  return static_cast<int8_t>(int8_code_value(x, scale));
}

// NaN is never an outlier: |NaN| >= threshold is false.
LP_HOST_DEVICE inline bool int8_is_outlier(float x, float threshold) {
  return fabsf(x) >= threshold;
}

// The per-column factor col_stat / 127² of the dequantization, in float64.
LP_HOST_DEVICE inline double int8_column_dequant_scale(float col_stat) {
  return static_cast<double>(col_stat) / (static_cast<double>(kInt8Scale) * kInt8Scale);
}

// acc * row_stat * col_stat / 127², with column_scale = int8_column_dequant_scale(col_stat):
// in float64 and rounded once to float32, as the reference's float64 product is. (In float32,
// row_stat * col_stat overflowed at extreme scales, giving a zero accumulator 0 * inf = NaN,
// and lost bits below FLT_MIN.) Every CPU path takes these operations in this order.
LP_HOST_DEVICE inline float int8_dequantize(int32_t acc, float row_stat, double column_scale) {
  return static_cast<float>(static_cast<double>(acc) * row_stat * column_scale);
}

// One dequantized weight element of an outlier column, W_deq = code * (col_stat / 127), in
// float32 as reference.int8.int8_dequantize_weight computes it.
LP_HOST_DEVICE inline float int8_dequantize_weight(int8_t code, float col_stat) {
  return static_cast<float>(code) * (col_stat / kInt8ScaleFloat);
}

}  // namespace lowprec
