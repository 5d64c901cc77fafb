// Blockwise 8-bit quantize / dequantize on the CPU, three paths chosen at run time:
// AVX-512 (16 lanes), AVX2 (8 lanes) and portable scalar code. All three apply the rule of
// lowprec/blockwise8.h and produce identical codes and values; tests check each against the
// reference. Blocks are split across PyTorch's intra-op threads.
#include "blockwise8.h"

#include <math.h>

#include <algorithm>
#include <cstring>

#include "cpu_isa.h"
#include "lowprec/blockwise8.h"
#include "parallel.h"
#include "simd.h"

namespace lowprec::cpu {
namespace {

// Each parallel task gets at least this many elements, so that small inputs stay on one
// thread and a task's work outweighs the cost of scheduling it.
constexpr int64_t kMinElementsPerTask = 16384;

// The binary search over 256 thresholds takes log2(256) steps; step j adds 2^j to the index.
constexpr int kSearchSteps = 8;
// Row length of the step tables: the longest row (step 0) has 128 entries; shorter rows are
// padded, so any row can be read as whole vectors.
constexpr int kStepTableRow = kCodebookSize8bit / 2;

// Everything an encoder needs, built once per call from the codebook.
struct Blockwise8Tables {
  // The rule's thresholds, padded with +inf at [255] (scalar search).
  alignas(64) float thresholds[kThresholdTableSize8bit];
  // The SIMD search looks up each step's thresholds in one row of this table (by in-register
  // permutes; AVX2 gathers from the two longest rows): step j, with the index so far
  // k * 2^(j+1), compares against
  // step_thresholds[j][k] = thresholds[k * 2^(j+1) + 2^j - 1]. Row j has 128 >> j entries;
  // the rest of the row is +inf padding.
  alignas(64) float step_thresholds[kSearchSteps][kStepTableRow];
  // The code of 0, which every element of an all-zero block gets.
  uint8_t zero_code;
};

void build_tables(const float* code, Blockwise8Tables* tables) {
  build_thresholds(code, kCodebookSize8bit, tables->thresholds);
  for (int j = 0; j < kSearchSteps; ++j) {
    const int step = 1 << j;
    const int entries = kStepTableRow >> j;
    for (int k = 0; k < kStepTableRow; ++k) {
      tables->step_thresholds[j][k] =
          k < entries ? tables->thresholds[k * 2 * step + step - 1] : INFINITY;
    }
  }
  tables->zero_code = encode_8bit(0.0f, tables->thresholds);
}

// ------------------------------------------------------------------------------ scalar path

using simd::load_float;
using simd::store_float;

// Elements encoded side by side by the scalar path. One search is a chain of dependent loads
// and compares; interleaving independent searches lets the CPU overlap them (about 6x faster
// than one element at a time).
constexpr int kScalarInterleave = 8;

template <FloatType T>
inline void encode_scalar(const void* input, int64_t begin, int64_t end, float absmax,
                          const Blockwise8Tables& tables, uint8_t* codes) {
  int64_t i = begin;
  for (; i + kScalarInterleave <= end; i += kScalarInterleave) {
    float v[kScalarInterleave];
    int index[kScalarInterleave];
    for (int k = 0; k < kScalarInterleave; ++k) {
      v[k] = scale_by_absmax(load_float<T>(input, i + k), absmax);
      index[k] = 0;
    }
    for (int step = kThresholdTableSize8bit / 2; step > 0; step /= 2) {
      for (int k = 0; k < kScalarInterleave; ++k) {
        index[k] = search_step(v[k], index[k], step, tables.thresholds);
      }
    }
    for (int k = 0; k < kScalarInterleave; ++k)
      codes[i + k] = static_cast<uint8_t>(index[k]);
  }
  for (; i < end; ++i) {
    codes[i] = encode_8bit(scale_by_absmax(load_float<T>(input, i), absmax), tables.thresholds);
  }
}

template <FloatType T>
void quantize_blocks_scalar(const void* input, int64_t n, int64_t blocksize, int64_t first_block,
                            int64_t end_block, const Blockwise8Tables& tables, uint8_t* codes,
                            float* absmax) {
  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    const float block_absmax =
        absmax_from_magnitude_bits(simd::max_magnitude_bits<T>(input, begin, end));
    absmax[block] = block_absmax;
    encode_scalar<T>(input, begin, end, block_absmax, tables, codes);
  }
}

template <FloatType T>
void dequantize_blocks_scalar(const uint8_t* codes, const float* absmax, const float* code,
                              int64_t n, int64_t blocksize, int64_t first_block, int64_t end_block,
                              void* out) {
  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    const float scale = absmax[block];
    for (int64_t i = begin; i < end; ++i)
      store_float<T>(out, i, code[codes[i]] * scale);
  }
}

