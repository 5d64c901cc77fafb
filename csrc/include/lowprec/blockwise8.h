// The blockwise 8-bit encoding rule (ARCHITECTURE.md §4.1), shared by every C++ and CUDA
// kernel that turns a float into the index of its nearest codebook entry: blockwise
// quantization, the double-quantized 4-bit absmax and the 8-bit Adam states.
//
// The rule, exactly as lowprec_kernels/reference/codebooks.py defines it:
//   absmax  = max |x| over the block, NaN if the block holds a NaN;
//   v       = absmax == 0 ? 0 : x / absmax          (fp32, IEEE division);
//   code    = #{ i in 0..254 : v > t_i }            (ties go low, NaN v gives 0);
//   t_i     = the largest float32 <= (code[i] + code[i+1]) / 2, the midpoint taken exactly.
#pragma once

#include <math.h>

#include <cstdint>

#include "lowprec/common.h"

namespace lowprec {

// Threshold tables are padded with +inf to a power of two, so the binary search below needs
// no bounds check: +inf is never below a value (and NaN is below nothing).
constexpr int kThresholdTableSize8bit = kCodebookSize8bit;

// The largest float32 not above the exact midpoint of two codebook entries. The midpoint of
// two float32 values is exact in double; the cast rounds to nearest, so step down when it
// rounded up.
LP_HOST_DEVICE inline float midpoint_threshold(float lower, float upper) {
  const double midpoint = (static_cast<double>(lower) + static_cast<double>(upper)) / 2.0;
  float threshold = static_cast<float>(midpoint);
  if (static_cast<double>(threshold) > midpoint) threshold = nextafterf(threshold, -INFINITY);
  return threshold;
}

// thresholds[i] for entry i of a sorted codebook of `size` entries (a power of two); the last
// entry is the +inf padding. Computing entries one at a time lets a CUDA block fill its shared
// copy with one thread per entry.
LP_HOST_DEVICE inline float codebook_threshold(const float* code, int size, int i) {
  return i + 1 < size ? midpoint_threshold(code[i], code[i + 1]) : INFINITY;
}

LP_HOST_DEVICE inline void build_thresholds(const float* code, int size, float* thresholds) {
  for (int i = 0; i < size; ++i)
    thresholds[i] = codebook_threshold(code, size, i);
}

// Number of thresholds strictly below v: a branch-free lower-bound search over a padded table
// of `TableSize` (a power of two) sorted thresholds. Comparisons with NaN are false, so a NaN v
// encodes as 0.
//
// One step of the search: `index` is a multiple of 2 * step and the answer lies in
// [index, index + 2 * step); the step keeps the lower or the upper half.
LP_HOST_DEVICE inline int search_step(float v, int index, int step, const float* thresholds) {
  return index + ((v > thresholds[index + step - 1]) ? step : 0);
}

template <int TableSize>
LP_HOST_DEVICE inline int encode_with_thresholds(float v, const float* thresholds) {
  static_assert(is_power_of_two(TableSize), "threshold table size must be a power of two");
  int index = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int step = TableSize / 2; step > 0; step /= 2)
    index = search_step(v, index, step, thresholds);
  return index;
}

LP_HOST_DEVICE inline uint8_t encode_8bit(float v, const float* thresholds) {
  return static_cast<uint8_t>(encode_with_thresholds<kThresholdTableSize8bit>(v, thresholds));
}

// x scaled into the codebook's range; an all-zero block (absmax == 0) maps to 0.
LP_HOST_DEVICE inline float scale_by_absmax(float x, float absmax) {
  return absmax == 0.0f ? 0.0f : x / absmax;
}

// |x| as raw bits. For non-negative floats the unsigned integer order of the bits is the float
// order, and every NaN's bits exceed +inf's, so an unsigned max over these bits is a max |x|
// that propagates NaN (SIMD float max instructions do not).
LP_HOST_DEVICE inline uint32_t magnitude_bits(float x) {
  return float_to_bits(x) & 0x7FFFFFFFu;
}

// The absmax that a max over magnitude_bits() stands for.
LP_HOST_DEVICE inline float absmax_from_magnitude_bits(uint32_t max_bits) {
  return bits_to_float(max_bits);
}

}  // namespace lowprec
