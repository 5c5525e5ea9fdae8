// Activations over whole tensors on the CPU, with ATen's SIMD kernels (the same ones eager PyTorch
// runs). The per-element definitions in activations.h serve the CUDA kernels; the CPU tests check
// them directly through pf_kernels::_activation_reference.
#pragma once

#include <ATen/ATen.h>

#include "activations.h"

namespace pf_kernels {

// act(y), a new tensor (autograd records it as eager's op).
inline at::Tensor activate(const at::Tensor& y, Activation act) {
  switch (act) {
    case Activation::Relu: return at::relu(y);
    case Activation::Gelu: return at::gelu(y);
    case Activation::Tanh: return at::tanh(y);
    case Activation::Sigmoid: return at::sigmoid(y);
    default: return y;
  }
}

// act(y), in place.
inline void activate_inplace(at::Tensor& y, Activation act) {
  switch (act) {
    case Activation::Relu: y.relu_(); break;
    case Activation::Gelu: at::gelu_(y); break;
    case Activation::Tanh: y.tanh_(); break;
    case Activation::Sigmoid: y.sigmoid_(); break;
    default: break;
  }
}

// grad * act'(y). `source` is y itself when from_y, else the activation's output act(y) (enough
// for relu, tanh and sigmoid, as eager autograd does; gelu always needs y).
inline at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& source, Activation act,
                                      bool from_y) {
  switch (act) {
    case Activation::Relu: return at::threshold_backward(grad, source, 0);
    case Activation::Gelu: return at::gelu_backward(grad, source);
    case Activation::Tanh: return at::tanh_backward(grad, from_y ? source.tanh() : source);
    case Activation::Sigmoid: return at::sigmoid_backward(grad, from_y ? source.sigmoid() : source);
    default: return grad;
  }
}

}  // namespace pf_kernels
