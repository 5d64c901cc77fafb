// The GEMV path of matmul_4bit on the CPU: y = x @ W.T + bias for a few rows of x, with W read
// once as packed 4-bit codes and never written out decoded.
//
// Per weight row and block: the 16-entry codebook is multiplied by the block's (decoded) scale
// once, giving the block's decoded weights as a table; 16 packed bytes (32 codes) are widened
// to 32-bit lanes, and one in-register permute of the table by the high nibbles and one by the
// low nibbles give the 32 decoded weights. The high nibbles hold the even elements, the low
// nibbles the odd ones, so x is split once per call into its even and odd elements and each
// half meets its weights lane for lane: no shuffle back into element order. Products
// accumulate in fp32 with FMA; output features are split across threads.
//
// Rows of the flattened weight start at element n * in_features, which is odd for odd n when
// in_features is odd: such a row starts with a lone low nibble (and ends with a lone high
// one), handled one element at a time, and its byte-aligned middle meets x shifted by one
// element. So x is split twice ("parity" 0 and 1) when in_features is odd.
#include <math.h>

#include <algorithm>
#include <vector>

#include "cpu_isa.h"
#include "fourbit.h"
#include "fourbit_simd.h"
#include "lowprec/fourbit.h"
#include "parallel.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#if defined(__GNUC__) || defined(__clang__)
#define LP_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define LP_ALWAYS_INLINE inline
#endif

#if LOWPREC_X86_SIMD
#define LP_TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
#endif

namespace lowprec::cpu {
namespace {

using simd::load_float;
using simd::store_float;

// A parallel task covers at least this many weight elements (so a small layer stays on one
// thread and each task outweighs its scheduling cost).
constexpr int64_t kMinWeightElementsPerTask = 65536;

// Everything the row kernels read. x_split holds, per parity p (0, and 1 when in_features is
// odd) and row m of x, the elements x[m, p + 2j] then x[m, p + 2j + 1] for j < half_len, as
// fp32 (or as bf16 bits in x_split_bf16 for the vdpbf16ps kernel).
struct GemvProblem {
  const Packed4bit* weight;
  int64_t rows;
  int64_t out_features;
  int64_t in_features;
  const float* x;  // fp32 [rows, in_features], element order
  const float* x_split;
  const uint16_t* x_split_bf16;
  int64_t half_len;
  const float* bias;  // fp32 [out_features] or null
  void* y;
  FloatType y_type;
};

inline int64_t split_offset(const GemvProblem& p, int parity, int64_t m, int half) {
  return ((parity * p.rows + m) * 2 + half) * p.half_len;
}

// Where weight row n lies in the packed bytes: whole bytes [first_byte, end_byte), whose high
// nibbles meet x[parity + 2j] and low nibbles x[parity + 2j + 1] (j = byte - first_byte), plus
// a lone low nibble before them (element 0) and a lone high nibble after them (the last).
struct RowSegment {
  int64_t first_byte;
  int64_t end_byte;
  int parity;
  bool lone_first;
  bool lone_last;
};

inline RowSegment row_segment(int64_t n, int64_t in_features) {
  const int64_t begin = n * in_features;
  const int64_t end = begin + in_features;
  const int64_t aligned_begin = begin + (begin & 1);
  const int64_t aligned_end = std::max(aligned_begin, end - (end & 1));
  return {aligned_begin / 2, aligned_end / 2, static_cast<int>(aligned_begin - begin),
          (begin & 1) != 0, (end & 1) != 0 && end - 1 >= aligned_begin};
}

// The decoded scales of every block weight row n touches, blocks [first_block, ...). Decoded
// once per row into a buffer before the row's dot products: the decode of a double-quantized
// scale is a chain of dependent loads, which the main loop would otherwise wait on per block.
struct RowScales {
  const float* scales;
  int64_t first_block;

