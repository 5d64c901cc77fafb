// The fused 8-bit Adam / AdamW step on the CPU, three paths chosen at run time: AVX-512 (with
// AVX512_VBMI for the byte permutes of the decoder; without it the AVX2 path runs), AVX2 and
// portable scalar code. All apply lowprec/adam8bit.h and produce identical results: the
// reference's parameters bit for bit and its codes and scales exactly.
//
// One step of a call's tensors, in one parallel region (step_tensors), batch by batch:
//   1. finiteness: one pass over every gradient of the batch before any write, so that a
//      skipped tensor is left untouched. A batch holds at most kCheckBatchBytes of gradients,
//      so that they are still in the cache when the update reads them again.
//   2. update, per quantization block, in two passes: decode m and v, update them and p, write
//      p, take the new absmax of m and v; then encode m and v into their codes. The AVX-512
//      path runs the second pass of each block beside the first pass of the next.
//      A gradient larger than kCheckBatchBytes is read from memory by both phases.
// The encoder is the segmented one of lowprec/adam8bit.h (arithmetic, exact, with the exact
// search for the few values near a threshold); the AVX-512 and AVX2 paths use its rearranged
// form, the magnitude encoder below, for maps it fits (both dynamic maps). The AVX-512 decoder
// looks the maps up by byte permutes, 64 codes at a time. The tables of both are built once per
// thread and reused while the maps stay the same (tables_for).
//
// The step of tensors with float32 states (adam_multi_step, the optimizers' tensors below
// min_8bit_size) takes the same step_tensors, its update the same per-element arithmetic
// without the quantization.
#include "adam8bit.h"

#include <math.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "byte_planes.h"
#include "cpu_isa.h"
#include "lowprec/adam8bit.h"
#include "lowprec/float16.h"
#include "parallel.h"
#include "simd.h"

namespace lowprec::cpu {
namespace {

// Elements per worker thread at least (small tensors stay on one thread).
constexpr int64_t kMinElementsPerWorker = 16384;
// Elements per task of the update phase. Tasks are long: 16.7M fp32 parameters took 7-10% less
// time with tasks of 262144 elements than with 16384 (one and two threads), and 64 tasks still
// balance two cores when one of them is taken for a while.
constexpr int64_t kElementsPerUpdateTask = 262144;
// The update's unit for float32 states (which have no quantization blocks): tasks hold
// kElementsPerUpdateTask / kFloatStateUnit of them, and a unit is never split.
constexpr int64_t kFloatStateUnit = 1024;
// The finiteness pass: the gradient bytes checked before their tensors are updated (a batch
// stays in the last-level cache between the two passes), and its parallel tasks ("chunks"):
// about kCheckChunksPerWorker per worker and batch, within [kMinCheckChunkElements,
// kMaxCheckChunkElements]. Long chunks let the hardware prefetcher run: a 16.7M fp32 check
// took 0.93 ms with chunks of 1M elements against 1.02 ms with 64K (2 threads, one-process
// A/B, torch's fast memory speed; 1.09 against 1.11 ms in the slow one); short ones keep
// every worker of a larger machine busy on a small batch.
constexpr int64_t kCheckBatchBytes = 8 << 20;
constexpr int64_t kCheckChunksPerWorker = 4;
constexpr int64_t kMinCheckChunkElements = 65536;
constexpr int64_t kMaxCheckChunkElements = 1 << 20;
// Independent running maxima in the finiteness pass: one would chain every load to the last
// and hold the scan well below the memory bandwidth.
constexpr int kFiniteAccumulators = 4;
// How far ahead the SIMD finiteness passes prefetch, one line per step of kFiniteAccumulators
// vectors: 16 KB took a two-core scan of 8.4M fp32 per core from 23-24 to 27-29 GB/s per core on
// an Intel core (Emerald Rapids; 8 and 32 KB, or every line of the step, no better), AVX-512.
constexpr int64_t kFinitePrefetchBytes = 16 << 10;

// ---------------------------------------------------------------- the magnitude encoder
//
// The SIMD form of the segmented encoder (lowprec/adam8bit.h), rearranged so that a value
// costs few shuffles, the scarce resource of the encoding pass (AVX-512; AVX2 looks each
// 16-entry table up by two 8-entry permutes and a blend, and takes 35% less time per step than
// with the segmented encoder, which divides and looks up two 32-entry tables and four 16-entry
// ones per value: 180 -> 118 core cycles per 16 elements on an Intel core, data in L2):
//   * it encodes |v| with the positive half of the key tables; a signed map whose negative
//     entries mirror its positive ones (code K - c holds -code[c], K = twice the code of 0, as in
//     the dynamic maps) gives a negative v the code max(K - code(|v|), 0). A map without negative
//     entries gives every negative v code 0 (its mirror K is 0).
//   * every table has 16 entries, one register, looked up by a single-source permute (the
//     two-source ones overwrite a table or the index, and the copies cost as many instructions
//     as the lookups). The key index is a shift of the bits (the permute reads the low four bits
//     of field / 2); the key gives its window top, which carries the segment of the values not
//     above it, one more for those above (an integer comparison of the bits); the segment gives
//     the map and the clamp: four lookups per value;
//   * the position is evaluated in fixed point: F = trunc(v * S + O) with S = scale * 2^16 and
//     O = offset * 2^16 + 2 * margin * 2^16, so F >> 16 is trunc(P + window) (the code) and the
//     low 16 bits f are the fraction, the value being near a threshold when f < kNearFraction;
//   * the clamp to the segment's last code is a min with (last << 16) | 0xFFFF, which keeps the
//     code in bits 16..23 (so four vectors pack into 64 code bytes with two byte permutes) and
//     makes a clamped value never near. No segment needs the clamp at its first code (checked).
//
// Exactness. Let P*(v) = v * scale + offset (real arithmetic, the segment's float coefficients),
// which puts threshold t_q at first + q - margin within model_error. F / 2^16 lies within
// [P* + 2 margin - e - u, P* + 2 margin + e] with u = 2^-16 (truncation) and e <= u (the fma's
// rounding, |F| < 2^25). With j0 = F >> 16 and f >= kNearFraction u = 2 margin, P* > j0 - margin +
// (model_error + e + u + s) for any slack s <= margin - model_error - e - u, so v is above every
// threshold below j0; and P* < j0 + 1 - margin - model_error always, so v is below the others.
// The slack s has two parts. v is x * fl(1 / absmax), within 3 * 2^-24 |v| of fl(x / absmax),
// which moves P* by at most 3 * 2^-24 * scale * |v|. And the negative half's thresholds round
// the other way (one ulp of |v|), which moves a threshold by at most scale * ulp(|v|) positions.
// build_magnitude_encoder checks model_error + e + u + s <= margin for every segment, or reports
// the encoder unusable. Boundaries are decided by a comparison instead, so a value within a few
// ulps of one (where the reciprocal may cross it, or the halves' ties differ) is near.

// Fraction bits of the fixed-point position, and the fraction below which a value is near.
constexpr int kPositionFractionBits = 16;
constexpr float kPositionFractionScale = 65536.0f;
constexpr int32_t kNearFraction = static_cast<int32_t>(kSegmentWindow * kPositionFractionScale);
static_assert(kNearFraction == 32, "the near test compares with 32 units of 2^-16");
// The values whose bits lie within kBoundaryUlps units of a boundary's must be near: the
// reciprocal's v is within 3 * 2^-24 |v| (under 3 ulps, or 6 units where that crosses a binade)
// of x / absmax. This is a lower bound on the window the near test below uses.
constexpr int32_t kBoundaryUlps = 8;
// Both near tests in one unsigned comparison, so that a vector of lanes is tested with two integer
// minimums instead of mask registers: the "near distance" is min(f, W - M), near when below
// kNearFraction. M is the bits of |v|; W, a key's "window top", is the bits of its boundary B
// plus kBoundaryUlps to kBoundaryUlps + 15, the amount that makes W's low 4 bits the segment of
// the key's values not above W. So one lookup gives both, and one subtraction gives the segment
// (one more when M > W) and the boundary term: W - M is below kNearFraction for M in
// [W - 31, W], which holds [B - kBoundaryUlps, B + kBoundaryUlps]; deciding by M > W instead of
// M > B differs only inside it. A boundary must also lie far enough inside its key (checked by
// build_magnitude_encoder): a value the reciprocal moves across the key's edge is then tested
// against the right boundary.
constexpr int kSegmentBits = 4;
constexpr int32_t kSegmentMask = (1 << kSegmentBits) - 1;
static_assert(kSegmentMaxCount <= kSegmentMask + 1, "a segment fits the window top's low bits");
static_assert(kNearFraction - 1 - (kBoundaryUlps + kSegmentMask) >= kBoundaryUlps,
              "the near window must hold every value within kBoundaryUlps of the boundary");
struct MagnitudeEncoder {
  // By key: its window top (from a boundary of +inf if it has none).
  alignas(64) int32_t window_top[kSegmentKeyCount];
  // By segment: its fixed-point map and clamp.
  alignas(64) float scale[kSegmentMaxCount];
  alignas(64) float offset[kSegmentMaxCount];
  alignas(64) int32_t last[kSegmentMaxCount];
  int32_t mirror;  // (K << 16) | 0xFFFF: F of a negative v is mirror - F(|v|), at least 0
  bool usable;     // false: the segmented encoder (or the exact search) encodes
};

// The code of -|v| is K - code(|v|): K for the map, or -1 if its negative half does not mirror
// its positive half. A map without negative entries has K = 0 (every negative v encodes as 0).
inline int mirror_code(const float* code) {
  if (!(code[0] < 0.0f)) return 0;
  int zero = -1;
  for (int c = 0; c < kCodebookSize8bit; ++c) {
    if (code[c] == 0.0f) {
      zero = c;
      break;
    }
  }
  const int mirror = 2 * zero;
  if (zero < 0 || mirror >= kCodebookSize8bit) return -1;
  for (int c = zero; c <= mirror; ++c) {
    if (code[mirror - c] != -code[c]) return -1;
  }
  return mirror;
}

inline void build_magnitude_encoder(const float* code, const SegmentedEncoder& enc,
                                    MagnitudeEncoder* mag) {
  mag->usable = false;
  const int mirror = mirror_code(code);
  if (!enc.usable || mirror < 0) return;
  mag->mirror =
      static_cast<int32_t>((static_cast<uint32_t>(mirror) << kPositionFractionBits) | 0xFFFFu);
  constexpr double kUnit = 1.0 / kPositionFractionScale;
  for (int segment = 0; segment < kSegmentMaxCount; ++segment) {
    mag->scale[segment] = static_cast<float>(enc.segment_scale[segment] * kPositionFractionScale);
    const double offset_fixed =
        static_cast<double>(enc.segment_offset[segment]) * kPositionFractionScale + kNearFraction;
    mag->offset[segment] = static_cast<float>(offset_fixed);
    if (static_cast<double>(mag->offset[segment]) != offset_fixed) return;
    mag->last[segment] = static_cast<int32_t>(
        (static_cast<uint32_t>(enc.segment_last_code[segment]) << kPositionFractionBits) | 0xFFFFu);
  }
  // Every boundary of the positive half (between two runs, at or above 0) must be recorded by a
  // key, and so get a near window. One just below a key's edge is in neither key's range (the
  // segmented encoder's scan): exact with a division, but the reciprocal may carry v across it.
  int positive_boundaries = 0;
  for (int s = 0;
       s + 1 < kSegmentMaxCount && enc.segment_first_code[s + 1] == enc.segment_last_code[s] + 1;
       ++s) {
    if (enc.thresholds[enc.segment_last_code[s]] >= 0.0f) ++positive_boundaries;
  }
  int recorded_boundaries = 0;
  for (int key = 0; key < kSegmentKeyCount; ++key) {
    const float boundary = enc.key_boundary[key];  // sign 0: the positive half
    const uint32_t least_top = float_to_bits(boundary) + kBoundaryUlps;
    const uint32_t top =
        least_top + ((static_cast<uint32_t>(enc.key_segment[key]) - least_top) & kSegmentMask);
    mag->window_top[key] = static_cast<int32_t>(top);
    if (boundary < INFINITY) {  // the near window, and kBoundaryUlps more, inside the key
      ++recorded_boundaries;
      const int64_t edge = int64_t{kSegmentKeyMinExponentField + kSegmentKeyBinades * key} << 23;
      const int64_t next_edge = edge + (int64_t{kSegmentKeyBinades} << 23);
      const int64_t window_bottom = int64_t{top} - (kNearFraction - 1);
      if (key > 0 && window_bottom - edge < kBoundaryUlps) return;
      if (next_edge - top < kBoundaryUlps) return;
    }
    const uint32_t field = kSegmentKeyMinExponentField + kSegmentKeyBinades * key;
    const float low = key == 0 ? 0.0f : bits_to_float(field << 23);
    const float high = key == kSegmentKeyCount - 1
                           ? 1.0f
                           : nextafterf(bits_to_float((field + kSegmentKeyBinades) << 23), 0.0f);
    for (int above = 0; above < 2; ++above) {
      const bool split = above && boundary < high;
      const int segment = enc.key_segment[key] + (split ? 1 : 0);
      const double scale = enc.segment_scale[segment];
      const double offset = enc.segment_offset[segment];
      const int first = enc.segment_first_code[segment];
      const int last = enc.segment_last_code[segment];
      // The values of this key that take this segment: [lowest, highest].
      const float lowest = split ? nextafterf(boundary, INFINITY) : low;
      const float highest = split || !(boundary < high) ? high : boundary;
      if (!(lowest <= highest)) continue;  // an empty half: never selected
      const auto fixed = [&](float v) {
        return fmaf(v, mag->scale[segment], mag->offset[segment]);
      };
      // Never below the first code (no lower clamp), always in fixed-point range.
      if (static_cast<int64_t>(fixed(lowest)) <
          (static_cast<int64_t>(first) << kPositionFractionBits))
        return;
      if (!(fixed(highest) < 0x1p25f)) return;
      // The error budget of the exactness argument above, in units of 2^-16.
      double model_error = 0.0;
      for (int q = 1; q <= last - first; ++q) {
        const double t = enc.thresholds[first + q - 1];
        const double error = fabs(t * scale + offset - (first + q - kSegmentNearMargin));
        if (error > model_error) model_error = error;
      }
      const double mirror_slack =
          mirror > 0 ? scale * (nextafterf(highest, INFINITY) - highest) : 0.0;
      const double reciprocal_slack = scale * highest * 0x1.0001p-24 * 3.0;
      if ((model_error + mirror_slack + reciprocal_slack) / kUnit + 2.0 >
          kSegmentNearMargin / kUnit)
        return;
    }
  }
  if (recorded_boundaries != positive_boundaries) return;
  mag->usable = true;
}

// Both encoders of a map: every path uses `segmented` (or its exact search); the AVX-512 and
// AVX2 paths use `magnitude` where it is usable.
struct StateEncoder {
  SegmentedEncoder segmented;
  MagnitudeEncoder magnitude;
};

inline void build_state_encoder(const float* code, StateEncoder* enc) {
  build_segmented_encoder(code, &enc->segmented);
  build_magnitude_encoder(code, enc->segmented, &enc->magnitude);
}

// Whether the magnitude encoder applies to a block: its absmax is normal and at most 2^126, so
// that its reciprocal is normal too (a subnormal one is less precise than the encoder's margins
// allow for).
constexpr float kMagnitudeEncoderMaxAbsmax = 0x1p126f;
inline bool magnitude_encoding_applies(float absmax, const StateEncoder& enc) {
  return enc.segmented.usable && enc.magnitude.usable && absmax >= FLT_MIN &&
         absmax <= kMagnitudeEncoderMaxAbsmax;
}

// Everything the kernels read besides the tensors, built once per call from the two maps.
struct Adam8bitTables {
  alignas(64) float qmap1[kCodebookSize8bit];
  alignas(64) float qmap2[kCodebookSize8bit];
  // The maps' byte planes, for the AVX-512 decoder.
  BytePlanes byte_planes1;
  BytePlanes byte_planes2;
  // The first moment's map is signed: its mirrored planes, where it mirrors.
  MirroredBytePlanes mirrored_planes1;
  StateEncoder encoder1;
  StateEncoder encoder2;
};

void build_tables(const float* qmap1, const float* qmap2, Adam8bitTables* tables) {
  std::memcpy(tables->qmap1, qmap1, sizeof(tables->qmap1));
  std::memcpy(tables->qmap2, qmap2, sizeof(tables->qmap2));
  build_byte_planes(qmap1, &tables->byte_planes1);
  build_byte_planes(qmap2, &tables->byte_planes2);
  build_mirrored_byte_planes(qmap1, &tables->mirrored_planes1);
  build_state_encoder(qmap1, &tables->encoder1);
  build_state_encoder(qmap2, &tables->encoder2);
}

// ------------------------------------------------------------------------------ scalar path

// store_float rounds to the parameter's dtype as torch's copy_ does (nearest even).
using simd::load_float;
using simd::store_float;

// The exponent bits that mark a NaN or an infinity (all ones), per element type.
template <FloatType T>
constexpr uint32_t non_finite_exponent() {
  return T == FloatType::kFloat32 ? 0x7F800000u : T == FloatType::kFloat16 ? 0x7C00u : 0x7F80u;
}

template <FloatType T>
bool all_finite_scalar(const void* g, int64_t begin, int64_t end) {
  constexpr uint32_t kExponent = non_finite_exponent<T>();
  uint32_t largest = 0;  // branch-free: the compiler vectorizes this loop
  if constexpr (T == FloatType::kFloat32) {
    const uint32_t* bits = static_cast<const uint32_t*>(g);
    for (int64_t i = begin; i < end; ++i)
      largest = std::max(largest, bits[i] & kExponent);
  } else {
    const uint16_t* bits = static_cast<const uint16_t*>(g);
    for (int64_t i = begin; i < end; ++i)
      largest = std::max<uint32_t>(largest, bits[i] & kExponent);
  }
  return largest != kExponent;
}

// Whether the SIMD encoders apply to a block: then every x / absmax lies in [-1, 1] (a zero
// absmax encodes every element as the code of 0, a NaN or infinite one makes NaNs).
inline bool segmented_encoding_applies(float absmax, const SegmentedEncoder& enc) {
  return enc.usable && absmax > 0.0f && absmax <= FLT_MAX;
}

// The exact code of v (the count of thresholds below it) from a candidate code: the count over
// the kNearWindow thresholds around the candidate is the whole count when they bracket v (one of
// them is below v or none precedes them, and one is not below v); else the full search. Exact
// for any candidate; the encoders' near lanes are within a code of theirs, so the full search
// (8 dependent loads, about 100 cycles with the division before it) is almost never run.
constexpr int kNearWindow = 4;
inline uint8_t encode_near_candidate(float v, int candidate, const float* thresholds) {
  const int low = std::clamp(candidate - kNearWindow / 2, 0, kCodebookSize8bit - kNearWindow);
  int below = 0;
  for (int w = 0; w < kNearWindow; ++w)
    below += v > thresholds[low + w] ? 1 : 0;
  if ((below > 0 || low == 0) && below < kNearWindow) return static_cast<uint8_t>(low + below);
  return encode_8bit(v, thresholds);
}

// x / absmax into codes, by the segmented encoder where it applies.
void encode_segmented_scalar(const float* values, int64_t count, float absmax,
                             const SegmentedEncoder& enc, uint8_t* codes) {
  if (absmax == 0.0f) {
    std::memset(codes, enc.zero_code, count);
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    const float v = values[i] / absmax;
    codes[i] = enc.usable ? encode_segmented(v, enc) : encode_8bit(v, enc.thresholds);
  }
}

void encode_scalar(const float* values, int64_t count, float absmax, const StateEncoder& enc,
                   uint8_t* codes) {
  encode_segmented_scalar(values, count, absmax, enc.segmented, codes);
}

template <FloatType T, bool kAddWeightDecay>
void update_blocks_scalar(const Adam8bitTensor& t, const AdamCoefficients& c, int64_t first_block,
                          int64_t end_block, int64_t blocksize, const Adam8bitTables& tables) {
  float new_m[kBlocksizeMax8bit];
  float new_v[kBlocksizeMax8bit];
  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t count = std::min(blocksize, t.n - begin);
    const float scale1 = t.absmax1[block];
    const float scale2 = t.absmax2[block];
    uint32_t max1 = 0;
    uint32_t max2 = 0;
    for (int64_t k = 0; k < count; ++k) {
      const int64_t i = begin + k;
      float p = load_float<T>(t.p, i);
      float m = tables.qmap1[t.state1[i]] * scale1;
      float v = tables.qmap2[t.state2[i]] * scale2;
      adam_update(&p, load_float<T>(t.g, i), &m, &v, c);
      store_float<T>(t.p, i, p);
      new_m[k] = m;
      new_v[k] = v;
      max1 = std::max(max1, magnitude_bits(m));
      max2 = std::max(max2, magnitude_bits(v));
    }
    const float absmax1 = absmax_from_magnitude_bits(max1);
    const float absmax2 = absmax_from_magnitude_bits(max2);
    t.absmax1[block] = absmax1;
    t.absmax2[block] = absmax2;
    encode_scalar(new_m, count, absmax1, tables.encoder1, t.state1 + begin);
    encode_scalar(new_v, count, absmax2, tables.encoder2, t.state2 + begin);
  }
  (void)kAddWeightDecay;  // the scalar path reads c.add_weight_decay itself
}

// Elements [begin, end) of a tensor with float32 states.
template <FloatType T, bool kAddWeightDecay>
void update_float_states_scalar(const AdamTensor& t, const AdamCoefficients& c, int64_t begin,
                                int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float p = load_float<T>(t.p, i);
    float m = t.m[i];
    float v = t.v[i];
    adam_update(&p, load_float<T>(t.g, i), &m, &v, c);
    store_float<T>(t.p, i, p);
    t.m[i] = m;
    t.v[i] = v;
  }
  (void)kAddWeightDecay;  // the scalar path reads c.add_weight_decay itself
}

