// Launchers of the LLM.int8 CUDA kernels (row quantization and outlier columns): raw device
// pointers (contiguous, validated by the caller) and a stream. Each returns the launch status
// for the caller to report. The int8 GEMM on CUDA is the triton backend's.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "lowprec/common.h"

namespace lowprec::cuda {

// mask[j] = 1 if any |x[r, j]| >= threshold over the rows of x [rows, cols], else 0 (all 0 for
// threshold <= 0).
cudaError_t launch_int8_outlier_mask(const void* x, FloatType x_type, int64_t rows, int64_t cols,
                                     float threshold, uint8_t* mask, cudaStream_t stream);

// Per row of x [rows, cols]: the absmax over the columns whose outlier_mask entry is 0 (all of
// them when outlier_mask is null) into row_absmax, and the codes rint(x * 127 / absmax) into
// codes, outlier columns coded 0.
cudaError_t launch_int8_quantize_rows(const void* x, FloatType x_type, int64_t rows, int64_t cols,
                                      const uint8_t* outlier_mask, int8_t* codes, float* row_absmax,
                                      cudaStream_t stream);

}  // namespace lowprec::cuda
