// context_linear: schema and autograd. The device kernels live in cpu/ and cuda/.
// out = out_act(p + act(z @ bp_weight^T + bp_bias) @ proj_weight^T), the (B, H) term broadcast over
// p's positions: a hoisted encoder's first Linear applied to backproj_concat's output.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "context_linear.h"
#include "ops/differentiable_backward.h"
#include "ops/needs_autograd.h"

namespace pf_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::Tensor call_forward(const at::Tensor& p, const at::Tensor& z, const at::Tensor& bp_weight,
                        const c10::optional<at::Tensor>& bp_bias, const at::Tensor& proj_weight,
                        c10::string_view activation, c10::string_view out_activation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pf_kernels::context_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, const at::Tensor&, c10::string_view,
                                         c10::string_view)>();
  return op.call(p, z, bp_weight, bp_bias, proj_weight, activation, out_activation);
}

Grads call_backward(const at::Tensor& grad_out, const c10::optional<at::Tensor>& out,
                    const c10::optional<at::Tensor>& p, const at::Tensor& z, const at::Tensor& bp_weight,
                    const c10::optional<at::Tensor>& bp_bias, const at::Tensor& proj_weight,
                    c10::string_view activation, c10::string_view out_activation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pf_kernels::context_linear_backward", "")
                       .typed<Grads(const at::Tensor&, const c10::optional<at::Tensor>&,
                                    const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                    const c10::optional<at::Tensor>&, const at::Tensor&, c10::string_view,
                                    c10::string_view)>();
  return op.call(grad_out, out, p, z, bp_weight, bp_bias, proj_weight, activation, out_activation);
}

c10::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// One node per call, no Python on the hot path; the backward is its own op.
class ContextLinearFunction : public torch::autograd::Function<ContextLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& p, const at::Tensor& z,
                            const at::Tensor& bp_weight, const c10::optional<at::Tensor>& bp_bias,
                            const at::Tensor& proj_weight, c10::string_view activation,
                            c10::string_view out_activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Activation out_act = parse_activation(std::string(out_activation));
    const bool needs_context_grad = z.requires_grad() || bp_weight.requires_grad() ||
                                    (is_given(bp_bias) && bp_bias->requires_grad()) || proj_weight.requires_grad();
    const bool epilogue = out_act != Activation::None;
    at::Tensor out = call_forward(p, z, bp_weight, bp_bias, proj_weight, activation, out_activation);
    // Without an output activation, grad_p is grad_out itself and only the small context needs
    // saving; with one, also the output (or p, to recompute the pre-activation) for its derivative.
    if (needs_context_grad || epilogue) {
      const bool from_p = out_grad_needs_p(out_act, p.scalar_type());
      ctx->save_for_backward({epilogue && !from_p ? out : at::Tensor(), epilogue && from_p ? savable(p) : at::Tensor(),
                              savable(z), savable(bp_weight), is_given(bp_bias) ? savable(*bp_bias) : at::Tensor(),
                              savable(proj_weight)});
    }
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["out_activation"] = std::string(out_activation);
    ctx->saved_data["needs_context_grad"] = needs_context_grad;
    ctx->saved_data["epilogue"] = epilogue;
    return out;
  }

  static variable_list differentiated_backward(AutogradContext* ctx, const at::Tensor& grad_out,
                                               const variable_list& saved);

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_out = grads[0];
    const bool epilogue = ctx->saved_data["epilogue"].toBool();
    if (!epilogue && !ctx->saved_data["needs_context_grad"].toBool()) {
      return {grad_out, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    auto saved = ctx->get_saved_variables();
    const c10::optional<at::Tensor> bp_bias = optional_of(saved[4]);
    if (backward_is_differentiated()) return differentiated_backward(ctx, grad_out, saved);
    auto [grad_p, grad_z, grad_bp_weight, grad_bp_bias, grad_proj_weight] =
        call_backward(grad_out, optional_of(saved[0]), optional_of(saved[1]), saved[2], saved[3], bp_bias, saved[5],
                      ctx->saved_data["activation"].toStringRef(), ctx->saved_data["out_activation"].toStringRef());
    return {epilogue ? grad_p : grad_out,  // no output activation: a view of grad_out, no copy
            grad_z,
            grad_bp_weight,
            is_given(bp_bias) ? grad_bp_bias : at::Tensor(),
            grad_proj_weight,
            at::Tensor(),
            at::Tensor()};
  }
};