// The absmax of a block's new v from the maximum of their bits as they are: the same when no v
// is negative; else the magnitudes are taken again (only a raw-op caller with a signed map or a
// negative scale for the second moment gets there).
inline float v_absmax_from_raw_max(uint32_t max_raw_bits, const float* new_v, int64_t count) {
  if (!(max_raw_bits >> 31)) return absmax_from_magnitude_bits(max_raw_bits);
  uint32_t max_bits = 0;
  for (int64_t k = 0; k < count; ++k)
    max_bits = std::max(max_bits, magnitude_bits(new_v[k]));
  return absmax_from_magnitude_bits(max_bits);
}

#if LOWPREC_X86_SIMD

// -------------------------------------------------------------------------------- AVX2 path
// Decodes with scalar table loads (a gather decoded 3-7% faster on an Intel core; gathers cost
// several times more on AMD ones) and looks the encoders' tables up by permutes: the path for
// x86 CPUs without AVX-512. Block tails (count % 8) take the scalar code.

using simd::avx2_load;
using simd::avx2_reduce_max_u32;
using simd::avx2_store;
using simd::avx2_store_codes;
using simd::kAvx2Lanes;

LP_TARGET_AVX2 inline __m256 avx2_decode(const float* qmap, const uint8_t* codes) {
  return _mm256_setr_ps(qmap[codes[0]], qmap[codes[1]], qmap[codes[2]], qmap[codes[3]],
                        qmap[codes[4]], qmap[codes[5]], qmap[codes[6]], qmap[codes[7]]);
}

// table[index] per lane for a table of 8 << kIndexBits floats (kIndexBits = 1 or 2), by
// vpermps on each register of 8 and blends on the index's higher bits: gathers cost several
// times more on current AMD cores.
LP_TARGET_AVX2 inline __m256 avx2_select_by_bit(__m256i index, int bit, __m256 if_clear,
                                                __m256 if_set) {
  const __m256 sign_is_bit =
      _mm256_castsi256_ps(_mm256_sll_epi32(index, _mm_cvtsi32_si128(31 - bit)));
  return _mm256_blendv_ps(if_clear, if_set, sign_is_bit);
}

// table[index] for a 16-entry table, the half chosen by `upper` (bit 3 of the index moved to
// the sign bit, which several lookups of one index may share).
LP_TARGET_AVX2 inline __m256 avx2_lookup16(const void* table, __m256i index, __m256 upper) {
  const float* t = static_cast<const float*>(table);
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_load_ps(t), index),
                          _mm256_permutevar8x32_ps(_mm256_load_ps(t + 8), index), upper);
}

LP_TARGET_AVX2 inline __m256 avx2_upper_half(__m256i index) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(index, 31 - 3));
}

LP_TARGET_AVX2 inline __m256 avx2_lookup16(const void* table, __m256i index) {
  return avx2_lookup16(table, index, avx2_upper_half(index));
}

