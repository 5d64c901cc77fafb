// Tensor-level CUDA entry points: check, pick the device and its current stream, launch the
// raw-pointer kernels of the .cu files and report launch errors. Compiled by the host
// compiler, so the .cu files stay free of torch headers.
#include "../bindings.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../binding_checks.h"
#include "adam8bit.h"
#include "blockwise8.h"
#include "fourbit.h"
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

// ------------------------------------------------------------------------------ 8-bit Adam

void adam8bit_multi_step_cuda(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& state1, const std::vector<at::Tensor>& state2,
    const std::vector<at::Tensor>& absmax1, const std::vector<at::Tensor>& absmax2,
    const at::Tensor& qmap1, const at::Tensor& qmap2, const std::vector<at::Tensor>& steps,
    const std::vector<at::Tensor>& skipped, double lr, double beta1, double beta2, double eps,
    double weight_decay, bool decoupled, double gnorm_scale, int64_t blocksize) {
  constexpr const char* kOp = "adam8bit_multi_step_cuda";
  check_adam8bit_multi_step(kOp, c10::DeviceType::CUDA, params, grads, state1, state2, absmax1,
                            absmax2, qmap1, qmap2, steps, skipped, blocksize);
  if (params.empty()) return;
  std::vector<cuda::Adam8bitTensorArgs> tensors;
  tensors.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    tensors.push_back({params[i].data_ptr(), grads[i].data_ptr(), state1[i].data_ptr<uint8_t>(),
                       state2[i].data_ptr<uint8_t>(), absmax1[i].data_ptr<float>(),
                       absmax2[i].data_ptr<float>(), steps[i].data_ptr<float>(),
                       skipped[i].data_ptr<float>(), params[i].numel(),
                       float_type_of(params[i], kOp, "param")});
  }
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  // Scratch for the per-tensor finiteness flags, from the caching allocator (no sync).
  const at::Tensor non_finite =
      at::empty({static_cast<int64_t>(params.size())}, params[0].options().dtype(at::kInt));
  const Adam8bitHyper hyper{adam_hyper(lr, beta1, beta2, eps, weight_decay, decoupled, gnorm_scale),
                            blocksize};
  check_launch(cuda::launch_adam8bit_multi_step(
                   tensors.data(), static_cast<int64_t>(tensors.size()), qmap1.data_ptr<float>(),
                   qmap2.data_ptr<float>(), hyper, non_finite.data_ptr<int32_t>(), stream),
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
  if (A.numel() == 0) {  // no rows: no outlier columns (the mask is written even then)
    out_outlier_mask.zero_();
    return;
  }
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

// ------------------------------------------------------------------------------ NF4 / FP4

void quantize_4bit_cuda(const at::Tensor& A, const at::Tensor& code, int64_t blocksize,
                        const std::string& quant_type, const at::Tensor& out_packed,
                        const at::Tensor& out_absmax) {
  constexpr const char* kOp = "quantize_4bit_cuda";
  const auto [input_type, type] = check_quantize_4bit(
      kOp, c10::DeviceType::CUDA, A, code, blocksize, quant_type, out_packed, out_absmax);
  const int64_t n = A.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard device_guard(A.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(A.device().index()).stream();
  check_launch(cuda::launch_quantize_4bit(A.data_ptr(), input_type, n, code.data_ptr<float>(), type,
                                          blocksize, out_packed.data_ptr<uint8_t>(),
                                          out_absmax.data_ptr<float>(), stream),
               kOp);
}

void dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& code, int64_t blocksize,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                          const at::Tensor& out) {
  constexpr const char* kOp = "dequantize_4bit_cuda";
  check_tensor(out, kOp, "out", c10::DeviceType::CUDA);
  const FloatType out_type = float_type_of(out, kOp, "out");
  const int64_t n = out.numel();
  const BlockScales scales =
      check_4bit_weight(kOp, c10::DeviceType::CUDA, packed, absmax, code, blocksize, n,
                        nested_absmax, nested_code, offset, nested_blocksize);
  TORCH_CHECK(out.device() == packed.device(), kOp, ": out must be on ", packed.device());
  if (n == 0) return;
  const c10::cuda::CUDAGuard device_guard(packed.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(packed.device().index()).stream();
  check_launch(
      cuda::launch_dequantize_4bit(packed.data_ptr<uint8_t>(), scales, code.data_ptr<float>(),
                                   blocksize, n, out.data_ptr(), out_type, stream),
      kOp);
}

void matmul_4bit_gemv_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const at::Tensor& code, int64_t blocksize,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                           const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  constexpr const char* kOp = "matmul_4bit_gemv_cuda";
  check_matmul_4bit_operands(kOp, c10::DeviceType::CUDA, x, packed, bias, out);
  const int64_t rows = x.size(0), in_features = x.size(1), out_features = out.size(1);
  TORCH_CHECK(rows <= cuda::kGemv4bitMaxRows, kOp, ": x may have at most ", cuda::kGemv4bitMaxRows,
              " rows, got ", rows);
  TORCH_CHECK(!bias || bias->scalar_type() == at::kFloat, kOp, ": bias must be float32");
  const BlockScales scales = check_4bit_weight(kOp, c10::DeviceType::CUDA, packed, absmax, code,
                                               blocksize, out_features * in_features, nested_absmax,
                                               nested_code, offset, nested_blocksize);
  if (rows == 0 || out_features == 0) return;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  check_launch(cuda::launch_gemv_4bit(
                   x.data_ptr(), float_type_of(x, kOp, "x"), rows, packed.data_ptr<uint8_t>(),
                   scales, code.data_ptr<float>(), blocksize, out_features, in_features,
                   bias ? bias->data_ptr<float>() : nullptr, out.data_ptr(), stream),
               kOp);
}

std::optional<at::Tensor> matmul_4bit_eager_cuda(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
    int64_t blocksize, const std::vector<int64_t>& shape,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
    const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
    const std::optional<at::Tensor>& bias, int64_t gemv_max_rows, std::optional<double> poison) {
  if (!packed.defined() || !packed.device().is_cuda() ||
      !matmul_4bit_eager_accepts(x, packed, absmax, code, blocksize, shape, nested_absmax,
                                 nested_code, offset, nested_blocksize, bias))
    return std::nullopt;
  const int64_t out_features = shape[0], in_features = shape[1];
  const int64_t rows = x.numel() / in_features;
  if (rows > std::min<int64_t>(gemv_max_rows, cuda::kGemv4bitMaxRows)) return std::nullopt;
  at::Tensor out = matmul_4bit_eager_output(x, out_features, poison);
  if (rows == 0) return out;
  const std::optional<at::Tensor> bias32 =
      bias ? std::optional<at::Tensor>(bias->to(at::kFloat).contiguous()) : std::nullopt;
  matmul_4bit_gemv_cuda(x.reshape({rows, in_features}).contiguous(), packed, absmax, code,
                        blocksize, nested_absmax, nested_code, offset, nested_blocksize, bias32,
                        out.view({rows, out_features}));
  return out;
}

}  // namespace lowprec
