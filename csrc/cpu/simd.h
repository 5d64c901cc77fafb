// Element loads and stores of the CPU kernels, scalar and vector, for every FloatType: widening
// is exact, narrowing rounds to nearest even exactly as torch's casts do (bf16 by hand, since
// vcvtneps2bf16 flushes subnormals). Also the pieces every family repeats around them: the
// FloatType -> template switch (with_float_type), the block absmax scan and the 8-bit code
// store. One copy for every kernel family (4-bit, blockwise 8-bit, 8-bit Adam, int8); helpers
// specific to one family stay in its own file.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "cpu_isa.h"
#include "lowprec/blockwise8.h"
#include "lowprec/common.h"
#include "lowprec/float16.h"

#if LOWPREC_X86_SIMD
#include <immintrin.h>
#endif

// GCC warns about the deliberately undefined pass-through operand inside its own AVX-512
// intrinsics (_mm512_undefined_*): a known false positive, silenced here for every kernel file
// (each includes this header).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace lowprec::cpu::simd {

template <FloatType T>
inline float load_float(const void* data, int64_t i) {
  if constexpr (T == FloatType::kFloat32) {
    return static_cast<const float*>(data)[i];
  } else if constexpr (T == FloatType::kFloat16) {
    return fp16_bits_to_float(static_cast<const uint16_t*>(data)[i]);
  } else {
    return bf16_bits_to_float(static_cast<const uint16_t*>(data)[i]);
  }
}

template <FloatType T>
inline void store_float(void* data, int64_t i, float value) {
  if constexpr (T == FloatType::kFloat32) {
    static_cast<float*>(data)[i] = value;
  } else if constexpr (T == FloatType::kFloat16) {
    static_cast<uint16_t*>(data)[i] = float_to_fp16_bits(value);
  } else {
    static_cast<uint16_t*>(data)[i] = float_to_bf16_bits(value);
  }
}

// f.template operator()<T>() for T = type: the one switch from a run-time FloatType to the
// kernel templates (used as with_float_type(type, [&]<FloatType T>() { ... })).
template <typename F>
inline auto with_float_type(FloatType type, F&& f) {
  switch (type) {
    case FloatType::kFloat16:
      return f.template operator()<FloatType::kFloat16>();
    case FloatType::kBFloat16:
      return f.template operator()<FloatType::kBFloat16>();
    case FloatType::kFloat32:
      break;
  }
  return f.template operator()<FloatType::kFloat32>();
}

inline float load_float(const void* data, int64_t i, FloatType type) {
  return with_float_type(type, [&]<FloatType T>() { return load_float<T>(data, i); });
}

inline void store_float(void* data, int64_t i, float value, FloatType type) {
  with_float_type(type, [&]<FloatType T>() { store_float<T>(data, i, value); });
}

// The largest magnitude_bits of elements [begin, end) and max_bits: the block absmax scan of
// lowprec/blockwise8.h (absmax_from_magnitude_bits turns it into the absmax).
template <FloatType T>
inline uint32_t max_magnitude_bits(const void* data, int64_t begin, int64_t end,
                                   uint32_t max_bits = 0) {
  for (int64_t i = begin; i < end; ++i) {
    max_bits = std::max(max_bits, magnitude_bits(load_float<T>(data, i)));
  }
  return max_bits;
}

// The bytes of a cache line on the CPUs these kernels target (x86 and current arm64 cores): the
// step of per-line loops such as prefetches, and the alignment of CacheLineAllocator.
constexpr int64_t kCacheLineBytes = 64;

// float32 lanes of an AVX2 and an AVX-512 vector. Defined on every target: layouts shared with
// the scalar paths (the GEMV's lane-strided x) are sized by them.
constexpr int kAvx2Lanes = 8;
constexpr int kAvx512Lanes = 16;

