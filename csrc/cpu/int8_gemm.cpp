// The LLM.int8 GEMM on the CPU: out = epilogue(A [M, K] int8 @ W [N, K].T int8), the products
// summed exactly in int32, dequantized, biased and given the outlier term in the epilogue, so
// no M x N int32 or float32 intermediate is ever written out. Paths, chosen at run time:
//
// * vnni-packed (AVX-512 VNNI, M > kVnniDotMaxRows): BLIS-style. vpdpbusd multiplies unsigned
//   by signed bytes, so W is offset to unsigned (w + 128, an xor with 0x80) while it is packed,
//   and 128 * rowsum(A) is subtracted per row in the epilogue. A task owns one panel of
//   kPanelCols output columns and a block of rows: it packs W's panel into vpdpbusd's layout
//   (a per-thread L2 buffer, in units of 8 rows x 64 bytes interleaved with the register tiles
//   so that the transposes and W's loads overlap the vpdpbusd stream), and for each K block of
//   kVnniKBlock bytes (16 KiB of the panel: L1) runs every register tile (6 rows x 64 columns,
//   24 accumulators) of the row block against it, accumulating in an L2 buffer; then the
//   epilogue. A is packed once per call, K block by K block, so the tiles stream it in order.
//   Measured on one Zen 5 core at M = 512: ~86 % of the vpdpbusd peak, ~2 % of the time in
//   packing W. W is packed per call rather than cached: a cached copy doubles the weight's
//   memory and could go stale unnoticed (writes through .data or a NumPy view of the storage
//   do not bump the tensor's version counter; checked with torch 2.14).
// * vnni-dot (AVX-512 VNNI, M <= kVnniDotMaxRows): GEMV-shaped, memory bound. W is used as
//   stored, each 64-byte chunk of a weight row offset in a register and dotted with the
//   activation rows (in L1): for M = 1 one weight row after the other (a single sequential
//   stream), for M = 2..4 several weight rows side by side (each chunk loaded once for all M).
// * avx2-dot: the dot-product shape with 16-bit products (vpmaddwd: exact, unlike vpmaddubsw,
//   whose 16-bit pair sums saturate).
// * scalar: plain loops.
//
// torch._int_mm (oneDNN) plus this epilogue as a second pass was measured as the alternative:
// the fused kernels are faster at M >= 2 and level at M = 1 (both at memory bandwidth), so it
// is not used. Work runs in one parallel region per call (int8_tasks.h).
//
// All paths share the epilogue arithmetic of lowprec/int8.h, so they differ from one another
// only by the order of the (exact) int32 sums: their outputs are identical.
#include <math.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "cpu_isa.h"
#include "int8.h"
#include "int8_tasks.h"
#include "lowprec/float16.h"
#include "lowprec/int8.h"
#include "simd.h"

#if LOWPREC_X86_SIMD
#define LP_TARGET_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#endif

// Loops over register tiles are unrolled before GCC decides where arrays of vectors live: left
// to itself it keeps the accumulator arrays in memory and stores every update.
#if defined(__GNUC__) && !defined(__clang__)
#define LP_UNROLL_FULLY _Pragma("GCC unroll 32")
#else
#define LP_UNROLL_FULLY
#endif

namespace lowprec::cpu {
namespace {

// Output columns per task and per epilogue tile: four 16-lane int32 vectors.
constexpr int64_t kPanelCols = 64;
// vpdpbusd sums 4 byte products into each int32 lane: K is processed in groups of 4.
constexpr int64_t kKGroup = 4;
// The unsigned offset given to W for vpdpbusd (w + 128 == w ^ 0x80 as a byte).
constexpr int32_t kUnsignedOffset = 128;

// vnni-packed: a register tile is kVnniTileRows rows x kPanelCols columns (24 accumulators).
constexpr int64_t kVnniTileRows = 6;
constexpr int kVnniTileVectors = 4;  // kPanelCols / 16
// Bytes of K per block: W's packed panel block is kVnniKBlock x kPanelCols bytes (16 KiB), so
// it stays in L1 while every register tile of the row block streams past it.
constexpr int64_t kVnniKBlock = 256;
// At most this many register tiles per row block: the block's int32 accumulators (up to
// 128 x 6 x 64 x 4 bytes = 192 KiB) stay in L2 across the K blocks, beside the packed weight
// panel. Fewer, larger blocks pack each weight panel fewer times (once per block).
constexpr int64_t kVnniMaxTilesPerBlock = 128;
// vnni-dot serves M up to this (measured crossover with vnni-packed on a Zen 5 core: 4 rows
// 0.94 ms, 5 rows packed 1.18 ms, one thread, K = N = 4096).
constexpr int64_t kVnniDotMaxRows = 4;
// avx2-dot: register tile of kAvx2DotRows activation rows x kAvx2DotCols weight rows, and row
// blocks of kAvx2BlockRows activation rows per epilogue tile.
constexpr int kAvx2DotRows = 2;
constexpr int kAvx2DotCols = 4;
constexpr int64_t kAvx2BlockRows = 64;
// scalar: row blocks per epilogue tile.
constexpr int64_t kScalarBlockRows = 64;
// The least work (multiply-adds) worth a thread of its own.
constexpr int64_t kMinMacsPerThread = int64_t{1} << 22;
// Workers a call asks for at most (the pool runs min(this, its threads)); bounds the
// per-worker scratch slots.
constexpr int64_t kMaxWorkers = 256;
// Cache-line alignment of the scratch buffers.
constexpr size_t kBufferAlignment = 64;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
using AlignedBuffer = std::unique_ptr<T[], AlignedFree>;

template <typename T>
AlignedBuffer<T> aligned_buffer(int64_t count) {
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T);
  const size_t rounded = (bytes + kBufferAlignment - 1) / kBufferAlignment * kBufferAlignment;
  void* p = std::aligned_alloc(kBufferAlignment, rounded);
  if (p == nullptr) throw std::bad_alloc();
  return AlignedBuffer<T>(static_cast<T*>(p));
}

// Modular int32 arithmetic (as the SIMD instructions do), without signed-overflow UB.
inline int32_t wrapping_add(int32_t a, int32_t b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
}
inline int32_t wrapping_sub(int32_t a, int32_t b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) - static_cast<uint32_t>(b));
}
inline int32_t wrapping_mul(int32_t a, int32_t b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) * static_cast<uint32_t>(b));
}

// ------------------------------------------------------------------------------ epilogue

// Everything the epilogue needs besides the accumulators.
struct GemmContext {
  const Int8Epilogue& epilogue;
  const int8_t* W;
  int64_t M, K, N;
  std::vector<double> column_scale;  // [N]: int8_column_dequant_scale(col_stats[n])
};

GemmContext make_context(const Int8Epilogue& epilogue, const int8_t* W, int64_t M, int64_t K,
                         int64_t N) {
  GemmContext ctx{epilogue, W, M, K, N, std::vector<double>(N)};
  for (int64_t n = 0; n < N; ++n)
    ctx.column_scale[n] = int8_column_dequant_scale(epilogue.col_stats[n]);
  return ctx;
}

