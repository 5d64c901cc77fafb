// Tensor-level CPU entry points: check, unpack pointers, call the raw-pointer kernels.
#include "../bindings.h"

#include "../binding_checks.h"
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

}  // namespace lowprec
