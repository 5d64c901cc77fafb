// Argument checks shared by the CPU and CUDA bindings. They guard the raw-pointer kernels
// against memory errors: user-facing validation (with messages naming the argument) is done in
// Python (lowprec_kernels/_ops.py), before a backend kernel is called. The exception are the
// eager entries' predicates (*_eager_accepts): the Python checks as a yes or no, so that a plain
// eager call can skip them; what they decline goes through the Python checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "lowprec/common.h"
#include "lowprec/fourbit.h"

namespace lowprec {

inline FloatType float_type_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return FloatType::kFloat32;
    case at::kHalf:
      return FloatType::kFloat16;
    case at::kBFloat16:
      return FloatType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

inline void check_tensor(const at::Tensor& t, const char* op, const char* name,
                         c10::DeviceType device_type) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().type() == device_type, op, ": ", name, " must be on ", device_type,
              ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* op,
                        const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

inline void check_blocksize_8bit(int64_t blocksize, const char* op) {
  TORCH_CHECK(is_power_of_two(blocksize) && blocksize >= kBlocksizeMin8bit &&
                  blocksize <= kBlocksizeMax8bit,
              op, ": blocksize must be a power of two in [", kBlocksizeMin8bit, ", ",
              kBlocksizeMax8bit, "], got ", blocksize);
}

// `values` is the float side (quantize input or dequantize output), `codes` the uint8 side.
inline void check_blockwise_8bit(const char* op, c10::DeviceType device_type,
                                 const at::Tensor& values, const at::Tensor& codes,
                                 const at::Tensor& absmax, const at::Tensor& code,
                                 int64_t blocksize) {
  check_tensor(values, op, "values", device_type);
  check_tensor(codes, op, "codes", device_type);
  check_tensor(absmax, op, "absmax", device_type);
  check_tensor(code, op, "code", device_type);
  check_dtype(codes, at::kByte, op, "codes");
  check_dtype(absmax, at::kFloat, op, "absmax");
  check_dtype(code, at::kFloat, op, "code");
  check_blocksize_8bit(blocksize, op);
  TORCH_CHECK(code.numel() == kCodebookSize8bit, op, ": code must have ", kCodebookSize8bit,
              " entries, got ", code.numel());
  const int64_t n = values.numel();
  TORCH_CHECK(codes.numel() == n, op, ": codes must have ", n, " elements, got ", codes.numel());
  const int64_t num_blocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.numel() == num_blocks, op, ": absmax must have ", num_blocks,
              " elements, got ", absmax.numel());
  for (const at::Tensor* t : {&codes, &absmax, &code}) {
    TORCH_CHECK(t->device() == values.device(), op, ": all tensors must be on ", values.device(),
                ", got ", t->device());
  }
}

// ------------------------------------------------------------------------------ 8-bit Adam

// One tensor an Adam step reads or writes beside parameter i, and what it must be.
struct AdamExpected {
  const at::Tensor* t;
  const char* name;
  at::ScalarType dtype;
  int64_t numel;
};

// Parameter i of an Adam multi-step and the tensors beside it: contiguous on `device_type`,
// all on params[0]'s device.
inline void check_adam_parameter(const char* op, c10::DeviceType device_type,
                                 const std::vector<at::Tensor>& params, size_t i,
                                 std::initializer_list<AdamExpected> expected) {
  const at::Tensor& p = params[i];
  check_tensor(p, op, "param", device_type);
  float_type_of(p, op, "param");
  TORCH_CHECK(p.device() == params[0].device(), op, ": all tensors must be on ",
              params[0].device());
  for (const AdamExpected& e : expected) {
    check_tensor(*e.t, op, e.name, device_type);
    check_dtype(*e.t, e.dtype, op, e.name);
    TORCH_CHECK(e.t->numel() == e.numel, op, ": ", e.name, " of tensor ", i, " must have ", e.numel,
                " elements, got ", e.t->numel());
    TORCH_CHECK(e.t->device() == p.device(), op, ": all tensors must be on ", p.device());
  }
}

