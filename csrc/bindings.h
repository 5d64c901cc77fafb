// The tensor-level entry points that module.cpp exposes on lowprec_kernels._C. Outputs are
// preallocated by the Python backends (lowprec_kernels/backends/*.py), which also validate
// the arguments; the checks here are a last line of defence against memory errors.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace lowprec {

// cpu/bindings.cpp
void quantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& code, int64_t blocksize,
                            const at::Tensor& out_codes, const at::Tensor& out_absmax);
void dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& absmax,
                              const at::Tensor& code, int64_t blocksize, const at::Tensor& out);

// cpu/bindings.cpp: 8-bit Adam. One step of every tensor of the lists
// (lowprec::adam8bit_multi_step_).
void adam8bit_multi_step_cpu(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& state1, const std::vector<at::Tensor>& state2,
    const std::vector<at::Tensor>& absmax1, const std::vector<at::Tensor>& absmax2,
    const at::Tensor& qmap1, const at::Tensor& qmap2, const std::vector<at::Tensor>& steps,
    const std::vector<at::Tensor>& skipped, double lr, double beta1, double beta2, double eps,
    double weight_decay, bool decoupled, double gnorm_scale, int64_t blocksize);
// The same step for float32 states (lowprec::adam_multi_step_).
void adam_multi_step_cpu(const std::vector<at::Tensor>& params,
                         const std::vector<at::Tensor>& grads,
                         const std::vector<at::Tensor>& exp_avgs,
                         const std::vector<at::Tensor>& exp_avg_sqs,
                         const std::vector<at::Tensor>& steps,
                         const std::vector<at::Tensor>& skipped, double lr, double beta1,
                         double beta2, double eps, double weight_decay, bool decoupled,
                         double gnorm_scale);
// The eager entries of both (lowprec_kernels/_dispatch.py, register_eager): check, then step, in
// one native call; false, having written nothing, for arguments they do not take (all that the
// Python checks refuse, and a few they accept: strided states or maps).
bool adam8bit_multi_step_eager_cpu(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& state1, const std::vector<at::Tensor>& state2,
    const std::vector<at::Tensor>& absmax1, const std::vector<at::Tensor>& absmax2,
    const at::Tensor& qmap1, const at::Tensor& qmap2, const std::vector<at::Tensor>& steps,
    const std::vector<at::Tensor>& skipped, double lr, double beta1, double beta2, double eps,
    double weight_decay, bool decoupled, double gnorm_scale, int64_t blocksize);
bool adam_multi_step_eager_cpu(const std::vector<at::Tensor>& params,
                               const std::vector<at::Tensor>& grads,
                               const std::vector<at::Tensor>& exp_avgs,
                               const std::vector<at::Tensor>& exp_avg_sqs,
                               const std::vector<at::Tensor>& steps,
                               const std::vector<at::Tensor>& skipped, double lr, double beta1,
                               double beta2, double eps, double weight_decay, bool decoupled,
                               double gnorm_scale);
// The kernel's encoder on the active CPU path, for the tests: out = codes of values (float32).
void adam8bit_encode_cpu(const at::Tensor& values, const at::Tensor& code, const at::Tensor& out);
bool adam8bit_segmented_encoder_usable(const at::Tensor& code);
// (values checked, mismatches, bits of the first mismatch) of the encoder against the exact rule.
std::tuple<int64_t, int64_t, int64_t> adam8bit_encoder_sweep_cpu(const at::Tensor& code,
                                                                 int64_t stride, int64_t neighbours,
                                                                 double absmax);

// cpu/bindings.cpp: LLM.int8
void int8_quantize_weight_cpu(const at::Tensor& W, const at::Tensor& out_codes,
                              const at::Tensor& out_absmax);
// Writes the sorted outlier columns to out_cols[:count] (out_cols holds the last dimension's
// size) and returns count.
int64_t int8_vectorwise_quant_cpu(const at::Tensor& A, double threshold,
                                  const at::Tensor& out_codes, const at::Tensor& out_row_absmax,
                                  const at::Tensor& out_cols);
// bias: float32 [N] or None. out: [rows of A, N] in any float dtype.
void int8_scaled_mm_cpu(const at::Tensor& A, const at::Tensor& row_stats, const at::Tensor& weight,
                        const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                        const at::Tensor& out);
void int8_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                     const std::optional<at::Tensor>& bias, double threshold,
                     const at::Tensor& out);
// The GEMM kernel the active CPU path runs for M rows ("vnni-packed", "vnni-dot", ...).
std::string int8_gemm_kernel_cpu(int64_t M);
// The kernel matmul_4bit_gemm_cpu runs for x and the blocksize: "brgemm_bf16", "brgemm_f32" or
// "torch_gemm" (torch's GEMM per tile).
std::string matmul_4bit_gemm_kernel_cpu(const at::Tensor& x, int64_t blocksize);
// Whether the 4-bit GEMM path's fp32 brgemm kernel runs here now (the AVX-512 path, torch with
// oneDNN, mkldnn enabled).
bool cpu_fp32_brgemm_available();

