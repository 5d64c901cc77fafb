// Launcher of the fused 8-bit Adam / AdamW CUDA kernels: raw device pointers (contiguous,
// validated by the caller) and a stream. Compiled by nvcc; this header is also read by the host
// compiler (bindings.cpp), so it holds declarations only.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "lowprec/adam8bit.h"
#include "lowprec/common.h"

namespace lowprec::cuda {

// One parameter tensor and its optimizer state (device pointers), updated in place.
struct Adam8bitTensorArgs {
  void* p;
  const void* g;
  uint8_t* state1;
  uint8_t* state2;
  float* absmax1;
  float* absmax2;
  float* step;     // float32 scalar on the device: read for the bias corrections, then set
  float* skipped;  // float32 scalar on the device
  int64_t n;
  FloatType type;
};

// One step of every tensor, as cpu::adam8bit_multi_step, without a host synchronization: per
// group of tensors, a finiteness kernel flags each gradient holding a NaN or an infinity, the
// update kernel skips flagged tensors, and a last kernel sets each step (or counts the skip).
// `non_finite` is device scratch of `count` int32 (overwritten).
cudaError_t launch_adam8bit_multi_step(const Adam8bitTensorArgs* tensors, int64_t count,
                                       const float* qmap1, const float* qmap2,
                                       const Adam8bitHyper& hyper, int32_t* non_finite,
                                       cudaStream_t stream);

}  // namespace lowprec::cuda