// A step count read on the host (the CPU's), which the step takes as t = int(step) + 1: finite
// and >= 0 (a negative or NaN one made every parameter NaN), as the reference requires. A
// device's step is read by its kernel on the device, unchecked (reading it here would wait for
// the device). Called on a checked or accepted float32 one-element tensor.
inline bool step_value_valid(const at::Tensor& step) {
  if (!step.device().is_cpu()) return true;
  const float value = *step.data_ptr<float>();
  return std::isfinite(value) && value >= 0.0f;
}

// Every step of a multi-step, before anything is updated.
inline void check_step_values(const char* op, const std::vector<at::Tensor>& steps) {
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK_VALUE(step_value_valid(steps[i]), op, ": step of tensor ", i,
                      " must be a finite number >= 0, got ", *steps[i].data_ptr<float>());
  }
}

inline void check_adam_list_sizes(const char* op, size_t count,
                                  std::initializer_list<const std::vector<at::Tensor>*> lists) {
  for (const auto* list : lists) {
    TORCH_CHECK(list->size() == count, op, ": every list must hold ", count,
                " tensors (one per param), got ", list->size());
  }
}

// The tensors of one adam8bit_multi_step_ call: every list one entry per parameter, each
// entry contiguous on `device_type`, all on params[0]'s device.
inline void check_adam8bit_multi_step(
    const char* op, c10::DeviceType device_type, const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& state1,
    const std::vector<at::Tensor>& state2, const std::vector<at::Tensor>& absmax1,
    const std::vector<at::Tensor>& absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2,
    const std::vector<at::Tensor>& steps, const std::vector<at::Tensor>& skipped,
    int64_t blocksize) {
  check_blocksize_8bit(blocksize, op);
  const size_t count = params.size();
  check_adam_list_sizes(op, count,
                        {&grads, &state1, &state2, &absmax1, &absmax2, &steps, &skipped});
  for (const at::Tensor* code : {&qmap1, &qmap2}) {
    check_tensor(*code, op, "qmap", device_type);
    check_dtype(*code, at::kFloat, op, "qmap");
    TORCH_CHECK(code->numel() == kCodebookSize8bit, op, ": qmap must have ", kCodebookSize8bit,
                " entries, got ", code->numel());
  }
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(qmap1.device() == p.device() && qmap2.device() == p.device(), op,
                ": all tensors must be on ", params[0].device());
    const int64_t n = p.numel();
    const int64_t num_blocks = (n + blocksize - 1) / blocksize;
    check_adam_parameter(op, device_type, params, i,
                         {{&grads[i], "grad", p.scalar_type(), n},
                          {&state1[i], "state1", at::kByte, n},
                          {&state2[i], "state2", at::kByte, n},
                          {&absmax1[i], "absmax1", at::kFloat, num_blocks},
                          {&absmax2[i], "absmax2", at::kFloat, num_blocks},
                          {&steps[i], "step", at::kFloat, 1},
                          {&skipped[i], "skipped", at::kFloat, 1}});
  }
  check_step_values(op, steps);
}

// The tensors of one adam_multi_step_ call (float32 states), as check_adam8bit_multi_step.
inline void check_adam_multi_step(const char* op, c10::DeviceType device_type,
                                  const std::vector<at::Tensor>& params,
                                  const std::vector<at::Tensor>& grads,
                                  const std::vector<at::Tensor>& exp_avgs,
                                  const std::vector<at::Tensor>& exp_avg_sqs,
                                  const std::vector<at::Tensor>& steps,
                                  const std::vector<at::Tensor>& skipped) {
  check_adam_list_sizes(op, params.size(), {&grads, &exp_avgs, &exp_avg_sqs, &steps, &skipped});
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const int64_t n = p.numel();
    check_adam_parameter(op, device_type, params, i,
                         {{&grads[i], "grad", p.scalar_type(), n},
                          {&exp_avgs[i], "exp_avg", at::kFloat, n},
                          {&exp_avg_sqs[i], "exp_avg_sq", at::kFloat, n},
                          {&steps[i], "step", at::kFloat, 1},
                          {&skipped[i], "skipped", at::kFloat, 1}});
  }
  check_step_values(op, steps);
}

