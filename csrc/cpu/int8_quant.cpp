// LLM.int8 row quantization on the CPU: outlier columns, per-row absmax over the others, and
// the codes. Three paths chosen at run time (AVX-512, AVX2, scalar) that produce identical
// results: the rule is lowprec/int8.h, applied lane by lane.
//
// Passes over x: threshold > 0 needs the outlier columns of *all* rows before any row's
// absmax is known, so x is read twice from memory (one pass finds the outlier columns, one
// quantizes); with threshold 0 once. Within the quantizing pass a row is swept twice, absmax
// then codes, the second sweep from L1.
#include <math.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_isa.h"
#include "int8.h"
#include "int8_tasks.h"
#include "lowprec/blockwise8.h"
#include "lowprec/float16.h"
#include "lowprec/int8.h"
#include "simd.h"

namespace lowprec::cpu {
namespace {

constexpr int64_t kBitsPerWord = kOutlierBitsPerWord;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

using simd::load_float;

inline bool column_is_outlier(const uint32_t* outlier_bits, int64_t j) {
  return outlier_bits != nullptr && ((outlier_bits[j / kBitsPerWord] >> (j % kBitsPerWord)) & 1u);
}

// ------------------------------------------------------------------------------ scalar path

template <FloatType T>
void mark_outliers_scalar(const void* x, int64_t row_begin, int64_t row_end, int64_t cols,
                          float threshold, uint32_t* bits) {
  for (int64_t row = row_begin; row < row_end; ++row) {
    for (int64_t j = 0; j < cols; ++j) {
      if (int8_is_outlier(load_float<T>(x, row * cols + j), threshold)) {
        bits[j / kBitsPerWord] |= 1u << (j % kBitsPerWord);
      }
    }
  }
}

template <FloatType T>
void quantize_rows_scalar(const void* x, int64_t row_begin, int64_t row_end, int64_t cols,
                          const uint32_t* outlier_bits, int8_t* codes, float* row_absmax) {
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t base = row * cols;
    int8_t* out = codes + (row - row_begin) * cols;
    uint32_t max_bits = 0;
    for (int64_t j = 0; j < cols; ++j) {
      if (!column_is_outlier(outlier_bits, j)) {
        max_bits = std::max(max_bits, magnitude_bits(load_float<T>(x, base + j)));
      }
    }
    const float absmax = absmax_from_magnitude_bits(max_bits);
    row_absmax[row - row_begin] = absmax;
    const float scale = int8_row_scale(absmax);
    for (int64_t j = 0; j < cols; ++j) {
      out[j] = column_is_outlier(outlier_bits, j) ? int8_t{0}
                                                  : int8_encode(load_float<T>(x, base + j), scale);
    }
  }
}

#if LOWPREC_X86_SIMD

// -------------------------------------------------------------------------------- AVX2 path

using simd::avx2_load;
using simd::kAvx2Lanes;

LP_TARGET_AVX2 inline __m256i avx2_magnitude_bits(__m256 v) {
  return _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7FFFFFFF));
}

// All-ones lanes for the columns j..j+7 that are not outliers (j a multiple of 8).
LP_TARGET_AVX2 inline __m256i avx2_keep_lanes(const uint32_t* outlier_bits, int64_t j) {
  if (outlier_bits == nullptr) return _mm256_set1_epi32(-1);
  const uint32_t lane_flags = (outlier_bits[j / kBitsPerWord] >> (j % kBitsPerWord)) & 0xFFu;
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i flagged =
      _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(lane_flags)), lane_bit);
  return _mm256_cmpeq_epi32(flagged, _mm256_setzero_si256());
}

template <FloatType T>
LP_TARGET_AVX2 void mark_outliers_avx2(const void* x, int64_t row_begin, int64_t row_end,
                                       int64_t cols, float threshold, uint32_t* bits) {
  const __m256 limit = _mm256_set1_ps(threshold);
  const int64_t vector_end = cols / kAvx2Lanes * kAvx2Lanes;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t base = row * cols;
    for (int64_t j = 0; j < vector_end; j += kAvx2Lanes) {
      const __m256 magnitude = _mm256_castsi256_ps(avx2_magnitude_bits(avx2_load<T>(x, base + j)));
      // Ordered compare: NaN is never an outlier.
      const uint32_t hits =
          static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(magnitude, limit, _CMP_GE_OQ)));
      bits[j / kBitsPerWord] |= hits << (j % kBitsPerWord);
    }
    for (int64_t j = vector_end; j < cols; ++j) {
      if (int8_is_outlier(load_float<T>(x, base + j), threshold)) {
        bits[j / kBitsPerWord] |= 1u << (j % kBitsPerWord);
      }
    }
  }
}