LP_TARGET_AVX2 inline __m256 avx2_lookup32(const void* table, __m256i index) {
  const float* t = static_cast<const float*>(table);
  return avx2_select_by_bit(index, 4, avx2_lookup16(t, index), avx2_lookup16(t + 16, index));
}

// The segmented encoder of lowprec/adam8bit.h on 8 lanes, for v in [-1, 1]; `near` gets the
// lanes near a threshold, whose code must come from the exact search.
LP_TARGET_AVX2 inline __m256i avx2_encode(__m256 v, const SegmentedEncoder& enc, int* near) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i field = _mm256_srli_epi32(
      _mm256_max_epu32(_mm256_slli_epi32(bits, 1),
                       _mm256_set1_epi32(static_cast<int>(kSegmentKeyMinExponentField << 24))),
      24);
  // The key tables' index (segment_key_index): sign * 16 + field / 2 % 16.
  const __m256i key = _mm256_or_si256(
      _mm256_slli_epi32(_mm256_srli_epi32(bits, 31), 4),
      _mm256_and_si256(_mm256_srli_epi32(field, 1), _mm256_set1_epi32(kSegmentKeyCount - 1)));
  const __m256 boundary = avx2_lookup32(enc.key_boundary, key);
  __m256i segment = _mm256_castps_si256(avx2_lookup32(enc.key_segment, key));
  // An all-ones lane (above the boundary) is -1: subtracting it adds one.
  segment = _mm256_sub_epi32(segment, _mm256_castps_si256(_mm256_cmp_ps(v, boundary, _CMP_GT_OQ)));
  const __m256 scale = avx2_lookup16(enc.segment_scale, segment);
  const __m256 offset = avx2_lookup16(enc.segment_offset, segment);
  const __m256i first = _mm256_castps_si256(avx2_lookup16(enc.segment_first_code, segment));
  const __m256i last = _mm256_castps_si256(avx2_lookup16(enc.segment_last_code, segment));
  const __m256 position = _mm256_fmadd_ps(v, scale, offset);
  const __m256i code = _mm256_cvttps_epi32(_mm256_add_ps(position, _mm256_set1_ps(kSegmentWindow)));
  *near = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_xor_si256(
      _mm256_cmpeq_epi32(_mm256_cvttps_epi32(position), code), _mm256_set1_epi32(-1))));
  return _mm256_min_epi32(_mm256_max_epi32(code, first), last);
}

// Codes stored 32 at a time (four vectors of codes below 256): three packs and one lane
// permute, where avx2_store_codes takes three shuffles per vector (the shuffle port is the
// AVX2 encoder's bottleneck on Intel cores).
constexpr int kVectorsPerAvx2CodeGroup = 4;
constexpr int kAvx2CodeGroup = kVectorsPerAvx2CodeGroup * kAvx2Lanes;

LP_TARGET_AVX2 inline void avx2_store_code_group(uint8_t* codes,
                                                 const __m256i code[kVectorsPerAvx2CodeGroup]) {
  // Per 128-bit lane: the packs interleave the vectors' halves, so dword d of the result holds
  // codes 4 d' .. 4 d' + 3 of vector d % 4's lane d / 4; the permute puts them in order.
  const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(code[0], code[1]),
                                            _mm256_packus_epi32(code[2], code[3]));
  _mm256_storeu_si256(
      reinterpret_cast<__m256i*>(codes),
      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

// The magnitude encoder (above) on 8 lanes, for v in [-1, 1] (not NaN): the fixed-point
// position, its code in bits 16..23, as avx512_encode_magnitude computes it; `near` gets the
// lanes near a threshold or a boundary, whose code must come from the exact search. kSigned:
// v may be negative (false: v >= +0).
template <bool kSigned>
LP_TARGET_AVX2 inline __m256i avx2_encode_magnitude(__m256 v, const MagnitudeEncoder& enc,
                                                    int* near) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i magnitude = kSigned ? _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF)) : bits;
  // Bits 0..3 of the key are field / 2 % 16 (the permutes read bits 0..2, the half bit 3).
  const __m256i key = _mm256_srli_epi32(
      _mm256_max_epu32(magnitude,
                       _mm256_set1_epi32(static_cast<int>(kSegmentKeyMinExponentField << 23))),
      23 + 1);
  const __m256i window_top = _mm256_castps_si256(avx2_lookup16(enc.window_top, key));
  const __m256i to_window = _mm256_sub_epi32(window_top, magnitude);
  const __m256i segment = _mm256_add_epi32(window_top, _mm256_srli_epi32(to_window, 31));
  const __m256 upper = avx2_upper_half(segment);
  const __m256 position =
      _mm256_fmadd_ps(_mm256_castsi256_ps(magnitude), avx2_lookup16(enc.scale, segment, upper),
                      avx2_lookup16(enc.offset, segment, upper));
  const __m256i fixed = _mm256_min_epi32(
      _mm256_cvttps_epi32(position), _mm256_castps_si256(avx2_lookup16(enc.last, segment, upper)));
  // Near when min(fraction, W - M) < kNearFraction (unsigned), i.e. when it equals its minimum
  // with kNearFraction - 1.
  const __m256i distance = _mm256_min_epu32(
      _mm256_and_si256(fixed, _mm256_set1_epi32((1 << kPositionFractionBits) - 1)), to_window);
  *near = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(
      distance, _mm256_min_epu32(distance, _mm256_set1_epi32(kNearFraction - 1)))));
  if constexpr (!kSigned) return fixed;
  // Negative v: max(K - code, 0) in the high word, as in avx512_encode_magnitude (here the
  // whole lane is replaced, chosen by the float's sign).
  const __m256i mirrored = _mm256_subs_epu16(_mm256_set1_epi32(enc.mirror), fixed);
  return _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(fixed), _mm256_castsi256_ps(mirrored), v));
}

// values[i] / absmax into codes by the magnitude encoder, for a block whose absmax lies in
// [FLT_MIN, kMagnitudeEncoderMaxAbsmax]: a multiplication by its reciprocal instead of a
// division, whose difference the encoder's margins cover. The tail (count % 8) is encoded
// exactly by the scalar code.
template <bool kSigned>
LP_TARGET_AVX2 void encode_magnitude_avx2(const float* values, int64_t count, float absmax,
                                          const StateEncoder& state_encoder, uint8_t* codes) {
  const MagnitudeEncoder& enc = state_encoder.magnitude;
  const __m256 reciprocal = _mm256_set1_ps(1.0f / absmax);
  // The exact codes of the near lanes of `near` (one bit per lane from element i on).
  const auto fix_near = [&](int64_t i, uint32_t near) {
    for (; __builtin_expect(near != 0, 0); near &= near - 1) {
      const int64_t k = i + __builtin_ctz(near);
      codes[k] =
          encode_near_candidate(values[k] / absmax, codes[k], state_encoder.segmented.thresholds);
    }
  };
  int64_t i = 0;
  for (; i + kAvx2CodeGroup <= count; i += kAvx2CodeGroup) {
    __m256i code[kVectorsPerAvx2CodeGroup];
    uint32_t near = 0;
    for (int j = 0; j < kVectorsPerAvx2CodeGroup; ++j) {
      int lanes_near;
      code[j] = _mm256_srli_epi32(
          avx2_encode_magnitude<kSigned>(
              _mm256_mul_ps(_mm256_loadu_ps(values + i + j * kAvx2Lanes), reciprocal), enc,
              &lanes_near),
          kPositionFractionBits);
      near |= static_cast<uint32_t>(lanes_near) << (j * kAvx2Lanes);
    }
    avx2_store_code_group(codes + i, code);
    fix_near(i, near);
  }
  for (; i + kAvx2Lanes <= count; i += kAvx2Lanes) {
    int near;
    const __m256i fixed = avx2_encode_magnitude<kSigned>(
        _mm256_mul_ps(_mm256_loadu_ps(values + i), reciprocal), enc, &near);
    avx2_store_codes(codes + i, _mm256_srli_epi32(fixed, kPositionFractionBits));
    fix_near(i, static_cast<uint32_t>(near));
  }
  encode_segmented_scalar(values + i, count - i, absmax, state_encoder.segmented, codes + i);
}

// values[i] / absmax into codes. kSigned = false: no value is negative or -0 (the caller has
// checked), which spares the magnitude encoder its sign.
template <bool kSigned = true>
LP_TARGET_AVX2 void encode_avx2(const float* values, int64_t count, float absmax,
                                const StateEncoder& state_encoder, uint8_t* codes) {
  const SegmentedEncoder& enc = state_encoder.segmented;
  if (!segmented_encoding_applies(absmax, enc)) {
    encode_segmented_scalar(values, count, absmax, enc, codes);
    return;
  }
  if (magnitude_encoding_applies(absmax, state_encoder)) {
    encode_magnitude_avx2<kSigned>(values, count, absmax, state_encoder, codes);
    return;
  }
  const __m256 divisor = _mm256_set1_ps(absmax);
  const int64_t vector_end = count / kAvx2Lanes * kAvx2Lanes;
  for (int64_t i = 0; i < vector_end; i += kAvx2Lanes) {
    const __m256 v = _mm256_div_ps(_mm256_loadu_ps(values + i), divisor);
    int near;
    __m256i code = avx2_encode(v, enc, &near);
    if (__builtin_expect(near != 0, 0)) {
      alignas(32) float lane_values[kAvx2Lanes];
      alignas(32) int32_t lane_codes[kAvx2Lanes];
      _mm256_store_ps(lane_values, v);
      _mm256_store_si256(reinterpret_cast<__m256i*>(lane_codes), code);
      for (; near != 0; near &= near - 1) {
        const int lane = __builtin_ctz(near);
        lane_codes[lane] =
            encode_near_candidate(lane_values[lane], lane_codes[lane], enc.thresholds);
      }
      code = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_codes));
    }
    avx2_store_codes(codes + i, code);
  }
  encode_segmented_scalar(values + vector_end, count - vector_end, absmax, enc, codes + vector_end);
}

// The step's scalars, broadcast once per call.
struct Avx2StepConstants {
  __m256 gnorm_scale;
  __m256 weight_decay;
  __m256 beta1;
  __m256 one_minus_beta1;
  __m256 beta2;
  __m256 one_minus_beta2;
  __m256 decay;
  __m256 step_size;
  __m256 inv_sqrt_bc2;
  __m256 eps;
};

LP_TARGET_AVX2 inline Avx2StepConstants avx2_step_constants(const AdamCoefficients& c) {
  return {_mm256_set1_ps(c.gnorm_scale),  _mm256_set1_ps(c.weight_decay),
          _mm256_set1_ps(c.beta1),        _mm256_set1_ps(c.one_minus_beta1),
          _mm256_set1_ps(c.beta2),        _mm256_set1_ps(c.one_minus_beta2),
          _mm256_set1_ps(c.decay),        _mm256_set1_ps(c.step_size),
          _mm256_set1_ps(c.inv_sqrt_bc2), _mm256_set1_ps(c.eps)};
}

// lowprec::adam_update on 8 lanes: m and v (decoded) in, updated in place; returns the new p.
template <bool kAddWeightDecay>
LP_TARGET_AVX2 inline __m256 avx2_adam_update(__m256 p, __m256 g, __m256* m, __m256* v,
                                              const Avx2StepConstants& c) {
  g = _mm256_mul_ps(g, c.gnorm_scale);
  if constexpr (kAddWeightDecay) g = _mm256_add_ps(g, _mm256_mul_ps(c.weight_decay, p));
  *m = _mm256_add_ps(_mm256_mul_ps(c.beta1, *m), _mm256_mul_ps(c.one_minus_beta1, g));
  *v = _mm256_add_ps(_mm256_mul_ps(c.beta2, *v),
                     _mm256_mul_ps(_mm256_mul_ps(c.one_minus_beta2, g), g));
  p = _mm256_mul_ps(p, c.decay);
  const __m256 denominator =
      _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(*v), c.inv_sqrt_bc2), c.eps);
  return _mm256_sub_ps(p, _mm256_mul_ps(c.step_size, _mm256_div_ps(*m, denominator)));
}

