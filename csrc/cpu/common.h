// Host helpers shared by the CPU kernels: the parallel grain, and small linear maps computed in the
// accumulation dtype (plain loops where a BLAS call's fixed cost would dominate, ATen GEMMs above).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>

#include "checks.h"

namespace pf_kernels {
namespace cpu {

// This extension is built for the baseline ISA (SSE2 on x86-64); a hot loop marked PF_SIMD_CLONES
// is compiled also for AVX2 and AVX-512, and the loader picks the widest the CPU has (GCC/Clang
// function multiversioning), as ATen's own kernels are dispatched.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define PF_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PF_SIMD_CLONES
#endif

// Sums over positions add up blocks of kSumBlock positions (features kSumChunk at a time, on the
// stack), then each block's sum into the total with a compensated (Kahan) addition: the rounding
// error grows with kSumBlock, not with the positions (a running sum lost 2e-5 relative in fp32 over
// 1e6 positions, where torch's sum keeps 2e-7). Up to kSumBlock positions it is the running sum itself.
constexpr int64_t kSumBlock = 128;
constexpr int64_t kSumChunk = 256;

// total += part, compensated: carry holds what the last additions lost (starts at 0).
template <typename T>
inline void add_compensated(T& total, T& carry, T part) {
  const T y = part - carry;
  const T t = total + y;
  carry = (t - total) - y;
  total = t;
}

// sum[c] += the sum over positions p of row p's values, for c < n, as above: add_row(p, c0, cn, part)
// adds row p's values of features [c0, c0 + cn) into part[0, cn) (its own loop, with restrict
// pointers, so that it vectorises). It, add_row (marked PF_LAMBDA_INLINE) and the function calling it
// from a PF_SIMD_CLONES one are always inlined: a function the clones call instead is compiled for the
// baseline ISA only (the relu pass ran 1.7x slower so).
#if defined(__GNUC__)
#define PF_ALWAYS_INLINE inline __attribute__((always_inline))
#define PF_LAMBDA_INLINE __attribute__((always_inline))
#else
#define PF_ALWAYS_INLINE inline
#define PF_LAMBDA_INLINE
#endif
template <typename acc_t, typename AddRow>
PF_ALWAYS_INLINE void accumulate_over_positions(acc_t* __restrict__ sum, int64_t positions, int64_t n,
                                                AddRow&& add_row) {
  acc_t part[kSumChunk], carry[kSumChunk];
  for (int64_t c0 = 0; c0 < n; c0 += kSumChunk) {
    const int64_t cn = std::min(kSumChunk, n - c0);
    for (int64_t c = 0; c < cn; ++c) carry[c] = acc_t(0);
    for (int64_t p0 = 0; p0 < positions; p0 += kSumBlock) {
      const int64_t p1 = std::min(positions, p0 + kSumBlock);
      for (int64_t c = 0; c < cn; ++c) part[c] = acc_t(0);
      for (int64_t p = p0; p < p1; ++p) add_row(p, c0, cn, part);
      for (int64_t c = 0; c < cn; ++c) add_compensated(sum[c0 + c], carry[c], part[c]);
    }
  }
}

// Below this many multiply-adds the loops below (vectorised, in L1) beat a BLAS call's fixed cost.
constexpr int64_t kSmallGemm = 1 << 15;

// Parallel chunks of at least at::internal::GRAIN_SIZE elements, as ATen's own kernels use: a
// parallel region costs a thread wake-up, which on a busy machine can be a scheduler tick.
inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, elements_per_item));
}

// The batch row of flat row `row` of a (batch, positions) walk, advanced row by row: a 64-bit division
// per row cost more than copying a short row.
struct BatchRowWalk {
  int64_t batch, position;
  const int64_t positions;
  BatchRowWalk(int64_t row, int64_t positions_)
      : batch(row / positions_), position(row % positions_), positions(positions_) {}
  void next() {
    if (++position == positions) {
      position = 0;
      ++batch;
    }
  }
};

namespace {  // each including file gets its own copies (and SIMD clones)

// y (N, M) = x (N, K) @ wt (K, M) (+ bias (M,)): wt is the weight transposed (contiguous), so the
// inner loop runs along M with no reduction chain and vectorises; x rows of K contiguous
// elements, ldx apart. (A dot product per output, vectorised along K, was 3-7x slower at these
// sizes: the horizontal sums dominate.)
template <typename T>
inline void small_linear_impl(T* __restrict__ y, const T* __restrict__ x, int64_t ldx, const T* __restrict__ wt,
                              const T* __restrict__ bias, int64_t N, int64_t K, int64_t M) {
  for (int64_t n = 0; n < N; ++n) {
    T* __restrict__ yr = y + n * M;
    for (int64_t m = 0; m < M; ++m) yr[m] = bias != nullptr ? bias[m] : T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T a = x[n * ldx + k];
      const T* __restrict__ wr = wt + k * M;
      for (int64_t m = 0; m < M; ++m) yr[m] += a * wr[m];
    }
  }
}
PF_SIMD_CLONES void small_linear(float* y, const float* x, int64_t ldx, const float* wt, const float* bias, int64_t N,
                                 int64_t K, int64_t M) {
  small_linear_impl(y, x, ldx, wt, bias, N, K, M);
}
PF_SIMD_CLONES void small_linear(double* y, const double* x, int64_t ldx, const double* wt, const double* bias,
                                 int64_t N, int64_t K, int64_t M) {
  small_linear_impl(y, x, ldx, wt, bias, N, K, M);
}

