// backproj_concat on CUDA.
// Forward, one launch: each block computes its batch row's context act(z[b] @ W^T + bias) into shared
// memory, then writes its share of that row's positions (x part and context part) in one coalesced
// pass. Several blocks may share a batch row when there are few rows; each recomputes the context
// (Dc * Dz multiply-adds from L2), which the host bounds against the bytes the block writes.
// Backward: one launch (two when positions are split across blocks) reduces grad_out's context
// features over positions times act' into grad_pre (B, Dc) in fp32; the small GEMMs go to ATen.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "activations.h"
#include "checks.h"
#include "cuda/common.cuh"

namespace pf_kernels {
namespace cuda {
namespace {

constexpr int kFwdThreads = 256;

// V elements per access: 16 bytes when the host found every row aligned, else 1.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kFwdThreads)
    backproj_concat_fwd_kernel(const scalar_t* __restrict__ x, int64_t x_row_stride, const scalar_t* __restrict__ z,
                               const scalar_t* __restrict__ w, const scalar_t* __restrict__ bias,
                               scalar_t* __restrict__ out, int64_t positions, int64_t rows_per_block,
                               int64_t blocks_per_row, int64_t Dx, int64_t Dz, int64_t Dc, Activation act) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* ctx = reinterpret_cast<scalar_t*>(smem_raw);
  const int64_t b = blockIdx.x / blocks_per_row;
  const int64_t chunk = blockIdx.x - b * blocks_per_row;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // The context: one warp per output feature, lanes across Dz (coalesced rows of W).
  const scalar_t* zb = z + b * Dz;
  for (int64_t c = warp; c < Dc; c += kFwdThreads / 32) {
    const scalar_t* wc = w + c * Dz;
    acc_t s = acc_t(0);
    for (int64_t k = lane; k < Dz; k += 32) s += static_cast<acc_t>(zb[k]) * static_cast<acc_t>(wc[k]);
    s = warp_sum(s);
    if (lane == 0) {
      if (bias != nullptr) s += static_cast<acc_t>(bias[c]);
      ctx[c] = static_cast<scalar_t>(activate<acc_t>(s, act));
    }
  }
  __syncthreads();

