// NF4 / FP4 quantize and dequantize on the CPU, three paths chosen at run time: AVX-512
// (16 lanes), AVX2 (8 lanes) and portable scalar code. All apply the rule of
// lowprec/fourbit.h and give identical codes and values; tests check each path against the
// reference. Blocks are split across PyTorch's intra-op threads.
#include "fourbit.h"

#include <math.h>

#include <algorithm>
#include <cstring>

#include "cpu_isa.h"
#include "lowprec/fourbit.h"
#include "parallel.h"
#include "simd.h"

namespace lowprec::cpu {
namespace {

using simd::load_float;
using simd::store_float;

// Each parallel task gets at least this many elements, so that small inputs stay on one
// thread and a task's work outweighs the cost of scheduling it.
constexpr int64_t kMinElementsPerTask = 16384;

// The binary search over at most 16 thresholds takes at most log2(16) steps.
constexpr int kMaxSearchSteps = 4;
// The VNNI tile decoder's step along a row: 16 packed bytes (32 codes) of each of 16 rows, one
// 16 x 16 transpose. in_features must be a multiple of its codes (tile_vnni_supported).
constexpr int64_t kVnniTileStepBytes = 16;

// The encoder plus what the SIMD search needs, built once per call from the codebook.
struct Quantize4bitTables {
  Encoder4bit encoder;
  // Step j of the search, with the index so far k * 2^(j+1), compares against
  // step_thresholds[j][k] = thresholds[k * 2^(j+1) + 2^j - 1] (looked up by an in-register
  // permute); rows are padded with +inf to 16 entries.
  alignas(64) float step_thresholds[kMaxSearchSteps][kCodebookSize4bit];
  // encoder.code_of_rank widened for a 32-bit permute.
  alignas(64) int32_t code_of_rank[kCodebookSize4bit];
};

void build_tables(const float* code, QuantType4bit quant_type, Quantize4bitTables* tables) {
  build_encoder_4bit(code, quant_type, &tables->encoder);
  const int size =
      quant_type == QuantType4bit::kNf4 ? kThresholdTableSizeNf4 : kThresholdTableSizeFp4;
  for (int j = 0; j < kMaxSearchSteps; ++j) {
    const int step = 1 << j;
    const int entries = size / (2 * step);
    for (int k = 0; k < kCodebookSize4bit; ++k) {
      tables->step_thresholds[j][k] =
          k < entries ? tables->encoder.thresholds[k * 2 * step + step - 1] : INFINITY;
    }
  }
  for (int i = 0; i < kCodebookSize4bit; ++i)
    tables->code_of_rank[i] = tables->encoder.code_of_rank[i];
}

// ------------------------------------------------------------------------------ scalar path

// Codes of elements [begin, end) of one block (begin even) into their bytes; an odd n leaves
// the low nibble of the last byte 0, as the reference pads.
template <FloatType T>
inline void encode_pairs_scalar(const void* input, int64_t begin, int64_t end, float absmax,
                                const Encoder4bit& encoder, uint8_t* packed) {
  for (int64_t i = begin; i < end; i += 2) {
    const uint8_t even = encode_4bit(load_float<T>(input, i), absmax, encoder);
    const uint8_t odd = i + 1 < end ? encode_4bit(load_float<T>(input, i + 1), absmax, encoder) : 0;
    packed[i >> 1] = pack_nibbles(even, odd);
  }
}

template <FloatType T>
void quantize_blocks_scalar(const void* input, int64_t n, int64_t blocksize, int64_t first_block,
                            int64_t end_block, const Quantize4bitTables& tables, uint8_t* packed,
                            float* absmax) {
  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    const float block_absmax =
        absmax_from_magnitude_bits(simd::max_magnitude_bits<T>(input, begin, end));
    absmax[block] = block_absmax;
    encode_pairs_scalar<T>(input, begin, end, block_absmax, tables.encoder, packed);
  }
}

// Decodes the piece [begin, end) of one block (all with the same scale) into out, whose element
// 0 is flattened element out_origin.
template <FloatType T>
inline void decode_piece_scalar(const Packed4bit& weight, int64_t begin, int64_t end, float scale,
                                int64_t out_origin, void* out) {
  for (int64_t i = begin; i < end; ++i) {
    store_float<T>(out, i - out_origin,
                   dequantize_4bit_value(code_at(weight.packed, i), weight.code, scale));
  }
}

template <FloatType T>
void decode_range_scalar(const Packed4bit& weight, int64_t begin, int64_t end, void* out) {
  for (int64_t i = begin; i < end;) {
    const int64_t block = i >> weight.blocksize_log2;
    const int64_t piece_end = std::min(end, (block + 1) * weight.blocksize);
    decode_piece_scalar<T>(weight, i, piece_end, block_scale(weight.scales, block), begin, out);
    i = piece_end;
  }
}

// One weight row in split order (see dequantize_4bit_rows_split): packed bytes [first, end)
// of the row go to out_even[j - first] (high nibbles) and out_odd[j - first] (low nibbles).
template <FloatType T>
void decode_row_split_scalar(const Packed4bit& weight, int64_t first, int64_t end, void* out,
                             int64_t odd_offset) {
  for (int64_t j = first; j < end;) {
    const int64_t block = (2 * j) >> weight.blocksize_log2;
    const int64_t piece_end = std::min(end, ((block + 1) << weight.blocksize_log2) / 2);
    const float scale = block_scale(weight.scales, block);
    for (; j < piece_end; ++j) {
      const uint8_t byte = weight.packed[j];
      store_float<T>(out, j - first, dequantize_4bit_value(high_nibble(byte), weight.code, scale));
      store_float<T>(out, odd_offset + j - first,
                     dequantize_4bit_value(low_nibble(byte), weight.code, scale));
    }
  }
}

// Weight rows [row_begin, row_end) in the VNNI layout of a brgemm B operand (see
// dequantize_4bit_tile_vnni), one byte at a time.
void decode_tile_vnni_scalar(const Packed4bit& weight, int64_t in_features, int64_t row_begin,
                             int64_t row_end, uint32_t* tile, int64_t ld) {
  // Exact rounding here; the AVX-512 BF16 path may flush bf16 subnormals (see there).
  const int64_t half = in_features / 2;
  for (int64_t n = row_begin; n < row_end; ++n) {
    for (int64_t j = 0; j < half; ++j) {
      const int64_t byte_index = n * half + j;
      const float scale = block_scale(weight.scales, (2 * byte_index) >> weight.blocksize_log2);
      const uint8_t byte = weight.packed[byte_index];
      const uint32_t even =
          float_to_bf16_bits(dequantize_4bit_value(high_nibble(byte), weight.code, scale));
      const uint32_t odd =
          float_to_bf16_bits(dequantize_4bit_value(low_nibble(byte), weight.code, scale));
      tile[j * ld + (n - row_begin)] = even | (odd << 16);
    }
  }
}

#if LOWPREC_X86_SIMD

using simd::kAvx2Lanes;
using simd::kAvx512Lanes;

// -------------------------------------------------------------------------------- AVX2 path

// table[index & 15] per lane from a 16-entry table held as two 8-entry registers: vpermps
// reads the low 3 index bits, a blend on bit 3 picks the register.
LP_TARGET_AVX2 inline __m256 avx2_lookup16(__m256 table_low, __m256 table_high, __m256i index) {
  const __m256 from_low = _mm256_permutevar8x32_ps(table_low, index);
  const __m256 from_high = _mm256_permutevar8x32_ps(table_high, index);
  const __m256 bit3_as_sign = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));
  return _mm256_blendv_ps(from_low, from_high, bit3_as_sign);
}