// From g (N, M): gx (N, K) = g @ w, gw (M, K) = g^T @ x, gb (M,) = sum over n of g; w (M, K) and
// x (N, K) rows of K contiguous elements, ld apart; the outputs contiguous and zeroed by the
// caller. The inner loops run along K.
template <typename T>
inline void small_linear_backward_impl(T* __restrict__ gx, T* __restrict__ gw, T* __restrict__ gb,
                                       const T* __restrict__ g, const T* __restrict__ x, int64_t ldx,
                                       const T* __restrict__ w, int64_t ldw, int64_t N, int64_t K, int64_t M) {
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      const T gv = g[n * M + m];
      gb[m] += gv;
      T* __restrict__ gxr = gx + n * K;
      T* __restrict__ gwr = gw + m * K;
      const T* __restrict__ wr = w + m * ldw;
      const T* __restrict__ xr = x + n * ldx;
      for (int64_t k = 0; k < K; ++k) {
        gxr[k] += gv * wr[k];
        gwr[k] += gv * xr[k];
      }
    }
  }
}
PF_SIMD_CLONES void small_linear_backward(float* gx, float* gw, float* gb, const float* g, const float* x,
                                          int64_t ldx, const float* w, int64_t ldw, int64_t N, int64_t K, int64_t M) {
  small_linear_backward_impl(gx, gw, gb, g, x, ldx, w, ldw, N, K, M);
}
PF_SIMD_CLONES void small_linear_backward(double* gx, double* gw, double* gb, const double* g, const double* x,
                                          int64_t ldx, const double* w, int64_t ldw, int64_t N, int64_t K,
                                          int64_t M) {
  small_linear_backward_impl(gx, gw, gb, g, x, ldx, w, ldw, N, K, M);
}

// t in the accumulation dtype with rows of unit stride: t itself where it already is (no copy).
inline at::Tensor acc_rows(const at::Tensor& t, at::ScalarType acc) {
  at::Tensor r = t.to(acc);
  return r.size(1) > 1 && r.stride(1) != 1 ? r.contiguous() : r;
}
inline int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

}  // namespace

// y = in @ weight.T + bias in the accumulation type acc_t, as a contiguous (N, M) tensor.
// in (N, K), weight (M, K), bias (M,): scalar_t, any strides.
template <typename scalar_t, typename acc_t>
at::Tensor linear_acc(const at::Tensor& in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t N = in.size(0), K = in.size(1), M = weight.size(0);
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  if (N * M * K > kSmallGemm) {
    const at::Tensor in_acc = in.to(acc), w_acc = weight.to(acc);
    return is_given(bias) ? at::addmm(bias->to(acc), in_acc, w_acc.t()) : at::mm(in_acc, w_acc.t());
  }
  at::Tensor y = at::empty({N, M}, in.options().dtype(acc));
  const at::Tensor x = acc_rows(in, acc), wt = weight.to(acc).t().contiguous();
  const at::Tensor b = is_given(bias) ? bias->to(acc).contiguous() : at::Tensor();
  small_linear(y.data_ptr<acc_t>(), x.data_ptr<acc_t>(), row_stride(x), wt.data_ptr<acc_t>(),
               b.defined() ? b.data_ptr<acc_t>() : nullptr, N, K, M);
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
  const at::Tensor g = grad_y.contiguous(), x = acc_rows(in, acc), w = acc_rows(weight, acc);
  const at::TensorOptions options = grad_y.options().dtype(acc);
  grad_in = at::zeros({N, K}, options);
  grad_weight = at::zeros({M, K}, options);
  grad_bias = at::zeros({M}, options);
  small_linear_backward(grad_in.data_ptr<acc_t>(), grad_weight.data_ptr<acc_t>(), grad_bias.data_ptr<acc_t>(),
                        g.data_ptr<acc_t>(), x.data_ptr<acc_t>(), row_stride(x), w.data_ptr<acc_t>(),
                        row_stride(w), N, K, M);
  return {grad_in.to(out_dtype), grad_weight.to(out_dtype), with_bias ? grad_bias.to(out_dtype) : at::Tensor()};
}

}  // namespace cpu
}  // namespace pf_kernels
