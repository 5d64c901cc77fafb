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

// A table whose lower half mirrors its upper half, as signed dynamic maps do: table[c] is
// table[kMirrorCenter + |c - kMirrorCenter|] with its sign bit flipped for c < kMirrorCenter, for
// every c but the last (unpaired). Each plane then needs only the 128 magnitude entries, one
// two-register permute by |c - kMirrorCenter| where a full plane takes two and a blend. |c -
// kMirrorCenter| as a signed byte is 128 for the last code, which the permute reads as 0 (the
// center's entry): the last code's entry may differ from the center's only in bytes 2 and 3.
constexpr int kMirrorCenter = 127;
constexpr int kMirrorEntries = 128;
constexpr int kMirrorLastCode = kBytePlaneEntries - 1;
struct MirroredBytePlanes {
  // planes[k][a] = byte k of table[kMirrorCenter + a].
  alignas(64) uint8_t planes[kBytePlaneCount][kMirrorEntries];
  uint8_t last_byte2;  // bytes 2 and 3 of table[kMirrorLastCode]
  uint8_t last_byte3;
  bool usable;  // false: the table does not mirror (the full planes decode it)
};

inline void build_mirrored_byte_planes(const float* table, MirroredBytePlanes* out) {
  for (int a = 0; a < kMirrorEntries; ++a) {
    const uint32_t bits = float_to_bits(table[kMirrorCenter + a]);
    for (int k = 0; k < kBytePlaneCount; ++k)
      out->planes[k][a] = static_cast<uint8_t>(bits >> (8 * k));
  }
  const uint32_t last = float_to_bits(table[kMirrorLastCode]);
  out->last_byte2 = static_cast<uint8_t>(last >> 16);
  out->last_byte3 = static_cast<uint8_t>(last >> 24);
  constexpr uint32_t kSignBit = 0x80000000u;
  constexpr uint32_t kLowBytes = 0xFFFFu;
  // Bit for bit what the lookup returns (a NaN, or a zero of the other sign, is no mirror).
  out->usable = ((last ^ float_to_bits(table[kMirrorCenter])) & kLowBytes) == 0;
  for (int c = 0; c < kMirrorLastCode && out->usable; ++c) {
    const int a = c < kMirrorCenter ? kMirrorCenter - c : c - kMirrorCenter;
    const uint32_t want =
        float_to_bits(table[kMirrorCenter + a]) ^ (c < kMirrorCenter ? kSignBit : 0);
    if (float_to_bits(table[c]) != want) out->usable = false;
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

// The four byte vectors of a lookup (in kBytePlaneOrder) interleaved into floats, in order.
LP_TARGET_AVX512_VBMI inline void avx512_interleave_byte_planes(
    const __m512i bytes[kBytePlaneCount], __m512 out[4]) {
  const __m512i low_words_lo = _mm512_unpacklo_epi8(bytes[0], bytes[1]);
  const __m512i low_words_hi = _mm512_unpackhi_epi8(bytes[0], bytes[1]);
  const __m512i high_words_lo = _mm512_unpacklo_epi8(bytes[2], bytes[3]);
  const __m512i high_words_hi = _mm512_unpackhi_epi8(bytes[2], bytes[3]);
  out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(low_words_lo, high_words_lo));
  out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(low_words_lo, high_words_lo));
  out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(low_words_hi, high_words_hi));
  out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(low_words_hi, high_words_hi));
}

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
  avx512_interleave_byte_planes(bytes, out);
}

// The same by the mirrored planes (table.usable): 4 two-register permutes instead of 8 and 4
// blends, for 5 byte operations more (the index, the sign, the last code).
LP_TARGET_AVX512_VBMI inline void avx512_mirrored_byte_plane_lookup(__m512i codes,
                                                                    const MirroredBytePlanes& table,
                                                                    __m512 out[4]) {
  const __m512i ordered = _mm512_permutexvar_epi8(_mm512_load_si512(kBytePlaneOrder.index), codes);
  // c - kMirrorCenter as a signed byte: negative below the center (and for the last code).
  const __m512i offset = _mm512_sub_epi8(ordered, _mm512_set1_epi8(kMirrorCenter));
  const __m512i index = _mm512_abs_epi8(offset);      // 128 (read as 0) for the last code
  const __mmask64 last = _mm512_movepi8_mask(index);  // only 128 has bit 7 set
  __m512i bytes[kBytePlaneCount];
  for (int k = 0; k < kBytePlaneCount; ++k) {
    const uint8_t* plane = table.planes[k];
    bytes[k] =
        _mm512_permutex2var_epi8(_mm512_load_si512(plane), index, _mm512_load_si512(plane + 64));
  }
  // The sign bit (bit 7 of byte 3) flipped below the center: byte3 ^ (offset & 0x80).
  constexpr int kXorAnd = 0x78;  // ternary logic A ^ (B & C) (A = 0xF0, B = 0xCC, C = 0xAA)
  bytes[3] = _mm512_ternarylogic_epi32(bytes[3], offset, _mm512_set1_epi8(static_cast<char>(0x80)),
                                       kXorAnd);
  bytes[2] =
      _mm512_mask_mov_epi8(bytes[2], last, _mm512_set1_epi8(static_cast<char>(table.last_byte2)));
  bytes[3] =
      _mm512_mask_mov_epi8(bytes[3], last, _mm512_set1_epi8(static_cast<char>(table.last_byte3)));
  avx512_interleave_byte_planes(bytes, out);
}

#endif  // LOWPREC_X86_SIMD

}  // namespace lowprec::cpu