// The dequantized weights of the outlier columns for the output columns n0 .. n0 + cols,
// transposed: weights[o * kPanelCols + j] = W_deq[n0 + j, outlier o]. The panel's weight rows
// were just read by the GEMM, so these reads hit the cache.
void gather_outlier_weights(const GemmContext& ctx, int64_t n0, int64_t cols, float* weights) {
  const int64_t num_outliers = ctx.epilogue.num_outliers;
  const int64_t* outlier_cols = ctx.epilogue.outlier_cols;
  for (int64_t j = 0; j < cols; ++j) {
    const int8_t* row = ctx.W + (n0 + j) * ctx.K;
    const float col_stat = ctx.epilogue.col_stats[n0 + j];
    for (int64_t o = 0; o < num_outliers; ++o) {
      weights[o * kPanelCols + j] = int8_dequantize_weight(row[outlier_cols[o]], col_stat);
    }
  }
}

using simd::store_float;

// out[m, n0 + j] for the rows m0 .. m0 + rows and columns j < cols of the accumulator tile
// c (leading dimension ldc); correction[m] (or nothing) is subtracted from row m first. Every
// output is ((acc * row_stat * col_stat / 127²) + outlier term) + bias in float32, the outlier
// term summed with fmaf in column order.
template <FloatType T>
void epilogue_scalar(const int32_t* c, int64_t ldc, int64_t m0, int64_t rows, int64_t n0,
                     int64_t cols, const int32_t* correction, const GemmContext& ctx,
                     const float* outlier_weights) {
  const Int8Epilogue& ep = ctx.epilogue;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    const float row_stat = ep.row_stats[m];
    const int32_t row_correction = correction != nullptr ? correction[m] : 0;
    const float* outlier_x = ep.outlier_x + m * ep.num_outliers;
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t n = n0 + j;
      const int32_t acc = wrapping_sub(c[r * ldc + j], row_correction);
      float y = int8_dequantize(acc, row_stat, ctx.column_scale[n]);
      if (ep.num_outliers > 0) {
        float term = 0.0f;
        for (int64_t o = 0; o < ep.num_outliers; ++o) {
          term = fmaf(outlier_x[o], outlier_weights[o * kPanelCols + j], term);
        }
        y = y + term;
      }
      if (ep.bias != nullptr) y = y + ep.bias[n];
      store_float<T>(ep.out, m * ctx.N + n, y);
    }
  }
}

using EpilogueFn = void (*)(const int32_t* c, int64_t ldc, int64_t m0, int64_t rows, int64_t n0,
                            int64_t cols, const int32_t* correction, const GemmContext& ctx,
                            const float* outlier_weights);

EpilogueFn scalar_epilogue_for(FloatType type) {
  return simd::with_float_type(type, [&]<FloatType T>() { return &epilogue_scalar<T>; });
}

// Per-panel scratch for the outlier weights (empty when there are none).
std::vector<float> outlier_weight_scratch(const GemmContext& ctx) {
  return std::vector<float>(ctx.epilogue.num_outliers * kPanelCols);
}

// Where the GEMM's activation rows come from: int8 codes (int8_scaled_mm), or float x that is
// quantized on the way in (int8_linear), its outlier columns coded 0 and kept in float32.
struct ActivationSource {
  int64_t K = 0;
  const int8_t* codes = nullptr;  // [M, K] when given
  const void* x = nullptr;        // [M, K] to quantize otherwise
  FloatType x_type = FloatType::kFloat32;
  const uint32_t* outlier_bits = nullptr;  // filled by an earlier phase; null: no outliers
  float* row_stats = nullptr;              // [M], written while quantizing
  // Known from the phase that lists the outlier columns on: the columns, and x's values in them
  // [M, columns], gathered here row by row.
  const std::vector<int64_t>* outlier_cols = nullptr;
  std::vector<float>* outlier_x = nullptr;

  // The codes of rows [begin, end): in place when given, else quantized into `buffer` (row-major).
  const int8_t* rows(int64_t begin, int64_t end, int8_t* buffer) const {
    if (codes != nullptr) return codes + begin * K;
    int8_quantize_row_range(x, x_type, begin, end, K, outlier_bits, buffer, row_stats + begin);
    if (outlier_cols != nullptr && !outlier_cols->empty()) {
      const int64_t count = static_cast<int64_t>(outlier_cols->size());
      for (int64_t m = begin; m < end; ++m) {
        for (int64_t o = 0; o < count; ++o)
          (*outlier_x)[m * count + o] = simd::load_float(x, m * K + (*outlier_cols)[o], x_type);
      }
    }
    return buffer;
  }
};

// A GEMM call in flight: the context, the activations in the layout the kernel reads, and the
// number of threads it is worth. Kernels add their phases to a TaskPhases, which runs them.
struct GemmRun {
  GemmRun(const ActivationSource& source_, const Int8Epilogue& epilogue, const int8_t* W, int64_t M,
          int64_t K, int64_t N)
      : source(source_),
        ctx(make_context(epilogue, W, M, K, N)),
        workers(std::clamp<int64_t>(M * N * K / kMinMacsPerThread, 1, kMaxWorkers)) {}
  const ActivationSource& source;
  GemmContext ctx;
  int64_t workers;
  const int8_t* codes = nullptr;       // row-major activations (dot-shaped kernels)
  AlignedBuffer<int8_t> codes_buffer;  // ... when quantized here
  AlignedBuffer<int8_t> packed_a;      // vnni-packed
  std::vector<int32_t> correction;     // [M]: 128 * rowsum(A), for the VNNI kernels
};

// Scratch of the dot-shaped paths: an accumulator tile and the panel's outlier weights.
struct PanelScratch {
  std::vector<int32_t> acc;
  std::vector<float> outlier_weights;
};

// correction[m] for rows [0, M) of A [M, K] (the VNNI kernels' offset_corrections).
using CorrectionsFn = void (*)(const int8_t* A, int64_t M, int64_t K, int32_t* correction);

// The phase that gives the dot-shaped kernels row-major codes: quantized (int8_linear) or
// given (int8_scaled_mm, where only the corrections are left to compute, for kernels that
// want them: `corrections` not null).
void add_row_major_phase(GemmRun& run, TaskPhases& phases, CorrectionsFn corrections) {
  const int64_t M = run.ctx.M, K = run.ctx.K;
  if (run.source.codes != nullptr) {
    run.codes = run.source.codes;
    if (corrections == nullptr) return;
  } else {
    run.codes_buffer = aligned_buffer<int8_t>(M * K);
    run.codes = run.codes_buffer.get();
  }
  if (corrections != nullptr) run.correction.assign(M, 0);
  const int64_t chunk = int8_rows_per_task(K);
  phases.add(ceil_div(M, chunk), [&run, chunk, corrections](int64_t task, int64_t) {
    const int64_t K = run.ctx.K;
    const int64_t begin = task * chunk;
    const int64_t end = std::min(run.ctx.M, begin + chunk);
    if (run.source.codes == nullptr)
      run.source.rows(begin, end, run.codes_buffer.get() + begin * K);
    if (corrections != nullptr) {
      corrections(run.codes + begin * K, end - begin, K, run.correction.data() + begin);
    }
  });
}