template <int J>
LP_TARGET_AVX2 inline __m256i avx2_search_step(__m256 v, __m256i index,
                                               const Quantize4bitTables& tables) {
  // Every row has at most 8 live entries (the longest is row 0 of NF4's 16-entry table).
  const __m256 row = _mm256_load_ps(tables.step_thresholds[J]);
  const __m256 threshold = _mm256_permutevar8x32_ps(row, _mm256_srli_epi32(index, J + 1));
  const __m256i above = _mm256_castps_si256(_mm256_cmp_ps(v, threshold, _CMP_GT_OQ));
  return _mm256_add_epi32(index, _mm256_and_si256(above, _mm256_set1_epi32(1 << J)));
}

template <QuantType4bit Q>
LP_TARGET_AVX2 inline __m256i avx2_encode(__m256 x, __m256 absmax,
                                          const Quantize4bitTables& tables) {
  const __m256 v = _mm256_div_ps(x, absmax);
  if constexpr (Q == QuantType4bit::kNf4) {
    __m256i index = _mm256_setzero_si256();
    index = avx2_search_step<3>(v, index, tables);
    index = avx2_search_step<2>(v, index, tables);
    index = avx2_search_step<1>(v, index, tables);
    return avx2_search_step<0>(v, index, tables);
  } else {
    const __m256 magnitude = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
    __m256i rank = _mm256_setzero_si256();
    rank = avx2_search_step<2>(magnitude, rank, tables);
    rank = avx2_search_step<1>(magnitude, rank, tables);
    rank = avx2_search_step<0>(magnitude, rank, tables);
    const __m256i code = _mm256_permutevar8x32_epi32(
        _mm256_load_si256(reinterpret_cast<const __m256i*>(tables.code_of_rank)), rank);
    const __m256i negative = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
    return _mm256_or_si256(code, _mm256_and_si256(negative, _mm256_set1_epi32(kFp4SignBit)));
  }
}

