// The Python module lowprec_kernels._C: kernel entry points, the CPU ISA switch and
// build_info(). The only translation unit that includes pybind11 (the slowest headers), so
// adding a kernel family adds a few m.def lines here and nothing heavier.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/profiler/api.h>
#include <torch/csrc/utils/pybind.h>

#include <stdexcept>
#include <string>

#include "bindings.h"
#include "cpu/cpu_isa.h"
#include "cpu/fourbit.h"
#include "lowprec/blockwise8.h"
#include "lowprec/common.h"
#include "lowprec/fourbit.h"
#if defined(LOWPREC_WITH_CUDA)
#include "cuda/blockwise8.h"
#include "cuda/fourbit.h"
#endif

// Set by setup.py; defaults keep a hand-rolled build working.
#ifndef LOWPREC_TORCH_VERSION
#define LOWPREC_TORCH_VERSION "unknown"
#endif
#ifndef LOWPREC_CUDA_ARCH_LIST
#define LOWPREC_CUDA_ARCH_LIST ""
#endif

namespace py = pybind11;

namespace lowprec {
namespace {

std::string compiler_description() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

py::list cpu_isa_names(bool supported_only) {
  py::list names;
  for (cpu::CpuIsa isa : cpu::compiled_cpu_isas()) {
    if (!supported_only || cpu::cpu_supports(isa)) names.append(cpu::cpu_isa_name(isa));
  }
  return names;
}

py::dict build_info() {
  py::dict info;
  info["compiled"] = true;
  info["cpu_isa_compiled"] = cpu_isa_names(/*supported_only=*/false);
  info["cpu_isa_supported"] = cpu_isa_names(/*supported_only=*/true);
  info["cpu_isa"] = cpu::cpu_isa_name(cpu::active_cpu_isa());
  const std::string requested = cpu::requested_cpu_isa();
  info["cpu_isa_env"] = requested.empty() ? py::object(py::none()) : py::object(py::str(requested));
  info["cpu_threading"] = "at::parallel_for";
  info["cpu_gemv_4bit_bf16_dot"] = cpu::gemv_uses_bf16_dot();
#if defined(LOWPREC_WITH_CUDA)
  info["cuda_compiled"] = true;
  info["cuda_arch_list"] = LOWPREC_CUDA_ARCH_LIST;
  info["cuda_runtime_version"] = cuda::compiled_cuda_runtime_version();
#else
  info["cuda_compiled"] = false;
  info["cuda_arch_list"] = py::none();
  info["cuda_runtime_version"] = py::none();
#endif
  info["compiler"] = compiler_description();
  info["cplusplus"] = static_cast<long>(__cplusplus);
  info["torch_version"] = LOWPREC_TORCH_VERSION;

  py::dict constants;
  constants["int8_scale"] = kInt8Scale;
  constants["codebook_size_8bit"] = kCodebookSize8bit;
  constants["codebook_size_4bit"] = kCodebookSize4bit;
  constants["blocksize_min_8bit"] = kBlocksizeMin8bit;
  constants["blocksize_max_8bit"] = kBlocksizeMax8bit;
  constants["blocksize_min_4bit"] = kBlocksizeMin4bit;
  constants["blocksize_max_4bit"] = kBlocksizeMax4bit;
  constants["fp4_sign_bit"] = kFp4SignBit;
  constants["cpu_gemv_row_group"] = cpu::kGemvRowGroup;
#if defined(LOWPREC_WITH_CUDA)
  constants["cuda_gemv_4bit_max_rows"] = cuda::kGemv4bitMaxRows;
#endif
  info["constants"] = constants;
  return info;
}

std::string get_cpu_isa() {
  return cpu::cpu_isa_name(cpu::active_cpu_isa());
}

// "auto" restores the best path this CPU supports. Returns the path now active.
std::string set_cpu_isa(const std::string& name) {
  cpu::CpuIsa isa = cpu::best_supported_cpu_isa();
  if (name != "auto") {
    if (!cpu::parse_cpu_isa(name, &isa)) {
      throw std::invalid_argument("set_cpu_isa: name must be one of 'avx512', 'avx2', 'scalar', " +
                                  std::string("'auto', got '") + name + "'");
    }
    if (!cpu::cpu_supports(isa)) {
      throw std::invalid_argument("set_cpu_isa: '" + name + "' is not " +
                                  "supported by this CPU or build");
    }
  }
  cpu::set_active_cpu_isa(isa);
  return get_cpu_isa();
}

// The checks of lowprec_kernels._ops._dispatcher_has_work that read torch's thread-local state
// and the tensors, in one call: from Python each costs a few microseconds when the caches are
// cold (after a large op), ~25 us in all. The caller checks first what only Python sees
// (torch.compile, which would stop at this call; the tensors' Python types).
bool dispatcher_has_work(const std::vector<at::Tensor>& tensors) {
  if (tensors.empty()) return true;
  if (torch::jit::tracer::isTracing() || at::impl::torch_function_mode_enabled() ||
      c10::impl::TorchDispatchModeTLS::any_modes_set() ||
      torch::profiler::impl::profilerEnabled()) {
    return true;
  }
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  if (included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode)) {
    return true;  // functorch transforms (vmap, grad, ...)
  }
  const c10::DeviceType device = tensors[0].device().type();
  if (device != c10::DeviceType::CPU && device != c10::DeviceType::CUDA) return true;
  if (at::autocast::is_autocast_enabled(device)) return true;
  // Lazily negated or conjugated views and zero tensors: their data is not what they hold
  // until the dispatcher's fallbacks materialize it.
  const c10::DispatchKeySet lazy_views{c10::DispatchKey::Negative, c10::DispatchKey::Conjugate,
                                       c10::DispatchKey::ZeroTensor};
  for (const at::Tensor& t : tensors) {
    if (t.key_set().has_any(lazy_views)) return true;
  }
  if (c10::GradMode::is_enabled()) {
    for (const at::Tensor& t : tensors) {
      if (t.requires_grad()) return true;
    }
  }
  return false;
}

// Exposes the shared threshold rule so tests can compare it with the Python reference.
float midpoint_threshold_for_test(float lower, float upper) {
  return midpoint_threshold(lower, upper);
}

}  // namespace
}  // namespace lowprec

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace lowprec;
  m.doc() = "lowprec_kernels native kernels (CPU, and CUDA when compiled)";

  m.def("build_info", &build_info,
        "What was compiled (CPU ISA paths, CUDA archs), the ISA chosen now, and the constants "
        "the C++ side uses.");
  m.def("get_cpu_isa", &get_cpu_isa, "The CPU path kernels take now: avx512, avx2 or scalar.");
  m.def("cpu_has_avx512_bf16", &cpu::cpu_has_avx512_bf16,
        "Whether the CPU has AVX512_BF16: the 4-bit kernels' bf16 dot products (GEMV, and "
        "oneDNN's brgemm in the GEMM) need it.");
  m.def("cpu_bf16_gemm_native", &cpu::cpu_bf16_gemm_native,
        "Whether the 4-bit GEMM path computes bf16 x in bf16 (torch's GEMM): false on x86 "
        "without AVX512_BF16, where it computes in fp32.");
  m.def("dispatcher_has_work", &dispatcher_has_work, py::arg("tensors"),
        "Whether torch's thread-local state or these tensors give its dispatcher work (tracing, "
        "modes, functorch, profiler, autocast, autograd, a device other than CPU or CUDA).");
  m.def("set_cpu_isa", &set_cpu_isa, py::arg("name"),
        "Force the CPU path (avx512, avx2, scalar; auto = best supported) for this process. "
        "Raises ValueError for a path this CPU or build lacks. Returns the active path.");
  m.def("midpoint_threshold", &midpoint_threshold_for_test, py::arg("lower"), py::arg("upper"),
        "The encoding threshold between two codebook entries (lowprec/blockwise8.h).");

  // Kernels run without the GIL: they touch no Python objects.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("quantize_blockwise_cpu", &quantize_blockwise_cpu, py::arg("A"), py::arg("code"),
        py::arg("blocksize"), py::arg("out_codes"), py::arg("out_absmax"), no_gil);
  m.def("dequantize_blockwise_cpu", &dequantize_blockwise_cpu, py::arg("codes"), py::arg("absmax"),
        py::arg("code"), py::arg("blocksize"), py::arg("out"), no_gil);
  m.def("adam8bit_multi_step_cpu", &adam8bit_multi_step_cpu, py::arg("params"), py::arg("grads"),
        py::arg("state1"), py::arg("state2"), py::arg("absmax1"), py::arg("absmax2"),
        py::arg("qmap1"), py::arg("qmap2"), py::arg("steps"), py::arg("skipped"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("decoupled"), py::arg("gnorm_scale"), py::arg("blocksize"), no_gil);
  m.def("adam_multi_step_cpu", &adam_multi_step_cpu, py::arg("params"), py::arg("grads"),
        py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("steps"), py::arg("skipped"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("decoupled"), py::arg("gnorm_scale"), no_gil);
  m.def("adam8bit_multi_step_eager_cpu", &adam8bit_multi_step_eager_cpu, py::arg("params"),
        py::arg("grads"), py::arg("state1"), py::arg("state2"), py::arg("absmax1"),
        py::arg("absmax2"), py::arg("qmap1"), py::arg("qmap2"), py::arg("steps"),
        py::arg("skipped"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("decoupled"), py::arg("gnorm_scale"), py::arg("blocksize"),
        no_gil);
  m.def("adam_multi_step_eager_cpu", &adam_multi_step_eager_cpu, py::arg("params"),
        py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("steps"),
        py::arg("skipped"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("decoupled"), py::arg("gnorm_scale"), no_gil);
  m.def("adam8bit_encode_cpu", &adam8bit_encode_cpu, py::arg("values"), py::arg("code"),
        py::arg("out"), no_gil,
        "The 8-bit Adam kernel's state encoder on the active CPU path (for tests).");
  m.def(
      "adam8bit_segmented_encoder_usable", &adam8bit_segmented_encoder_usable, py::arg("code"),
      "Whether the arithmetic (segmented) encoder applies to this codebook (lowprec/adam8bit.h).");
  m.def("adam8bit_encoder_sweep_cpu", &adam8bit_encoder_sweep_cpu, py::arg("code"),
        py::arg("stride"), py::arg("neighbours"), py::arg("absmax") = 1.0, no_gil,
        "(checked, mismatches, first mismatch bits) of the active path's encoder against the "
        "exact rule over every stride-th float v of [-1, 1] and every threshold's neighbours, "
        "each encoded as x = v * absmax with that absmax (the rule's value is x / absmax).");
  m.def("int8_quantize_weight_cpu", &int8_quantize_weight_cpu, py::arg("W"), py::arg("out_codes"),
        py::arg("out_absmax"), no_gil);
  m.def("int8_vectorwise_quant_cpu", &int8_vectorwise_quant_cpu, py::arg("A"), py::arg("threshold"),
        py::arg("out_codes"), py::arg("out_row_absmax"), py::arg("out_cols"), no_gil,
        "Writes the sorted outlier columns to out_cols[:count]; returns count.");
  m.def("int8_scaled_mm_cpu", &int8_scaled_mm_cpu, py::arg("A"), py::arg("row_stats"),
        py::arg("weight"), py::arg("weight_scale"), py::arg("bias"), py::arg("out"), no_gil);
  m.def("int8_linear_cpu", &int8_linear_cpu, py::arg("x"), py::arg("weight"),
        py::arg("weight_scale"), py::arg("bias"), py::arg("threshold"), py::arg("out"), no_gil);
  m.def("int8_gemm_kernel_cpu", &int8_gemm_kernel_cpu, py::arg("M"),
        "The int8 GEMM kernel the active CPU path runs for M rows.");
  m.def("matmul_4bit_gemm_kernel_cpu", &matmul_4bit_gemm_kernel_cpu, py::arg("x"),
        py::arg("blocksize"),
        "The kernel matmul_4bit_gemm_cpu runs for x: brgemm_bf16, brgemm_f32 or torch_gemm.");
  m.def("cpu_fp32_brgemm_available", &cpu_fp32_brgemm_available,
        "Whether the 4-bit GEMM path's fp32 brgemm kernel runs now (AVX-512 path, oneDNN, "
        "mkldnn enabled): it sets the GEMV crossover.");

  // NF4 / FP4: the weight arguments as in the ops (absmax, code, blocksize, nested_*).
  m.def("quantize_4bit_cpu", &quantize_4bit_cpu, py::arg("A"), py::arg("code"),
        py::arg("blocksize"), py::arg("quant_type"), py::arg("out_packed"), py::arg("out_absmax"),
        no_gil);
  m.def("dequantize_4bit_cpu", &dequantize_4bit_cpu, py::arg("packed"), py::arg("absmax"),
        py::arg("code"), py::arg("blocksize"), py::arg("nested_absmax"), py::arg("nested_code"),
        py::arg("offset"), py::arg("nested_blocksize"), py::arg("out"), no_gil);
  m.def("matmul_4bit_gemv_cpu", &matmul_4bit_gemv_cpu, py::arg("x"), py::arg("packed"),
        py::arg("absmax"), py::arg("code"), py::arg("blocksize"), py::arg("nested_absmax"),
        py::arg("nested_code"), py::arg("offset"), py::arg("nested_blocksize"), py::arg("bias"),
        py::arg("out"), no_gil);
  m.def("matmul_4bit_gemm_cpu", &matmul_4bit_gemm_cpu, py::arg("x"), py::arg("packed"),
        py::arg("absmax"), py::arg("code"), py::arg("blocksize"), py::arg("nested_absmax"),
        py::arg("nested_code"), py::arg("offset"), py::arg("nested_blocksize"), py::arg("bias"),
        py::arg("out"), no_gil);
  m.def("matmul_4bit_eager_cpu", &matmul_4bit_eager_cpu, py::arg("x"), py::arg("packed"),
        py::arg("absmax"), py::arg("code"), py::arg("blocksize"), py::arg("shape"),
        py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"),
        py::arg("nested_blocksize"), py::arg("bias"), py::arg("gemv_max_rows"), py::arg("poison"),
        no_gil, "The output, or None when an argument is not one the op's checker accepts.");
#if defined(LOWPREC_WITH_CUDA)
  m.def("quantize_blockwise_cuda", &quantize_blockwise_cuda, py::arg("A"), py::arg("code"),
        py::arg("blocksize"), py::arg("out_codes"), py::arg("out_absmax"), no_gil);
  m.def("dequantize_blockwise_cuda", &dequantize_blockwise_cuda, py::arg("codes"),
        py::arg("absmax"), py::arg("code"), py::arg("blocksize"), py::arg("out"), no_gil);
  m.def("adam8bit_multi_step_cuda", &adam8bit_multi_step_cuda, py::arg("params"), py::arg("grads"),
        py::arg("state1"), py::arg("state2"), py::arg("absmax1"), py::arg("absmax2"),
        py::arg("qmap1"), py::arg("qmap2"), py::arg("steps"), py::arg("skipped"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("decoupled"), py::arg("gnorm_scale"), py::arg("blocksize"), no_gil);
  m.def("int8_quantize_weight_cuda", &int8_quantize_weight_cuda, py::arg("W"), py::arg("out_codes"),
        py::arg("out_absmax"), no_gil);
  m.def("int8_vectorwise_quant_cuda", &int8_vectorwise_quant_cuda, py::arg("A"),
        py::arg("threshold"), py::arg("out_codes"), py::arg("out_row_absmax"),
        py::arg("out_outlier_mask"), no_gil);

  m.def("quantize_4bit_cuda", &quantize_4bit_cuda, py::arg("A"), py::arg("code"),
        py::arg("blocksize"), py::arg("quant_type"), py::arg("out_packed"), py::arg("out_absmax"),
        no_gil);
  m.def("dequantize_4bit_cuda", &dequantize_4bit_cuda, py::arg("packed"), py::arg("absmax"),
        py::arg("code"), py::arg("blocksize"), py::arg("nested_absmax"), py::arg("nested_code"),
        py::arg("offset"), py::arg("nested_blocksize"), py::arg("out"), no_gil);
  m.def("matmul_4bit_gemv_cuda", &matmul_4bit_gemv_cuda, py::arg("x"), py::arg("packed"),
        py::arg("absmax"), py::arg("code"), py::arg("blocksize"), py::arg("nested_absmax"),
        py::arg("nested_code"), py::arg("offset"), py::arg("nested_blocksize"), py::arg("bias"),
        py::arg("out"), no_gil);
  m.def("matmul_4bit_eager_cuda", &matmul_4bit_eager_cuda, py::arg("x"), py::arg("packed"),
        py::arg("absmax"), py::arg("code"), py::arg("blocksize"), py::arg("shape"),
        py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"),
        py::arg("nested_blocksize"), py::arg("bias"), py::arg("gemv_max_rows"), py::arg("poison"),
        no_gil, "The output, or None when the call is not one this entry takes.");
#endif
}