// ------------------------------------------------------------------------------ scalar path

void add_scalar_phases(GemmRun& run, TaskPhases& phases) {
  add_row_major_phase(run, phases, /*corrections=*/nullptr);
  const GemmContext& ctx = run.ctx;
  auto scratch = std::make_shared<WorkerScratch<PanelScratch>>(run.workers, [&ctx] {
    return PanelScratch{std::vector<int32_t>(kScalarBlockRows * kPanelCols),
                        outlier_weight_scratch(ctx)};
  });
  const EpilogueFn epilogue = scalar_epilogue_for(ctx.epilogue.out_type);
  phases.add(ceil_div(ctx.N, kPanelCols), [&run, scratch, epilogue](int64_t panel, int64_t worker) {
    const GemmContext& ctx = run.ctx;
    const int64_t M = ctx.M, K = ctx.K;
    PanelScratch& s = scratch->get(worker);
    const int64_t n0 = panel * kPanelCols;
    const int64_t cols = std::min(kPanelCols, ctx.N - n0);
    gather_outlier_weights(ctx, n0, cols, s.outlier_weights.data());
    for (int64_t m0 = 0; m0 < M; m0 += kScalarBlockRows) {
      const int64_t rows = std::min(kScalarBlockRows, M - m0);
      for (int64_t r = 0; r < rows; ++r) {
        const int8_t* a = run.codes + (m0 + r) * K;
        for (int64_t j = 0; j < cols; ++j) {
          const int8_t* w = ctx.W + (n0 + j) * K;
          int32_t sum = 0;
          for (int64_t k = 0; k < K; ++k)
            sum = wrapping_add(sum, int32_t{a[k]} * int32_t{w[k]});
          s.acc[r * kPanelCols + j] = sum;
        }
      }
      epilogue(s.acc.data(), kPanelCols, m0, rows, n0, cols, nullptr, ctx,
               s.outlier_weights.data());
    }
  });
}

#if LOWPREC_X86_SIMD

// -------------------------------------------------------------------------------- AVX2 path

LP_TARGET_AVX2 inline int32_t avx2_sum_lanes(__m256i v) {
  __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, _MM_SHUFFLE(1, 0, 3, 2)));
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(sum);
}

constexpr int64_t kAvx2DotStep = 16;  // int8 elements widened to one vector of int16

// acc[r * ldc + j] = A row r . W row j for kRows activation rows and kAvx2DotCols weight rows
// (`w_rows` of them real; the rest repeat the last one and are not stored).
template <int kRows>
LP_TARGET_AVX2 void avx2_dot_tile(const int8_t* a, const int8_t* w, int64_t w_rows, int64_t K,
                                  int32_t* acc, int64_t ldc) {
  const int8_t* w_row[kAvx2DotCols];
  LP_UNROLL_FULLY
  for (int j = 0; j < kAvx2DotCols; ++j)
    w_row[j] = w + std::min<int64_t>(j, w_rows - 1) * K;
  __m256i sums[kRows][kAvx2DotCols];
  LP_UNROLL_FULLY
  for (int r = 0; r < kRows; ++r)
    LP_UNROLL_FULLY
  for (int j = 0; j < kAvx2DotCols; ++j)
    sums[r][j] = _mm256_setzero_si256();
  const int64_t vector_end = K / kAvx2DotStep * kAvx2DotStep;
  for (int64_t k = 0; k < vector_end; k += kAvx2DotStep) {
    __m256i a16[kRows];
    LP_UNROLL_FULLY
    for (int r = 0; r < kRows; ++r) {
      a16[r] =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + r * K + k)));
    }
    LP_UNROLL_FULLY
    for (int j = 0; j < kAvx2DotCols; ++j) {
      const __m256i w16 =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w_row[j] + k)));
      LP_UNROLL_FULLY
      for (int r = 0; r < kRows; ++r)
        sums[r][j] = _mm256_add_epi32(sums[r][j], _mm256_madd_epi16(a16[r], w16));
    }
  }
  // Reduce every accumulator (fixed indices keep them in registers), store the real ones.
  int32_t totals[kRows][kAvx2DotCols];
  LP_UNROLL_FULLY
  for (int r = 0; r < kRows; ++r)
    LP_UNROLL_FULLY
  for (int j = 0; j < kAvx2DotCols; ++j)
    totals[r][j] = avx2_sum_lanes(sums[r][j]);
  LP_UNROLL_FULLY
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < w_rows; ++j) {
      int32_t sum = totals[r][j];
      for (int64_t k = vector_end; k < K; ++k)
        sum = wrapping_add(sum, int32_t{a[r * K + k]} * int32_t{w_row[j][k]});
      acc[r * ldc + j] = sum;
    }
  }
}

void add_avx2_dot_phases(GemmRun& run, TaskPhases& phases) {
  add_row_major_phase(run, phases, /*corrections=*/nullptr);
  const GemmContext& ctx = run.ctx;
  auto scratch = std::make_shared<WorkerScratch<PanelScratch>>(run.workers, [&ctx] {
    return PanelScratch{std::vector<int32_t>(kAvx2BlockRows * kPanelCols),
                        outlier_weight_scratch(ctx)};
  });
  const EpilogueFn epilogue = scalar_epilogue_for(ctx.epilogue.out_type);
  phases.add(ceil_div(ctx.N, kPanelCols), [&run, scratch, epilogue](int64_t panel, int64_t worker) {
    const GemmContext& ctx = run.ctx;
    const int64_t M = ctx.M, K = ctx.K;
    PanelScratch& s = scratch->get(worker);
    const int64_t n0 = panel * kPanelCols;
    const int64_t cols = std::min(kPanelCols, ctx.N - n0);
    int32_t* acc = s.acc.data();
    gather_outlier_weights(ctx, n0, cols, s.outlier_weights.data());
    for (int64_t m0 = 0; m0 < M; m0 += kAvx2BlockRows) {
      const int64_t rows = std::min(kAvx2BlockRows, M - m0);
      // The weight rows of a tile stay in L1 while the block's activation rows pass by.
      for (int64_t j = 0; j < cols; j += kAvx2DotCols) {
        const int64_t w_rows = std::min<int64_t>(kAvx2DotCols, cols - j);
        const int8_t* w = ctx.W + (n0 + j) * K;
        const int8_t* a = run.codes + m0 * K;
        int64_t r = 0;
        for (; r + kAvx2DotRows <= rows; r += kAvx2DotRows) {
          avx2_dot_tile<kAvx2DotRows>(a + r * K, w, w_rows, K, acc + r * kPanelCols + j,
                                      kPanelCols);
        }
        for (; r < rows; ++r)
          avx2_dot_tile<1>(a + r * K, w, w_rows, K, acc + r * kPanelCols + j, kPanelCols);
      }
      epilogue(acc, kPanelCols, m0, rows, n0, cols, nullptr, ctx, s.outlier_weights.data());
    }
  });
}