// 8 codes (one per 32-bit lane) -> 4 bytes, element 2i in the high nibble.
LP_TARGET_AVX2 inline void avx2_store_packed(uint8_t* dst, __m256i codes) {
  const __m128i words =
      _mm_packus_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
  const __m128i bytes = _mm_packus_epi16(words, words);  // c0..c7 in the low 8 bytes
  const __m128i even = _mm_and_si128(bytes, _mm_set1_epi16(0x00FF));
  const __m128i odd = _mm_srli_epi16(bytes, 8);
  const __m128i pairs = _mm_or_si128(_mm_slli_epi16(even, 4), odd);
  const __m128i packed = _mm_packus_epi16(pairs, pairs);
  const int32_t four_bytes = _mm_cvtsi128_si32(packed);
  std::memcpy(dst, &four_bytes, sizeof(four_bytes));
}

template <FloatType T, QuantType4bit Q>
LP_TARGET_AVX2 void quantize_blocks_avx2(const void* input, int64_t n, int64_t blocksize,
                                         int64_t first_block, int64_t end_block,
                                         const Quantize4bitTables& tables, uint8_t* packed,
                                         float* absmax) {
  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    const int64_t vector_end = begin + (end - begin) / kAvx2Lanes * kAvx2Lanes;
    const float block_absmax =
        absmax_from_magnitude_bits(simd::avx2_max_magnitude_bits<T>(input, begin, end));
    absmax[block] = block_absmax;
    // x / 0 is not the rule's 0: an all-zero block takes the scalar path (it is rare).
    const int64_t encoded_end = block_absmax == 0.0f ? begin : vector_end;
    const __m256 scale = _mm256_set1_ps(block_absmax);
    for (int64_t i = begin; i < encoded_end; i += kAvx2Lanes) {
      avx2_store_packed(packed + (i >> 1),
                        avx2_encode<Q>(simd::avx2_load<T>(input, i), scale, tables));
    }
    encode_pairs_scalar<T>(input, encoded_end, end, block_absmax, tables.encoder, packed);
  }
}

// 16 packed bytes -> 32 decoded values in element order, written as four 8-lane vectors.
template <FloatType T>
LP_TARGET_AVX2 inline void avx2_decode_32(const uint8_t* bytes, __m256 table_low, __m256 table_high,
                                          void* out, int64_t out_index) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  // Each byte twice, then the high nibble of even lanes and the low nibble of odd lanes.
  const __m128i doubled[2] = {_mm_unpacklo_epi8(packed, packed), _mm_unpackhi_epi8(packed, packed)};
  const __m256i nibble_shift = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
  for (int half = 0; half < 2; ++half) {
    for (int quarter = 0; quarter < 2; ++quarter) {
      const __m128i eight_bytes = quarter == 0 ? doubled[half] : _mm_srli_si128(doubled[half], 8);
      const __m256i index = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(eight_bytes), nibble_shift);
      simd::avx2_store<T>(out, out_index + (2 * half + quarter) * kAvx2Lanes,
                          avx2_lookup16(table_low, table_high, index));
    }
  }
}

