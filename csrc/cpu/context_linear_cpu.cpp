// context_linear on CPU. Forward: the (B, H) context term once per batch row (two small linear
// maps: the back-projection, rounded to the dtype as backproj_concat returns it, then W_c), then
// the pass over p adding it and the output activation. Backward: the term's gradient is grad_out
// (times the output activation's derivative) summed over positions, then the small linear maps'
// backward. The passes over p-sized tensors are ATen's own kernels: they are dispatched to the
// machine's widest SIMD (AVX2 / AVX-512), which this extension, built for the baseline ISA, cannot
// match with loops of its own (measured: a hand-written add + relu loop ran at 0.4-0.5x of them).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

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
  // The pass over p: ATen's vectorised binary kernel (it computes p + term in fp32 and rounds once
  // into out; relu commutes with that rounding), then the activation in place. The smooth ones on
  // 16-bit outputs go through an fp32 y, so that they too are rounded once.
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
  const bool from_p = saved.defined() && p.has_value() && p->defined();
  const at::ScalarType dtype = grad_out.scalar_type(), acc = at::toOpMathType(dtype);
  const int64_t B = grad_out.size(0), H = grad_out.size(-1);
  std::vector<int64_t> positions;  // the dims the term was broadcast over
  for (int64_t d = 1; d < grad_out.dim() - 1; ++d) positions.push_back(d);
  Grads grads;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "context_linear_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor pre = linear_acc<scalar_t, acc_t>(z, bp_weight, bp_bias);
    at::Tensor c_acc = pre.clone();
    activate_inplace(c_acc, act);
    const at::Tensor c = c_acc.to(dtype);  // the context as the forward rounded it

    // grad_p = grad_out * out_act' (grad_out itself without an output activation, returned by the
    // autograd node), and the term's gradient: that summed over positions, in fp32. ATen's
    // vectorised kernels for both passes.
    at::Tensor grad_p = at::empty({0}, grad_out.options());
    at::Tensor grad_term;
    if (out_act == Activation::None) {
      grad_term = positions.empty() ? grad_out.to(acc) : at::sum(grad_out, positions, false, acc);
    } else {
      at::Tensor grad_y;  // in fp32 for 16-bit dtypes, whose derivative comes from y = p + term
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
        cpu::linear_backward<scalar_t, acc_t>(grad_pre, z, bp_weight, has_bias(bp_bias), dtype);
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