  const int64_t row0 = chunk * rows_per_block;
  const int64_t rows = positions - row0 < rows_per_block ? positions - row0 : rows_per_block;
  if (rows <= 0) return;
  const int64_t D = Dx + Dc;
  const int64_t first = b * positions + row0;  // first global row of this block
  scalar_t* o = out + first * D;
  const scalar_t* xr = x + first * x_row_stride;
  // In-block indices fit 32 bits (the host caps rows * D below 2^31): cheap division.
  const uint32_t vec_per_row = static_cast<uint32_t>(D / V);
  const uint32_t n = static_cast<uint32_t>(rows) * vec_per_row;
  const uint32_t vx = static_cast<uint32_t>(Dx / V);
  for (uint32_t i = threadIdx.x; i < n; i += kFwdThreads) {
    const uint32_t r = i / vec_per_row;
    const uint32_t v = i - r * vec_per_row;
    if constexpr (V == 1) {
      o[static_cast<int64_t>(r) * D + v] = v < vx ? xr[static_cast<int64_t>(r) * x_row_stride + v] : ctx[v - vx];
    } else {
      const uint4 val = v < vx ? *reinterpret_cast<const uint4*>(xr + static_cast<int64_t>(r) * x_row_stride +
                                                                  static_cast<int64_t>(v) * V)
                               : *reinterpret_cast<const uint4*>(ctx + static_cast<int64_t>(v - vx) * V);
      *reinterpret_cast<uint4*>(o + static_cast<int64_t>(r) * D + static_cast<int64_t>(v) * V) = val;
    }
  }
}

constexpr int kBwdCols = 32, kBwdRows = 8;

// Sums g[b, p, c] over p in this block's split of positions. With one split it finishes the job:
// dst[b, c] = sum * act'(b, c); otherwise it writes the partial sum to dst[split, b, c] and a second
// launch of this kernel (in_t = acc_t, over the splits) finishes. act' comes from the saved output a
// (any position holds the context: position 0 is read), or from y recomputed here (from_y): for
// gelu, and for tanh / sigmoid in 16-bit dtypes, where 1 - a^2 or a (1 - a) of a rounded a loses
// most of its bits near saturation.
template <typename in_t, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBwdCols* kBwdRows)
    context_grad_kernel(const in_t* __restrict__ g, int64_t g_sb, int64_t g_sp, int64_t g_sc, int64_t positions,
                        int64_t per_split, int64_t splits, const scalar_t* __restrict__ a, int64_t a_sb,
                        int64_t a_sc, const scalar_t* __restrict__ z, const scalar_t* __restrict__ w,
                        const scalar_t* __restrict__ bias, int64_t B, int64_t Dz, int64_t Dc, Activation act,
                        bool from_y, acc_t* __restrict__ dst) {
  __shared__ acc_t part[kBwdRows][kBwdCols + 1];
  __shared__ acc_t pre[kBwdCols];
  const int64_t c_tiles = (Dc + kBwdCols - 1) / kBwdCols;
  int64_t bid = blockIdx.x;
  const int64_t ct = bid % c_tiles;
  bid /= c_tiles;
  const int64_t split = bid % splits;
  const int64_t b = bid / splits;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = ct * kBwdCols + tx;

  const int64_t p0 = split * per_split;
  const int64_t p1 = positions < p0 + per_split ? positions : p0 + per_split;
  acc_t s = acc_t(0);
  if (c < Dc) {
    const in_t* gp = g + b * g_sb + c * g_sc;
    for (int64_t p = p0 + ty; p < p1; p += kBwdRows) s += static_cast<acc_t>(gp[p * g_sp]);
  }
  part[ty][tx] = s;
  const bool finish = splits == 1;
  if (finish && from_y) {  // y for this tile's columns, one warp per column
    for (int j = ty; j < kBwdCols; j += kBwdRows) {
      const int64_t cc = ct * kBwdCols + j;
      acc_t y = acc_t(0);
      if (cc < Dc) {
        for (int64_t k = tx; k < Dz; k += 32) y += static_cast<acc_t>(z[b * Dz + k]) * static_cast<acc_t>(w[cc * Dz + k]);
      }
      y = warp_sum(y);
      if (tx == 0) pre[j] = y + (bias != nullptr && cc < Dc ? static_cast<acc_t>(bias[cc]) : acc_t(0));
    }
  }
  __syncthreads();
  if (ty == 0 && c < Dc) {
    acc_t t = acc_t(0);
#pragma unroll
    for (int r = 0; r < kBwdRows; ++r) t += part[r][tx];
    if (finish) {
      const acc_t d = from_y ? activation_grad<acc_t>(pre[tx], act)
                             : grad_from_activated<acc_t>(static_cast<acc_t>(a[b * a_sb + c * a_sc]), act);
      dst[b * Dc + c] = t * d;
    } else {
      dst[(split * B + b) * Dc + c] = t;
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

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
  TORCH_CHECK(D < INT_MAX, "pf_kernels: backproj_concat rows of ", D, " features are not supported");
  const int64_t n_rows = out.numel() / D;
  const int64_t positions = n_rows / B;
  // Rows of x with unit inner stride: a view where strides allow, a copy where not.
  at::Tensor x_rows = x.reshape({n_rows, Dx});
  if (Dx > 1 && x_rows.stride(1) != 1) x_rows = x_rows.contiguous();
  const int64_t x_row_stride = Dx > 0 ? x_rows.stride(0) : 0;
  const at::Tensor zc = z.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = has_bias(bias) ? bias->contiguous() : at::Tensor();

  // Grid: blocks per batch row so the GPU is filled, but each block writes at least 4 elements per
  // thread and a quarter as many elements as its context costs multiply-adds, at most 2^31 - 1.
  const int64_t min_rows = std::max({int64_t{1}, ceil_div(Dc * Dz, 4 * D), ceil_div(4 * kFwdThreads, D)});
  const int64_t max_rows = std::max<int64_t>(1, (INT_MAX - 1) / D);
  int64_t blocks_per_row = std::min(std::max<int64_t>(1, ceil_div(target_blocks(), B)), ceil_div(positions, min_rows));
  const int64_t rows_per_block = std::min(ceil_div(positions, blocks_per_row), max_rows);
  blocks_per_row = ceil_div(positions, rows_per_block);
  TORCH_CHECK(B * blocks_per_row <= INT_MAX, "pf_kernels: backproj_concat output too large for one launch");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "backproj_concat_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const size_t smem = static_cast<size_t>(Dc) * sizeof(scalar_t);
    const scalar_t* x_ptr = Dx > 0 ? x_rows.data_ptr<scalar_t>() : nullptr;
    const bool vec = D % kVec == 0 && Dx % kVec == 0 && x_row_stride % kVec == 0 &&
                     (x_ptr == nullptr || aligned16(x_ptr)) && aligned16(out.data_ptr());
    auto launch = [&](auto kernel) {
      if (smem > 48 * 1024) {
        const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
        TORCH_CHECK(smem <= limit, "pf_kernels: backproj_concat context of ", Dc, " features (", smem,
                    " bytes) exceeds the device's shared memory per block (", limit, " bytes)");
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      }
      kernel<<<static_cast<unsigned>(B * blocks_per_row), kFwdThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
          x_ptr, x_row_stride, zc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
          bc.defined() ? bc.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), positions, rows_per_block,
          blocks_per_row, Dx, Dz, Dc, act);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) {
      launch(backproj_concat_fwd_kernel<scalar_t, acc_t, kVec>);
    } else {
      launch(backproj_concat_fwd_kernel<scalar_t, acc_t, 1>);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backproj_concat_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& z, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, c10::string_view activation_name, int64_t x_features) {
  check_backproj_concat_backward(grad_out, out, z, weight, bias, x_features);
  TORCH_CHECK(grad_out.is_cuda(), "pf_kernels: backproj_concat_backward (CUDA) needs CUDA tensors");
  const int64_t B = z.size(0), Dz = z.size(1), Dc = weight.size(0), D = x_features + Dc;
  const Activation act = parse_activation(std::string(activation_name));
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::ScalarType dtype = grad_out.scalar_type(), acc = at::toOpMathType(dtype);
  const int64_t positions = B > 0 && D > 0 ? grad_out.numel() / (B * D) : 0;

  at::Tensor grad_pre;
  if (positions == 0 || Dc == 0) {
    grad_pre = at::zeros({B, Dc}, grad_out.options().dtype(acc));
  } else {
    grad_pre = at::empty({B, Dc}, grad_out.options().dtype(acc));
    const at::Tensor g = grad_out.reshape({B, positions, D}).narrow(-1, x_features, Dc);
    const at::Tensor a = out.reshape({B, positions, D}).select(1, 0).narrow(-1, x_features, Dc);
    const at::Tensor zc = z.contiguous(), wc = weight.contiguous();
    const at::Tensor bc = has_bias(bias) ? bias->contiguous() : at::Tensor();
    const int64_t c_tiles = ceil_div(Dc, kBwdCols);
    // Split positions across blocks only when B * c_tiles blocks cannot fill the GPU, and keep at
    // least 64 positions (8 per thread) per split.
    int64_t splits = std::min(std::max<int64_t>(1, ceil_div(target_blocks(), B * c_tiles)), ceil_div(positions, 64));
    const int64_t per_split = ceil_div(positions, splits);
    splits = ceil_div(positions, per_split);
    TORCH_CHECK(B * c_tiles * splits <= INT_MAX, "pf_kernels: backproj_concat_backward too large for one launch");
    const dim3 block(kBwdCols, kBwdRows);
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "backproj_concat_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* z_ptr = zc.data_ptr<scalar_t>();
      const scalar_t* w_ptr = wc.data_ptr<scalar_t>();
      const scalar_t* b_ptr = bc.defined() ? bc.data_ptr<scalar_t>() : nullptr;
      const scalar_t* a_ptr = a.data_ptr<scalar_t>();
      const bool from_y = act == Activation::Gelu ||
                          (sizeof(scalar_t) == 2 && (act == Activation::Tanh || act == Activation::Sigmoid));
      at::Tensor partial = splits > 1 ? at::empty({splits, B, Dc}, grad_pre.options()) : grad_pre;
      context_grad_kernel<scalar_t, scalar_t, acc_t>
          <<<static_cast<unsigned>(B * c_tiles * splits), block, 0, stream>>>(
              g.data_ptr<scalar_t>(), g.stride(0), g.stride(1), g.stride(2), positions, per_split, splits, a_ptr,
              a.stride(0), a.stride(1), z_ptr, w_ptr, b_ptr, B, Dz, Dc, act, from_y, partial.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (splits > 1) {  // sum the splits, times act'
        context_grad_kernel<acc_t, scalar_t, acc_t><<<static_cast<unsigned>(B * c_tiles), block, 0, stream>>>(
            partial.data_ptr<acc_t>(), Dc, B * Dc, 1, splits, splits, 1, a_ptr, a.stride(0), a.stride(1), z_ptr,
            w_ptr, b_ptr, B, Dz, Dc, act, from_y, grad_pre.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  // The small GEMMs in the accumulation dtype (cuBLAS), rounded once at the end.
  const at::Tensor w_acc = weight.to(acc), z_acc = z.to(acc);
  at::Tensor grad_z = at::mm(grad_pre, w_acc).to(dtype);
  at::Tensor grad_weight = at::mm(grad_pre.t(), z_acc).to(dtype);
  at::Tensor grad_bias = has_bias(bias) ? grad_pre.sum(0).to(dtype) : at::empty({0}, grad_out.options());
  return {grad_z, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(pf_kernels, CUDA, m) {
  m.impl("backproj_concat", &cuda::backproj_concat_cuda);
  m.impl("backproj_concat_backward", &cuda::backproj_concat_backward_cuda);
}

}  // namespace pf_kernels
