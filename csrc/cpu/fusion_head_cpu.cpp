// fusion_head on CPU: z = act([h_1..h_K] @ W^T + b).
// On a CPU one large GEMM beats K thin ones, so the K inputs are gathered (in the accumulation
// dtype) into one (B, sum D_j) operand inside the op: no autograd node for the concat, the bias in
// the GEMM and the activation in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "activations.h"
#include "cpu/activation_ops.h"
#include "checks.h"

namespace pf_kernels {
namespace {

// [h_1..h_K] as one contiguous (B, in_features) tensor of the accumulation dtype; h itself when
// K == 1 and it is already such a tensor.
at::Tensor gather_inputs(at::TensorList hs, int64_t in_features, at::ScalarType acc) {
  if (hs[0].scalar_type() == acc) return hs.size() == 1 ? hs[0] : at::cat(hs, 1);
  // 16-bit inputs: gathered and widened in one pass per input.
  at::Tensor gathered = at::empty({hs[0].size(0), in_features}, hs[0].options().dtype(acc));
  int64_t offset = 0;
  for (const at::Tensor& h : hs) {
    gathered.narrow(1, offset, h.size(1)).copy_(h);
    offset += h.size(1);
  }
  return gathered;
}

// t in dtype: t itself where it already is (a no-op .to is still a dispatcher call, which counts
// at the launch-bound sizes this op is for).
at::Tensor as_type(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

at::Tensor pre_activation(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                          at::ScalarType acc) {
  return is_given(bias) ? at::addmm(as_type(*bias, acc), h, w.t()) : at::mm(h, w.t());
}

at::Tensor fusion_head_cpu(at::TensorList hs, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           c10::string_view activation_name) {
  const int64_t in_features = check_fusion_head(hs, weight, bias);
  const Activation act = parse_activation(std::string(activation_name));
  const at::ScalarType dtype = hs[0].scalar_type(), acc = at::toOpMathType(dtype);
  // One GEMM over the gathered inputs (beats K thin ones on a CPU), bias in the GEMM, then the
  // activation in place: no intermediate beyond the gathered input.
  at::Tensor y = pre_activation(gather_inputs(hs, in_features, acc), as_type(weight, acc), bias, acc);
  activate_inplace(y, act);
  return as_type(y, dtype);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> fusion_head_backward_cpu(
    const at::Tensor& grad_out, at::TensorList hs, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& out, c10::string_view activation_name) {
  const int64_t in_features = check_fusion_head_backward(grad_out, hs, weight, bias, out);
  const Activation act = parse_activation(std::string(activation_name));
  const at::ScalarType dtype = hs[0].scalar_type(), acc = at::toOpMathType(dtype);
  const at::Tensor h = gather_inputs(hs, in_features, acc), w = as_type(weight, acc);

  // act' from the saved output where it holds act(y) exactly (fp32/fp64), as eager PyTorch does;
  // from y (one small GEMM) for gelu, for 16-bit outputs, whose rounding loses 1 - a^2 near
  // saturation, and where no output is given.
  const bool from_y = act == Activation::Gelu || dtype != acc || !is_given(out);
  at::Tensor grad_y = as_type(grad_out, acc);
  if (act != Activation::None) {
    grad_y = activation_backward(grad_y, from_y ? pre_activation(h, w, bias, acc) : *out, act, from_y);
  }
  // Each h_j's gradient is its own tensor (outputs must not alias each other), computed from its
  // own block of the weight.
  std::vector<at::Tensor> grad_hs;
  grad_hs.reserve(hs.size());
  int64_t offset = 0;
  for (const at::Tensor& hj : hs) {
    grad_hs.push_back(as_type(at::mm(grad_y, w.narrow(1, offset, hj.size(1))), dtype));
    offset += hj.size(1);
  }
  at::Tensor grad_weight = as_type(at::mm(grad_y.t(), h), dtype);
  at::Tensor grad_bias = is_given(bias) ? as_type(grad_y.sum(0), dtype) : at::empty({0}, grad_out.options());
  return {grad_hs, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pf_kernels, CPU, m) {
  m.impl("fusion_head", &fusion_head_cpu);
  m.impl("fusion_head_backward", &fusion_head_backward_cpu);
}

}  // namespace pf_kernels
