// The 8-bit Adam / AdamW step shared by the CPU and CUDA kernels: the per-element update in
// the reference's exact float32 operation order (lowprec_kernels/reference/adam8bit.py), and a
// fast encoder that gives exactly the nearest-code rule of lowprec/blockwise8.h for codebooks
// made of evenly spaced runs, as the dynamic maps are.
#pragma once

#include <math.h>

#include <cstdint>

#include "lowprec/blockwise8.h"
#include "lowprec/common.h"

namespace lowprec {

// ------------------------------------------------------------------------------ the update

// The step's hyperparameters as the ops take them, for the CPU and CUDA launchers alike; built
// by adam_hyper, the one place that names each field (the ops' argument order).
struct AdamHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool decoupled;
  double gnorm_scale;
};

struct Adam8bitHyper : AdamHyper {
  int64_t blocksize;
};

inline AdamHyper adam_hyper(double lr, double beta1, double beta2, double eps, double weight_decay,
                            bool decoupled, double gnorm_scale) {
  AdamHyper hyper;
  hyper.lr = lr;
  hyper.beta1 = beta1;
  hyper.beta2 = beta2;
  hyper.eps = eps;
  hyper.weight_decay = weight_decay;
  hyper.decoupled = decoupled;
  hyper.gnorm_scale = gnorm_scale;
  return hyper;
}

// Every scalar of the update as the reference uses it: computed in float64 and rounded to
// float32 once (torch rounds a Python scalar to the tensor's dtype when it multiplies, adds or
// divides a float32 tensor).
struct AdamCoefficients {
  float gnorm_scale;
  float weight_decay;  // Adam: g += weight_decay * p (only when add_weight_decay)
  float beta1;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float decay;         // AdamW: p *= decay = 1 - lr * weight_decay (1 when not decoupled)
  float step_size;     // lr / (1 - beta1^t)
  float inv_sqrt_bc2;  // 1 / sqrt(1 - beta2^t)
  float eps;
  bool add_weight_decay;  // Adam (not decoupled) with weight_decay != 0
};

// `step` is t, the step count after this step. pow() in double is what Python's `beta ** t`
// computes on the host; CUDA's pow is within 2 ulp of it in double, which changes the rounded
// float32 only when the double lies that close to a float32 rounding boundary. The division
// and the square root of double are IEEE (correctly rounded) on host and device, as in
// reference.update_scalars.
LP_HOST_DEVICE inline AdamCoefficients adam_coefficients(double lr, double beta1, double beta2,
                                                         double eps, double weight_decay,
                                                         bool decoupled, double gnorm_scale,
                                                         double step) {
  AdamCoefficients c;
  c.gnorm_scale = static_cast<float>(gnorm_scale);
  c.weight_decay = static_cast<float>(weight_decay);
  c.beta1 = static_cast<float>(beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  // Multiplying by 1 is exact, so the AdamW decay is applied unconditionally.
  c.decay = decoupled && weight_decay != 0.0 ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  c.step_size = static_cast<float>(lr / (1.0 - pow(beta1, step)));
  c.inv_sqrt_bc2 = static_cast<float>(1.0 / sqrt(1.0 - pow(beta2, step)));
  c.eps = static_cast<float>(eps);
  c.add_weight_decay = !decoupled && weight_decay != 0.0;
  return c;
}

// IEEE square root, correctly rounded on host and device.
LP_HOST_DEVICE inline float ieee_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return sqrtf(x);
#endif
}

// One element of the step, in float32, in the reference's order. m and v come in decoded and
// leave unquantized. `g * gnorm_scale` is kept even for a scale of 1: the gradient is finite
// (non-finite ones skip the step), so that product is exact. v takes (1 - beta2) * g before the
// second g, as torch's addcmul_ does, so that it overflows only where torch's would.
LP_HOST_DEVICE inline void adam_update(float* p, float g, float* m, float* v,
                                       const AdamCoefficients& c) {
  g = g * c.gnorm_scale;
  if (c.add_weight_decay) g = g + c.weight_decay * *p;
  *m = c.beta1 * *m + c.one_minus_beta1 * g;
  *v = c.beta2 * *v + c.one_minus_beta2 * g * g;
  const float decayed = *p * c.decay;
  const float denom = ieee_sqrt(*v) * c.inv_sqrt_bc2 + c.eps;
  *p = decayed - c.step_size * (*m / denom);
}