#if LOWPREC_X86_SIMD

// -------------------------------------------------------------------------------- AVX2 path

using simd::avx2_load;
using simd::avx2_store;
using simd::avx2_store_codes;
using simd::kAvx2Lanes;

// Per lane: bit `Bit` of index clear -> if_clear, set -> if_set.
template <int Bit>
LP_TARGET_AVX2 inline __m256 avx2_select_by_bit(__m256i index, __m256 if_clear, __m256 if_set) {
  const __m256 sign_is_bit = _mm256_castsi256_ps(_mm256_slli_epi32(index, 31 - Bit));
  return _mm256_blendv_ps(if_clear, if_set, sign_is_bit);
}

// table[index] per lane for a table of Registers * 8 floats: a tree of vpermps and blends.
template <int Registers>
LP_TARGET_AVX2 inline __m256 avx2_lookup(const float* table, __m256i index) {
  if constexpr (Registers == 1) {
    return _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), index);
  } else {
    constexpr int kHalf = Registers / 2;
    constexpr int kHalfEntries = kHalf * kAvx2Lanes;  // a power of two: one index bit
    constexpr int kBit = kHalfEntries == 8 ? 3 : kHalfEntries == 16 ? 4 : 5;
    static_assert(kHalfEntries <= 32, "avx2_lookup: table too long");
    return avx2_select_by_bit<kBit>(index, avx2_lookup<kHalf>(table, index),
                                    avx2_lookup<kHalf>(table + kHalfEntries, index));
  }
}

// Step-table rows up to this long are looked up by permutes, longer ones by a gather: the
// fastest split measured (a deeper permute tree costs more than the gather it replaces).
constexpr int kAvx2PermuteMaxEntries = 32;

template <int J>
LP_TARGET_AVX2 inline __m256 avx2_step_threshold(const Blockwise8Tables& tables, __m256i k) {
  constexpr int kEntries = kStepTableRow >> J;
  const float* row = tables.step_thresholds[J];
  if constexpr (kEntries <= kAvx2PermuteMaxEntries) {
    return avx2_lookup<(kEntries + kAvx2Lanes - 1) / kAvx2Lanes>(row, k);
  } else {
    return _mm256_i32gather_ps(row, k, sizeof(float));
  }
}

template <int J>
LP_TARGET_AVX2 inline __m256i avx2_search_step(__m256 v, __m256i index,
                                               const Blockwise8Tables& tables) {
  const __m256i k = _mm256_srli_epi32(index, J + 1);
  const __m256 threshold = avx2_step_threshold<J>(tables, k);
  const __m256i above = _mm256_castps_si256(_mm256_cmp_ps(v, threshold, _CMP_GT_OQ));
  return _mm256_add_epi32(index, _mm256_and_si256(above, _mm256_set1_epi32(1 << J)));
}

LP_TARGET_AVX2 inline __m256i avx2_encode(__m256 v, const Blockwise8Tables& tables) {
  __m256i index = _mm256_setzero_si256();
  index = avx2_search_step<7>(v, index, tables);
  index = avx2_search_step<6>(v, index, tables);
  index = avx2_search_step<5>(v, index, tables);
  index = avx2_search_step<4>(v, index, tables);
  index = avx2_search_step<3>(v, index, tables);
  index = avx2_search_step<2>(v, index, tables);
  index = avx2_search_step<1>(v, index, tables);
  index = avx2_search_step<0>(v, index, tables);
  return index;
}

template <FloatType T>
LP_TARGET_AVX2 void quantize_blocks_avx2(const void* input, int64_t n, int64_t blocksize,
                                         int64_t first_block, int64_t end_block,
                                         const Blockwise8Tables& tables, uint8_t* codes,
                                         float* absmax) {
  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    const int64_t vector_end = begin + (end - begin) / kAvx2Lanes * kAvx2Lanes;
    const float block_absmax =
        absmax_from_magnitude_bits(simd::avx2_max_magnitude_bits<T>(input, begin, end));
    absmax[block] = block_absmax;

    if (block_absmax == 0.0f) {
      std::memset(codes + begin, tables.zero_code, end - begin);
      continue;
    }
    const __m256 scale = _mm256_set1_ps(block_absmax);
    for (int64_t i = begin; i < vector_end; i += kAvx2Lanes) {
      avx2_store_codes(codes + i,
                       avx2_encode(_mm256_div_ps(avx2_load<T>(input, i), scale), tables));
    }
    encode_scalar<T>(input, vector_end, end, block_absmax, tables, codes);
  }
}

