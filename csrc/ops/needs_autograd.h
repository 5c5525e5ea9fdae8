// Whether an op's call must go through its autograd Function: grad mode on and an input requiring
// grad, or an input carrying a forward-mode tangent (Function::apply then raises that the op has
// no jvp, where a plain call would drop the tangent silently). Otherwise the Autograd kernel calls
// the op below autograd: no node, no saved tensors.
#pragma once

#include <ATen/core/Variadic.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/Tensor.h>

#include <optional>

namespace pf_kernels {

struct NeedsAutograd : at::IterArgs<NeedsAutograd> {
  const bool grad_mode = at::GradMode::is_enabled();
  bool out = false;
  using at::IterArgs<NeedsAutograd>::operator();
  void operator()(const at::Tensor& t) {
    if (t.defined() && ((grad_mode && t.requires_grad()) || t._fw_grad(/*level=*/0).defined())) out = true;
  }
  void operator()(const std::optional<at::Tensor>& t) {
    if (t.has_value()) (*this)(*t);
  }
  bool short_circuit() const { return out; }
};

template <typename... Args>
bool needs_autograd(const Args&... args) {
  return NeedsAutograd().apply(args...).out;
}

// What an autograd Function saves of an input: the input, or a copy of one made under
// torch.inference_mode, which autograd refuses to save (eager saves its own intermediates there:
// cat's output, p + term, so inputs made that way train; they must here too).
inline at::Tensor savable(const at::Tensor& t) { return t.defined() && t.is_inference() ? t.clone() : t; }

}  // namespace pf_kernels