template <FloatType T, bool kAddWeightDecay>
LP_TARGET_AVX2 void update_blocks_avx2(const Adam8bitTensor& t, const AdamCoefficients& c,
                                       int64_t first_block, int64_t end_block, int64_t blocksize,
                                       const Adam8bitTables& tables) {
  alignas(32) float new_m[kBlocksizeMax8bit];
  alignas(32) float new_v[kBlocksizeMax8bit];
  const Avx2StepConstants constants = avx2_step_constants(c);
  const __m256i magnitude_mask = _mm256_set1_epi32(0x7FFFFFFF);
  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t count = std::min(blocksize, t.n - begin);
    const int64_t vector_end = count / kAvx2Lanes * kAvx2Lanes;
    const float old_absmax1 = t.absmax1[block];
    const float old_absmax2 = t.absmax2[block];
    const __m256 scale1 = _mm256_set1_ps(old_absmax1);
    const __m256 scale2 = _mm256_set1_ps(old_absmax2);
    __m256i max1 = _mm256_setzero_si256();
    __m256i max2 = _mm256_setzero_si256();
    for (int64_t k = 0; k < vector_end; k += kAvx2Lanes) {
      const int64_t i = begin + k;
      __m256 m = _mm256_mul_ps(avx2_decode(tables.qmap1, t.state1 + i), scale1);
      __m256 v = _mm256_mul_ps(avx2_decode(tables.qmap2, t.state2 + i), scale2);
      avx2_store<T>(t.p, i,
                    avx2_adam_update<kAddWeightDecay>(avx2_load<T>(t.p, i), avx2_load<T>(t.g, i),
                                                      &m, &v, constants));
      _mm256_store_ps(new_m + k, m);
      _mm256_store_ps(new_v + k, v);
      max1 = _mm256_max_epu32(max1, _mm256_and_si256(_mm256_castps_si256(m), magnitude_mask));
      // v's bits as they are (see avx512_update_vector).
      max2 = _mm256_max_epu32(max2, _mm256_castps_si256(v));
    }
    uint32_t max1_bits = avx2_reduce_max_u32(max1);
    uint32_t max2_bits = avx2_reduce_max_u32(max2);
    for (int64_t k = vector_end; k < count; ++k) {
      const int64_t i = begin + k;
      float p = load_float<T>(t.p, i);
      float m = tables.qmap1[t.state1[i]] * old_absmax1;
      float v = tables.qmap2[t.state2[i]] * old_absmax2;
      adam_update(&p, load_float<T>(t.g, i), &m, &v, c);
      store_float<T>(t.p, i, p);
      new_m[k] = m;
      new_v[k] = v;
      max1_bits = std::max(max1_bits, magnitude_bits(m));
      max2_bits = std::max(max2_bits, float_to_bits(v));
    }
    const float absmax1 = absmax_from_magnitude_bits(max1_bits);
    const float absmax2 = v_absmax_from_raw_max(max2_bits, new_v, count);
    t.absmax1[block] = absmax1;
    t.absmax2[block] = absmax2;
    encode_avx2(new_m, count, absmax1, tables.encoder1, t.state1 + begin);
    if (max2_bits >> 31) {
      encode_avx2(new_v, count, absmax2, tables.encoder2, t.state2 + begin);
    } else {
      encode_avx2<false>(new_v, count, absmax2, tables.encoder2, t.state2 + begin);
    }
  }
}

template <FloatType T, bool kAddWeightDecay>
LP_TARGET_AVX2 void update_float_states_avx2(const AdamTensor& t, const AdamCoefficients& c,
                                             int64_t begin, int64_t end) {
  const Avx2StepConstants constants = avx2_step_constants(c);
  const int64_t vector_end = begin + (end - begin) / kAvx2Lanes * kAvx2Lanes;
  for (int64_t i = begin; i < vector_end; i += kAvx2Lanes) {
    __m256 m = _mm256_loadu_ps(t.m + i);
    __m256 v = _mm256_loadu_ps(t.v + i);
    avx2_store<T>(t.p, i,
                  avx2_adam_update<kAddWeightDecay>(avx2_load<T>(t.p, i), avx2_load<T>(t.g, i), &m,
                                                    &v, constants));
    _mm256_storeu_ps(t.m + i, m);
    _mm256_storeu_ps(t.v + i, v);
  }
  update_float_states_scalar<T, kAddWeightDecay>(t, c, vector_end, end);
}

template <FloatType T>
LP_TARGET_AVX2 inline __m256i avx2_max_exponent_bits(__m256i a, const char* data) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data));
  if constexpr (T == FloatType::kFloat32) {
    return _mm256_max_epu32(a, _mm256_and_si256(x, _mm256_set1_epi32(non_finite_exponent<T>())));
  } else {
    return _mm256_max_epu16(
        a, _mm256_and_si256(x, _mm256_set1_epi16(static_cast<int16_t>(non_finite_exponent<T>()))));
  }
}

// As all_finite_avx512: kFiniteAccumulators running maxima, and a prefetch kFinitePrefetchBytes
// ahead per step.
template <FloatType T>
LP_TARGET_AVX2 bool all_finite_avx2(const void* g, int64_t begin, int64_t end) {
  constexpr int64_t kElementBytes = T == FloatType::kFloat32 ? 4 : 2;
  constexpr int64_t kPerVector = 32 / kElementBytes;
  constexpr int64_t kPerStep = kPerVector * kFiniteAccumulators;
  const char* base = static_cast<const char*>(g);
  __m256i largest[kFiniteAccumulators];
  for (__m256i& l : largest)
    l = _mm256_setzero_si256();
  int64_t i = begin;
  for (; i + kPerStep <= end; i += kPerStep) {
    // The line may lie past the gradient's end (a prefetch never faults).
    simd::prefetch_l1(base + i * kElementBytes + kFinitePrefetchBytes);
    for (int a = 0; a < kFiniteAccumulators; ++a) {
      largest[a] =
          avx2_max_exponent_bits<T>(largest[a], base + (i + a * kPerVector) * kElementBytes);
    }
  }
  for (; i + kPerVector <= end; i += kPerVector)
    largest[0] = avx2_max_exponent_bits<T>(largest[0], base + i * kElementBytes);
  __m256i any_non_finite = _mm256_setzero_si256();
  for (const __m256i& l : largest) {
    if constexpr (T == FloatType::kFloat32) {
      any_non_finite = _mm256_or_si256(
          any_non_finite, _mm256_cmpeq_epi32(l, _mm256_set1_epi32(non_finite_exponent<T>())));
    } else {
      any_non_finite = _mm256_or_si256(
          any_non_finite,
          _mm256_cmpeq_epi16(l, _mm256_set1_epi16(static_cast<int16_t>(non_finite_exponent<T>()))));
    }
  }
  return _mm256_testz_si256(any_non_finite, any_non_finite) && all_finite_scalar<T>(g, i, end);
}

// ------------------------------------------------------------------------------ AVX-512 path

using simd::kAvx512Lanes;
// Codes decoded together: one byte permute looks up 64 of them.
constexpr int kAvx512CodeGroup = kBytePlaneCodes;
constexpr int kVectorsPerCodeGroup = kAvx512CodeGroup / kAvx512Lanes;

LP_TARGET_AVX512_VBMI inline __mmask16 avx512_lanes(int64_t remaining) {
  return remaining >= kAvx512Lanes ? static_cast<__mmask16>(0xFFFF)
                                   : static_cast<__mmask16>((1u << remaining) - 1u);
}

LP_TARGET_AVX512_VBMI inline __mmask64 avx512_code_lanes(int64_t remaining) {
  return remaining >= kAvx512CodeGroup ? ~__mmask64{0} : (__mmask64{1} << remaining) - 1;
}

// Masked-off lanes load as +0. Full vectors use plain loads and stores: masked ones that miss
// the cache are far slower on some cores (they do not overlap), and every block's are whole.
template <FloatType T>
LP_TARGET_AVX512_VBMI inline __m512 avx512_load(const void* data, int64_t i, __mmask16 lanes) {
  if constexpr (T == FloatType::kFloat32) {
    const float* src = static_cast<const float*>(data) + i;
    return lanes == 0xFFFF ? _mm512_loadu_ps(src) : _mm512_maskz_loadu_ps(lanes, src);
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(data) + i;
    const __m256i half_bits = lanes == 0xFFFF
                                  ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))
                                  : _mm256_maskz_loadu_epi16(lanes, src);
    return simd::avx512_widen<T>(half_bits);
  }
}

LP_TARGET_AVX512_VBMI inline __m512i avx512_load_codes(const uint8_t* codes, __mmask64 lanes) {
  return lanes == ~__mmask64{0} ? _mm512_loadu_si512(codes) : _mm512_maskz_loadu_epi8(lanes, codes);
}

// Codes as bytes (masked lanes untouched).
LP_TARGET_AVX512_VBMI inline void avx512_store_codes(uint8_t* codes, __mmask16 lanes,
                                                     __m512i code) {
  if (lanes == 0xFFFF) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtepi32_epi8(code));
  } else {
    _mm512_mask_cvtepi32_storeu_epi8(codes, lanes, code);
  }
}

// Rounds to nearest even (bf16 by simd::avx512_narrow, as c10::BFloat16 does); the lanes not
// in `lanes` are left untouched.
template <FloatType T>
LP_TARGET_AVX512_VBMI inline void avx512_store(void* data, int64_t i, __mmask16 lanes,
                                               __m512 value) {
  if constexpr (T == FloatType::kFloat32) {
    float* dst = static_cast<float*>(data) + i;
    if (lanes == 0xFFFF) {
      _mm512_storeu_ps(dst, value);
    } else {
      _mm512_mask_storeu_ps(dst, lanes, value);
    }
  } else {
    __m256i half_bits;
    if constexpr (T == FloatType::kFloat16) {
      half_bits = _mm512_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      half_bits = _mm512_cvtepi32_epi16(simd::avx512_narrow<T>(value));
    }
    uint16_t* dst = static_cast<uint16_t*>(data) + i;
    if (lanes == 0xFFFF) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), half_bits);
    } else {
      _mm256_mask_storeu_epi16(dst, lanes, half_bits);
    }
  }
}

// The segmented encoder's tables in registers, loaded once per call: a 32-entry table (sign
// and key) in two, a 16-entry table (segment) in one.
struct Avx512Encoder {
  __m512 boundary[2];
  __m512i key_segment[2];
  __m512 scale;
  __m512 offset;
  __m512i first_code;
  __m512i last_code;
};

LP_TARGET_AVX512_VBMI inline Avx512Encoder avx512_encoder(const SegmentedEncoder& enc) {
  static_assert(2 * kSegmentKeyCount == 2 * kAvx512Lanes && kSegmentMaxCount == kAvx512Lanes,
                "the encoder's tables must fill whole registers");
  return {{_mm512_load_ps(enc.key_boundary), _mm512_load_ps(enc.key_boundary + kAvx512Lanes)},
          {_mm512_load_si512(enc.key_segment), _mm512_load_si512(enc.key_segment + kAvx512Lanes)},
          _mm512_load_ps(enc.segment_scale),
          _mm512_load_ps(enc.segment_offset),
          _mm512_load_si512(enc.segment_first_code),
          _mm512_load_si512(enc.segment_last_code)};
}

// The segmented encoder of lowprec/adam8bit.h on 16 lanes, for v in [-1, 1] (not NaN: blocks
// whose absmax is not finite take the scalar path). `near` gets the lanes near a threshold,
// whose code must come from the exact search.
LP_TARGET_AVX512_VBMI inline __m512i avx512_encode(__m512 v, const Avx512Encoder& enc,
                                                   __mmask16* near) {
  const __m512i bits = _mm512_castps_si512(v);
  // (bits << 1) holds the exponent field in its top byte; clamped below, its bits 28..25 are
  // the key (field / 2 % 16). The sign goes to bit 4 of the index: the 32-entry lookups take
  // their index's low 5 bits, so [sign * 16 + key].
  const __m512i clamped =
      _mm512_max_epu32(_mm512_slli_epi32(bits, 1),
                       _mm512_set1_epi32(static_cast<int>(kSegmentKeyMinExponentField << 24)));
  const __m512i index = _mm512_ternarylogic_epi32(  // bit 4 from the second operand
      _mm512_srli_epi32(clamped, 25), _mm512_srli_epi32(bits, 27), _mm512_set1_epi32(0x10), 0xD8);
  const __m512 boundary = _mm512_permutex2var_ps(enc.boundary[0], index, enc.boundary[1]);
  __m512i segment = _mm512_permutex2var_epi32(enc.key_segment[0], index, enc.key_segment[1]);
  const __mmask16 above = _mm512_cmp_ps_mask(v, boundary, _CMP_GT_OQ);
  segment = _mm512_mask_add_epi32(segment, above, segment, _mm512_set1_epi32(1));
  const __m512 position = _mm512_fmadd_ps(v, _mm512_permutexvar_ps(segment, enc.scale),
                                          _mm512_permutexvar_ps(segment, enc.offset));
  const __m512i code = _mm512_cvttps_epi32(_mm512_add_ps(position, _mm512_set1_ps(kSegmentWindow)));
  *near = _mm512_cmpneq_epi32_mask(_mm512_cvttps_epi32(position), code);
  return _mm512_min_epi32(_mm512_max_epi32(code, _mm512_permutexvar_epi32(segment, enc.first_code)),
                          _mm512_permutexvar_epi32(segment, enc.last_code));
}