// create_graph=True: the gradients from ATen ops, recomputing the (B, H) term (and the output's
// pre-activation where p was saved for it).
variable_list ContextLinearFunction::differentiated_backward(AutogradContext* ctx, const at::Tensor& grad_out,
                                                             const variable_list& saved) {
  const WithoutAutocast without_autocast;
  const at::Tensor &out = saved[0];
  const at::Tensor p = fresh(saved[1]), z = fresh(saved[2]), bp_weight = fresh(saved[3]), bp_bias = fresh(saved[4]),
                   proj_weight = fresh(saved[5]);
  const Activation out_act = parse_activation(ctx->saved_data["out_activation"].toStringRef());
  const at::Tensor context = activate(at::linear(in_opmath(z), in_opmath(bp_weight), in_opmath(bp_bias)),
                                      parse_activation(ctx->saved_data["activation"].toStringRef()));
  const at::Tensor term = at::linear(context, in_opmath(proj_weight));  // (B, H), in the accumulation type
  std::vector<at::Tensor> got;
  at::Tensor grad_p;
  if (p.defined()) {  // out_act' from the pre-activation: differentiate out_act(p + term) whole
    got = differentiable_grads({activate(in_opmath(p) + over_positions(term, p), out_act)}, {in_opmath(grad_out)},
                               {p, z, bp_weight, bp_bias, proj_weight});
    grad_p = got[0];
    got.erase(got.begin());
  } else {  // out = p + term, or out_act' read from the saved output
    // (the output is saved for relu, tanh and sigmoid only: gelu's derivative needs p)
    TORCH_INTERNAL_ASSERT(!out.defined() || out_act != Activation::Gelu);
    grad_p = out.defined() ? activation_backward(grad_out, out, out_act, /*from_y=*/false) : grad_out;
    got = differentiable_grads({term}, {sum_over_positions(in_opmath(grad_p))}, {z, bp_weight, bp_bias, proj_weight});
  }
  return {grad_p, got[0], got[1], got[2], got[3], at::Tensor(), at::Tensor()};
}

at::Tensor context_linear_autograd(const at::Tensor& p, const at::Tensor& z, const at::Tensor& bp_weight,
                                   const c10::optional<at::Tensor>& bp_bias, const at::Tensor& proj_weight,
                                   c10::string_view activation, c10::string_view out_activation) {
  if (!needs_autograd(p, z, bp_weight, bp_bias, proj_weight)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_forward(p, z, bp_weight, bp_bias, proj_weight, activation, out_activation);
  }
  return ContextLinearFunction::apply(p, z, bp_weight, bp_bias, proj_weight, activation, out_activation);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pf_kernels, m) {
  m.def(
      "context_linear(Tensor p, Tensor z, Tensor bp_weight, Tensor? bp_bias, Tensor proj_weight, str activation, "
      "str out_activation) -> Tensor");
  // Returns (grad_p, grad_z, grad_bp_weight, grad_bp_bias, grad_proj_weight); grad_p is empty (0,)
  // when out_activation is "none" (p's gradient is grad_out itself), grad_bp_bias without a bias.
  // out (the forward's output) or p is given when out_activation is not "none": p for gelu and for
  // 16-bit dtypes, whose derivative is taken from the recomputed pre-activation.
  m.def(
      "context_linear_backward(Tensor grad_out, Tensor? out, Tensor? p, Tensor z, Tensor bp_weight, "
      "Tensor? bp_bias, Tensor proj_weight, str activation, str out_activation) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pf_kernels, Autograd, m) {
  m.impl("context_linear", &context_linear_autograd);
  // Not differentiable itself (a backward with create_graph=True does not call it): a call that
  // needs its derivative raises instead of returning zeros.
  m.impl("context_linear_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace pf_kernels
