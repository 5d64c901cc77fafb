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

#include "byte_planes.h"
#include "cpu_isa.h"
#include "fourbit.h"
#include "lowprec/fourbit.h"
#include "parallel.h"
#include "simd.h"

#if defined(__GNUC__) || defined(__clang__)
#define LP_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define LP_ALWAYS_INLINE inline
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
// fp32 (or as bf16 bits in x_split_bf16 for the vdpbf16ps kernel). The lane-strided kernel
// (AVX-512 with fp32 or fp16 x, see lane_strided_used) reads x_lanes instead: row m of x in
// the order its lookups produce weights (to_lane_strided).
struct GemvProblem {
  const Packed4bit* weight;
  int64_t rows;
  int64_t out_features;
  int64_t in_features;
  const float* x;  // fp32 [rows, in_features], element order
  const float* x_split;
  const uint16_t* x_split_bf16;
  const float* x_lanes;
  int64_t half_len;
  const float* bias;  // fp32 [out_features] or null
  void* y;
  FloatType y_type;
  // The nested codebook's byte planes, for the AVX-512 scale decode on CPUs with AVX512_VBMI
  // (null otherwise, or when the scales are not double-quantized).
  const BytePlanes* nested_code_planes = nullptr;
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

// The blocks [begin, end) weight row n touches.
struct BlockRange {
  int64_t begin;
  int64_t end;
};

inline BlockRange row_blocks(const GemvProblem& p, int64_t n) {
  const int log2 = p.weight->blocksize_log2;
  return {(n * p.in_features) >> log2, (((n + 1) * p.in_features - 1) >> log2) + 1};
}

inline RowScales decode_row_scales(const GemvProblem& p, int64_t n, float* buffer) {
  const Packed4bit& w = *p.weight;
  const BlockRange blocks = row_blocks(p, n);
  if (!w.scales.double_quantized()) return {w.scales.absmax + blocks.begin, blocks.begin};
  for (int64_t block = blocks.begin; block < blocks.end; ++block)
    buffer[block - blocks.begin] = block_scale(w.scales, block);
  return {buffer, blocks.begin};
}

// The row scale decode of the kernels without a vectorized one.
struct ScalarScaleDecode {
  static RowScales decode_scales(const GemvProblem& p, int64_t n, float* buffer) {
    return decode_row_scales(p, n, buffer);
  }
};

// The lone nibbles of a row, one element at a time, added to sums[0, rows).
inline void add_lone_elements(const GemvProblem& p, int64_t n, const RowSegment& segment,
                              const RowScales& scales, float* sums) {
  const Packed4bit& w = *p.weight;
  const int64_t K = p.in_features;
  auto add = [&](int64_t k) {
    const int64_t flat = n * K + k;
    const float weight =
        dequantize_4bit_value(code_at(w.packed, flat), w.code, scales.of(flat >> w.blocksize_log2));
    for (int64_t m = 0; m < p.rows; ++m)
      sums[m] = fmaf(p.x[m * K + k], weight, sums[m]);
  };
  if (segment.lone_first) add(0);
  if (segment.lone_last) add(K - 1);
}

inline void write_outputs(const GemvProblem& p, int64_t n, const float* sums) {
  const float bias = p.bias != nullptr ? p.bias[n] : 0.0f;
  for (int64_t m = 0; m < p.rows; ++m)
    store_float(p.y, m * p.out_features + n, sums[m] + bias, p.y_type);
}

// What a row kernel gets: weight row n's segment and scales, x rows [m0, m0 + rows), and the
// slice [tile_begin, tile_end) of the segment's bytes (x_split indices) to multiply; it adds
// the products to sums[0, rows).
struct RowTile {
  const RowSegment* segment;
  const RowScales* scales;
  int64_t m0;
  int64_t tile_begin;
  int64_t tile_end;
  bool stream_prefetch;  // the kernel prefetches kStreamPrefetchBytes ahead as it reads
};

// The driver shared by every path. Rows of x are taken kRowGroup at a time (one pass over a
// weight row decodes its weights once for the group). Weight rows are taken a panel at a
// time, and each row in slices of `tile_bytes` packed bytes, so that the x values one slice
// meets (group rows x 2 halves x tile_bytes elements) stay in L1 while the slice runs over
// every row of the panel: without it, four fp32 rows of x at in_features 4096 (64 KiB) spill
// to L2 and the FMAs wait on L2. Partial sums live in a per-panel buffer.
constexpr int64_t kPanelRows = 16;
constexpr int64_t kXBudgetBytes = 24 << 10;  // half of a 48 KiB L1D
constexpr int64_t kTileGranuleBytes = 64;    // slices are multiples of the widest step
using simd::kCacheLineBytes;

// Packed bytes per slice of a weight row: the most, in whole granules (at least one), whose x
// values (`rows` rows of x, both halves) fit in x_budget_bytes.
constexpr int64_t slice_bytes_for(int64_t x_budget_bytes, int64_t rows, int64_t x_element_bytes,
                                  int64_t granule) {
  return std::max<int64_t>(granule,
                           x_budget_bytes / (rows * 2 * x_element_bytes) / granule * granule);
}

// The tiled driver's slices of a weight row.
inline int64_t tile_bytes_for(int64_t group_rows, int64_t x_element_bytes) {
  return slice_bytes_for(kXBudgetBytes, group_rows, x_element_bytes, kTileGranuleBytes);
}

// How far ahead (into L2) a kernel reading whole rows in order asks for the packed bytes. The
// hardware prefetcher alone leaves the fp32 GEMV waiting on memory; 8 KiB ahead made it 17%
// faster (one thread, M = 1, 4096 x 4096, weights in DRAM; 2 KiB: 9%).
constexpr int64_t kStreamPrefetchBytes = 8192;

// Asks for weight row n's packed bytes ahead of use (into L2): the slices of a panel visit its
// rows in short runs, which the hardware stream prefetcher follows poorly, so each row of a
// panel prefetches the same row of the next panel while it computes. Rows taken whole, in
// order, are prefetched by the kernels that stream (Kernel::kStreamPrefetch) instead: a burst
// per panel competes with their own prefetches.
inline void prefetch_row(const GemvProblem& p, int64_t n) {
  if (n >= p.out_features) return;
  const RowSegment segment = row_segment(n, p.in_features);
  for (int64_t j = segment.first_byte; j < segment.end_byte; j += kCacheLineBytes) {
    simd::prefetch_l2(p.weight->packed + j);
  }
}

template <typename Kernel>
void gemv_rows_tiled(const GemvProblem& p, int64_t n_begin, int64_t n_end) {
  constexpr int kGroup = Kernel::kRowGroup;
  const int64_t group_rows = std::min<int64_t>(kGroup, p.rows);
  const int64_t tile_bytes = tile_bytes_for(group_rows, Kernel::kXElementBytes);
  const bool stream_prefetch = Kernel::kStreamPrefetch && p.half_len <= tile_bytes;
  // Where a panel runs in one pass (whole rows, one group of x rows), each row's scales are
  // decoded just before its products. Decoding the panel's rows up front leaves the memory
  // stream without requests for as long: 43.3-45.3 -> 45.0-47.3 GB/s at M = 1, fp32 x, 4096 x
  // 4096 from DRAM, two threads (C++ driver, the two interleaved in one process, three runs).
  const bool decode_per_row =  // exactly one pass: one tile, one group, both non-empty
      stream_prefetch && p.half_len > 0 && p.rows > 0 && p.rows <= kGroup;
  const int64_t blocks_per_row = max_blocks_per_row(p);
  std::vector<float> scale_buffer(static_cast<size_t>(kPanelRows * blocks_per_row));
  std::vector<float> sums(static_cast<size_t>(kPanelRows * p.rows));
  RowSegment segments[kPanelRows];
  RowScales scales[kPanelRows];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kPanelRows) {
    const int64_t panel = std::min(kPanelRows, n_end - n0);
    auto decode = [&](int64_t i) {
      scales[i] = Kernel::decode_scales(p, n0 + i, scale_buffer.data() + i * blocks_per_row);
    };
    for (int64_t i = 0; i < panel; ++i) {
      segments[i] = row_segment(n0 + i, p.in_features);
      if (!decode_per_row) decode(i);
    }
    std::fill(sums.begin(), sums.end(), 0.0f);
    // Group by group: the panel's packed rows (kPanelRows x in_features / 2 bytes) stay in
    // L2 for the next group, one group's slice of x in L1.
    for (int64_t m0 = 0; m0 < p.rows; m0 += kGroup) {
      const int rows_in_group = static_cast<int>(std::min<int64_t>(kGroup, p.rows - m0));
      for (int64_t t0 = 0; t0 < p.half_len; t0 += tile_bytes) {
        const int64_t t1 = std::min(p.half_len, t0 + tile_bytes);
        for (int64_t i = 0; i < panel; ++i) {
          if (!stream_prefetch && m0 == 0 && t0 == 0) prefetch_row(p, n0 + kPanelRows + i);
          if (decode_per_row) decode(i);  // the only pass over the panel
          const RowTile tile{&segments[i], &scales[i], m0, t0, t1, stream_prefetch};
          Kernel::run(p, tile, rows_in_group, sums.data() + i * p.rows + m0);
        }
      }
    }
    for (int64_t i = 0; i < panel; ++i) {
      add_lone_elements(p, n0 + i, segments[i], scales[i], sums.data() + i * p.rows);
      write_outputs(p, n0 + i, sums.data() + i * p.rows);
    }
  }
}

