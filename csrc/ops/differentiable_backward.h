// The backward of a backward (a gradient penalty, a Hessian-vector product, MAML): a backward run
// with create_graph=True recomputes its op's small parts from the saved inputs with ATen ops and
// takes their gradients with autograd, so that autograd can differentiate them again. The fused
// backward kernels are differentiable once. Only that run is in grad mode (the autograd engine turns
// it on for create_graph alone; torch.compile's traced backward has it off): every other backward
// takes the fused kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>

#include <vector>

#include "cpu/activation_ops.h"  // activate, activation_backward: ATen ops, which autograd differentiates

namespace pf_kernels {

inline bool backward_is_differentiated() { return at::GradMode::is_enabled(); }

// Held while recomputing: the ATen calls compute in the accumulation type also where the backward
// runs inside an autocast region, as the ops themselves do (ops/autocast.cpp).
struct WithoutAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// A new alias of a saved input, for the recomputation to read and the gradients to be taken for.
// Not the input itself: its own history may hold another input (a weight an earlier step used to
// make z), and autograd::grad would add that path to the input's gradient, which the engine
// already follows.
inline at::Tensor fresh(const at::Tensor& t) { return t.defined() && t.requires_grad() ? t.view_as(t) : t; }

// t in its accumulation type (fp32 for 16-bit), as the fused kernels compute; autograd casts its
// gradient back. Undefined stays undefined.
inline at::Tensor in_opmath(const at::Tensor& t) {
  return t.defined() ? t.to(at::toOpMathType(t.scalar_type())) : t;
}

// (B, *S, D) -> (B, D): the gradient of a (B, D) tensor broadcast over the positions S.
inline at::Tensor sum_over_positions(const at::Tensor& grad) {
  std::vector<int64_t> dims;
  for (int64_t d = 1; d + 1 < grad.dim(); ++d) dims.push_back(d);
  return dims.empty() ? grad : grad.sum(dims);
}

// (B, H) -> (B, 1, ..., 1, H), broadcastable against `like` (B, *S, H).
inline at::Tensor over_positions(const at::Tensor& t, const at::Tensor& like) {
  std::vector<int64_t> shape(like.dim(), 1);
  shape.front() = t.size(0);
  shape.back() = t.size(1);
  return t.reshape(shape);
}

// The gradients of `outputs` (weighted by `grads`) for each of `inputs`, themselves differentiable;
// undefined for an input that is undefined or does not require grad.
inline std::vector<at::Tensor> differentiable_grads(const std::vector<at::Tensor>& outputs,
                                                    const std::vector<at::Tensor>& grads,
                                                    const std::vector<at::Tensor>& inputs) {
  std::vector<at::Tensor> wanted, result(inputs.size());
  std::vector<size_t> where;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].defined() && inputs[i].requires_grad()) {
      wanted.push_back(inputs[i]);
      where.push_back(i);
    }
  }
  if (wanted.empty()) return result;
  auto got = torch::autograd::grad(outputs, wanted, grads, /*retain_graph=*/true, /*create_graph=*/true,
                                   /*allow_unused=*/true);
  for (size_t j = 0; j < where.size(); ++j) result[where[j]] = got[j];
  return result;
}

}  // namespace pf_kernels