  float of(int64_t block) const { return scales[block - first_block]; }
};

inline int64_t max_blocks_per_row(const GemvProblem& p) {
  return (p.in_features >> p.weight->blocksize_log2) + 2;
}

inline RowScales decode_row_scales(const GemvProblem& p, int64_t n, float* buffer) {
  const Packed4bit& w = *p.weight;
  const int64_t first_block = (n * p.in_features) >> w.blocksize_log2;
  if (!w.scales.double_quantized()) return {w.scales.absmax + first_block, first_block};
  const int64_t end_block = (((n + 1) * p.in_features - 1) >> w.blocksize_log2) + 1;
  for (int64_t block = first_block; block < end_block; ++block)
    buffer[block - first_block] = block_scale(w.scales, block);
  return {buffer, first_block};
}

// The lone nibbles of a row, one element at a time, added to sums[0, rows_in_group).
inline void add_lone_elements(const GemvProblem& p, int64_t n, int64_t m0, int rows_in_group,
                              const RowSegment& segment, const RowScales& scales, float* sums) {
  const Packed4bit& w = *p.weight;
  const int64_t K = p.in_features;
  const int64_t begin = n * K;
  auto add = [&](int64_t k) {
    const int64_t flat = begin + k;
    const float weight =
        dequantize_4bit_value(code_at(w.packed, flat), w.code, scales.of(flat >> w.blocksize_log2));
    for (int r = 0; r < rows_in_group; ++r)
      sums[r] = fmaf(p.x[(m0 + r) * K + k], weight, sums[r]);
  };
  if (segment.lone_first) add(0);
  if (segment.lone_last) add(K - 1);
}

inline void write_outputs(const GemvProblem& p, int64_t n, int64_t m0, int rows_in_group,
                          const float* sums) {
  const float bias = p.bias != nullptr ? p.bias[n] : 0.0f;
  for (int r = 0; r < rows_in_group; ++r)
    store_float(p.y, (m0 + r) * p.out_features + n, sums[r] + bias, p.y_type);
}

// ------------------------------------------------------------------------------ scalar path

void gemv_rows_scalar(const GemvProblem& p, int64_t n_begin, int64_t n_end) {
  const Packed4bit& w = *p.weight;
  const int64_t K = p.in_features;
  std::vector<float> scale_buffer(static_cast<size_t>(max_blocks_per_row(p)));
  for (int64_t n = n_begin; n < n_end; ++n) {
    const RowScales scales = decode_row_scales(p, n, scale_buffer.data());
    for (int64_t m0 = 0; m0 < p.rows; m0 += kGemvRowGroup) {
      const int rows_in_group = static_cast<int>(std::min<int64_t>(kGemvRowGroup, p.rows - m0));
      float sums[kGemvRowGroup] = {};
      for (int64_t k = 0; k < K;) {
        const int64_t flat = n * K + k;
        const int64_t block = flat >> w.blocksize_log2;
        const int64_t piece_end = std::min(K, (block + 1) * w.blocksize - n * K);
        const float scale = scales.of(block);
        for (; k < piece_end; ++k) {
          const float weight = dequantize_4bit_value(code_at(w.packed, n * K + k), w.code, scale);
          for (int r = 0; r < rows_in_group; ++r)
            sums[r] = fmaf(p.x[(m0 + r) * K + k], weight, sums[r]);
        }
      }
      write_outputs(p, n, m0, rows_in_group, sums);
    }
  }
}

#if LOWPREC_X86_SIMD

using simd::kAvx2Lanes;
using simd::kAvx512Lanes;

// -------------------------------------------------------------------------------- AVX2 path

// Packed bytes per AVX2 step: 8 bytes = 8 high-nibble and 8 low-nibble weights.
constexpr int64_t kAvx2ChunkBytes = kAvx2Lanes;

LP_TARGET_AVX2 LP_ALWAYS_INLINE __m256 avx2_lookup16(__m256 table_low, __m256 table_high,
                                                     __m256i index) {
  const __m256 from_low = _mm256_permutevar8x32_ps(table_low, index);
  const __m256 from_high = _mm256_permutevar8x32_ps(table_high, index);
  const __m256 bit3_as_sign = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));
  return _mm256_blendv_ps(from_low, from_high, bit3_as_sign);
}