// LLM.int8: float values viewed as [rows, cols] (cols = the last dimension), their int8 codes
// (same shape) and one float32 absmax per row. Returns cols.
inline int64_t check_int8_rows(const char* op, c10::DeviceType device_type,
                               const at::Tensor& values, const at::Tensor& codes,
                               const at::Tensor& row_absmax) {
  check_tensor(values, op, "values", device_type);
  check_tensor(codes, op, "codes", device_type);
  check_tensor(row_absmax, op, "row_absmax", device_type);
  check_dtype(codes, at::kChar, op, "codes");
  check_dtype(row_absmax, at::kFloat, op, "row_absmax");
  TORCH_CHECK(values.dim() >= 1, op, ": values must have at least one dimension");
  const int64_t cols = values.size(-1);
  const int64_t rows = cols == 0 ? 0 : values.numel() / cols;
  TORCH_CHECK(codes.numel() == values.numel(), op, ": codes must have ", values.numel(),
              " elements, got ", codes.numel());
  TORCH_CHECK(row_absmax.numel() == rows, op, ": row_absmax must have ", rows, " elements, got ",
              row_absmax.numel());
  for (const at::Tensor* t : {&codes, &row_absmax}) {
    TORCH_CHECK(t->device() == values.device(), op, ": all tensors must be on ", values.device(),
                ", got ", t->device());
  }
  return cols;
}

// An int8 weight [N, K] and its float32 scales [N] on `device`.
inline void check_int8_weight(const char* op, c10::DeviceType device_type, const at::Tensor& weight,
                              const at::Tensor& weight_scale, const at::Device& device) {
  check_tensor(weight, op, "weight", device_type);
  check_tensor(weight_scale, op, "weight_scale", device_type);
  check_dtype(weight, at::kChar, op, "weight");
  check_dtype(weight_scale, at::kFloat, op, "weight_scale");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D, got ", weight.dim(), "-D");
  TORCH_CHECK(weight_scale.numel() == weight.size(0), op, ": weight_scale must have ",
              weight.size(0), " elements, got ", weight_scale.numel());
  for (const at::Tensor* t : {&weight, &weight_scale}) {
    TORCH_CHECK(t->device() == device, op, ": all tensors must be on ", device, ", got ",
                t->device());
  }
}

// ------------------------------------------------------------------------------ NF4 / FP4

inline void check_blocksize_4bit(int64_t blocksize, const char* op) {
  TORCH_CHECK(is_power_of_two(blocksize) && blocksize >= kBlocksizeMin4bit &&
                  blocksize <= kBlocksizeMax4bit,
              op, ": blocksize must be a power of two in [", kBlocksizeMin4bit, ", ",
              kBlocksizeMax4bit, "], got ", blocksize);
}

inline QuantType4bit quant_type_4bit(const std::string& name, const char* op) {
  if (name == "nf4") return QuantType4bit::kNf4;
  TORCH_CHECK(name == "fp4", op, ": quant_type must be 'nf4' or 'fp4', got '", name, "'");
  return QuantType4bit::kFp4;
}

inline bool power_of_two_in(int64_t v, int64_t lowest, int64_t highest) {
  return is_power_of_two(v) && v >= lowest && v <= highest;
}

