// context_linear on CUDA.
// Forward: the (B, H) context term in fp32 with cuBLAS (pre = z @ W_bp^T + b_bp; c = act(pre),
// rounded to the dtype as backproj_concat returns it, in one small elementwise kernel; term =
// c @ W_c^T), then one bandwidth-bound launch over p: out = out_act(p + term[b]), 16-byte accesses
// where every row is aligned. The GEMMs read the input dtype (16-bit: tensor cores, fp32 output).
// Backward: one launch (two when positions are split across blocks: partial sums, then their sum
// in a fixed order, so the result is deterministic) reduces grad_out (times out_act', also written
// as grad_p) over positions into the term's gradient (B, H); the rest is small cuBLAS GEMMs on the
// input dtype and one elementwise kernel for act'. The term's gradient stays fp32 (as the
// reference's fp32 sum p + term gives it); the context pre-activation's is rounded to the input
// dtype, as eager autograd rounds a 16-bit Linear's, but for fp16 (it sums over positions too:
// beyond fp16's range where the gradients it feeds are not; bf16 has fp32's range).
// Any size: 1-D grids with grid-stride loops (cuda/launch_plan.h: the grids, the backward's splits and
// its task walk are backproj_concat's, whose position reduction this is), 64-bit offsets and no 64-bit
// division, fixed shared memory (none tied to H or Dc); no host synchronisation, so the op can be
// captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "activations.h"
#include "context_linear.h"
#include "cuda/common.cuh"

namespace pf_kernels {
namespace cuda {
namespace {

constexpr int kThreads = plan::kElementwiseThreads;
using plan::kBwdCols;
using plan::kBwdRows;


// pre[i] += bias[i % N] where a bias is given (16-bit inputs: their GEMM has no fp32 bias epilogue),
// then c[i] = act(pre[i]) rounded to scalar_t.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) context_kernel(acc_t* __restrict__ pre, const scalar_t* __restrict__ bias,
                                                          scalar_t* __restrict__ c, int64_t n, int64_t N,
                                                          Activation act) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    acc_t y = pre[i];
    if (bias != nullptr) {
      y += static_cast<acc_t>(bias[i % N]);
      pre[i] = y;
    }
    c[i] = static_cast<scalar_t>(activate<acc_t>(y, act));
  }
}

// grad_pre[i] = grad_c[i] * act'(pre[i]), rounded to scalar_t.
template <typename out_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) activation_grad_kernel(const acc_t* __restrict__ grad_c,
                                                                  const acc_t* __restrict__ pre,
                                                                  out_t* __restrict__ grad_pre, int64_t n,
                                                                  Activation act) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    grad_pre[i] = static_cast<out_t>(apply_act_grad(grad_c[i], activation_grad<acc_t>(pre[i], act), act));
  }
}

// out[b, s, h] = out_act(p[b, s, h] + term[b, h]) over B batch rows of `positions` rows of H
// features, V elements per access (16 bytes when every row is aligned, else 1). Each thread walks
// (batch row, item) with a RowCursor; an item (position, vector) splits with one 32-bit division
// (the host checks positions * H / V < 2^32).
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    broadcast_add_kernel(const scalar_t* __restrict__ p, int64_t p_row_stride, const acc_t* __restrict__ term,
                         scalar_t* __restrict__ out, int64_t B, int64_t positions, int64_t H, Activation out_act) {
  const uint32_t per_row = static_cast<uint32_t>(H / V);
  const int64_t items = positions * per_row;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (plan::RowCursor t(start, static_cast<int64_t>(gridDim.x) * kThreads, items); t.row < B; t.next(items)) {
    const uint32_t item = static_cast<uint32_t>(t.col);
    const uint32_t s = item / per_row;
    const int64_t h = static_cast<int64_t>(item - s * per_row) * V;
    const int64_t r = t.row * positions + s;
    const scalar_t* pr = p + r * p_row_stride + h;
    const acc_t* qr = term + t.row * H + h;
    scalar_t* o = out + r * H + h;
    if constexpr (V == 1) {
      *o = static_cast<scalar_t>(activate<acc_t>(static_cast<acc_t>(*pr) + *qr, out_act));
    } else {
      union {
        uint4 raw;
        scalar_t v[V];
      } in, res;
      in.raw = *reinterpret_cast<const uint4*>(pr);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        res.v[k] = static_cast<scalar_t>(activate<acc_t>(static_cast<acc_t>(in.v[k]) + qr[k], out_act));
      }
      *reinterpret_cast<uint4*>(o) = res.raw;
    }
  }
}

