// NF4 / FP4 on CUDA: quantize, dequantize and the GEMV of matmul_4bit for a few rows of x.
// The per-element rule is lowprec/fourbit.h, the code the CPU kernels run, so both agree bit
// for bit with the reference.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "fourbit.h"
#include "lowprec/cuda_utils.cuh"
#include "lowprec/fourbit.h"

namespace lowprec::cuda {
namespace {

// Quantize: one warp per quantization block. It reads the block twice (absmax, then the
// codes); the second read hits the cache, so the input still comes from memory once.
constexpr int kQuantizeThreads = 256;
constexpr int kQuantizeWarps = kQuantizeThreads / kWarpSize;

// Dequantize: one thread per packed byte (two outputs).
constexpr int kDequantizeThreads = 256;

// GEMV: a thread block of kGemvThreads threads takes kGemvWarps / warps_per_row output features
// (rows of W); each row is split between warps_per_row warps (1 when there are enough rows to
// fill the GPU, up to kGemvWarps for short, wide weights), which add their partial sums through
// shared memory in a fixed order (the result does not depend on scheduling).
constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / kWarpSize;
// Each lane reads packed codes as 4-byte words (8 weights): a warp's load covers 128 contiguous
// bytes, and the 8 matching x values of a lane are contiguous (one 16-byte load for fp16/bf16,
// two for fp32), so neighbouring lanes read neighbouring x and the L1 serves a warp's x load
// from few cache lines (with 16-byte words, 32 weights per lane, every lane hit its own line).
constexpr int kGemvWordBytes = 4;
constexpr int kGemvWordElements = 2 * kGemvWordBytes;
constexpr int kGemvXAlignment = 16;
// Words each lane loads before decoding any (codes and block scales issued together): a
// 4096-element row is 512 words, so with two warps per row one batch covers it and the whole
// weight is requested in about one memory latency instead of several dependent ones.
constexpr int kGemvWordsInFlight = 8;
// warps_per_row grows (as a power of two, while every lane keeps at least one word) until
// there are this many warps per SM: enough loads in flight to cover HBM latency.
constexpr int kGemvTargetWarpsPerSm = 32;
// Thread blocks per SM the register allocation must allow (launch bounds): four (64 registers,
// 32 warps) for one or two rows of x, where the kernel is a pure stream of the weight; two
// (128 registers) for more rows, which otherwise take up to 144 and leave one block per SM.
constexpr int kGemvMinBlocksPerSmFewRows = 4;
constexpr int kGemvFewRows = 2;
constexpr int kGemvMinBlocksPerSm = 2;
constexpr int gemv_min_blocks_per_sm(int rows) {
  return rows <= kGemvFewRows ? kGemvMinBlocksPerSmFewRows : kGemvMinBlocksPerSm;
}
static_assert(kCodebookSize8bit <= kGemvThreads, "one thread per nested codebook entry");
static_assert(kBlocksizeMin4bit % kGemvWordElements == 0, "a word never straddles two blocks");

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(kFullWarpMask, value, offset);
  }
  return value;
}