// Calls Kernel::template group<R>(p, tile, sums) for R = rows (1..kRowGroup).
template <typename Kernel, int R = Kernel::kRowGroup>
inline void run_group(const GemvProblem& p, const RowTile& tile, int rows, float* sums) {
  if constexpr (R > 1) {
    if (rows < R) return run_group<Kernel, R - 1>(p, tile, rows, sums);
  }
  Kernel::template group<R>(p, tile, sums);
}

// The aligned middle [begin, end) of a slice: whole steps of `step` packed bytes at multiples
// of `step`. Blocks start at multiples of their byte length, so when that length is at least
// `step` no step crosses a block; smaller blocks leave no middle (all of it goes to the edges
// kernel).
struct MainRange {
  int64_t begin;
  int64_t end;
};

inline MainRange main_range(int64_t begin, int64_t end, int64_t step, int bytes_per_block_log2) {
  if ((int64_t{1} << bytes_per_block_log2) < step) return {end, end};
  const int64_t main_begin = std::min(end, (begin + step - 1) / step * step);
  return {main_begin, std::max(main_begin, end / step * step)};
}

// The lane-strided layout of the AVX-512 kernel for fp32 (and fp16) x when in_features is a
// multiple of kLaneChunkElements. A chunk of 64 packed bytes is loaded as 16 dword lanes of 8
// nibbles and looked up in place: vpermps reads only index bits 0-3 of a lane, so a lookup of
// the lanes as loaded decodes nibble 0 of every lane, one after a shift by 4 nibble 1, and so
// on: 8 lookups and 7 shifts per 128 weights, no widening (the split kernel: 8 lookups, 4
// widenings, 4 shifts). Step k of lane l meets weight 8l + (k ^ 1) of the chunk (nibble k of
// a little-endian lane is the low nibble of byte k / 2 for even k, which holds the odd
// element: bitsandbytes puts the even one in the high nibble). x is reordered once per call
// to match, so that step k of a chunk multiplies a contiguous vector of x. Rows start at
// chunk boundaries: no edges, no parity. A chunk may span several blocks (blocks of 32 or 64
// weights), so the lookups use the raw codebook and each lane's sum is scaled by its own
// block's scale afterwards.
// The same scheme with vpermw for bf16 x measured no faster than its split kernel, which
// stays.
constexpr int64_t kLaneChunkBytes = 64;
constexpr int64_t kLaneChunkElements = 2 * kLaneChunkBytes;
constexpr int kNibbleBits = 4;
constexpr int kLanes = simd::kAvx512Lanes;  // dword lanes of a 512-bit vector
constexpr int kNibblesPerLane = static_cast<int>(kLaneChunkElements / kLanes);

// Rows of x (count elements in all, a multiple of kLaneChunkElements) in the lane-strided
// layout: position k * kLanes + l of a chunk holds element kNibblesPerLane * l + (k ^ 1).
// Loops without divisions: with a division per element the reorder cost ~3 us per row of
// x at in_features 4096 (one core), more than the kernel gains on a small layer hot in L2.
inline void to_lane_strided(const float* x, int64_t count, float* x_lanes) {
  for (int64_t c = 0; c < count; c += kLaneChunkElements)
    for (int k = 0; k < kNibblesPerLane; ++k)
      for (int l = 0; l < kLanes; ++l)
        x_lanes[c + k * kLanes + l] = x[c + l * kNibblesPerLane + (k ^ 1)];
}

// The lane-strided kernel takes fp32 and fp16 x at every M where in_features allows it. Its
// lookups and FMAs share the vector pipes: one vpermps and one FMA per 16 weights run at ~2.7
// per cycle together (Zen 5), and the split kernel adds a widening permute per 16 bytes and a
// table multiply per 32, ~30% more of that work. Measured against the split kernel (C++ driver,
// 4096 x 4096 NF4, blocksize 64, double quant, weights from DRAM, the two interleaved in one
// process; GB/s of weight bytes, one thread / two): M = 2: 13.3-13.9 / 25.1-25.8 against
// 9.5-9.6 / 18.5-18.7; M = 3: 10.2 / 19.1-19.6 against 6.6-6.7 / 12.8-13.1. At M = 1, where a
// row is one tile and the kernel streams it with a software prefetch (as the split kernel
// does), 26.1-26.3 against 23.6 with weights hot in L3, and ~3% more from DRAM. (An earlier
// build had measured the lane kernel at 0.84-0.94 of the split one below M = 4.)
inline bool lane_strided_used(int64_t in_features) {
  return in_features % kLaneChunkElements == 0;
}

// ------------------------------------------------------------------------------ scalar path

struct ScalarKernel : ScalarScaleDecode {
  static constexpr bool kStreamPrefetch = false;
  static constexpr int kRowGroup = kGemvRowGroup;
  static constexpr int kXElementBytes = sizeof(float);

  template <int Rows>
  static void group(const GemvProblem& p, const RowTile& tile, float* sums) {
    const Packed4bit& w = *p.weight;
    const RowSegment& segment = *tile.segment;
    const int bytes_per_block_log2 = w.blocksize_log2 - 1;
    const float* xe[Rows];
    const float* xo[Rows];
    for (int r = 0; r < Rows; ++r) {
      xe[r] = p.x_split + split_offset(p, segment.parity, tile.m0 + r, 0);
      xo[r] = p.x_split + split_offset(p, segment.parity, tile.m0 + r, 1);
    }
    for (int64_t j = segment.first_byte + tile.tile_begin; j < segment.first_byte + tile.tile_end;
         ++j) {
      const float scale = tile.scales->of(j >> bytes_per_block_log2);
      const float w_even = dequantize_4bit_value(high_nibble(w.packed[j]), w.code, scale);
      const float w_odd = dequantize_4bit_value(low_nibble(w.packed[j]), w.code, scale);
      const int64_t xi = j - segment.first_byte;
      for (int r = 0; r < Rows; ++r)
        sums[r] = fmaf(xo[r][xi], w_odd, fmaf(xe[r][xi], w_even, sums[r]));
    }
  }

  static void run(const GemvProblem& p, const RowTile& tile, int rows, float* sums) {
    run_group<ScalarKernel>(p, tile, rows, sums);
  }
};

void gemv_rows_scalar(const GemvProblem& p, int64_t n_begin, int64_t n_end) {
  gemv_rows_tiled<ScalarKernel>(p, n_begin, n_end);
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

// Products of the packed bytes [begin, end) of the tile's row with any alignment and
// blocksize: block by block, partial vectors masked. The group kernel below sends only the
// unaligned ends of a slice here, keeping its own loop free of branches (and its
// accumulators in registers).
template <int Rows>
LP_TARGET_AVX2 __attribute__((noinline)) void avx2_gemv_edges(const GemvProblem& p,
                                                              const RowTile& tile, int64_t begin,
                                                              int64_t end, float* sums) {
  const Packed4bit& w = *p.weight;
  const RowSegment& segment = *tile.segment;
  const float* xe[Rows];
  const float* xo[Rows];
  for (int r = 0; r < Rows; ++r) {
    xe[r] = p.x_split + split_offset(p, segment.parity, tile.m0 + r, 0);
    xo[r] = p.x_split + split_offset(p, segment.parity, tile.m0 + r, 1);
  }
  __m256 acc[4][Rows];
  for (int a = 0; a < 4; ++a)
    for (int r = 0; r < Rows; ++r)
      acc[a][r] = _mm256_setzero_ps();
  float tail_sums[Rows] = {};
  const __m256 code_low = _mm256_loadu_ps(w.code);
  const __m256 code_high = _mm256_loadu_ps(w.code + kAvx2Lanes);
  const int bytes_per_block_log2 = w.blocksize_log2 - 1;
  for (int64_t j = begin; j < end;) {
    const int64_t block = j >> bytes_per_block_log2;
    const int64_t piece_end = std::min(end, (block + 1) << bytes_per_block_log2);
    const float scale = tile.scales->of(block);
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
        tail_sums[r] = fmaf(xo[r][xi], w_odd, fmaf(xe[r][xi], w_even, tail_sums[r]));
    }
  }
  for (int r = 0; r < Rows; ++r) {
    const __m256 total =
        _mm256_add_ps(_mm256_add_ps(acc[0][r], acc[1][r]), _mm256_add_ps(acc[2][r], acc[3][r]));
    sums[r] += avx2_reduce_add(total) + tail_sums[r];
  }
}