constexpr int64_t kDecodeChunk = 32;  // elements per 16-byte vector of packed codes

template <FloatType T>
LP_TARGET_AVX2 void decode_range_avx2(const Packed4bit& weight, int64_t begin, int64_t end,
                                      void* out) {
  const __m256 code_low = _mm256_loadu_ps(weight.code);
  const __m256 code_high = _mm256_loadu_ps(weight.code + kAvx2Lanes);
  for (int64_t i = begin; i < end;) {
    const int64_t block = i >> weight.blocksize_log2;
    const int64_t piece_end = std::min(end, (block + 1) * weight.blocksize);
    const float scale = block_scale(weight.scales, block);
    // An odd start is a lone low nibble; then whole 16-byte vectors; then the rest.
    const int64_t vector_begin = std::min(piece_end, i + (i & 1));
    decode_piece_scalar<T>(weight, i, vector_begin, scale, begin, out);
    const __m256 scale_vector = _mm256_set1_ps(scale);
    const __m256 table_low = _mm256_mul_ps(code_low, scale_vector);
    const __m256 table_high = _mm256_mul_ps(code_high, scale_vector);
    int64_t j = vector_begin;
    for (; j + kDecodeChunk <= piece_end; j += kDecodeChunk) {
      avx2_decode_32<T>(weight.packed + (j >> 1), table_low, table_high, out, j - begin);
    }
    decode_piece_scalar<T>(weight, j, piece_end, scale, begin, out);
    i = piece_end;
  }
}

// ----------------------------------------------------------------------------- AVX-512 path

template <int J>
LP_TARGET_AVX512 inline __m512i avx512_search_step(__m512 v, __m512i index,
                                                   const Quantize4bitTables& tables) {
  const __m512 row = _mm512_load_ps(tables.step_thresholds[J]);
  const __m512 threshold = _mm512_permutexvar_ps(_mm512_srli_epi32(index, J + 1), row);
  const __mmask16 above = _mm512_cmp_ps_mask(v, threshold, _CMP_GT_OQ);
  return _mm512_mask_add_epi32(index, above, index, _mm512_set1_epi32(1 << J));
}

template <QuantType4bit Q>
LP_TARGET_AVX512 inline __m512i avx512_encode(__m512 x, __m512 absmax,
                                              const Quantize4bitTables& tables) {
  const __m512 v = _mm512_div_ps(x, absmax);
  if constexpr (Q == QuantType4bit::kNf4) {
    __m512i index = _mm512_setzero_si512();
    index = avx512_search_step<3>(v, index, tables);
    index = avx512_search_step<2>(v, index, tables);
    index = avx512_search_step<1>(v, index, tables);
    return avx512_search_step<0>(v, index, tables);
  } else {
    const __m512 magnitude = _mm512_abs_ps(v);
    __m512i rank = _mm512_setzero_si512();
    rank = avx512_search_step<2>(magnitude, rank, tables);
    rank = avx512_search_step<1>(magnitude, rank, tables);
    rank = avx512_search_step<0>(magnitude, rank, tables);
    const __m512i code = _mm512_permutexvar_epi32(rank, _mm512_load_si512(tables.code_of_rank));
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mask_or_epi32(code, negative, code, _mm512_set1_epi32(kFp4SignBit));
  }
}

// 16 codes (one per 32-bit lane) -> 8 bytes, element 2i in the high nibble.
LP_TARGET_AVX512 inline void avx512_store_packed(uint8_t* dst, __m512i codes) {
  const __m128i bytes = _mm512_cvtepi32_epi8(codes);
  const __m128i even = _mm_and_si128(bytes, _mm_set1_epi16(0x00FF));
  const __m128i odd = _mm_srli_epi16(bytes, 8);
  const __m128i pairs = _mm_or_si128(_mm_slli_epi16(even, 4), odd);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(pairs, pairs));
}