// --------------------------------------------------------------------- AVX-512 VNNI paths

using simd::kAvx512Lanes;
constexpr int64_t kVnniBytes = 64;  // int8 elements per vector

LP_TARGET_AVX512_VNNI inline __mmask64 vnni_first_bytes(int64_t count) {
  return count >= kVnniBytes ? ~__mmask64{0} : ((__mmask64{1} << count) - 1);
}

LP_TARGET_AVX512_VNNI inline __mmask16 vnni_first_lanes(int64_t count) {
  return static_cast<__mmask16>(count >= 16 ? 0xFFFFu : ((1u << count) - 1u));
}

// Rounded to nearest even as c10 does (simd::avx512_narrow); lanes not in `lanes` untouched.
template <FloatType T>
LP_TARGET_AVX512_VNNI inline void avx512_store(void* data, int64_t i, __m512 value,
                                               __mmask16 lanes) {
  if constexpr (T == FloatType::kFloat32) {
    _mm512_mask_storeu_ps(static_cast<float*>(data) + i, lanes, value);
  } else {
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(data) + i, lanes,
                             _mm512_cvtepi32_epi16(simd::avx512_narrow<T>(value)));
  }
}

// Rows whose outlier terms the vector epilogue sums side by side: with the panel's 4 vectors
// per row, 8 independent fmadd chains, enough to hide their latency.
constexpr int64_t kEpilogueRows = 2;
constexpr int kPanelVectors = kPanelCols / kAvx512Lanes;

// term[i][v] = sum_o outlier_x[row i, o] * outlier_weights[o, vector v], for kRows rows.
template <int kRows>
LP_TARGET_AVX512_VNNI inline void avx512_outlier_terms(
    const float* outlier_x, int64_t num_outliers, const float* outlier_weights,
    const __mmask16 (&lanes)[kPanelVectors], __m512 (&term)[kEpilogueRows][kPanelVectors]) {
  // Summed in locals, stored once: GCC keeps a by-reference array in memory.
  __m512 sums[kRows][kPanelVectors];
  LP_UNROLL_FULLY
  for (int i = 0; i < kRows; ++i)
    LP_UNROLL_FULLY
  for (int v = 0; v < kPanelVectors; ++v)
    sums[i][v] = _mm512_setzero_ps();
  for (int64_t o = 0; o < num_outliers; ++o) {
    __m512 w[kPanelVectors];
    LP_UNROLL_FULLY
    for (int v = 0; v < kPanelVectors; ++v)
      w[v] = _mm512_maskz_loadu_ps(lanes[v], outlier_weights + o * kPanelCols + v * kAvx512Lanes);
    LP_UNROLL_FULLY
    for (int i = 0; i < kRows; ++i) {
      const __m512 xo = _mm512_set1_ps(outlier_x[i * num_outliers + o]);
      LP_UNROLL_FULLY
      for (int v = 0; v < kPanelVectors; ++v)
        sums[i][v] = _mm512_fmadd_ps(xo, w[v], sums[i][v]);
    }
  }
  LP_UNROLL_FULLY
  for (int i = 0; i < kRows; ++i)
    LP_UNROLL_FULLY
  for (int v = 0; v < kPanelVectors; ++v)
    term[i][v] = sums[i][v];
}

// int8_dequantize on 8 lanes, in float64: column_scale's lanes outside `lanes` are not read.
LP_TARGET_AVX512_VNNI inline __m256 avx512_dequantize_half(__m256i acc, __m512d row_stat,
                                                           const double* column_scale,
                                                           __mmask8 lanes) {
  const __m512d scale = _mm512_maskz_loadu_pd(lanes, column_scale);
  return _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(_mm512_cvtepi32_pd(acc), row_stat), scale));
}

// The vector form of epilogue_scalar (same operations in the same order, so the same results).
template <FloatType T>
LP_TARGET_AVX512_VNNI void epilogue_avx512(const int32_t* c, int64_t ldc, int64_t m0, int64_t rows,
                                           int64_t n0, int64_t cols, const int32_t* correction,
                                           const GemmContext& ctx, const float* outlier_weights) {
  const Int8Epilogue& ep = ctx.epilogue;
  const int64_t num_outliers = ep.num_outliers;
  __mmask16 lanes[kPanelVectors];
  for (int v = 0; v < kPanelVectors; ++v)
    lanes[v] = cols > v * kAvx512Lanes ? vnni_first_lanes(cols - v * kAvx512Lanes) : 0;
  for (int64_t r0 = 0; r0 < rows; r0 += kEpilogueRows) {
    const int64_t pair_rows = std::min(kEpilogueRows, rows - r0);
    __m512 term[kEpilogueRows][kPanelVectors];
    if (num_outliers > 0) {
      const float* outlier_x = ep.outlier_x + (m0 + r0) * num_outliers;
      if (pair_rows == kEpilogueRows) {
        avx512_outlier_terms<kEpilogueRows>(outlier_x, num_outliers, outlier_weights, lanes, term);
      } else {
        avx512_outlier_terms<1>(outlier_x, num_outliers, outlier_weights, lanes, term);
      }
    }
    for (int64_t i = 0; i < pair_rows; ++i) {
      const int64_t r = r0 + i;
      const int64_t m = m0 + r;
      const __m512d row_stat = _mm512_set1_pd(ep.row_stats[m]);
      const __m512i row_correction = _mm512_set1_epi32(correction != nullptr ? correction[m] : 0);
      for (int v = 0; v < kPanelVectors && lanes[v] != 0; ++v) {
        const int64_t j = v * kAvx512Lanes;
        const int64_t n = n0 + j;
        const __m512i acc =
            _mm512_sub_epi32(_mm512_maskz_loadu_epi32(lanes[v], c + r * ldc + j), row_correction);
        const double* scale = &ctx.column_scale[n];
        __m512 y = _mm512_insertf32x8(
            _mm512_castps256_ps512(avx512_dequantize_half(_mm512_castsi512_si256(acc), row_stat,
                                                          scale, static_cast<__mmask8>(lanes[v]))),
            avx512_dequantize_half(_mm512_extracti64x4_epi64(acc, 1), row_stat, scale + 8,
                                   static_cast<__mmask8>(lanes[v] >> 8)),
            1);
        if (num_outliers > 0) y = _mm512_add_ps(y, term[i][v]);
        if (ep.bias != nullptr) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(lanes[v], ep.bias + n));
        avx512_store<T>(ep.out, m * ctx.N + n, y, lanes[v]);
      }
    }
  }
}

EpilogueFn avx512_epilogue_for(FloatType type) {
  return simd::with_float_type(type, [&]<FloatType T>() { return &epilogue_avx512<T>; });
}