template <int Rows>
LP_TARGET_AVX2 void avx2_gemv_group(const GemvProblem& p, const RowTile& tile, float* sums) {
  constexpr int64_t kStep = 2 * kAvx2ChunkBytes;
  const Packed4bit& w = *p.weight;
  const RowSegment& segment = *tile.segment;
  const int bytes_per_block_log2 = w.blocksize_log2 - 1;
  const int64_t begin = segment.first_byte + tile.tile_begin;
  const int64_t end = segment.first_byte + tile.tile_end;
  const MainRange middle = main_range(begin, end, kStep, bytes_per_block_log2);
  if (begin < middle.begin) avx2_gemv_edges<Rows>(p, tile, begin, middle.begin, sums);
  if (middle.end < end) avx2_gemv_edges<Rows>(p, tile, middle.end, end, sums);
  if (middle.begin == middle.end) return;
  const float* xe[Rows];
  const float* xo[Rows];
  for (int r = 0; r < Rows; ++r) {
    xe[r] = p.x_split + split_offset(p, segment.parity, tile.m0 + r, 0);
    xo[r] = p.x_split + split_offset(p, segment.parity, tile.m0 + r, 1);
  }
  __m256 acc[4][Rows];
  for (int a = 0; a < 4; ++a)
    for (int r = 0; r < Rows; ++r)
      acc[a][r] = _mm256_setzero_ps();
  const __m256 code_low = _mm256_loadu_ps(w.code);
  const __m256 code_high = _mm256_loadu_ps(w.code + kAvx2Lanes);
  const float* scales = tile.scales->scales;
  const int64_t first_block = tile.scales->first_block;
  for (int64_t j = middle.begin; j < middle.end; j += kStep) {
    const __m256 scale = _mm256_set1_ps(scales[(j >> bytes_per_block_log2) - first_block]);
    const __m256 table_low = _mm256_mul_ps(code_low, scale);
    const __m256 table_high = _mm256_mul_ps(code_high, scale);
    const int64_t xi = j - segment.first_byte;
    avx2_gemv_chunk<Rows>(w.packed + j, table_low, table_high, xe, xo, xi, acc[0], acc[1]);
    avx2_gemv_chunk<Rows>(w.packed + j + kAvx2ChunkBytes, table_low, table_high, xe, xo,
                          xi + kAvx2ChunkBytes, acc[2], acc[3]);
  }
  for (int r = 0; r < Rows; ++r) {
    const __m256 total =
        _mm256_add_ps(_mm256_add_ps(acc[0][r], acc[1][r]), _mm256_add_ps(acc[2][r], acc[3][r]));
    sums[r] += avx2_reduce_add(total);
  }
}

struct Avx2Kernel : ScalarScaleDecode {
  static constexpr bool kStreamPrefetch = false;
  static constexpr int kRowGroup = kGemvRowGroup;
  static constexpr int kXElementBytes = sizeof(float);
  template <int Rows>
  static void group(const GemvProblem& p, const RowTile& tile, float* sums) {
    avx2_gemv_group<Rows>(p, tile, sums);
  }
  static void run(const GemvProblem& p, const RowTile& tile, int rows, float* sums) {
    run_group<Avx2Kernel>(p, tile, rows, sums);
  }
};

void gemv_rows_avx2(const GemvProblem& p, int64_t n_begin, int64_t n_end) {
  gemv_rows_tiled<Avx2Kernel>(p, n_begin, n_end);
}

// ----------------------------------------------------------------------------- AVX-512 path

// The 8-bit nested codebook of double quantization in registers (16 vectors of 16 entries).
constexpr int kNestedCodeVectors = kCodebookSize8bit / kAvx512Lanes;

// nested_code[index] per lane: vpermt2ps looks up 32 entries (index bits 0-4) in each of the
// 8 register pairs, then index bits 5, 6 and 7 select among the 8 results.
LP_TARGET_AVX512 LP_ALWAYS_INLINE __m512 avx512_nested_code_lookup(const __m512* table,
                                                                   __m512i index) {
  constexpr int kPairs = kNestedCodeVectors / 2;
  constexpr int kFirstSelectBit = 5;
  __m512 level[kPairs];
  for (int i = 0; i < kPairs; ++i)
    level[i] = _mm512_permutex2var_ps(table[2 * i], index, table[2 * i + 1]);
  int bit = kFirstSelectBit;
  for (int count = kPairs; count > 1; count /= 2, ++bit) {
    const __mmask16 upper = _mm512_test_epi32_mask(index, _mm512_set1_epi32(1 << bit));
    for (int i = 0; i < count / 2; ++i)
      level[i] = _mm512_mask_blend_ps(upper, level[2 * i], level[2 * i + 1]);
  }
  return level[0];
}

// nested_absmax per lane for 16 consecutive blocks from `block` on: nested blocks hold >= 64
// blocks, so the 16 span at most two.
LP_TARGET_AVX512 LP_ALWAYS_INLINE __m512 avx512_nested_absmax(const BlockScales& s, int64_t block) {
  const int nested_log2 = s.nested_blocksize_log2;
  const int64_t nested_first = block >> nested_log2;
  const int64_t nested_last = (block + kAvx512Lanes - 1) >> nested_log2;
  __m512 nested_absmax = _mm512_set1_ps(s.nested_absmax[nested_first]);
  if (nested_last != nested_first) {
    const auto upper = static_cast<__mmask16>(0xFFFFu << ((nested_last << nested_log2) - block));
    nested_absmax =
        _mm512_mask_mov_ps(nested_absmax, upper, _mm512_set1_ps(s.nested_absmax[nested_last]));
  }
  return nested_absmax;
}

// The double-quantized scales of blocks [begin, end) into out, 16 blocks at a time: the scalar
// decode (block_scale) is a chain of dependent loads per block, which costs about as much as
// the row's products at blocksize 64. Same product and sum as block_scale, so the same values;
// the last < 16 blocks go through block_scale.
LP_TARGET_AVX512 void avx512_decode_scales(const BlockScales& s, int64_t begin, int64_t end,
                                           float* out) {
  if (begin >= end) return;
  __m512 table[kNestedCodeVectors];
  for (int i = 0; i < kNestedCodeVectors; ++i)
    table[i] = _mm512_loadu_ps(s.nested_code + i * kAvx512Lanes);
  const __m512 offset = _mm512_set1_ps(*s.offset);
  int64_t block = begin;
  for (; block + kAvx512Lanes <= end; block += kAvx512Lanes) {
    const __m512i codes = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(s.absmax_codes + block)));
    const __m512 scaled =
        _mm512_mul_ps(avx512_nested_code_lookup(table, codes), avx512_nested_absmax(s, block));
    _mm512_storeu_ps(out + (block - begin), _mm512_add_ps(scaled, offset));
  }
  for (; block < end; ++block)
    out[block - begin] = block_scale(s, block);
}

// Per row: the decoded scales of the blocks it touches.
LP_TARGET_AVX512 RowScales avx512_decode_row_scales(const GemvProblem& p, int64_t n,
                                                    float* buffer) {
  const BlockScales& s = p.weight->scales;
  if (!s.double_quantized()) return decode_row_scales(p, n, buffer);
  const BlockRange blocks = row_blocks(p, n);
  avx512_decode_scales(s, blocks.begin, blocks.end, buffer);
  return {buffer, blocks.begin};
}

// The same decode 64 blocks at a time, the nested codebook looked up by byte planes (about 21
// instructions per 64 codes, against about 30 per 16 for the permute tree above: at 4096 x 4096,
// M = 1, that decode took ~13% of a row's instructions). The rest of a row takes the above.
// Only for double-quantized scales (p.nested_code_planes is set only then).
LP_TARGET_AVX512_VBMI RowScales avx512_vbmi_decode_row_scales(const GemvProblem& p, int64_t n,
                                                              float* buffer) {
  const BlockScales& s = p.weight->scales;
  const BlockRange blocks = row_blocks(p, n);
  const __m512 offset = _mm512_set1_ps(*s.offset);
  int64_t block = blocks.begin;
  for (; block + kBytePlaneCodes <= blocks.end; block += kBytePlaneCodes) {
    __m512 nested_code[kBytePlaneCodes / kAvx512Lanes];
    avx512_byte_plane_lookup(_mm512_loadu_si512(s.absmax_codes + block), *p.nested_code_planes,
                             nested_code);
    for (int j = 0; j < kBytePlaneCodes / kAvx512Lanes; ++j) {
      const int64_t first = block + j * kAvx512Lanes;
      const __m512 scaled = _mm512_mul_ps(nested_code[j], avx512_nested_absmax(s, first));
      _mm512_storeu_ps(buffer + (first - blocks.begin), _mm512_add_ps(scaled, offset));
    }
  }
  avx512_decode_scales(s, block, blocks.end, buffer + (block - blocks.begin));
  return {buffer, blocks.begin};
}

// Row scales decoded with AVX-512 (the kernels of this ISA inherit it).
struct Avx512ScaleDecode {
  static RowScales decode_scales(const GemvProblem& p, int64_t n, float* buffer) {
    if (p.nested_code_planes != nullptr) return avx512_vbmi_decode_row_scales(p, n, buffer);
    return avx512_decode_row_scales(p, n, buffer);
  }
};

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