// The exact codes of the lanes recorded in near_lanes (one 16-bit mask per vector of codes).
inline void encode_near_lanes(const float* values, float absmax, const uint16_t* near_lanes,
                              int64_t vectors, const SegmentedEncoder& enc, uint8_t* codes) {
  for (int64_t j = 0; j < vectors; ++j) {
    for (unsigned bits = near_lanes[j]; bits != 0; bits &= bits - 1) {
      const int64_t i = j * kAvx512Lanes + __builtin_ctz(bits);
      codes[i] = encode_near_candidate(values[i] / absmax, codes[i], enc.thresholds);
    }
  }
}

constexpr int kAvx512MaxVectorsPerBlock = kBlocksizeMax8bit / kAvx512Lanes;

// The magnitude encoder's tables in registers, loaded once per call.
struct Avx512MagnitudeEncoder {
  __m512i window_top;
  __m512 scale;
  __m512 offset;
  __m512i last;
  __m512i mirror;
};

LP_TARGET_AVX512_VBMI inline Avx512MagnitudeEncoder avx512_magnitude_encoder(
    const MagnitudeEncoder& mag) {
  static_assert(kSegmentKeyCount == kAvx512Lanes && kSegmentMaxCount == kAvx512Lanes,
                "a table must fill one register");
  return {_mm512_load_si512(mag.window_top), _mm512_load_ps(mag.scale), _mm512_load_ps(mag.offset),
          _mm512_load_si512(mag.last), _mm512_set1_epi32(mag.mirror)};
}

// The two terms of a vector's near distances: the fixed-point positions of |v| (their low 16
// bits are the fractions; the higher ones do not matter) and W - M. A group of vectors folds
// into one NearTerms by lane-wise minimums (of 16-bit words for the positions), which keeps the
// minimum of each term; near_distance takes them to avx512_near_lanes.
struct NearTerms {
  __m512i position;
  __m512i to_window;
};

static_assert(kPositionFractionBits == 16, "the fold takes the fractions as 16-bit words");

LP_TARGET_AVX512_VBMI inline NearTerms avx512_fold_near_terms(NearTerms a, NearTerms b) {
  return {_mm512_min_epu16(a.position, b.position), _mm512_min_epu32(a.to_window, b.to_window)};
}

LP_TARGET_AVX512_VBMI inline __m512i avx512_near_distance(NearTerms terms) {
  return _mm512_min_epu32(
      _mm512_and_si512(terms.position, _mm512_set1_epi32((1 << kPositionFractionBits) - 1)),
      terms.to_window);
}

// The fixed-point position of v in [-1, 1] (not NaN), clamped: its code in bits 16..23.
// `near` gets the terms of each lane's near distance (avx512_near_lanes: the lanes whose code
// must come from the exact search). kSigned: v may be negative (false: v >= +0, as the second
// moment is).
template <bool kSigned>
LP_TARGET_AVX512_VBMI inline __m512i avx512_encode_magnitude(__m512 v,
                                                             const Avx512MagnitudeEncoder& enc,
                                                             NearTerms* near) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i magnitude = kSigned ? _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF)) : bits;
  // The exponent field, clamped below at the lowest key's: bits 24..27 of the clamped bits are
  // field / 2 % 16, the key.
  const __m512i key = _mm512_srli_epi32(
      _mm512_max_epu32(magnitude,
                       _mm512_set1_epi32(static_cast<int>(kSegmentKeyMinExponentField << 23))),
      23 + 1);
  static_assert(kSegmentKeyBinades == 2 && kSegmentKeyMinExponentField % 32 == 0,
                "the key is bits 24..27 of the clamped bits");
  // W - M: negative when |v| is above W (the bits of floats >= +0 order as the floats do; W
  // may lie just above +inf's bits, where it still exceeds every |v| <= 1).
  const __m512i window_top = _mm512_permutexvar_epi32(key, enc.window_top);
  const __m512i to_window = _mm512_sub_epi32(window_top, magnitude);
  // W's low four bits are its key's segment, one more when |v| is above W. The permutes below
  // read only the low four bits of their index, so W's other bits need no mask, and the carry
  // never leaves them: a key has a boundary (values above W) only when its segment has a
  // successor, at most kSegmentMaxCount - 1.
  static_assert(kSegmentMaxCount <= kAvx512Lanes, "segment indices fit a permute's index bits");
  const __m512i segment = _mm512_add_epi32(window_top, _mm512_srli_epi32(to_window, 31));
  const __m512 position =
      _mm512_fmadd_ps(_mm512_castsi512_ps(magnitude), _mm512_permutexvar_ps(segment, enc.scale),
                      _mm512_permutexvar_ps(segment, enc.offset));
  __m512i fixed =
      _mm512_min_epi32(_mm512_cvttps_epi32(position), _mm512_permutexvar_epi32(segment, enc.last));
  *near = {fixed, to_window};
  if constexpr (kSigned) {
    // Negative v: max(K - code, 0) in the high half of each lane, by an unsigned saturating
    // subtraction of 16-bit words: the high word of mirror - F is K - code (the code is below
    // 2^8 and no borrow comes from the low words, since mirror's low word is 0xFFFF). The
    // word mask takes the float's sign for each high word; a low word (the fraction, read
    // only by the near test, which has it already) may be changed by its own bit 15.
    const __mmask32 negative = _mm512_movepi16_mask(bits);
    fixed = _mm512_mask_subs_epu16(fixed, negative, enc.mirror, fixed);
  }
  return fixed;
}

LP_TARGET_AVX512_VBMI inline __mmask16 avx512_near_lanes(__m512i near_distance) {
  return _mm512_cmplt_epu32_mask(near_distance, _mm512_set1_epi32(kNearFraction));
}

// Byte 2 of every lane of four vectors, in order: the codes of 64 fixed-point positions. Each
// vector's 16 codes go to their own 16-byte slot by one byte permute that writes only that slot
// (merge-masked): 4 single-uop permutes, where two two-source permutes (3 uops each on Intel)
// and a blend took 7.
struct CodeBytePicker {
  alignas(64) uint8_t index[kAvx512CodeGroup];
  constexpr CodeBytePicker() : index{} {
    for (int j = 0; j < kAvx512CodeGroup; ++j)
      index[j] = static_cast<uint8_t>(4 * (j % kAvx512Lanes) + 2);
  }
};
constexpr CodeBytePicker kCodeBytePicker;

LP_TARGET_AVX512_VBMI inline void avx512_store_code_group(
    uint8_t* codes, const __m512i fixed[kVectorsPerCodeGroup]) {
  const __m512i pick = _mm512_load_si512(kCodeBytePicker.index);
  constexpr __mmask64 kSlot = (__mmask64{1} << kAvx512Lanes) - 1;  // bytes 0..15
  __m512i packed = _mm512_permutexvar_epi8(pick, fixed[0]);        // slot 0 (the others rewritten)
  for (int j = 1; j < kVectorsPerCodeGroup; ++j)
    packed = _mm512_mask_permutexvar_epi8(packed, kSlot << (kAvx512Lanes * j), pick, fixed[j]);
  _mm512_storeu_si512(codes, packed);
}

LP_TARGET_AVX512_VBMI inline void avx512_store_fixed_codes(uint8_t* codes, __mmask16 lanes,
                                                           __m512i fixed) {
  avx512_store_codes(codes, lanes, _mm512_srli_epi32(fixed, kPositionFractionBits));
}

// 64 values (x * reciprocal) into codes by the magnitude encoder. The near lanes (about 1 group
// in 30 has one) are encoded again by the exact search of `exact`, which divides.
template <bool kSigned>
LP_TARGET_AVX512_VBMI inline void avx512_encode_code_group(const float* values, float absmax,
                                                           __m512 reciprocal,
                                                           const Avx512MagnitudeEncoder& enc,
                                                           const SegmentedEncoder& exact,
                                                           uint8_t* codes) {
  __m512i fixed[kVectorsPerCodeGroup];
  NearTerms near[kVectorsPerCodeGroup];
  for (int j = 0; j < kVectorsPerCodeGroup; ++j) {
    fixed[j] = avx512_encode_magnitude<kSigned>(
        _mm512_mul_ps(_mm512_loadu_ps(values + j * kAvx512Lanes), reciprocal), enc, &near[j]);
  }
  avx512_store_code_group(codes, fixed);
  const NearTerms group = avx512_fold_near_terms(avx512_fold_near_terms(near[0], near[1]),
                                                 avx512_fold_near_terms(near[2], near[3]));
  if (__builtin_expect(avx512_near_lanes(avx512_near_distance(group)) != 0, 0)) {
    uint16_t near_lanes[kVectorsPerCodeGroup];
    for (int j = 0; j < kVectorsPerCodeGroup; ++j)
      near_lanes[j] = avx512_near_lanes(avx512_near_distance(near[j]));
    encode_near_lanes(values, absmax, near_lanes, kVectorsPerCodeGroup, exact, codes);
  }
}

// The reciprocal the magnitude encoder multiplies by: finite for absmax in [FLT_MIN, FLT_MAX].
LP_TARGET_AVX512_VBMI inline __m512 avx512_reciprocal(float absmax) {
  return _mm512_set1_ps(1.0f / absmax);
}

// values[i] / absmax into codes by the magnitude encoder, for a block whose absmax lies in
// [FLT_MIN, FLT_MAX]. It multiplies by the reciprocal of absmax instead of dividing (the divider
// is busy enough with pass 1): the encoder's margins cover the difference.
template <bool kSigned>
LP_TARGET_AVX512_VBMI inline void avx512_encode_block(const float* values, int64_t count,
                                                      float absmax,
                                                      const Avx512MagnitudeEncoder& enc,
                                                      const SegmentedEncoder& exact,
                                                      uint8_t* codes) {
  const __m512 reciprocal = avx512_reciprocal(absmax);
  int64_t k = 0;
  for (; k + kAvx512CodeGroup <= count; k += kAvx512CodeGroup)
    avx512_encode_code_group<kSigned>(values + k, absmax, reciprocal, enc, exact, codes + k);
  for (; k < count; k += kAvx512Lanes) {
    const __mmask16 lanes = avx512_lanes(count - k);
    NearTerms near;
    const __m512i fixed = avx512_encode_magnitude<kSigned>(
        _mm512_mul_ps(avx512_load<FloatType::kFloat32>(values, k, lanes), reciprocal), enc, &near);
    avx512_store_fixed_codes(codes + k, lanes, fixed);
    const uint16_t near_lanes = avx512_near_lanes(avx512_near_distance(near)) & lanes;
    if (__builtin_expect(near_lanes != 0, 0))
      encode_near_lanes(values + k, absmax, &near_lanes, 1, exact, codes + k);
  }
}

// values[i] / absmax into codes, the near lanes recorded and fixed after the loop (about 1
// vector in 100 has one) so that the loop has no branch.
LP_TARGET_AVX512_VBMI void encode_avx512(const float* values, int64_t count, float absmax,
                                         const StateEncoder& state_encoder, uint8_t* codes) {
  const SegmentedEncoder& enc = state_encoder.segmented;
  if (!segmented_encoding_applies(absmax, enc)) {
    encode_segmented_scalar(values, count, absmax, enc, codes);
    return;
  }
  if (magnitude_encoding_applies(absmax, state_encoder)) {
    avx512_encode_block<true>(values, count, absmax,
                              avx512_magnitude_encoder(state_encoder.magnitude), enc, codes);
    return;
  }
  uint16_t near_lanes[kAvx512MaxVectorsPerBlock];
  const int64_t vectors = (count + kAvx512Lanes - 1) / kAvx512Lanes;
  const Avx512Encoder registers = avx512_encoder(enc);
  const __m512 divisor = _mm512_set1_ps(absmax);
  unsigned any_near = 0;
  for (int64_t j = 0; j < vectors; ++j) {
    const __mmask16 lanes = avx512_lanes(count - j * kAvx512Lanes);
    const __m512 x = avx512_load<FloatType::kFloat32>(values, j * kAvx512Lanes, lanes);
    __mmask16 near;
    const __m512i code = avx512_encode(_mm512_div_ps(x, divisor), registers, &near);
    near_lanes[j] = near & lanes;
    any_near |= near_lanes[j];
    avx512_store_codes(codes + j * kAvx512Lanes, lanes, code);
  }
  if (__builtin_expect(any_near != 0, 0)) {
    encode_near_lanes(values, absmax, near_lanes, vectors, enc, codes);
  }
}

