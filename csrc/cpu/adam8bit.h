// The fused 8-bit Adam / AdamW step on the CPU: raw pointers, contiguous data, validated
// arguments (the binding checks them). The definition is lowprec_kernels/reference/adam8bit.py;
// the per-element math and the encoder are lowprec/adam8bit.h.
#pragma once

#include <cstdint>

#include "lowprec/adam8bit.h"
#include "lowprec/common.h"

namespace lowprec::cpu {

// One parameter tensor and its optimizer state, all updated in place.
struct Adam8bitTensor {
  void* p;        // n elements of `type`
  const void* g;  // n elements of `type`
  FloatType type;
  int64_t n;
  uint8_t* state1;  // m: codes of the signed map
  uint8_t* state2;  // v: codes of the unsigned map
  float* absmax1;   // ceil(n / blocksize) block scales of m
  float* absmax2;   // ... of v
  float* step;      // the step count (float32 scalar)
  float* skipped;   // the count of skipped steps (float32 scalar)
};

// One parameter tensor with float32 states (the optimizers' tensors below min_8bit_size).
struct AdamTensor {
  void* p;        // n elements of `type`
  const void* g;  // n elements of `type`
  FloatType type;
  int64_t n;
  float* m;        // n float32
  float* v;        // n float32
  float* step;     // the step count (float32 scalar)
  float* skipped;  // the count of skipped steps (float32 scalar)
};

// One step for each tensor: a tensor whose gradient holds a NaN or an infinity is skipped
// (p, states, absmax and step unchanged; skipped += 1), the others are updated and their step
// set to step + 1. qmap1 / qmap2: the signed / unsigned maps (256 sorted floats each).
void adam8bit_multi_step(const Adam8bitTensor* tensors, int64_t count, const float* qmap1,
                         const float* qmap2, const Adam8bitHyper& hyper);

// The same step with float32 m and v: the reference's update without the quantization, and the
// same skip rule.
void adam_multi_step(const AdamTensor* tensors, int64_t count, const AdamHyper& hyper);

// ------------------------------------------------------------- the encoder, for the tests

// codes[i] = the nearest entry of `code` to values[i] (values in [-1, 1]: the domain of x / absmax
// in the kernel's blocks of finite absmax), by the encoder the kernel uses on the active path.
void adam8bit_encode(const float* values, int64_t n, const float* code, uint8_t* codes);

// Whether the segmented (arithmetic) encoder applies to `code`; if not, the kernel encodes
// with the binary search alone.
bool adam8bit_segmented_encoder_usable(const float* code);

// Compares the active path's encoder with the exact rule on every `stride`-th float of
// [-1, 1] (in increasing order, both ends included) and on every threshold and its
// `neighbours` nearest floats on each side. Returns the values checked and mismatched, and the
// bits of the first mismatch (0 if none).
struct EncoderSweep {
  int64_t checked;
  int64_t mismatches;
  uint32_t first_mismatch_bits;
};
EncoderSweep adam8bit_encoder_sweep(const float* code, int64_t stride, int64_t neighbours,
                                    float absmax);

}  // namespace lowprec::cpu