template <typename T>
__global__ void __launch_bounds__(kQuantizeThreads)
    quantize_4bit_kernel(const T* __restrict__ input, int64_t n, const float* __restrict__ code,
                         QuantType4bit quant_type, int64_t blocksize, int64_t num_blocks,
                         uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  __shared__ Encoder4bit encoder;
  if (threadIdx.x == 0) build_encoder_4bit(code, quant_type, &encoder);
  __syncthreads();
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  // Every lane of a warp runs the same iterations (warp_group_max needs all of them).
  for (int64_t block = static_cast<int64_t>(blockIdx.x) * kQuantizeWarps + warp; block < num_blocks;
       block += static_cast<int64_t>(gridDim.x) * kQuantizeWarps) {
    const int64_t begin = block * blocksize;
    const int64_t end = min(n, begin + blocksize);
    uint32_t max_bits = 0;
    for (int64_t i = begin + lane; i < end; i += kWarpSize) {
      max_bits = max(max_bits, magnitude_bits(to_float(input[i])));
    }
    const float block_absmax = absmax_from_magnitude_bits(warp_group_max(max_bits, kWarpSize));
    if (lane == 0) absmax[block] = block_absmax;
    for (int64_t i = begin + 2 * lane; i < end; i += 2 * kWarpSize) {
      const uint8_t even = encode_4bit(to_float(input[i]), block_absmax, encoder);
      const uint8_t odd =
          i + 1 < end ? encode_4bit(to_float(input[i + 1]), block_absmax, encoder) : 0;
      packed[i >> 1] = pack_nibbles(even, odd);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kDequantizeThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, BlockScales scales,
                           const float* __restrict__ code, int blocksize_log2, int64_t n,
                           T* __restrict__ out) {
  __shared__ float code_table[kCodebookSize4bit];
  if (threadIdx.x < kCodebookSize4bit) code_table[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int64_t bytes = (n + 1) / 2;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kDequantizeThreads + threadIdx.x; p < bytes;
       p += static_cast<int64_t>(gridDim.x) * kDequantizeThreads) {
    const uint8_t byte = packed[p];
    const int64_t i = 2 * p;  // i and i + 1 share a block: block boundaries are even
    const float scale = block_scale(scales, i >> blocksize_log2);
    out[i] = from_float<T>(dequantize_4bit_value(high_nibble(byte), code_table, scale));
    if (i + 1 < n) {
      out[i + 1] = from_float<T>(dequantize_4bit_value(low_nibble(byte), code_table, scale));
    }
  }
}

// 8 consecutive x values (16-byte aligned) as fp32, by 16-byte loads.
template <typename T>
__device__ __forceinline__ void load_8(const T* __restrict__ src, float* dst) {
  constexpr int kPerVector = kGemvXAlignment / sizeof(T);
  const uint4* vectors = reinterpret_cast<const uint4*>(src);
#pragma unroll
  for (int v = 0; v < kGemvWordElements / kPerVector; ++v) {
    const uint4 bits = __ldg(vectors + v);
    const T* values = reinterpret_cast<const T*>(&bits);
#pragma unroll
    for (int e = 0; e < kPerVector; ++e)
      dst[v * kPerVector + e] = to_float(values[e]);
  }
}

// Element e (0..7) of a little-endian word of packed codes: byte e / 2, high nibble first.
__device__ __forceinline__ uint8_t word_nibble(uint32_t word, int e) {
  return static_cast<uint8_t>((word >> (8 * (e / 2) + ((e % 2) ? 0 : 4))) & 0xF);
}

// The scale of a block, with the nested codebook (double quantization) read from shared memory
// and the offset read once per thread: the same arithmetic as block_scale(). load() and
// decode() split it so that a batch issues all its global loads before the first shared-memory
// lookup waits on one of them.
struct GemvScales {
  BlockScales scales;
  const float* nested_code;  // shared copy; unused without double quantization
  float offset;

  // value: the fp32 absmax, or with double quantization the nested absmax (and code the
  // block's absmax code).
  __device__ __forceinline__ void load(int64_t block, float* value, uint32_t* code) const {
    if (!scales.double_quantized()) {
      *value = __ldg(scales.absmax + block);
      *code = 0;
    } else {
      *code = __ldg(scales.absmax_codes + block);
      *value = __ldg(scales.nested_absmax + (block >> scales.nested_blocksize_log2));
    }
  }
  __device__ __forceinline__ float decode(float value, uint32_t code) const {
    if (!scales.double_quantized()) return value;
    return decode_nested_absmax(static_cast<uint8_t>(code), nested_code, value, offset);
  }
  __device__ __forceinline__ float of_block(int64_t block) const {
    float value;
    uint32_t code;
    load(block, &value, &code);
    return decode(value, code);
  }
};

// Partial sums of one row over the words (Vectorized) or elements this warp owns: positions
// first, first + stride, ... below count.
template <typename T, int Rows, bool Vectorized>
__device__ __forceinline__ void gemv_row_partial(const T* __restrict__ x,
                                                 const uint8_t* __restrict__ packed,
                                                 const GemvScales& scales, const float* code_table,
                                                 int blocksize_log2, int64_t row_begin, int64_t K,
                                                 int64_t first, int64_t stride, float* acc) {
  if constexpr (Vectorized) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(packed + row_begin / 2);
    const int64_t count = K / kGemvWordElements;
    for (int64_t base = first; base < count; base += kGemvWordsInFlight * stride) {
      uint32_t bits[kGemvWordsInFlight];
      float scale_value[kGemvWordsInFlight];
      uint32_t scale_code[kGemvWordsInFlight];
      // All global loads of the batch first (they are independent), then the arithmetic.
#pragma unroll
      for (int u = 0; u < kGemvWordsInFlight; ++u) {
        const int64_t j = base + u * stride;
        bits[u] = scale_code[u] = 0;
        scale_value[u] = 0.0f;
        if (j < count) {
          bits[u] = __ldg(words + j);
          scales.load((row_begin + j * kGemvWordElements) >> blocksize_log2, &scale_value[u],
                      &scale_code[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kGemvWordsInFlight; ++u) {
        const int64_t j = base + u * stride;
        if (j >= count) break;
        const float scale = scales.decode(scale_value[u], scale_code[u]);
        float weights[kGemvWordElements];
#pragma unroll
        for (int e = 0; e < kGemvWordElements; ++e)
          weights[e] = dequantize_4bit_value(word_nibble(bits[u], e), code_table, scale);
        const int64_t k0 = j * kGemvWordElements;
#pragma unroll
        for (int r = 0; r < Rows; ++r) {
          float xs[kGemvWordElements];
          load_8(x + r * K + k0, xs);
#pragma unroll
          for (int e = 0; e < kGemvWordElements; ++e)
            acc[r] = fmaf(xs[e], weights[e], acc[r]);
        }
      }
    }
  } else {
    for (int64_t k = first; k < K; k += stride) {
      const int64_t flat = row_begin + k;
      const float weight = dequantize_4bit_value(code_at(packed, flat), code_table,
                                                 scales.of_block(flat >> blocksize_log2));
#pragma unroll
      for (int r = 0; r < Rows; ++r)
        acc[r] = fmaf(to_float(x[r * K + k]), weight, acc[r]);
    }
  }
}

// Vectorized: in_features % 8 == 0, x 16-byte and packed 4-byte aligned, so every weight row is
// a whole number of aligned words. Otherwise (odd rows that start mid-byte, unaligned data)
// one element per lane and step.
template <typename T, int Rows, bool Vectorized>
__global__ void __launch_bounds__(kGemvThreads, gemv_min_blocks_per_sm(Rows))
    gemv_4bit_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                     BlockScales scales, const float* __restrict__ code, int blocksize_log2,
                     int64_t out_features, int64_t in_features, const float* __restrict__ bias,
                     int warps_per_row, T* __restrict__ y) {
  __shared__ float code_table[kCodebookSize4bit];
  __shared__ float nested_code[kCodebookSize8bit];
  __shared__ float partials[kGemvWarps][Rows];
  const bool double_quantized = scales.double_quantized();
  if (threadIdx.x < kCodebookSize4bit) code_table[threadIdx.x] = code[threadIdx.x];
  if (double_quantized && threadIdx.x < kCodebookSize8bit) {
    nested_code[threadIdx.x] = scales.nested_code[threadIdx.x];
  }
  __syncthreads();
  const GemvScales block_scales{scales, nested_code, double_quantized ? *scales.offset : 0.0f};
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int rows_per_block = kGemvWarps / warps_per_row;
  const int part = warp % warps_per_row;  // this warp's share of its row
  const int64_t K = in_features;
  // Warps of a block run the same iterations (the bounds depend on blockIdx only): they meet
  // at the barriers of the cross-warp sum even when their own row is past the end.
  for (int64_t first_row = static_cast<int64_t>(blockIdx.x) * rows_per_block;
       first_row < out_features; first_row += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t n = first_row + warp / warps_per_row;
    float acc[Rows];
#pragma unroll
    for (int r = 0; r < Rows; ++r)
      acc[r] = 0.0f;
    if (n < out_features) {
      gemv_row_partial<T, Rows, Vectorized>(x, packed, block_scales, code_table, blocksize_log2,
                                            n * K, K, part * kWarpSize + lane,
                                            static_cast<int64_t>(warps_per_row) * kWarpSize, acc);
    }
#pragma unroll
    for (int r = 0; r < Rows; ++r)
      acc[r] = warp_sum(acc[r]);
    if (warps_per_row > 1) {
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < Rows; ++r)
          partials[warp][r] = acc[r];
      }
      __syncthreads();
      if (part == 0 && lane == 0) {
        for (int w = 1; w < warps_per_row; ++w) {
#pragma unroll
          for (int r = 0; r < Rows; ++r)
            acc[r] += partials[warp + w][r];
        }
      }
      __syncthreads();  // partials are free for the next rows
    }
    if (n < out_features && part == 0 && lane == 0) {
      const float b = bias != nullptr ? bias[n] : 0.0f;
#pragma unroll
      for (int r = 0; r < Rows; ++r)
        y[r * out_features + n] = from_float<T>(acc[r] + b);
    }
  }
}

unsigned grid_for(int64_t items, int64_t items_per_block) {
  return grid_blocks((items + items_per_block - 1) / items_per_block);
}

template <typename T>
void quantize_with_type(const void* input, int64_t n, const float* code, QuantType4bit type,
                        int64_t blocksize, uint8_t* packed, float* absmax, cudaStream_t stream) {
  const int64_t num_blocks = (n + blocksize - 1) / blocksize;
  quantize_4bit_kernel<T><<<grid_for(num_blocks, kQuantizeWarps), kQuantizeThreads, 0, stream>>>(
      static_cast<const T*>(input), n, code, type, blocksize, num_blocks, packed, absmax);
}

template <typename T>
void dequantize_with_type(const uint8_t* packed, const BlockScales& scales, const float* code,
                          int64_t blocksize, int64_t n, void* out, cudaStream_t stream) {
  dequantize_4bit_kernel<T>
      <<<grid_for((n + 1) / 2, kDequantizeThreads), kDequantizeThreads, 0, stream>>>(
          packed, scales, code, exact_log2(blocksize), n, static_cast<T*>(out));
}

bool aligned(const void* p, uintptr_t alignment) {
  return reinterpret_cast<uintptr_t>(p) % alignment == 0;
}

// Streaming multiprocessors of the current device, asked once per device. Atomic: the
// bindings run without the GIL, so threads may ask at once (they store the same value).
int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> counts[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return 1;
  int known = counts[device].load(std::memory_order_relaxed);
  if (known == 0) {
    int count = 0;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      count = 1;
    }
    known = std::max(count, 1);
    counts[device].store(known, std::memory_order_relaxed);
  }
  return known;
}