// code[codes[0..7]]. Eight scalar loads beat vgatherdps (and, out of cache, a 16-register
// permute tree) on current x86 cores; the AVX-512 path uses this too.
LP_TARGET_AVX2 inline __m256 avx2_code_entries(const float* code, const uint8_t* codes) {
  return _mm256_setr_ps(code[codes[0]], code[codes[1]], code[codes[2]], code[codes[3]],
                        code[codes[4]], code[codes[5]], code[codes[6]], code[codes[7]]);
}

template <FloatType T>
LP_TARGET_AVX2 void dequantize_blocks_avx2(const uint8_t* codes, const float* absmax,
                                           const float* code, int64_t n, int64_t blocksize,
                                           int64_t first_block, int64_t end_block, void* out) {
  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    const int64_t vector_end = begin + (end - begin) / kAvx2Lanes * kAvx2Lanes;
    const __m256 scale = _mm256_set1_ps(absmax[block]);
    for (int64_t i = begin; i < vector_end; i += kAvx2Lanes) {
      avx2_store<T>(out, i, _mm256_mul_ps(avx2_code_entries(code, codes + i), scale));
    }
    for (int64_t i = vector_end; i < end; ++i)
      store_float<T>(out, i, code[codes[i]] * absmax[block]);
  }
}

// ----------------------------------------------------------------------------- AVX-512 path
//
// Whole vectors use plain loads and stores; only the last partial vector of a block uses
// masked ones (masked stores are slow on some CPUs, e.g. AMD Zen 4/5).

using simd::avx512_first_lanes;
using simd::avx512_load;
using simd::avx512_load_masked;
using simd::avx512_store;
using simd::kAvx512Lanes;

// table[index] per lane for a table of Registers * 16 floats, by a tree of permutes: one
// vpermps/vpermt2ps per pair of registers, then blends on the higher index bits. Cheaper than
// a gather on current x86 cores.
template <int Registers>
LP_TARGET_AVX512 inline __m512 avx512_lookup(const float* table, __m512i index) {
  if constexpr (Registers == 1) {
    return _mm512_permutexvar_ps(index, _mm512_loadu_ps(table));
  } else if constexpr (Registers == 2) {
    return _mm512_permutex2var_ps(_mm512_loadu_ps(table), index,
                                  _mm512_loadu_ps(table + kAvx512Lanes));
  } else {
    constexpr int kHalf = Registers / 2;
    const __m512 lower = avx512_lookup<kHalf>(table, index);
    const __m512 upper = avx512_lookup<kHalf>(table + kHalf * kAvx512Lanes, index);
    const __mmask16 in_upper =
        _mm512_test_epi32_mask(index, _mm512_set1_epi32(kHalf * kAvx512Lanes));
    return _mm512_mask_blend_ps(in_upper, lower, upper);
  }
}

template <int J>
LP_TARGET_AVX512 inline __m512i avx512_search_step(__m512 v, __m512i index,
                                                   const Blockwise8Tables& tables) {
  constexpr int kEntries = kStepTableRow >> J;
  constexpr int kRegisters = kEntries <= kAvx512Lanes ? 1 : kEntries / kAvx512Lanes;
  const __m512i k = _mm512_srli_epi32(index, J + 1);
  const __m512 threshold = avx512_lookup<kRegisters>(tables.step_thresholds[J], k);
  const __mmask16 above = _mm512_cmp_ps_mask(v, threshold, _CMP_GT_OQ);
  return _mm512_mask_add_epi32(index, above, index, _mm512_set1_epi32(1 << J));
}

LP_TARGET_AVX512 inline __m512i avx512_encode(__m512 v, const Blockwise8Tables& tables) {
  __m512i index = _mm512_setzero_si512();
  index = avx512_search_step<7>(v, index, tables);
  index = avx512_search_step<6>(v, index, tables);
  index = avx512_search_step<5>(v, index, tables);
  index = avx512_search_step<4>(v, index, tables);
  index = avx512_search_step<3>(v, index, tables);
  index = avx512_search_step<2>(v, index, tables);
  index = avx512_search_step<1>(v, index, tables);
  index = avx512_search_step<0>(v, index, tables);
  return index;
}

