// Tensor-level CPU entry points: check, unpack pointers, call the raw-pointer kernels.
#include "../bindings.h"

#include <algorithm>
#include <vector>

#include "../binding_checks.h"
#include "adam8bit.h"
#include "blockwise8.h"
#include "int8.h"

namespace lowprec {

void quantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& code, int64_t blocksize,
                            const at::Tensor& out_codes, const at::Tensor& out_absmax) {
  constexpr const char* kOp = "quantize_blockwise_cpu";
  check_blockwise_8bit(kOp, c10::DeviceType::CPU, A, out_codes, out_absmax, code, blocksize);
  const FloatType input_type = float_type_of(A, kOp, "A");
  if (A.numel() == 0) return;
  cpu::quantize_blockwise_8bit(A.data_ptr(), input_type, A.numel(), code.data_ptr<float>(),
                               blocksize, out_codes.data_ptr<uint8_t>(),
                               out_absmax.data_ptr<float>());
}

void dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& absmax,
                              const at::Tensor& code, int64_t blocksize, const at::Tensor& out) {
  constexpr const char* kOp = "dequantize_blockwise_cpu";
  check_blockwise_8bit(kOp, c10::DeviceType::CPU, out, codes, absmax, code, blocksize);
  const FloatType out_type = float_type_of(out, kOp, "out");
  if (codes.numel() == 0) return;
  cpu::dequantize_blockwise_8bit(codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                 code.data_ptr<float>(), codes.numel(), blocksize, out.data_ptr(),
                                 out_type);
}

// ------------------------------------------------------------------------------ 8-bit Adam

void adam8bit_multi_step_cpu(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& state1, const std::vector<at::Tensor>& state2,
    const std::vector<at::Tensor>& absmax1, const std::vector<at::Tensor>& absmax2,
    const at::Tensor& qmap1, const at::Tensor& qmap2, const std::vector<at::Tensor>& steps,
    const std::vector<at::Tensor>& skipped, double lr, double beta1, double beta2, double eps,
    double weight_decay, bool decoupled, double gnorm_scale, int64_t blocksize) {
  constexpr const char* kOp = "adam8bit_multi_step_cpu";
  check_adam8bit_multi_step(kOp, c10::DeviceType::CPU, params, grads, state1, state2, absmax1,
                            absmax2, qmap1, qmap2, steps, skipped, blocksize);
  std::vector<cpu::Adam8bitTensor> tensors;
  tensors.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    tensors.push_back({params[i].data_ptr(), grads[i].data_ptr(),
                       float_type_of(params[i], kOp, "param"), params[i].numel(),
                       state1[i].data_ptr<uint8_t>(), state2[i].data_ptr<uint8_t>(),
                       absmax1[i].data_ptr<float>(), absmax2[i].data_ptr<float>(),
                       steps[i].data_ptr<float>(), skipped[i].data_ptr<float>()});
  }
  if (tensors.empty()) return;
  const cpu::Adam8bitHyper hyper{lr,           beta1,     beta2,       eps,
                                 weight_decay, decoupled, gnorm_scale, blocksize};
  cpu::adam8bit_multi_step(tensors.data(), static_cast<int64_t>(tensors.size()),
                           qmap1.data_ptr<float>(), qmap2.data_ptr<float>(), hyper);
}

namespace {

void check_codebook_8bit(const at::Tensor& code, const char* op) {
  check_tensor(code, op, "code", c10::DeviceType::CPU);
  check_dtype(code, at::kFloat, op, "code");
  TORCH_CHECK(code.numel() == kCodebookSize8bit, op, ": code must have ", kCodebookSize8bit,
              " entries, got ", code.numel());
}

}  // namespace

void adam8bit_encode_cpu(const at::Tensor& values, const at::Tensor& code, const at::Tensor& out) {
  constexpr const char* kOp = "adam8bit_encode_cpu";
  check_codebook_8bit(code, kOp);
  check_tensor(values, kOp, "values", c10::DeviceType::CPU);
  check_tensor(out, kOp, "out", c10::DeviceType::CPU);
  check_dtype(values, at::kFloat, kOp, "values");
  check_dtype(out, at::kByte, kOp, "out");
  TORCH_CHECK(out.numel() == values.numel(), kOp, ": out must have ", values.numel(),
              " elements, got ", out.numel());
  cpu::adam8bit_encode(values.data_ptr<float>(), values.numel(), code.data_ptr<float>(),
                       out.data_ptr<uint8_t>());
}

bool adam8bit_segmented_encoder_usable(const at::Tensor& code) {
  check_codebook_8bit(code, "adam8bit_segmented_encoder_usable");
  return cpu::adam8bit_segmented_encoder_usable(code.data_ptr<float>());
}

