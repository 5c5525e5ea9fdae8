// Host helpers shared by the CPU kernels: the parallel grain, and small linear maps computed in the
// accumulation dtype (plain loops where a BLAS call's fixed cost would dominate, ATen GEMMs above).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"

namespace pf_kernels {
namespace cpu {

// Below this many multiply-adds a plain loop beats a BLAS call's fixed cost.
constexpr int64_t kSmallGemm = 1 << 15;

// Parallel chunks of at least at::internal::GRAIN_SIZE elements, as ATen's own kernels use: a
// parallel region costs a thread wake-up, which on a busy machine can be a scheduler tick.
inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, elements_per_item));
}

// y = in @ weight.T + bias in the accumulation type acc_t, as a contiguous (N, M) tensor.
// in (N, K), weight (M, K), bias (M,): scalar_t, any strides.
template <typename scalar_t, typename acc_t>
at::Tensor linear_acc(const at::Tensor& in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t N = in.size(0), K = in.size(1), M = weight.size(0);
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  if (N * M * K > kSmallGemm) {
    const at::Tensor in_acc = in.to(acc), w_acc = weight.to(acc);
    return has_bias(bias) ? at::addmm(bias->to(acc), in_acc, w_acc.t()) : at::mm(in_acc, w_acc.t());
  }
  at::Tensor y = at::empty({N, M}, in.options().dtype(acc));
  const at::Tensor ic = in.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = has_bias(bias) ? bias->contiguous() : at::Tensor();
  const scalar_t* ip = ic.data_ptr<scalar_t>();
  const scalar_t* wp = wc.data_ptr<scalar_t>();
  const scalar_t* bp = bc.defined() ? bc.data_ptr<scalar_t>() : nullptr;
  acc_t* yp = y.data_ptr<acc_t>();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      acc_t s = bp ? static_cast<acc_t>(bp[m]) : acc_t(0);
      for (int64_t k = 0; k < K; ++k) s += static_cast<acc_t>(ip[n * K + k]) * static_cast<acc_t>(wp[m * K + k]);
      yp[n * M + m] = s;
    }
  }
  return y;
}

// The gradients of y = in @ weight.T + bias from grad_y (N, M, accumulation dtype acc_t):
// grad_in (N, K), grad_weight (M, K), grad_bias (M,) (undefined when !with_bias), each returned in
// out_dtype (rounded once). in and weight: scalar_t, any strides.
template <typename scalar_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(const at::Tensor& grad_y, const at::Tensor& in,
                                                               const at::Tensor& weight, bool with_bias,
                                                               at::ScalarType out_dtype) {
  const int64_t N = in.size(0), K = in.size(1), M = weight.size(0);
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor grad_in, grad_weight, grad_bias;
  if (N * M * K > kSmallGemm) {
    grad_in = at::mm(grad_y, weight.to(acc)).to(out_dtype);
    grad_weight = at::mm(grad_y.t(), in.to(acc)).to(out_dtype);
    if (with_bias) grad_bias = grad_y.sum(0).to(out_dtype);
    return {grad_in, grad_weight, grad_bias};
  }
  // Small: plain loops, no BLAS call overhead.
  const at::Tensor gc = grad_y.contiguous(), ic = in.contiguous(), wc = weight.contiguous();
  const acc_t* gp = gc.data_ptr<acc_t>();
  const scalar_t* ip = ic.data_ptr<scalar_t>();
  const scalar_t* wp = wc.data_ptr<scalar_t>();
  std::vector<acc_t> gi(N * K, acc_t(0)), gw(M * K, acc_t(0)), gb(M, acc_t(0));
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      const acc_t g = gp[n * M + m];
      gb[m] += g;
      for (int64_t k = 0; k < K; ++k) {
        gi[n * K + k] += g * static_cast<acc_t>(wp[m * K + k]);
        gw[m * K + k] += g * static_cast<acc_t>(ip[n * K + k]);
      }
    }
  }
  auto to_tensor = [&](const std::vector<acc_t>& v, at::IntArrayRef sizes) {
    at::Tensor t = at::empty(sizes, grad_y.options().dtype(acc));
    std::copy(v.begin(), v.end(), t.data_ptr<acc_t>());
    return t.to(out_dtype);
  };
  grad_in = to_tensor(gi, {N, K});
  grad_weight = to_tensor(gw, {M, K});
  if (with_bias) grad_bias = to_tensor(gb, {M});
  return {grad_in, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace pf_kernels
