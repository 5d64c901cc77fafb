// Device helpers shared by the CUDA kernels: element conversions and warp reductions.
// Included only by .cu files (nvcc); no torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "lowprec/common.h"

namespace lowprec::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xFFFFFFFFu;

// Grid-stride kernels launch at most this many thread blocks (the limit of a grid's y and z
// dimensions; x keeps to it too, so that one rule sizes every launch).
constexpr int64_t kMaxGridBlocks = 65535;

// Thread blocks for `tiles` tiles of a grid-stride kernel: at least one, at most kMaxGridBlocks.
inline unsigned grid_blocks(int64_t tiles) {
  return static_cast<unsigned>(tiles < 1 ? 1 : tiles < kMaxGridBlocks ? tiles : kMaxGridBlocks);
}

// Conversions round to nearest even, as PyTorch's casts do. Explicit intrinsics, because the
// extension build defines __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
__device__ __forceinline__ float to_float(float x) {
  return x;
}
__device__ __forceinline__ float to_float(__half x) {
  return __half2float(x);
}
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Max over aligned groups of `width` lanes (a power of two <= 32); every lane of the warp must
// take part, and every lane ends with its group's max.
__device__ __forceinline__ uint32_t warp_group_max(uint32_t value, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    value = max(value, __shfl_xor_sync(kFullWarpMask, value, offset));
  }
  return value;
}

}  // namespace lowprec::cuda
