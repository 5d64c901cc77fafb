// Shared by the CPU (.cpp) and CUDA (.cu) sources: the host/device function qualifier, float
// bit casts, and the constants the C++ side relies on. No torch headers here, so that nvcc
// translation units stay fast to compile.
//
// The constants mirror Python ones (lowprec_kernels/_ops.py and friends); _C.build_info()
// reports them and the tests check they agree (tests/test_native_build.py; the 4-bit ones in
// tests/test_fourbit_kernels.py). Codebook *tables* are never
// held in C++: they are passed in as tensors.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LP_HOST_DEVICE __host__ __device__
#else
#define LP_HOST_DEVICE
#endif

namespace lowprec {

// Entries of an 8-bit codebook (dynamic map): a code is a byte.
constexpr int kCodebookSize8bit = 256;
// Entries of a 4-bit codebook (NF4, FP4).
constexpr int kCodebookSize4bit = 16;
// Blockwise 8-bit blocksizes are the powers of two in [min, max].
constexpr int kBlocksizeMin8bit = 64;
constexpr int kBlocksizeMax8bit = 4096;
// LLM.int8 row scale: codes are round(kInt8Scale * x / absmax_row).
constexpr int kInt8Scale = 127;

// Floating-point element types a kernel reads or writes. Kernel entry points take data as
// `void*` plus this tag; 16-bit floats travel as raw bits on the CPU.
enum class FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

LP_HOST_DEVICE inline uint32_t float_to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}

LP_HOST_DEVICE inline float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

LP_HOST_DEVICE constexpr bool is_power_of_two(int64_t x) {
  return x > 0 && (x & (x - 1)) == 0;
}

// log2 of a power of two (blocksizes): block indices are shifts, not divisions, in hot loops.
LP_HOST_DEVICE constexpr int exact_log2(int64_t power_of_two) {
  int log2 = 0;
  while ((int64_t{1} << log2) < power_of_two)
    ++log2;
  return log2;
}

}  // namespace lowprec