// Warps per row: 1, doubled while the rows give fewer than kGemvTargetWarpsPerSm warps per SM
// and each of the doubled warps' lanes would still get a word (or element) of the row.
int gemv_warps_per_row(int64_t out_features, int64_t positions_per_row) {
  const int64_t target_warps = static_cast<int64_t>(sm_count()) * kGemvTargetWarpsPerSm;
  int warps_per_row = 1;
  while (warps_per_row < kGemvWarps && out_features * warps_per_row < target_warps &&
         positions_per_row >= static_cast<int64_t>(2 * warps_per_row) * kWarpSize) {
    warps_per_row *= 2;
  }
  return warps_per_row;
}

template <typename T, int Rows>
void gemv_with_rows(const void* x, const uint8_t* packed, const BlockScales& scales,
                    const float* code, int64_t blocksize, int64_t out_features, int64_t in_features,
                    const float* bias, void* y, cudaStream_t stream) {
  const bool vectorized = in_features % kGemvWordElements == 0 && aligned(x, kGemvXAlignment) &&
                          aligned(packed, kGemvWordBytes);
  const int warps_per_row =
      gemv_warps_per_row(out_features, vectorized ? in_features / kGemvWordElements : in_features);
  const unsigned grid = grid_for(out_features, kGemvWarps / warps_per_row);
  const int log2 = exact_log2(blocksize);
  const T* x_typed = static_cast<const T*>(x);
  T* y_typed = static_cast<T*>(y);
  if (vectorized) {
    gemv_4bit_kernel<T, Rows, true>
        <<<grid, kGemvThreads, 0, stream>>>(x_typed, packed, scales, code, log2, out_features,
                                            in_features, bias, warps_per_row, y_typed);
  } else {
    gemv_4bit_kernel<T, Rows, false>
        <<<grid, kGemvThreads, 0, stream>>>(x_typed, packed, scales, code, log2, out_features,
                                            in_features, bias, warps_per_row, y_typed);
  }
}