template <int Rows>
LP_TARGET_AVX2 LP_ALWAYS_INLINE void avx2_gemv_chunk(const uint8_t* bytes, __m256 table_low,
                                                     __m256 table_high, const float* const* xe,
                                                     const float* const* xo, int64_t xi,
                                                     __m256* acc_even, __m256* acc_odd) {
  const __m256i codes =
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  const __m256 w_even = avx2_lookup16(table_low, table_high, _mm256_srli_epi32(codes, 4));
  const __m256 w_odd = avx2_lookup16(table_low, table_high, codes);
  for (int r = 0; r < Rows; ++r) {
    acc_even[r] = _mm256_fmadd_ps(w_even, _mm256_loadu_ps(xe[r] + xi), acc_even[r]);
    acc_odd[r] = _mm256_fmadd_ps(w_odd, _mm256_loadu_ps(xo[r] + xi), acc_odd[r]);
  }
}

LP_TARGET_AVX2 inline float avx2_reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int Rows>
LP_TARGET_AVX2 void avx2_gemv_group(const GemvProblem& p, int64_t n, int64_t m0,
                                    const RowScales& scales) {
  const Packed4bit& w = *p.weight;
  const RowSegment segment = row_segment(n, p.in_features);
  const float* xe[Rows];
  const float* xo[Rows];
  for (int r = 0; r < Rows; ++r) {
    xe[r] = p.x_split + split_offset(p, segment.parity, m0 + r, 0);
    xo[r] = p.x_split + split_offset(p, segment.parity, m0 + r, 1);
  }
  __m256 acc[4][Rows];
  for (int a = 0; a < 4; ++a)
    for (int r = 0; r < Rows; ++r)
      acc[a][r] = _mm256_setzero_ps();
  float sums[Rows] = {};
  const __m256 code_low = _mm256_loadu_ps(w.code);
  const __m256 code_high = _mm256_loadu_ps(w.code + kAvx2Lanes);
  const int bytes_per_block_log2 = w.blocksize_log2 - 1;
  for (int64_t j = segment.first_byte; j < segment.end_byte;) {
    const int64_t block = j >> bytes_per_block_log2;
    const int64_t piece_end = std::min(segment.end_byte, (block + 1) << bytes_per_block_log2);
    const float scale = scales.of(block);
    const __m256 table_low = _mm256_mul_ps(code_low, _mm256_set1_ps(scale));
    const __m256 table_high = _mm256_mul_ps(code_high, _mm256_set1_ps(scale));
    for (; j + 2 * kAvx2ChunkBytes <= piece_end; j += 2 * kAvx2ChunkBytes) {
      const int64_t xi = j - segment.first_byte;
      avx2_gemv_chunk<Rows>(w.packed + j, table_low, table_high, xe, xo, xi, acc[0], acc[1]);
      avx2_gemv_chunk<Rows>(w.packed + j + kAvx2ChunkBytes, table_low, table_high, xe, xo,
                            xi + kAvx2ChunkBytes, acc[2], acc[3]);
    }
    for (; j < piece_end; ++j) {
      const int64_t xi = j - segment.first_byte;
      const float w_even = dequantize_4bit_value(high_nibble(w.packed[j]), w.code, scale);
      const float w_odd = dequantize_4bit_value(low_nibble(w.packed[j]), w.code, scale);
      for (int r = 0; r < Rows; ++r)
        sums[r] = fmaf(xo[r][xi], w_odd, fmaf(xe[r][xi], w_even, sums[r]));
    }
  }
  for (int r = 0; r < Rows; ++r) {
    const __m256 total =
        _mm256_add_ps(_mm256_add_ps(acc[0][r], acc[1][r]), _mm256_add_ps(acc[2][r], acc[3][r]));
    sums[r] += avx2_reduce_add(total);
  }
  add_lone_elements(p, n, m0, Rows, segment, scales, sums);
  write_outputs(p, n, m0, Rows, sums);
}

LP_TARGET_AVX2 void gemv_rows_avx2(const GemvProblem& p, int64_t n_begin, int64_t n_end) {
  std::vector<float> scale_buffer(static_cast<size_t>(max_blocks_per_row(p)));
  for (int64_t n = n_begin; n < n_end; ++n) {
    const RowScales scales = decode_row_scales(p, n, scale_buffer.data());
    for (int64_t m0 = 0; m0 < p.rows; m0 += kGemvRowGroup) {
      switch (std::min<int64_t>(kGemvRowGroup, p.rows - m0)) {
        case 1:
          avx2_gemv_group<1>(p, n, m0, scales);
          break;
        case 2:
          avx2_gemv_group<2>(p, n, m0, scales);
          break;
        case 3:
          avx2_gemv_group<3>(p, n, m0, scales);
          break;
        default:
          avx2_gemv_group<4>(p, n, m0, scales);
          break;
      }
    }
  }
}

