// fusion_head on CPU: z = act(sum_j h_j @ W_j^T + b), W_j the column block of weight that meets h_j.
// Each h_j is read in place (no concat); the GEMMs are ATen's BLAS on views.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "activations.h"
#include "checks.h"

namespace pf_kernels {
namespace {

// y = sum_j h_j @ W_j^T + bias, accumulated in `acc` (fp32, or fp64 for fp64 inputs).
at::Tensor fused_pre_activation(at::TensorList hs, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                at::ScalarType acc) {
  const at::Tensor w_acc = weight.to(acc);
  const int64_t B = hs[0].size(0), Dz = weight.size(0);
  // A fresh buffer: never an alias of bias (expand(...).contiguous() can be one when B == 1).
  at::Tensor y = at::empty({B, Dz}, weight.options().dtype(acc));
  if (has_bias(bias)) {
    y.copy_(bias->expand({B, Dz}));
  } else {
    y.zero_();
  }
  int64_t offset = 0;
  for (const at::Tensor& h : hs) {
    const int64_t d = h.size(1);
    if (d > 0) y.addmm_(h.to(acc), w_acc.narrow(1, offset, d).t());
    offset += d;
  }
  return y;
}

at::Tensor fusion_head_cpu(at::TensorList hs, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           c10::string_view activation_name) {
  check_fusion_head(hs, weight, bias);
  const Activation act = parse_activation(std::string(activation_name));
  const at::ScalarType dtype = hs[0].scalar_type(), acc = at::toOpMathType(dtype);
  at::Tensor y = fused_pre_activation(hs, weight, bias, acc);
  if (act == Activation::None) return y.to(dtype);
  at::Tensor out = dtype == acc ? y : at::empty_like(y, y.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusion_head_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* y_ptr = y.data_ptr<acc_t>();
    scalar_t* o_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, y.numel(), 16384, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o_ptr[i] = static_cast<scalar_t>(activate<acc_t>(y_ptr[i], act));
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> fusion_head_backward_cpu(
    const at::Tensor& grad_out, at::TensorList hs, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& out, c10::string_view activation_name) {
  const int64_t in_features = check_fusion_head(hs, weight, bias);
  const int64_t B = hs[0].size(0), Dz = weight.size(0);
  check_like(grad_out, hs[0], "grad_out", "hs[0]");
  check_like(out, hs[0], "out", "hs[0]");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == B && grad_out.size(1) == Dz &&
                  out.sizes() == grad_out.sizes(),
              "pf_kernels: grad_out and out must be (", B, ", ", Dz, "), got ", grad_out.sizes(), " and ",
              out.sizes());
  const Activation act = parse_activation(std::string(activation_name));
  const at::ScalarType dtype = hs[0].scalar_type(), acc = at::toOpMathType(dtype);

  // grad_y = grad_out * act'(y); act' from the output as eager PyTorch does, from y for gelu.
  at::Tensor grad_y = grad_out.to(acc).contiguous();
  if (act != Activation::None && grad_y.numel() > 0) {
    const at::Tensor source = act == Activation::Gelu ? fused_pre_activation(hs, weight, bias, acc)
                                                      : out.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusion_head_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      acc_t* g = grad_y.data_ptr<acc_t>();
      at::parallel_for(0, grad_y.numel(), 16384, [&](int64_t begin, int64_t end) {
        if (act == Activation::Gelu) {
          const acc_t* y = source.data_ptr<acc_t>();
          for (int64_t i = begin; i < end; ++i) g[i] *= activation_grad<acc_t>(y[i], act);
          return;
        }
        const scalar_t* o = source.data_ptr<scalar_t>();
        for (int64_t i = begin; i < end; ++i) {
          const acc_t v = static_cast<acc_t>(o[i]);
          const acc_t d = act == Activation::Relu ? acc_t(v > 0) : act == Activation::Tanh ? 1 - v * v : v * (1 - v);
          g[i] *= d;
        }
      });
    });
  }
  const at::Tensor w_acc = weight.to(acc);
  std::vector<at::Tensor> grad_hs;
  grad_hs.reserve(hs.size());
  at::Tensor grad_weight = at::empty({Dz, in_features}, weight.options().dtype(acc));
  int64_t offset = 0;
  for (const at::Tensor& h : hs) {
    const int64_t d = h.size(1);
    grad_hs.push_back(at::mm(grad_y, w_acc.narrow(1, offset, d)).to(dtype));
    at::Tensor block = grad_weight.narrow(1, offset, d);
    at::mm_out(block, grad_y.t(), h.to(acc));
    offset += d;
  }
  at::Tensor grad_bias = has_bias(bias) ? grad_y.sum(0).to(dtype) : at::empty({0}, grad_out.options());
  return {grad_hs, grad_weight.to(dtype), grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pf_kernels, CPU, m) {
  m.impl("fusion_head", &fusion_head_cpu);
  m.impl("fusion_head_backward", &fusion_head_backward_cpu);
}

}  // namespace pf_kernels
