// context_linear: what its schema file (ops/) and its CPU and CUDA kernels share: the argument
// checks (a direct call of torch.ops.pf_kernels.context_linear* with bad input fails naming the
// argument) and the rule for what the backward reads to differentiate the output activation.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "activations.h"
#include "checks.h"

namespace pf_kernels {

// p (B, *positions, H), z (B, Dz), bp_weight (Dc, Dz), bp_bias (Dc,), proj_weight (H, Dc).
inline void check_context_linear(const at::Tensor& p, const at::Tensor& z, const at::Tensor& bp_weight,
                                 const c10::optional<at::Tensor>& bp_bias, const at::Tensor& proj_weight) {
  check_floating(p, "p");
  check_like(z, p, "z", "p");
  check_like(bp_weight, p, "bp_weight", "p");
  check_like(proj_weight, p, "proj_weight", "p");
  TORCH_CHECK(p.dim() >= 2, "pf_kernels: p must be (B, *positions, H), got ", p.sizes());
  TORCH_CHECK(z.dim() == 2 && z.size(0) == p.size(0), "pf_kernels: z must be (B, Dz) with B = ", p.size(0),
              ", got ", z.sizes());
  TORCH_CHECK(bp_weight.dim() == 2 && bp_weight.size(1) == z.size(1), "pf_kernels: bp_weight must be (Dc, ",
              z.size(1), "), got ", bp_weight.sizes());
  if (is_given(bp_bias)) {
    check_like(*bp_bias, p, "bp_bias", "p");
    TORCH_CHECK(bp_bias->dim() == 1 && bp_bias->size(0) == bp_weight.size(0), "pf_kernels: bp_bias must be (",
                bp_weight.size(0), ",), got ", bp_bias->sizes());
  }
  TORCH_CHECK(proj_weight.dim() == 2 && proj_weight.size(0) == p.size(-1) && proj_weight.size(1) == bp_weight.size(0),
              "pf_kernels: proj_weight must be (H, Dc) = (", p.size(-1), ", ", bp_weight.size(0), "), got ",
              proj_weight.sizes());
}

// The backward differentiates the output activation from its pre-activation y = p + term
// (recomputed from the saved p) for gelu, which its output cannot give, and for 16-bit outputs,
// whose rounding loses 1 - a^2 near saturation; from the saved output otherwise, as eager does.
inline bool out_grad_needs_p(Activation out_act, at::ScalarType dtype) {
  return out_act == Activation::Gelu || (out_act != Activation::None && at::toOpMathType(dtype) != dtype);
}

// The backward's arguments: grad_out like p; `out` or `p` saved when out_act is not none (p when
// out_grad_needs_p), neither otherwise. Returns the tensor to differentiate out_act from.
inline at::Tensor check_context_linear_backward(const at::Tensor& grad_out, const c10::optional<at::Tensor>& out,
                                                const c10::optional<at::Tensor>& p, const at::Tensor& z,
                                                const at::Tensor& bp_weight, const c10::optional<at::Tensor>& bp_bias,
                                                const at::Tensor& proj_weight, Activation out_act) {
  check_context_linear(grad_out, z, bp_weight, bp_bias, proj_weight);
  if (out_act == Activation::None) return at::Tensor();
  const bool has_p = is_given(p), has_out = is_given(out);
  TORCH_CHECK(has_p || (has_out && !out_grad_needs_p(out_act, grad_out.scalar_type())),
              "pf_kernels: context_linear_backward with this out_activation and dtype (", grad_out.scalar_type(),
              ") needs p");
  const at::Tensor& saved = has_p ? *p : *out;
  check_like(saved, grad_out, has_p ? "p" : "out", "grad_out");
  TORCH_CHECK(saved.sizes() == grad_out.sizes(), "pf_kernels: ", has_p ? "p" : "out", " must have grad_out's shape ",
              grad_out.sizes(), ", got ", saved.sizes());
  return saved;
}

}  // namespace pf_kernels