// 8 codes for x * scale, 0 where keep is clear.
LP_TARGET_AVX2 inline void avx2_encode_store(__m256 x, __m256 scale, __m256i keep, int8_t* dst) {
  const __m256 rounded =
      _mm256_round_ps(_mm256_mul_ps(x, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i is_number = _mm256_castps_si256(_mm256_cmp_ps(rounded, rounded, _CMP_ORD_Q));
  const __m256 limit = _mm256_set1_ps(kInt8ScaleFloat);
  const __m256 clamped =
      _mm256_min_ps(_mm256_max_ps(rounded, _mm256_sub_ps(_mm256_setzero_ps(), limit)), limit);
  const __m256i q =
      _mm256_and_si256(_mm256_cvtps_epi32(clamped), _mm256_and_si256(is_number, keep));
  const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packs_epi16(words, words));
}

template <FloatType T>
LP_TARGET_AVX2 void quantize_rows_avx2(const void* x, int64_t row_begin, int64_t row_end,
                                       int64_t cols, const uint32_t* outlier_bits, int8_t* codes,
                                       float* row_absmax) {
  const int64_t vector_end = cols / kAvx2Lanes * kAvx2Lanes;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t base = row * cols;
    int8_t* out = codes + (row - row_begin) * cols;
    __m256i max_bits = _mm256_setzero_si256();
    for (int64_t j = 0; j < vector_end; j += kAvx2Lanes) {
      const __m256i bits = avx2_magnitude_bits(avx2_load<T>(x, base + j));
      max_bits =
          _mm256_max_epu32(max_bits, _mm256_and_si256(bits, avx2_keep_lanes(outlier_bits, j)));
    }
    alignas(32) uint32_t lanes[kAvx2Lanes];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), max_bits);
    uint32_t row_max = 0;
    for (uint32_t lane : lanes)
      row_max = std::max(row_max, lane);
    for (int64_t j = vector_end; j < cols; ++j) {
      if (!column_is_outlier(outlier_bits, j)) {
        row_max = std::max(row_max, magnitude_bits(load_float<T>(x, base + j)));
      }
    }
    const float absmax = absmax_from_magnitude_bits(row_max);
    row_absmax[row - row_begin] = absmax;
    const float scale = int8_row_scale(absmax);
    const __m256 scale_vector = _mm256_set1_ps(scale);
    for (int64_t j = 0; j < vector_end; j += kAvx2Lanes) {
      avx2_encode_store(avx2_load<T>(x, base + j), scale_vector, avx2_keep_lanes(outlier_bits, j),
                        out + j);
    }
    for (int64_t j = vector_end; j < cols; ++j) {
      out[j] = column_is_outlier(outlier_bits, j) ? int8_t{0}
                                                  : int8_encode(load_float<T>(x, base + j), scale);
    }
  }
}

// ----------------------------------------------------------------------------- AVX-512 path
//
// Whole vectors use plain loads and stores; only a row's last partial vector uses masked ones.

using simd::avx512_first_lanes;
using simd::avx512_load;
using simd::avx512_load_masked;
using simd::kAvx512Lanes;

// Lanes of the columns j..j+15 that are not outliers (j a multiple of 16).
LP_TARGET_AVX512 inline __mmask16 avx512_keep_lanes(const uint32_t* outlier_bits, int64_t j) {
  if (outlier_bits == nullptr) return static_cast<__mmask16>(0xFFFF);
  return static_cast<__mmask16>(~(outlier_bits[j / kBitsPerWord] >> (j % kBitsPerWord)));
}

LP_TARGET_AVX512 inline __m512i avx512_magnitude_bits(__m512 v) {
  return _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF));
}

