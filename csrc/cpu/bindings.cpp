// Tensor-level CPU entry points: check, unpack pointers, call the raw-pointer kernels.
#include "../bindings.h"

#include "../binding_checks.h"
#include "adam8bit.h"
#include "blockwise8.h"

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

}  // namespace lowprec
