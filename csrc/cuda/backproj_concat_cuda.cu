// backproj_concat on CUDA.
// Forward: one copy kernel writes every output row: x's features, then the context act(z[b] W^T + b)
// broadcast over the positions, staged in shared memory kContextChunk features at a time (any Dc).
// Tasks are (batch row, run of positions); blocks loop over them (any batch, any number of positions).
// The context is computed inside the kernel (one launch) while that is cheap (launch_plan.h:
// kInlineTaskMacs, kInlineTotalMacs); beyond, one cuBLAS GEMM computes z W^T once, in fp32 (tensor
// cores for fp16/bf16 inputs, fp32 accumulation and output), and the kernel adds the bias and applies
// the activation to it before rounding once to the output dtype, as the reference does.
// Backward: one launch (two when positions are split across blocks) reduces grad_out's context
// features over positions times act' into grad_pre (B, Dc), rounded to the input dtype as eager
// autograd rounds it (kept in fp32 for fp16, whose range such a sum overflows); act' reads y from the
// saved context act(y) or, where none is given or the rounded context loses it, from y recomputed
// (inline, or by the forward's GEMM, by the same rule). The GEMMs of the gradients go to ATen.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "activations.h"
#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/launch_plan.h"

namespace pf_kernels {
namespace cuda {
namespace {

using plan::kBwdCols;
using plan::kBwdRows;
using plan::kContextChunk;
using plan::kCopyThreads;

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  const scalar_t* x;  // (B * positions, Dx) rows of x_row_stride elements, unit inner stride
  int64_t x_row_stride;
  const scalar_t* z;      // (B, Dz) contiguous: inline context only
  const scalar_t* w;      // (Dc, Dz) contiguous: inline context only
  const acc_t* pre;       // (B, Dc) contiguous z W^T: GEMM context only
  const scalar_t* bias;   // (Dc,) or null
  scalar_t* out;          // (B * positions, Dx + Dc) contiguous
  int64_t B, positions, rows_per_task, tasks_per_row, Dx, Dz, Dc;
  int group;
  Activation act;
};

template <int V, typename scalar_t>
__device__ __forceinline__ void copy_vec(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src) {
  if constexpr (V == 1) {
    *dst = *src;
  } else {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t context_value(acc_t y, const scalar_t* __restrict__ bias, int64_t c,
                                                  Activation act) {
  if (bias != nullptr) y += static_cast<acc_t>(bias[c]);
  return static_cast<scalar_t>(activate<acc_t>(y, act));
}

// V elements per access: 16 bytes where launch_plan.h's backproj_vector_ok holds, else 1.
template <typename scalar_t, typename acc_t, int V, bool kInline>
__global__ void __launch_bounds__(kCopyThreads) backproj_concat_fwd_kernel(const ForwardArgs<scalar_t, acc_t> a) {
  __shared__ __align__(16) unsigned char ctx_raw[kContextChunk * sizeof(scalar_t)];
  scalar_t* ctx = reinterpret_cast<scalar_t*>(ctx_raw);
  const int tid = threadIdx.x;
  const int64_t D = a.Dx + a.Dc;
  plan::for_each_backproj_task(blockIdx.x, gridDim.x, a.B, a.positions, a.rows_per_task, a.tasks_per_row,
                               [&](int64_t b, int64_t row0, int64_t rows) {
    const int64_t first = b * a.positions + row0;  // first output row of this task
    scalar_t* o = a.out + first * D;
    if (a.Dx > 0) {
      const scalar_t* xr = a.x + first * a.x_row_stride;
      const int64_t width = a.Dx / V;
      for (plan::RowCursor k(tid, kCopyThreads, width); k.row < rows; k.next(width)) {
        copy_vec<V>(o + k.row * D + k.col * V, xr + k.row * a.x_row_stride + k.col * V);
      }
    }
    for (int64_t c0 = 0; c0 < a.Dc; c0 += kContextChunk) {
      const int64_t cn = a.Dc - c0 < kContextChunk ? a.Dc - c0 : kContextChunk;
      if constexpr (kInline) {
        // Groups of `group` lanes per feature; the loop is uniform, so every lane reaches the shuffles.
        const int g = a.group, lane = tid % 32;
        const scalar_t* zb = a.z + b * a.Dz;
        for (int64_t j0 = 0; j0 < cn; j0 += kCopyThreads / g) {
          const int64_t j = j0 + tid / g;
          const acc_t y = group_dot<scalar_t, acc_t>(zb, a.w + (c0 + j) * a.Dz, a.Dz, j < cn, lane % g, g);
          if (j < cn && lane % g == 0) ctx[j] = context_value(y, a.bias, c0 + j, a.act);
        }
      } else {
        const acc_t* pre = a.pre + b * a.Dc + c0;
        for (int64_t j = tid; j < cn; j += kCopyThreads) ctx[j] = context_value(pre[j], a.bias, c0 + j, a.act);
      }
      __syncthreads();
      const int64_t width = cn / V;  // cn is a multiple of V on the vector path
      for (plan::RowCursor k(tid, kCopyThreads, width); k.row < rows; k.next(width)) {
        copy_vec<V>(o + k.row * D + a.Dx + c0 + k.col * V, ctx + k.col * V);
      }
      __syncthreads();  // before the next chunk or task overwrites ctx
    }
  });
}

// Where act'(y) comes from (plan::YSource): the saved context act(y), z W^T from a GEMM, or inline.
template <typename scalar_t, typename acc_t>
struct ActGradSource {
  const scalar_t* out_ctx;  // act(y), the saved context: out_ctx[b * o_sb + c * o_sc] (kYFromOutput)
  int64_t o_sb, o_sc;
  const acc_t* pre;        // (B, Dc) contiguous z W^T (kYFromGemm)
  const scalar_t* z;       // (B, Dz) and (Dc, Dz) contiguous (kYInline)
  const scalar_t* w;
  const scalar_t* bias;    // (Dc,) or null
  int64_t Dz;
  Activation act;
  int64_t y_source;
};

// Sums g[b * g_sb + p * g_sp + c * g_sc] over p in this task's split of positions. With one split it
// finishes the job: dst[b, c] = sum * act'(b, c), rounded to out_t; otherwise it writes the partial
// sum to partial[split, b, c] (fp32) and a second launch (in_t = acc_t, over the splits) finishes. act'
// comes from the saved context a = act(y) (autograd's copy of the output's first position), or from
// y: where no context is given, for gelu, and for tanh / sigmoid in 16-bit dtypes, where 1 - a^2 or a (1 - a) of a rounded a loses
// most of its bits near saturation.
template <typename in_t, typename scalar_t, typename acc_t, typename out_t>
__global__ void __launch_bounds__(kBwdCols* kBwdRows)
    context_grad_kernel(const in_t* __restrict__ g, int64_t g_sb, int64_t g_sp, int64_t g_sc, int64_t positions,
                        int64_t per_split, int64_t splits, int64_t B, int64_t Dc,
                        const ActGradSource<scalar_t, acc_t> src, acc_t* __restrict__ partial,
                        out_t* __restrict__ dst) {
  __shared__ acc_t part[kBwdRows][kBwdCols + 1];
  __shared__ acc_t y_tile[kBwdCols];
  const int tx = threadIdx.x, ty = threadIdx.y;  // warp ty, lane tx
  const int64_t c_tiles = plan::ceil_div(Dc, kBwdCols);
  const bool finish = splits == 1;
  plan::for_each_grad_task(blockIdx.x, gridDim.x, B, c_tiles, splits, [&](int64_t b, int64_t split, int64_t c_tile) {
    const int64_t c = c_tile * kBwdCols + tx;
    const int64_t p0 = split * per_split;
    const int64_t p1 = positions < p0 + per_split ? positions : p0 + per_split;
    acc_t s = acc_t(0);
    if (c < Dc) s = strided_sum<acc_t>(g + b * g_sb + c * g_sc, p0 + ty, p1, kBwdRows, g_sp);
    part[ty][tx] = s;
    if (finish && src.y_source == plan::kYInline) {  // y of the tile's features, one warp per feature
      for (int j = ty; j < kBwdCols; j += kBwdRows) {
        const int64_t cj = c_tile * kBwdCols + j;
        const acc_t y = group_dot<scalar_t, acc_t>(src.z + b * src.Dz, src.w + cj * src.Dz, src.Dz, cj < Dc, tx, 32);
        if (tx == 0) y_tile[j] = y;
      }
    }
    __syncthreads();
    if (ty == 0 && c < Dc) {
      acc_t total = acc_t(0);
#pragma unroll
      for (int r = 0; r < kBwdRows; ++r) total += part[r][tx];
      if (finish) {
        acc_t d;
        if (src.act == Activation::None) {  // no context is passed for it
          d = acc_t(1);
        } else if (src.y_source == plan::kYFromOutput) {
          d = grad_from_activated<acc_t>(static_cast<acc_t>(src.out_ctx[b * src.o_sb + c * src.o_sc]), src.act);
        } else {
          acc_t y = src.y_source == plan::kYInline ? y_tile[tx] : src.pre[b * Dc + c];
          if (src.bias != nullptr) y += static_cast<acc_t>(src.bias[c]);
          d = activation_grad<acc_t>(y, src.act);
        }
        dst[b * Dc + c] = static_cast<out_t>(apply_act_grad(total, d, src.act));
      } else {
        partial[(split * B + b) * Dc + c] = total;
      }
    }
    __syncthreads();  // before the next task overwrites part and y_tile
  });
}

at::Tensor backproj_concat_cuda(const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, c10::string_view activation_name) {
  check_backproj_concat(x, z, weight, bias);
  TORCH_CHECK(x.is_cuda(), "pf_kernels: backproj_concat (CUDA) needs CUDA tensors, got x on ", x.device());
  const Activation act = parse_activation(std::string(activation_name));
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), Dx = x.size(-1), Dz = z.size(1), Dc = weight.size(0), D = Dx + Dc;
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = D;
  at::Tensor out = at::empty(out_sizes, x.options());
  if (out.numel() == 0) return out;
  const int64_t n_rows = out.numel() / D;
  const int64_t positions = n_rows / B;
  // Rows of x with unit inner stride: a view where strides allow, a copy where not.
  at::Tensor x_rows = x.reshape({n_rows, Dx});
  if (Dx > 1 && x_rows.stride(1) != 1) x_rows = x_rows.contiguous();
  const int64_t x_row_stride = Dx > 0 ? x_rows.stride(0) : 0;
  plan::BackprojForward p = plan::backproj_forward(B, positions, Dx, Dz, Dc, sm_count());
  // PF_KERNELS_CUDA_PATH: the context inline ("kernel") or from a cuBLAS GEMM first, whatever the plan.
  if (Dc > 0 && Dz > 0) p.inline_context = use_kernel(p.inline_context);
  const at::Tensor zc = p.inline_context ? z.contiguous() : z;
  const at::Tensor wc = p.inline_context ? weight.contiguous() : weight;
  const at::Tensor bc = is_given(bias) ? bias->contiguous() : at::Tensor();
  const at::Tensor pre = p.inline_context ? at::Tensor() : mm_acc(z, weight.t()).contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "backproj_concat_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    ForwardArgs<scalar_t, acc_t> args;
    args.x = Dx > 0 ? x_rows.data_ptr<scalar_t>() : nullptr;
    args.x_row_stride = x_row_stride;
    args.z = p.inline_context ? zc.data_ptr<scalar_t>() : nullptr;
    args.w = p.inline_context ? wc.data_ptr<scalar_t>() : nullptr;
    args.pre = pre.defined() ? pre.data_ptr<acc_t>() : nullptr;
    args.bias = bc.defined() ? bc.data_ptr<scalar_t>() : nullptr;
    args.out = out.data_ptr<scalar_t>();
    args.positions = positions;
    args.rows_per_task = p.rows_per_task;
    args.tasks_per_row = p.tasks_per_row;
    args.B = B;
    args.Dx = Dx;
    args.Dz = Dz;
    args.Dc = Dc;
    args.group = static_cast<int>(p.group);
    args.act = act;
    const bool vec = plan::backproj_vector_ok(Dx, Dc, x_row_stride, reinterpret_cast<uintptr_t>(args.x) % 16,
                                              reinterpret_cast<uintptr_t>(args.out) % 16, sizeof(scalar_t));
    auto launch = [&](auto kernel) {
      kernel<<<launch_grid(p.grid), kCopyThreads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) {
      p.inline_context ? launch(backproj_concat_fwd_kernel<scalar_t, acc_t, kVec, true>)
                       : launch(backproj_concat_fwd_kernel<scalar_t, acc_t, kVec, false>);
    } else {
      p.inline_context ? launch(backproj_concat_fwd_kernel<scalar_t, acc_t, 1, true>)
                       : launch(backproj_concat_fwd_kernel<scalar_t, acc_t, 1, false>);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backproj_concat_backward_cuda(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& context, const at::Tensor& z,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, c10::string_view activation_name,
    int64_t x_features) {
  check_backproj_concat_backward(grad_out, context, z, weight, bias, x_features);
  TORCH_CHECK(grad_out.is_cuda(), "pf_kernels: backproj_concat_backward (CUDA) needs CUDA tensors");
  const int64_t B = z.size(0), Dz = z.size(1), Dc = weight.size(0), D = x_features + Dc;
  const Activation act = parse_activation(std::string(activation_name));
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::ScalarType dtype = grad_out.scalar_type(), acc = at::toOpMathType(dtype);
  const int64_t positions = B > 0 && D > 0 ? grad_out.numel() / (B * D) : 0;

  const bool wide = grad_pre_dtype(dtype) != dtype;
  const at::TensorOptions grad_options = grad_out.options().dtype(grad_pre_dtype(dtype));
  at::Tensor grad_pre;
  if (positions == 0 || Dc == 0) {
    grad_pre = at::zeros({B, Dc}, grad_options);
  } else {
    grad_pre = at::empty({B, Dc}, grad_options);
    const bool has_context = is_given(context);
    const bool from_y =
        act != Activation::None && (!has_context || !derivative_from_output(act, at::elementSize(dtype)));
    const plan::BackprojBackward p = plan::backproj_backward(B, positions, Dz, Dc, from_y, sm_count());
    const at::Tensor g = grad_out.reshape({B, positions, D}).narrow(-1, x_features, Dc);
    const bool y_inline = p.y_source == plan::kYInline;
    const at::Tensor zc = y_inline ? z.contiguous() : z, wc = y_inline ? weight.contiguous() : weight;
    const at::Tensor bc = is_given(bias) ? bias->contiguous() : at::Tensor();
    // The forward's GEMM: the same y (16-bit inputs on tensor cores, not an fp32 GEMM of z_acc, W_acc).
    const at::Tensor pre =
        p.y_source == plan::kYFromGemm ? mm_acc(z, weight.t()).contiguous() : at::Tensor();
    const at::Tensor partial = p.splits > 1 ? at::empty({p.splits, B, Dc}, grad_pre.options().dtype(acc))
                                            : at::Tensor();
    const dim3 block(kBwdCols, kBwdRows);
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "backproj_concat_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      ActGradSource<scalar_t, acc_t> src;
      src.out_ctx = has_context ? context->data_ptr<scalar_t>() : nullptr;
      src.o_sb = has_context ? context->stride(0) : 0;
      src.o_sc = has_context ? context->stride(1) : 0;
      src.pre = pre.defined() ? pre.data_ptr<acc_t>() : nullptr;
      src.z = y_inline ? zc.data_ptr<scalar_t>() : nullptr;
      src.w = y_inline ? wc.data_ptr<scalar_t>() : nullptr;
      src.bias = bc.defined() ? bc.data_ptr<scalar_t>() : nullptr;
      src.Dz = Dz;
      src.act = act;
      src.y_source = p.y_source;
      auto reduce = [&](auto* dst) {
        using out_t = std::remove_pointer_t<decltype(dst)>;
        context_grad_kernel<scalar_t, scalar_t, acc_t, out_t><<<launch_grid(p.grid), block, 0, stream>>>(
            g.data_ptr<scalar_t>(), g.stride(0), g.stride(1), g.stride(2), positions, p.per_split, p.splits, B, Dc,
            src, partial.defined() ? partial.data_ptr<acc_t>() : nullptr, dst);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (p.splits > 1) {  // sum the splits (as positions of a (B, splits, Dc) view), times act'
          context_grad_kernel<acc_t, scalar_t, acc_t, out_t><<<launch_grid(p.finish_grid), block, 0, stream>>>(
              partial.data_ptr<acc_t>(), Dc, B * Dc, 1, p.splits, p.splits, 1, B, Dc, src, nullptr, dst);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      };
      if (wide) {
        reduce(grad_pre.data_ptr<acc_t>());
      } else {
        reduce(grad_pre.data_ptr<scalar_t>());
      }
    });
  }
  return backprojection_grads(grad_pre, z, weight, is_given(bias));
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(pf_kernels, CUDA, m) {
  m.impl("backproj_concat", &cuda::backproj_concat_cuda);
  m.impl("backproj_concat_backward", &cuda::backproj_concat_backward_cuda);
}

}  // namespace pf_kernels
