// Launchers of the blockwise 8-bit CUDA kernels: raw device pointers (contiguous, validated
// by the caller) and a stream. Each returns the launch status (cudaGetLastError after the
// launch) for the caller to report. Compiled by nvcc; this header is also read by the host
// compiler (bindings.cpp), so it holds declarations only.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "lowprec/common.h"

namespace lowprec::cuda {

cudaError_t launch_quantize_blockwise_8bit(const void* input, FloatType input_type, int64_t n,
                                           const float* code, int64_t blocksize, uint8_t* codes,
                                           float* absmax, cudaStream_t stream);

cudaError_t launch_dequantize_blockwise_8bit(const uint8_t* codes, const float* absmax,
                                             const float* code, int64_t n, int64_t blocksize,
                                             void* out, FloatType out_type, cudaStream_t stream);

// CUDART_VERSION the kernels were compiled with (e.g. 13000), for build_info.
int compiled_cuda_runtime_version();

}  // namespace lowprec::cuda