template <FloatType T>
LP_TARGET_AVX512 void mark_outliers_avx512(const void* x, int64_t row_begin, int64_t row_end,
                                           int64_t cols, float threshold, uint32_t* bits) {
  const __m512 limit = _mm512_set1_ps(threshold);
  const int64_t vector_end = cols / kAvx512Lanes * kAvx512Lanes;
  const __mmask16 tail = avx512_first_lanes(cols - vector_end);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t base = row * cols;
    for (int64_t j = 0; j < vector_end; j += kAvx512Lanes) {
      const __m512 magnitude =
          _mm512_castsi512_ps(avx512_magnitude_bits(avx512_load<T>(x, base + j)));
      // Ordered compare: NaN is never an outlier.
      const uint32_t hits = _mm512_cmp_ps_mask(magnitude, limit, _CMP_GE_OQ);
      bits[j / kBitsPerWord] |= hits << (j % kBitsPerWord);
    }
    if (tail != 0) {
      // Masked-off lanes load as 0, below any threshold > 0.
      const __m512 magnitude = _mm512_castsi512_ps(
          avx512_magnitude_bits(avx512_load_masked<T>(x, base + vector_end, tail)));
      const uint32_t hits = _mm512_cmp_ps_mask(magnitude, limit, _CMP_GE_OQ);
      bits[vector_end / kBitsPerWord] |= hits << (vector_end % kBitsPerWord);
    }
  }
}

// 16 codes of x * scale as int32 lanes, 0 where keep is clear.
LP_TARGET_AVX512 inline __m512i avx512_encode(__m512 x, __m512 scale, __mmask16 keep) {
  const __m512 rounded =
      _mm512_roundscale_ps(_mm512_mul_ps(x, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 is_number = _mm512_cmp_ps_mask(rounded, rounded, _CMP_ORD_Q);
  const __m512 limit = _mm512_set1_ps(kInt8ScaleFloat);
  const __m512 clamped =
      _mm512_min_ps(_mm512_max_ps(rounded, _mm512_sub_ps(_mm512_setzero_ps(), limit)), limit);
  return _mm512_maskz_cvtps_epi32(keep & is_number, clamped);
}

template <FloatType T>
LP_TARGET_AVX512 void quantize_rows_avx512(const void* x, int64_t row_begin, int64_t row_end,
                                           int64_t cols, const uint32_t* outlier_bits,
                                           int8_t* codes, float* row_absmax) {
  const int64_t vector_end = cols / kAvx512Lanes * kAvx512Lanes;
  const __mmask16 tail = avx512_first_lanes(cols - vector_end);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t base = row * cols;
    int8_t* out = codes + (row - row_begin) * cols;
    __m512i max_bits = _mm512_setzero_si512();
    for (int64_t j = 0; j < vector_end; j += kAvx512Lanes) {
      const __m512i bits = avx512_magnitude_bits(avx512_load<T>(x, base + j));
      max_bits =
          _mm512_mask_max_epu32(max_bits, avx512_keep_lanes(outlier_bits, j), max_bits, bits);
    }
    if (tail != 0) {
      const __m512i bits = avx512_magnitude_bits(avx512_load_masked<T>(x, base + vector_end, tail));
      max_bits = _mm512_mask_max_epu32(max_bits, avx512_keep_lanes(outlier_bits, vector_end),
                                       max_bits, bits);
    }
    const float absmax = absmax_from_magnitude_bits(_mm512_reduce_max_epu32(max_bits));
    row_absmax[row - row_begin] = absmax;
    const __m512 scale = _mm512_set1_ps(int8_row_scale(absmax));
    for (int64_t j = 0; j < vector_end; j += kAvx512Lanes) {
      const __m512i q =
          avx512_encode(avx512_load<T>(x, base + j), scale, avx512_keep_lanes(outlier_bits, j));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), _mm512_cvtepi32_epi8(q));
    }
    if (tail != 0) {
      const __m512i q = avx512_encode(avx512_load_masked<T>(x, base + vector_end, tail), scale,
                                      avx512_keep_lanes(outlier_bits, vector_end));
      _mm512_mask_cvtepi32_storeu_epi8(out + vector_end, tail, q);
    }
  }
}

#endif  // LOWPREC_X86_SIMD

// ----------------------------------------------------------------------------- dispatch

