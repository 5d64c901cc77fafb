// NF4 / FP4 (ARCHITECTURE.md §4, lowprec_kernels/reference/fourbit.py): the per-element math
// shared by the CPU and CUDA kernels. Nibble packing, the encoding rule, and the decoding of
// (possibly double-quantized) block scales. No torch headers.
//
// The rule, exactly as the reference defines it:
//   absmax = max |x| over the block (NaN if the block holds a NaN);  v = x / absmax (0 if 0);
//   NF4:  code = nearest entry of the sorted 16-entry codebook to v (ties low, NaN -> 0);
//   FP4:  code = index of the entry whose magnitude is nearest to |v| among entries 0..7
//         (ties low in magnitude order), with bit 3 set when x < 0.
//   Flattened element 2i goes to the high nibble, 2i+1 to the low nibble of byte i.
//   Decoded scale = absmax[b], or with double quantization
//   nested_code[absmax_code[b]] * nested_absmax[b / nested_blocksize] + offset, in fp32, the
//   product rounded before the sum (no FMA).
#pragma once

#include <math.h>

#include <cstdint>

#include "lowprec/blockwise8.h"
#include "lowprec/common.h"

namespace lowprec {

// 4-bit blocksizes are the powers of two in [min, max]. Even, so a block boundary never splits
// a byte of packed codes.
constexpr int kBlocksizeMin4bit = 32;
constexpr int kBlocksizeMax4bit = 4096;
// FP4 codes are sign-magnitude: bit 3 is the sign, entries 0..7 the magnitudes.
constexpr int kFp4SignBit = 8;
constexpr int kFp4Magnitudes = 8;
// Threshold tables of the 4-bit encoders: NF4 searches all 16 entries, FP4 its 8 magnitudes.
constexpr int kThresholdTableSizeNf4 = kCodebookSize4bit;
constexpr int kThresholdTableSizeFp4 = kFp4Magnitudes;

enum class QuantType4bit : int { kNf4 = 0, kFp4 = 1 };

// ------------------------------------------------------------------------------- packing

LP_HOST_DEVICE inline uint8_t high_nibble(uint8_t byte) {
  return static_cast<uint8_t>(byte >> 4);
}
LP_HOST_DEVICE inline uint8_t low_nibble(uint8_t byte) {
  return static_cast<uint8_t>(byte & 0xF);
}
LP_HOST_DEVICE inline uint8_t pack_nibbles(uint8_t even_code, uint8_t odd_code) {
  return static_cast<uint8_t>((even_code << 4) | odd_code);
}
// The 4-bit code of flattened element i.
LP_HOST_DEVICE inline uint8_t code_at(const uint8_t* packed, int64_t i) {
  const uint8_t byte = packed[i >> 1];
  return (i & 1) ? low_nibble(byte) : high_nibble(byte);
}

// ------------------------------------------------------------------------------ encoding

// Everything an encoder needs, built once from the codebook (16 floats, sorted for NF4).
struct Encoder4bit {
  // NF4: the 15 midpoint thresholds of the codebook + inf. FP4: the 7 thresholds of the sorted
  // magnitudes + inf (entries 8..15 unused, +inf).
  float thresholds[kCodebookSize4bit];
  // FP4: the code whose magnitude is the i-th smallest (identity for NF4).
  uint8_t code_of_rank[kCodebookSize4bit];
  QuantType4bit type;
};

// FP4 magnitudes in ascending order by a stable insertion sort (the FP4 codebook's magnitudes
// are distinct, so this is the order torch.sort gives the reference).
LP_HOST_DEVICE inline void build_encoder_4bit(const float* code, QuantType4bit type,
                                              Encoder4bit* encoder) {
  encoder->type = type;
  for (int i = 0; i < kCodebookSize4bit; ++i) {
    encoder->code_of_rank[i] = static_cast<uint8_t>(i);
    encoder->thresholds[i] = INFINITY;
  }
  if (type == QuantType4bit::kNf4) {
    build_thresholds(code, kCodebookSize4bit, encoder->thresholds);
    return;
  }
  float sorted[kFp4Magnitudes];
  for (int i = 0; i < kFp4Magnitudes; ++i) {
    int j = i;
    for (; j > 0 && sorted[j - 1] > code[i]; --j) {
      sorted[j] = sorted[j - 1];
      encoder->code_of_rank[j] = encoder->code_of_rank[j - 1];
    }
    sorted[j] = code[i];
    encoder->code_of_rank[j] = static_cast<uint8_t>(i);
  }
  build_thresholds(sorted, kFp4Magnitudes, encoder->thresholds);
}

// The code of x in a block with the given absmax.
LP_HOST_DEVICE inline uint8_t encode_4bit(float x, float absmax, const Encoder4bit& encoder) {
  const float v = scale_by_absmax(x, absmax);
  if (encoder.type == QuantType4bit::kNf4) {
    return static_cast<uint8_t>(
        encode_with_thresholds<kThresholdTableSizeNf4>(v, encoder.thresholds));
  }
  const int rank = encode_with_thresholds<kThresholdTableSizeFp4>(fabsf(v), encoder.thresholds);
  const uint8_t magnitude_code = encoder.code_of_rank[rank];
  return static_cast<uint8_t>(x < 0.0f ? (magnitude_code | kFp4SignBit) : magnitude_code);
}

// ----------------------------------------------------------------------------- scales

// The block scales of a 4-bit tensor: fp32 absmax values, or double-quantized ones (uint8
// codes of the signed dynamic map, their own fp32 absmax per nested block, and the offset).
// Pointers are device pointers on CUDA.
struct BlockScales {
  const float* absmax = nullptr;          // fp32 per block; null when double-quantized
  const uint8_t* absmax_codes = nullptr;  // double quant: one code per block
  const float* nested_code = nullptr;     // double quant: the 256-entry map
  const float* nested_absmax = nullptr;   // double quant: one per nested block
  const float* offset = nullptr;          // double quant: one fp32 scalar
  int nested_blocksize_log2 = 0;          // nested blocksizes are powers of two

  LP_HOST_DEVICE bool double_quantized() const { return absmax == nullptr; }
};

// Decoded scale of a double-quantized block: the product rounded to fp32, then the offset added.
LP_HOST_DEVICE inline float decode_nested_absmax(uint8_t absmax_code, const float* nested_code,
                                                 float nested_absmax, float offset) {
  const float scaled = nested_code[absmax_code] * nested_absmax;
  return scaled + offset;
}

LP_HOST_DEVICE inline float block_scale(const BlockScales& scales, int64_t block) {
  if (!scales.double_quantized()) return scales.absmax[block];
  return decode_nested_absmax(scales.absmax_codes[block], scales.nested_code,
                              scales.nested_absmax[block >> scales.nested_blocksize_log2],
                              *scales.offset);
}

// The decoded fp32 weight of one element: codebook entry times block scale.
LP_HOST_DEVICE inline float dequantize_4bit_value(uint8_t code_index, const float* code,
                                                  float scale) {
  return code[code_index] * scale;
}

}  // namespace lowprec