// ----------------------------------------------------------------------------- AVX-512 path

// Packed bytes per AVX-512 step: 16 bytes = 16 high-nibble and 16 low-nibble weights.
constexpr int64_t kAvx512ChunkBytes = kAvx512Lanes;

// One step: 16 bytes (or the first `count` of them, the other lanes left unchanged).
template <int Rows, bool Masked>
LP_TARGET_AVX512 LP_ALWAYS_INLINE void avx512_gemv_chunk(const uint8_t* bytes, __m512 table,
                                                         const float* const* xe,
                                                         const float* const* xo, int64_t xi,
                                                         __mmask16 lanes, __m512* acc_even,
                                                         __m512* acc_odd) {
  const __m128i packed = Masked ? _mm_maskz_loadu_epi8(lanes, bytes)
                                : _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m512i codes = _mm512_cvtepu8_epi32(packed);
  // vpermps reads the low 4 index bits: the low nibble needs no mask.
  const __m512 w_even = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table);
  const __m512 w_odd = _mm512_permutexvar_ps(codes, table);
  for (int r = 0; r < Rows; ++r) {
    if constexpr (Masked) {
      acc_even[r] = _mm512_mask3_fmadd_ps(w_even, _mm512_maskz_loadu_ps(lanes, xe[r] + xi),
                                          acc_even[r], lanes);
      acc_odd[r] =
          _mm512_mask3_fmadd_ps(w_odd, _mm512_maskz_loadu_ps(lanes, xo[r] + xi), acc_odd[r], lanes);
    } else {
      acc_even[r] = _mm512_fmadd_ps(w_even, _mm512_loadu_ps(xe[r] + xi), acc_even[r]);
      acc_odd[r] = _mm512_fmadd_ps(w_odd, _mm512_loadu_ps(xo[r] + xi), acc_odd[r]);
    }
  }
}

template <int Rows>
LP_TARGET_AVX512 void avx512_gemv_group(const GemvProblem& p, int64_t n, int64_t m0,
                                        const RowScales& scales) {
  const Packed4bit& w = *p.weight;
  const RowSegment segment = row_segment(n, p.in_features);
  const float* xe[Rows];
  const float* xo[Rows];
  for (int r = 0; r < Rows; ++r) {
    xe[r] = p.x_split + split_offset(p, segment.parity, m0 + r, 0);
    xo[r] = p.x_split + split_offset(p, segment.parity, m0 + r, 1);
  }
  // Four independent accumulators per row (two steps of even/odd) hide the FMA latency.
  __m512 acc[4][Rows];
  for (int a = 0; a < 4; ++a)
    for (int r = 0; r < Rows; ++r)
      acc[a][r] = _mm512_setzero_ps();
  const __m512 code = _mm512_loadu_ps(w.code);
  const int bytes_per_block_log2 = w.blocksize_log2 - 1;
  const __mmask16 all = 0xFFFF;
  for (int64_t j = segment.first_byte; j < segment.end_byte;) {
    const int64_t block = j >> bytes_per_block_log2;
    const int64_t piece_end = std::min(segment.end_byte, (block + 1) << bytes_per_block_log2);
    const __m512 table = _mm512_mul_ps(code, _mm512_set1_ps(scales.of(block)));
    for (; j + 2 * kAvx512ChunkBytes <= piece_end; j += 2 * kAvx512ChunkBytes) {
      const int64_t xi = j - segment.first_byte;
      avx512_gemv_chunk<Rows, false>(w.packed + j, table, xe, xo, xi, all, acc[0], acc[1]);
      avx512_gemv_chunk<Rows, false>(w.packed + j + kAvx512ChunkBytes, table, xe, xo,
                                     xi + kAvx512ChunkBytes, all, acc[2], acc[3]);
    }
    if (j < piece_end) {
      const int64_t count = std::min(piece_end - j, kAvx512ChunkBytes);
      const __mmask16 lanes = simd::avx512_first_lanes(count);
      avx512_gemv_chunk<Rows, true>(w.packed + j, table, xe, xo, j - segment.first_byte, lanes,
                                    acc[0], acc[1]);
      j += count;
      if (j < piece_end) {
        const __mmask16 rest = simd::avx512_first_lanes(piece_end - j);
        avx512_gemv_chunk<Rows, true>(w.packed + j, table, xe, xo, j - segment.first_byte, rest,
                                      acc[2], acc[3]);
        j = piece_end;
      }
    }
  }
  float sums[Rows];
  for (int r = 0; r < Rows; ++r) {
    const __m512 total =
        _mm512_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]), _mm512_add_ps(acc[2][r], acc[3][r]));
    sums[r] = _mm512_reduce_add_ps(total);
  }
  add_lone_elements(p, n, m0, Rows, segment, scales, sums);
  write_outputs(p, n, m0, Rows, sums);
}

