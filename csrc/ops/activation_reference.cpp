// pf_kernels::_activation_reference: activations.h's per-element activation and the gradient through
// it (act' from y and from act(y), applied to grad, ones where None), run on the CPU over a tensor, so
// that the tests check the exact code the CUDA kernels inline.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "activations.h"

namespace pf_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> activation_reference_cpu(const at::Tensor& y,
                                                                         c10::string_view activation_name,
                                                                         const c10::optional<at::Tensor>& grad_output) {
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble,
              "pf_kernels::_activation_reference: y must be float32 or float64, got ", y.scalar_type());
  const Activation act = parse_activation(std::string(activation_name));
  const at::Tensor yc = y.contiguous();
  const at::Tensor gc = grad_output.has_value() ? grad_output->to(yc.scalar_type()).contiguous() : at::ones_like(yc);
  TORCH_CHECK(gc.sizes() == yc.sizes(), "pf_kernels::_activation_reference: grad must have y's shape ", yc.sizes(),
              ", got ", gc.sizes());
  at::Tensor value = at::empty_like(yc), grad = at::empty_like(yc), grad_from_value = at::empty_like(yc);
  AT_DISPATCH_FLOATING_TYPES(yc.scalar_type(), "activation_reference_cpu", [&] {
    const scalar_t* in = yc.data_ptr<scalar_t>();
    const scalar_t* go = gc.data_ptr<scalar_t>();
    scalar_t* v = value.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* gv = grad_from_value.data_ptr<scalar_t>();
    for (int64_t i = 0; i < yc.numel(); ++i) {
      v[i] = activate<scalar_t>(in[i], act);
      g[i] = apply_act_grad(go[i], activation_grad<scalar_t>(in[i], act), act);
      gv[i] = apply_act_grad(go[i], grad_from_activated<scalar_t>(v[i], act), act);
    }
  });
  return {value, grad, grad_from_value};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pf_kernels, m) {
  m.def("_activation_reference(Tensor y, str activation, Tensor? grad=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pf_kernels, CPU, m) { m.impl("_activation_reference", &activation_reference_cpu); }

}  // namespace pf_kernels