// The step's scalars, broadcast once per call.
struct Avx512StepConstants {
  __m512 gnorm_scale;
  __m512 weight_decay;
  __m512 beta1;
  __m512 one_minus_beta1;
  __m512 beta2;
  __m512 one_minus_beta2;
  __m512 decay;
  __m512 step_size;
  __m512 inv_sqrt_bc2;
  __m512 eps;
};

LP_TARGET_AVX512_VBMI inline Avx512StepConstants avx512_step_constants(const AdamCoefficients& c) {
  return {_mm512_set1_ps(c.gnorm_scale),  _mm512_set1_ps(c.weight_decay),
          _mm512_set1_ps(c.beta1),        _mm512_set1_ps(c.one_minus_beta1),
          _mm512_set1_ps(c.beta2),        _mm512_set1_ps(c.one_minus_beta2),
          _mm512_set1_ps(c.decay),        _mm512_set1_ps(c.step_size),
          _mm512_set1_ps(c.inv_sqrt_bc2), _mm512_set1_ps(c.eps)};
}

// lowprec::adam_update on 16 lanes: m and v (decoded) in, updated in place; returns the new p.
// Multiplying by a gnorm_scale of 1 is exact, so callers may pass kScaleGradient = false then.
template <bool kAddWeightDecay, bool kScaleGradient>
LP_TARGET_AVX512_VBMI inline __m512 avx512_adam_update(__m512 p, __m512 g, __m512* m, __m512* v,
                                                       const Avx512StepConstants& c) {
  if constexpr (kScaleGradient) g = _mm512_mul_ps(g, c.gnorm_scale);
  if constexpr (kAddWeightDecay) g = _mm512_add_ps(g, _mm512_mul_ps(c.weight_decay, p));
  *m = _mm512_add_ps(_mm512_mul_ps(c.beta1, *m), _mm512_mul_ps(c.one_minus_beta1, g));
  *v = _mm512_add_ps(_mm512_mul_ps(c.beta2, *v),
                     _mm512_mul_ps(_mm512_mul_ps(c.one_minus_beta2, g), g));
  const __m512 denominator =
      _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(*v), c.inv_sqrt_bc2), c.eps);
  return _mm512_sub_ps(_mm512_mul_ps(p, c.decay),
                       _mm512_mul_ps(c.step_size, _mm512_div_ps(*m, denominator)));
}

// Pass 1 on one vector of a block (element i of the tensor, k of the block): m and v decoded
// (qmap entries) in, p updated and stored, the new m and v stored at new_m + k / new_v + k and
// folded into the running absmax bits. kFull: all 16 lanes (no masks).
template <FloatType T, bool kAddWeightDecay, bool kScaleGradient, bool kFull>
LP_TARGET_AVX512_VBMI inline void avx512_update_vector(const Adam8bitTensor& t,
                                                       const Avx512StepConstants& c, int64_t i,
                                                       __mmask16 lanes, __m512 m_entry,
                                                       __m512 v_entry, __m512 old_scale1,
                                                       __m512 old_scale2, float* new_m,
                                                       float* new_v, __m512i* max1, __m512i* max2) {
  if constexpr (kFull) lanes = 0xFFFF;
  __m512 m = _mm512_mul_ps(m_entry, old_scale1);
  __m512 v = _mm512_mul_ps(v_entry, old_scale2);
  avx512_store<T>(t.p, i, lanes,
                  avx512_adam_update<kAddWeightDecay, kScaleGradient>(
                      avx512_load<T>(t.p, i, lanes), avx512_load<T>(t.g, i, lanes), &m, &v, c));
  _mm512_store_ps(new_m, m);
  _mm512_store_ps(new_v, v);
  const __m512i m_bits = _mm512_and_si512(_mm512_castps_si512(m), _mm512_set1_epi32(0x7FFFFFFF));
  // v is >= +0 unless the caller's second-moment map or scales are negative: its bits as they
  // are, whose maximum has the sign bit set exactly when some v is -0 or below (the caller then
  // takes the magnitudes again, see v_absmax_from_raw_max).
  const __m512i v_bits = _mm512_castps_si512(v);
  if constexpr (kFull) {
    *max1 = _mm512_max_epu32(*max1, m_bits);
    *max2 = _mm512_max_epu32(*max2, v_bits);
  } else {  // masked-off lanes hold the decoded code 0, not a state
    *max1 = _mm512_mask_max_epu32(*max1, lanes, *max1, m_bits);
    *max2 = _mm512_mask_max_epu32(*max2, lanes, *max2, v_bits);
  }
}

// How far ahead of the code group being updated the AVX-512 update prefetches its four streams
// (p, g and both codes) into L1. The hardware prefetchers alone left the update of a 16.7M fp32
// tensor ~20% slower than its arithmetic on a Zen 5 core (34 against 28 cycles per 16 elements);
// there 2048 elements ahead did best (1024 and 4096 as well, prefetcht1 no better, 2 MB pages
// changed nothing). On an Intel core (Emerald Rapids) 256 did best: the 16.7M fp32 step against
// torch's fused AdamW, builds alternated four to five times, with the tensor rotated over 3
// copies (benchmarks/adam_rotated_ab.py: data from memory) at 256 / 512 / 1024 / 2048 elements
// ahead: 0.93-0.96x / 0.91-0.96x / 0.90-0.93x / 0.88-0.90x (128: 0.92-0.93x); with one copy
// (adam_memory_modes.py: data partly cached) 256 / 2048: 0.98-1.01x / 0.94-0.98x. The bench's
// own 16.7M fp32 row moved less (0.89-0.91x -> 0.90-0.91x). Not prefetching the gradient (the
// finiteness pass has just read it) or prefetching it into L2 only was no better (numbers in
// cpu-adam.md).
constexpr int64_t kUpdatePrefetchElements = 256;

// The cache lines of [data, data + bytes) into L1; the lines may lie past the tensor's end.
inline void prefetch_lines(const void* data, int64_t bytes) {
  for (int64_t offset = 0; offset < bytes; offset += simd::kCacheLineBytes)
    simd::prefetch_l1(static_cast<const char*>(data) + offset);
}

// Pass 1 on the code group at element k of a block of `count` elements starting at `begin`.
template <FloatType T, bool kAddWeightDecay, bool kScaleGradient>
LP_TARGET_AVX512_VBMI inline void avx512_update_code_group(
    const Adam8bitTensor& t, const Avx512StepConstants& c, const Adam8bitTables& tables,
    int64_t begin, int64_t k, int64_t count, __m512 old_scale1, __m512 old_scale2, float* new_m,
    float* new_v, __m512i* max1, __m512i* max2) {
  const int64_t remaining = count - k;
  {
    constexpr int64_t kElementBytes = T == FloatType::kFloat32 ? 4 : 2;
    const int64_t ahead = begin + k + kUpdatePrefetchElements;
    prefetch_lines(static_cast<const char*>(t.p) + ahead * kElementBytes,
                   kAvx512CodeGroup * kElementBytes);
    prefetch_lines(static_cast<const char*>(t.g) + ahead * kElementBytes,
                   kAvx512CodeGroup * kElementBytes);
    prefetch_lines(t.state1 + ahead, kAvx512CodeGroup);
    prefetch_lines(t.state2 + ahead, kAvx512CodeGroup);
  }
  const __mmask64 code_lanes = avx512_code_lanes(remaining);
  __m512 m_table[kVectorsPerCodeGroup];
  __m512 v_table[kVectorsPerCodeGroup];
  // v first: its square root and the division after it wait on the divider, the longest chain
  // of the update; decoding m while it runs took 3 cycles per 16 elements off an Intel (Emerald
  // Rapids) core, 52.3 -> 49.3.
  avx512_byte_plane_lookup(avx512_load_codes(t.state2 + begin + k, code_lanes), tables.byte_planes2,
                           v_table);
  const __m512i m_codes = avx512_load_codes(t.state1 + begin + k, code_lanes);
  if (tables.mirrored_planes1.usable)
    avx512_mirrored_byte_plane_lookup(m_codes, tables.mirrored_planes1, m_table);
  else
    avx512_byte_plane_lookup(m_codes, tables.byte_planes1, m_table);
  if (remaining >= kAvx512CodeGroup) {
    for (int j = 0; j < kVectorsPerCodeGroup; ++j) {
      const int64_t kj = k + j * kAvx512Lanes;
      avx512_update_vector<T, kAddWeightDecay, kScaleGradient, true>(
          t, c, begin + kj, 0xFFFF, m_table[j], v_table[j], old_scale1, old_scale2, new_m + kj,
          new_v + kj, max1, max2);
    }
    return;
  }
  for (int j = 0; j * kAvx512Lanes < remaining; ++j) {
    const int64_t kj = k + j * kAvx512Lanes;
    avx512_update_vector<T, kAddWeightDecay, kScaleGradient, false>(
        t, c, begin + kj, avx512_lanes(remaining - j * kAvx512Lanes), m_table[j], v_table[j],
        old_scale1, old_scale2, new_m + kj, new_v + kj, max1, max2);
  }
}

// A block whose pass 1 is done and whose new m and v wait for pass 2 (encoding), which runs
// interleaved with the next block's pass 1.
struct PendingBlock {
  int64_t begin = 0;
  int64_t count = 0;  // 0: nothing pending
  float absmax1 = 0.0f;
  float absmax2 = 0.0f;
  const float* new_m = nullptr;
  const float* new_v = nullptr;
  // Pass 2 runs beside the next block's pass 1: the block is whole, both states take the
  // magnitude encoder and no new v is negative (v takes its unsigned form). Else it runs after
  // the next block's pass 1, by encode_avx512.
  bool interleaved = false;
};

// Pass 2 of the pending block's code group at element k, by the magnitude encoder.
LP_TARGET_AVX512_VBMI inline void avx512_encode_pending_group(
    const Adam8bitTensor& t, const StateEncoder& encoder1, const StateEncoder& encoder2,
    const Avx512MagnitudeEncoder& enc1, const Avx512MagnitudeEncoder& enc2,
    const __m512& reciprocal1, const __m512& reciprocal2, int64_t k, const PendingBlock& pending) {
  const int64_t i = pending.begin + k;
  avx512_encode_code_group<true>(pending.new_m + k, pending.absmax1, reciprocal1, enc1,
                                 encoder1.segmented, t.state1 + i);
  avx512_encode_code_group<false>(pending.new_v + k, pending.absmax2, reciprocal2, enc2,
                                  encoder2.segmented, t.state2 + i);
}