// Allocates on cache-line boundaries. Scratch arrays that kernels read with 512-bit loads
// use it: from plain malloc (16-byte aligned) every such load spans two cache lines. The NF4
// GEMV with fp32 x (half of its loads are x) ran 22% faster with x aligned (weights in L2).
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlignment{kCacheLineBytes};
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlignment)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlignment); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const {
    return true;
  }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const {
    return false;
  }
};

template <typename T>
using CacheLineVector = std::vector<T, CacheLineAllocator<T>>;

// Ask for the cache line holding p in L2 or in L1, ahead of use. Asm statements on x86: GCC 12
// deleted some loops of __builtin_prefetch / _mm_prefetch calls (the 8-bit Adam update's
// among them: its built loop had no prefetch instruction). A prefetch never faults.
inline void prefetch_l2(const void* p) {
#if LOWPREC_X86_SIMD
  asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, /*rw=*/0, /*locality=*/2);
#endif
}

inline void prefetch_l1(const void* p) {
#if LOWPREC_X86_SIMD
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, /*rw=*/0, /*locality=*/3);
#endif
}

#if LOWPREC_X86_SIMD

// AVX-512 plus the BF16 instructions (vdpbf16ps, vcvtneps2bf16); check cpu_has_avx512_bf16()
// (cpu_isa.h).
#define LP_TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

// ---------------------------------------------------------------------------------- AVX2

template <FloatType T>
LP_TARGET_AVX2 inline __m256 avx2_load(const void* data, int64_t i) {
  if constexpr (T == FloatType::kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(data) + i);
  } else {
    const __m128i half_bits =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(data) + i));
    if constexpr (T == FloatType::kFloat16) {
      return _mm256_cvtph_ps(half_bits);
    } else {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half_bits), 16));
    }
  }
}

LP_TARGET_AVX2 inline __m128i avx2_float_to_bf16(__m256 value) {
  const __m256i bits = _mm256_castps_si256(value);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(value, value, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), is_nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}

template <FloatType T>
LP_TARGET_AVX2 inline void avx2_store(void* data, int64_t i, __m256 value) {
  if constexpr (T == FloatType::kFloat32) {
    _mm256_storeu_ps(static_cast<float*>(data) + i, value);
  } else {
    __m128i* dst = reinterpret_cast<__m128i*>(static_cast<uint16_t*>(data) + i);
    if constexpr (T == FloatType::kFloat16) {
      _mm_storeu_si128(dst, _mm256_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      _mm_storeu_si128(dst, avx2_float_to_bf16(value));
    }
  }
}

// 8 codes in [0, 255], one per 32-bit lane, as 8 bytes (the 8-bit kernels' code stores).
LP_TARGET_AVX2 inline void avx2_store_codes(uint8_t* dst, __m256i index) {
  const __m128i words =
      _mm_packus_epi32(_mm256_castsi256_si128(index), _mm256_extracti128_si256(index, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(words, words));
}

LP_TARGET_AVX2 inline uint32_t avx2_reduce_max_u32(__m256i value) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(value), _mm256_extracti128_si256(value, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

// max_magnitude_bits<T>(data, begin, end): whole vectors, then the tail (< 8) one by one.
template <FloatType T>
LP_TARGET_AVX2 inline uint32_t avx2_max_magnitude_bits(const void* data, int64_t begin,
                                                       int64_t end) {
  const __m256i magnitude_mask = _mm256_set1_epi32(0x7FFFFFFF);
  const int64_t vector_end = begin + (end - begin) / kAvx2Lanes * kAvx2Lanes;
  __m256i max_bits = _mm256_setzero_si256();
  for (int64_t i = begin; i < vector_end; i += kAvx2Lanes) {
    const __m256i bits = _mm256_castps_si256(avx2_load<T>(data, i));
    max_bits = _mm256_max_epu32(max_bits, _mm256_and_si256(bits, magnitude_mask));
  }
  return max_magnitude_bits<T>(data, vector_end, end, avx2_reduce_max_u32(max_bits));
}

// -------------------------------------------------------------------------------- AVX-512

// 16 fp16 or bf16 patterns widened to floats (exact).
template <FloatType T>
LP_TARGET_AVX512 inline __m512 avx512_widen(__m256i half_bits) {
  static_assert(T != FloatType::kFloat32, "avx512_widen: 16-bit types only");
  if constexpr (T == FloatType::kFloat16) {
    return _mm512_cvtph_ps(half_bits);
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half_bits), 16));
  }
}