template <typename T>
void gemv_with_type(const void* x, int64_t rows, const uint8_t* packed, const BlockScales& scales,
                    const float* code, int64_t blocksize, int64_t out_features, int64_t in_features,
                    const float* bias, void* y, cudaStream_t stream) {
  switch (rows) {
#define LP_GEMV_ROWS(R)                                                                        \
  case R:                                                                                      \
    return gemv_with_rows<T, R>(x, packed, scales, code, blocksize, out_features, in_features, \
                                bias, y, stream);
    LP_GEMV_ROWS(1)
    LP_GEMV_ROWS(2)
    LP_GEMV_ROWS(3)
    LP_GEMV_ROWS(4)
    LP_GEMV_ROWS(5)
    LP_GEMV_ROWS(6)
    LP_GEMV_ROWS(7)
    LP_GEMV_ROWS(8)
#undef LP_GEMV_ROWS
    default:
      break;
  }
}
static_assert(kGemv4bitMaxRows == 8, "gemv_with_type instantiates rows 1..8");

}  // namespace

cudaError_t launch_quantize_4bit(const void* input, FloatType input_type, int64_t n,
                                 const float* code, QuantType4bit quant_type, int64_t blocksize,
                                 uint8_t* packed, float* absmax, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (input_type) {
    case FloatType::kFloat32:
      quantize_with_type<float>(input, n, code, quant_type, blocksize, packed, absmax, stream);
      break;
    case FloatType::kFloat16:
      quantize_with_type<__half>(input, n, code, quant_type, blocksize, packed, absmax, stream);
      break;
    case FloatType::kBFloat16:
      quantize_with_type<__nv_bfloat16>(input, n, code, quant_type, blocksize, packed, absmax,
                                        stream);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_dequantize_4bit(const uint8_t* packed, const BlockScales& scales,
                                   const float* code, int64_t blocksize, int64_t n, void* out,
                                   FloatType out_type, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (out_type) {
    case FloatType::kFloat32:
      dequantize_with_type<float>(packed, scales, code, blocksize, n, out, stream);
      break;
    case FloatType::kFloat16:
      dequantize_with_type<__half>(packed, scales, code, blocksize, n, out, stream);
      break;
    case FloatType::kBFloat16:
      dequantize_with_type<__nv_bfloat16>(packed, scales, code, blocksize, n, out, stream);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_gemv_4bit(const void* x, FloatType x_type, int64_t rows, const uint8_t* packed,
                             const BlockScales& scales, const float* code, int64_t blocksize,
                             int64_t out_features, int64_t in_features, const float* bias, void* y,
                             cudaStream_t stream) {
  if (rows <= 0 || out_features <= 0) return cudaSuccess;
  switch (x_type) {
    case FloatType::kFloat32:
      gemv_with_type<float>(x, rows, packed, scales, code, blocksize, out_features, in_features,
                            bias, y, stream);
      break;
    case FloatType::kFloat16:
      gemv_with_type<__half>(x, rows, packed, scales, code, blocksize, out_features, in_features,
                             bias, y, stream);
      break;
    case FloatType::kBFloat16:
      gemv_with_type<__nv_bfloat16>(x, rows, packed, scales, code, blocksize, out_features,
                                    in_features, bias, y, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace lowprec::cuda
