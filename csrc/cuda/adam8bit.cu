// The fused 8-bit Adam / AdamW step on CUDA, for many tensors per launch. The per-element math
// and the encoding rule are lowprec/adam8bit.h and lowprec/blockwise8.h, the code the CPU
// kernels run, so both follow the reference operation for operation.
//
// A group of up to kTensorsPerLaunch tensors travels in the kernel parameters (pointers, sizes
// and the first tile of each tensor), so a model's parameters cost three launches per group:
//   1. check:  each thread block scans a tile of one gradient; a NaN or an infinity sets the
//              tensor's flag (before any write, so a skipped tensor is left untouched);
//   2. update: each thread block updates a tile of quantization blocks of one unflagged tensor,
//              holding every element in registers from the decode to the encode;
//   3. finish: one thread per tensor sets step = t, or adds one to skipped.
// Step 2 reads the step count and step 3 writes it, so they are separate launches.
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "adam8bit.h"
#include "lowprec/adam8bit.h"
#include "lowprec/blockwise8.h"
#include "lowprec/cuda_utils.cuh"

namespace lowprec::cuda {
namespace {

constexpr int kTensorsPerLaunch = 32;

// Update: a thread block of kUpdateThreads threads splits into groups, one group per
// quantization block, each thread holding blocksize / group threads elements (at least
// kUpdateMinItemsPerThread, at most kUpdateMaxItemsPerThread).
constexpr int kUpdateThreads = 256;
constexpr int kUpdateMinItemsPerThread = 4;
constexpr int kUpdateMaxItemsPerThread = kBlocksizeMax8bit / kUpdateThreads;
constexpr int kUpdateWarps = kUpdateThreads / kWarpSize;
static_assert(kUpdateThreads >= kCodebookSize8bit, "each thread builds at most one table entry");
static_assert(kBlocksizeMin8bit / kUpdateMinItemsPerThread <= kUpdateThreads,
              "the smallest block must fit in one thread block");

// Check: a thread block scans kCheckThreads * kCheckItemsPerThread consecutive elements.
constexpr int kCheckThreads = 256;
constexpr int kCheckItemsPerThread = 16;
constexpr int64_t kCheckTileElements = kCheckThreads * kCheckItemsPerThread;

// One launch's tensors, passed as a __grid_constant__ kernel parameter (indexed in place, never
// copied per thread). tile_start[k] is the first tile of tensor k (tiles of the launching
// kernel: check tiles or update tiles); tile_start[count] is the total.
struct LaunchGroup {
  Adam8bitTensorArgs tensors[kTensorsPerLaunch];
  int64_t tile_start[kTensorsPerLaunch + 1];
  int32_t* non_finite;  // one flag per tensor of the group
  int count;
};

__device__ __forceinline__ int tensor_of_tile(const LaunchGroup& group, int64_t tile) {
  int k = 0;
  while (k + 1 < group.count && group.tile_start[k + 1] <= tile)
    ++k;
  return k;
}

template <typename T>
__device__ __forceinline__ float load_float(const void* data, int64_t i) {
  return to_float(static_cast<const T*>(data)[i]);
}

template <typename T>
__device__ __forceinline__ void store_float(void* data, int64_t i, float value) {
  static_cast<T*>(data)[i] = from_float<T>(value);
}

// The exponent bits of a NaN or an infinity (all ones) of each element type.
template <typename T>
__device__ __forceinline__ bool is_finite_bits(const void* data, int64_t i) {
  if constexpr (sizeof(T) == 4) {
    return (static_cast<const uint32_t*>(data)[i] & 0x7F800000u) != 0x7F800000u;
  } else if constexpr (std::is_same_v<T, __half>) {
    return (static_cast<const uint16_t*>(data)[i] & 0x7C00u) != 0x7C00u;
  } else {
    return (static_cast<const uint16_t*>(data)[i] & 0x7F80u) != 0x7F80u;
  }
}

template <typename T>
__device__ __forceinline__ bool tile_is_finite(const void* g, int64_t begin, int64_t n) {
  bool finite = true;
#pragma unroll
  for (int k = 0; k < kCheckItemsPerThread; ++k) {
    const int64_t i = begin + static_cast<int64_t>(k) * kCheckThreads + threadIdx.x;
    if (i < n) finite &= is_finite_bits<T>(g, i);
  }
  return finite;
}

__global__ void __launch_bounds__(kCheckThreads)
    adam8bit_check_kernel(const __grid_constant__ LaunchGroup group) {
  const int64_t tiles = group.tile_start[group.count];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int k = tensor_of_tile(group, tile);
    const Adam8bitTensorArgs& t = group.tensors[k];
    const int64_t begin = (tile - group.tile_start[k]) * kCheckTileElements;
    bool finite;
    switch (t.type) {
      case FloatType::kFloat16:
        finite = tile_is_finite<__half>(t.g, begin, t.n);
        break;
      case FloatType::kBFloat16:
        finite = tile_is_finite<__nv_bfloat16>(t.g, begin, t.n);
        break;
      default:
        finite = tile_is_finite<float>(t.g, begin, t.n);
        break;
    }
    // Every thread reaches this barrier: the loop bounds depend on blockIdx only.
    if (__syncthreads_or(!finite) && threadIdx.x == 0) group.non_finite[k] = 1;
  }
}

// Max of two values over the `group_threads` threads of each group (a power of two); groups
// are aligned runs of threads. Every thread of the block must call it equally often.
__device__ __forceinline__ uint2 group_max2(uint32_t a, uint32_t b, int group_threads,
                                            uint2* warp_maxima) {
  const int width = min(group_threads, kWarpSize);
  a = warp_group_max(a, width);
  b = warp_group_max(b, width);
  if (group_threads <= kWarpSize) return make_uint2(a, b);
  const int warp = threadIdx.x / kWarpSize;
  __syncthreads();  // the previous tile's readers are done with warp_maxima
  if (threadIdx.x % kWarpSize == 0) warp_maxima[warp] = make_uint2(a, b);
  __syncthreads();
  const int warps_per_group = group_threads / kWarpSize;
  const int first_warp = warp / warps_per_group * warps_per_group;
  uint2 result = make_uint2(0u, 0u);
  for (int w = 0; w < warps_per_group; ++w) {
    result.x = max(result.x, warp_maxima[first_warp + w].x);
    result.y = max(result.y, warp_maxima[first_warp + w].y);
  }
  return result;
}

struct SharedTables {
  float qmap1[kCodebookSize8bit];
  float qmap2[kCodebookSize8bit];
  float thresholds1[kThresholdTableSize8bit];
  float thresholds2[kThresholdTableSize8bit];
  uint2 warp_maxima[kUpdateWarps];
};

// One tile (groups_per_tile quantization blocks) of one tensor; each thread holds kItems
// elements of its block (blocksize / group_threads).
template <typename T, int kItems>
__device__ __forceinline__ void update_tile(const Adam8bitTensorArgs& t, const AdamCoefficients& c,
                                            int64_t tile, int blocksize, int group_threads,
                                            SharedTables& shared) {
  const int64_t num_blocks = (t.n + blocksize - 1) / blocksize;
  const int groups_per_tile = kUpdateThreads / group_threads;
  const int group = threadIdx.x / group_threads;
  const int lane = threadIdx.x % group_threads;
  const int64_t block = tile * groups_per_tile + group;
  const bool block_exists = block < num_blocks;
  const int64_t begin = block * blocksize + lane;
  const float old_absmax1 = block_exists ? t.absmax1[block] : 0.0f;
  const float old_absmax2 = block_exists ? t.absmax2[block] : 0.0f;

  float m[kItems];
  float v[kItems];
  uint32_t max1 = 0;
  uint32_t max2 = 0;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = begin + static_cast<int64_t>(k) * group_threads;
    m[k] = v[k] = 0.0f;
    if (block_exists && i < t.n) {
      float p = load_float<T>(t.p, i);
      m[k] = shared.qmap1[t.state1[i]] * old_absmax1;
      v[k] = shared.qmap2[t.state2[i]] * old_absmax2;
      adam_update(&p, load_float<T>(t.g, i), &m[k], &v[k], c);
      store_float<T>(t.p, i, p);
      max1 = max(max1, magnitude_bits(m[k]));
      max2 = max(max2, magnitude_bits(v[k]));
    }
  }
  const uint2 max_bits = group_max2(max1, max2, group_threads, shared.warp_maxima);
  if (!block_exists) return;
  const float absmax1 = absmax_from_magnitude_bits(max_bits.x);
  const float absmax2 = absmax_from_magnitude_bits(max_bits.y);
  if (lane == 0) {
    t.absmax1[block] = absmax1;
    t.absmax2[block] = absmax2;
  }
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = begin + static_cast<int64_t>(k) * group_threads;
    if (i < t.n) {
      t.state1[i] = encode_8bit(scale_by_absmax(m[k], absmax1), shared.thresholds1);
      t.state2[i] = encode_8bit(scale_by_absmax(v[k], absmax2), shared.thresholds2);
    }
  }
}