// Per block, two passes over at most 4096 elements:
//   1. decode m and v (64 codes at a time), update m, v and p, take the absmax of m and v;
//   2. encode m and v by the new absmax (the magnitude encoder; the segmented one for maps or
//      scales it does not fit).
// Pass 2 needs the block's absmax, so it cannot start before pass 1 ends; and each pass alone
// leaves the core half idle: pass 1 waits on the long chain of each element (decode, square
// root, division), pass 2 is short of nothing but issue slots. So the loop is software-pipelined:
// each code group of block b's pass 1 runs beside the same group of block b - 1's pass 2 (the new
// m and v of two blocks alternate between two buffers). Measured on a Zen 5 core with the data in
// L2: 37-39 cycles per 16 elements with the passes in sequence, 35-36 pipelined (the 16-entry
// tables and the vector near test took it to 32-33).
template <FloatType T, bool kAddWeightDecay, bool kScaleGradient>
LP_TARGET_AVX512_VBMI void update_blocks_avx512_pipelined(const Adam8bitTensor& tensor,
                                                          const AdamCoefficients& c,
                                                          int64_t first_block, int64_t end_block,
                                                          int64_t blocksize,
                                                          const Adam8bitTables& tables) {
  // A local copy: the caller's could alias the stored floats, which would make the compiler
  // reload every pointer after every store.
  const Adam8bitTensor t = tensor;
  alignas(64) float new_m[2][kBlocksizeMax8bit];
  alignas(64) float new_v[2][kBlocksizeMax8bit];
  const Avx512StepConstants constants = avx512_step_constants(c);
  const StateEncoder& encoder1 = tables.encoder1;
  const StateEncoder& encoder2 = tables.encoder2;
  const Avx512MagnitudeEncoder registers1 = avx512_magnitude_encoder(encoder1.magnitude);
  const Avx512MagnitudeEncoder registers2 = avx512_magnitude_encoder(encoder2.magnitude);
  PendingBlock pending;
  __m512 reciprocal1 = _mm512_setzero_ps();
  __m512 reciprocal2 = _mm512_setzero_ps();

  // Finishes the pending block's pass 2: an interleaved one (whole, so full groups) from code
  // group `from` on, any other one all of it.
  const auto complete_pending = [&](int64_t from) {
    if (pending.count == 0) return;
    if (pending.interleaved) {
      for (int64_t k = from; k < pending.count; k += kAvx512CodeGroup)
        avx512_encode_pending_group(t, encoder1, encoder2, registers1, registers2, reciprocal1,
                                    reciprocal2, k, pending);
    } else {
      encode_avx512(pending.new_m, pending.count, pending.absmax1, encoder1,
                    t.state1 + pending.begin);
      encode_avx512(pending.new_v, pending.count, pending.absmax2, encoder2,
                    t.state2 + pending.begin);
    }
    pending.count = 0;
  };

  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t count = std::min(blocksize, t.n - begin);
    float* block_m = new_m[block & 1];
    float* block_v = new_v[block & 1];
    const __m512 old_scale1 = _mm512_set1_ps(t.absmax1[block]);
    const __m512 old_scale2 = _mm512_set1_ps(t.absmax2[block]);
    __m512i max1 = _mm512_setzero_si512();
    __m512i max2 = _mm512_setzero_si512();
    // An interleaved pending block is whole (PendingBlock::interleaved), so at least as long as
    // this one, and its groups are full.
    const bool interleave = pending.count != 0 && pending.interleaved;
    int64_t k = 0;
    for (; k < count; k += kAvx512CodeGroup) {
      avx512_update_code_group<T, kAddWeightDecay, kScaleGradient>(t, constants, tables, begin, k,
                                                                   count, old_scale1, old_scale2,
                                                                   block_m, block_v, &max1, &max2);
      if (interleave) {
        avx512_encode_pending_group(t, encoder1, encoder2, registers1, registers2, reciprocal1,
                                    reciprocal2, k, pending);
      }
    }
    complete_pending(k);

    const float absmax1 = absmax_from_magnitude_bits(_mm512_reduce_max_epu32(max1));
    const uint32_t v_max_raw_bits = _mm512_reduce_max_epu32(max2);
    const float absmax2 = v_absmax_from_raw_max(v_max_raw_bits, block_v, count);
    t.absmax1[block] = absmax1;
    t.absmax2[block] = absmax2;
    pending.begin = begin;
    pending.count = count;
    pending.absmax1 = absmax1;
    pending.absmax2 = absmax2;
    pending.new_m = block_m;
    pending.new_v = block_v;
    pending.interleaved = count == blocksize && !(v_max_raw_bits >> 31) &&
                          magnitude_encoding_applies(absmax1, encoder1) &&
                          magnitude_encoding_applies(absmax2, encoder2);
    if (pending.interleaved) {
      reciprocal1 = avx512_reciprocal(absmax1);
      reciprocal2 = avx512_reciprocal(absmax2);
    }
  }
  complete_pending(0);
}

template <FloatType T, bool kAddWeightDecay>
LP_TARGET_AVX512_VBMI void update_blocks_avx512(const Adam8bitTensor& t, const AdamCoefficients& c,
                                                int64_t first_block, int64_t end_block,
                                                int64_t blocksize, const Adam8bitTables& tables) {
  if (c.gnorm_scale != 1.0f) {
    update_blocks_avx512_pipelined<T, kAddWeightDecay, true>(t, c, first_block, end_block,
                                                             blocksize, tables);
  } else {
    update_blocks_avx512_pipelined<T, kAddWeightDecay, false>(t, c, first_block, end_block,
                                                              blocksize, tables);
  }
}

template <FloatType T, bool kAddWeightDecay>
LP_TARGET_AVX512_VBMI void update_float_states_avx512(const AdamTensor& t,
                                                      const AdamCoefficients& c, int64_t begin,
                                                      int64_t end) {
  const Avx512StepConstants constants = avx512_step_constants(c);
  for (int64_t i = begin; i < end; i += kAvx512Lanes) {
    const __mmask16 lanes = avx512_lanes(end - i);
    __m512 m = avx512_load<FloatType::kFloat32>(t.m, i, lanes);
    __m512 v = avx512_load<FloatType::kFloat32>(t.v, i, lanes);
    avx512_store<T>(
        t.p, i, lanes,
        avx512_adam_update<kAddWeightDecay, true>(
            avx512_load<T>(t.p, i, lanes), avx512_load<T>(t.g, i, lanes), &m, &v, constants));
    avx512_store<FloatType::kFloat32>(t.m, i, lanes, m);
    avx512_store<FloatType::kFloat32>(t.v, i, lanes, v);
  }
}

// Exponent bits of each element (16 floats or 32 halves per register), masked.
template <FloatType T>
LP_TARGET_AVX512_VBMI inline __m512i avx512_exponent_bits(const char* data) {
  if constexpr (T == FloatType::kFloat32) {
    return _mm512_and_si512(_mm512_loadu_si512(data), _mm512_set1_epi32(non_finite_exponent<T>()));
  } else {
    return _mm512_and_si512(_mm512_loadu_si512(data),
                            _mm512_set1_epi16(static_cast<int16_t>(non_finite_exponent<T>())));
  }
}

template <FloatType T>
LP_TARGET_AVX512_VBMI inline __m512i avx512_max_bits(__m512i a, __m512i b) {
  if constexpr (T == FloatType::kFloat32) {
    return _mm512_max_epu32(a, b);
  } else {
    return _mm512_max_epu16(a, b);
  }
}

template <FloatType T>
LP_TARGET_AVX512_VBMI bool all_finite_avx512(const void* g, int64_t begin, int64_t end) {
  constexpr int64_t kElementBytes = T == FloatType::kFloat32 ? 4 : 2;
  constexpr int64_t kPerVector = 64 / kElementBytes;
  constexpr int64_t kPerStep = kPerVector * kFiniteAccumulators;
  const char* base = static_cast<const char*>(g);
  __m512i largest[kFiniteAccumulators];
  for (__m512i& l : largest)
    l = _mm512_setzero_si512();
  int64_t i = begin;
  for (; i + kPerStep <= end; i += kPerStep) {
    // The line may lie past the gradient's end (a prefetch never faults).
    simd::prefetch_l1(base + i * kElementBytes + kFinitePrefetchBytes);
    for (int a = 0; a < kFiniteAccumulators; ++a) {
      largest[a] = avx512_max_bits<T>(
          largest[a], avx512_exponent_bits<T>(base + (i + a * kPerVector) * kElementBytes));
    }
  }
  for (int a = 1; a < kFiniteAccumulators; ++a)
    largest[0] = avx512_max_bits<T>(largest[0], largest[a]);
  bool finite;
  if constexpr (T == FloatType::kFloat32) {
    finite = _mm512_cmpeq_epi32_mask(largest[0], _mm512_set1_epi32(non_finite_exponent<T>())) == 0;
  } else {
    finite =
        _mm512_cmpeq_epi16_mask(
            largest[0], _mm512_set1_epi16(static_cast<int16_t>(non_finite_exponent<T>()))) == 0;
  }
  return finite && all_finite_scalar<T>(g, i, end);
}

#endif  // LOWPREC_X86_SIMD

// ----------------------------------------------------------------------------- dispatch

using UpdateBlocksFn = void (*)(const Adam8bitTensor& t, const AdamCoefficients& c,
                                int64_t first_block, int64_t end_block, int64_t blocksize,
                                const Adam8bitTables& tables);
using AllFiniteFn = bool (*)(const void* g, int64_t begin, int64_t end);
using EncodeFn = void (*)(const float* values, int64_t count, float absmax, const StateEncoder& enc,
                          uint8_t* codes);

// The path the active ISA setting selects: AVX-512 needs VBMI as well; else AVX2.
enum class Adam8bitPath { kScalar, kAvx2, kAvx512 };

Adam8bitPath active_path() {
#if LOWPREC_X86_SIMD
  const CpuIsa isa = active_cpu_isa();
  if (isa == CpuIsa::kAvx512 && cpu_has_avx512_vbmi()) return Adam8bitPath::kAvx512;
  if (isa == CpuIsa::kAvx512 || isa == CpuIsa::kAvx2) return Adam8bitPath::kAvx2;
#endif
  return Adam8bitPath::kScalar;
}

template <FloatType T, bool kAddWeightDecay>
UpdateBlocksFn update_blocks_for(Adam8bitPath path) {
  return LP_PER_ISA(path, (&update_blocks_avx512<T, kAddWeightDecay>),
                    (&update_blocks_avx2<T, kAddWeightDecay>),
                    (&update_blocks_scalar<T, kAddWeightDecay>));
}

template <FloatType T>
UpdateBlocksFn update_blocks_for(Adam8bitPath path, bool add_weight_decay) {
  return add_weight_decay ? update_blocks_for<T, true>(path) : update_blocks_for<T, false>(path);
}

UpdateBlocksFn update_blocks_for(Adam8bitPath path, FloatType type, bool add_weight_decay) {
  return simd::with_float_type(
      type, [&]<FloatType T>() { return update_blocks_for<T>(path, add_weight_decay); });
}

using UpdateFloatStatesFn = void (*)(const AdamTensor& t, const AdamCoefficients& c, int64_t begin,
                                     int64_t end);

template <FloatType T, bool kAddWeightDecay>
UpdateFloatStatesFn update_float_states_for(Adam8bitPath path) {
  return LP_PER_ISA(path, (&update_float_states_avx512<T, kAddWeightDecay>),
                    (&update_float_states_avx2<T, kAddWeightDecay>),
                    (&update_float_states_scalar<T, kAddWeightDecay>));
}

UpdateFloatStatesFn update_float_states_for(Adam8bitPath path, FloatType type,
                                            bool add_weight_decay) {
  return simd::with_float_type(type, [&]<FloatType T>() {
    return add_weight_decay ? update_float_states_for<T, true>(path)
                            : update_float_states_for<T, false>(path);
  });
}

template <FloatType T>
AllFiniteFn all_finite_for(Adam8bitPath path) {
  return LP_PER_ISA(path, &all_finite_avx512<T>, &all_finite_avx2<T>, &all_finite_scalar<T>);
}

AllFiniteFn all_finite_for(Adam8bitPath path, FloatType type) {
  return simd::with_float_type(type, [&]<FloatType T>() { return all_finite_for<T>(path); });
}

EncodeFn encode_for(Adam8bitPath path) {
  return LP_PER_ISA(path, &encode_avx512, &encode_avx2<true>, &encode_scalar);
}

int64_t element_bytes(FloatType type) {
  return type == FloatType::kFloat32 ? 4 : 2;
}

int64_t num_blocks(int64_t n, int64_t blocksize) {
  return (n + blocksize - 1) / blocksize;
}

// Index of the range holding `item`, given the ranges' starts (ascending, starts[0] == 0).
int64_t range_of(const std::vector<int64_t>& starts, int64_t item) {
  return std::upper_bound(starts.begin(), starts.end(), item) - starts.begin() - 1;
}

// The end of the batch of tensors from `first` on: at least one tensor, and as many more as keep
// the batch's gradients within kCheckBatchBytes.
template <typename Tensor>
int64_t check_batch_end(const Tensor* tensors, int64_t first, int64_t count) {
  int64_t end = first;
  int64_t bytes = 0;
  do {
    bytes += tensors[end].n * element_bytes(tensors[end].type);
    ++end;
  } while (end < count &&
           bytes + tensors[end].n * element_bytes(tensors[end].type) <= kCheckBatchBytes);
  return end;
}

