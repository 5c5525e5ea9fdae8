// pf_kernels::_activation_reference: activations.h's per-element activation and derivatives (from y
// and from act(y)), run on the CPU over a tensor, so that the tests check the exact code the CUDA
// kernels inline.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "activations.h"

namespace pf_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> activation_reference_cpu(const at::Tensor& y, c10::string_view activation_name) {
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble,
              "pf_kernels::_activation_reference: y must be float32 or float64, got ", y.scalar_type());
  const Activation act = parse_activation(std::string(activation_name));
  const at::Tensor yc = y.contiguous();
  at::Tensor value = at::empty_like(yc), grad = at::empty_like(yc), grad_from_value = at::empty_like(yc);
  AT_DISPATCH_FLOATING_TYPES(yc.scalar_type(), "activation_reference_cpu", [&] {
    const scalar_t* in = yc.data_ptr<scalar_t>();
    scalar_t* v = value.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* gv = grad_from_value.data_ptr<scalar_t>();
    for (int64_t i = 0; i < yc.numel(); ++i) {
      v[i] = activate<scalar_t>(in[i], act);
      g[i] = activation_grad<scalar_t>(in[i], act);
      gv[i] = grad_from_activated<scalar_t>(v[i], act);
    }
  });
  return {value, grad, grad_from_value};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pf_kernels, m) {
  m.def("_activation_reference(Tensor y, str activation) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pf_kernels, CPU, m) { m.impl("_activation_reference", &activation_reference_cpu); }

}  // namespace pf_kernels