// ------------------------------------------------------------------- the segmented encoder
//
// The exact nearest-code rule is a count of the thresholds below v (a binary search: 8
// dependent steps). The dynamic maps are runs of evenly spaced entries (one run per decade and
// sign), so most of that search can be arithmetic:
//
//   1. key: the sign of v and its binary exponent, in pairs of binades. The runs are decades
//      (3.3 binades each), so each key holds at most one threshold between two runs
//      ("boundary"), and one comparison with it gives the run (the segment) of v.
//   2. position: an affine map P(v) = v * scale + offset under which the thresholds inside the
//      segment sit just below the integers first + 1, ..., last (first and last: the codes of
//      the run's ends), so that trunc(P) is the code, clamped to [first, last].
//   3. exactness: the map is fitted, not exact (the entries are rounded floats) and P is
//      rounded. The code is accepted only if P and P + 2 * kSegmentNearMargin truncate alike,
//      i.e. no integer lies within the margin; the proof (segment_model_is_exact) shows that
//      the code is then the exact one. The few values near a threshold take the exact search.
//
// build_segmented_encoder() derives the segments from the codebook and checks every condition
// the proof needs; for a codebook that does not fit (not sorted, too many runs, two boundaries
// under one key, a poor fit) it reports `usable = false` and callers use the binary search.

// Keys cover pairs of binades [2^(e), 2^(e+2)) for exponent fields 96..127 (|v| >= 2^-31);
// smaller magnitudes share the lowest key. Values beyond 1 in magnitude are outside the domain.
// Sizes are chosen so that every table fits one or two SIMD registers.
constexpr int kSegmentKeyCount = 16;
constexpr int kSegmentKeyBinades = 2;
constexpr uint32_t kSegmentKeyMinExponentField = 96;
constexpr int kSegmentMaxCount = 16;
// Relative difference of two spacings still counted as "evenly spaced" when runs are formed.
constexpr double kSegmentRunTolerance = 1e-3;
// Half the width of the window (in positions) that must hold no integer for the arithmetic
// code to be accepted: about 1 value in 2000 takes the exact search.
constexpr float kSegmentNearMargin = 1.0f / 4096.0f;
constexpr float kSegmentWindow = 2.0f * kSegmentNearMargin;

struct SegmentedEncoder {
  // The rule's thresholds (+inf padded), for the exact search.
  alignas(64) float thresholds[kThresholdTableSize8bit];
  // Per sign (0: v >= +0, 1: v <= -0) and key, at [sign * kSegmentKeyCount + key]: the boundary
  // inside that key's binades (+inf if none) and the segment of its values not above it.
  alignas(64) float key_boundary[2 * kSegmentKeyCount];
  alignas(64) int32_t key_segment[2 * kSegmentKeyCount];
  // Per segment: the position map and the codes of its first and last entries.
  alignas(64) float segment_scale[kSegmentMaxCount];
  alignas(64) float segment_offset[kSegmentMaxCount];
  alignas(64) int32_t segment_first_code[kSegmentMaxCount];
  alignas(64) int32_t segment_last_code[kSegmentMaxCount];
  uint8_t zero_code;  // the code of 0.0 (an all-zero block)
  bool usable;        // false: use encode_8bit() alone
};

// The exponent field of |v|, clamped below at the lowest key's.
LP_HOST_DEVICE inline uint32_t segment_exponent_field(float v) {
  const uint32_t field = (float_to_bits(v) << 1) >> 24;
  return field < kSegmentKeyMinExponentField ? kSegmentKeyMinExponentField : field;
}