std::tuple<int64_t, int64_t, int64_t> adam8bit_encoder_sweep_cpu(const at::Tensor& code,
                                                                 int64_t stride,
                                                                 int64_t neighbours) {
  constexpr const char* kOp = "adam8bit_encoder_sweep_cpu";
  check_codebook_8bit(code, kOp);
  TORCH_CHECK(stride >= 1, kOp, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(neighbours >= 0, kOp, ": neighbours must be >= 0, got ", neighbours);
  const cpu::EncoderSweep sweep =
      cpu::adam8bit_encoder_sweep(code.data_ptr<float>(), stride, neighbours);
  return {sweep.checked, sweep.mismatches, static_cast<int64_t>(sweep.first_mismatch_bits)};
}

// ---------------------------------------------------------------------------------- LLM.int8

void int8_quantize_weight_cpu(const at::Tensor& W, const at::Tensor& out_codes,
                              const at::Tensor& out_absmax) {
  constexpr const char* kOp = "int8_quantize_weight_cpu";
  const int64_t cols = check_int8_rows(kOp, c10::DeviceType::CPU, W, out_codes, out_absmax);
  const FloatType type = float_type_of(W, kOp, "W");
  if (W.numel() == 0) return;
  cpu::int8_quantize_rows(W.data_ptr(), type, W.numel() / cols, cols, out_codes.data_ptr<int8_t>(),
                          out_absmax.data_ptr<float>());
}

int64_t int8_vectorwise_quant_cpu(const at::Tensor& A, double threshold,
                                  const at::Tensor& out_codes, const at::Tensor& out_row_absmax,
                                  const at::Tensor& out_cols) {
  constexpr const char* kOp = "int8_vectorwise_quant_cpu";
  const int64_t cols = check_int8_rows(kOp, c10::DeviceType::CPU, A, out_codes, out_row_absmax);
  const FloatType type = float_type_of(A, kOp, "A");
  check_tensor(out_cols, kOp, "out_cols", c10::DeviceType::CPU);
  check_dtype(out_cols, at::kLong, kOp, "out_cols");
  TORCH_CHECK(out_cols.numel() == cols, kOp, ": out_cols must have ", cols, " elements, got ",
              out_cols.numel());
  if (A.numel() == 0) return 0;
  const int64_t rows = A.numel() / cols;
  const std::vector<int64_t> outliers =
      cpu::int8_vectorwise_quant(A.data_ptr(), type, rows, cols, static_cast<float>(threshold),
                                 out_codes.data_ptr<int8_t>(), out_row_absmax.data_ptr<float>());
  std::copy(outliers.begin(), outliers.end(), out_cols.data_ptr<int64_t>());
  return static_cast<int64_t>(outliers.size());
}

namespace {

// Rows of a matrix whose last dimension holds the features (also when that dimension is 0).
int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    rows *= t.size(d);
  return rows;
}

// The pieces of an int8 GEMM call every binding checks: weight, bias, output. Returns N.
int64_t check_int8_gemm_operands(const char* op, const at::Tensor& weight,
                                 const at::Tensor& weight_scale,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& out,
                                 int64_t rows, const at::Device& device) {
  check_int8_weight(op, c10::DeviceType::CPU, weight, weight_scale, device);
  const int64_t N = weight.size(0);
  if (bias.has_value()) {
    check_tensor(*bias, op, "bias", c10::DeviceType::CPU);
    check_dtype(*bias, at::kFloat, op, "bias");
    TORCH_CHECK(bias->numel() == N, op, ": bias must have ", N, " elements, got ", bias->numel());
    TORCH_CHECK(bias->device() == device, op, ": bias must be on ", device);
  }
  check_tensor(out, op, "out", c10::DeviceType::CPU);
  float_type_of(out, op, "out");
  TORCH_CHECK(out.numel() == rows * N, op, ": out must have ", rows * N, " elements, got ",
              out.numel());
  TORCH_CHECK(out.device() == device, op, ": out must be on ", device);
  return N;
}

}  // namespace

void int8_scaled_mm_cpu(const at::Tensor& A, const at::Tensor& row_stats, const at::Tensor& weight,
                        const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                        const at::Tensor& out) {
  constexpr const char* kOp = "int8_scaled_mm_cpu";
  check_tensor(A, kOp, "A", c10::DeviceType::CPU);
  check_dtype(A, at::kChar, kOp, "A");
  check_tensor(row_stats, kOp, "row_stats", c10::DeviceType::CPU);
  check_dtype(row_stats, at::kFloat, kOp, "row_stats");
  TORCH_CHECK(A.dim() >= 1 && weight.dim() == 2 && A.size(-1) == weight.size(1), kOp,
              ": A's last dimension must equal weight's in_features");
  const int64_t K = A.size(-1);
  const int64_t rows = leading_rows(A);
  TORCH_CHECK(row_stats.numel() == rows, kOp, ": row_stats must have ", rows, " elements");
  TORCH_CHECK(row_stats.device() == A.device(), kOp, ": row_stats must be on ", A.device());
  const int64_t N =
      check_int8_gemm_operands(kOp, weight, weight_scale, bias, out, rows, A.device());
  if (rows == 0 || N == 0) return;
  cpu::Int8Epilogue epilogue;
  epilogue.row_stats = row_stats.data_ptr<float>();
  epilogue.col_stats = weight_scale.data_ptr<float>();
  epilogue.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  epilogue.out = out.data_ptr();
  epilogue.out_type = float_type_of(out, kOp, "out");
  cpu::int8_gemm(A.data_ptr<int8_t>(), rows, K, weight.data_ptr<int8_t>(), N, epilogue);
}

void int8_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                     const std::optional<at::Tensor>& bias, double threshold,
                     const at::Tensor& out) {
  constexpr const char* kOp = "int8_linear_cpu";
  check_tensor(x, kOp, "x", c10::DeviceType::CPU);
  const FloatType x_type = float_type_of(x, kOp, "x");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1), kOp,
              ": x's last dimension must equal weight's in_features");
  const int64_t K = x.size(-1);
  const int64_t rows = leading_rows(x);
  const int64_t N =
      check_int8_gemm_operands(kOp, weight, weight_scale, bias, out, rows, x.device());
  if (rows == 0 || N == 0) return;
  cpu::int8_linear(x.data_ptr(), x_type, rows, K, weight.data_ptr<int8_t>(),
                   weight_scale.data_ptr<float>(), N,
                   bias.has_value() ? bias->data_ptr<float>() : nullptr,
                   static_cast<float>(threshold), out.data_ptr(), float_type_of(out, kOp, "out"));
}

std::string int8_gemm_kernel_cpu(int64_t M) {
  return cpu::int8_gemm_kernel_name(M);
}

}  // namespace lowprec
