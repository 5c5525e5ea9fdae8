// backproj_concat on CPU: the context once per batch row, then one pass writing the concatenated rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "activations.h"
#include "checks.h"

namespace pf_kernels {
namespace {

// Rows of ~32 KiB per task: enough work to amortise a thread hand-off.
int64_t grain_for_row_bytes(int64_t row_bytes) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_bytes)); }

// y = z @ weight.T + bias in the accumulation type (fp32, or fp64 for fp64 inputs).
at::Tensor pre_activation(const at::Tensor& z, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          at::ScalarType acc) {
  const at::Tensor z_acc = z.to(acc), w_acc = weight.to(acc);
  return has_bias(bias) ? at::addmm(bias->to(acc), z_acc, w_acc.t()) : at::mm(z_acc, w_acc.t());
}

at::Tensor backproj_concat_cpu(const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, c10::string_view activation_name) {
  check_backproj_concat(x, z, weight, bias);
  const Activation act = parse_activation(std::string(activation_name));
  const int64_t B = x.size(0), Dx = x.size(-1), Dc = weight.size(0), D = Dx + Dc;
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = D;
  at::Tensor out = at::empty(out_sizes, x.options());
  if (out.numel() == 0) return out;
  const int64_t n_rows = out.numel() / D;               // B * positions
  const int64_t positions = B > 0 ? n_rows / B : 0;
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  at::Tensor y = pre_activation(z, weight, bias, acc);  // (B, Dc), tiny next to out
  // Rows of x with unit inner stride, viewed as (n_rows, Dx) where strides allow, copied where not.
  at::Tensor x_rows = x.reshape({n_rows, Dx});
  if (Dx > 0 && x_rows.stride(1) != 1) x_rows = x_rows.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "backproj_concat_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The context in the output dtype, computed once per batch row.
    at::Tensor context = at::empty({B, Dc}, x.options());
    const acc_t* y_ptr = y.data_ptr<acc_t>();
    scalar_t* c_ptr = context.data_ptr<scalar_t>();
    for (int64_t i = 0; i < B * Dc; ++i) c_ptr[i] = static_cast<scalar_t>(activate<acc_t>(y_ptr[i], act));

    const scalar_t* x_ptr = x_rows.data_ptr<scalar_t>();
    const int64_t x_stride = Dx > 0 ? x_rows.stride(0) : 0;
    scalar_t* o_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, n_rows, grain_for_row_bytes(D * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* o = o_ptr + r * D;
        if (Dx > 0) std::memcpy(o, x_ptr + r * x_stride, Dx * sizeof(scalar_t));
        std::memcpy(o + Dx, c_ptr + (r / positions) * Dc, Dc * sizeof(scalar_t));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backproj_concat_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, c10::string_view activation_name, int64_t x_features) {
  check_floating(grad_out, "grad_out");
  check_like(z, grad_out, "z", "grad_out");
  check_linear(weight, bias, z.size(1), grad_out, "grad_out");
  const int64_t B = z.size(0), Dc = weight.size(0), D = x_features + Dc;
  TORCH_CHECK(grad_out.dim() >= 2 && grad_out.size(0) == B && grad_out.size(-1) == D,
              "pf_kernels: grad_out must be (", B, ", *positions, ", D, "), got ", grad_out.sizes());
  const Activation act = parse_activation(std::string(activation_name));
  const at::ScalarType acc = at::toOpMathType(grad_out.scalar_type());
  const int64_t positions = B > 0 ? grad_out.numel() / (B * std::max<int64_t>(D, 1)) : 0;

  // The context gradient: grad_out's last Dc features summed over positions, in one pass.
  at::Tensor grad_y = at::zeros({B, Dc}, grad_out.options().dtype(acc));
  at::Tensor y = pre_activation(z, weight, bias, acc);
  if (B > 0 && Dc > 0) {
    at::Tensor g = grad_out.reshape({B, positions, D}).narrow(-1, x_features, Dc);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "backproj_concat_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* g_ptr = g.data_ptr<scalar_t>();
      const int64_t sb = g.stride(0), sp = g.stride(1), sc = g.stride(2);
      const acc_t* y_ptr = y.data_ptr<acc_t>();
      acc_t* gy_ptr = grad_y.data_ptr<acc_t>();
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          acc_t* sum = gy_ptr + b * Dc;
          for (int64_t p = 0; p < positions; ++p) {
            const scalar_t* row = g_ptr + b * sb + p * sp;
            if (sc == 1) {
              for (int64_t c = 0; c < Dc; ++c) sum[c] += static_cast<acc_t>(row[c]);
            } else {
              for (int64_t c = 0; c < Dc; ++c) sum[c] += static_cast<acc_t>(row[c * sc]);
            }
          }
          const acc_t* yb = y_ptr + b * Dc;
          for (int64_t c = 0; c < Dc; ++c) sum[c] *= activation_grad<acc_t>(yb[c], act);
        }
      });
    });
  }
  const at::ScalarType dtype = grad_out.scalar_type();
  at::Tensor grad_z = at::mm(grad_y, weight.to(acc)).to(dtype);
  at::Tensor grad_weight = at::mm(grad_y.t(), z.to(acc)).to(dtype);
  at::Tensor grad_bias = has_bias(bias) ? grad_y.sum(0).to(dtype) : at::empty({0}, grad_out.options());
  return {grad_z, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pf_kernels, CPU, m) {
  m.impl("backproj_concat", &backproj_concat_cpu);
  m.impl("backproj_concat_backward", &backproj_concat_backward_cpu);
}

}  // namespace pf_kernels
