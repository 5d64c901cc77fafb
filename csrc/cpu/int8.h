// LLM.int8 on the CPU: row quantization with outlier columns, and the int8 GEMM with its
// fused dequantization epilogue. Raw pointers, contiguous row-major data, validated arguments
// (the bindings check them). The per-element rules are lowprec/int8.h.
#pragma once

#include <cstdint>
#include <vector>

#include "lowprec/common.h"

namespace lowprec::cpu {

// Each parallel task of the row-wise kernels gets at least this many elements, so that small
// inputs stay on one thread and a task's work outweighs the cost of handing it out.
constexpr int64_t kInt8MinElementsPerTask = 16384;

inline int64_t int8_rows_per_task(int64_t cols) {
  return cols >= kInt8MinElementsPerTask ? 1 : kInt8MinElementsPerTask / (cols > 0 ? cols : 1);
}

// Outlier columns as a bit set: bit j % 32 of word j / 32.
constexpr int64_t kOutlierBitsPerWord = 32;
using OutlierBits = std::vector<uint32_t>;

inline int64_t outlier_words(int64_t cols) {
  return (cols + kOutlierBitsPerWord - 1) / kOutlierBitsPerWord;
}

// Sets in `bits` (atomically: tasks share it) the columns where rows [row_begin, row_end) of
// x [*, cols] hold any |x| >= threshold (NaN never does).
void int8_mark_outliers(const void* x, FloatType x_type, int64_t row_begin, int64_t row_end,
                        int64_t cols, float threshold, uint32_t* bits);

// The set bits as sorted column indices.
std::vector<int64_t> int8_outlier_list(const OutlierBits& bits);

// Quantizes rows [row_begin, row_end) of x [*, cols]: each row's absmax over the columns not
// set in outlier_bits (all of them when null) and its codes rint(x * 127 / absmax), outlier
// columns coded 0. codes (row-major) and row_absmax hold row_begin's entries first. The row
// is read once from memory: its second sweep, the encoding, reads it from L1.
void int8_quantize_row_range(const void* x, FloatType x_type, int64_t row_begin, int64_t row_end,
                             int64_t cols, const uint32_t* outlier_bits, int8_t* codes,
                             float* row_absmax);

// Whole tensors, one parallel region each. Without outliers (weights):
void int8_quantize_rows(const void* x, FloatType x_type, int64_t rows, int64_t cols, int8_t* codes,
                        float* row_absmax);
// With outlier columns (threshold > 0): finds them in one pass over x, then quantizes (a
// second pass: no row's absmax is known before every row was searched). Returns them sorted.
std::vector<int64_t> int8_vectorwise_quant(const void* x, FloatType x_type, int64_t rows,
                                           int64_t cols, float threshold, int8_t* codes,
                                           float* row_absmax);

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
