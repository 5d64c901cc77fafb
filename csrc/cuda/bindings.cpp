// Tensor-level CUDA entry points: check, pick the device and its current stream, launch the
// raw-pointer kernels of the .cu files and report launch errors. Compiled by the host
// compiler, so the .cu files stay free of torch headers.
#include "../bindings.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../binding_checks.h"
#include "blockwise8.h"
#include "int8.h"

namespace lowprec {
namespace {

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op,
              ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

}  // namespace

void quantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& code, int64_t blocksize,
                             const at::Tensor& out_codes, const at::Tensor& out_absmax) {
  constexpr const char* kOp = "quantize_blockwise_cuda";
  check_blockwise_8bit(kOp, c10::DeviceType::CUDA, A, out_codes, out_absmax, code, blocksize);
  const FloatType input_type = float_type_of(A, kOp, "A");
  if (A.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(A.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(A.device().index()).stream();
  check_launch(cuda::launch_quantize_blockwise_8bit(
                   A.data_ptr(), input_type, A.numel(), code.data_ptr<float>(), blocksize,
                   out_codes.data_ptr<uint8_t>(), out_absmax.data_ptr<float>(), stream),
               kOp);
}

void dequantize_blockwise_cuda(const at::Tensor& codes, const at::Tensor& absmax,
                               const at::Tensor& code, int64_t blocksize, const at::Tensor& out) {
  constexpr const char* kOp = "dequantize_blockwise_cuda";
  check_blockwise_8bit(kOp, c10::DeviceType::CUDA, out, codes, absmax, code, blocksize);
  const FloatType out_type = float_type_of(out, kOp, "out");
  if (codes.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(codes.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(codes.device().index()).stream();
  check_launch(cuda::launch_dequantize_blockwise_8bit(
                   codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), code.data_ptr<float>(),
                   codes.numel(), blocksize, out.data_ptr(), out_type, stream),
               kOp);
}

// ---------------------------------------------------------------------------------- LLM.int8

void int8_quantize_weight_cuda(const at::Tensor& W, const at::Tensor& out_codes,
                               const at::Tensor& out_absmax) {
  constexpr const char* kOp = "int8_quantize_weight_cuda";
  const int64_t cols = check_int8_rows(kOp, c10::DeviceType::CUDA, W, out_codes, out_absmax);
  const FloatType type = float_type_of(W, kOp, "W");
  if (W.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(W.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(W.device().index()).stream();
  check_launch(cuda::launch_int8_quantize_rows(W.data_ptr(), type, W.numel() / cols, cols, nullptr,
                                               out_codes.data_ptr<int8_t>(),
                                               out_absmax.data_ptr<float>(), stream),
               kOp);
}

void int8_vectorwise_quant_cuda(const at::Tensor& A, double threshold, const at::Tensor& out_codes,
                                const at::Tensor& out_row_absmax,
                                const at::Tensor& out_outlier_mask) {
  constexpr const char* kOp = "int8_vectorwise_quant_cuda";
  const int64_t cols = check_int8_rows(kOp, c10::DeviceType::CUDA, A, out_codes, out_row_absmax);
  const FloatType type = float_type_of(A, kOp, "A");
  check_tensor(out_outlier_mask, kOp, "out_outlier_mask", c10::DeviceType::CUDA);
  check_dtype(out_outlier_mask, at::kByte, kOp, "out_outlier_mask");
  TORCH_CHECK(out_outlier_mask.numel() == cols, kOp, ": out_outlier_mask must have ", cols,
              " elements, got ", out_outlier_mask.numel());
  TORCH_CHECK(out_outlier_mask.device() == A.device(), kOp, ": out_outlier_mask must be on ",
              A.device());
  if (A.numel() == 0) return;
  const int64_t rows = A.numel() / cols;
  const c10::cuda::CUDAGuard device_guard(A.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(A.device().index()).stream();
  uint8_t* mask = out_outlier_mask.data_ptr<uint8_t>();
  check_launch(cuda::launch_int8_outlier_mask(A.data_ptr(), type, rows, cols,
                                              static_cast<float>(threshold), mask, stream),
               kOp);
  // The mask is all zero when threshold <= 0: the quantizer then skips reading it.
  check_launch(cuda::launch_int8_quantize_rows(
                   A.data_ptr(), type, rows, cols, threshold > 0.0 ? mask : nullptr,
                   out_codes.data_ptr<int8_t>(), out_row_absmax.data_ptr<float>(), stream),
               kOp);
}

}  // namespace lowprec