// cpu/bindings.cpp: NF4 / FP4. A 4-bit weight is (packed, absmax, code, blocksize) plus, when
// absmax is uint8 (double quantization), (nested_absmax, nested_code, offset, nested_blocksize).
void quantize_4bit_cpu(const at::Tensor& A, const at::Tensor& code, int64_t blocksize,
                       const std::string& quant_type, const at::Tensor& out_packed,
                       const at::Tensor& out_absmax);
void dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                         int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code,
                         const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                         const at::Tensor& out);
// out [rows, out_features] = x [rows, in_features] @ W.T + bias, in x's dtype: the GEMV kernel
// (few rows) and the GEMM path (tiles of W decoded into a cache-resident buffer, then torch's
// GEMM on each tile).
void matmul_4bit_gemv_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& code, int64_t blocksize,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                          const std::optional<at::Tensor>& bias, const at::Tensor& out);
void matmul_4bit_gemm_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& code, int64_t blocksize,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                          const std::optional<at::Tensor>& bias, const at::Tensor& out);
// matmul_4bit's whole plain eager call (lowprec_kernels/_ops.py, call): the checker's conditions
// as a yes or no, the output (filled with `poison` when given: the tests' poison mode) and the
// kernel, GEMV up to gemv_max_rows rows of x. Nothing when an argument is not one the checker
// accepts: the caller then takes the checked path, which reports it. On a call after a large
// memory-bound op the Python layers of that path (checker, allocation, reshapes) cost ~100 us
// against ~300 us for the kernel at M = 1, 4096 x 4096.
std::optional<at::Tensor> matmul_4bit_eager_cpu(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
    int64_t blocksize, const std::vector<int64_t>& shape,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
    const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
    const std::optional<at::Tensor>& bias, int64_t gemv_max_rows, std::optional<double> poison);

#if defined(LOWPREC_WITH_CUDA)
// cuda/bindings.cpp
void quantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& code, int64_t blocksize,
                             const at::Tensor& out_codes, const at::Tensor& out_absmax);
void dequantize_blockwise_cuda(const at::Tensor& codes, const at::Tensor& absmax,
                               const at::Tensor& code, int64_t blocksize, const at::Tensor& out);

// cuda/bindings.cpp: 8-bit Adam.
void adam8bit_multi_step_cuda(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& state1, const std::vector<at::Tensor>& state2,
    const std::vector<at::Tensor>& absmax1, const std::vector<at::Tensor>& absmax2,
    const at::Tensor& qmap1, const at::Tensor& qmap2, const std::vector<at::Tensor>& steps,
    const std::vector<at::Tensor>& skipped, double lr, double beta1, double beta2, double eps,
    double weight_decay, bool decoupled, double gnorm_scale, int64_t blocksize);

// cuda/bindings.cpp: LLM.int8 (the GEMM comes from the triton backend)
void int8_quantize_weight_cuda(const at::Tensor& W, const at::Tensor& out_codes,
                               const at::Tensor& out_absmax);
// out_outlier_mask: uint8 [last dimension of A], 1 for an outlier column (all 0 when
// threshold <= 0).
void int8_vectorwise_quant_cuda(const at::Tensor& A, double threshold, const at::Tensor& out_codes,
                                const at::Tensor& out_row_absmax,
                                const at::Tensor& out_outlier_mask);

// cuda/bindings.cpp: NF4 / FP4, as the CPU entry points; the GEMV takes 1..8 rows of x.
void quantize_4bit_cuda(const at::Tensor& A, const at::Tensor& code, int64_t blocksize,
                        const std::string& quant_type, const at::Tensor& out_packed,
                        const at::Tensor& out_absmax);
void dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& code, int64_t blocksize,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                          const at::Tensor& out);
void matmul_4bit_gemv_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const at::Tensor& code, int64_t blocksize,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                           const std::optional<at::Tensor>& bias, const at::Tensor& out);
// matmul_4bit_eager_cpu's counterpart for the CUDA GEMV (up to gemv_max_rows rows of x; more
// rows are declined: the checked path dequantizes and calls F.linear). On the H200 the Python
// layers of the checked path cost 38-220 us per call against 15 us of GPU time at M = 1.
std::optional<at::Tensor> matmul_4bit_eager_cuda(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
    int64_t blocksize, const std::vector<int64_t>& shape,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
    const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
    const std::optional<at::Tensor>& bias, int64_t gemv_max_rows, std::optional<double> poison);
#endif

}  // namespace lowprec