// Steps the call's tensors, in batches (check_batch_end): for each batch the finiteness of all
// its gradients, then the update of the finite ones; then the step / skip counters. The update
// goes by units of `unit` elements (the quantization blocks of 8-bit states):
// update(t, c, first, end) steps units [first, end) of t.
//
// All batches run in one parallel region (on a shared machine each region can wait a scheduler
// time slice for a core another process holds, and each costs a wake-up of the pool). Workers
// take the batches in order: they claim check chunks, wait until every chunk of the batch is
// checked (only for chunks that other running workers hold: a worker that starts late finds
// nothing left, so this cannot deadlock even when the pool runs workers one at a time), then
// claim update tasks, skipping the blocks of flagged tensors. A worker that runs out of update
// tasks goes on to check the next batch while the others finish theirs.
template <typename Tensor, typename Update>
void step_tensors(const Tensor* tensors, int64_t count, const AdamHyper& hyper, int64_t unit,
                  Adam8bitPath path, const Update& update) {
  int64_t elements = 0;
  for (int64_t k = 0; k < count; ++k)
    elements += tensors[k].n;
  const int64_t workers =
      std::clamp<int64_t>(elements / kMinElementsPerWorker, 1, max_parallel_workers());
  // Per batch: its first tensor (batch_starts[b] .. batch_starts[b + 1]) and claim counters.
  std::vector<int64_t> batch_starts{0};
  while (batch_starts.back() < count)
    batch_starts.push_back(check_batch_end(tensors, batch_starts.back(), count));
  const int64_t batches = static_cast<int64_t>(batch_starts.size()) - 1;
  // Per tensor: its check chunks' length (its batch's) and first index in the call, its first
  // unit in the call, its coefficients.
  std::vector<int64_t> chunk_elements(count);
  std::vector<int64_t> chunk_starts(count + 1);
  std::vector<int64_t> block_starts(count + 1);
  std::vector<AdamCoefficients> coefficients(count);
  std::vector<double> new_steps(count);
  for (int64_t b = 0; b < batches; ++b) {
    int64_t batch_elements = 0;
    for (int64_t k = batch_starts[b]; k < batch_starts[b + 1]; ++k)
      batch_elements += tensors[k].n;
    const int64_t chunk = std::clamp(batch_elements / (workers * kCheckChunksPerWorker) /
                                         kMinCheckChunkElements * kMinCheckChunkElements,
                                     kMinCheckChunkElements, kMaxCheckChunkElements);
    for (int64_t k = batch_starts[b]; k < batch_starts[b + 1]; ++k)
      chunk_elements[k] = chunk;
  }
  for (int64_t k = 0; k < count; ++k) {
    const Tensor& t = tensors[k];
    chunk_starts[k + 1] = chunk_starts[k] + num_blocks(t.n, chunk_elements[k]);
    block_starts[k + 1] = block_starts[k] + num_blocks(t.n, unit);
    // t = int(step) + 1, as the reference reads it.
    new_steps[k] = trunc(static_cast<double>(*t.step)) + 1.0;
    coefficients[k] =
        adam_coefficients(hyper.lr, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay,
                          hyper.decoupled, hyper.gnorm_scale, new_steps[k]);
  }
  const int64_t blocks_per_task = std::max<int64_t>(1, kElementsPerUpdateTask / unit);
  std::unique_ptr<std::atomic<int64_t>[]> next_chunk(new std::atomic<int64_t>[batches]);
  std::unique_ptr<std::atomic<int64_t>[]> chunks_done(new std::atomic<int64_t>[batches]);
  std::unique_ptr<std::atomic<int64_t>[]> next_task(new std::atomic<int64_t>[batches]);
  for (int64_t b = 0; b < batches; ++b) {
    next_chunk[b].store(0, std::memory_order_relaxed);
    chunks_done[b].store(0, std::memory_order_relaxed);
    next_task[b].store(0, std::memory_order_relaxed);
  }
  std::unique_ptr<std::atomic<bool>[]> non_finite(new std::atomic<bool>[count]);
  for (int64_t k = 0; k < count; ++k)
    non_finite[k].store(false, std::memory_order_relaxed);

  auto work = [&]() {
    for (int64_t b = 0; b < batches; ++b) {
      const int64_t first_chunk = chunk_starts[batch_starts[b]];
      const int64_t chunks = chunk_starts[batch_starts[b + 1]] - first_chunk;
      for (int64_t claimed;
           (claimed = next_chunk[b].fetch_add(1, std::memory_order_relaxed)) < chunks;) {
        const int64_t chunk = first_chunk + claimed;
        const int64_t k = range_of(chunk_starts, chunk);
        const Tensor& t = tensors[k];
        const int64_t begin = (chunk - chunk_starts[k]) * chunk_elements[k];
        const int64_t stop = std::min(t.n, begin + chunk_elements[k]);
        if (!non_finite[k].load(std::memory_order_relaxed) &&
            !all_finite_for(path, t.type)(t.g, begin, stop)) {
          non_finite[k].store(true, std::memory_order_relaxed);
        }
        chunks_done[b].fetch_add(1, std::memory_order_release);
      }
      while (chunks_done[b].load(std::memory_order_acquire) < chunks)
        std::this_thread::yield();
      const int64_t first_block = block_starts[batch_starts[b]];
      const int64_t end_block = block_starts[batch_starts[b + 1]];
      const int64_t tasks = num_blocks(end_block - first_block, blocks_per_task);
      for (int64_t task; (task = next_task[b].fetch_add(1, std::memory_order_relaxed)) < tasks;) {
        const int64_t task_end = std::min(end_block, first_block + (task + 1) * blocks_per_task);
        for (int64_t block = first_block + task * blocks_per_task; block < task_end;) {
          const int64_t k = range_of(block_starts, block);
          const int64_t stop = std::min(task_end, block_starts[k + 1]);
          if (!non_finite[k].load(std::memory_order_relaxed)) {
            update(tensors[k], coefficients[k], block - block_starts[k], stop - block_starts[k]);
          }
          block = stop;
        }
      }
    }
  };
  parallel_for(0, workers, 1, [&](int64_t worker_begin, int64_t worker_end) {
    for (int64_t worker = worker_begin; worker < worker_end; ++worker)
      work();
  });

  for (int64_t k = 0; k < count; ++k) {
    const Tensor& t = tensors[k];
    if (non_finite[k].load(std::memory_order_relaxed)) {
      *t.skipped = *t.skipped + 1.0f;
    } else {
      *t.step = static_cast<float>(new_steps[k]);
    }
  }
}

}  // namespace

namespace {

// The tables of the maps of the last call on this thread: building them (the encoders' fits and
// proofs) costs about as much as stepping 100k parameters, and the maps seldom change.
const Adam8bitTables& tables_for(const float* qmap1, const float* qmap2) {
  thread_local std::unique_ptr<Adam8bitTables> cached;
  if (!cached || std::memcmp(cached->qmap1, qmap1, sizeof(cached->qmap1)) != 0 ||
      std::memcmp(cached->qmap2, qmap2, sizeof(cached->qmap2)) != 0) {
    auto tables = std::make_unique<Adam8bitTables>();
    build_tables(qmap1, qmap2, tables.get());
    cached = std::move(tables);
  }
  return *cached;
}

}  // namespace

void adam8bit_multi_step(const Adam8bitTensor* tensors, int64_t count, const float* qmap1,
                         const float* qmap2, const Adam8bitHyper& hyper) {
  const Adam8bitTables& tables = tables_for(qmap1, qmap2);
  const Adam8bitPath path = active_path();
  step_tensors(tensors, count, hyper, hyper.blocksize, path,
               [&](const Adam8bitTensor& t, const AdamCoefficients& c, int64_t first_block,
                   int64_t end_block) {
                 update_blocks_for(path, t.type, c.add_weight_decay)(t, c, first_block, end_block,
                                                                     hyper.blocksize, tables);
               });
}

void adam_multi_step(const AdamTensor* tensors, int64_t count, const AdamHyper& hyper) {
  const Adam8bitPath path = active_path();
  step_tensors(
      tensors, count, hyper, kFloatStateUnit, path,
      [&](const AdamTensor& t, const AdamCoefficients& c, int64_t first_unit, int64_t end_unit) {
        update_float_states_for(path, t.type, c.add_weight_decay)(
            t, c, first_unit * kFloatStateUnit, std::min(t.n, end_unit * kFloatStateUnit));
      });
}

namespace {

// values / absmax encoded, in chunks of at most a block (the encoders' limit).
void encode_values(EncodeFn encode, const float* values, int64_t n, float absmax,
                   const StateEncoder& enc, uint8_t* codes) {
  for (int64_t begin = 0; begin < n; begin += kBlocksizeMax8bit) {
    encode(values + begin, std::min<int64_t>(kBlocksizeMax8bit, n - begin), absmax, enc,
           codes + begin);
  }
}

}  // namespace

void adam8bit_encode(const float* values, int64_t n, const float* code, uint8_t* codes) {
  auto enc = std::make_unique<StateEncoder>();
  build_state_encoder(code, enc.get());
  encode_values(encode_for(active_path()), values, n, 1.0f, *enc, codes);
}

bool adam8bit_segmented_encoder_usable(const float* code) {
  auto enc = std::make_unique<StateEncoder>();
  build_state_encoder(code, enc.get());
  return enc->segmented.usable && enc->magnitude.usable;
}

namespace {

// A monotone integer image of the floats (-0 just below +0), so that the sweep can walk the
// floats of [-1, 1] in increasing order.
int64_t float_ordinal(float x) {
  const uint32_t bits = float_to_bits(x);
  return bits >> 31 ? -static_cast<int64_t>(bits & 0x7FFFFFFFu) - 1 : static_cast<int64_t>(bits);
}

float ordinal_float(int64_t ordinal) {
  return ordinal >= 0 ? bits_to_float(static_cast<uint32_t>(ordinal))
                      : bits_to_float(static_cast<uint32_t>(-ordinal - 1) | 0x80000000u);
}

// Values encoded per batch in the sweep.
constexpr int64_t kSweepBatch = 4096;

}  // namespace

EncoderSweep adam8bit_encoder_sweep(const float* code, int64_t stride, int64_t neighbours,
                                    float absmax) {
  auto enc = std::make_unique<StateEncoder>();
  build_state_encoder(code, enc.get());
  const EncodeFn encode = encode_for(active_path());
  const int64_t lowest = float_ordinal(-1.0f);
  const int64_t highest = float_ordinal(1.0f);
  const int64_t samples = (highest - lowest) / stride + 1;
  const int64_t batches = (samples + kSweepBatch - 1) / kSweepBatch;

  std::atomic<int64_t> mismatches{0};
  std::atomic<uint32_t> first_bad{0};
  // The encoders see x = v * absmax and must give the code of x / absmax (not always v).
  const auto scaled = [&](float v) { return v * absmax; };
  auto record = [&](float v, uint8_t got, uint8_t want) {
    if (got == want) return;
    if (mismatches.fetch_add(1) == 0) first_bad.store(float_to_bits(v));
  };
  parallel_for(0, batches, 1, [&](int64_t batch_begin, int64_t batch_end) {
    float values[kSweepBatch];
    uint8_t codes[kSweepBatch];
    for (int64_t batch = batch_begin; batch < batch_end; ++batch) {
      const int64_t first = batch * kSweepBatch;
      const int64_t size = std::min(kSweepBatch, samples - first);
      for (int64_t s = 0; s < size; ++s)
        values[s] = scaled(ordinal_float(lowest + (first + s) * stride));
      encode_values(encode, values, size, absmax, *enc, codes);
      // The exact code counts the thresholds below x / absmax, which only grows with x, so one
      // pointer walks them.
      int want = encode_8bit(values[0] / absmax, enc->segmented.thresholds);
      for (int64_t s = 0; s < size; ++s) {
        const float v = values[s] / absmax;
        while (want < kCodebookSize8bit - 1 && v > enc->segmented.thresholds[want])
          ++want;
        record(v, codes[s], static_cast<uint8_t>(want));
      }
    }
  });
  int64_t checked = samples;

  // Every threshold in [-1, 1] and its neighbours, and 1.0 itself.
  std::vector<float> near_values;
  for (int i = 0; i < kCodebookSize8bit - 1; ++i) {
    const int64_t center = float_ordinal(enc->segmented.thresholds[i]);
    for (int64_t d = -neighbours; d <= neighbours; ++d) {
      const int64_t ordinal = center + d;
      if (ordinal >= lowest && ordinal <= highest) {
        near_values.push_back(scaled(ordinal_float(ordinal)));
      }
    }
  }
  near_values.push_back(absmax);
  std::vector<uint8_t> near_codes(near_values.size());
  encode_values(encode, near_values.data(), static_cast<int64_t>(near_values.size()), absmax, *enc,
                near_codes.data());
  for (size_t s = 0; s < near_values.size(); ++s) {
    const float v = near_values[s] / absmax;
    record(v, near_codes[s], encode_8bit(v, enc->segmented.thresholds));
  }
  checked += static_cast<int64_t>(near_values.size());
  return {checked, mismatches.load(), first_bad.load()};
}

}  // namespace lowprec::cpu
