// fusion_head: schema and autograd. The device kernels live in cpu/ and cuda/.
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

at::Tensor call_forward(at::TensorList hs, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        c10::string_view activation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pf_kernels::fusion_head", "")
                       .typed<at::Tensor(at::TensorList, const at::Tensor&, const c10::optional<at::Tensor>&,
                                         c10::string_view)>();
  return op.call(hs, weight, bias, activation);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_out, at::TensorList hs, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& out, c10::string_view activation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pf_kernels::fusion_head_backward", "")
                       .typed<std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor>(
                           const at::Tensor&, at::TensorList, const at::Tensor&,
                           const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, c10::string_view)>();
  return op.call(grad_out, hs, weight, bias, out, activation);
}

class FusionHeadFunction : public torch::autograd::Function<FusionHeadFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList hs, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, c10::string_view activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = call_forward(hs, weight, bias, activation);
    std::vector<at::Tensor> saved;
    for (const at::Tensor& h : hs) saved.push_back(savable(h));
    saved.push_back(savable(weight));
    saved.push_back(is_given(bias) ? savable(*bias) : at::Tensor());
    // act(y) where the backward reads act' from it; elsewhere writes into the output (z += r) stay
    // legal, as in eager where the activation keeps no result.
    saved.push_back(derivative_from_output(parse_activation(std::string(activation)), out.element_size()) ? out
                                                                                                     : at::Tensor());
    ctx->save_for_backward(saved);
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["k"] = static_cast<int64_t>(hs.size());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const int64_t k = ctx->saved_data["k"].toInt();
    std::vector<at::Tensor> hs(saved.begin(), saved.begin() + k);
    c10::optional<at::Tensor> bias;
    if (saved[k + 1].defined()) bias = saved[k + 1];
    const std::string& activation = ctx->saved_data["activation"].toStringRef();
    if (backward_is_differentiated()) {  // create_graph=True: the gradients from ATen ops
      const WithoutAutocast without_autocast;
      // The gradient of the concat, cut per input: one tensor passed twice in hs gets both parts
      // (a gradient per input slot would give it the whole gradient twice).
      std::vector<at::Tensor> wide;
      for (const at::Tensor& h : hs) wide.push_back(in_opmath(h));
      const at::Tensor joined = at::cat(wide, 1), weight = fresh(saved[k]), bias_ = fresh(saved[k + 1]);
      const at::Tensor recomputed =
          activate(at::linear(joined, in_opmath(weight), in_opmath(bias_)), parse_activation(activation));
      const auto got = differentiable_grads({recomputed}, {in_opmath(grads[0])}, {joined, weight, bias_});
      variable_list result;
      int64_t start = 0;
      for (const at::Tensor& h : hs) {
        result.push_back(got[0].defined() && h.requires_grad() ? got[0].narrow(1, start, h.size(1)).to(h.scalar_type())
                                                               : at::Tensor());
        start += h.size(1);
      }
      result.push_back(got[1]);
      result.push_back(got[2]);
      result.push_back(at::Tensor());  // activation
      return result;
    }
    c10::optional<at::Tensor> out;
    if (saved[k + 2].defined()) out = saved[k + 2];
    auto [grad_hs, grad_weight, grad_bias] = call_backward(grads[0], hs, saved[k], bias, out, activation);
    variable_list result(grad_hs.begin(), grad_hs.end());
    result.push_back(grad_weight);
    result.push_back(is_given(bias) ? grad_bias : at::Tensor());
    result.push_back(at::Tensor());  // activation
    return result;
  }
};

at::Tensor fusion_head_autograd(at::TensorList hs, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                c10::string_view activation) {
  if (!needs_autograd(hs, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_forward(hs, weight, bias, activation);
  }
  return FusionHeadFunction::apply(hs, weight, bias, activation);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pf_kernels, m) {
  m.def("fusion_head(Tensor[] hs, Tensor weight, Tensor? bias, str activation) -> Tensor");
  m.def(
      "fusion_head_backward(Tensor grad_out, Tensor[] hs, Tensor weight, Tensor? bias, Tensor? out, "
      "str activation) -> (Tensor[], Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pf_kernels, Autograd, m) {
  m.impl("fusion_head", &fusion_head_autograd);
  // Not differentiable itself (a backward with create_graph=True does not call it): a call that
  // needs its derivative raises instead of returning zeros.
  m.impl("fusion_head_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace pf_kernels