// The table index of v's sign and key. For |v| <= 1 the field is at most 127, so the key is
// (field - 96) / 2; the SIMD paths compute the same from the float's bits.
LP_HOST_DEVICE inline int segment_key_index(float v) {
  const int key =
      static_cast<int>(segment_exponent_field(v) / kSegmentKeyBinades) % kSegmentKeyCount;
  return static_cast<int>(float_to_bits(v) >> 31) * kSegmentKeyCount + key;
}

// Whether a segment's fitted position map guarantees exact codes. The segment holds the
// thresholds t_1 < ... < t_L and the codes first .. last = first + L; `model_error` is
// max_q |P*(t_q) - (first + q - margin)|, with P*(v) = v * scale + offset in real arithmetic
// (float coefficients) and margin = kSegmentNearMargin.
//
// Proof. Let P be the float evaluation of P*(v) (one fma, or a product and a sum) and
// P' = fl(P + 2 margin). Their errors are e1 <= (|v * scale| + |P|) 2^-24 and
// e2 <= |P'| 2^-24; where P* lies in [first - 1, last + 2], e1 + e2 <= eval_error below.
// Suppose trunc(P) == trunc(P'). Then no integer j = first + q (q >= 1) lies in (P, P'], so
// either j <= P, and P*(v) >= j - e1 > P*(t_q) when model_error + e1 < margin, so v > t_q; or
// j > P' >= P + 2 margin - e2, and P*(v) < j - 2 margin + e1 + e2 < P*(t_q), so v < t_q.
// Hence #{q : v > t_q} = #{q : first + q <= trunc(P')} and the code is
// clamp(trunc(P'), first, last). Outside [first - 1, last + 2] the clamp decides alone: the
// relative error (2^-22, with |offset| <= 2^20) cannot carry P across that range. For P in
// (-1, 0), trunc gives 0 instead of floor's -1; no code is below first >= 0, so the clamp
// gives the same answer. |scale| + |offset| <= 2^30 keeps trunc in int32 range for |v| <= 1.
inline bool segment_model_is_exact(double scale, double offset, int last_code, double model_error) {
  const double span = last_code + 3.0;  // |P| where P* lies in [first - 1, last + 2]
  const double eval_error = (2.0 * span + fabs(offset)) * 0x1p-24 + (span + 1.0) * 0x1p-24;
  return scale >= 0.0 && fabs(offset) <= 0x1p20 && fabs(scale) + fabs(offset) <= 0x1p30 &&
         model_error + eval_error <= 0.5 * kSegmentNearMargin;
}