// correction[m] = 128 * sum_k A[m, k]: what the unsigned offset of W adds to row m.
LP_TARGET_AVX512_VNNI void offset_corrections(const int8_t* A, int64_t M, int64_t K,
                                              int32_t* correction) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* a = A + m * K;
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += kVnniBytes) {
      const __m512i v = _mm512_maskz_loadu_epi8(vnni_first_bytes(K - k), a + k);
      sum = _mm512_dpbusd_epi32(sum, ones, v);
    }
    correction[m] = wrapping_mul(kUnsignedOffset, _mm512_reduce_add_epi32(sum));
  }
}

// ---- vnni-dot

// Independent accumulators in vnni_dot_row: enough to hide vpdpbusd's latency.
constexpr int kVnniDotChains = 4;

// *acc = a . (w + 128) for one activation row (in L1) and one weight row. The weight rows of a
// panel are contiguous, and reading them one after the other is a single sequential stream,
// which the hardware prefetchers serve at full bandwidth (8 rows side by side measured 15 %
// slower for M = 1).
LP_TARGET_AVX512_VNNI void vnni_dot_row(const int8_t* a, const int8_t* w, int64_t K, int32_t* acc) {
  constexpr int64_t kStep = kVnniDotChains * kVnniBytes;
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i sums[kVnniDotChains];
  LP_UNROLL_FULLY
  for (int c = 0; c < kVnniDotChains; ++c)
    sums[c] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + kStep <= K; k += kStep) {
    LP_UNROLL_FULLY
    for (int c = 0; c < kVnniDotChains; ++c) {
      const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w + k + c * kVnniBytes), offset);
      sums[c] = _mm512_dpbusd_epi32(sums[c], wv, _mm512_loadu_si512(a + k + c * kVnniBytes));
    }
  }
  // The tail, one vector at a time: masked loads give zeros beyond K, and a zero activation
  // byte adds nothing whatever the weight byte is.
  for (; k < K; k += kVnniBytes) {
    const __mmask64 bytes = vnni_first_bytes(K - k);
    const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(bytes, w + k), offset);
    sums[0] = _mm512_dpbusd_epi32(sums[0], wv, _mm512_maskz_loadu_epi8(bytes, a + k));
  }
  __m512i total = sums[0];
  LP_UNROLL_FULLY
  for (int c = 1; c < kVnniDotChains; ++c)
    total = _mm512_add_epi32(total, sums[c]);
  *acc = _mm512_reduce_add_epi32(total);
}

// Weight rows per dot tile for kRows activation rows: kRows x kCols accumulators plus kRows
// activation vectors and one weight vector fit the 32 vector registers.
template <int kRows>
constexpr int vnni_dot_cols() {
  return kRows <= 3 ? 8 : 6;
}

// acc[r * ldc + j] = A row r . (W row j + 128) for kRows activation rows and the weight rows
// of one tile, side by side: each weight vector is loaded once for all kRows rows (for one
// activation row vnni_dot_row's single stream is faster) (`w_rows` of them real; the rest repeat
// the last one and are not stored).
template <int kRows>
LP_TARGET_AVX512_VNNI void vnni_dot_tile(const int8_t* a, const int8_t* w, int64_t w_rows,
                                         int64_t K, int32_t* acc, int64_t ldc) {
  constexpr int kCols = vnni_dot_cols<kRows>();
  const int8_t* w_row[kCols];
  LP_UNROLL_FULLY
  for (int j = 0; j < kCols; ++j)
    w_row[j] = w + std::min<int64_t>(j, w_rows - 1) * K;
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i sums[kRows][kCols];
  LP_UNROLL_FULLY
  for (int r = 0; r < kRows; ++r)
    LP_UNROLL_FULLY
  for (int j = 0; j < kCols; ++j)
    sums[r][j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += kVnniBytes) {
    // The last step may be partial: masked loads give zeros there, and a zero activation byte
    // adds nothing whatever the weight byte is.
    const __mmask64 bytes = vnni_first_bytes(K - k);
    __m512i av[kRows];
    LP_UNROLL_FULLY
    for (int r = 0; r < kRows; ++r)
      av[r] = _mm512_maskz_loadu_epi8(bytes, a + r * K + k);
    LP_UNROLL_FULLY
    for (int j = 0; j < kCols; ++j) {
      const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(bytes, w_row[j] + k), offset);
      LP_UNROLL_FULLY
      for (int r = 0; r < kRows; ++r)
        sums[r][j] = _mm512_dpbusd_epi32(sums[r][j], wv, av[r]);
    }
  }
  // Reduce every accumulator (fixed indices keep them in registers), store the real ones.
  int32_t totals[kRows][kCols];
  LP_UNROLL_FULLY
  for (int r = 0; r < kRows; ++r)
    LP_UNROLL_FULLY
  for (int j = 0; j < kCols; ++j)
    totals[r][j] = _mm512_reduce_add_epi32(sums[r][j]);
  LP_UNROLL_FULLY
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < w_rows; ++j)
      acc[r * ldc + j] = totals[r][j];
}

template <int kRows>
void add_vnni_dot_phases(GemmRun& run, TaskPhases& phases) {
  add_row_major_phase(run, phases, &offset_corrections);
  const GemmContext& ctx = run.ctx;
  auto scratch = std::make_shared<WorkerScratch<PanelScratch>>(run.workers, [&ctx] {
    return PanelScratch{std::vector<int32_t>(kRows * kPanelCols), outlier_weight_scratch(ctx)};
  });
  const EpilogueFn epilogue = avx512_epilogue_for(ctx.epilogue.out_type);
  phases.add(ceil_div(ctx.N, kPanelCols), [&run, scratch, epilogue](int64_t panel, int64_t worker) {
    const GemmContext& ctx = run.ctx;
    const int64_t K = ctx.K;
    PanelScratch& s = scratch->get(worker);
    const int64_t n0 = panel * kPanelCols;
    const int64_t cols = std::min(kPanelCols, ctx.N - n0);
    if constexpr (kRows == 1) {
      for (int64_t j = 0; j < cols; ++j)
        vnni_dot_row(run.codes, ctx.W + (n0 + j) * K, K, s.acc.data() + j);
    } else {
      constexpr int kCols = vnni_dot_cols<kRows>();
      for (int64_t j = 0; j < cols; j += kCols) {
        vnni_dot_tile<kRows>(run.codes, ctx.W + (n0 + j) * K, std::min<int64_t>(kCols, cols - j), K,
                             s.acc.data() + j, kPanelCols);
      }
    }
    gather_outlier_weights(ctx, n0, cols, s.outlier_weights.data());
    epilogue(s.acc.data(), kPanelCols, 0, kRows, n0, cols, run.correction.data(), ctx,
             s.outlier_weights.data());
  });
}

// ---- vnni-packed

// Groups of K per K block.
constexpr int64_t kVnniBlockGroups = kVnniKBlock / kKGroup;
// Bytes of one register tile's activations for one group: kVnniTileRows x 4.
constexpr int64_t kVnniTileGroupBytes = kVnniTileRows * kKGroup;

