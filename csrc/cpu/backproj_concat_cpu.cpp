// backproj_concat on CPU: the context once per batch row, then one pass writing the concatenated rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "activations.h"
#include "cpu/activation_ops.h"
#include "cpu/common.h"
#include "checks.h"

namespace pf_kernels {
namespace {

using cpu::grain_for;
using cpu::linear_acc;

// Short rows: an inlined loop the compiler vectorises beats a memcpy call per row.
template <typename scalar_t>
inline void copy_row(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src, int64_t n) {
  if (n >= 64) {
    std::memcpy(dst, src, n * sizeof(scalar_t));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  }
}

// s[c] += sum over positions of g[p * sp + c * sc] (common.h: accumulate_over_positions). Always
// inlined, so that the SIMD clones below, passing sc = 1, get contiguous loads that vectorise.
template <typename acc_t, typename scalar_t>
PF_ALWAYS_INLINE void add_position_sums_impl(acc_t* __restrict__ s, const scalar_t* __restrict__ g,
                                             int64_t positions, int64_t sp, int64_t sc, int64_t Dc) {
  auto add_row = [&](int64_t p, int64_t c0, int64_t cn, acc_t* __restrict__ part) PF_LAMBDA_INLINE {
    const scalar_t* __restrict__ row = g + p * sp + c0 * sc;
    for (int64_t c = 0; c < cn; ++c) part[c] += static_cast<acc_t>(row[c * sc]);
  };
  cpu::accumulate_over_positions(s, positions, Dc, add_row);
}
// Rows of contiguous features: fp32 / fp64 compiled per SIMD width.
PF_SIMD_CLONES void add_position_sums(float* s, const float* g, int64_t positions, int64_t sp, int64_t Dc) {
  add_position_sums_impl(s, g, positions, sp, 1, Dc);
}
PF_SIMD_CLONES void add_position_sums(double* s, const double* g, int64_t positions, int64_t sp, int64_t Dc) {
  add_position_sums_impl(s, g, positions, sp, 1, Dc);
}
template <typename acc_t, typename scalar_t>  // 16-bit inputs, widened per element
void add_position_sums(acc_t* s, const scalar_t* g, int64_t positions, int64_t sp, int64_t Dc) {
  add_position_sums_impl(s, g, positions, sp, 1, Dc);
}

at::Tensor backproj_concat_cpu(const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, c10::string_view activation_name) {
  check_backproj_concat(x, z, weight, bias);
  const Activation act = parse_activation(std::string(activation_name));
  const int64_t B = x.size(0), Dx = x.size(-1), Dc = weight.size(0), D = Dx + Dc;
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = D;
  at::Tensor out = at::empty(out_sizes, x.options());
  if (out.numel() == 0) return out;
  const int64_t n_rows = out.numel() / D;  // B * positions
  const int64_t positions = n_rows / B;
  // Rows of x with unit inner stride, viewed as (n_rows, Dx) where strides allow, copied where not.
  at::Tensor x_rows = x.reshape({n_rows, Dx});
  if (Dx > 1 && x_rows.stride(1) != 1) x_rows = x_rows.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "backproj_concat_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The context, once per batch row: (B, Dc), small next to the output.
    at::Tensor y = linear_acc<scalar_t, acc_t>(z, weight, bias);
    activate_inplace(y, act);
    const at::Tensor context = y.to(x.scalar_type());
    const scalar_t* c_ptr = context.data_ptr<scalar_t>();
    const scalar_t* x_ptr = x_rows.data_ptr<scalar_t>();
    const int64_t x_stride = x_rows.stride(0);
    scalar_t* o_ptr = out.data_ptr<scalar_t>();
    // Then one pass writing every concatenated row.
    at::parallel_for(0, n_rows, grain_for(D), [&](int64_t begin, int64_t end) {
      cpu::BatchRowWalk walk(begin, positions);
      for (int64_t r = begin; r < end; ++r, walk.next()) {
        scalar_t* o = o_ptr + r * D;
        copy_row(o, x_ptr + r * x_stride, Dx);
        copy_row(o + Dx, c_ptr + walk.batch * Dc, Dc);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backproj_concat_backward_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& context, const at::Tensor& z,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, c10::string_view activation_name,
    int64_t x_features) {
  check_backproj_concat_backward(grad_out, context, z, weight, bias, x_features);
  const int64_t B = z.size(0), Dc = weight.size(0), D = x_features + Dc;
  const Activation act = parse_activation(std::string(activation_name));
  const at::ScalarType dtype = grad_out.scalar_type(), acc = at::toOpMathType(dtype);
  const int64_t positions = B > 0 && D > 0 ? grad_out.numel() / (B * D) : 0;
  at::Tensor grad_z, grad_weight, grad_bias;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "backproj_concat_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The context's gradient: grad_out's last Dc features summed over positions, one pass (with one
    // position and no widening: grad_out's columns themselves, as eager autograd reads them).
    const at::Tensor g = grad_out.reshape({B, positions, D}).narrow(-1, x_features, Dc);
    const bool columns_as_is = positions == 1 && std::is_same<scalar_t, acc_t>::value;
    at::Tensor grad_c = columns_as_is ? g.select(1, 0) : at::zeros({B, Dc}, grad_out.options().dtype(acc));
    if (positions > 0 && !columns_as_is) {
      acc_t* gc_ptr = grad_c.data_ptr<acc_t>();
      const scalar_t* g_ptr = g.data_ptr<scalar_t>();
      const int64_t sb = g.stride(0), sp = g.stride(1), sc = g.stride(2);
      at::parallel_for(0, B, grain_for(positions * Dc), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          acc_t* __restrict__ s = gc_ptr + b * Dc;
          if (sc == 1) {
            add_position_sums(s, g_ptr + b * sb, positions, sp, Dc);
          } else {
            add_position_sums_impl(s, g_ptr + b * sb, positions, sp, sc, Dc);
          }
        }
      });
    }
    // grad_y = grad_c * act'(y): act' from the saved context where it holds act(y) exactly
    // (fp32/fp64), as eager autograd does; from y itself for gelu, for 16-bit outputs, whose
    // rounding loses 1 - a^2 near saturation, and where no context is given (a small (B, Dc) GEMM).
    const bool from_y = act == Activation::Gelu || !std::is_same<scalar_t, acc_t>::value ||
                        !is_given(context);
    at::Tensor grad_y = grad_c;
    if (act != Activation::None && B > 0 && positions > 0) {
      const at::Tensor source = from_y ? linear_acc<scalar_t, acc_t>(z, weight, bias) : *context;
      grad_y = activation_backward(grad_c, source, act, from_y).contiguous();
    }
    std::tie(grad_z, grad_weight, grad_bias) =
        cpu::linear_backward<scalar_t, acc_t>(grad_y, z, weight, is_given(bias), dtype);
  });
  if (!grad_bias.defined()) grad_bias = at::empty({0}, grad_out.options());
  return {grad_z, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pf_kernels, CPU, m) {
  m.impl("backproj_concat", &backproj_concat_cpu);
  m.impl("backproj_concat_backward", &backproj_concat_backward_cpu);
}

}  // namespace pf_kernels