template <FloatType T, QuantType4bit Q>
LP_TARGET_AVX512 void quantize_blocks_avx512(const void* input, int64_t n, int64_t blocksize,
                                             int64_t first_block, int64_t end_block,
                                             const Quantize4bitTables& tables, uint8_t* packed,
                                             float* absmax) {
  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    const int64_t vector_end = begin + (end - begin) / kAvx512Lanes * kAvx512Lanes;
    const float block_absmax =
        absmax_from_magnitude_bits(simd::avx512_max_magnitude_bits<T>(input, begin, end));
    absmax[block] = block_absmax;
    // x / 0 is not the rule's 0: an all-zero block takes the scalar path (it is rare).
    const int64_t encoded_end = block_absmax == 0.0f ? begin : vector_end;
    const __m512 scale = _mm512_set1_ps(block_absmax);
    for (int64_t i = begin; i < encoded_end; i += kAvx512Lanes) {
      avx512_store_packed(packed + (i >> 1),
                          avx512_encode<Q>(simd::avx512_load<T>(input, i), scale, tables));
    }
    encode_pairs_scalar<T>(input, encoded_end, end, block_absmax, tables.encoder, packed);
  }
}

// 16 packed bytes -> 32 decoded values in element order. Each byte is doubled, widened to a
// lane pair and shifted so that even lanes hold the high nibble; vpermps reads only the low 4
// index bits, so odd lanes need no mask.
template <FloatType T>
LP_TARGET_AVX512 inline void avx512_decode_32(const uint8_t* bytes, __m512 table, void* out,
                                              int64_t out_index) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m512i nibble_shift = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  const __m512i first =
      _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(packed, packed)), nibble_shift);
  const __m512i second =
      _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(packed, packed)), nibble_shift);
  simd::avx512_store<T>(out, out_index, _mm512_permutexvar_ps(first, table));
  simd::avx512_store<T>(out, out_index + kAvx512Lanes, _mm512_permutexvar_ps(second, table));
}

// bf16 output: 16 packed bytes -> 32 bf16 values in element order by one vpermw. Each byte is
// widened to a 32-bit lane holding byte >> 4 in its low word and the byte in its high word:
// the low word indexes the high nibble (element 2i) and the high word, whose 5-bit index
// meets a table repeated in both halves, the low nibble (element 2i + 1). The table holds the
// block's values rounded to bf16 exactly as torch rounds, so the result is bit-exact.
LP_TARGET_AVX512 inline void avx512_decode_32_bf16(const uint8_t* bytes, __m512i table16,
                                                   uint16_t* out) {
  const __m512i widened =
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m512i index =
      _mm512_or_si512(_mm512_srli_epi32(widened, 4), _mm512_slli_epi32(widened, 16));
  _mm512_storeu_si512(out, _mm512_permutexvar_epi16(index, table16));
}

// The block table as 16 bf16 values, repeated to fill the 32 words of a vpermw table.
LP_TARGET_AVX512 inline __m512i avx512_bf16_table(__m512 table) {
  return _mm512_broadcast_i64x4(
      _mm512_cvtepi32_epi16(simd::avx512_narrow<FloatType::kBFloat16>(table)));
}

template <FloatType T>
LP_TARGET_AVX512 void decode_range_avx512(const Packed4bit& weight, int64_t begin, int64_t end,
                                          void* out) {
  const __m512 code = _mm512_loadu_ps(weight.code);
  for (int64_t i = begin; i < end;) {
    const int64_t block = i >> weight.blocksize_log2;
    const int64_t piece_end = std::min(end, (block + 1) * weight.blocksize);
    const float scale = block_scale(weight.scales, block);
    // An odd start is a lone low nibble; then whole 16-byte vectors; then the rest.
    const int64_t vector_begin = std::min(piece_end, i + (i & 1));
    decode_piece_scalar<T>(weight, i, vector_begin, scale, begin, out);
    const __m512 table = _mm512_mul_ps(code, _mm512_set1_ps(scale));
    int64_t j = vector_begin;
    if constexpr (T == FloatType::kBFloat16) {
      const __m512i table16 = avx512_bf16_table(table);
      for (; j + kDecodeChunk <= piece_end; j += kDecodeChunk) {
        avx512_decode_32_bf16(weight.packed + (j >> 1), table16,
                              static_cast<uint16_t*>(out) + (j - begin));
      }
    }
    for (; j + kDecodeChunk <= piece_end; j += kDecodeChunk) {
      avx512_decode_32<T>(weight.packed + (j >> 1), table, out, j - begin);
    }
    decode_piece_scalar<T>(weight, j, piece_end, scale, begin, out);
    i = piece_end;
  }
}