LP_TARGET_AVX512 void gemv_rows_avx512(const GemvProblem& p, int64_t n_begin, int64_t n_end) {
  std::vector<float> scale_buffer(static_cast<size_t>(max_blocks_per_row(p)));
  for (int64_t n = n_begin; n < n_end; ++n) {
    const RowScales scales = decode_row_scales(p, n, scale_buffer.data());
    for (int64_t m0 = 0; m0 < p.rows; m0 += kGemvRowGroup) {
      switch (std::min<int64_t>(kGemvRowGroup, p.rows - m0)) {
        case 1:
          avx512_gemv_group<1>(p, n, m0, scales);
          break;
        case 2:
          avx512_gemv_group<2>(p, n, m0, scales);
          break;
        case 3:
          avx512_gemv_group<3>(p, n, m0, scales);
          break;
        default:
          avx512_gemv_group<4>(p, n, m0, scales);
          break;
      }
    }
  }
}

bool cpu_has_avx512_bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
}

#endif  // LOWPREC_X86_SIMD

using GemvRowsFn = void (*)(const GemvProblem& p, int64_t n_begin, int64_t n_end);

GemvRowsFn gemv_rows_for(CpuIsa isa) {
#if LOWPREC_X86_SIMD
  if (isa == CpuIsa::kAvx512) return &gemv_rows_avx512;
  if (isa == CpuIsa::kAvx2) return &gemv_rows_avx2;
#endif
  (void)isa;
  return &gemv_rows_scalar;
}

}  // namespace

bool gemv_uses_bf16_dot() {
  return false;
}

void matmul_4bit_gemv(const void* x, FloatType x_type, int64_t rows, const Packed4bit& weight,
                      int64_t out_features, int64_t in_features, const float* bias, void* y) {
  const int64_t K = in_features;
  const int parities = (K & 1) ? 2 : 1;
  const int64_t half_len = K / 2;
  std::vector<float> x_float(static_cast<size_t>(rows * K));
  for (int64_t i = 0; i < rows * K; ++i)
    x_float[i] = load_float(x, i, x_type);
  std::vector<float> x_split(
      static_cast<size_t>(parities * rows * 2 * std::max<int64_t>(half_len, 1)));
  GemvProblem problem{&weight, rows,     out_features, K, x_float.data(), x_split.data(),
                      nullptr, half_len, bias,         y, x_type};
  for (int parity = 0; parity < parities; ++parity) {
    for (int64_t m = 0; m < rows; ++m) {
      float* even = x_split.data() + split_offset(problem, parity, m, 0);
      float* odd = x_split.data() + split_offset(problem, parity, m, 1);
      const float* row = x_float.data() + m * K + parity;
      for (int64_t j = 0; j < half_len; ++j) {
        even[j] = row[2 * j];
        odd[j] = row[2 * j + 1];
      }
    }
  }
  const GemvRowsFn gemv_rows = gemv_rows_for(active_cpu_isa());
  const int64_t grain = std::max<int64_t>(1, kMinWeightElementsPerTask / std::max<int64_t>(K, 1));
  parallel_for(0, out_features, grain,
               [&](int64_t n_begin, int64_t n_end) { gemv_rows(problem, n_begin, n_end); });
}

}  // namespace lowprec::cpu