template <int kItems>
__global__ void __launch_bounds__(kUpdateThreads)
    adam8bit_update_kernel(const __grid_constant__ LaunchGroup group,
                           const float* __restrict__ qmap1, const float* __restrict__ qmap2,
                           const Adam8bitHyper hyper, int group_threads) {
  __shared__ SharedTables shared;
  if (threadIdx.x < kCodebookSize8bit) {
    shared.qmap1[threadIdx.x] = qmap1[threadIdx.x];
    shared.qmap2[threadIdx.x] = qmap2[threadIdx.x];
    shared.thresholds1[threadIdx.x] = codebook_threshold(qmap1, kCodebookSize8bit, threadIdx.x);
    shared.thresholds2[threadIdx.x] = codebook_threshold(qmap2, kCodebookSize8bit, threadIdx.x);
  }
  __syncthreads();

  const int blocksize = static_cast<int>(hyper.blocksize);
  const int64_t tiles = group.tile_start[group.count];
  int cached_tensor = -1;
  AdamCoefficients c{};
  // The loop bounds and the skip depend on blockIdx and the tile's tensor only, so all threads
  // run the same iterations (and reach the barriers in group_max2 together).
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int k = tensor_of_tile(group, tile);
    if (group.non_finite[k]) continue;
    const Adam8bitTensorArgs& t = group.tensors[k];
    if (k != cached_tensor) {
      // t = int(step) + 1, as the reference reads it.
      const double new_step = trunc(static_cast<double>(*t.step)) + 1.0;
      c = adam_coefficients(hyper.lr, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay,
                            hyper.decoupled, hyper.gnorm_scale, new_step);
      cached_tensor = k;
    }
    const int64_t local_tile = tile - group.tile_start[k];
    switch (t.type) {
      case FloatType::kFloat16:
        update_tile<__half, kItems>(t, c, local_tile, blocksize, group_threads, shared);
        break;
      case FloatType::kBFloat16:
        update_tile<__nv_bfloat16, kItems>(t, c, local_tile, blocksize, group_threads, shared);
        break;
      default:
        update_tile<float, kItems>(t, c, local_tile, blocksize, group_threads, shared);
        break;
    }
  }
}

