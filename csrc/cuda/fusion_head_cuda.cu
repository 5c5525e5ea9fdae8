// fusion_head on CUDA: z = act([h_1..h_K] @ W^T + b).
// Forward, one launch: a tiled GEMM whose A operand is read from the K inputs' own pointers and
// strides (no concat), with bias and activation in the epilogue. Blocks loop over the output tiles
// (a 1-D grid: any batch, any Dz). fp16/bf16 use tensor cores (WMMA, fp32 accumulate), fp32/fp64 a
// SIMT kernel. Up to kMaxInputs inputs travel in the kernel's parameters; more are concatenated
// first (at::cat, one extra copy) and run as one input.
// A k-tile never straddles two inputs: each input's last tile is zero-padded instead, which costs
// at most one partial tile per input and keeps the loads free of per-element input lookups.
// Backward: one elementwise kernel (grad_pre = grad_out * act'), then cuBLAS GEMMs via ATen.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <climits>
#include <vector>

#include "activations.h"
#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/launch_plan.h"

namespace pf_kernels {
namespace cuda {
namespace {

constexpr int kMaxInputs = 8;

// The K inputs, passed by value (__grid_constant__: indexed in place, never copied to local memory).
struct FusionInputs {
  const void* ptr[kMaxInputs];
  int64_t row_stride[kMaxInputs];
  int64_t col_stride[kMaxInputs];
  int64_t width[kMaxInputs];
  int64_t offset[kMaxInputs];  // first column of this input's block of W
  int count;
};

// ---- fp32 / fp64: SIMT, square tiles of T = 64 or 32, 256 threads of (T/16)^2 outputs each. ----
constexpr int kSimtBK = 16, kSimtThreads = 256;
constexpr int kSimtRowStep = kSimtThreads / kSimtBK;

template <typename scalar_t, typename acc_t, int T>
__global__ void __launch_bounds__(kSimtThreads)
    fusion_head_simt_kernel(const __grid_constant__ FusionInputs in, const scalar_t* __restrict__ w, int64_t ldw,
                            const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, int64_t M, int64_t N,
                            int64_t m_tiles, int64_t n_tiles, Activation act) {
  constexpr int R = T / 16;  // outputs per thread along each dimension
  // k-major tiles; +4 keeps the transposed stores from hitting one bank.
  __shared__ acc_t As[kSimtBK][T + 4];
  __shared__ acc_t Bs[kSimtBK][T + 4];
  const int tid = threadIdx.x;
  const int tr = tid / 16, tc = tid % 16;  // thread owns rows tr + 16 i, columns tc + 16 j
  const int lk = tid % kSimtBK, lr = tid / kSimtBK;  // its loads: column lk of rows lr + 16 e
  plan::for_each_tile(blockIdx.x, gridDim.x, m_tiles, n_tiles, [&](int64_t m_tile, int64_t n_tile) {
    const int64_t m0 = m_tile * T, n0 = n_tile * T;
    acc_t acc[R][R];
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int j = 0; j < R; ++j) acc[i][j] = acc_t(0);

    for (int input = 0; input < in.count; ++input) {
      const scalar_t* h = static_cast<const scalar_t*>(in.ptr[input]);
      const int64_t rs = in.row_stride[input], cs = in.col_stride[input], width = in.width[input];
      const scalar_t* wj = w + in.offset[input];
      for (int64_t k0 = 0; k0 < width; k0 += kSimtBK) {
        // Thread loads column lk (fixed) of rows lr + 16 e: k fastest across threads, so coalesced.
        const bool k_in = k0 + lk < width;
        const scalar_t* hp = h + (m0 + lr) * rs + (k0 + lk) * cs;
        const scalar_t* wp = wj + (n0 + lr) * ldw + k0 + lk;
#pragma unroll
        for (int e = 0; e < T / kSimtRowStep; ++e) {
          const int rr = lr + e * kSimtRowStep;
          As[lk][rr] = k_in && m0 + rr < M ? static_cast<acc_t>(hp[e * kSimtRowStep * rs]) : acc_t(0);
          Bs[lk][rr] = k_in && n0 + rr < N ? static_cast<acc_t>(wp[e * kSimtRowStep * ldw]) : acc_t(0);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kSimtBK; ++kk) {
          acc_t a[R], b[R];
#pragma unroll
          for (int i = 0; i < R; ++i) a[i] = As[kk][tr + 16 * i];
#pragma unroll
          for (int j = 0; j < R; ++j) b[j] = Bs[kk][tc + 16 * j];
#pragma unroll
          for (int i = 0; i < R; ++i)
#pragma unroll
            for (int j = 0; j < R; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
      }
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t m = m0 + tr + 16 * i;
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const int64_t n = n0 + tc + 16 * j;
        if (m < M && n < N) {
          const acc_t y = acc[i][j] + (bias != nullptr ? static_cast<acc_t>(bias[n]) : acc_t(0));
          out[m * N + n] = static_cast<scalar_t>(activate<acc_t>(y, act));
        }
      }
    }
  });  // the k loop ended with a barrier: the next tile may overwrite the operand tiles
}

// ---- fp16 / bf16: tensor cores. Square tiles of T = 64 or 32; 4 warps in 2 x 2, each a (T/2)^2 block
// of (T/32)^2 WMMA 16x16x16 fragments. ----
constexpr int kTcBK = 32, kTcThreads = 128;
constexpr int kTcRowStep = kTcThreads / kTcBK;
constexpr int kTcLds = kTcBK + 8;  // 16-bit elements; a multiple of 8 as WMMA needs, and off the banks

// Operand tiles (2 T x BK, 16-bit), then reused by the fp32 epilogue tile (T x (T + 4)).
constexpr int tc_smem_bytes(int t) {
  return (2 * t * kTcLds * 2) > (t * (t + 4) * 4) ? (2 * t * kTcLds * 2) : (t * (t + 4) * 4);
}

template <typename scalar_t>
struct WmmaType;
template <>
struct WmmaType<at::Half> {
  using type = __half;
  static constexpr int min_arch = 700;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
  static constexpr int min_arch = 800;
};

template <typename scalar_t, int T>
__global__ void __launch_bounds__(kTcThreads)
    fusion_head_wmma_kernel(const __grid_constant__ FusionInputs in, const scalar_t* __restrict__ w, int64_t ldw,
                            const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, int64_t M, int64_t N,
                            int64_t m_tiles, int64_t n_tiles, Activation act) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // bf16 WMMA needs sm_80; the host never launches this below sm_80 (it uses the SIMT kernel).
  if constexpr (WmmaType<scalar_t>::min_arch > 700) {
    __trap();
  } else
#endif
  {
    using namespace nvcuda;
    using mma_t = typename WmmaType<scalar_t>::type;
    constexpr int F = T / 32;      // 16 x 16 fragments per warp along each dimension
    constexpr int kLdc = T + 4;  // floats
    __shared__ __align__(32) unsigned char smem[tc_smem_bytes(T)];
    scalar_t* As = reinterpret_cast<scalar_t*>(smem);  // (BM, BK) row-major
    scalar_t* Bs = As + T * kTcLds;                    // (BN, BK): B = W^T read column-major
    float* Cs = reinterpret_cast<float*>(smem);        // epilogue, reuses the operand tiles
    const int tid = threadIdx.x, warp = tid / 32;
    const int wm = warp / 2, wn = warp % 2;
    const int lk = tid % kTcBK, lr = tid / kTcBK;  // loads: column lk of rows lr + 4 e
    plan::for_each_tile(blockIdx.x, gridDim.x, m_tiles, n_tiles, [&](int64_t m_tile, int64_t n_tile) {
      const int64_t m0 = m_tile * T, n0 = n_tile * T;

      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[F][F];
#pragma unroll
      for (int i = 0; i < F; ++i)
#pragma unroll
        for (int j = 0; j < F; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

      for (int input = 0; input < in.count; ++input) {
        const scalar_t* h = static_cast<const scalar_t*>(in.ptr[input]);
        const int64_t rs = in.row_stride[input], cs = in.col_stride[input], width = in.width[input];
        const scalar_t* wj = w + in.offset[input];
        const int64_t h_step = kTcRowStep * rs, w_step = kTcRowStep * ldw;
        for (int64_t k0 = 0; k0 < width; k0 += kTcBK) {
          const bool k_in = k0 + lk < width;
          const scalar_t* hp = h + (m0 + lr) * rs + (k0 + lk) * cs;
          const scalar_t* wp = wj + (n0 + lr) * ldw + k0 + lk;
          // Partly unrolled, pointers stepped: fully unrolled, the 32 hoisted 64-bit offsets spill.
#pragma unroll 4
          for (int e = 0; e < T / kTcRowStep; ++e) {
            const int rr = lr + e * kTcRowStep;
            As[rr * kTcLds + lk] = k_in && m0 + rr < M ? *hp : scalar_t(0.0f);
            Bs[rr * kTcLds + lk] = k_in && n0 + rr < N ? *wp : scalar_t(0.0f);
            hp += h_step;
            wp += w_step;
          }
          __syncthreads();
#pragma unroll
          for (int ks = 0; ks < kTcBK; ks += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, mma_t, wmma::row_major> fa[F];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, mma_t, wmma::col_major> fb[F];
#pragma unroll
            for (int i = 0; i < F; ++i)
              wmma::load_matrix_sync(fa[i], reinterpret_cast<const mma_t*>(As + (wm * (T / 2) + i * 16) * kTcLds + ks), kTcLds);
#pragma unroll
            for (int j = 0; j < F; ++j)
              wmma::load_matrix_sync(fb[j], reinterpret_cast<const mma_t*>(Bs + (wn * (T / 2) + j * 16) * kTcLds + ks), kTcLds);
#pragma unroll
            for (int i = 0; i < F; ++i)
#pragma unroll
              for (int j = 0; j < F; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
          }
          __syncthreads();
        }
      }
#pragma unroll
      for (int i = 0; i < F; ++i)
#pragma unroll
        for (int j = 0; j < F; ++j)
          wmma::store_matrix_sync(Cs + (wm * (T / 2) + i * 16) * kLdc + wn * (T / 2) + j * 16, acc[i][j], kLdc,
                                  wmma::mem_row_major);
      __syncthreads();
      for (int e = tid; e < T * T; e += kTcThreads) {
        const int r = e / T, c = e % T;
        const int64_t m = m0 + r, n = n0 + c;
        if (m < M && n < N) {
          const float y = Cs[r * kLdc + c] + (bias != nullptr ? static_cast<float>(bias[n]) : 0.0f);
          out[m * N + n] = static_cast<scalar_t>(activate<float>(y, act));
        }
      }
      __syncthreads();  // the epilogue's reads of Cs before the next tile's operand tiles overwrite it
    });
  }
}

// A template, so that `if constexpr` drops the tensor-core launch for fp32 / fp64.
template <typename scalar_t>
void launch_fusion_head(const FusionInputs& in, const at::Tensor& wc, const at::Tensor& bc, at::Tensor& out,
                        int64_t in_features, int64_t B, int64_t Dz, Activation act) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const scalar_t* w_ptr = wc.data_ptr<scalar_t>();
  const scalar_t* b_ptr = bc.defined() ? bc.data_ptr<scalar_t>() : nullptr;
  scalar_t* o_ptr = out.data_ptr<scalar_t>();
  const plan::FusionHead p = plan::fusion_head(B, Dz, sm_count());
  const unsigned grid = launch_grid(p.grid);
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    if (prop->major * 100 + prop->minor * 10 >= WmmaType<scalar_t>::min_arch) {
      auto kernel = p.tile == 32 ? fusion_head_wmma_kernel<scalar_t, 32> : fusion_head_wmma_kernel<scalar_t, 64>;
      kernel<<<grid, kTcThreads, 0, stream>>>(in, w_ptr, in_features, b_ptr, o_ptr, B, Dz, p.m_tiles, p.n_tiles, act);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  auto kernel =
      p.tile == 32 ? fusion_head_simt_kernel<scalar_t, acc_t, 32> : fusion_head_simt_kernel<scalar_t, acc_t, 64>;
  kernel<<<grid, kSimtThreads, 0, stream>>>(in, w_ptr, in_features, b_ptr, o_ptr, B, Dz, p.m_tiles, p.n_tiles, act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor fusion_head_cuda(at::TensorList hs_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            c10::string_view activation_name) {
  const int64_t in_features = check_fusion_head(hs_in, weight, bias);
  TORCH_CHECK(hs_in[0].is_cuda(), "pf_kernels: fusion_head (CUDA) needs CUDA tensors, got hs[0] on ", hs_in[0].device());
  const Activation act = parse_activation(std::string(activation_name));
  const c10::cuda::CUDAGuard guard(hs_in[0].device());
  const int64_t B = hs_in[0].size(0), Dz = weight.size(0);
  at::Tensor out = at::empty({B, Dz}, hs_in[0].options());
  if (out.numel() == 0) return out;
  // More inputs than the kernel's parameters hold: one concatenated input instead.
  std::vector<at::Tensor> hs(hs_in.begin(), hs_in.end());
  if (hs.size() > static_cast<size_t>(kMaxInputs)) hs = {at::cat(hs_in, 1)};
  FusionInputs in{};
  int64_t offset = 0;
  for (size_t j = 0; j < hs.size(); ++j) {
    in.ptr[j] = hs[j].data_ptr();
    in.row_stride[j] = hs[j].stride(0);
    in.col_stride[j] = hs[j].stride(1);
    in.width[j] = hs[j].size(1);
    in.offset[j] = offset;
    offset += hs[j].size(1);
  }
  in.count = static_cast<int>(hs.size());
  const at::Tensor wc = weight.contiguous();
  const at::Tensor bc = has_bias(bias) ? bias->contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fusion_head_cuda", [&] {
    launch_fusion_head<scalar_t>(in, wc, bc, out, in_features, B, Dz, act);
  });
  return out;
}

// grad_pre = grad_out * act'(y) in the accumulation dtype; act' from the output, or from y where
// given (gelu; tanh / sigmoid in 16-bit dtypes, whose rounded outputs lose act' near saturation).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(plan::kElementwiseThreads)
    fusion_head_grad_pre_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ o,
                                const acc_t* __restrict__ y, acc_t* __restrict__ dst, int64_t n, Activation act) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t d = y != nullptr ? activation_grad<acc_t>(y[i], act)
                                 : grad_from_activated<acc_t>(static_cast<acc_t>(o[i]), act);
    dst[i] = static_cast<acc_t>(g[i]) * d;
  }
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> fusion_head_backward_cuda(
    const at::Tensor& grad_out, at::TensorList hs, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& out, c10::string_view activation_name) {
  const int64_t in_features = check_fusion_head_backward(grad_out, hs, weight, bias, out);
  const int64_t B = hs[0].size(0), Dz = weight.size(0);
  TORCH_CHECK(grad_out.is_cuda(), "pf_kernels: fusion_head_backward (CUDA) needs CUDA tensors");
  const Activation act = parse_activation(std::string(activation_name));
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::ScalarType dtype = hs[0].scalar_type(), acc = at::toOpMathType(dtype);
  // [h_1..h_K] once in the accumulation dtype: the operand of grad_weight's single GEMM (and of y).
  const at::Tensor h = hs.size() == 1 ? hs[0].to(acc) : at::cat(hs, 1).to(acc);
  const at::Tensor w = weight.to(acc);

  at::Tensor grad_pre = at::empty({B, Dz}, grad_out.options().dtype(acc));
  const int64_t n = grad_pre.numel();
  if (n > 0) {
    const at::Tensor g = grad_out.contiguous(), o = out.contiguous();
    const bool from_y = act == Activation::Gelu ||
                        (at::elementSize(dtype) == 2 && (act == Activation::Tanh || act == Activation::Sigmoid));
    const at::Tensor y = from_y
                             ? (has_bias(bias) ? at::addmm(bias->to(acc), h, w.t()) : at::mm(h, w.t())).contiguous()
                             : at::Tensor();
    const int64_t blocks = plan::elementwise_grid(n, sm_count());
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusion_head_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      fusion_head_grad_pre_kernel<scalar_t, acc_t><<<launch_grid(blocks), plan::kElementwiseThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), y.defined() ? y.data_ptr<acc_t>() : nullptr,
          grad_pre.data_ptr<acc_t>(), n, act);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    grad_pre.zero_();
  }
  // Each h_j's gradient is its own tensor, from its own block of W.
  std::vector<at::Tensor> grad_hs;
  grad_hs.reserve(hs.size());
  int64_t offset = 0;
  for (const at::Tensor& hj : hs) {
    grad_hs.push_back(at::mm(grad_pre, w.narrow(1, offset, hj.size(1))).to(dtype));
    offset += hj.size(1);
  }
  TORCH_CHECK(offset == in_features, "pf_kernels: internal error: input widths do not add up");
  at::Tensor grad_weight = at::mm(grad_pre.t(), h).to(dtype);
  at::Tensor grad_bias = has_bias(bias) ? grad_pre.sum(0).to(dtype) : at::empty({0}, grad_out.options());
  return {grad_hs, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(pf_kernels, CUDA, m) {
  m.impl("fusion_head", &cuda::fusion_head_cuda);
  m.impl("fusion_head_backward", &cuda::fusion_head_backward_cuda);
}

}  // namespace pf_kernels
