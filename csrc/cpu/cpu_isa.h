// Which CPU instruction-set path the kernels take. Every path is compiled into the one .so
// (per-function target attributes, no global -mavx512f), and the choice is made at run time,
// so the extension runs on any x86-64 (and builds, scalar only, elsewhere).
//
// Choice: the best path this CPU supports, lowered by the environment variable
// LOWPREC_CPU_ISA=avx512|avx2|scalar (read once, when the first kernel runs) or by
// set_active_cpu_isa() (exposed as _C.set_cpu_isa, used by tests to exercise every path).
// Defining LOWPREC_FORCE_NO_SIMD compiles x86 as other targets are compiled (scalar only), so
// that an x86 machine can check those builds (tests/test_packaging.py).
#pragma once

#include <string>
#include <type_traits>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(LOWPREC_FORCE_NO_SIMD)
#define LOWPREC_X86_SIMD 1
// Instruction sets a function body may use; the caller must have checked cpu_supports().
#define LP_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LP_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
// The AVX-512 path plus AVX512_VBMI (vpermb / vpermt2b), where cpu_has_avx512_vbmi().
#define LP_TARGET_AVX512_VBMI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma,f16c")))
#else
#define LOWPREC_X86_SIMD 0
#endif

namespace lowprec::cpu {

// Ordered: a higher value is a superset of the lower ones.
enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* cpu_isa_name(CpuIsa isa);
// "scalar" | "avx2" | "avx512" -> true and *isa; anything else -> false.
bool parse_cpu_isa(const std::string& name, CpuIsa* isa);

// Paths compiled into this build, lowest first.
std::vector<CpuIsa> compiled_cpu_isas();
// Compiled, and supported by this CPU and operating system.
bool cpu_supports(CpuIsa isa);
CpuIsa best_supported_cpu_isa();

// Whether the CPU has AVX512_VBMI, which kernels of the AVX-512 path use where they can (the
// byte-plane lookups of byte_planes.h).
bool cpu_has_avx512_vbmi();
// Whether the CPU has AVX512_BF16 (vdpbf16ps, vcvtneps2bf16): the bf16 GEMV's dot products,
// the VNNI tile decoder's rounding, and oneDNN's bf16 brgemm microkernel need it.
bool cpu_has_avx512_bf16();
// Whether torch's bf16 GEMM has a hardware dot product to run on: on x86 only with
// AVX512_BF16 (oneDNN emulates it otherwise, several times slower than fp32); on other targets
// (aarch64 with BF16, for one) torch's kernels are taken as they are.
bool cpu_bf16_gemm_native();

// The path kernels take now.
CpuIsa active_cpu_isa();
// Precondition: cpu_supports(isa).
void set_active_cpu_isa(CpuIsa isa);
// What LOWPREC_CPU_ISA asked for ("" when unset), for build_info.
std::string requested_cpu_isa();

// The build of one kernel for `isa` (a CpuIsa, or another path enum with kAvx512 and kAvx2):
// the one form of every per-ISA selector. A build without x86 SIMD compiles (and so names)
// only the scalar kernels. A template argument list with a comma goes in parentheses; `isa`
// is read twice.
#if LOWPREC_X86_SIMD
#define LP_PER_ISA(isa, avx512, avx2, scalar)               \
  ((isa) == std::decay_t<decltype(isa)>::kAvx512 ? (avx512) \
   : (isa) == std::decay_t<decltype(isa)>::kAvx2 ? (avx2)   \
                                                 : (scalar))
#else
#define LP_PER_ISA(isa, avx512, avx2, scalar) ::lowprec::cpu::scalar_build(isa, scalar)
template <typename Isa, typename Fn>
constexpr Fn scalar_build(Isa /*isa*/, Fn scalar) {
  return scalar;
}
#endif

}  // namespace lowprec::cpu
