#include "cpu_isa.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#if LOWPREC_X86_SIMD
#include <cpuid.h>
#endif

namespace lowprec::cpu {
namespace {

constexpr const char* kIsaEnvVar = "LOWPREC_CPU_ISA";
constexpr int kIsaUnset = -1;

std::atomic<int> g_active_isa{kIsaUnset};

bool cpu_has_avx2() {
#if LOWPREC_X86_SIMD
  __builtin_cpu_init();
  unsigned eax, ebx, ecx, edx;  // F16C: CPUID.1:ECX bit 29 (clang < 18 has no "f16c" name)
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 29));
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if LOWPREC_X86_SIMD
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the zmm state (XCR0).
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

}  // namespace

bool cpu_has_avx512_vbmi() {
#if LOWPREC_X86_SIMD
  static const bool has = [] {  // asked on every Adam step and GEMV call: ask the CPU once
    __builtin_cpu_init();
    return cpu_has_avx512() && __builtin_cpu_supports("avx512vbmi");
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if LOWPREC_X86_SIMD
  static const bool has = [] {
    __builtin_cpu_init();
    return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_bf16_gemm_native() {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_has_avx512_bf16();
#else
  return true;
#endif
}

namespace {

// The environment can only lower the choice: asking for a path this CPU lacks gets the best
// one it has, and an unknown name is reported and ignored.
CpuIsa isa_from_environment() {
  const CpuIsa best = best_supported_cpu_isa();
  const std::string requested = requested_cpu_isa();
  if (requested.empty() || requested == "auto") return best;
  CpuIsa wanted;
  if (!parse_cpu_isa(requested, &wanted)) {
    std::fprintf(stderr,
                 "lowprec_kernels: ignoring %s=%s (expected avx512, avx2, scalar or auto)\n",
                 kIsaEnvVar, requested.c_str());
    return best;
  }
  return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kScalar:
      return "scalar";
  }
  return "unknown";
}

bool parse_cpu_isa(const std::string& name, CpuIsa* isa) {
  for (CpuIsa candidate : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (name == cpu_isa_name(candidate)) {
      *isa = candidate;
      return true;
    }
  }
  return false;
}

std::vector<CpuIsa> compiled_cpu_isas() {
#if LOWPREC_X86_SIMD
  return {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512};
#else
  return {CpuIsa::kScalar};
#endif
}

bool cpu_supports(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return cpu_has_avx512();
    case CpuIsa::kAvx2:
      return cpu_has_avx2();
    case CpuIsa::kScalar:
      return true;
  }
  return false;
}

CpuIsa best_supported_cpu_isa() {
  if (cpu_supports(CpuIsa::kAvx512)) return CpuIsa::kAvx512;
  if (cpu_supports(CpuIsa::kAvx2)) return CpuIsa::kAvx2;
  return CpuIsa::kScalar;
}

std::string requested_cpu_isa() {
  const char* value = std::getenv(kIsaEnvVar);
  return value == nullptr ? std::string() : std::string(value);
}

CpuIsa active_cpu_isa() {
  int isa = g_active_isa.load(std::memory_order_relaxed);
  if (isa == kIsaUnset) {
    // Several threads may race here; they all compute the same value.
    isa = static_cast<int>(isa_from_environment());
    int expected = kIsaUnset;
    if (!g_active_isa.compare_exchange_strong(expected, isa)) isa = expected;
  }
  return static_cast<CpuIsa>(isa);
}

void set_active_cpu_isa(CpuIsa isa) {
  g_active_isa.store(static_cast<int>(isa));
}

}  // namespace lowprec::cpu