using MarkOutliersFn = void (*)(const void* x, int64_t row_begin, int64_t row_end, int64_t cols,
                                float threshold, uint32_t* bits);
using QuantizeRowsFn = void (*)(const void* x, int64_t row_begin, int64_t row_end, int64_t cols,
                                const uint32_t* outlier_bits, int8_t* codes, float* row_absmax);

template <FloatType T>
MarkOutliersFn mark_outliers_for(CpuIsa isa) {
  return LP_PER_ISA(isa, &mark_outliers_avx512<T>, &mark_outliers_avx2<T>,
                    &mark_outliers_scalar<T>);
}

template <FloatType T>
QuantizeRowsFn quantize_rows_for(CpuIsa isa) {
  return LP_PER_ISA(isa, &quantize_rows_avx512<T>, &quantize_rows_avx2<T>,
                    &quantize_rows_scalar<T>);
}

MarkOutliersFn mark_outliers_for(FloatType type, CpuIsa isa) {
  return simd::with_float_type(type, [&]<FloatType T>() { return mark_outliers_for<T>(isa); });
}

QuantizeRowsFn quantize_rows_for(FloatType type, CpuIsa isa) {
  return simd::with_float_type(type, [&]<FloatType T>() { return quantize_rows_for<T>(isa); });
}

}  // namespace

void int8_mark_outliers(const void* x, FloatType x_type, int64_t row_begin, int64_t row_end,
                        int64_t cols, float threshold, uint32_t* bits) {
  OutlierBits local(outlier_words(cols), 0u);
  mark_outliers_for(x_type, active_cpu_isa())(x, row_begin, row_end, cols, threshold, local.data());
  for (size_t w = 0; w < local.size(); ++w) {
    if (local[w] != 0u) __atomic_fetch_or(&bits[w], local[w], __ATOMIC_RELAXED);
  }
}

std::vector<int64_t> int8_outlier_list(const OutlierBits& bits) {
  std::vector<int64_t> outliers;
  for (size_t w = 0; w < bits.size(); ++w) {
    for (uint32_t word = bits[w]; word != 0u; word &= word - 1u) {
      outliers.push_back(static_cast<int64_t>(w) * kBitsPerWord + __builtin_ctz(word));
    }
  }
  return outliers;
}

void int8_quantize_row_range(const void* x, FloatType x_type, int64_t row_begin, int64_t row_end,
                             int64_t cols, const uint32_t* outlier_bits, int8_t* codes,
                             float* row_absmax) {
  quantize_rows_for(x_type, active_cpu_isa())(x, row_begin, row_end, cols, outlier_bits, codes,
                                              row_absmax);
}

void int8_quantize_rows(const void* x, FloatType x_type, int64_t rows, int64_t cols, int8_t* codes,
                        float* row_absmax) {
  int8_vectorwise_quant(x, x_type, rows, cols, 0.0f, codes, row_absmax);
}

std::vector<int64_t> int8_vectorwise_quant(const void* x, FloatType x_type, int64_t rows,
                                           int64_t cols, float threshold, int8_t* codes,
                                           float* row_absmax) {
  if (rows <= 0 || cols <= 0) return {};
  const bool find_outliers = threshold > 0.0f;
  OutlierBits bits(find_outliers ? outlier_words(cols) : 0, 0u);
  const int64_t chunk = int8_rows_per_task(cols);
  const int64_t chunks = ceil_div(rows, chunk);
  TaskPhases phases;
  if (find_outliers) {
    phases.add(chunks, [&](int64_t task, int64_t) {
      const int64_t begin = task * chunk;
      int8_mark_outliers(x, x_type, begin, std::min(rows, begin + chunk), cols, threshold,
                         bits.data());
    });
  }
  phases.add(chunks, [&](int64_t task, int64_t) {
    const int64_t begin = task * chunk;
    int8_quantize_row_range(x, x_type, begin, std::min(rows, begin + chunk), cols,
                            find_outliers ? bits.data() : nullptr, codes + begin * cols,
                            row_absmax + begin);
  });
  phases.run(chunks);
  return find_outliers ? int8_outlier_list(bits) : std::vector<int64_t>{};
}

}  // namespace lowprec::cpu
