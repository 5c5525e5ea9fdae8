// context_linear on CPU. Forward: the (B, H) context term once per batch row (two small linear
// maps: the back-projection, rounded to the dtype as backproj_concat returns it, then W_c), then
// one pass over p adding it (and relu). Backward: the term's gradient is grad_out (times the
// output activation's derivative, in the same pass for relu) summed over positions, then the small
// linear maps' backward. The fused passes (fp32/fp64, none or relu) are compiled per SIMD width
// (PF_SIMD_CLONES); the rest (16-bit, tanh/sigmoid/gelu) runs ATen's own vectorised kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include <vector>

#include "activations.h"
#include "context_linear.h"
#include "cpu/activation_ops.h"
#include "cpu/common.h"

namespace pf_kernels {
namespace {

using cpu::linear_acc;

// The context c = act(z @ bp_weight^T + bp_bias) rounded to scalar_t (as backproj_concat returns it),
// and the term c @ proj_weight^T in the accumulation dtype: (B, H). Also returns c.
template <typename scalar_t, typename acc_t>
std::pair<at::Tensor, at::Tensor> context_term(const at::Tensor& z, const at::Tensor& bp_weight,
                                               const c10::optional<at::Tensor>& bp_bias,
                                               const at::Tensor& proj_weight, Activation act) {
  at::Tensor pre = linear_acc<scalar_t, acc_t>(z, bp_weight, bp_bias);
  activate_inplace(pre, act);
  const at::Tensor c = pre.to(z.scalar_type());
  return {linear_acc<scalar_t, acc_t>(c, proj_weight, c10::nullopt), c};
}

// The fused passes for fp32 / fp64 rows of H contiguous features, compiled per SIMD width.
// out[r] = p[r] + term[r / positions], then relu (y < 0 ? 0 : y keeps NaN, as torch.relu does).
template <typename T>
inline void add_term_rows_impl(T* __restrict__ out, const T* __restrict__ p, int64_t p_stride,
                               const T* __restrict__ term, int64_t r0, int64_t r1, int64_t positions, int64_t H,
                               bool relu) {
  cpu::BatchRowWalk walk(r0, positions);
  for (int64_t r = r0; r < r1; ++r, walk.next()) {
    const T* __restrict__ pr = p + r * p_stride;
    const T* __restrict__ q = term + walk.batch * H;
    T* __restrict__ o = out + r * H;
    if (relu) {
      for (int64_t h = 0; h < H; ++h) {
        const T y = pr[h] + q[h];
        o[h] = y < T(0) ? T(0) : y;
      }
    } else {
      for (int64_t h = 0; h < H; ++h) o[h] = pr[h] + q[h];
    }
  }
}
PF_SIMD_CLONES void add_term_rows(float* out, const float* p, int64_t p_stride, const float* term, int64_t r0,
                                  int64_t r1, int64_t positions, int64_t H, bool relu) {
  add_term_rows_impl(out, p, p_stride, term, r0, r1, positions, H, relu);
}
PF_SIMD_CLONES void add_term_rows(double* out, const double* p, int64_t p_stride, const double* term, int64_t r0,
                                  int64_t r1, int64_t positions, int64_t H, bool relu) {
  add_term_rows_impl(out, p, p_stride, term, r0, r1, positions, H, relu);
}

// relu's backward and the sum over positions in one pass, for one batch row of `positions`
// contiguous rows: grad_p = out <= 0 ? 0 : grad (as threshold_backward), sum[h] += grad_p[., h]
// (common.h: accumulate_over_positions).
template <typename T>
PF_ALWAYS_INLINE void relu_grad_sum_impl(T* __restrict__ grad_p, T* __restrict__ sum, const T* __restrict__ grad,
                                         const T* __restrict__ out, int64_t positions, int64_t H) {
  auto add_row = [&](int64_t s, int64_t h0, int64_t hn, T* __restrict__ part) PF_LAMBDA_INLINE {
    const T* __restrict__ o = out + s * H + h0;
    const T* __restrict__ g = grad + s * H + h0;
    T* __restrict__ gp = grad_p + s * H + h0;
    for (int64_t h = 0; h < hn; ++h) {
      const T v = o[h] <= T(0) ? T(0) : g[h];
      gp[h] = v;
      part[h] += v;
    }
  };
  cpu::accumulate_over_positions(sum, positions, H, add_row);
}
PF_SIMD_CLONES void relu_grad_sum(float* grad_p, float* sum, const float* grad, const float* out, int64_t positions,
                                  int64_t H) {
  relu_grad_sum_impl(grad_p, sum, grad, out, positions, H);
}
PF_SIMD_CLONES void relu_grad_sum(double* grad_p, double* sum, const double* grad, const double* out,
                                  int64_t positions, int64_t H) {
  relu_grad_sum_impl(grad_p, sum, grad, out, positions, H);
}

// The term viewed as (B, 1, ..., 1, H): broadcast over t's positions.
at::Tensor over_positions(const at::Tensor& term, const at::Tensor& t) {
  std::vector<int64_t> shape(t.dim(), 1);
  shape.front() = term.size(0);
  shape.back() = term.size(1);
  return term.view(shape);
}

at::Tensor context_linear_cpu(const at::Tensor& p, const at::Tensor& z, const at::Tensor& bp_weight,
                              const c10::optional<at::Tensor>& bp_bias, const at::Tensor& proj_weight,
                              c10::string_view activation_name, c10::string_view out_activation_name) {
  check_context_linear(p, z, bp_weight, bp_bias, proj_weight);
  const Activation act = parse_activation(std::string(activation_name));
  const Activation out_act = parse_activation(std::string(out_activation_name));
  at::Tensor out = at::empty(p.sizes(), p.options());
  if (out.numel() == 0) return out;
  const bool wide = at::toOpMathType(p.scalar_type()) == p.scalar_type();  // fp32 / fp64
  at::Tensor term;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "context_linear_cpu", [&] {
    term = over_positions(context_term<scalar_t, at::opmath_type<scalar_t>>(z, bp_weight, bp_bias, proj_weight, act).first, p);
  });
  const int64_t H = p.size(-1), n_rows = p.numel() / H, positions = n_rows / p.size(0);
  const at::Tensor p_rows = p.reshape({n_rows, H});
  const bool fused = wide && (out_act == Activation::None || out_act == Activation::Relu) &&
                     (H == 1 || p_rows.stride(1) == 1);
  if (fused) {  // one pass: p + term (+ relu) into out
    AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "context_linear_cpu_pass", [&] {
      const scalar_t* p_ptr = p_rows.data_ptr<scalar_t>();
      const scalar_t* t_ptr = term.data_ptr<scalar_t>();
      scalar_t* o_ptr = out.data_ptr<scalar_t>();
      const int64_t p_stride = p_rows.stride(0);
      at::parallel_for(0, n_rows, cpu::grain_for(H), [&](int64_t r0, int64_t r1) {
        add_term_rows(o_ptr, p_ptr, p_stride, t_ptr, r0, r1, positions, H, out_act == Activation::Relu);
      });
    });
    return out;
  }
  // Otherwise ATen's binary kernel (it computes p + term in fp32 and rounds once into out; relu
  // commutes with that rounding), then the activation in place. The smooth ones on 16-bit outputs
  // go through an fp32 y, so that they too are rounded once.
  if (out_act == Activation::None || out_act == Activation::Relu || wide) {
    at::add_out(out, p, term);
    activate_inplace(out, out_act);
  } else {
    at::Tensor y = at::add(p, term);
    activate_inplace(y, out_act);
    out.copy_(y);
  }
  return out;
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads context_linear_backward_cpu(const at::Tensor& grad_out, const c10::optional<at::Tensor>& out,
                                  const c10::optional<at::Tensor>& p, const at::Tensor& z,
                                  const at::Tensor& bp_weight, const c10::optional<at::Tensor>& bp_bias,
                                  const at::Tensor& proj_weight, c10::string_view activation_name,
                                  c10::string_view out_activation_name) {
  const Activation act = parse_activation(std::string(activation_name));
  const Activation out_act = parse_activation(std::string(out_activation_name));
  const at::Tensor saved = check_context_linear_backward(grad_out, out, p, z, bp_weight, bp_bias, proj_weight, out_act);
  const bool from_p = saved.defined() && is_given(p);
  const at::ScalarType dtype = grad_out.scalar_type(), acc = at::toOpMathType(dtype);
  const int64_t B = grad_out.size(0), H = grad_out.size(-1);
  std::vector<int64_t> positions;  // the dims the term was broadcast over
  for (int64_t d = 1; d < grad_out.dim() - 1; ++d) positions.push_back(d);
  Grads grads;
  at::Tensor grad_p = at::empty({0}, grad_out.options());
  at::Tensor grad_term;
  if (out_act == Activation::Relu && !from_p && grad_out.is_contiguous() && saved.is_contiguous()) {
    // fp32 / fp64: relu's backward into grad_p and the sum over positions in one pass
    const int64_t positions_n = grad_out.numel() / std::max<int64_t>(1, B * H);
    grad_p = at::empty(grad_out.sizes(), grad_out.options());
    grad_term = at::zeros({B, H}, grad_out.options());
    AT_DISPATCH_FLOATING_TYPES(dtype, "context_linear_bwd_cpu_relu", [&] {
      const scalar_t* g_ptr = grad_out.data_ptr<scalar_t>();
      const scalar_t* o_ptr = saved.data_ptr<scalar_t>();
      scalar_t* gp_ptr = grad_p.data_ptr<scalar_t>();
      scalar_t* s_ptr = grad_term.data_ptr<scalar_t>();
      at::parallel_for(0, B, cpu::grain_for(positions_n * H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t offset = b * positions_n * H;
          relu_grad_sum(gp_ptr + offset, s_ptr + b * H, g_ptr + offset, o_ptr + offset, positions_n, H);
        }
      });
    });
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "context_linear_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor pre = linear_acc<scalar_t, acc_t>(z, bp_weight, bp_bias);
    at::Tensor c_acc = pre.clone();
    activate_inplace(c_acc, act);
    const at::Tensor c = c_acc.to(dtype);  // the context as the forward rounded it

    // grad_p = grad_out * out_act' (without an output activation, grad_out itself, which the
    // autograd node returns), and the term's gradient: that summed over positions, in fp32.
    // Unless the fused relu pass above did it: ATen's kernels; in fp32 for 16-bit dtypes, whose
    // derivative comes from y = p + term.
    if (out_act == Activation::None) {
      grad_term = positions.empty() ? grad_out.to(acc) : at::sum(grad_out, positions, false, acc);
    } else if (!grad_term.defined()) {
      at::Tensor grad_y;
      if (from_p) {
        const at::Tensor term = linear_acc<scalar_t, acc_t>(c, proj_weight, c10::nullopt);
        grad_y = activation_backward(grad_out.to(acc), at::add(saved, over_positions(term, saved)), out_act, true);
      } else {
        grad_y = activation_backward(grad_out, saved, out_act, false);
      }
      grad_p = grad_y.to(dtype).contiguous();
      grad_term = positions.empty() ? grad_y.to(acc) : at::sum(grad_y, positions, false, acc);
    }
    grad_term = grad_term.reshape({B, H});

    // The small linear maps' backward: term = c @ W_c^T, then c = act(z @ W_bp^T + b_bp).
    auto [grad_c, grad_proj_weight, unused] =
        cpu::linear_backward<scalar_t, acc_t>(grad_term, c, proj_weight, false, acc);
    (void)unused;
    const at::Tensor grad_pre = activation_backward(grad_c, pre, act, /*from_y=*/true).contiguous();
    auto [grad_z, grad_bp_weight, grad_bp_bias] =
        cpu::linear_backward<scalar_t, acc_t>(grad_pre, z, bp_weight, is_given(bp_bias), dtype);
    if (!grad_bp_bias.defined()) grad_bp_bias = at::empty({0}, grad_out.options());
    grads = Grads{grad_p, grad_z, grad_bp_weight, grad_bp_bias, grad_proj_weight.to(dtype)};
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(pf_kernels, CPU, m) {
  m.impl("context_linear", &context_linear_cpu);
  m.impl("context_linear_backward", &context_linear_backward_cpu);
}

}  // namespace pf_kernels