// The operands of quantize_4bit (A, its codebook, the packed output and the block absmax),
// all on A's device; returns A's element type and the quant type.
struct Quantize4bitTypes {
  FloatType input;
  QuantType4bit quant;
};
inline Quantize4bitTypes check_quantize_4bit(const char* op, c10::DeviceType device_type,
                                             const at::Tensor& A, const at::Tensor& code,
                                             int64_t blocksize, const std::string& quant_type,
                                             const at::Tensor& out_packed,
                                             const at::Tensor& out_absmax) {
  check_tensor(A, op, "A", device_type);
  check_tensor(code, op, "code", device_type);
  check_tensor(out_packed, op, "out_packed", device_type);
  check_tensor(out_absmax, op, "out_absmax", device_type);
  const FloatType input_type = float_type_of(A, op, "A");
  check_dtype(code, at::kFloat, op, "code");
  check_dtype(out_packed, at::kByte, op, "out_packed");
  check_dtype(out_absmax, at::kFloat, op, "out_absmax");
  check_blocksize_4bit(blocksize, op);
  const QuantType4bit type = quant_type_4bit(quant_type, op);
  TORCH_CHECK(code.numel() == kCodebookSize4bit, op, ": code must have ", kCodebookSize4bit,
              " entries, got ", code.numel());
  const int64_t n = A.numel();
  TORCH_CHECK(out_packed.numel() == (n + 1) / 2, op, ": out_packed must have ", (n + 1) / 2,
              " bytes, got ", out_packed.numel());
  TORCH_CHECK(out_absmax.numel() == (n + blocksize - 1) / blocksize, op, ": out_absmax must have ",
              (n + blocksize - 1) / blocksize, " elements, got ", out_absmax.numel());
  for (const at::Tensor* t : {&code, &out_packed, &out_absmax}) {
    TORCH_CHECK(t->device() == A.device(), op, ": all tensors must be on ", A.device());
  }
  return {input_type, type};
}

// A packed 4-bit tensor of n elements and its scales (fp32 absmax, or uint8 codes with
// nested_absmax, nested_code and offset); returns the scales as raw pointers.
inline BlockScales check_4bit_weight(const char* op, c10::DeviceType device_type,
                                     const at::Tensor& packed, const at::Tensor& absmax,
                                     const at::Tensor& code, int64_t blocksize, int64_t n,
                                     const std::optional<at::Tensor>& nested_absmax,
                                     const std::optional<at::Tensor>& nested_code,
                                     const std::optional<at::Tensor>& offset,
                                     int64_t nested_blocksize) {
  check_tensor(packed, op, "packed", device_type);
  check_tensor(absmax, op, "absmax", device_type);
  check_tensor(code, op, "code", device_type);
  check_dtype(packed, at::kByte, op, "packed");
  check_dtype(code, at::kFloat, op, "code");
  check_blocksize_4bit(blocksize, op);
  TORCH_CHECK(code.numel() == kCodebookSize4bit, op, ": code must have ", kCodebookSize4bit,
              " entries, got ", code.numel());
  TORCH_CHECK(packed.numel() == (n + 1) / 2, op, ": packed must have ", (n + 1) / 2, " bytes, got ",
              packed.numel());
  const int64_t num_blocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.dim() == 1 && absmax.numel() == num_blocks, op, ": absmax must be 1-D of ",
              num_blocks, " elements, got shape ", absmax.sizes());
  for (const at::Tensor* t : {&absmax, &code}) {
    TORCH_CHECK(t->device() == packed.device(), op, ": all tensors must be on ", packed.device(),
                ", got ", t->device());
  }
  BlockScales scales;
  if (absmax.scalar_type() == at::kFloat) {
    TORCH_CHECK(!nested_absmax && !nested_code && !offset, op,
                ": nested_absmax/nested_code/offset given with a float32 absmax");
    scales.absmax = absmax.data_ptr<float>();
    return scales;
  }
  check_dtype(absmax, at::kByte, op, "absmax");
  TORCH_CHECK(nested_absmax && nested_code && offset, op,
              ": a uint8 absmax needs nested_absmax, nested_code and offset");
  check_tensor(*nested_absmax, op, "nested_absmax", device_type);
  check_tensor(*nested_code, op, "nested_code", device_type);
  check_tensor(*offset, op, "offset", device_type);
  check_dtype(*nested_absmax, at::kFloat, op, "nested_absmax");
  check_dtype(*nested_code, at::kFloat, op, "nested_code");
  check_dtype(*offset, at::kFloat, op, "offset");
  TORCH_CHECK(power_of_two_in(nested_blocksize, kBlocksizeMin8bit, kBlocksizeMax8bit), op,
              ": nested_blocksize must be a power of two in [", kBlocksizeMin8bit, ", ",
              kBlocksizeMax8bit, "], got ", nested_blocksize);
  TORCH_CHECK(nested_code->numel() == kCodebookSize8bit, op, ": nested_code must have ",
              kCodebookSize8bit, " entries, got ", nested_code->numel());
  TORCH_CHECK(offset->numel() == 1, op, ": offset must have one element, got ", offset->numel());
  const int64_t nested_blocks = (num_blocks + nested_blocksize - 1) / nested_blocksize;
  TORCH_CHECK(nested_absmax->dim() == 1 && nested_absmax->numel() == nested_blocks, op,
              ": nested_absmax must be 1-D of ", nested_blocks, " elements, got shape ",
              nested_absmax->sizes());
  for (const at::Tensor* t : {&*nested_absmax, &*nested_code, &*offset}) {
    TORCH_CHECK(t->device() == packed.device(), op, ": all tensors must be on ", packed.device(),
                ", got ", t->device());
  }
  scales.absmax_codes = absmax.data_ptr<uint8_t>();
  scales.nested_code = nested_code->data_ptr<float>();
  scales.nested_absmax = nested_absmax->data_ptr<float>();
  scales.offset = offset->data_ptr<float>();
  scales.nested_blocksize_log2 = exact_log2(nested_blocksize);
  return scales;
}