// A in the order the register tiles read it: K block b, tile t, group g (of the block) holds
// the 4 bytes of k = 4 (b * kVnniBlockGroups + g) .. + 3 of rows 6t .. 6t + 5 side by side
// (24 bytes; zero beyond M and K). Within a K block the tiles follow one another, so the
// GEMM streams A sequentially; the broadcasts read 4 bytes per row and group.
int64_t packed_a_offset(int64_t tiles, int64_t block, int64_t tile) {
  return (block * tiles + tile) * kVnniBlockGroups * kVnniTileGroupBytes;
}

// Packs register tile t from the codes of its `rows` rows (row-major; rows < 6 at the end of
// M, the rest of the tile is zero).
void pack_a_tile(const int8_t* codes, int64_t rows, int64_t K, int64_t tiles, int64_t t,
                 int8_t* packed) {
  const int64_t blocks = ceil_div(K, kVnniKBlock);
  const int64_t full_groups = K / kKGroup;  // the last group may be partial
  for (int64_t r = 0; r < kVnniTileRows; ++r) {
    const int8_t* src = codes + r * K;
    for (int64_t block = 0; block < blocks; ++block) {
      int8_t* dst = packed + packed_a_offset(tiles, block, t) + r * kKGroup;
      const int64_t g_begin = block * kVnniBlockGroups;
      const int64_t g_end = std::min(ceil_div(K, kKGroup), g_begin + kVnniBlockGroups);
      for (int64_t g = g_begin; g < g_end; ++g, dst += kVnniTileGroupBytes) {
        uint32_t four = 0;  // a fixed-size copy: a single 32-bit move
        if (r < rows && g < full_groups) {
          std::memcpy(&four, src + g * kKGroup, kKGroup);
        } else if (r < rows) {
          for (int64_t k = g * kKGroup; k < K; ++k)
            four |= static_cast<uint32_t>(static_cast<uint8_t>(src[k])) << (8 * (k - g * kKGroup));
        }
        std::memcpy(dst, &four, kKGroup);
      }
    }
  }
}

// In-register transpose of 8 rows of 16 dwords into 16 columns of 8 dwords, two columns per
// register: on return rows[j] holds column transposed_column(j) in its low 256 bits and column
// transposed_column(j) + 4 in its high 256 bits (each column: the dword of rows 0 .. 7).
constexpr int64_t transposed_column(int64_t j) {
  return j < 4 ? j : j + 4;  // registers 0-3: columns (0, 4) .. (3, 7); 4-7: (8, 12) .. (11, 15)
}

LP_TARGET_AVX512_VNNI inline void transpose_8x16_epi32(__m512i rows[8]) {
  __m512i t[8], u[8];
  for (int p = 0; p < 4; ++p) {
    t[2 * p] = _mm512_unpacklo_epi32(rows[2 * p], rows[2 * p + 1]);
    t[2 * p + 1] = _mm512_unpackhi_epi32(rows[2 * p], rows[2 * p + 1]);
  }
  // u[4q + s], 128-bit lane L: dword 4L + s of rows 4q .. 4q + 3.
  for (int q = 0; q < 2; ++q) {
    u[4 * q + 0] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
    u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
  }
  // Lanes (rows 0-3, rows 4-7) of dword 4L + s for L = 0, 1 (low pair) and 2, 3 (high pair).
  const __m512i low_lanes = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i high_lanes = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int s = 0; s < 4; ++s) {
    rows[s] = _mm512_permutex2var_epi64(u[s], low_lanes, u[4 + s]);       // dwords s, 4 + s
    rows[4 + s] = _mm512_permutex2var_epi64(u[s], high_lanes, u[4 + s]);  // 8 + s, 12 + s
  }
}

// Packs one weight panel (W's rows n0 .. n0 + cols, all of K) in vpdpbusd's layout, offset to
// unsigned: packed[g * 256 + c * 4 + b] = W[n0 + c, 4g + b] ^ 0x80 (0x80 beyond N and K, where
// the activations are zero). The work is cut into units (16 rows x 64 bytes: one in-register
// transpose) that the GEMM interleaves with its register tiles, so that the shuffles and the
// loads of W overlap the vpdpbusd stream instead of stalling it.
class PanelPacker {
 public:
  // 8 rows per transpose: the rows are K bytes apart, and with K a multiple of 4 KiB 16 of them
  // would fall into one L1 set (12 ways) and evict one another.
  static constexpr int64_t kRowsPerUnit = 8;
  static constexpr int64_t kUnitsPerChunk = kPanelCols / kRowsPerUnit;
  // W is read this many 64-byte chunks ahead of the packing (prefetched): its rows are K bytes
  // apart, a pattern the hardware prefetchers do not follow.
  static constexpr int64_t kPrefetchChunks = 4;

  PanelPacker(const int8_t* W, int64_t K, int64_t n0, int64_t cols, int64_t padded_k,
              uint8_t* packed)
      : W_(W),
        K_(K),
        n0_(n0),
        cols_(cols),
        chunks_(ceil_div(padded_k, kVnniBytes)),
        packed_(packed) {}

  int64_t total_units() const { return chunks_ * kUnitsPerChunk; }
  int64_t packed_units() const { return next_; }
  // The units that cover the bytes [0, k_end) of K.
  int64_t units_for(int64_t k_end) const {
    return std::min(total_units(), ceil_div(k_end, kVnniBytes) * kUnitsPerChunk);
  }

  LP_TARGET_AVX512_VNNI void pack_until(int64_t units) {
    for (const int64_t end = std::min(units, total_units()); next_ < end; ++next_)
      pack_unit(next_ / kUnitsPerChunk, next_ % kUnitsPerChunk * kRowsPerUnit);
  }

 private:
  LP_TARGET_AVX512_VNNI void pack_unit(int64_t chunk, int64_t row0) {
    const int64_t k = chunk * kVnniBytes;
    const int64_t rows = std::max<int64_t>(0, std::min(kRowsPerUnit, cols_ - row0));
    const int8_t* src = W_ + (n0_ + row0) * K_;
    if (chunk + kPrefetchChunks < chunks_) {
      const int64_t ahead = k + kPrefetchChunks * kVnniBytes;
      for (int64_t i = 0; i < rows; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(src + i * K_ + ahead), _MM_HINT_T0);
    }
    const __mmask64 bytes = vnni_first_bytes(K_ - k);
    __m512i unit[kRowsPerUnit];
    for (int64_t i = 0; i < kRowsPerUnit; ++i) {
      unit[i] =
          i < rows ? _mm512_maskz_loadu_epi8(bytes, src + i * K_ + k) : _mm512_setzero_si512();
    }
    transpose_8x16_epi32(unit);
    const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
    uint8_t* dst = packed_ + (k / kKGroup) * kGroupBytes + row0 * kKGroup;
    for (int j = 0; j < kRowsPerUnit; ++j) {
      const __m512i bytes_out = _mm512_xor_si512(unit[j], offset);
      const int64_t g = transposed_column(j);
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst + g * kGroupBytes),
                         _mm512_castsi512_si256(bytes_out));
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst + (g + 4) * kGroupBytes),
                         _mm512_extracti64x4_epi64(bytes_out, 1));
    }
  }

  static constexpr int64_t kGroupBytes = kPanelCols * kKGroup;
  const int8_t* W_;
  int64_t K_, n0_, cols_, chunks_;
  uint8_t* packed_;
  int64_t next_ = 0;
};

