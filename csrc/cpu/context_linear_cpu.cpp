// context_linear on CPU. Forward: the (B, H) context term once per batch row (two small linear
// maps: the back-projection, rounded to the dtype as backproj_concat returns it, then W_c), then
// one pass over p adding it, with relu in the same pass and the smooth activations applied per
// cache-sized chunk with ATen's SIMD kernels. Backward: the term's gradient is grad_out (times
// the output activation's derivative) summed over positions, then the small linear maps' backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "activations.h"
#include "context_linear.h"
#include "cpu/activation_ops.h"
#include "cpu/common.h"

namespace pf_kernels {
namespace {

using cpu::grain_for;
using cpu::linear_acc;

// Rows per chunk of the smooth-activation path: ~32K elements, so the chunk is still in cache
// when ATen's activation runs over it and its call overhead is spread thin.
constexpr int64_t kChunkElements = 1 << 15;

// The context c = act(z @ bp_weight^T + bp_bias) rounded to scalar_t (as backproj_concat returns it),
// and the term c @ proj_weight^T in the accumulation dtype: (B, H). Also returns c.
template <typename scalar_t, typename acc_t>
std::pair<at::Tensor, at::Tensor> context_term(const at::Tensor& z, const at::Tensor& bp_weight,
                                               const c10::optional<at::Tensor>& bp_bias,
                                               const at::Tensor& proj_weight, Activation act) {
  at::Tensor pre = linear_acc<scalar_t, acc_t>(z, bp_weight, bp_bias);
  activate_inplace(pre, act);
  const at::Tensor c = pre.to(z.scalar_type());
  return {linear_acc<scalar_t, acc_t>(c, proj_weight, c10::nullopt), c};
}

// Rows of t (B, *positions, H) as an (n_rows, H) view with unit inner stride (a copy where
// strides do not allow one).
at::Tensor as_rows(const at::Tensor& t, int64_t n_rows) {
  at::Tensor rows = t.reshape({n_rows, t.size(-1)});
  return t.size(-1) > 1 && rows.stride(1) != 1 ? rows.contiguous() : rows;
}

at::Tensor context_linear_cpu(const at::Tensor& p, const at::Tensor& z, const at::Tensor& bp_weight,
                              const c10::optional<at::Tensor>& bp_bias, const at::Tensor& proj_weight,
                              c10::string_view activation_name, c10::string_view out_activation_name) {
  check_context_linear(p, z, bp_weight, bp_bias, proj_weight);
  const Activation act = parse_activation(std::string(activation_name));
  const Activation out_act = parse_activation(std::string(out_activation_name));
  at::Tensor out = at::empty(p.sizes(), p.options());
  if (out.numel() == 0) return out;
  const int64_t B = p.size(0), H = p.size(-1), n_rows = out.numel() / H, positions = n_rows / B;
  const at::Tensor p_rows = as_rows(p, n_rows);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "context_linear_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kWide = std::is_same<scalar_t, acc_t>::value;  // fp32/fp64: y can be built in out
    const at::Tensor term = context_term<scalar_t, acc_t>(z, bp_weight, bp_bias, proj_weight, act).first;
    const acc_t* q_ptr = term.data_ptr<acc_t>();
    const scalar_t* p_ptr = p_rows.data_ptr<scalar_t>();
    const int64_t p_stride = p_rows.stride(0);
    scalar_t* o_ptr = out.data_ptr<scalar_t>();
    const bool smooth = out_act != Activation::None && out_act != Activation::Relu;
    const bool relu = out_act == Activation::Relu;
    const int64_t chunk_rows = std::max<int64_t>(1, kChunkElements / H);

    at::parallel_for(0, n_rows, grain_for(H), [&](int64_t begin, int64_t end) {
      // 16-bit outputs with a smooth activation: y in an fp32 buffer, activated, then rounded once.
      std::vector<acc_t> buffer(!kWide && smooth ? std::min(end - begin, chunk_rows) * H : 0);
      for (int64_t r0 = begin; r0 < end; r0 += chunk_rows) {
        const int64_t r1 = std::min(end, r0 + chunk_rows);
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* __restrict__ pr = p_ptr + r * p_stride;
          const acc_t* __restrict__ qr = q_ptr + (r / positions) * H;
          if (!kWide && smooth) {
            acc_t* __restrict__ yr = buffer.data() + (r - r0) * H;
            for (int64_t h = 0; h < H; ++h) yr[h] = static_cast<acc_t>(pr[h]) + qr[h];
          } else {
            scalar_t* __restrict__ orow = o_ptr + r * H;
            if (relu) {  // y < 0 ? 0 : y keeps NaN, as torch.relu does
              for (int64_t h = 0; h < H; ++h) {
                const acc_t y = static_cast<acc_t>(pr[h]) + qr[h];
                orow[h] = static_cast<scalar_t>(y < acc_t(0) ? acc_t(0) : y);
              }
            } else {
              for (int64_t h = 0; h < H; ++h) orow[h] = static_cast<scalar_t>(static_cast<acc_t>(pr[h]) + qr[h]);
            }
          }
        }
        if (smooth) {  // tanh / sigmoid / gelu over the chunk, with ATen's vectorised kernels
          at::Tensor chunk = out.view({n_rows, H}).narrow(0, r0, r1 - r0);
          if constexpr (kWide) {
            activate_inplace(chunk, out_act);
          } else {
            at::Tensor y = at::from_blob(buffer.data(), {r1 - r0, H}, out.options().dtype(term.scalar_type()));
            activate_inplace(y, out_act);
            chunk.copy_(y);
          }
        }
      }
    });
  });
  return out;
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads context_linear_backward_cpu(const at::Tensor& grad_out, const c10::optional<at::Tensor>& out,
                                  const c10::optional<at::Tensor>& p, const at::Tensor& z,
                                  const at::Tensor& bp_weight, const c10::optional<at::Tensor>& bp_bias,
                                  const at::Tensor& proj_weight, c10::string_view activation_name,
                                  c10::string_view out_activation_name) {
  const Activation act = parse_activation(std::string(activation_name));
  const Activation out_act = parse_activation(std::string(out_activation_name));
  const at::Tensor saved = check_context_linear_backward(grad_out, out, p, z, bp_weight, bp_bias, proj_weight, out_act);
  const bool from_p = saved.defined() && p.has_value() && p->defined();
  const at::ScalarType dtype = grad_out.scalar_type(), acc = at::toOpMathType(dtype);
  const int64_t B = grad_out.size(0), H = grad_out.size(-1);
  const int64_t positions = B > 0 && H > 0 ? grad_out.numel() / (B * H) : 0;
  at::Tensor grad_p = at::empty(out_act == Activation::None ? at::IntArrayRef{0} : grad_out.sizes(), grad_out.options());
  Grads grads;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "context_linear_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor pre = linear_acc<scalar_t, acc_t>(z, bp_weight, bp_bias);
    at::Tensor c_acc = pre.clone();
    activate_inplace(c_acc, act);
    const at::Tensor c = c_acc.to(dtype);  // the context as the forward rounded it
    at::Tensor term;
    if (from_p) term = linear_acc<scalar_t, acc_t>(c, proj_weight, c10::nullopt);

    // The term's gradient gq (B, H): grad_out (times out_act') summed over positions.
    at::Tensor grad_term = at::zeros({B, H}, grad_out.options().dtype(acc));
    if (positions > 0) {
      const at::Tensor g = grad_out.reshape({B, positions, H});
      if (out_act == Activation::None || out_act == Activation::Relu) {
        // One pass: read grad_out (and the relu's source), write grad_p, accumulate per batch row.
        const at::Tensor src = saved.defined() ? saved.reshape({B, positions, H}) : at::Tensor();
        const scalar_t* g_ptr = g.data_ptr<scalar_t>();
        const scalar_t* s_ptr = src.defined() ? src.data_ptr<scalar_t>() : nullptr;
        const acc_t* q_ptr = term.defined() ? term.data_ptr<acc_t>() : nullptr;
        scalar_t* gp_ptr = out_act == Activation::Relu ? grad_p.data_ptr<scalar_t>() : nullptr;
        acc_t* gq_ptr = grad_term.data_ptr<acc_t>();
        const int64_t gb = g.stride(0), gs = g.stride(1), gh = g.stride(2);
        const int64_t sb = src.defined() ? src.stride(0) : 0, ss = src.defined() ? src.stride(1) : 0,
                      sh = src.defined() ? src.stride(2) : 0;
        at::parallel_for(0, B, grain_for(positions * H), [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            acc_t* __restrict__ sum = gq_ptr + b * H;
            for (int64_t s = 0; s < positions; ++s) {
              const scalar_t* __restrict__ gr = g_ptr + b * gb + s * gs;
              if (gp_ptr == nullptr) {
                if (gh == 1) {
                  for (int64_t h = 0; h < H; ++h) sum[h] += static_cast<acc_t>(gr[h]);
                } else {
                  for (int64_t h = 0; h < H; ++h) sum[h] += static_cast<acc_t>(gr[h * gh]);
                }
                continue;
              }
              const scalar_t* __restrict__ sr = s_ptr + b * sb + s * ss;
              const acc_t* __restrict__ qr = q_ptr != nullptr ? q_ptr + b * H : nullptr;
              scalar_t* __restrict__ gpr = gp_ptr + (b * positions + s) * H;
              for (int64_t h = 0; h < H; ++h) {
                // relu' from y = p + term (16-bit) or from the output (y > 0 iff out > 0)
                const acc_t y = static_cast<acc_t>(sr[h * sh]) + (qr != nullptr ? qr[h] : acc_t(0));
                const scalar_t v = y > acc_t(0) ? gr[h * gh] : scalar_t(0);
                gpr[h] = v;
                sum[h] += static_cast<acc_t>(v);
              }
            }
          }
        });
      } else {  // smooth activations: ATen's vectorised backward over the whole tensor
        const int64_t n_rows = B * positions;
        // (out of place: for fp32, .to(acc) is p itself)
        const at::Tensor source = from_p ? at::add(as_rows(saved, n_rows).to(acc).reshape({B, positions, H}),
                                                   term.unsqueeze(1))
                                         : saved.reshape({B, positions, H});
        const at::Tensor gp = activation_backward(from_p ? g.to(acc) : g, source, out_act, from_p);
        grad_p.view({B, positions, H}).copy_(gp);
        grad_term = gp.sum(at::IntArrayRef{1}, /*keepdim=*/false, acc);
      }
    }

    // The small linear maps' backward: term = c @ W_c^T, then c = act(z @ W_bp^T + b_bp).
    auto [grad_c, grad_proj_weight, unused] =
        cpu::linear_backward<scalar_t, acc_t>(grad_term, c, proj_weight, false, acc);
    (void)unused;
    const at::Tensor grad_pre = activation_backward(grad_c, pre, act, /*from_y=*/true).contiguous();
    auto [grad_z, grad_bp_weight, grad_bp_bias] =
        cpu::linear_backward<scalar_t, acc_t>(grad_pre, z, bp_weight, has_bias(bp_bias), dtype);
    if (!grad_bp_bias.defined()) grad_bp_bias = at::empty({0}, grad_out.options());
    grads = Grads{grad_p, grad_z, grad_bp_weight, grad_bp_bias, grad_proj_weight.to(dtype)};
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(pf_kernels, CPU, m) {
  m.impl("context_linear", &context_linear_cpu);
  m.impl("context_linear_backward", &context_linear_backward_cpu);
}

}  // namespace pf_kernels