__global__ void adam8bit_finish_kernel(const __grid_constant__ LaunchGroup group) {
  const int k = threadIdx.x;
  if (k >= group.count) return;
  const Adam8bitTensorArgs& t = group.tensors[k];
  if (group.non_finite[k]) {
    *t.skipped = *t.skipped + 1.0f;
  } else {
    *t.step = static_cast<float>(trunc(static_cast<double>(*t.step)) + 1.0);
  }
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Elements per thread: the smallest blocks use group threads of kUpdateMinItemsPerThread items,
// blocks larger than kUpdateThreads * kUpdateMinItemsPerThread use the whole thread block. The
// kernel is compiled per count, so a thread holds only the registers its blocks need.
void launch_update(const LaunchGroup& group, const float* qmap1, const float* qmap2,
                   const Adam8bitHyper& hyper, int group_threads, cudaStream_t stream) {
  const int items = static_cast<int>(hyper.blocksize / group_threads);
  const unsigned grid = grid_blocks(group.tile_start[group.count]);
  static_assert(kUpdateMaxItemsPerThread == 16, "one instantiation per item count below");
  switch (items) {
    case 4:
      adam8bit_update_kernel<4>
          <<<grid, kUpdateThreads, 0, stream>>>(group, qmap1, qmap2, hyper, group_threads);
      break;
    case 8:
      adam8bit_update_kernel<8>
          <<<grid, kUpdateThreads, 0, stream>>>(group, qmap1, qmap2, hyper, group_threads);
      break;
    default:
      adam8bit_update_kernel<16>
          <<<grid, kUpdateThreads, 0, stream>>>(group, qmap1, qmap2, hyper, group_threads);
      break;
  }
}

}  // namespace

cudaError_t launch_adam8bit_multi_step(const Adam8bitTensorArgs* tensors, int64_t count,
                                       const float* qmap1, const float* qmap2,
                                       const Adam8bitHyper& hyper, int32_t* non_finite,
                                       cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  cudaError_t status = cudaMemsetAsync(non_finite, 0, count * sizeof(int32_t), stream);
  if (status != cudaSuccess) return status;
  const int group_threads = static_cast<int>(
      std::min<int64_t>(hyper.blocksize / kUpdateMinItemsPerThread, kUpdateThreads));
  const int64_t blocks_per_tile = kUpdateThreads / group_threads;

  for (int64_t first = 0; first < count; first += kTensorsPerLaunch) {
    LaunchGroup check{};
    LaunchGroup update{};
    const int size = static_cast<int>(std::min<int64_t>(kTensorsPerLaunch, count - first));
    check.count = update.count = size;
    check.non_finite = update.non_finite = non_finite + first;
    for (int k = 0; k < size; ++k) {
      const Adam8bitTensorArgs& t = tensors[first + k];
      check.tensors[k] = update.tensors[k] = t;
      check.tile_start[k + 1] = check.tile_start[k] + ceil_div(t.n, kCheckTileElements);
      update.tile_start[k + 1] =
          update.tile_start[k] + ceil_div(ceil_div(t.n, hyper.blocksize), blocks_per_tile);
    }
    adam8bit_check_kernel<<<grid_blocks(check.tile_start[size]), kCheckThreads, 0, stream>>>(check);
    launch_update(update, qmap1, qmap2, hyper, group_threads, stream);
    adam8bit_finish_kernel<<<1, kTensorsPerLaunch, 0, stream>>>(update);
    status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

}  // namespace lowprec::cuda