// dst[split, b, h] = sum over this split's positions q of g'[b, q, h], where g' = g * out_act'
// (from the saved output `src`, or from y = src + term[b] when src is p: from_p), written to grad_p
// (contiguous, B x positions x H) when it is given. With grad_p null, a plain sum: also the second
// pass, over the splits' partial sums. Tiles of 32 features x 8 position lanes, walked as
// backproj_concat's backward walks them; a fixed order, so deterministic. dst in fp32 (acc_t).
template <typename in_t, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBwdCols* kBwdRows)
    position_sum_kernel(const in_t* __restrict__ g, int64_t g_sb, int64_t g_sp, int64_t g_sh,
                        const scalar_t* __restrict__ src, int64_t s_sb, int64_t s_sp, int64_t s_sh,
                        const acc_t* __restrict__ term, bool from_p, Activation out_act, scalar_t* __restrict__ grad_p,
                        int64_t B, int64_t positions, int64_t H, int64_t h_tiles, int64_t per_split, int64_t splits,
                        acc_t* __restrict__ dst) {
  __shared__ acc_t part[kBwdRows][kBwdCols + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  plan::for_each_grad_task(blockIdx.x, gridDim.x, B, h_tiles, splits, [&](int64_t b, int64_t split, int64_t tile) {
    const int64_t h = tile * kBwdCols + tx;
    const int64_t p0 = split * per_split;
    const int64_t p1 = positions < p0 + per_split ? positions : p0 + per_split;
    acc_t s = acc_t(0);
    if (h < H) {
      const in_t* gp = g + b * g_sb + h * g_sh;
      if (grad_p == nullptr) {
        s = strided_sum<acc_t>(gp, p0 + ty, p1, kBwdRows, g_sp);
      } else {
        const scalar_t* sp = src + b * s_sb + h * s_sh;
        const acc_t t = from_p ? term[b * H + h] : acc_t(0);
        scalar_t* gpp = grad_p + b * positions * H + h;
        auto add = [&](int64_t q, acc_t a, acc_t gv) {
          const acc_t d = from_p ? activation_grad<acc_t>(a + t, out_act) : grad_from_activated<acc_t>(a, out_act);
          const acc_t v = apply_act_grad(gv, d, out_act);
          gpp[q * H] = static_cast<scalar_t>(v);
          s += v;
        };
        // Four positions' loads first, then their terms in order (as strided_sum).
        int64_t q = p0 + ty;
        for (; q + 3 * kBwdRows < p1; q += 4 * kBwdRows) {
          acc_t a[4], gv[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            a[u] = static_cast<acc_t>(sp[(q + u * kBwdRows) * s_sp]);
            gv[u] = static_cast<acc_t>(gp[(q + u * kBwdRows) * g_sp]);
          }
#pragma unroll
          for (int u = 0; u < 4; ++u) add(q + u * kBwdRows, a[u], gv[u]);
        }
        for (; q < p1; q += kBwdRows) add(q, static_cast<acc_t>(sp[q * s_sp]), static_cast<acc_t>(gp[q * g_sp]));
      }
    }
    part[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && h < H) {
      acc_t total = acc_t(0);
#pragma unroll
      for (int k = 0; k < kBwdRows; ++k) total += part[k][tx];
      dst[(split * B + b) * H + h] = total;
    }
    __syncthreads();  // part is reused by the next task
  });
}

// Rows of t (B, *positions, H) as an (n_rows, H) view with unit inner stride (a copy where
// strides do not allow one).
at::Tensor as_rows(const at::Tensor& t, int64_t n_rows) {
  at::Tensor rows = t.reshape({n_rows, t.size(-1)});
  return t.size(-1) > 1 && rows.stride(1) != 1 ? rows.contiguous() : rows;
}

// pre = z @ W_bp^T + b_bp in fp32 (cuBLAS; contiguous), and c = act(pre) rounded to the dtype.
std::pair<at::Tensor, at::Tensor> context(const at::Tensor& z, const at::Tensor& bp_weight,
                                          const c10::optional<at::Tensor>& bp_bias, Activation act) {
  const at::ScalarType dtype = z.scalar_type(), acc = at::toOpMathType(dtype);
  const bool bias_in_gemm = dtype == acc && is_given(bp_bias);  // fp32/fp64: cuBLAS's epilogue adds it
  at::Tensor pre = bias_in_gemm ? at::addmm(*bp_bias, z, bp_weight.t()) : mm_acc(z, bp_weight.t());
  const bool bias_here = is_given(bp_bias) && !bias_in_gemm;
  if (act == Activation::None && dtype == acc) return {pre, pre};  // c is pre itself
  at::Tensor c = at::empty(pre.sizes(), z.options());
  const int64_t n = pre.numel();
  if (n > 0) {
    const at::Tensor bc = bias_here ? bp_bias->contiguous() : at::Tensor();
    const auto stream = at::cuda::getCurrentCUDAStream();
    const unsigned grid = launch_grid(plan::elementwise_grid(n, sm_count()));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "context_linear_context_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      context_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          pre.data_ptr<acc_t>(), bc.defined() ? bc.data_ptr<scalar_t>() : nullptr, c.data_ptr<scalar_t>(), n,
          pre.size(1), act);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {pre, c};
}

at::Tensor context_linear_cuda(const at::Tensor& p, const at::Tensor& z, const at::Tensor& bp_weight,
                               const c10::optional<at::Tensor>& bp_bias, const at::Tensor& proj_weight,
                               c10::string_view activation_name, c10::string_view out_activation_name) {
  check_context_linear(p, z, bp_weight, bp_bias, proj_weight);
  TORCH_CHECK(p.is_cuda(), "pf_kernels: context_linear (CUDA) needs CUDA tensors, got p on ", p.device());
  const Activation act = parse_activation(std::string(activation_name));
  const Activation out_act = parse_activation(std::string(out_activation_name));
  const c10::cuda::CUDAGuard guard(p.device());
  at::Tensor out = at::empty(p.sizes(), p.options());
  if (out.numel() == 0) return out;
  const at::ScalarType dtype = p.scalar_type();
  const int64_t B = p.size(0), H = p.size(-1), n_rows = out.numel() / H, positions = n_rows / B;

  const at::Tensor c = context(z, bp_weight, bp_bias, act).second;
  const at::Tensor term = mm_acc(c, proj_weight.t());  // (B, H) fp32
  const at::Tensor p_rows = as_rows(p, n_rows);
  const int64_t p_stride = p_rows.stride(0);

  // A batch row's (position, vector) items are split with a 32-bit division.
  TORCH_CHECK(positions * H < (int64_t{1} << 32), "pf_kernels: context_linear (CUDA) takes at most 2^32 - 1 "
              "elements per batch row, got ", positions, " x ", H);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "context_linear_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* p_ptr = p_rows.data_ptr<scalar_t>();
    // backproj_concat's rule for its x part: every row 16-byte aligned, H a multiple of the vector
    const bool vec = plan::backproj_vector_ok(H, 0, p_stride, reinterpret_cast<uintptr_t>(p_ptr) % 16,
                                              reinterpret_cast<uintptr_t>(out.data_ptr()) % 16, sizeof(scalar_t));
    const int64_t items = n_rows * (vec ? H / kVec : H);
    auto kernel = vec ? broadcast_add_kernel<scalar_t, acc_t, kVec> : broadcast_add_kernel<scalar_t, acc_t, 1>;
    const auto stream = at::cuda::getCurrentCUDAStream();
    const unsigned grid = launch_grid(plan::elementwise_grid(items, sm_count()));
    kernel<<<grid, kThreads, 0, stream>>>(
        p_ptr, p_stride, term.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), B, positions, H, out_act);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads context_linear_backward_cuda(const at::Tensor& grad_out, const c10::optional<at::Tensor>& out,
                                   const c10::optional<at::Tensor>& p, const at::Tensor& z,
                                   const at::Tensor& bp_weight, const c10::optional<at::Tensor>& bp_bias,
                                   const at::Tensor& proj_weight, c10::string_view activation_name,
                                   c10::string_view out_activation_name) {
  const Activation act = parse_activation(std::string(activation_name));
  const Activation out_act = parse_activation(std::string(out_activation_name));
  const at::Tensor saved = check_context_linear_backward(grad_out, out, p, z, bp_weight, bp_bias, proj_weight, out_act);
  TORCH_CHECK(grad_out.is_cuda(), "pf_kernels: context_linear_backward (CUDA) needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const bool from_p = saved.defined() && is_given(p);
  const at::ScalarType dtype = grad_out.scalar_type(), acc = at::toOpMathType(dtype);
  const int64_t B = grad_out.size(0), H = grad_out.size(-1);
  const int64_t positions = B > 0 && H > 0 ? grad_out.numel() / (B * H) : 0;
  const bool epilogue = out_act != Activation::None;
  at::Tensor grad_p = at::empty(epilogue ? grad_out.sizes() : at::IntArrayRef{0}, grad_out.options());

  const std::pair<at::Tensor, at::Tensor> pre_and_c = context(z, bp_weight, bp_bias, act);
  const at::Tensor pre = pre_and_c.first, c = pre_and_c.second;
  const at::Tensor term = from_p ? mm_acc(c, proj_weight.t()) : at::Tensor();

  // The term's gradient in fp32, as the reference sums it (p + term is an fp32 sum there): rounded to
  // 16 bits, a sum over many positions overflows fp16 where the gradients it feeds would not.
  at::Tensor grad_term;
  if (positions == 0) {
    grad_term = at::zeros({B, H}, grad_out.options().dtype(acc));
  } else {
    grad_term = at::empty({B, H}, grad_out.options().dtype(acc));
    const at::Tensor g = grad_out.reshape({B, positions, H});
    const at::Tensor src = saved.defined() ? saved.reshape({B, positions, H}) : at::Tensor();
    // backproj_concat's reduction over positions (its Dc features are our H; no y to compute)
    const plan::BackprojBackward pl = plan::backproj_backward(B, positions, 0, H, false, sm_count());
    const dim3 block(kBwdCols, kBwdRows);
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "context_linear_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto sum_positions = [&](auto dst) {
        position_sum_kernel<scalar_t, scalar_t, acc_t><<<launch_grid(pl.grid), block, 0, stream>>>(
            g.data_ptr<scalar_t>(), g.stride(0), g.stride(1), g.stride(2),
            src.defined() ? src.data_ptr<scalar_t>() : nullptr, src.defined() ? src.stride(0) : 0,
            src.defined() ? src.stride(1) : 0, src.defined() ? src.stride(2) : 0,
            term.defined() ? term.data_ptr<acc_t>() : nullptr, from_p, out_act,
            epilogue ? grad_p.data_ptr<scalar_t>() : nullptr, B, positions, H, pl.c_tiles, pl.per_split, pl.splits,
            dst);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (pl.splits == 1) {
        sum_positions(grad_term.data_ptr<acc_t>());
      } else {  // partial sums, then their sum in a fixed order
        const at::Tensor partial = at::empty({pl.splits, B, H}, grad_out.options().dtype(acc));
        sum_positions(partial.data_ptr<acc_t>());
        position_sum_kernel<acc_t, scalar_t, acc_t><<<launch_grid(pl.finish_grid), block, 0, stream>>>(
            partial.data_ptr<acc_t>(), H, B * H, 1, nullptr, 0, 0, 0, nullptr, false, Activation::None, nullptr, B,
            pl.splits, H, pl.c_tiles, pl.splits, 1, grad_term.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }

  // The two small GEMMs that read the term's gradient in fp32 (c and W_c upcast: (B, Dc), (H, Dc));
  // those of the back-projection on the input dtype (cuBLAS, fp32 accumulation), as eager.
  const at::Tensor grad_proj_weight = at::mm(grad_term.t(), c.to(acc)).to(dtype);
  const at::Tensor grad_c = at::mm(grad_term, proj_weight.to(acc));
  const bool wide = grad_pre_dtype(dtype) != dtype;
  at::Tensor grad_pre;  // of pre: the gradient of c times act'(pre), in grad_pre_dtype
  if (act == Activation::None) {
    grad_pre = grad_c.to(grad_pre_dtype(dtype));
  } else {
    grad_pre = at::empty(grad_c.sizes(), grad_out.options().dtype(grad_pre_dtype(dtype)));
    if (grad_pre.numel() > 0) {
      const auto stream = at::cuda::getCurrentCUDAStream();
      const unsigned grid = launch_grid(plan::elementwise_grid(grad_pre.numel(), sm_count()));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "context_linear_act_grad_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto run = [&](auto* dst) {
          activation_grad_kernel<std::remove_pointer_t<decltype(dst)>, acc_t><<<grid, kThreads, 0, stream>>>(
              grad_c.data_ptr<acc_t>(), pre.data_ptr<acc_t>(), dst, grad_pre.numel(), act);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (wide) {
          run(grad_pre.data_ptr<acc_t>());
        } else {
          run(grad_pre.data_ptr<scalar_t>());
        }
      });
    }
  }
  auto [grad_z, grad_bp_weight, grad_bp_bias] = backprojection_grads(grad_pre, z, bp_weight, is_given(bp_bias));
  return {grad_p, grad_z, grad_bp_weight, grad_bp_bias, grad_proj_weight};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(pf_kernels, CUDA, m) {
  m.impl("context_linear", &cuda::context_linear_cuda);
  m.impl("context_linear_backward", &cuda::context_linear_backward_cuda);
}

}  // namespace pf_kernels
