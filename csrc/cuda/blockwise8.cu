// Blockwise 8-bit quantize / dequantize on CUDA. The encoding rule is lowprec/blockwise8.h,
// the same code the CPU kernels run, so both agree bit for bit with the reference.
#include <cuda_runtime.h>

#include <algorithm>

#include "blockwise8.h"
#include "lowprec/blockwise8.h"
#include "lowprec/cuda_utils.cuh"

namespace lowprec::cuda {
namespace {

// Quantize: a thread block of kQuantizeThreads threads splits into groups, one group per
// quantization block. A group has blocksize / kQuantizeMinItemsPerThread threads (at most the
// whole thread block), each holding its elements in registers between the absmax reduction
// and the encoding, so the input is read once.
constexpr int kQuantizeThreads = 256;
constexpr int kQuantizeMinItemsPerThread = 4;
constexpr int kQuantizeMaxItemsPerThread = kBlocksizeMax8bit / kQuantizeThreads;
constexpr int kQuantizeWarps = kQuantizeThreads / kWarpSize;
static_assert(kQuantizeThreads >= kThresholdTableSize8bit,
              "each thread builds at most one threshold");
static_assert(kBlocksizeMin8bit / kQuantizeMinItemsPerThread <= kQuantizeThreads,
              "the smallest block must fit in one thread block");

// Dequantize: each thread block handles tiles of kDequantizeThreads * kDequantizeItemsPerThread
// consecutive elements; element k of a thread is tile_start + k * kDequantizeThreads + thread,
// so every load and store instruction of a warp is contiguous.
constexpr int kDequantizeThreads = 256;
constexpr int kDequantizeItemsPerThread = 4;

// Max of `value` over the `group_threads` threads of each group (a power of two); groups are
// aligned runs of threads. Every thread of the block must call it the same number of times.
__device__ __forceinline__ uint32_t group_max(uint32_t value, int group_threads,
                                              uint32_t* warp_maxima) {
  value = warp_group_max(value, min(group_threads, kWarpSize));
  if (group_threads <= kWarpSize) return value;
  const int warp = threadIdx.x / kWarpSize;
  __syncthreads();  // the previous tile's readers are done with warp_maxima
  if (threadIdx.x % kWarpSize == 0) warp_maxima[warp] = value;
  __syncthreads();
  const int warps_per_group = group_threads / kWarpSize;
  const int first_warp = warp / warps_per_group * warps_per_group;
  uint32_t group_value = 0;
  for (int w = 0; w < warps_per_group; ++w)
    group_value = max(group_value, warp_maxima[first_warp + w]);
  return group_value;
}

template <typename T>
__global__ void __launch_bounds__(kQuantizeThreads)
    quantize_blockwise_8bit_kernel(const T* __restrict__ input, int64_t n,
                                   const float* __restrict__ code, int blocksize, int group_threads,
                                   int64_t num_blocks, uint8_t* __restrict__ codes,
                                   float* __restrict__ absmax) {
  __shared__ float thresholds[kThresholdTableSize8bit];
  __shared__ uint32_t warp_maxima[kQuantizeWarps];
  if (threadIdx.x < kThresholdTableSize8bit) {
    thresholds[threadIdx.x] = codebook_threshold(code, kCodebookSize8bit, threadIdx.x);
  }
  __syncthreads();

  const int groups_per_tile = kQuantizeThreads / group_threads;
  const int group = threadIdx.x / group_threads;
  const int lane = threadIdx.x % group_threads;
  const int items_per_thread = blocksize / group_threads;

  // The loop bounds depend on blockIdx only, so all threads run the same iterations (and
  // reach the barriers in group_max together).
  for (int64_t tile = blockIdx.x; tile * groups_per_tile < num_blocks; tile += gridDim.x) {
    const int64_t block = tile * groups_per_tile + group;
    const int64_t begin = block * blocksize + lane;
    const bool block_exists = block < num_blocks;

    float values[kQuantizeMaxItemsPerThread];
    uint32_t max_bits = 0;
#pragma unroll
    for (int k = 0; k < kQuantizeMaxItemsPerThread; ++k) {
      const int64_t i = begin + static_cast<int64_t>(k) * group_threads;
      values[k] = 0.0f;
      if (k < items_per_thread && block_exists && i < n) {
        values[k] = to_float(input[i]);
        max_bits = max(max_bits, magnitude_bits(values[k]));
      }
    }
    const float block_absmax =
        absmax_from_magnitude_bits(group_max(max_bits, group_threads, warp_maxima));
    if (!block_exists) continue;
    if (lane == 0) absmax[block] = block_absmax;
#pragma unroll
    for (int k = 0; k < kQuantizeMaxItemsPerThread; ++k) {
      const int64_t i = begin + static_cast<int64_t>(k) * group_threads;
      if (k < items_per_thread && i < n) {
        codes[i] = encode_8bit(scale_by_absmax(values[k], block_absmax), thresholds);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kDequantizeThreads)
    dequantize_blockwise_8bit_kernel(const uint8_t* __restrict__ codes,
                                     const float* __restrict__ absmax,
                                     const float* __restrict__ code, int64_t n, int blocksize_log2,
                                     T* __restrict__ out) {
  __shared__ float code_table[kCodebookSize8bit];
  for (int i = threadIdx.x; i < kCodebookSize8bit; i += kDequantizeThreads)
    code_table[i] = code[i];
  __syncthreads();

  constexpr int64_t kTileElements = kDequantizeThreads * kDequantizeItemsPerThread;
  for (int64_t tile_start = blockIdx.x * kTileElements; tile_start < n;
       tile_start += gridDim.x * kTileElements) {
#pragma unroll
    for (int k = 0; k < kDequantizeItemsPerThread; ++k) {
      const int64_t i = tile_start + k * kDequantizeThreads + threadIdx.x;
      if (i < n) out[i] = from_float<T>(code_table[codes[i]] * absmax[i >> blocksize_log2]);
    }
  }
}

template <typename T>
void quantize_with_type(const void* input, int64_t n, const float* code, int64_t blocksize,
                        uint8_t* codes, float* absmax, cudaStream_t stream) {
  const int group_threads =
      static_cast<int>(std::min<int64_t>(blocksize / kQuantizeMinItemsPerThread, kQuantizeThreads));
  const int64_t num_blocks = (n + blocksize - 1) / blocksize;
  const int64_t groups_per_tile = kQuantizeThreads / group_threads;
  const int64_t tiles = (num_blocks + groups_per_tile - 1) / groups_per_tile;
  const unsigned grid = grid_blocks(tiles);
  quantize_blockwise_8bit_kernel<T><<<grid, kQuantizeThreads, 0, stream>>>(
      static_cast<const T*>(input), n, code, static_cast<int>(blocksize), group_threads, num_blocks,
      codes, absmax);
}

template <typename T>
void dequantize_with_type(const uint8_t* codes, const float* absmax, const float* code, int64_t n,
                          int64_t blocksize, void* out, cudaStream_t stream) {
  constexpr int64_t kTileElements = kDequantizeThreads * kDequantizeItemsPerThread;
  const int64_t tiles = (n + kTileElements - 1) / kTileElements;
  const unsigned grid = grid_blocks(tiles);
  dequantize_blockwise_8bit_kernel<T><<<grid, kDequantizeThreads, 0, stream>>>(
      codes, absmax, code, n, exact_log2(blocksize), static_cast<T*>(out));
}

}  // namespace

cudaError_t launch_quantize_blockwise_8bit(const void* input, FloatType input_type, int64_t n,
                                           const float* code, int64_t blocksize, uint8_t* codes,
                                           float* absmax, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (input_type) {
    case FloatType::kFloat32:
      quantize_with_type<float>(input, n, code, blocksize, codes, absmax, stream);
      break;
    case FloatType::kFloat16:
      quantize_with_type<__half>(input, n, code, blocksize, codes, absmax, stream);
      break;
    case FloatType::kBFloat16:
      quantize_with_type<__nv_bfloat16>(input, n, code, blocksize, codes, absmax, stream);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_dequantize_blockwise_8bit(const uint8_t* codes, const float* absmax,
                                             const float* code, int64_t n, int64_t blocksize,
                                             void* out, FloatType out_type, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (out_type) {
    case FloatType::kFloat32:
      dequantize_with_type<float>(codes, absmax, code, n, blocksize, out, stream);
      break;
    case FloatType::kFloat16:
      dequantize_with_type<__half>(codes, absmax, code, n, blocksize, out, stream);
      break;
    case FloatType::kBFloat16:
      dequantize_with_type<__nv_bfloat16>(codes, absmax, code, n, blocksize, out, stream);
      break;
  }
  return cudaGetLastError();
}

int compiled_cuda_runtime_version() {
  return CUDART_VERSION;
}

}  // namespace lowprec::cuda
