// The backward of a linear map y = [h_1..h_K] W^T + b in one launch (csrc/cuda/linear_backward_cuda.cu),
// for the sizes where launches cost more than the arithmetic (plan::linear_backward): fusion_head's
// whole backward. Host side only.
#pragma once

#include <ATen/ATen.h>

#include "activations.h"
#include "cuda/launch_plan.h"

namespace pf_kernels {
namespace cuda {

// grad_y (B, N) = grad_out * act', computed where it is read, from the saved output act(y) or from y
// (without the bias: y_bias is added).
struct GradPreSource {
  at::Tensor grad_out;  // (B, N) contiguous, dtype of h
  at::Tensor out;       // (B, N) contiguous act(y): act' from it when y is undefined
  at::Tensor y;         // (B, N) contiguous pre-activation less the bias, accumulation dtype
  at::Tensor y_bias;    // (N,) contiguous or undefined
  Activation act = Activation::None;
};

// Writes grad_hs[j] (B, D_j), grad_weight (N, D) and grad_bias (N,) where defined: preallocated,
// contiguous, of hs' dtype. weight (N, D) contiguous; hs any strides, at most plan::kMaxInputs.
// Every element is written (zeros where B or N is 0), in one launch.
void linear_backward_fused(const plan::LinearBackward& p, const GradPreSource& src, at::TensorList hs,
                           const at::Tensor& weight, at::TensorList grad_hs, const at::Tensor& grad_weight,
                           const at::Tensor& grad_bias);

}  // namespace cuda
}  // namespace pf_kernels
