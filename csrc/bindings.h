// The tensor-level entry points that module.cpp exposes on lowprec_kernels._C. Outputs are
// preallocated by the Python backends (lowprec_kernels/backends/*.py), which also validate
// the arguments; the checks here are a last line of defence against memory errors.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace lowprec {

// cpu/bindings.cpp
void quantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& code, int64_t blocksize,
                            const at::Tensor& out_codes, const at::Tensor& out_absmax);
void dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& absmax,
                              const at::Tensor& code, int64_t blocksize, const at::Tensor& out);

#if defined(LOWPREC_WITH_CUDA)
// cuda/bindings.cpp
void quantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& code, int64_t blocksize,
                             const at::Tensor& out_codes, const at::Tensor& out_absmax);
void dequantize_blockwise_cuda(const at::Tensor& codes, const at::Tensor& absmax,
                               const at::Tensor& code, int64_t blocksize, const at::Tensor& out);
#endif

}  // namespace lowprec