// x [rows, in_features] and out [rows, out_features] of matmul_4bit, bias [out_features].
inline void check_matmul_4bit_operands(const char* op, c10::DeviceType device_type,
                                       const at::Tensor& x, const at::Tensor& packed,
                                       const std::optional<at::Tensor>& bias,
                                       const at::Tensor& out) {
  check_tensor(x, op, "x", device_type);
  check_tensor(out, op, "out", device_type);
  float_type_of(x, op, "x");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && out.size(0) == x.size(0), op,
              ": x must be [rows, in_features] and out [rows, out_features], got ", x.sizes(),
              " and ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": out must have x's dtype ",
              x.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(x.device() == packed.device() && out.device() == packed.device(), op,
              ": x, out and the weight must be on one device");
  if (bias) {
    check_tensor(*bias, op, "bias", device_type);
    float_type_of(*bias, op, "bias");
    TORCH_CHECK(bias->numel() == out.size(1), op, ": bias must have ", out.size(1),
                " elements, got ", bias->numel());
    TORCH_CHECK(bias->device() == packed.device(), op, ": bias must be on the weight's device");
  }
}

// ------------------------------------------------------------------ eager entries

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// The Adam checks of lowprec_kernels/_ops.py as a yes or no, plus what the kernels need beyond
// them (every tensor contiguous, on `device`), for the eager entries of the multi-steps: they
// decline what these do not accept, and the checked path reports it. tests/test_ops.py keeps
// them in step: the entries decline every bad input of the checker's table.
inline bool adam_scalars_accepted(double lr, double beta1, double beta2, double eps,
                                  double weight_decay, double gnorm_scale) {
  // Written so that a NaN fails every test, as in the Python checks (_check_adam_scalars).
  const double kInf = std::numeric_limits<double>::infinity();
  return lr >= 0.0 && lr < kInf && beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0 &&
         eps >= 0.0 && weight_decay >= 0.0 && weight_decay < kInf && gnorm_scale >= 0.0 &&
         gnorm_scale < kInf;
}