template <FloatType T>
LP_TARGET_AVX512 void quantize_blocks_avx512(const void* input, int64_t n, int64_t blocksize,
                                             int64_t first_block, int64_t end_block,
                                             const Blockwise8Tables& tables, uint8_t* codes,
                                             float* absmax) {
  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    const int64_t vector_end = begin + (end - begin) / kAvx512Lanes * kAvx512Lanes;
    const __mmask16 tail = avx512_first_lanes(end - vector_end);
    const float block_absmax =
        absmax_from_magnitude_bits(simd::avx512_max_magnitude_bits<T>(input, begin, end));
    absmax[block] = block_absmax;

    if (block_absmax == 0.0f) {
      std::memset(codes + begin, tables.zero_code, end - begin);
      continue;
    }
    const __m512 scale = _mm512_set1_ps(block_absmax);
    for (int64_t i = begin; i < vector_end; i += kAvx512Lanes) {
      const __m512i index = avx512_encode(_mm512_div_ps(avx512_load<T>(input, i), scale), tables);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(index));
    }
    if (tail != 0) {
      const __m512 v = _mm512_div_ps(avx512_load_masked<T>(input, vector_end, tail), scale);
      _mm512_mask_cvtepi32_storeu_epi8(codes + vector_end, tail, avx512_encode(v, tables));
    }
  }
}

template <FloatType T>
LP_TARGET_AVX512 void dequantize_blocks_avx512(const uint8_t* codes, const float* absmax,
                                               const float* code, int64_t n, int64_t blocksize,
                                               int64_t first_block, int64_t end_block, void* out) {
  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    const int64_t vector_end = begin + (end - begin) / kAvx512Lanes * kAvx512Lanes;
    const __m512 scale = _mm512_set1_ps(absmax[block]);
    for (int64_t i = begin; i < vector_end; i += kAvx512Lanes) {
      const __m512 entries =
          _mm512_insertf32x8(_mm512_castps256_ps512(avx2_code_entries(code, codes + i)),
                             avx2_code_entries(code, codes + i + kAvx2Lanes), 1);
      avx512_store<T>(out, i, _mm512_mul_ps(entries, scale));
    }
    for (int64_t i = vector_end; i < end; ++i) {
      store_float<T>(out, i, code[codes[i]] * absmax[block]);
    }
  }
}

#endif  // LOWPREC_X86_SIMD

// ----------------------------------------------------------------------------- dispatch

using QuantizeBlocksFn = void (*)(const void* input, int64_t n, int64_t blocksize,
                                  int64_t first_block, int64_t end_block,
                                  const Blockwise8Tables& tables, uint8_t* codes, float* absmax);
using DequantizeBlocksFn = void (*)(const uint8_t* codes, const float* absmax, const float* code,
                                    int64_t n, int64_t blocksize, int64_t first_block,
                                    int64_t end_block, void* out);

template <FloatType T>
QuantizeBlocksFn quantize_blocks_for(CpuIsa isa) {
  return LP_PER_ISA(isa, &quantize_blocks_avx512<T>, &quantize_blocks_avx2<T>,
                    &quantize_blocks_scalar<T>);
}

template <FloatType T>
DequantizeBlocksFn dequantize_blocks_for(CpuIsa isa) {
  return LP_PER_ISA(isa, &dequantize_blocks_avx512<T>, &dequantize_blocks_avx2<T>,
                    &dequantize_blocks_scalar<T>);
}

QuantizeBlocksFn quantize_blocks_for(FloatType type, CpuIsa isa) {
  return simd::with_float_type(type, [&]<FloatType T>() { return quantize_blocks_for<T>(isa); });
}

DequantizeBlocksFn dequantize_blocks_for(FloatType type, CpuIsa isa) {
  return simd::with_float_type(type, [&]<FloatType T>() { return dequantize_blocks_for<T>(isa); });
}

int64_t blocks_per_task(int64_t blocksize) {
  return std::max<int64_t>(1, kMinElementsPerTask / blocksize);
}

}  // namespace

void quantize_blockwise_8bit(const void* input, FloatType input_type, int64_t n, const float* code,
                             int64_t blocksize, uint8_t* codes, float* absmax) {
  Blockwise8Tables tables;
  build_tables(code, &tables);
  const QuantizeBlocksFn quantize_blocks = quantize_blocks_for(input_type, active_cpu_isa());
  const int64_t num_blocks = (n + blocksize - 1) / blocksize;
  parallel_for(0, num_blocks, blocks_per_task(blocksize), [&](int64_t first, int64_t end) {
    quantize_blocks(input, n, blocksize, first, end, tables, codes, absmax);
  });
}

void dequantize_blockwise_8bit(const uint8_t* codes, const float* absmax, const float* code,
                               int64_t n, int64_t blocksize, void* out, FloatType out_type) {
  const DequantizeBlocksFn dequantize_blocks = dequantize_blocks_for(out_type, active_cpu_isa());
  const int64_t num_blocks = (n + blocksize - 1) / blocksize;
  parallel_for(0, num_blocks, blocks_per_task(blocksize), [&](int64_t first, int64_t end) {
    dequantize_blocks(codes, absmax, code, n, blocksize, first, end, out);
  });
}

}  // namespace lowprec::cpu
