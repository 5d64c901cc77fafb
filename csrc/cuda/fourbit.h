// Launchers of the NF4 / FP4 CUDA kernels: raw device pointers (contiguous, validated by the
// caller) and a stream; each returns the launch status. Declarations only: the host compiler
// reads this header too (bindings.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "lowprec/common.h"
#include "lowprec/fourbit.h"

namespace lowprec::cuda {

// Rows of x the GEMV kernel takes; the CUDA backend runs larger batches as dequantize + torch
// matmul (lowprec_kernels/backends/cuda.py).
constexpr int kGemv4bitMaxRows = 8;

cudaError_t launch_quantize_4bit(const void* input, FloatType input_type, int64_t n,
                                 const float* code, QuantType4bit quant_type, int64_t blocksize,
                                 uint8_t* packed, float* absmax, cudaStream_t stream);

// out[i] = code[c_i] * scale(i / blocksize), i < n, rounded to out_type.
cudaError_t launch_dequantize_4bit(const uint8_t* packed, const BlockScales& scales,
                                   const float* code, int64_t blocksize, int64_t n, void* out,
                                   FloatType out_type, cudaStream_t stream);

// y [rows, out_features] = x [rows, in_features] @ W.T + bias, fp32 accumulation, y in x_type;
// 1 <= rows <= kGemv4bitMaxRows; bias fp32 or null.
cudaError_t launch_gemv_4bit(const void* x, FloatType x_type, int64_t rows, const uint8_t* packed,
                             const BlockScales& scales, const float* code, int64_t blocksize,
                             int64_t out_features, int64_t in_features, const float* bias, void* y,
                             cudaStream_t stream);

}  // namespace lowprec::cuda