inline bool adam_tensor_accepted(const at::Tensor& t, c10::Device device, at::ScalarType dtype,
                                 int64_t numel) {
  return t.defined() && t.device() == device && t.scalar_type() == dtype && t.numel() == numel &&
         t.is_contiguous();
}

// Parameter i's p and g, and its step and skipped counters. g may be strided (the entries
// step a contiguous copy: autograd gives a transposed parameter a transposed gradient).
inline bool adam_parameter_accepted(const at::Tensor& p, const at::Tensor& g,
                                    const at::Tensor& step, const at::Tensor& skipped,
                                    c10::Device device) {
  if (!p.defined() || p.device() != device || !is_float_type(p.scalar_type()) || p.numel() == 0 ||
      !p.is_contiguous())
    return false;
  return g.defined() && g.device() == device && g.scalar_type() == p.scalar_type() &&
         g.sizes() == p.sizes() && adam_tensor_accepted(step, device, at::kFloat, 1) &&
         step_value_valid(step) && adam_tensor_accepted(skipped, device, at::kFloat, 1);
}

inline bool adam_lists_accepted(size_t count,
                                std::initializer_list<const std::vector<at::Tensor>*> lists) {
  if (count == 0) return false;
  for (const auto* list : lists)
    if (list->size() != count) return false;
  return true;
}

inline bool adam8bit_multi_step_eager_accepts(
    c10::Device device, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& state1, const std::vector<at::Tensor>& state2,
    const std::vector<at::Tensor>& absmax1, const std::vector<at::Tensor>& absmax2,
    const at::Tensor& qmap1, const at::Tensor& qmap2, const std::vector<at::Tensor>& steps,
    const std::vector<at::Tensor>& skipped, double lr, double beta1, double beta2, double eps,
    double weight_decay, double gnorm_scale, int64_t blocksize) {
  if (!adam_lists_accepted(params.size(),
                           {&grads, &state1, &state2, &absmax1, &absmax2, &steps, &skipped}) ||
      !power_of_two_in(blocksize, kBlocksizeMin8bit, kBlocksizeMax8bit) ||
      !adam_tensor_accepted(qmap1, device, at::kFloat, kCodebookSize8bit) ||
      !adam_tensor_accepted(qmap2, device, at::kFloat, kCodebookSize8bit) ||
      !adam_scalars_accepted(lr, beta1, beta2, eps, weight_decay, gnorm_scale))
    return false;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].defined() ? params[i].numel() : 0;
    const int64_t num_blocks = (n + blocksize - 1) / blocksize;
    if (!adam_parameter_accepted(params[i], grads[i], steps[i], skipped[i], device) ||
        !adam_tensor_accepted(state1[i], device, at::kByte, n) ||
        !adam_tensor_accepted(state2[i], device, at::kByte, n) ||
        !adam_tensor_accepted(absmax1[i], device, at::kFloat, num_blocks) ||
        !adam_tensor_accepted(absmax2[i], device, at::kFloat, num_blocks))
      return false;
  }
  return true;
}

inline bool adam_multi_step_eager_accepts(
    c10::Device device, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
    const std::vector<at::Tensor>& steps, const std::vector<at::Tensor>& skipped, double lr,
    double beta1, double beta2, double eps, double weight_decay, double gnorm_scale) {
  if (!adam_lists_accepted(params.size(), {&grads, &exp_avgs, &exp_avg_sqs, &steps, &skipped}) ||
      !adam_scalars_accepted(lr, beta1, beta2, eps, weight_decay, gnorm_scale))
    return false;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].defined() ? params[i].numel() : 0;
    if (!adam_parameter_accepted(params[i], grads[i], steps[i], skipped[i], device) ||
        !adam_tensor_accepted(exp_avgs[i], device, at::kFloat, n) ||
        !adam_tensor_accepted(exp_avg_sqs[i], device, at::kFloat, n))
      return false;
  }
  return true;
}