// Split-order rows on AVX-512. fp32: 16 bytes -> 16 high-nibble and 16 low-nibble weights by
// two vpermps. bf16: the block's table rounded to bf16 (exactly as torch rounds), 16 entries
// repeated to fill a 32-lane vpermw table; 32 bytes -> 2 x 32 weights by two vpermw.
template <FloatType T>
LP_TARGET_AVX512 void decode_row_split_avx512(const Packed4bit& weight, int64_t first, int64_t end,
                                              void* out, int64_t odd_offset) {
  constexpr int64_t kChunkBytes = T == FloatType::kFloat32 ? 16 : 32;
  const __m512 code = _mm512_loadu_ps(weight.code);
  const int bytes_per_block_log2 = weight.blocksize_log2 - 1;
  for (int64_t j = first; j < end;) {
    const int64_t block = j >> bytes_per_block_log2;
    const int64_t piece_end = std::min(end, (block + 1) << bytes_per_block_log2);
    const float scale = block_scale(weight.scales, block);
    const __m512 table = _mm512_mul_ps(code, _mm512_set1_ps(scale));
    if constexpr (T == FloatType::kFloat32) {
      float* even = static_cast<float*>(out);
      float* odd = even + odd_offset;
      for (; j + kChunkBytes <= piece_end; j += kChunkBytes) {
        const __m512i codes = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(weight.packed + j)));
        _mm512_storeu_ps(even + (j - first),
                         _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table));
        _mm512_storeu_ps(odd + (j - first), _mm512_permutexvar_ps(codes, table));
      }
    } else if constexpr (T == FloatType::kBFloat16) {
      const __m512i table16 = avx512_bf16_table(table);
      uint16_t* even = static_cast<uint16_t*>(out);
      uint16_t* odd = even + odd_offset;
      for (; j + kChunkBytes <= piece_end; j += kChunkBytes) {
        const __m512i codes = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weight.packed + j)));
        _mm512_storeu_si512(even + (j - first),
                            _mm512_permutexvar_epi16(_mm512_srli_epi16(codes, 4), table16));
        _mm512_storeu_si512(odd + (j - first), _mm512_permutexvar_epi16(codes, table16));
      }
    }
    if (j < piece_end) {
      // The rest of the piece (and every fp16 row) one byte at a time.
      decode_row_split_scalar<T>(
          weight, j, piece_end,
          static_cast<char*>(out) + (j - first) * (T == FloatType::kFloat32 ? 4 : 2), odd_offset);
      j = piece_end;
    }
  }
}