// Products of the packed bytes [begin, end) of the tile's row with any alignment and
// blocksize: block by block, partial vectors masked. The group kernel below sends only the
// unaligned ends of a slice here, keeping its own loop free of branches (and its
// accumulators in registers).
template <int Rows>
LP_TARGET_AVX512 __attribute__((noinline)) void avx512_gemv_edges(const GemvProblem& p,
                                                                  const RowTile& tile,
                                                                  int64_t begin, int64_t end,
                                                                  float* sums) {
  const Packed4bit& w = *p.weight;
  const RowSegment& segment = *tile.segment;
  const float* xe[Rows];
  const float* xo[Rows];
  for (int r = 0; r < Rows; ++r) {
    xe[r] = p.x_split + split_offset(p, segment.parity, tile.m0 + r, 0);
    xo[r] = p.x_split + split_offset(p, segment.parity, tile.m0 + r, 1);
  }
  // Four independent accumulators per row (two steps of even/odd) hide the FMA latency.
  __m512 acc[4][Rows];
  for (int a = 0; a < 4; ++a)
    for (int r = 0; r < Rows; ++r)
      acc[a][r] = _mm512_setzero_ps();
  const __m512 code = _mm512_loadu_ps(w.code);
  const int bytes_per_block_log2 = w.blocksize_log2 - 1;
  const __mmask16 all = 0xFFFF;
  for (int64_t j = begin; j < end;) {
    const int64_t block = j >> bytes_per_block_log2;
    const int64_t piece_end = std::min(end, (block + 1) << bytes_per_block_log2);
    const __m512 table = _mm512_mul_ps(code, _mm512_set1_ps(tile.scales->of(block)));
    for (; j + 2 * kAvx512ChunkBytes <= piece_end; j += 2 * kAvx512ChunkBytes) {
      const int64_t xi = j - segment.first_byte;
      avx512_gemv_chunk<Rows, false>(w.packed + j, table, xe, xo, xi, all, acc[0], acc[1]);
      avx512_gemv_chunk<Rows, false>(w.packed + j + kAvx512ChunkBytes, table, xe, xo,
                                     xi + kAvx512ChunkBytes, all, acc[2], acc[3]);
    }
    while (j < piece_end) {
      const int64_t count = std::min(piece_end - j, kAvx512ChunkBytes);
      avx512_gemv_chunk<Rows, true>(w.packed + j, table, xe, xo, j - segment.first_byte,
                                    simd::avx512_first_lanes(count), acc[0], acc[1]);
      j += count;
    }
  }
  for (int r = 0; r < Rows; ++r) {
    const __m512 total =
        _mm512_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]), _mm512_add_ps(acc[2][r], acc[3][r]));
    sums[r] += _mm512_reduce_add_ps(total);
  }
}

template <int Rows>
LP_TARGET_AVX512 void avx512_gemv_group(const GemvProblem& p, const RowTile& tile, float* sums) {
  constexpr int64_t kStep = 2 * kAvx512ChunkBytes;
  const Packed4bit& w = *p.weight;
  const RowSegment& segment = *tile.segment;
  const int bytes_per_block_log2 = w.blocksize_log2 - 1;
  const int64_t begin = segment.first_byte + tile.tile_begin;
  const int64_t end = segment.first_byte + tile.tile_end;
  const MainRange middle = main_range(begin, end, kStep, bytes_per_block_log2);
  if (begin < middle.begin) avx512_gemv_edges<Rows>(p, tile, begin, middle.begin, sums);
  if (middle.end < end) avx512_gemv_edges<Rows>(p, tile, middle.end, end, sums);
  if (middle.begin == middle.end) return;
  const float* xe[Rows];
  const float* xo[Rows];
  for (int r = 0; r < Rows; ++r) {
    xe[r] = p.x_split + split_offset(p, segment.parity, tile.m0 + r, 0);
    xo[r] = p.x_split + split_offset(p, segment.parity, tile.m0 + r, 1);
  }
  // Four independent accumulators per row (two chunks of even/odd) hide the FMA latency.
  __m512 acc[4][Rows];
  for (int a = 0; a < 4; ++a)
    for (int r = 0; r < Rows; ++r)
      acc[a][r] = _mm512_setzero_ps();
  const __m512 code = _mm512_loadu_ps(w.code);
  const float* scales = tile.scales->scales;
  const int64_t first_block = tile.scales->first_block;
  const __mmask16 all = 0xFFFF;
  for (int64_t j = middle.begin; j < middle.end; j += kStep) {
    if (tile.stream_prefetch && (j & kStep) == 0) {  // once per 64-byte line
      simd::prefetch_l2(w.packed + j + kStreamPrefetchBytes);
    }
    const __m512 table =
        _mm512_mul_ps(code, _mm512_set1_ps(scales[(j >> bytes_per_block_log2) - first_block]));
    const int64_t xi = j - segment.first_byte;
    avx512_gemv_chunk<Rows, false>(w.packed + j, table, xe, xo, xi, all, acc[0], acc[1]);
    avx512_gemv_chunk<Rows, false>(w.packed + j + kAvx512ChunkBytes, table, xe, xo,
                                   xi + kAvx512ChunkBytes, all, acc[2], acc[3]);
  }
  for (int r = 0; r < Rows; ++r) {
    const __m512 total =
        _mm512_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]), _mm512_add_ps(acc[2][r], acc[3][r]));
    sums[r] += _mm512_reduce_add_ps(total);
  }
}

struct Avx512Kernel : Avx512ScaleDecode {
  static constexpr bool kStreamPrefetch = true;
  static constexpr int kRowGroup = kGemvRowGroup;
  static constexpr int kXElementBytes = sizeof(float);
  template <int Rows>
  static void group(const GemvProblem& p, const RowTile& tile, float* sums) {
    avx512_gemv_group<Rows>(p, tile, sums);
  }
  static void run(const GemvProblem& p, const RowTile& tile, int rows, float* sums) {
    run_group<Avx512Kernel>(p, tile, rows, sums);
  }
};

void gemv_rows_avx512(const GemvProblem& p, int64_t n_begin, int64_t n_end) {
  gemv_rows_tiled<Avx512Kernel>(p, n_begin, n_end);
}

// ------------------------------------------------- AVX-512 lane-strided path (fp32, fp16 x)

// Blocks a chunk spans: 4 (blocksize 32), 2 (64), else 1. A lane (4 bytes) never spans two.
inline int blocks_per_lane_chunk(int bytes_per_block_log2) {
  return static_cast<int>(std::max<int64_t>(1, kLaneChunkBytes >> bytes_per_block_log2));
}

// Each dword lane's scale for a chunk whose first block is `block`, read from `scales` (RowScales,
// or CodedScales below; anything with of(block)): broadcasts (load-port work) blended by lane,
// keeping the shuffle ports free for the lookups. Reads exactly the chunk's Blocks scales (they
// lie in the row, which ends at a chunk boundary).
template <int Blocks, typename Scales>
LP_TARGET_AVX512 LP_ALWAYS_INLINE __m512 lane_scales(const Scales& scales, int64_t block) {
  constexpr int kLanesPerBlock = kLanes / Blocks;
  __m512 result = _mm512_set1_ps(scales.of(block));
  for (int b = 1; b < Blocks; ++b) {
    const auto lanes = static_cast<__mmask16>(((1u << kLanesPerBlock) - 1) << (b * kLanesPerBlock));
    result = _mm512_mask_mov_ps(result, lanes, _mm512_set1_ps(scales.of(block + b)));
  }
  return result;
}

