// Device helpers shared by the CUDA kernels of pf_kernels._C.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <tuple>

#include "activations.h"
#include "cuda/launch_plan.h"

namespace pf_kernels {
namespace cuda {

// Sum over the aligned groups of `group` lanes (a power of 2 up to 32) of a warp. Every lane of the
// warp must call it (full mask), with the same group.
template <typename T>
__device__ __forceinline__ T group_sum(T v, int group) {
  for (int offset = group / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// sum_k z[k] * w[k] over k < n, split across a group of lanes (lane_in_group of group); every lane of
// the warp calls it (valid = false: contributes 0). The group's lanes all get the sum.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t group_dot(const scalar_t* __restrict__ z, const scalar_t* __restrict__ w,
                                           int64_t n, bool valid, int lane_in_group, int group) {
  acc_t s = acc_t(0);
  if (valid) {
    // Four terms' loads first, then their sum in k order: the loads are in flight together (one at a
    // time, each iteration waited for its own loads: sm_90 SASS, also with #pragma unroll).
    int64_t k = lane_in_group;
    for (; k + 3 * group < n; k += 4 * group) {
      acc_t zk[4], wk[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        zk[u] = static_cast<acc_t>(z[k + u * group]);
        wk[u] = static_cast<acc_t>(w[k + u * group]);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) s += zk[u] * wk[u];
    }
    for (; k < n; k += group) s += static_cast<acc_t>(z[k]) * static_cast<acc_t>(w[k]);
  }
  return group_sum(s, group);
}

// sum of p[q * stride] over q = start, start + step, ... < end, in that order, in acc_t: four loads in
// flight at a time (rolled, the loop waited for each load in turn: sm_90 SASS).
template <typename acc_t, typename in_t>
__device__ __forceinline__ acc_t strided_sum(const in_t* __restrict__ p, int64_t start, int64_t end, int64_t step,
                                             int64_t stride) {
  acc_t s = acc_t(0);
  int64_t q = start;
  for (; q + 3 * step < end; q += 4 * step) {
    acc_t v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = static_cast<acc_t>(p[(q + u * step) * stride]);
#pragma unroll
    for (int u = 0; u < 4; ++u) s += v[u];
  }
  for (; q < end; q += step) s += static_cast<acc_t>(p[q * stride]);
  return s;
}

// Up to plan::kMaxInputs column blocks of one GEMM operand, each its own (rows, D_j) tensor with any
// strides, passed to kernels by value (__grid_constant__: indexed in place, never copied to local memory).
struct LinearInputs {
  const void* ptr[plan::kMaxInputs];
  int64_t row_stride[plan::kMaxInputs];
  int64_t col_stride[plan::kMaxInputs];
  int64_t width[plan::kMaxInputs];
  int64_t offset[plan::kMaxInputs];  // first column of this block in the whole operand (and in W)
  int count;
};

inline LinearInputs linear_inputs(at::TensorList hs) {
  TORCH_CHECK(hs.size() <= static_cast<size_t>(plan::kMaxInputs), "pf_kernels: internal error: ", hs.size(),
              " inputs, the kernels take ", plan::kMaxInputs);
  LinearInputs in{};
  int64_t offset = 0;
  for (size_t j = 0; j < hs.size(); ++j) {
    in.ptr[j] = hs[j].data_ptr();
    in.row_stride[j] = hs[j].stride(0);
    in.col_stride[j] = hs[j].stride(1);
    in.width[j] = hs[j].size(1);
    in.offset[j] = offset;
    offset += hs[j].size(1);
  }
  in.count = static_cast<int>(hs.size());
  return in;
}

// PF_KERNELS_CUDA_PATH=kernel|cublas (tests and measurements only: read per call) overrides the launch
// plans' choice between our one-launch kernels and cuBLAS (fusion_head's forward, backproj_concat's
// context in its forward), so both paths run, and are timed, on the same shapes.
enum class ForcedPath { None, Kernel, Cublas };
inline ForcedPath forced_path() {
  const char* v = std::getenv("PF_KERNELS_CUDA_PATH");
  if (v == nullptr) return ForcedPath::None;
  const std::string s(v);
  if (s == "kernel") return ForcedPath::Kernel;
  if (s == "cublas") return ForcedPath::Cublas;
  TORCH_CHECK(s.empty(), "pf_kernels: PF_KERNELS_CUDA_PATH must be 'kernel' or 'cublas', got '", s, "'");
  return ForcedPath::None;
}
inline bool use_kernel(bool planned) {
  const ForcedPath f = forced_path();
  return f == ForcedPath::None ? planned : f == ForcedPath::Kernel;
}

// a @ b on cuBLAS with the result in the accumulation dtype: fp16/bf16 operands on tensor cores with
// an fp32 output (no rounding to 16 bits before an epilogue); fp32 as eager F.linear does (TF32 only
// where the user allowed it); fp64 in fp64.
inline at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b) {
  const at::ScalarType dtype = a.scalar_type(), acc = at::toOpMathType(dtype);
  return dtype == acc ? at::mm(a, b) : at::mm(a, b, acc);
}

// The dtype of a back-projection's pre-activation gradient (B, Dc), a sum over positions: the input
// dtype, as eager autograd rounds a 16-bit Linear's, but fp32 for fp16, whose range (65504) such a
// sum overflows where the gradients it feeds would not (bf16 has fp32's range; the cpu and triton
// backends keep it in fp32 too).
inline at::ScalarType grad_pre_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf ? at::toOpMathType(dtype) : dtype;
}

// The back-projection's gradients from grad_pre (B, Dc) of grad_pre_dtype: (grad_z, grad_weight,
// grad_bias; empty where there is no bias) in the input dtype. Small GEMMs on the input dtype (cuBLAS,
// fp32 accumulation), as eager: no casts of z, W or the results, each a launch at the launch-bound
// sizes where these ops run (.to() of the same dtype is none); for fp16, on fp32 copies.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backprojection_grads(const at::Tensor& grad_pre,
                                                                           const at::Tensor& z,
                                                                           const at::Tensor& weight, bool has_bias) {
  const at::ScalarType dtype = z.scalar_type(), grad_dtype = grad_pre.scalar_type();
  const at::Tensor w = weight.to(grad_dtype), zw = z.to(grad_dtype);
  at::Tensor grad_bias = has_bias ? grad_pre.sum(0).to(dtype) : at::empty({0}, z.options());
  return {at::mm(grad_pre, w).to(dtype), at::mm(grad_pre.t(), zw).to(dtype), grad_bias};
}

inline int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// The blocks to launch for a planned grid. PF_KERNELS_CUDA_MAX_GRID (tests only: read per launch)
// caps it, so that tiny calls make each block loop over several tasks, as a launch of more than
// 2^31 - 1 tasks does.
inline unsigned launch_grid(int64_t planned) {
  const char* cap = std::getenv("PF_KERNELS_CUDA_MAX_GRID");
  const int64_t limit = cap != nullptr ? std::max<int64_t>(1, std::atoll(cap)) : plan::kMaxGridX;
  return static_cast<unsigned>(std::min(planned, limit));
}

}  // namespace cuda
}  // namespace pf_kernels
