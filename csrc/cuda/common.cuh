// Device helpers shared by the CUDA kernels of pf_kernels._C.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <cstdint>

#include "activations.h"

namespace pf_kernels {
namespace cuda {

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Enough blocks to fill the GPU a few times over.
inline int64_t target_blocks() { return 8 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount); }

}  // namespace cuda
}  // namespace pf_kernels
