// LLM.int8 on the CPU: row quantization with outlier columns, and the int8 GEMM with its
// fused dequantization epilogue. Raw pointers, contiguous row-major data, validated arguments
// (the bindings check them). The per-element rules are lowprec/int8.h.
#pragma once

#include <cstdint>
#include <vector>

#include "lowprec/common.h"

namespace lowprec::cpu {

// Sorted indices of the columns of x [rows, cols] holding any |x| >= threshold (NaN never
// does); none when threshold <= 0. One pass over x.
std::vector<int64_t> int8_outlier_columns(const void* x, FloatType x_type, int64_t rows,
                                          int64_t cols, float threshold);

// Per row of x [rows, cols]: absmax over the non-outlier columns into row_absmax[row], and the
// codes rint(x * 127 / absmax) into codes [rows, cols], outlier columns coded 0. outlier_cols
// (sorted, may be empty) as int8_outlier_columns returns them. Each row is read from memory
// once (its second sweep, the encoding, reads it from L1).
void int8_quantize_rows(const void* x, FloatType x_type, int64_t rows, int64_t cols,
                        const std::vector<int64_t>& outlier_cols, int8_t* codes, float* row_absmax);

// What the GEMM does with each int32 accumulator acc[m, n] before it leaves the kernel:
//   out[m, n] = acc * row_stats[m] * col_stats[n] / 127²  (+ outlier term) (+ bias[n])
// outlier term = sum_o outlier_x[m, o] * W_deq[n, outlier_cols[o]] in float32: the outlier
// columns of the activations against the dequantized weight columns (W_deq = W * col_stats /
// 127, gathered by the GEMM from the weight rows it has just read).
struct Int8Epilogue {
  const float* row_stats = nullptr;       // [M]
  const float* col_stats = nullptr;       // [N]
  const float* bias = nullptr;            // [N] float32, or null
  const float* outlier_x = nullptr;       // [M, num_outliers], unused when num_outliers == 0
  const int64_t* outlier_cols = nullptr;  // [num_outliers]
  int64_t num_outliers = 0;
  void* out = nullptr;  // [M, N] row-major
  FloatType out_type = FloatType::kFloat32;
};

// out = epilogue(A [M, K] @ W[N, K].T), int8 products summed exactly in int32. M >= 1.
void int8_gemm(const int8_t* A, int64_t M, int64_t K, const int8_t* W, int64_t N,
               const Int8Epilogue& epilogue);

// The whole LLM.int8 forward: x [M, K] (float) -> out [M, N] in out_type. Finds the outlier
// columns (threshold > 0), quantizes x's rows without them, runs the int8 GEMM and adds the
// outlier columns' product and the bias (float32, may be null) in its epilogue.
void int8_linear(const void* x, FloatType x_type, int64_t M, int64_t K, const int8_t* W,
                 const float* w_scale, int64_t N, const float* bias, float threshold, void* out,
                 FloatType out_type);

// Which int8 GEMM kernel the active ISA runs for this M (for tests and the benchmark):
// "vnni-packed", "vnni-dot", "avx2-dot" or "scalar".
const char* int8_gemm_kernel_name(int64_t M);

}  // namespace lowprec::cpu