template <FloatType T>
LP_TARGET_AVX512 inline __m512 avx512_load(const void* data, int64_t i) {
  if constexpr (T == FloatType::kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(data) + i);
  } else {
    return avx512_widen<T>(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(data) + i)));
  }
}

// Lanes set in `lanes` load; the others are +0. Masked loads are slow on some cores (e.g. AMD
// Zen 4/5, more so when they miss the cache): callers use them only for a partial last vector.
template <FloatType T>
LP_TARGET_AVX512 inline __m512 avx512_load_masked(const void* data, int64_t i, __mmask16 lanes) {
  if constexpr (T == FloatType::kFloat32) {
    return _mm512_maskz_loadu_ps(lanes, static_cast<const float*>(data) + i);
  } else {
    return avx512_widen<T>(_mm256_maskz_loadu_epi16(lanes, static_cast<const uint16_t*>(data) + i));
  }
}

// 16 floats as 16-bit patterns in the low half of each 32-bit lane, rounded to nearest even.
template <FloatType T>
LP_TARGET_AVX512 inline __m512i avx512_narrow(__m512 value) {
  if constexpr (T == FloatType::kFloat16) {
    return _mm512_cvtepu16_epi32(
        _mm512_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    const __m512i bits = _mm512_castps_si512(value);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
    const __mmask16 is_nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
    return _mm512_mask_mov_epi32(rounded, is_nan, _mm512_set1_epi32(0x7FC0));
  }
}

template <FloatType T>
LP_TARGET_AVX512 inline void avx512_store(void* data, int64_t i, __m512 value) {
  if constexpr (T == FloatType::kFloat32) {
    _mm512_storeu_ps(static_cast<float*>(data) + i, value);
  } else {
    auto* dst = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(data) + i);
    _mm256_storeu_si256(dst, _mm512_cvtepi32_epi16(avx512_narrow<T>(value)));
  }
}

// Lanes [0, count) of a 16-lane vector, count <= 16.
LP_TARGET_AVX512 inline __mmask16 avx512_first_lanes(int64_t count) {
  return static_cast<__mmask16>((uint32_t{1} << count) - 1u);
}

// max_magnitude_bits<T>(data, begin, end): whole vectors, then the tail (< 16) by one masked
// load (its masked-off lanes are +0, which never raises the maximum).
template <FloatType T>
LP_TARGET_AVX512 inline uint32_t avx512_max_magnitude_bits(const void* data, int64_t begin,
                                                           int64_t end) {
  const __m512i magnitude_mask = _mm512_set1_epi32(0x7FFFFFFF);
  const int64_t vector_end = begin + (end - begin) / kAvx512Lanes * kAvx512Lanes;
  __m512i max_bits = _mm512_setzero_si512();
  for (int64_t i = begin; i < vector_end; i += kAvx512Lanes) {
    const __m512i bits = _mm512_castps_si512(avx512_load<T>(data, i));
    max_bits = _mm512_max_epu32(max_bits, _mm512_and_si512(bits, magnitude_mask));
  }
  if (vector_end < end) {
    const __m512i bits = _mm512_castps_si512(
        avx512_load_masked<T>(data, vector_end, avx512_first_lanes(end - vector_end)));
    max_bits = _mm512_max_epu32(max_bits, _mm512_and_si512(bits, magnitude_mask));
  }
  return _mm512_reduce_max_epu32(max_bits);
}

#endif  // LOWPREC_X86_SIMD

}  // namespace lowprec::cpu::simd
