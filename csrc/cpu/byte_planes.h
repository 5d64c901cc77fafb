// Lookups of a 256-entry float32 table by 8-bit codes without gathers (which cost several
// times more on current AMD cores): each byte of the entries is looked up in its own 256-entry
// byte table ("plane") by two-register byte permutes, 64 codes at a time, and the four bytes
// are interleaved back into floats. Used for the dynamic maps of 8-bit Adam and the nested
// codebook of double-quantized 4-bit scales. Needs AVX512_VBMI (cpu_has_avx512_vbmi()).
#pragma once

#include <cstdint>

#include "cpu_isa.h"
#include "lowprec/common.h"

#if LOWPREC_X86_SIMD
#include <immintrin.h>
#endif

namespace lowprec::cpu {

constexpr int kBytePlaneCount = 4;      // bytes of a float32
constexpr int kBytePlaneEntries = 256;  // one per 8-bit code
constexpr int kBytePlaneCodes = 64;     // codes per lookup (one 512-bit vector of bytes)

// planes[k][c] = byte k of table[c] (little-endian).
struct BytePlanes {
  alignas(64) uint8_t planes[kBytePlaneCount][kBytePlaneEntries];
};

inline void build_byte_planes(const float* table, BytePlanes* out) {
  for (int c = 0; c < kBytePlaneEntries; ++c) {
    const uint32_t bits = float_to_bits(table[c]);
    for (int k = 0; k < kBytePlaneCount; ++k)
      out->planes[k][c] = static_cast<uint8_t>(bits >> (8 * k));
  }
}

#if LOWPREC_X86_SIMD

// The lookup's lane order. After the byte lookups the four planes are interleaved into floats by
// unpack instructions, which work within 128-bit lanes: output vector j, 128-bit lane L,
// element r comes from byte 16 L + 4 j + r. Permuting the codes first by
// order[16 L + 4 j + r] = 16 j + 4 L + r makes that element code 16 j + 4 L + r, so the
// output comes out in memory order.
struct BytePlaneOrder {
  alignas(64) uint8_t index[kBytePlaneCodes];
  constexpr BytePlaneOrder() : index{} {
    for (int lane = 0; lane < 4; ++lane)
      for (int j = 0; j < 4; ++j)
        for (int r = 0; r < 4; ++r)
          index[16 * lane + 4 * j + r] = static_cast<uint8_t>(16 * j + 4 * lane + r);
  }
};
inline constexpr BytePlaneOrder kBytePlaneOrder;

// table[codes[i]] for 64 codes (byte i of `codes`), in order: out[j] holds codes 16 j .. 16 j + 15.
LP_TARGET_AVX512_VBMI inline void avx512_byte_plane_lookup(__m512i codes, const BytePlanes& table,
                                                           __m512 out[4]) {
  const __m512i index = _mm512_permutexvar_epi8(_mm512_load_si512(kBytePlaneOrder.index), codes);
  const __mmask64 upper_half = _mm512_movepi8_mask(index);
  __m512i bytes[kBytePlaneCount];
  for (int k = 0; k < kBytePlaneCount; ++k) {
    const uint8_t* plane = table.planes[k];
    const __m512i lower =
        _mm512_permutex2var_epi8(_mm512_load_si512(plane), index, _mm512_load_si512(plane + 64));
    const __m512i upper = _mm512_permutex2var_epi8(_mm512_load_si512(plane + 128), index,
                                                   _mm512_load_si512(plane + 192));
    bytes[k] = _mm512_mask_blend_epi8(upper_half, lower, upper);
  }
  const __m512i low_words_lo = _mm512_unpacklo_epi8(bytes[0], bytes[1]);
  const __m512i low_words_hi = _mm512_unpackhi_epi8(bytes[0], bytes[1]);
  const __m512i high_words_lo = _mm512_unpacklo_epi8(bytes[2], bytes[3]);
  const __m512i high_words_hi = _mm512_unpackhi_epi8(bytes[2], bytes[3]);
  out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(low_words_lo, high_words_lo));
  out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(low_words_lo, high_words_lo));
  out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(low_words_hi, high_words_hi));
  out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(low_words_hi, high_words_hi));
}

#endif  // LOWPREC_X86_SIMD

}  // namespace lowprec::cpu
