// The tensor-level entry points that module.cpp exposes on lowprec_kernels._C. Outputs are
// preallocated by the Python backends (lowprec_kernels/backends/*.py), which also validate
// the arguments; the checks here are a last line of defence against memory errors.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>

namespace lowprec {

// cpu/bindings.cpp
void quantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& code, int64_t blocksize,
                            const at::Tensor& out_codes, const at::Tensor& out_absmax);
void dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& absmax,
                              const at::Tensor& code, int64_t blocksize, const at::Tensor& out);

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

#if defined(LOWPREC_WITH_CUDA)
// cuda/bindings.cpp
void quantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& code, int64_t blocksize,
                             const at::Tensor& out_codes, const at::Tensor& out_absmax);
void dequantize_blockwise_cuda(const at::Tensor& codes, const at::Tensor& absmax,
                               const at::Tensor& code, int64_t blocksize, const at::Tensor& out);
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
#endif

}  // namespace lowprec
