// Host-side argument checks shared by every device's kernels: a direct call of torch.ops.pf_kernels.*
// with bad input fails with a message naming the argument, never a crash.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <string>
#include <vector>

namespace pf_kernels {

// An optional tensor that was passed: Python's None arrives as nullopt, but a C++ caller may pass
// an undefined tensor.
inline bool is_given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "pf_kernels: ", name, " is undefined");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "pf_kernels: ", name, " must be floating, got ",
              t.scalar_type());
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  check_floating(t, name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "pf_kernels: ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "pf_kernels: ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

// weight (out, in) and optional bias (out,) of a linear map from `in` features.
inline void check_linear(const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t in,
                         const at::Tensor& ref, const char* ref_name) {
  check_like(weight, ref, "weight", ref_name);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == in, "pf_kernels: weight must be (out_features, ", in,
              "), got ", weight.sizes());
  if (is_given(bias)) {
    check_like(*bias, ref, "bias", ref_name);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "pf_kernels: bias must be (",
                weight.size(0), ",), got ", bias->sizes());
  }
}

inline void check_backproj_concat(const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias) {
  check_floating(x, "x");
  check_like(z, x, "z", "x");
  TORCH_CHECK(x.dim() >= 2, "pf_kernels: x must be (B, *positions, Dx), got ", x.sizes());
  TORCH_CHECK(z.dim() == 2 && z.size(0) == x.size(0), "pf_kernels: z must be (B, Dz) with B = ", x.size(0),
              ", got ", z.sizes());
  check_linear(weight, bias, z.size(1), x, "x");
}

inline int64_t check_fusion_head(at::TensorList hs, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(!hs.empty(), "pf_kernels: hs must hold at least one tensor");
  int64_t in = 0;
  for (size_t j = 0; j < hs.size(); ++j) {
    const std::string name = "hs[" + std::to_string(j) + "]";
    check_like(hs[j], hs[0], name.c_str(), "hs[0]");
    TORCH_CHECK(hs[j].dim() == 2, "pf_kernels: ", name, " must be 2-D (B, D), got ", hs[j].sizes());
    TORCH_CHECK(hs[j].size(0) == hs[0].size(0), "pf_kernels: ", name, " has batch size ", hs[j].size(0),
                " but hs[0] has ", hs[0].size(0));
    TORCH_CHECK(hs[j].size(1) <= std::numeric_limits<int64_t>::max() - in,
                "pf_kernels: the widths of hs overflow int64 (", name, " has ", hs[j].size(1), " features)");
    in += hs[j].size(1);
  }
  check_linear(weight, bias, in, hs[0], "hs[0]");
  return in;
}

// The backward ops' arguments: grad_out is (B, *positions, x_features + Dc); the optional context,
// act(y) as the forward returned it, is (B, Dc).
inline void check_backproj_concat_backward(const at::Tensor& grad_out, const c10::optional<at::Tensor>& context,
                                           const at::Tensor& z, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias, int64_t x_features) {
  check_floating(grad_out, "grad_out");
  check_like(z, grad_out, "z", "grad_out");
  TORCH_CHECK(z.dim() == 2, "pf_kernels: z must be (B, Dz), got ", z.sizes());
  check_linear(weight, bias, z.size(1), grad_out, "grad_out");
  TORCH_CHECK(x_features >= 0, "pf_kernels: x_features must be >= 0, got ", x_features);
  const int64_t B = z.size(0), Dc = weight.size(0), D = x_features + Dc;
  TORCH_CHECK(grad_out.dim() >= 2 && grad_out.size(0) == B && grad_out.size(-1) == D,
              "pf_kernels: grad_out must be (", B, ", *positions, ", D, "), got ", grad_out.sizes());
  if (is_given(context)) {
    check_like(*context, grad_out, "context", "grad_out");
    TORCH_CHECK(context->dim() == 2 && context->size(0) == B && context->size(1) == Dc,
                "pf_kernels: context must be (", B, ", ", Dc, "), got ", context->sizes());
  }
}

// grad_out and the optional saved out are (B, Dz); returns sum D_j as check_fusion_head does.
inline int64_t check_fusion_head_backward(const at::Tensor& grad_out, at::TensorList hs, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& bias,
                                          const c10::optional<at::Tensor>& out) {
  const int64_t in_features = check_fusion_head(hs, weight, bias);
  const int64_t B = hs[0].size(0), Dz = weight.size(0);
  check_like(grad_out, hs[0], "grad_out", "hs[0]");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == B && grad_out.size(1) == Dz,
              "pf_kernels: grad_out must be (", B, ", ", Dz, "), got ", grad_out.sizes());
  if (is_given(out)) {
    check_like(*out, hs[0], "out", "hs[0]");
    TORCH_CHECK(out->sizes() == grad_out.sizes(), "pf_kernels: out must be (", B, ", ", Dz, "), got ",
                out->sizes());
  }
  return in_features;
}

}  // namespace pf_kernels
