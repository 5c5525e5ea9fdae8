// fusion_head on CPU: z = act([h_1..h_K] @ W^T + b).
// On a CPU one large GEMM beats K thin ones, so the K inputs are gathered row by row (in the
// accumulation dtype) into one (B, sum D_j) operand inside the op: no concat op, no autograd node,
// and the bias and activation are applied in the same kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "activations.h"
#include "checks.h"

namespace pf_kernels {
namespace {

// [h_1..h_K] as one contiguous (B, in_features) tensor of the accumulation dtype; h itself when
// K == 1 and it is already such a tensor.
at::Tensor gather_inputs(at::TensorList hs, int64_t in_features, at::ScalarType acc) {
  const int64_t B = hs[0].size(0);
  if (hs.size() == 1 && hs[0].scalar_type() == acc) return hs[0];
  at::Tensor gathered = at::empty({B, in_features}, hs[0].options().dtype(acc));
  int64_t offset = 0;
  for (const at::Tensor& h : hs) {
    gathered.narrow(1, offset, h.size(1)).copy_(h);
    offset += h.size(1);
  }
  return gathered;
}

at::Tensor fusion_head_cpu(at::TensorList hs, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           c10::string_view activation_name) {
  const int64_t in_features = check_fusion_head(hs, weight, bias);
  const Activation act = parse_activation(std::string(activation_name));
  const at::ScalarType dtype = hs[0].scalar_type(), acc = at::toOpMathType(dtype);
  const at::Tensor h = gather_inputs(hs, in_features, acc), w = weight.to(acc);
  at::Tensor y = has_bias(bias) ? at::addmm(bias->to(acc), h, w.t()) : at::mm(h, w.t());
  if (act == Activation::None) return y.to(dtype);
  at::Tensor out = dtype == acc ? y : at::empty_like(y, y.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusion_head_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* y_ptr = y.data_ptr<acc_t>();
    scalar_t* o_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, y.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
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
  const at::Tensor h = gather_inputs(hs, in_features, acc), w = weight.to(acc);

  // grad_y = grad_out * act'(y): act' from the output as eager PyTorch does where it holds act(y)
  // exactly (fp32/fp64); from y for gelu and for 16-bit outputs (rounding loses 1 - a^2 near saturation).
  at::Tensor grad_y = grad_out.to(acc).contiguous();
  if (grad_y.data_ptr() == grad_out.data_ptr()) grad_y = grad_y.clone();  // never write into grad_out
  const bool from_y = act == Activation::Gelu || dtype != acc;
  if (act != Activation::None && grad_y.numel() > 0) {
    const at::Tensor source = from_y
                                  ? (has_bias(bias) ? at::addmm(bias->to(acc), h, w.t()) : at::mm(h, w.t()))
                                  : out.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusion_head_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      acc_t* g = grad_y.data_ptr<acc_t>();
      at::parallel_for(0, grad_y.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
        if (from_y) {
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
  // Each h_j's gradient is its own tensor, computed from its own block of the weight.
  std::vector<at::Tensor> grad_hs;
  grad_hs.reserve(hs.size());
  int64_t offset = 0;
  for (const at::Tensor& hj : hs) {
    grad_hs.push_back(at::mm(grad_y, w.narrow(1, offset, hj.size(1))).to(dtype));
    offset += hj.size(1);
  }
  at::Tensor grad_weight = at::mm(grad_y.t(), h).to(dtype);
  at::Tensor grad_bias = has_bias(bias) ? grad_y.sum(0).to(dtype) : at::empty({0}, grad_out.options());
  return {grad_hs, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pf_kernels, CPU, m) {
  m.impl("fusion_head", &fusion_head_cpu);
  m.impl("fusion_head_backward", &fusion_head_backward_cpu);
}

}  // namespace pf_kernels
