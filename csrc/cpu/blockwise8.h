// Blockwise 8-bit quantize / dequantize on the CPU: raw pointers, contiguous data, validated
// arguments (the binding checks them). The encoding rule is lowprec/blockwise8.h.
#pragma once

#include <cstdint>

#include "lowprec/float16.h"

namespace lowprec::cpu {

// codes[i] = nearest entry of `code` (256 sorted floats) to input[i] / absmax[i / blocksize];
// absmax has ceil(n / blocksize) entries.
void quantize_blockwise_8bit(const void* input, FloatType input_type, int64_t n, const float* code,
                             int64_t blocksize, uint8_t* codes, float* absmax);

// out[i] = code[codes[i]] * absmax[i / blocksize], computed in fp32 and rounded to out_type.
void dequantize_blockwise_8bit(const uint8_t* codes, const float* absmax, const float* code,
                               int64_t n, int64_t blocksize, void* out, FloatType out_type);

}  // namespace lowprec::cpu