// One chunk for Rows rows of x, added to acc; `scale` holds each lane's block scale.
template <int Rows>
LP_TARGET_AVX512 LP_ALWAYS_INLINE void avx512_lanes_chunk(const uint8_t* bytes, __m512 scale,
                                                          __m512 code, const float* const* x,
                                                          int64_t x_offset, __m512* acc) {
  // Each chunk's sum restarts from its first product and is split over two chains: with one
  // chain (a row's 8 FMAs in sequence) M = 4 to 16 measured ~3-8% slower.
  constexpr int kChains = 2;
  const __m512i packed = _mm512_loadu_si512(bytes);
  __m512 chunk[kChains][Rows];
#pragma GCC unroll 8
  for (int k = 0; k < kNibblesPerLane; ++k) {
    const __m512 weights = _mm512_permutexvar_ps(_mm512_srli_epi32(packed, kNibbleBits * k), code);
    for (int r = 0; r < Rows; ++r) {
      const __m512 xv = _mm512_loadu_ps(x[r] + x_offset + k * kLanes);
      chunk[k % kChains][r] = k < kChains ? _mm512_mul_ps(weights, xv)
                                          : _mm512_fmadd_ps(weights, xv, chunk[k % kChains][r]);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    acc[r] = _mm512_fmadd_ps(_mm512_add_ps(chunk[0][r], chunk[1][r]), scale, acc[r]);
  }
}

template <int Rows, int Blocks>
LP_TARGET_AVX512 void avx512_lanes_group(const GemvProblem& p, const RowTile& tile, float* sums) {
  const float* x[Rows];
  for (int r = 0; r < Rows; ++r)
    x[r] = p.x_lanes + (tile.m0 + r) * p.in_features;
  __m512 acc[Rows];
  for (int r = 0; r < Rows; ++r)
    acc[r] = _mm512_setzero_ps();
  const __m512 code = _mm512_loadu_ps(p.weight->code);
  const uint8_t* row = p.weight->packed + tile.segment->first_byte;
  for (int64_t xi = tile.tile_begin; xi < tile.tile_end; xi += kLaneChunkBytes) {
    if (tile.stream_prefetch) simd::prefetch_l2(row + xi + kStreamPrefetchBytes);
    const int64_t block = (tile.segment->first_byte + xi) >> (p.weight->blocksize_log2 - 1);
    avx512_lanes_chunk<Rows>(row + xi, lane_scales<Blocks>(*tile.scales, block), code, x, 2 * xi,
                             acc);
  }
  for (int r = 0; r < Rows; ++r)
    sums[r] += _mm512_reduce_add_ps(acc[r]);
}

// Calls Kernel::template group_blocks<R, Blocks>(...) for the weight's blocks per chunk.
template <typename Kernel, int R>
inline void run_lanes_group(const GemvProblem& p, const RowTile& tile, float* sums) {
  switch (blocks_per_lane_chunk(p.weight->blocksize_log2 - 1)) {
    case 4:
      return Kernel::template group_blocks<R, 4>(p, tile, sums);
    case 2:
      return Kernel::template group_blocks<R, 2>(p, tile, sums);
    default:
      return Kernel::template group_blocks<R, 1>(p, tile, sums);
  }
}

struct Avx512LanesKernel : Avx512ScaleDecode {
  static constexpr bool kStreamPrefetch = true;
  static constexpr int kRowGroup = kGemvRowGroup;
  static constexpr int kXElementBytes = sizeof(float);
  template <int Rows, int Blocks>
  static void group_blocks(const GemvProblem& p, const RowTile& tile, float* sums) {
    avx512_lanes_group<Rows, Blocks>(p, tile, sums);
  }
  template <int Rows>
  static void group(const GemvProblem& p, const RowTile& tile, float* sums) {
    run_lanes_group<Avx512LanesKernel, Rows>(p, tile, sums);
  }
  static void run(const GemvProblem& p, const RowTile& tile, int rows, float* sums) {
    run_group<Avx512LanesKernel>(p, tile, rows, sums);
  }
};

void gemv_rows_avx512_lanes(const GemvProblem& p, int64_t n_begin, int64_t n_end) {
  gemv_rows_tiled<Avx512LanesKernel>(p, n_begin, n_end);
}

// ---------------------------- AVX-512 streaming driver: weight rows in order, few rows of x
//
// For one group of x rows (M <= 4 with fp32 / fp16 x, M <= 2 with bf16 x) the weights are read
// once, so they can stream: this driver runs weight rows back to back, the chunk loop inline,
// each row's sums in registers, and adds up 16 rows' sums together (avx512_row_sums). At M = 1
// the tiled driver's work per weight row (a tile, a call through the group dispatch, a
// horizontal sum) took about a third of a row's time at in_features 4096 (rows of 2048 packed
// bytes ran at 27 GB/s on one core with the weights in L3, against 40 GB/s for the chunk loop
// alone, from the times at in_features 2048 and 4096). Measured against the tiled driver (C++
// driver, 4096 x 4096 NF4, blocksize 64, double quant, the two interleaved in one process; GB/s
// of weight bytes), fp32 x at M = 1: weights from DRAM, two threads 52.3 against 48.8, one
// thread 28.5 against 26.0; in L3, 58.5 against 53.2 and 31.4 against 28.5. From DRAM, two
// threads, at M = 2 / 3 / 4: 32.8-33.8 / 20.2-21.2 / 14.5-15.3 against 23.4-24.5 / 16.6-17.3 /
// 13.2-14.0.
//
// Longer rows (x beyond L1) run in slices (RowSlice), each slice over all of the task's rows:
// the tiled driver's panels of 16 rows interleave 16 short runs of weights, which left rows of
// in_features 11008 and 16384 at 20-23 GB/s from DRAM on two threads (M = 1); sliced here,
// 32-39 (fp32 x; bf16 x at 16384: 26-28 -> 39-49; M = 2 at 11008: 17 -> 25, bf16 24 -> 35).

constexpr int kStreamingPanel = kLanes;  // one row sum per lane of avx512_row_sums
// The bytes of x a slice of rows may span: two thirds of a 48 KiB L1D. Against the tiled
// driver's 24 KiB, 32 KiB made fp32 x at in_features 8192 (one slice instead of two) 39% faster
// and 16384 12% faster (weights from DRAM, two threads); 44 KiB was slower.
constexpr int64_t kStreamingXBudgetBytes = 32 << 10;

// A slice [begin, end) of every weight row's packed bytes: rows whose x exceeds the budget run
// slice by slice, each slice over all of the task's rows, so that x's slice stays in L1 and the
// weights are still read in long runs. prefetch_delta: how far ahead of a read its prefetch
// goes, the same position some rows on (kStreamPrefetchBytes of reading order).
struct RowSlice {
  int64_t begin;
  int64_t end;
  int64_t prefetch_delta;
};

// Lane i: the sum of the lanes of v[i], for 16 vectors. Each level adds the two halves of a
// pair of vectors packed side by side (45 shuffles and adds for 16 vectors, against ~8 per
// vector summed alone); the last level leaves the sum of v[q + 4j] in lane 4q + j, which the
// final permute transposes.
LP_TARGET_AVX512 inline __m512 avx512_row_sums(const __m512* v) {
  __m512 pairs[8];  // quarters 0-1: a partial sum of v[2i], quarters 2-3: of v[2i + 1]
  for (int i = 0; i < 8; ++i) {
    pairs[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  __m512 quads[4];  // quarter q: a partial sum of v[4i + q]
  for (int i = 0; i < 4; ++i) {
    quads[i] = _mm512_add_ps(
        _mm512_shuffle_f32x4(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
        _mm512_shuffle_f32x4(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  __m512 octets[2];  // quarter q: elements 0-1 a partial sum of v[8i + q], 2-3 of v[8i + 4 + q]
  for (int i = 0; i < 2; ++i) {
    octets[i] =
        _mm512_add_ps(_mm512_shuffle_ps(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                      _mm512_shuffle_ps(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 sums =
      _mm512_add_ps(_mm512_shuffle_ps(octets[0], octets[1], _MM_SHUFFLE(2, 0, 2, 0)),
                    _mm512_shuffle_ps(octets[0], octets[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i transpose = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(transpose, sums);
}

// The scales of a row within one nested block (double quant), by block: each block's absmax code
// looked up in the table of its nested block's decoded scales (NestedScaleTable).
struct CodedScales {
  const uint8_t* codes;  // every block's
  const float* scale_of_code;
  float of(int64_t block) const { return scale_of_code[codes[block]]; }
};

// The same for a row across two nested blocks. A type of its own: choosing the table per block
// cost rows within one nested block 5-10% (4096 x 4096, blocksize 64, fp32 x).
struct CodedScalesAcrossNested {
  const uint8_t* codes;
  const float* scale_of_code[2];  // the row's first nested block's table, then the next one's
  int64_t second_nested_begin;    // the first block of the next nested block
  float of(int64_t block) const {
    return scale_of_code[block >= second_nested_begin][codes[block]];
  }
};

// The decoded scale of every absmax code in one nested block (decode_nested_absmax, the same
// product and sum): a row within one nested block then reads each block's scale with a byte load
// and a broadcast load in its chunk loop, and decodes nothing per row. Decoding each row's 64
// scales by byte planes first cost ~8% of the row at in_features 4096 (measured against reading
// the codes and converting them, which gave the same time as no decode at all).
struct NestedScaleTable {
  alignas(64) float scale_of_code[kCodebookSize8bit];
  int64_t nested_block = -1;
};

LP_TARGET_AVX512 inline void build_nested_scale_table(const BlockScales& s, int64_t nested_block,
                                                      NestedScaleTable* table) {
  const __m512 nested_absmax = _mm512_set1_ps(s.nested_absmax[nested_block]);
  const __m512 offset = _mm512_set1_ps(*s.offset);
  for (int c = 0; c < kCodebookSize8bit; c += kAvx512Lanes) {
    const __m512 scaled = _mm512_mul_ps(_mm512_loadu_ps(s.nested_code + c), nested_absmax);
    _mm512_store_ps(table->scale_of_code + c, _mm512_add_ps(scaled, offset));
  }
  table->nested_block = nested_block;
}

// The tables of the nested blocks a row of the streaming driver touches, kept while rows stay in
// them (two: a row spans at most two nested blocks where this driver reads scales by code).
class NestedScaleTables {
 public:
  // The table of nested block `first`, and (if `second` >= 0) of `second`, both valid together.
  LP_TARGET_AVX512 void get(const BlockScales& s, int64_t first, int64_t second,
                            const float** first_table, const float** second_table) {
    const int i = slot(s, first, -1);
    *first_table = tables_[i].scale_of_code;
    if (second >= 0) *second_table = tables_[slot(s, second, i)].scale_of_code;
  }

 private:
  // The slot holding nested block `block`: if absent, built in the slot built longest ago, never
  // in slot `keep` (-1: none).
  LP_TARGET_AVX512 int slot(const BlockScales& s, int64_t block, int keep) {
    for (int i = 0; i < 2; ++i)
      if (tables_[i].nested_block == block) return i;
    int i = tables_[0].built_at <= tables_[1].built_at ? 0 : 1;
    if (i == keep) i ^= 1;
    build_nested_scale_table(s, block, &tables_[i]);
    tables_[i].built_at = ++builds_;
    return i;
  }

  struct Entry : NestedScaleTable {
    int64_t built_at = 0;
  };
  Entry tables_[2];
  int64_t builds_ = 0;
};

// Runs Row::sum (for each of the Rows rows of x, the vector whose lanes add up to its product
// with one weight row, over a slice of the row) over whole weight rows, 16 at a time, slice by
// slice (RowSlice).
template <typename Row, int Rows>
LP_TARGET_AVX512 void avx512_streaming_rows(const GemvProblem& p, int64_t n_begin, int64_t n_end) {
  const BlockScales& s = p.weight->scales;
  // Rows rows of x in the budget, in whole steps of the row kernel; the slices as even as that
  // allows.
  constexpr int64_t kGranule = Row::kSliceGranuleBytes;
  static_assert(kStreamingXBudgetBytes / (Rows * 2 * Row::kXElementBytes) >= kGranule,
                "the x budget holds a step of every row of x");
  constexpr int64_t kMaxSliceBytes =
      slice_bytes_for(kStreamingXBudgetBytes, Rows, Row::kXElementBytes, kGranule);
  const int64_t slice_count = (p.half_len + kMaxSliceBytes - 1) / kMaxSliceBytes;
  const int64_t slice_bytes = (p.half_len + slice_count - 1) / slice_count;
  const int64_t slice_step = (slice_bytes + kGranule - 1) / kGranule * kGranule;
  std::vector<float> scale_buffer(static_cast<size_t>(max_blocks_per_row(p)));
  std::vector<float> row_totals(slice_count > 1 ? static_cast<size_t>((n_end - n_begin) * Rows)
                                                : 0);
  NestedScaleTables tables;
  alignas(64) float sums[Rows][kStreamingPanel];
  for (int64_t t0 = 0; t0 < p.half_len; t0 += slice_step) {
    const int64_t t1 = std::min(p.half_len, t0 + slice_step);
    const int64_t rows_ahead = (kStreamPrefetchBytes + (t1 - t0) - 1) / (t1 - t0);
    const RowSlice slice{t0, t1, rows_ahead * p.half_len};
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kStreamingPanel) {
      const int panel = static_cast<int>(std::min<int64_t>(kStreamingPanel, n_end - n0));
      __m512 row_sums[Rows][kStreamingPanel];
      for (int i = 0; i < panel; ++i) {
        const int64_t first_byte = (n0 + i) * p.half_len;
        const BlockRange blocks = row_blocks(p, n0 + i);
        const int64_t nested_first = blocks.begin >> s.nested_blocksize_log2;
        const int64_t nested_last = (blocks.end - 1) >> s.nested_blocksize_log2;
        __m512 acc[Rows];
        if (s.double_quantized() && nested_last == nested_first) {
          CodedScales coded{s.absmax_codes, nullptr};
          tables.get(s, nested_first, -1, &coded.scale_of_code, nullptr);
          Row::template sum<Rows>(p, first_byte, coded, slice, acc);
        } else if (s.double_quantized() && nested_last == nested_first + 1) {
          CodedScalesAcrossNested coded{s.absmax_codes, {}, nested_last << s.nested_blocksize_log2};
          tables.get(s, nested_first, nested_last, &coded.scale_of_code[0],
                     &coded.scale_of_code[1]);
          Row::template sum<Rows>(p, first_byte, coded, slice, acc);
        } else {
          // Rows across three or more nested blocks (blocks of 32 at in_features above 8192, or
          // small nested blocks): decoded per slice, so 2-3 times per row where rows are sliced.
          const RowScales scales = Avx512ScaleDecode::decode_scales(p, n0 + i, scale_buffer.data());
          Row::template sum<Rows>(p, first_byte, scales, slice, acc);
        }
        for (int r = 0; r < Rows; ++r)
          row_sums[r][i] = acc[r];
      }
      for (int r = 0; r < Rows; ++r) {
        for (int i = panel; i < kStreamingPanel; ++i)
          row_sums[r][i] = _mm512_setzero_ps();
        _mm512_store_ps(sums[r], avx512_row_sums(row_sums[r]));
      }
      for (int i = 0; i < panel; ++i) {
        float out[Rows];  // y[0..Rows) of weight row n0 + i
        for (int r = 0; r < Rows; ++r)
          out[r] = sums[r][i];
        if (slice_count == 1) {
          write_outputs(p, n0 + i, out);
          continue;
        }
        float* total = &row_totals[(n0 + i - n_begin) * Rows];
        for (int r = 0; r < Rows; ++r)
          total[r] = t0 == 0 ? out[r] : total[r] + out[r];
      }
    }
  }
  if (slice_count > 1) {
    for (int64_t n = n_begin; n < n_end; ++n)
      write_outputs(p, n, &row_totals[(n - n_begin) * Rows]);
  }
}

// Calls avx512_streaming_rows<Row, p.rows>; gemv_path_for sends only 1 to kMaxRows rows of x
// here (the driver writes Rows outputs per weight row).
template <typename Row, int kMaxRows>
void avx512_streaming_rows_for(const GemvProblem& p, int64_t n_begin, int64_t n_end) {
  if constexpr (kMaxRows > 1) {
    if (p.rows < kMaxRows) return avx512_streaming_rows_for<Row, kMaxRows - 1>(p, n_begin, n_end);
  }
  avx512_streaming_rows<Row, kMaxRows>(p, n_begin, n_end);
}

// A row of the lane-strided kernel (rows are whole chunks).
template <int Blocks>
struct Avx512LanesRow {
  static constexpr int64_t kXElementBytes = sizeof(float);  // x_lanes
  static constexpr int64_t kSliceGranuleBytes = kLaneChunkBytes;
  template <int Rows, typename Scales>
  LP_TARGET_AVX512 LP_ALWAYS_INLINE static void sum(const GemvProblem& p, int64_t first_byte,
                                                    const Scales& scales, const RowSlice& slice,
                                                    __m512* out) {
    const uint8_t* row = p.weight->packed + first_byte;
    const int bytes_per_block_log2 = p.weight->blocksize_log2 - 1;
    const __m512 code = _mm512_loadu_ps(p.weight->code);
    const float* x[Rows];
    __m512 acc[Rows];  // in registers: `out` (the caller's array) would chain through memory
    for (int r = 0; r < Rows; ++r) {
      x[r] = p.x_lanes + r * p.in_features;
      acc[r] = _mm512_setzero_ps();
    }
    for (int64_t xi = slice.begin; xi < slice.end; xi += kLaneChunkBytes) {
      simd::prefetch_l2(row + xi + slice.prefetch_delta);
      // Blocks counted from the weight's start: a row may start inside a block.
      const __m512 lane_scale =
          lane_scales<Blocks>(scales, (first_byte + xi) >> bytes_per_block_log2);
      avx512_lanes_chunk<Rows>(row + xi, lane_scale, code, x, 2 * xi, acc);
    }
    for (int r = 0; r < Rows; ++r)
      out[r] = acc[r];
  }
};

void gemv_rows_avx512_lanes_streaming(const GemvProblem& p, int64_t n_begin, int64_t n_end) {
  switch (blocks_per_lane_chunk(p.weight->blocksize_log2 - 1)) {
    case 4:
      return avx512_streaming_rows_for<Avx512LanesRow<4>, kGemvRowGroup>(p, n_begin, n_end);
    case 2:
      return avx512_streaming_rows_for<Avx512LanesRow<2>, kGemvRowGroup>(p, n_begin, n_end);
    default:
      return avx512_streaming_rows_for<Avx512LanesRow<1>, kGemvRowGroup>(p, n_begin, n_end);
  }
}

// ------------------------------------------------------------------ AVX-512 BF16 path (bf16 x)
//
// bf16 x computes in bf16 (x's dtype), so its products may take the decoded weights rounded to
// bf16: the block's table is code * scale rounded to bf16, 16 entries repeated to fill the 32
// 16-bit lanes of a vpermw table (its 5-bit index then ignores bit 4, so the low nibble needs
// no mask). 32 packed bytes give 64 weights by two vpermw, and vdpbf16ps multiplies them with
// bf16 x, accumulating pairs of products in fp32: half the instructions of the fp32 path.

constexpr int64_t kBf16ChunkBytes = 32;
// Rows of x per pass over a weight row: the products, not the decode, bound this kernel, so
// a larger group than the fp32 kernel's amortizes the decode over more rows.
constexpr int kGemvRowGroupBf16 = 4;

// 32-byte chunks per step of the bf16 kernels, two accumulation chains each per row of x: few
// rows give few independent chains, so two chunks per step then (at one row, four chunks per
// step measured 4% slower than two).
constexpr int bf16_chunks_per_step(int rows) {
  return rows < 4 ? 2 : 1;
}

LP_TARGET_AVX512_BF16 inline __mmask32 first_lanes32(int64_t count) {
  return static_cast<__mmask32>((uint64_t{1} << count) - 1u);
}

template <int Rows, bool Masked>
LP_TARGET_AVX512_BF16 LP_ALWAYS_INLINE void bf16_gemv_chunk(const uint8_t* bytes, __m512i table,
                                                            const uint16_t* const* xe,
                                                            const uint16_t* const* xo, int64_t xi,
                                                            __mmask32 lanes, __m512* acc_even,
                                                            __m512* acc_odd) {
  const __m256i packed = Masked ? _mm256_maskz_loadu_epi8(lanes, bytes)
                                : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
  const __m512i codes = _mm512_cvtepu8_epi16(packed);
  __m512i w_even = _mm512_permutexvar_epi16(_mm512_srli_epi16(codes, 4), table);
  __m512i w_odd = _mm512_permutexvar_epi16(codes, table);
  if constexpr (Masked) {  // 0 * 0 in the unused lanes, even if the scale is inf
    w_even = _mm512_maskz_mov_epi16(lanes, w_even);
    w_odd = _mm512_maskz_mov_epi16(lanes, w_odd);
  }
  for (int r = 0; r < Rows; ++r) {
    const __m512i x_even =
        Masked ? _mm512_maskz_loadu_epi16(lanes, xe[r] + xi) : _mm512_loadu_si512(xe[r] + xi);
    const __m512i x_odd =
        Masked ? _mm512_maskz_loadu_epi16(lanes, xo[r] + xi) : _mm512_loadu_si512(xo[r] + xi);
    acc_even[r] = _mm512_dpbf16_ps(acc_even[r], (__m512bh)w_even, (__m512bh)x_even);
    acc_odd[r] = _mm512_dpbf16_ps(acc_odd[r], (__m512bh)w_odd, (__m512bh)x_odd);
  }
}

// Products of the packed bytes [begin, end) of the tile's row with any alignment and
// blocksize: block by block, partial vectors masked. The group kernel below sends only the
// unaligned ends of a slice here, keeping its own loop free of branches (and its
// accumulators in registers).
template <int Rows>
LP_TARGET_AVX512_BF16 __attribute__((noinline)) void bf16_gemv_edges(const GemvProblem& p,
                                                                     const RowTile& tile,
                                                                     int64_t begin, int64_t end,
                                                                     float* sums) {
  constexpr int kChunksPerStep = bf16_chunks_per_step(Rows);
  const Packed4bit& w = *p.weight;
  const RowSegment& segment = *tile.segment;
  const uint16_t* xe[Rows];
  const uint16_t* xo[Rows];
  for (int r = 0; r < Rows; ++r) {
    xe[r] = p.x_split_bf16 + split_offset(p, segment.parity, tile.m0 + r, 0);
    xo[r] = p.x_split_bf16 + split_offset(p, segment.parity, tile.m0 + r, 1);
  }
  __m512 acc[2 * kChunksPerStep][Rows];
  for (int a = 0; a < 2 * kChunksPerStep; ++a)
    for (int r = 0; r < Rows; ++r)
      acc[a][r] = _mm512_setzero_ps();
  const __m512 code = _mm512_loadu_ps(w.code);
  const int bytes_per_block_log2 = w.blocksize_log2 - 1;
  for (int64_t j = begin; j < end;) {
    const int64_t block = j >> bytes_per_block_log2;
    const int64_t piece_end = std::min(end, (block + 1) << bytes_per_block_log2);
    const __m256bh table_bf16 =
        _mm512_cvtneps_pbh(_mm512_mul_ps(code, _mm512_set1_ps(tile.scales->of(block))));
    const __m512i table = _mm512_broadcast_i64x4((__m256i)table_bf16);
    constexpr int64_t kStepBytes = kChunksPerStep * kBf16ChunkBytes;
    for (; j + kStepBytes <= piece_end; j += kStepBytes) {
      const int64_t xi = j - segment.first_byte;
      bf16_gemv_chunk<Rows, false>(w.packed + j, table, xe, xo, xi, 0, acc[0], acc[1]);
      if constexpr (kChunksPerStep == 2) {
        bf16_gemv_chunk<Rows, false>(w.packed + j + kBf16ChunkBytes, table, xe, xo,
                                     xi + kBf16ChunkBytes, 0, acc[2], acc[3]);
      }
    }
    while (j < piece_end) {
      const int64_t count = std::min(piece_end - j, kBf16ChunkBytes);
      if (count == kBf16ChunkBytes) {
        bf16_gemv_chunk<Rows, false>(w.packed + j, table, xe, xo, j - segment.first_byte, 0, acc[0],
                                     acc[1]);
      } else {
        bf16_gemv_chunk<Rows, true>(w.packed + j, table, xe, xo, j - segment.first_byte,
                                    first_lanes32(count), acc[0], acc[1]);
      }
      j += count;
    }
  }
  for (int r = 0; r < Rows; ++r) {
    __m512 total = _mm512_add_ps(acc[0][r], acc[1][r]);
    if constexpr (kChunksPerStep == 2) {
      total = _mm512_add_ps(total, _mm512_add_ps(acc[2][r], acc[3][r]));
    }
    sums[r] += _mm512_reduce_add_ps(total);
  }
}

template <int Rows>
LP_TARGET_AVX512_BF16 inline __m512i bf16_table(__m512 code, float scale) {
  const __m256bh table = _mm512_cvtneps_pbh(_mm512_mul_ps(code, _mm512_set1_ps(scale)));
  return _mm512_broadcast_i64x4((__m256i)table);
}

template <int Rows>
LP_TARGET_AVX512_BF16 void bf16_gemv_group(const GemvProblem& p, const RowTile& tile, float* sums) {
  constexpr int kChunksPerStep = bf16_chunks_per_step(Rows);
  const Packed4bit& w = *p.weight;
  const RowSegment& segment = *tile.segment;
  const int bytes_per_block_log2 = w.blocksize_log2 - 1;
  const int64_t begin = segment.first_byte + tile.tile_begin;
  const int64_t end = segment.first_byte + tile.tile_end;
  const MainRange middle = main_range(begin, end, kBf16ChunkBytes, bytes_per_block_log2);
  if (begin < middle.begin) bf16_gemv_edges<Rows>(p, tile, begin, middle.begin, sums);
  if (middle.end < end) bf16_gemv_edges<Rows>(p, tile, middle.end, end, sums);
  if (middle.begin == middle.end) return;
  const uint16_t* xe[Rows];
  const uint16_t* xo[Rows];
  for (int r = 0; r < Rows; ++r) {
    xe[r] = p.x_split_bf16 + split_offset(p, segment.parity, tile.m0 + r, 0);
    xo[r] = p.x_split_bf16 + split_offset(p, segment.parity, tile.m0 + r, 1);
  }
  __m512 acc[2 * kChunksPerStep][Rows];
  for (int a = 0; a < 2 * kChunksPerStep; ++a)
    for (int r = 0; r < Rows; ++r)
      acc[a][r] = _mm512_setzero_ps();
  const __m512 code = _mm512_loadu_ps(w.code);
  const float* scales = tile.scales->scales;
  const int64_t first_block = tile.scales->first_block;
  int64_t j = middle.begin;
  // Each 32-byte chunk lies in one block (blocks >= 32 bytes, chunks 32-aligned): one table each.
  for (; j + kChunksPerStep * kBf16ChunkBytes <= middle.end;
       j += kChunksPerStep * kBf16ChunkBytes) {
    if (tile.stream_prefetch) simd::prefetch_l2(w.packed + j + kStreamPrefetchBytes);
    const int64_t xi = j - segment.first_byte;
    const __m512i table = bf16_table<Rows>(code, scales[(j >> bytes_per_block_log2) - first_block]);
    bf16_gemv_chunk<Rows, false>(w.packed + j, table, xe, xo, xi, 0, acc[0], acc[1]);
    if constexpr (kChunksPerStep == 2) {
      const int64_t j1 = j + kBf16ChunkBytes;
      const __m512i table1 =
          bf16_table<Rows>(code, scales[(j1 >> bytes_per_block_log2) - first_block]);
      bf16_gemv_chunk<Rows, false>(w.packed + j1, table1, xe, xo, xi + kBf16ChunkBytes, 0, acc[2],
                                   acc[3]);
    }
  }
  if (j < middle.end) {  // one chunk left over from two-chunk steps
    const __m512i table = bf16_table<Rows>(code, scales[(j >> bytes_per_block_log2) - first_block]);
    bf16_gemv_chunk<Rows, false>(w.packed + j, table, xe, xo, j - segment.first_byte, 0, acc[0],
                                 acc[1]);
  }
  for (int r = 0; r < Rows; ++r) {
    __m512 total = _mm512_add_ps(acc[0][r], acc[1][r]);
    if constexpr (kChunksPerStep == 2) {
      total = _mm512_add_ps(total, _mm512_add_ps(acc[2][r], acc[3][r]));
    }
    sums[r] += _mm512_reduce_add_ps(total);
  }
}

struct Avx512Bf16Kernel : Avx512ScaleDecode {
  static constexpr bool kStreamPrefetch = true;
  static constexpr int kRowGroup = kGemvRowGroupBf16;
  static constexpr int kXElementBytes = sizeof(uint16_t);
  template <int Rows>
  static void group(const GemvProblem& p, const RowTile& tile, float* sums) {
    bf16_gemv_group<Rows>(p, tile, sums);
  }
  static void run(const GemvProblem& p, const RowTile& tile, int rows, float* sums) {
    run_group<Avx512Bf16Kernel>(p, tile, rows, sums);
  }
};

void gemv_rows_avx512_bf16(const GemvProblem& p, int64_t n_begin, int64_t n_end) {
  gemv_rows_tiled<Avx512Bf16Kernel>(p, n_begin, n_end);
}

// Rows of bf16 x the streaming driver takes; more go to the tiled driver. Against it (4096 x
// 4096, two threads, from DRAM): M = 1 +9%, M = 2 +24%, but M = 3 -6% and M = 4 -2 to -5%.
constexpr int kBf16StreamingRowsMax = 2;

// The bf16 weight rows the streaming driver takes: whole 32-byte chunks, each within one block.
inline bool bf16_streaming_used(int64_t in_features, int blocksize_log2) {
  return in_features % (2 * kBf16ChunkBytes) == 0 &&
         (int64_t{1} << (blocksize_log2 - 1)) >= kBf16ChunkBytes;
}

// A row of the bf16 kernel for the streaming driver: rows of whole 32-byte chunks, each within
// one block. Not inlined into the driver, which is compiled for AVX-512 without BF16.
struct Avx512Bf16Row {
  static constexpr int64_t kXElementBytes = sizeof(uint16_t);  // x_split_bf16
  // Whole steps of the widest (kBf16StreamingRowsMax rows), which are also whole cache lines
  // for the prefetch.
  static constexpr int64_t kSliceGranuleBytes = 2 * kBf16ChunkBytes;
  static_assert(bf16_chunks_per_step(kBf16StreamingRowsMax) * kBf16ChunkBytes <=
                kSliceGranuleBytes);
  template <int Rows, typename Scales>
  LP_TARGET_AVX512_BF16 __attribute__((noinline)) static void sum(const GemvProblem& p,
                                                                  int64_t first_byte,
                                                                  const Scales& scales,
                                                                  const RowSlice& slice,
                                                                  __m512* out) {
    constexpr int kChunksPerStep = bf16_chunks_per_step(Rows);
    const uint8_t* row = p.weight->packed + first_byte;
    const int bytes_per_block_log2 = p.weight->blocksize_log2 - 1;
    const __m512 code = _mm512_loadu_ps(p.weight->code);
    const uint16_t* xe[Rows];
    const uint16_t* xo[Rows];
    for (int r = 0; r < Rows; ++r) {
      xe[r] = p.x_split_bf16 + split_offset(p, 0, r, 0);
      xo[r] = p.x_split_bf16 + split_offset(p, 0, r, 1);
    }
    __m512 acc[kChunksPerStep][2][Rows];
    for (int c = 0; c < kChunksPerStep; ++c)
      for (int r = 0; r < Rows; ++r)
        acc[c][0][r] = acc[c][1][r] = _mm512_setzero_ps();
    int64_t j = slice.begin;
    for (; j + kChunksPerStep * kBf16ChunkBytes <= slice.end;
         j += kChunksPerStep * kBf16ChunkBytes) {
      for (int c = 0; c < kChunksPerStep; ++c) {
        const int64_t jc = j + c * kBf16ChunkBytes;
        if (jc % kCacheLineBytes == 0) simd::prefetch_l2(row + jc + slice.prefetch_delta);
        const __m512i table =
            bf16_table<1>(code, scales.of((first_byte + jc) >> bytes_per_block_log2));
        bf16_gemv_chunk<Rows, false>(row + jc, table, xe, xo, jc, 0, acc[c][0], acc[c][1]);
      }
    }
    for (; j < slice.end; j += kBf16ChunkBytes) {  // the chunks left after whole steps
      if (j % kCacheLineBytes == 0) simd::prefetch_l2(row + j + slice.prefetch_delta);
      const __m512i table =
          bf16_table<1>(code, scales.of((first_byte + j) >> bytes_per_block_log2));
      bf16_gemv_chunk<Rows, false>(row + j, table, xe, xo, j, 0, acc[0][0], acc[0][1]);
    }
    for (int r = 0; r < Rows; ++r) {
      __m512 total = _mm512_add_ps(acc[0][0][r], acc[0][1][r]);
      for (int c = 1; c < kChunksPerStep; ++c)
        total = _mm512_add_ps(total, _mm512_add_ps(acc[c][0][r], acc[c][1][r]));
      out[r] = total;
    }
  }
};

void gemv_rows_avx512_bf16_streaming(const GemvProblem& p, int64_t n_begin, int64_t n_end) {
  avx512_streaming_rows_for<Avx512Bf16Row, kBf16StreamingRowsMax>(p, n_begin, n_end);
}

#endif  // LOWPREC_X86_SIMD

using GemvRowsFn = void (*)(const GemvProblem& p, int64_t n_begin, int64_t n_end);

bool bf16_dot_available(CpuIsa isa) {
#if LOWPREC_X86_SIMD
  return isa == CpuIsa::kAvx512 && cpu_has_avx512_bf16();
#else
  (void)isa;
  return false;
#endif
}

// The x layout a row kernel reads: split into even / odd elements (as fp32, or as bf16 bits for
// the vdpbf16ps kernel), or lane-strided.
enum class XLayout { kSplit, kSplitBf16, kLanes };

struct GemvPath {
  GemvRowsFn rows_fn;
  XLayout x_layout;
};

GemvPath gemv_path_for(CpuIsa isa, FloatType x_type, int64_t rows, int64_t in_features,
                       int blocksize_log2) {
#if LOWPREC_X86_SIMD
  if (x_type == FloatType::kBFloat16 && bf16_dot_available(isa)) {
    if (rows <= kBf16StreamingRowsMax && in_features > 0 &&
        bf16_streaming_used(in_features, blocksize_log2))
      return {&gemv_rows_avx512_bf16_streaming, XLayout::kSplitBf16};
    return {&gemv_rows_avx512_bf16, XLayout::kSplitBf16};
  }
  if (isa == CpuIsa::kAvx512) {
    if (!lane_strided_used(in_features)) return {&gemv_rows_avx512, XLayout::kSplit};
    // in_features 0 (y = bias) takes the tiled driver: the streaming one divides by the row's
    // length.
    if (rows <= kGemvRowGroup && in_features > 0)
      return {&gemv_rows_avx512_lanes_streaming, XLayout::kLanes};
    return {&gemv_rows_avx512_lanes, XLayout::kLanes};
  }
  if (isa == CpuIsa::kAvx2) return {&gemv_rows_avx2, XLayout::kSplit};
#endif
  (void)isa;
  (void)x_type;
  (void)rows;
  (void)in_features;
  (void)blocksize_log2;
  return {&gemv_rows_scalar, XLayout::kSplit};
}

}  // namespace

bool gemv_uses_bf16_dot() {
  return bf16_dot_available(active_cpu_isa());
}

void matmul_4bit_gemv(const void* x, FloatType x_type, int64_t rows, const Packed4bit& weight,
                      int64_t out_features, int64_t in_features, const float* bias, void* y) {
  const int64_t K = in_features;
  const int parities = (K & 1) ? 2 : 1;
  const int64_t half_len = K / 2;
  const GemvPath path = gemv_path_for(active_cpu_isa(), x_type, rows, K, weight.blocksize_log2);
  simd::CacheLineVector<float> x_float(static_cast<size_t>(rows * K));
  for (int64_t i = 0; i < rows * K; ++i)
    x_float[i] = load_float(x, i, x_type);
  GemvProblem problem{&weight, rows,     out_features, K, x_float.data(), nullptr, nullptr,
                      nullptr, half_len, bias,         y, x_type};
  BytePlanes nested_code_planes;
  // Rows of fewer than 64 blocks would take the permute tree anyway.
  if (weight.scales.double_quantized() && (K >> weight.blocksize_log2) >= kBytePlaneCodes &&
      active_cpu_isa() == CpuIsa::kAvx512 && cpu_has_avx512_vbmi()) {
    build_byte_planes(weight.scales.nested_code, &nested_code_planes);
    problem.nested_code_planes = &nested_code_planes;
  }
  simd::CacheLineVector<float> x_split;
  simd::CacheLineVector<uint16_t> x_bf16;
  simd::CacheLineVector<float> x_lanes;
  switch (path.x_layout) {
    case XLayout::kLanes:
      x_lanes.resize(x_float.size());
      to_lane_strided(x_float.data(), rows * K, x_lanes.data());
      problem.x_lanes = x_lanes.data();
      break;
    case XLayout::kSplit:
    case XLayout::kSplitBf16:
      x_split.resize(static_cast<size_t>(parities * rows * 2 * std::max<int64_t>(half_len, 1)));
      problem.x_split = x_split.data();
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
      if (path.x_layout == XLayout::kSplitBf16) {
        x_bf16.resize(x_split.size());
        for (size_t i = 0; i < x_split.size(); ++i)
          x_bf16[i] = float_to_bf16_bits(x_split[i]);  // exact: the values came from bf16
        problem.x_split_bf16 = x_bf16.data();
      }
      break;
  }
  const int64_t grain = std::max<int64_t>(1, kMinWeightElementsPerTask / std::max<int64_t>(K, 1));
  parallel_for(0, out_features, grain,
               [&](int64_t n_begin, int64_t n_end) { path.rows_fn(problem, n_begin, n_end); });
}

}  // namespace lowprec::cpu
