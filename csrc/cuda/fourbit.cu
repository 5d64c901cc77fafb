// NF4 / FP4 on CUDA: quantize, dequantize and the GEMV of matmul_4bit for a few rows of x.
// The per-element rule is lowprec/fourbit.h, the code the CPU kernels run, so both agree bit
// for bit with the reference.
#include <cuda_runtime.h>

#include <algorithm>
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

// GEMV: one warp per output feature; each lane takes 16-byte vectors of packed codes (32
// weights, within one block since blocks hold >= 32 elements) and the 32 matching x values.
constexpr int kGemvThreads = 128;
constexpr int kGemvWarps = kGemvThreads / kWarpSize;
constexpr int kGemvVectorBytes = 16;
constexpr int kGemvVectorElements = 2 * kGemvVectorBytes;
constexpr int kGemvVectorAlignment = 16;

constexpr int64_t kMaxGridBlocks = 65535;

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

// 32 consecutive x values (16-byte aligned) as fp32, by 16-byte loads.
template <typename T>
__device__ __forceinline__ void load_32(const T* __restrict__ src, float* dst) {
  constexpr int kPerVector = kGemvVectorAlignment / sizeof(T);
  const uint4* vectors = reinterpret_cast<const uint4*>(src);
#pragma unroll
  for (int v = 0; v < kGemvVectorElements / kPerVector; ++v) {
    const uint4 bits = __ldg(vectors + v);
    const T* values = reinterpret_cast<const T*>(&bits);
#pragma unroll
    for (int e = 0; e < kPerVector; ++e)
      dst[v * kPerVector + e] = to_float(values[e]);
  }
}

// Vectorized: in_features % 32 == 0 and x, packed 16-byte aligned, so every weight row is a
// whole number of 16-byte vectors. Otherwise (odd rows that start mid-byte, unaligned data)
// one element per lane and step.
template <typename T, int Rows, bool Vectorized>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_4bit_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                     BlockScales scales, const float* __restrict__ code, int blocksize_log2,
                     int64_t out_features, int64_t in_features, const float* __restrict__ bias,
                     T* __restrict__ y) {
  __shared__ float code_table[kCodebookSize4bit];
  if (threadIdx.x < kCodebookSize4bit) code_table[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t K = in_features;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp; n < out_features;
       n += static_cast<int64_t>(gridDim.x) * kGemvWarps) {
    float acc[Rows];
#pragma unroll
    for (int r = 0; r < Rows; ++r)
      acc[r] = 0.0f;
    const int64_t row_begin = n * K;
    if constexpr (Vectorized) {
      const uint4* row = reinterpret_cast<const uint4*>(packed + row_begin / 2);
      for (int64_t v = lane; v < K / kGemvVectorElements; v += kWarpSize) {
        const uint4 bits = __ldg(row + v);
        const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&bits);
        const int64_t k0 = v * kGemvVectorElements;
        const float scale = block_scale(scales, (row_begin + k0) >> blocksize_log2);
        float weights[kGemvVectorElements];
#pragma unroll
        for (int b = 0; b < kGemvVectorBytes; ++b) {
          weights[2 * b] = dequantize_4bit_value(high_nibble(bytes[b]), code_table, scale);
          weights[2 * b + 1] = dequantize_4bit_value(low_nibble(bytes[b]), code_table, scale);
        }
#pragma unroll
        for (int r = 0; r < Rows; ++r) {
          float xs[kGemvVectorElements];
          load_32(x + r * K + k0, xs);
#pragma unroll
          for (int e = 0; e < kGemvVectorElements; ++e)
            acc[r] = fmaf(xs[e], weights[e], acc[r]);
        }
      }
    } else {
      for (int64_t k = lane; k < K; k += kWarpSize) {
        const int64_t flat = row_begin + k;
        const float weight = dequantize_4bit_value(code_at(packed, flat), code_table,
                                                   block_scale(scales, flat >> blocksize_log2));
#pragma unroll
        for (int r = 0; r < Rows; ++r)
          acc[r] = fmaf(to_float(x[r * K + k]), weight, acc[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < Rows; ++r)
      acc[r] = warp_sum(acc[r]);
    if (lane == 0) {
      const float b = bias != nullptr ? bias[n] : 0.0f;
#pragma unroll
      for (int r = 0; r < Rows; ++r)
        y[r * out_features + n] = from_float<T>(acc[r] + b);
    }
  }
}

unsigned grid_for(int64_t items, int64_t items_per_block) {
  return static_cast<unsigned>(std::min<int64_t>(
      std::max<int64_t>(1, (items + items_per_block - 1) / items_per_block), kMaxGridBlocks));
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

bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kGemvVectorAlignment == 0;
}

template <typename T, int Rows>
void gemv_with_rows(const void* x, const uint8_t* packed, const BlockScales& scales,
                    const float* code, int64_t blocksize, int64_t out_features, int64_t in_features,
                    const float* bias, void* y, cudaStream_t stream) {
  const unsigned grid = grid_for(out_features, kGemvWarps);
  const bool vectorized = in_features % kGemvVectorElements == 0 && aligned(x) && aligned(packed);
  const int log2 = exact_log2(blocksize);
  const T* x_typed = static_cast<const T*>(x);
  T* y_typed = static_cast<T*>(y);
  if (vectorized) {
    gemv_4bit_kernel<T, Rows, true><<<grid, kGemvThreads, 0, stream>>>(
        x_typed, packed, scales, code, log2, out_features, in_features, bias, y_typed);
  } else {
    gemv_4bit_kernel<T, Rows, false><<<grid, kGemvThreads, 0, stream>>>(
        x_typed, packed, scales, code, log2, out_features, in_features, bias, y_typed);
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