// 16 x 16 transpose of 32-bit lanes: rows[r] lane q -> rows[q] lane r.
LP_TARGET_AVX512 inline void avx512_transpose16(__m512i* rows) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    rows[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    rows[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    rows[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    rows[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(rows[i], rows[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(rows[i], rows[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(rows[i + 8], rows[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(rows[i + 8], rows[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    rows[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    rows[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    rows[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    rows[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// VNNI tile on AVX-512 BF16, for in_features a multiple of 32 and of the blocksize (so the
// 16-byte steps of all 16 rows of a group start blocks together). Per group of 16 rows and
// 16 bytes: each row's bytes become 16 bf16 pairs (one vpermw, as avx512_decode_32_bf16) in
// one register; a 16 x 16 transpose turns them into 16 columns of the tile, 16 rows each. The
// block tables are rounded by vcvtneps2bf16 (nearest even; it flushes bf16 subnormals, which
// no GEMM result notices), one instruction instead of the exact rounding's seven. The same
// bytes of the next tile of rows (the caller's next call) are prefetched along the way.
constexpr int kVnniRows = 16;
using simd::kCacheLineBytes;

LP_TARGET_AVX512_BF16 void decode_tile_vnni_avx512(const Packed4bit& weight, int64_t in_features,
                                                   int64_t row_begin, int64_t row_end,
                                                   int64_t rows_total, uint32_t* tile, int64_t ld) {
  const int64_t half = in_features / 2;
  const int bytes_per_block_log2 = weight.blocksize_log2 - 1;
  const int64_t bytes_per_block = int64_t{1} << bytes_per_block_log2;
  const int64_t next_tile = row_end - row_begin;
  const __m512 code = _mm512_loadu_ps(weight.code);
  __m512i tables[kVnniRows];
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kVnniRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kVnniRows, row_end - r0));
    const int prefetch_rows =
        static_cast<int>(std::clamp<int64_t>(rows_total - (r0 + next_tile), 0, rows));
    const __mmask16 row_lanes = simd::avx512_first_lanes(rows);
    for (int64_t j0 = 0; j0 < half; j0 += kVnniTileStepBytes) {
      if (j0 % bytes_per_block == 0) {
        for (int r = 0; r < rows; ++r) {
          const int64_t byte_index = (r0 + r) * half + j0;
          const float scale = block_scale(weight.scales, byte_index >> bytes_per_block_log2);
          const __m256bh table = _mm512_cvtneps_pbh(_mm512_mul_ps(code, _mm512_set1_ps(scale)));
          tables[r] = _mm512_broadcast_i64x4((__m256i)table);
        }
      }
      if (j0 % kCacheLineBytes == 0) {
        for (int r = 0; r < prefetch_rows; ++r)
          simd::prefetch_l2(weight.packed + (r0 + next_tile + r) * half + j0);
      }
      __m512i v[kVnniRows];
      for (int r = 0; r < kVnniRows; ++r) {
        if (r >= rows) {
          v[r] = _mm512_setzero_si512();
          continue;
        }
        const __m512i widened = _mm512_cvtepu8_epi32(_mm_loadu_si128(
            reinterpret_cast<const __m128i*>(weight.packed + (r0 + r) * half + j0)));
        const __m512i index =
            _mm512_or_si512(_mm512_srli_epi32(widened, 4), _mm512_slli_epi32(widened, 16));
        v[r] = _mm512_permutexvar_epi16(index, tables[r]);
      }
      avx512_transpose16(v);
      uint32_t* column = tile + j0 * ld + (r0 - row_begin);
      for (int q = 0; q < kVnniRows; ++q)
        _mm512_mask_storeu_epi32(column + q * ld, row_lanes, v[q]);
    }
  }
}

#endif  // LOWPREC_X86_SIMD

// ----------------------------------------------------------------------------- dispatch

using QuantizeBlocksFn = void (*)(const void* input, int64_t n, int64_t blocksize,
                                  int64_t first_block, int64_t end_block,
                                  const Quantize4bitTables& tables, uint8_t* packed, float* absmax);
using DecodeRangeFn = void (*)(const Packed4bit& weight, int64_t begin, int64_t end, void* out);

template <FloatType T, QuantType4bit Q>
QuantizeBlocksFn quantize_blocks_for(CpuIsa isa) {
  return LP_PER_ISA(isa, (&quantize_blocks_avx512<T, Q>), (&quantize_blocks_avx2<T, Q>),
                    &quantize_blocks_scalar<T>);
}

template <FloatType T>
QuantizeBlocksFn quantize_blocks_for(QuantType4bit quant_type, CpuIsa isa) {
  return quant_type == QuantType4bit::kNf4 ? quantize_blocks_for<T, QuantType4bit::kNf4>(isa)
                                           : quantize_blocks_for<T, QuantType4bit::kFp4>(isa);
}

QuantizeBlocksFn quantize_blocks_for(FloatType type, QuantType4bit quant_type, CpuIsa isa) {
  return simd::with_float_type(
      type, [&]<FloatType T>() { return quantize_blocks_for<T>(quant_type, isa); });
}

template <FloatType T>
DecodeRangeFn decode_range_for(CpuIsa isa) {
  return LP_PER_ISA(isa, &decode_range_avx512<T>, &decode_range_avx2<T>, &decode_range_scalar<T>);
}

DecodeRangeFn decode_range_for(FloatType type, CpuIsa isa) {
  return simd::with_float_type(type, [&]<FloatType T>() { return decode_range_for<T>(isa); });
}

using DecodeRowSplitFn = void (*)(const Packed4bit& weight, int64_t first, int64_t end, void* out,
                                  int64_t odd_offset);

template <FloatType T>
DecodeRowSplitFn decode_row_split_for(CpuIsa isa) {
#if LOWPREC_X86_SIMD
  if (isa == CpuIsa::kAvx512) return &decode_row_split_avx512<T>;
#endif
  (void)isa;  // AVX2 machines take the byte-at-a-time path here
  return &decode_row_split_scalar<T>;
}

DecodeRowSplitFn decode_row_split_for(FloatType type, CpuIsa isa) {
  return simd::with_float_type(type, [&]<FloatType T>() { return decode_row_split_for<T>(isa); });
}

int64_t blocks_per_task(int64_t blocksize) {
  return std::max<int64_t>(1, kMinElementsPerTask / blocksize);
}

int64_t element_size(FloatType type) {
  return type == FloatType::kFloat32 ? 4 : 2;
}

}  // namespace

void quantize_4bit(const void* input, FloatType input_type, int64_t n, const float* code,
                   QuantType4bit quant_type, int64_t blocksize, uint8_t* packed, float* absmax) {
  Quantize4bitTables tables;
  build_tables(code, quant_type, &tables);
  const QuantizeBlocksFn quantize_blocks =
      quantize_blocks_for(input_type, quant_type, active_cpu_isa());
  const int64_t num_blocks = (n + blocksize - 1) / blocksize;
  parallel_for(0, num_blocks, blocks_per_task(blocksize), [&](int64_t first, int64_t end) {
    quantize_blocks(input, n, blocksize, first, end, tables, packed, absmax);
  });
}

void dequantize_4bit_range(const Packed4bit& weight, int64_t begin, int64_t end, void* out,
                           FloatType out_type) {
  if (begin < end) decode_range_for(out_type, active_cpu_isa())(weight, begin, end, out);
}

void dequantize_4bit(const Packed4bit& weight, int64_t n, void* out, FloatType out_type) {
  const DecodeRangeFn decode_range = decode_range_for(out_type, active_cpu_isa());
  const int64_t num_blocks = (n + weight.blocksize - 1) / weight.blocksize;
  char* out_bytes = static_cast<char*>(out);
  const int64_t bytes_per_element = element_size(out_type);
  parallel_for(0, num_blocks, blocks_per_task(weight.blocksize), [&](int64_t first, int64_t last) {
    const int64_t begin = first * weight.blocksize;
    const int64_t end = std::min(n, last * weight.blocksize);
    decode_range(weight, begin, end, out_bytes + begin * bytes_per_element);
  });
}

void dequantize_4bit_rows_split(const Packed4bit& weight, int64_t in_features, int64_t row_begin,
                                int64_t row_end, void* out, FloatType out_type) {
  dequantize_4bit_rows_split_slice(weight, in_features, row_begin, row_end, 0, in_features / 2, out,
                                   out_type);
}

void dequantize_4bit_rows_split_slice(const Packed4bit& weight, int64_t in_features,
                                      int64_t row_begin, int64_t row_end, int64_t byte_begin,
                                      int64_t byte_end, void* out, FloatType out_type) {
  const DecodeRowSplitFn decode_row = decode_row_split_for(out_type, active_cpu_isa());
  const int64_t half = in_features / 2;
  const int64_t slice = byte_end - byte_begin;
  const int64_t row_bytes = 2 * slice * element_size(out_type);
  char* out_bytes = static_cast<char*>(out);
  for (int64_t n = row_begin; n < row_end; ++n) {
    decode_row(weight, n * half + byte_begin, n * half + byte_end,
               out_bytes + (n - row_begin) * row_bytes, slice);
  }
}

bool tile_vnni_supported(int64_t blocksize, int64_t in_features) {
  return in_features % (2 * kVnniTileStepBytes) == 0 && in_features % blocksize == 0;
}

void dequantize_4bit_tile_vnni(const Packed4bit& weight, int64_t in_features, int64_t row_begin,
                               int64_t row_end, int64_t rows_total, uint32_t* tile, int64_t ld) {
#if LOWPREC_X86_SIMD
  if (active_cpu_isa() == CpuIsa::kAvx512 && cpu_has_avx512_bf16()) {
    decode_tile_vnni_avx512(weight, in_features, row_begin, row_end, rows_total, tile, ld);
    return;
  }
#endif
  decode_tile_vnni_scalar(weight, in_features, row_begin, row_end, tile, ld);
}

}  // namespace lowprec::cpu
