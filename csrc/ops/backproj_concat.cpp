// backproj_concat: schema and autograd. The device kernels live in cpu/ and cuda/.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "activations.h"
#include "checks.h"
#include "ops/differentiable_backward.h"
#include "ops/needs_autograd.h"

namespace pf_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pf_kernels::backproj_concat", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, c10::string_view)>();
  return op.call(x, z, weight, bias, activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& context, const at::Tensor& z,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, c10::string_view activation,
    const c10::SymInt& x_features) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pf_kernels::backproj_concat_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
                           const at::Tensor&, const c10::optional<at::Tensor>&, c10::string_view, c10::SymInt)>();
  return op.call(grad_out, context, z, weight, bias, activation, x_features);
}

// act(y) as the backward reads it (derivative_from_output): the context columns of out's first
// position, copied (B, Dc). Not out itself: saving out would fail the backward after any write into
// it (a mask, a normalisation in place), which eager's torch.cat allows. Undefined where there is
// no position (the backward reads nothing) or where the backward recomputes y.
at::Tensor saved_context(const at::Tensor& out, const c10::SymInt& x_features, c10::string_view activation) {
  if (!derivative_from_output(parse_activation(std::string(activation)), out.element_size())) return {};
  at::Tensor first = out;
  while (first.dim() > 2) {
    if (first.sym_size(1) == 0) return {};
    first = first.select(1, 0);
  }
  return first.narrow_symint(-1, x_features, first.sym_size(-1) - x_features).clone();
}

// Autograd in C++: one node per call, no Python on the hot path. Backward is its own op, so
// torch.compile traces it and each device supplies its kernel.
class BackprojConcatFunction : public torch::autograd::Function<BackprojConcatFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& z,
                            const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            c10::string_view activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // (ctx->needs_input_grad is unusable here: without any input requiring grad there are no edges.)
    const bool needs_context_grad =
        z.requires_grad() || weight.requires_grad() || (is_given(bias) && bias->requires_grad());
    at::Tensor out = call_forward(x, z, weight, bias, activation);
    if (needs_context_grad) {  // grad_x alone needs nothing saved
      ctx->save_for_backward({saved_context(out, x.sym_size(-1), activation), savable(z), savable(weight),
                              is_given(bias) ? savable(*bias) : at::Tensor()});
    }
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["x_features"] = x.sym_size(-1);  // sym_: under torch.compile sizes stay symbolic
    ctx->saved_data["needs_context_grad"] = needs_context_grad;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_out = grads[0];
    const c10::SymInt x_features = ctx->saved_data["x_features"].toSymInt();
    at::Tensor grad_x = grad_out.narrow_symint(-1, 0, x_features);  // a view: no copy
    at::Tensor grad_z, grad_weight, grad_bias;
    if (ctx->saved_data["needs_context_grad"].toBool()) {
      auto saved = ctx->get_saved_variables();
      c10::optional<at::Tensor> context, bias;
      if (saved[0].defined()) context = saved[0];
      if (saved[3].defined()) bias = saved[3];
      if (backward_is_differentiated()) {  // create_graph=True: the context's gradients from ATen ops
        const WithoutAutocast without_autocast;
        const at::Tensor z = fresh(saved[1]), weight = fresh(saved[2]), bias_ = fresh(saved[3]);
        const at::Tensor recomputed = activate(at::linear(in_opmath(z), in_opmath(weight), in_opmath(bias_)),
                                               parse_activation(ctx->saved_data["activation"].toStringRef()));
        const at::Tensor grad_context =
            sum_over_positions(in_opmath(grad_out.narrow_symint(-1, x_features, grad_out.sym_size(-1) - x_features)));
        const auto got = differentiable_grads({recomputed}, {grad_context}, {z, weight, bias_});
        grad_z = got[0], grad_weight = got[1], grad_bias = got[2];
      } else {
        std::tie(grad_z, grad_weight, grad_bias) = call_backward(
            grad_out, context, saved[1], saved[2], bias, ctx->saved_data["activation"].toStringRef(), x_features);
      }
      if (!is_given(bias)) grad_bias = at::Tensor();
    }
    return {grad_x, grad_z, grad_weight, grad_bias, at::Tensor()};
  }
};

at::Tensor backproj_concat_autograd(const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  if (!needs_autograd(x, z, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_forward(x, z, weight, bias, activation);
  }
  return BackprojConcatFunction::apply(x, z, weight, bias, activation);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pf_kernels, m) {
  m.def("backproj_concat(Tensor x, Tensor z, Tensor weight, Tensor? bias, str activation) -> Tensor");
  m.def(
      "backproj_concat_backward(Tensor grad_out, Tensor? context, Tensor z, Tensor weight, Tensor? bias, "
      "str activation, SymInt x_features) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pf_kernels, Autograd, m) {
  m.impl("backproj_concat", &backproj_concat_autograd);
  // Not differentiable itself (a backward with create_graph=True does not call it): a call that
  // needs its derivative raises instead of returning zeros.
  m.impl("backproj_concat_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace pf_kernels
