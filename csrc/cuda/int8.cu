// LLM.int8 row quantization and outlier columns on CUDA. The per-element rules are
// lowprec/int8.h, the code the CPU kernels run, so both agree bit for bit with the reference.
#include <cuda_runtime.h>

#include <algorithm>

#include "int8.h"
#include "lowprec/blockwise8.h"
#include "lowprec/cuda_utils.cuh"
#include "lowprec/int8.h"

namespace lowprec::cuda {
namespace {

// Outlier columns: each thread owns one column of a tile of kMaskThreads columns (a warp reads
// 32 consecutive elements of a row) and scans tiles of kMaskRowsPerBlock rows of it
// (grid-stride in y, where the grid allows at most kMaxGridBlocks).
constexpr int kMaskThreads = 256;
constexpr int kMaskRowsPerBlock = 64;

// Row quantization: one thread block per row (grid-stride over rows); the row is swept twice,
// absmax then codes, the second sweep from cache.
constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / kWarpSize;

template <typename T>
__global__ void __launch_bounds__(kMaskThreads)
    int8_outlier_mask_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, float threshold,
                             uint8_t* __restrict__ mask) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kMaskThreads + threadIdx.x;
  if (col >= cols) return;
  bool found = false;
  for (int64_t row_begin = static_cast<int64_t>(blockIdx.y) * kMaskRowsPerBlock;
       row_begin < rows && !found;
       row_begin += static_cast<int64_t>(gridDim.y) * kMaskRowsPerBlock) {
    const int64_t row_end = min(rows, row_begin + kMaskRowsPerBlock);
    for (int64_t row = row_begin; row < row_end && !found; ++row) {
      found = int8_is_outlier(to_float(x[row * cols + col]), threshold);
    }
  }
  // Every writer writes 1: the race is benign.
  if (found) mask[col] = 1;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    int8_quantize_rows_kernel(const T* __restrict__ x, int64_t rows, int64_t cols,
                              const uint8_t* __restrict__ outlier_mask, int8_t* __restrict__ codes,
                              float* __restrict__ row_absmax) {
  __shared__ uint32_t warp_maxima[kRowWarps];
  __shared__ float row_scale;
  const int warp = threadIdx.x / kWarpSize;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* in = x + row * cols;
    uint32_t max_bits = 0;
    for (int64_t j = threadIdx.x; j < cols; j += kRowThreads) {
      if (outlier_mask == nullptr || outlier_mask[j] == 0) {
        max_bits = max(max_bits, magnitude_bits(to_float(in[j])));
      }
    }
    max_bits = warp_group_max(max_bits, kWarpSize);
    if (threadIdx.x % kWarpSize == 0) warp_maxima[warp] = max_bits;
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t block_max = 0;
      for (int w = 0; w < kRowWarps; ++w)
        block_max = max(block_max, warp_maxima[w]);
      const float absmax = absmax_from_magnitude_bits(block_max);
      row_absmax[row] = absmax;
      row_scale = int8_row_scale(absmax);
    }
    __syncthreads();
    const float scale = row_scale;
    int8_t* out = codes + row * cols;
    for (int64_t j = threadIdx.x; j < cols; j += kRowThreads) {
      const bool outlier = outlier_mask != nullptr && outlier_mask[j] != 0;
      out[j] = outlier ? int8_t{0} : int8_encode(to_float(in[j]), scale);
    }
    __syncthreads();  // warp_maxima and row_scale are reused by the next row
  }
}

template <typename T>
void outlier_mask_with_type(const void* x, int64_t rows, int64_t cols, float threshold,
                            uint8_t* mask, cudaStream_t stream) {
  const int64_t row_tiles = (rows + kMaskRowsPerBlock - 1) / kMaskRowsPerBlock;
  const dim3 grid(static_cast<unsigned>((cols + kMaskThreads - 1) / kMaskThreads),
                  grid_blocks(row_tiles));
  int8_outlier_mask_kernel<T>
      <<<grid, kMaskThreads, 0, stream>>>(static_cast<const T*>(x), rows, cols, threshold, mask);
}

template <typename T>
void quantize_rows_with_type(const void* x, int64_t rows, int64_t cols, const uint8_t* outlier_mask,
                             int8_t* codes, float* row_absmax, cudaStream_t stream) {
  const unsigned grid = grid_blocks(rows);
  int8_quantize_rows_kernel<T><<<grid, kRowThreads, 0, stream>>>(
      static_cast<const T*>(x), rows, cols, outlier_mask, codes, row_absmax);
}

}  // namespace

cudaError_t launch_int8_outlier_mask(const void* x, FloatType x_type, int64_t rows, int64_t cols,
                                     float threshold, uint8_t* mask, cudaStream_t stream) {
  if (cols <= 0) return cudaSuccess;
  const cudaError_t cleared = cudaMemsetAsync(mask, 0, static_cast<size_t>(cols), stream);
  if (cleared != cudaSuccess || !(threshold > 0.0f) || rows <= 0) return cleared;
  switch (x_type) {
    case FloatType::kFloat32:
      outlier_mask_with_type<float>(x, rows, cols, threshold, mask, stream);
      break;
    case FloatType::kFloat16:
      outlier_mask_with_type<__half>(x, rows, cols, threshold, mask, stream);
      break;
    case FloatType::kBFloat16:
      outlier_mask_with_type<__nv_bfloat16>(x, rows, cols, threshold, mask, stream);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_int8_quantize_rows(const void* x, FloatType x_type, int64_t rows, int64_t cols,
                                      const uint8_t* outlier_mask, int8_t* codes, float* row_absmax,
                                      cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  switch (x_type) {
    case FloatType::kFloat32:
      quantize_rows_with_type<float>(x, rows, cols, outlier_mask, codes, row_absmax, stream);
      break;
    case FloatType::kFloat16:
      quantize_rows_with_type<__half>(x, rows, cols, outlier_mask, codes, row_absmax, stream);
      break;
    case FloatType::kBFloat16:
      quantize_rows_with_type<__nv_bfloat16>(x, rows, cols, outlier_mask, codes, row_absmax,
                                             stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace lowprec::cuda