// Host only (float64 arithmetic, loops): builds the encoder for a sorted codebook of 256.
inline void build_segmented_encoder(const float* code, SegmentedEncoder* enc) {
  constexpr int kSize = kCodebookSize8bit;
  build_thresholds(code, kSize, enc->thresholds);
  enc->zero_code = encode_8bit(0.0f, enc->thresholds);
  enc->usable = false;
  for (int i = 0; i + 1 < kSize; ++i) {
    if (!(code[i] < code[i + 1])) return;  // duplicates or unsorted: no evenly spaced runs
  }

  // Runs of evenly spaced entries: [run_first[s], run_last[s]].
  int run_first[kSegmentMaxCount];
  int run_last[kSegmentMaxCount];
  int runs = 0;
  for (int i = 0; i < kSize;) {
    if (runs == kSegmentMaxCount) return;
    int last = i;
    if (i + 1 < kSize) {
      const double spacing = static_cast<double>(code[i + 1]) - code[i];
      last = i + 1;
      while (last + 1 < kSize && fabs((static_cast<double>(code[last + 1]) - code[last]) -
                                      spacing) <= kSegmentRunTolerance * spacing) {
        ++last;
      }
    }
    run_first[runs] = i;
    run_last[runs] = last;
    ++runs;
    i = last + 1;
  }

  // The position map of each run: its thresholds t[first .. last-1] just below first+1 .. last.
  for (int s = 0; s < runs; ++s) {
    const int first = run_first[s];
    const int last = run_last[s];
    const int interior = last - first;
    double scale = 0.0;
    double offset = first + 0.5;  // no interior threshold: P = first + 0.5, never near an integer
    if (interior > 0) {
      const double t1 = enc->thresholds[first];
      const double spacing =
          interior == 1 ? static_cast<double>(code[first + 1]) - code[first]
                        : (static_cast<double>(enc->thresholds[last - 1]) - t1) / (interior - 1);
      scale = static_cast<float>(1.0 / spacing);
      offset = static_cast<float>(first + 1 - kSegmentNearMargin - t1 * scale);
    }
    double model_error = 0.0;
    for (int q = 1; q <= interior; ++q) {
      const double position = static_cast<double>(enc->thresholds[first + q - 1]) * scale + offset;
      const double error = fabs(position - (first + q - kSegmentNearMargin));
      if (error > model_error) model_error = error;
    }
    if (!segment_model_is_exact(scale, offset, last, model_error)) return;
    enc->segment_scale[s] = static_cast<float>(scale);
    enc->segment_offset[s] = static_cast<float>(offset);
    enc->segment_first_code[s] = first;
    enc->segment_last_code[s] = last;
  }
  for (int s = runs; s < kSegmentMaxCount; ++s) {  // never selected; keep the tables defined
    enc->segment_scale[s] = 0.0f;
    enc->segment_offset[s] = 0.5f;
    enc->segment_first_code[s] = enc->segment_last_code[s] = 0;
  }

  // The boundary thresholds t[run_last[s]] (s < runs - 1); the segment of v is the number of
  // boundaries below it. Each key may hold at most one (one comparison per value).
  for (int sign = 0; sign < 2; ++sign) {
    for (int key = 0; key < kSegmentKeyCount; ++key) {
      const uint32_t field = kSegmentKeyMinExponentField + kSegmentKeyBinades * key;
      const float low = key == 0 ? 0.0f : bits_to_float(field << 23);
      const float high = key == kSegmentKeyCount - 1
                             ? INFINITY
                             : nextafterf(bits_to_float((field + kSegmentKeyBinades) << 23), 0.0f);
      // The key's values in increasing order: [lowest, highest].
      const float lowest = sign ? -high : low;
      const float highest = sign ? -low : high;
      int below_lowest = 0;
      int splitting = 0;
      float boundary = INFINITY;
      for (int s = 0; s + 1 < runs; ++s) {
        const float b = enc->thresholds[run_last[s]];
        if (b < lowest) ++below_lowest;
        if (lowest <= b && b < highest) {  // values on both sides of b share this key
          ++splitting;
          boundary = b;
        }
      }
      if (splitting > 1) return;
      enc->key_boundary[sign * kSegmentKeyCount + key] = boundary;
      enc->key_segment[sign * kSegmentKeyCount + key] = below_lowest;
    }
  }
  enc->usable = true;
}

// The segment of v (step 1 above).
LP_HOST_DEVICE inline int segment_of(float v, const SegmentedEncoder& enc) {
  const int index = segment_key_index(v);
  return enc.key_segment[index] + (v > enc.key_boundary[index] ? 1 : 0);
}

// The nearest code of v (the rule of encode_8bit, bit for bit) for an encoder with usable set.
LP_HOST_DEVICE inline uint8_t encode_segmented(float v, const SegmentedEncoder& enc) {
  if (!(fabsf(v) <= 1.0f)) return encode_8bit(v, enc.thresholds);  // NaN: outside the domain
  const int segment = segment_of(v, enc);
  const float position = v * enc.segment_scale[segment] + enc.segment_offset[segment];
  const float window_end = position + kSegmentWindow;
  const int code = static_cast<int>(window_end);  // |position| < 2^30: in range
  if (static_cast<int>(position) != code) return encode_8bit(v, enc.thresholds);  // near
  const int first = enc.segment_first_code[segment];
  const int last = enc.segment_last_code[segment];
  return static_cast<uint8_t>(code < first ? first : code > last ? last : code);
}

}  // namespace lowprec