// check_matmul_4bit (lowprec_kernels/_ops.py) as a yes or no, plus what the kernels need beyond
// it (weight tensors contiguous, everything on packed's device): the eager entries decline what
// this does not accept, and the checked path reports it. tests/test_ops.py keeps the two in
// step: this declines every bad input of the checker's table.
inline bool matmul_4bit_eager_accepts(const at::Tensor& x, const at::Tensor& packed,
                                      const at::Tensor& absmax, const at::Tensor& code,
                                      int64_t blocksize, const std::vector<int64_t>& shape,
                                      const std::optional<at::Tensor>& nested_absmax,
                                      const std::optional<at::Tensor>& nested_code,
                                      const std::optional<at::Tensor>& offset,
                                      int64_t nested_blocksize,
                                      const std::optional<at::Tensor>& bias) {
  if (!packed.defined()) return false;
  const c10::Device device = packed.device();
  const auto weight_tensor = [&](const at::Tensor& t) {
    return t.defined() && t.device() == device && t.is_contiguous();
  };
  if (shape.size() != 2 || shape[0] <= 0 || shape[1] <= 0) return false;
  if (shape[0] > std::numeric_limits<int64_t>::max() / shape[1]) return false;
  const int64_t n = shape[0] * shape[1];
  if (!weight_tensor(packed) || packed.scalar_type() != at::kByte ||
      packed.numel() != n / 2 + (n & 1))  // (n + 1) / 2, no overflow
    return false;
  if (!power_of_two_in(blocksize, kBlocksizeMin4bit, kBlocksizeMax4bit)) return false;
  if (!weight_tensor(code) || code.scalar_type() != at::kFloat || code.dim() != 1 ||
      code.numel() != kCodebookSize4bit)
    return false;
  const int64_t num_blocks = (n + blocksize - 1) / blocksize;
  if (!weight_tensor(absmax) || absmax.dim() != 1 || absmax.numel() != num_blocks) return false;
  if (absmax.scalar_type() == at::kByte) {
    if (!nested_absmax || !nested_code || !offset) return false;
    if (!weight_tensor(*nested_absmax) || nested_absmax->scalar_type() != at::kFloat) return false;
    if (!weight_tensor(*nested_code) || nested_code->scalar_type() != at::kFloat ||
        nested_code->dim() != 1 || nested_code->numel() != kCodebookSize8bit)
      return false;
    if (!weight_tensor(*offset) || offset->scalar_type() != at::kFloat || offset->numel() != 1)
      return false;
    if (!power_of_two_in(nested_blocksize, kBlocksizeMin8bit, kBlocksizeMax8bit)) return false;
    if (nested_absmax->dim() != 1 ||
        nested_absmax->numel() != (num_blocks + nested_blocksize - 1) / nested_blocksize)
      return false;
  } else if (absmax.scalar_type() != at::kFloat || nested_absmax || nested_code || offset) {
    return false;
  }
  if (!x.defined() || x.device() != device || !is_float_type(x.scalar_type()) || x.dim() == 0 ||
      x.size(-1) != shape[1])
    return false;
  if (bias &&
      (!bias->defined() || bias->device() != device || !is_float_type(bias->scalar_type()) ||
       bias->dim() != 1 || bias->size(0) != shape[0]))
    return false;
  return true;
}

// The output of an eager matmul_4bit call: x's leading dimensions and dtype, out_features
// last, filled with `poison` when given (the tests' poison mode, lowprec_kernels/_alloc.py).
inline at::Tensor matmul_4bit_eager_output(const at::Tensor& x, int64_t out_features,
                                           std::optional<double> poison) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(out_features);
  at::Tensor out = at::empty(shape, x.options());
  if (poison) out.fill_(*poison);
  return out;
}

}  // namespace lowprec