// The register tile: c[r * kPanelCols + j] (+)= sum over the groups of the tile's activation
// rows (packed by pack_a_tiles) times the packed weight block. The 24 accumulators are named
// variables: GCC keeps an array of them in memory, which costs a store per vpdpbusd.
#define LP_VNNI_FOR_TILE_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define LP_VNNI_DECLARE_ROW(r) __m512i acc##r##0, acc##r##1, acc##r##2, acc##r##3;
#define LP_VNNI_ZERO_ROW(r) acc##r##0 = acc##r##1 = acc##r##2 = acc##r##3 = _mm512_setzero_si512();
#define LP_VNNI_LOAD_ROW(r)                                             \
  acc##r##0 = _mm512_load_si512(c + r * kPanelCols + 0 * kAvx512Lanes); \
  acc##r##1 = _mm512_load_si512(c + r * kPanelCols + 1 * kAvx512Lanes); \
  acc##r##2 = _mm512_load_si512(c + r * kPanelCols + 2 * kAvx512Lanes); \
  acc##r##3 = _mm512_load_si512(c + r * kPanelCols + 3 * kAvx512Lanes);
#define LP_VNNI_STORE_ROW(r)                                            \
  _mm512_store_si512(c + r * kPanelCols + 0 * kAvx512Lanes, acc##r##0); \
  _mm512_store_si512(c + r * kPanelCols + 1 * kAvx512Lanes, acc##r##1); \
  _mm512_store_si512(c + r * kPanelCols + 2 * kAvx512Lanes, acc##r##2); \
  _mm512_store_si512(c + r * kPanelCols + 3 * kAvx512Lanes, acc##r##3);
#define LP_VNNI_UPDATE_ROW(r)                              \
  {                                                        \
    const __m512i av = broadcast_4_bytes(a + r * kKGroup); \
    acc##r##0 = _mm512_dpbusd_epi32(acc##r##0, w0, av);    \
    acc##r##1 = _mm512_dpbusd_epi32(acc##r##1, w1, av);    \
    acc##r##2 = _mm512_dpbusd_epi32(acc##r##2, w2, av);    \
    acc##r##3 = _mm512_dpbusd_epi32(acc##r##3, w3, av);    \
  }

LP_TARGET_AVX512_VNNI inline __m512i broadcast_4_bytes(const int8_t* p) {
  int32_t four_bytes;
  std::memcpy(&four_bytes, p, sizeof(four_bytes));
  return _mm512_set1_epi32(four_bytes);
}

static_assert(kVnniTileRows == 6 && kVnniTileVectors == 4, "vnni_tile is written for 6 x 4");

template <bool kFirstBlock>
LP_TARGET_AVX512_VNNI void vnni_tile(const int8_t* a, const uint8_t* w, int64_t groups,
                                     int32_t* c) {
  LP_VNNI_FOR_TILE_ROWS(LP_VNNI_DECLARE_ROW)
  if constexpr (kFirstBlock) {
    LP_VNNI_FOR_TILE_ROWS(LP_VNNI_ZERO_ROW)
  } else {
    LP_VNNI_FOR_TILE_ROWS(LP_VNNI_LOAD_ROW)
  }
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i w0 = _mm512_load_si512(w + 0 * kVnniBytes);
    const __m512i w1 = _mm512_load_si512(w + 1 * kVnniBytes);
    const __m512i w2 = _mm512_load_si512(w + 2 * kVnniBytes);
    const __m512i w3 = _mm512_load_si512(w + 3 * kVnniBytes);
    LP_VNNI_FOR_TILE_ROWS(LP_VNNI_UPDATE_ROW)
    a += kVnniTileRows * kKGroup;
    w += kPanelCols * kKGroup;
  }
  LP_VNNI_FOR_TILE_ROWS(LP_VNNI_STORE_ROW)
}

#undef LP_VNNI_FOR_TILE_ROWS
#undef LP_VNNI_DECLARE_ROW
#undef LP_VNNI_ZERO_ROW
#undef LP_VNNI_LOAD_ROW
#undef LP_VNNI_STORE_ROW
#undef LP_VNNI_UPDATE_ROW

// Scratch of a vnni-packed task: its packed weight panel, accumulators and outlier weights.
struct PackedScratch {
  AlignedBuffer<uint8_t> packed_w;
  AlignedBuffer<int32_t> acc;
  std::vector<float> outlier_weights;
};

void add_vnni_packed_phases(GemmRun& run, TaskPhases& phases) {
  const GemmContext& ctx = run.ctx;
  const int64_t M = ctx.M, K = ctx.K, N = ctx.N;
  const int64_t tiles = ceil_div(M, kVnniTileRows);
  const int64_t k_blocks = ceil_div(K, kVnniKBlock);
  run.packed_a = aligned_buffer<int8_t>(packed_a_offset(tiles, k_blocks, 0));
  run.correction.assign(M, 0);
  // Phase 1, per register tile: its rows' codes (quantized into a tile buffer, or in place),
  // packed for the tiles, and their corrections.
  auto tile_codes = std::make_shared<WorkerScratch<AlignedBuffer<int8_t>>>(
      run.workers, [K] { return aligned_buffer<int8_t>(kVnniTileRows * K); });
  phases.add(tiles, [&run, tile_codes, tiles](int64_t t, int64_t worker) {
    const int64_t K = run.ctx.K;
    const int64_t begin = t * kVnniTileRows;
    const int64_t end = std::min(run.ctx.M, begin + kVnniTileRows);
    const int8_t* codes = run.source.rows(begin, end, tile_codes->get(worker).get());
    pack_a_tile(codes, end - begin, K, tiles, t, run.packed_a.get());
    offset_corrections(codes, end - begin, K, run.correction.data() + begin);
  });

  // Phase 2, per (row block, panel of output columns).
  const int64_t padded_k = ceil_div(K, kKGroup) * kKGroup;
  const int64_t panels = ceil_div(N, kPanelCols);
  const int64_t row_blocks = ceil_div(tiles, kVnniMaxTilesPerBlock);  // of equal size
  const int64_t tiles_per_block = ceil_div(tiles, row_blocks);
  auto scratch = std::make_shared<WorkerScratch<PackedScratch>>(
      run.workers, [&ctx, padded_k, tiles_per_block] {
        // The panel is packed for all of K, in whole 64-byte chunks of K.
        return PackedScratch{
            aligned_buffer<uint8_t>(ceil_div(padded_k, kVnniBytes) * kVnniBytes * kPanelCols),
            aligned_buffer<int32_t>(tiles_per_block * kVnniTileRows * kPanelCols),
            outlier_weight_scratch(ctx)};
      });
  const EpilogueFn epilogue = avx512_epilogue_for(ctx.epilogue.out_type);
  phases.add(row_blocks * panels, [&run, scratch, epilogue, tiles, k_blocks, padded_k, panels,
                                   tiles_per_block](int64_t task, int64_t worker) {
    const GemmContext& ctx = run.ctx;
    const int64_t K = ctx.K;
    PackedScratch& s = scratch->get(worker);
    const int64_t n0 = (task % panels) * kPanelCols;
    const int64_t cols = std::min(kPanelCols, ctx.N - n0);
    const int64_t tile_begin = task / panels * tiles_per_block;
    const int64_t tile_end = std::min(tiles, tile_begin + tiles_per_block);
    // The first K block is packed up front, the rest of the panel a few units per register
    // tile of the blocks before it.
    PanelPacker packer(ctx.W, K, n0, cols, padded_k, s.packed_w.get());
    const int64_t first_units = packer.units_for(kVnniKBlock);
    packer.pack_until(first_units);
    const int64_t spread_units = packer.total_units() - first_units;
    const int64_t spread_calls = std::max<int64_t>(1, (k_blocks - 1) * (tile_end - tile_begin));
    int64_t calls = 0;
    for (int64_t block = 0; block < k_blocks; ++block) {
      const int64_t k0 = block * kVnniKBlock;
      const int64_t groups = std::min(kVnniKBlock, padded_k - k0) / kKGroup;
      packer.pack_until(packer.units_for(k0 + groups * kKGroup));  // normally done already
      const uint8_t* w = s.packed_w.get() + k0 / kKGroup * kPanelCols * kKGroup;
      for (int64_t t = tile_begin; t < tile_end; ++t) {
        packer.pack_until(first_units + (++calls) * spread_units / spread_calls);
        const int8_t* a = run.packed_a.get() + packed_a_offset(tiles, block, t);
        int32_t* c = s.acc.get() + (t - tile_begin) * kVnniTileRows * kPanelCols;
        if (block == 0) {
          vnni_tile<true>(a, w, groups, c);
        } else {
          vnni_tile<false>(a, w, groups, c);
        }
      }
    }
    gather_outlier_weights(ctx, n0, cols, s.outlier_weights.data());
    const int64_t m0 = tile_begin * kVnniTileRows;
    const int64_t rows = std::min(ctx.M, tile_end * kVnniTileRows) - m0;
    epilogue(s.acc.get(), kPanelCols, m0, rows, n0, cols, run.correction.data(), ctx,
             s.outlier_weights.data());
  });
}

bool cpu_has_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni");
}

#endif  // LOWPREC_X86_SIMD

enum class GemmKernel { kScalar, kAvx2Dot, kVnniDot, kVnniPacked };

GemmKernel gemm_kernel_for(int64_t M) {
#if LOWPREC_X86_SIMD
  const CpuIsa isa = active_cpu_isa();
  if (isa == CpuIsa::kAvx512 && cpu_has_avx512_vnni()) {
    return M <= kVnniDotMaxRows ? GemmKernel::kVnniDot : GemmKernel::kVnniPacked;
  }
  if (isa >= CpuIsa::kAvx2) return GemmKernel::kAvx2Dot;
#endif
  (void)M;
  return GemmKernel::kScalar;
}

// Adds the GEMM's phases (activations in the kernel's layout, then the products) and runs
// them after those already in `phases`.
void run_gemm(TaskPhases& phases, const ActivationSource& source, const Int8Epilogue& epilogue,
              const int8_t* W, int64_t M, int64_t K, int64_t N) {
  GemmRun run(source, epilogue, W, M, K, N);
  // K == 0: empty sums, the epilogue of zeros.
  switch (K == 0 ? GemmKernel::kScalar : gemm_kernel_for(M)) {
#if LOWPREC_X86_SIMD
    case GemmKernel::kVnniPacked:
      add_vnni_packed_phases(run, phases);
      break;
    case GemmKernel::kVnniDot:
      switch (M) {
        case 1:
          add_vnni_dot_phases<1>(run, phases);
          break;
        case 2:
          add_vnni_dot_phases<2>(run, phases);
          break;
        case 3:
          add_vnni_dot_phases<3>(run, phases);
          break;
        default:
          add_vnni_dot_phases<4>(run, phases);
          break;
      }
      break;
    case GemmKernel::kAvx2Dot:
      add_avx2_dot_phases(run, phases);
      break;
#endif
    default:
      add_scalar_phases(run, phases);
      break;
  }
  phases.run(run.workers);
}

}  // namespace

const char* int8_gemm_kernel_name(int64_t M) {
  switch (gemm_kernel_for(M)) {
    case GemmKernel::kVnniPacked:
      return "vnni-packed";
    case GemmKernel::kVnniDot:
      return "vnni-dot";
    case GemmKernel::kAvx2Dot:
      return "avx2-dot";
    case GemmKernel::kScalar:
      break;
  }
  return "scalar";
}

void int8_gemm(const int8_t* A, int64_t M, int64_t K, const int8_t* W, int64_t N,
               const Int8Epilogue& epilogue) {
  if (M <= 0 || N <= 0) return;
  ActivationSource source;
  source.K = K;
  source.codes = A;
  TaskPhases phases;
  run_gemm(phases, source, epilogue, W, M, K, N);
}

void int8_linear(const void* x, FloatType x_type, int64_t M, int64_t K, const int8_t* W,
                 const float* w_scale, int64_t N, const float* bias, float threshold, void* out,
                 FloatType out_type) {
  if (M <= 0 || N <= 0) return;
  std::vector<float> row_stats(M);
  Int8Epilogue epilogue;
  epilogue.row_stats = row_stats.data();
  epilogue.col_stats = w_scale;
  epilogue.bias = bias;
  epilogue.out = out;
  epilogue.out_type = out_type;
  ActivationSource source;
  source.K = K;
  source.x = x;
  source.x_type = x_type;
  source.row_stats = row_stats.data();

  // With threshold > 0, two phases first: mark the outlier columns (row chunks), then list them
  // (one task) for the quantization and the epilogue.
  TaskPhases phases;
  OutlierBits bits;
  std::vector<int64_t> outlier_cols;
  std::vector<float> outlier_x;
  if (threshold > 0.0f && K > 0) {
    bits.assign(outlier_words(K), 0u);
    source.outlier_bits = bits.data();
    source.outlier_cols = &outlier_cols;
    source.outlier_x = &outlier_x;
    const int64_t chunk = int8_rows_per_task(K);
    // chunk by value: the phases run in run_gemm below, after this block has closed.
    phases.add(ceil_div(M, chunk), [&, chunk](int64_t task, int64_t) {
      const int64_t begin = task * chunk;
      int8_mark_outliers(x, x_type, begin, std::min(M, begin + chunk), K, threshold, bits.data());
    });
    phases.add(1, [&](int64_t, int64_t) {
      outlier_cols = int8_outlier_list(bits);
      outlier_x.resize(M * outlier_cols.size());
      epilogue.outlier_cols = outlier_cols.data();
      epilogue.outlier_x = outlier_x.data();
      epilogue.num_outliers = static_cast<int64_t>(outlier_cols.size());
    });
  }
  run_gemm(phases, source, epilogue, W, M, K, N);
}

}  // namespace lowprec::cpu
