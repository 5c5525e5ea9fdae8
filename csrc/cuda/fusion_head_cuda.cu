// fusion_head on CUDA: z = act([h_1..h_K] @ W^T + b).
// Forward, where launches cost more than arithmetic (launch_plan.h: fusion_head_path), one launch: a
// tiled GEMM whose A operand is read from the K inputs' own pointers and strides (no concat), with bias
// and activation in the epilogue. Blocks loop over the output tiles (a 1-D grid: any batch, any Dz).
// fp16/bf16 use tensor cores (WMMA, fp32 accumulate), fp32/fp64 a SIMT kernel. Up to kMaxInputs inputs
// travel in the kernel's parameters; more are concatenated first (at::cat, one extra copy) and run as
// one input. A k-tile never straddles two inputs: each input's last tile is zero-padded instead, which
// costs at most one partial tile per input and keeps the loads free of per-element input lookups.
// Beyond, cuBLAS: the inputs gathered into one operand (one copy of B x D; K GEMMs accumulating into one
// fp32 output would instead move (K - 1) x B x Dz x 8 bytes and launch K times), one GEMM on tensor cores
// for 16-bit inputs, then one epilogue pass: bias and relu/none in cuBLAS's own epilogue (fp32, rounded
// once: relu commutes with that rounding, so our pass applies it in place), other activations from the
// GEMM's fp32 output with the bias, rounded once, as the reference.
// Backward, where launches cost more than arithmetic (launch_plan.h: fusion_head_backward): one launch of
// linear_backward_cuda.cu's kernel, grad_pre computed where it is read (two launches where act' needs y:
// the forward kernel writes y in fp32 first). Beyond: one elementwise kernel (grad_pre = grad_out * act',
// rounded to the input dtype), then cuBLAS GEMMs via ATen on the input dtype, as eager autograd.
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
#include "cuda/linear_backward.h"

namespace pf_kernels {
namespace cuda {
namespace {

using plan::kMaxInputs;

// ---- fp32 / fp64: SIMT, square tiles of T = 64 or 32, 256 threads of (T/16)^2 outputs each. ----
constexpr int kSimtBK = plan::kFusionSimtBK, kSimtThreads = 256;
constexpr int kSimtRowStep = kSimtThreads / kSimtBK;

// out_t: scalar_t, or acc_t for the backward's y (act none, no bias).
template <typename scalar_t, typename acc_t, typename out_t, int T>
__global__ void __launch_bounds__(kSimtThreads)
    fusion_head_simt_kernel(const __grid_constant__ LinearInputs in, const scalar_t* __restrict__ w, int64_t ldw,
                            const scalar_t* __restrict__ bias, out_t* __restrict__ out, int64_t M, int64_t N,
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
          out[m * N + n] = static_cast<out_t>(activate<acc_t>(y, act));
        }
      }
    }
  });  // the k loop ended with a barrier: the next tile may overwrite the operand tiles
}

// ---- fp16 / bf16: tensor cores. Square tiles of T = 64 or 32; 4 warps in 2 x 2, each a (T/2)^2 block
// of (T/32)^2 WMMA 16x16x16 fragments. ----
constexpr int kTcBK = plan::kFusionTcBK, kTcThreads = 128;
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

// A k-step's loads in registers (2 T / 4 values a thread) take 128-170 registers: capped so that 4 blocks
// (T = 32) or 3 (T = 64) fit an SM, the most that spill nothing on sm_80 and sm_90.
template <typename scalar_t, typename out_t, int T>
__global__ void __launch_bounds__(kTcThreads, T == 32 ? 4 : 3)
    fusion_head_wmma_kernel(const __grid_constant__ LinearInputs in, const scalar_t* __restrict__ w, int64_t ldw,
                            const scalar_t* __restrict__ bias, out_t* __restrict__ out, int64_t M, int64_t N,
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
          // Every load of the k-step into registers first, then the stores: the loads are in flight
          // together, one memory round trip per k-step (interleaved with the stores, the compiler
          // kept about four in sequence: sm_90 SASS).
          constexpr int kRows = T / kTcRowStep;
          scalar_t a_val[kRows], b_val[kRows];
#pragma unroll
          for (int e = 0; e < kRows; ++e) {
            const int rr = lr + e * kTcRowStep;
            a_val[e] = k_in && m0 + rr < M ? hp[e * h_step] : scalar_t(0.0f);
            b_val[e] = k_in && n0 + rr < N ? wp[e * w_step] : scalar_t(0.0f);
          }
#pragma unroll
          for (int e = 0; e < kRows; ++e) {
            const int rr = lr + e * kTcRowStep;
            As[rr * kTcLds + lk] = a_val[e];
            Bs[rr * kTcLds + lk] = b_val[e];
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
          out[m * N + n] = static_cast<out_t>(activate<float>(y, act));
        }
      }
      __syncthreads();  // the epilogue's reads of Cs before the next tile's operand tiles overwrite it
    });
  }
}

// The WMMA kernel serves 16-bit inputs from its arch up; else the SIMT kernel.
bool wmma_ok(at::ScalarType dtype) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int arch = prop->major * 100 + prop->minor * 10;
  return arch >= (dtype == at::kHalf ? WmmaType<at::Half>::min_arch : WmmaType<at::BFloat16>::min_arch);
}

// The one-launch forward kernel over up to kMaxInputs inputs: out = act(h W^T + bias) in out_t (scalar_t,
// or acc_t with act none and no bias: the backward's y). A template, so that `if constexpr` drops the
// tensor-core launch for fp32 / fp64.
template <typename scalar_t, typename out_t>
void launch_fusion_head(const LinearInputs& in, const scalar_t* w, int64_t ldw, const scalar_t* bias, out_t* out,
                        int64_t B, int64_t Dz, Activation act) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const plan::FusionHead p = plan::fusion_head(B, Dz, sm_count());
  const unsigned grid = launch_grid(p.grid);
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    if (wmma_ok(c10::CppTypeToScalarType<scalar_t>::value)) {
      auto kernel = p.tile == 32 ? fusion_head_wmma_kernel<scalar_t, out_t, 32> : fusion_head_wmma_kernel<scalar_t, out_t, 64>;
      kernel<<<grid, kTcThreads, 0, stream>>>(in, w, ldw, bias, out, B, Dz, p.m_tiles, p.n_tiles, act);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  auto kernel = p.tile == 32 ? fusion_head_simt_kernel<scalar_t, acc_t, out_t, 32>
                             : fusion_head_simt_kernel<scalar_t, acc_t, out_t, 64>;
  kernel<<<grid, kSimtThreads, 0, stream>>>(in, w, ldw, bias, out, B, Dz, p.m_tiles, p.n_tiles, act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out[r, n] = act(y[r, n] + bias[n]) rounded to scalar_t, over (rows, N) row-major; y in the accumulation
// dtype, or in scalar_t where cuBLAS added the bias and rounded (relu: in place, out == y).
template <typename in_t, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(plan::kElementwiseThreads)
    bias_act_kernel(const in_t* y, const scalar_t* __restrict__ bias, scalar_t* out, int64_t rows, int64_t N,
                    Activation act) {
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (plan::RowCursor k(start, static_cast<int64_t>(gridDim.x) * blockDim.x, N); k.row < rows; k.next(N)) {
    const int64_t i = k.row * N + k.col;
    acc_t v = static_cast<acc_t>(y[i]);
    if (bias != nullptr) v += static_cast<acc_t>(bias[k.col]);
    out[i] = static_cast<scalar_t>(activate<acc_t>(v, act));
  }
}

template <typename in_t, typename scalar_t>
void launch_bias_act(const at::Tensor& y, const at::Tensor& bias, at::Tensor& out, Activation act) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = out.size(0), N = out.size(1);
  const int64_t blocks = plan::elementwise_grid(rows * N, sm_count());
  const auto stream = at::cuda::getCurrentCUDAStream();
  bias_act_kernel<in_t, scalar_t, acc_t><<<launch_grid(blocks), plan::kElementwiseThreads, 0, stream>>>(
      y.data_ptr<in_t>(), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), rows, N,
      act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// [h_1..h_K] as one (B, D) GEMM operand: h_1 itself when K == 1 (cuBLAS takes its strides), else one copy.
at::Tensor gather_inputs(at::TensorList hs) { return hs.size() == 1 ? hs[0] : at::cat(hs, 1); }

// The cuBLAS forward (B, Dz >= 1).
at::Tensor fusion_head_gemm(at::TensorList hs, const at::Tensor& weight, const at::Tensor& bias, Activation act) {
  const at::Tensor h = gather_inputs(hs);
  const at::ScalarType dtype = h.scalar_type();
  at::Tensor out;
  if (act == Activation::None || act == Activation::Relu) {
    // cuBLAS adds the bias in its fp32 epilogue and rounds once, as the reference; relu (NaN kept, as
    // torch's) commutes with that rounding, so it runs in place on the rounded output.
    out = bias.defined() ? at::addmm(bias, h, weight.t()) : at::mm(h, weight.t());
    if (act == Activation::Relu) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusion_head_relu_cuda", [&] {
        launch_bias_act<scalar_t, scalar_t>(out, at::Tensor(), out, act);
      });
    }
    return out;
  }
  const at::Tensor y = mm_acc(h, weight.t());
  out = y.scalar_type() == dtype ? y : at::empty(y.sizes(), y.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusion_head_act_cuda", [&] {
    launch_bias_act<at::opmath_type<scalar_t>, scalar_t>(y, bias, out, act);
  });
  return out;
}

std::vector<int64_t> widths_of(at::TensorList hs) {
  std::vector<int64_t> widths;
  widths.reserve(hs.size());
  for (const at::Tensor& h : hs) widths.push_back(h.size(1));
  return widths;
}

at::Tensor fusion_head_cuda(at::TensorList hs_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            c10::string_view activation_name) {
  check_fusion_head(hs_in, weight, bias);
  TORCH_CHECK(hs_in[0].is_cuda(), "pf_kernels: fusion_head (CUDA) needs CUDA tensors, got hs[0] on ", hs_in[0].device());
  const Activation act = parse_activation(std::string(activation_name));
  const c10::cuda::CUDAGuard guard(hs_in[0].device());
  const int64_t B = hs_in[0].size(0), Dz = weight.size(0);
  const at::ScalarType dtype = hs_in[0].scalar_type();
  const at::Tensor bc = is_given(bias) ? bias->contiguous() : at::Tensor();
  if (B == 0 || Dz == 0) return at::empty({B, Dz}, hs_in[0].options());
  const std::vector<int64_t> widths = widths_of(hs_in);
  const plan::FusionHeadPath path =
      plan::fusion_head_path(B, Dz, widths.data(), static_cast<int64_t>(widths.size()), at::elementSize(dtype),
                             wmma_ok(dtype), act != Activation::None, sm_count());
  if (!use_kernel(!path.gemm)) return fusion_head_gemm(hs_in, weight, bc, act);

  at::Tensor out = at::empty({B, Dz}, hs_in[0].options());
  // More inputs than the kernel's parameters hold: one concatenated input instead.
  std::vector<at::Tensor> hs(hs_in.begin(), hs_in.end());
  if (hs.size() > static_cast<size_t>(kMaxInputs)) hs = {at::cat(hs_in, 1)};
  const LinearInputs in = linear_inputs(hs);
  const at::Tensor wc = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusion_head_cuda", [&] {
    launch_fusion_head<scalar_t, scalar_t>(in, wc.data_ptr<scalar_t>(), wc.size(1),
                                           bc.defined() ? bc.data_ptr<scalar_t>() : nullptr,
                                           out.data_ptr<scalar_t>(), B, Dz, act);
  });
  return out;
}

// The cuBLAS backward's grad_pre = grad_out * act'(y + bias), computed in the accumulation dtype and
// stored in the GEMMs' operand dtype; act' from the output, or from y where given.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(plan::kElementwiseThreads)
    fusion_head_grad_pre_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ o,
                                const acc_t* __restrict__ y, const scalar_t* __restrict__ bias,
                                scalar_t* __restrict__ dst, int64_t n, int64_t N, Activation act) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t d;
    if (y != nullptr) {
      const acc_t pre = bias != nullptr ? y[i] + static_cast<acc_t>(bias[i % N]) : y[i];
      d = activation_grad<acc_t>(pre, act);
    } else {
      d = grad_from_activated<acc_t>(static_cast<acc_t>(o[i]), act);
    }
    dst[i] = static_cast<scalar_t>(apply_act_grad(static_cast<acc_t>(g[i]), d, act));
  }
}

// The cuBLAS backward (sizes where arithmetic, not launches, sets the time), as eager autograd of the
// reference computes it: grad_pre rounded to the input dtype, every GEMM on the input dtype with fp32
// accumulation (tensor cores for 16-bit inputs; the fp32 GEMMs of 16-bit data this path ran before
// were 7x slower than eager on an H100 at B=4096, SIMT).
void fusion_head_backward_gemm(const at::Tensor& g, at::TensorList hs, const at::Tensor& weight,
                               const at::Tensor& bias, const at::Tensor& out, Activation act, bool from_y,
                               std::vector<at::Tensor>& grad_hs, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const int64_t B = g.size(0), Dz = g.size(1);
  const at::ScalarType dtype = g.scalar_type();
  // [h_1..h_K] once: the operand of grad_weight's single GEMM (and of y).
  const at::Tensor h = gather_inputs(hs);
  at::Tensor grad_pre = at::empty({B, Dz}, g.options());
  const int64_t n = grad_pre.numel();
  if (n > 0) {
    const at::Tensor y = from_y ? mm_acc(h, weight.t()).contiguous() : at::Tensor();
    const int64_t blocks = plan::elementwise_grid(n, sm_count());
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusion_head_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      fusion_head_grad_pre_kernel<scalar_t, acc_t><<<launch_grid(blocks), plan::kElementwiseThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), y.defined() ? y.data_ptr<acc_t>() : nullptr,
          y.defined() && bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, grad_pre.data_ptr<scalar_t>(), n,
          Dz, act);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    grad_pre.zero_();
  }
  // Each h_j's gradient is its own tensor, from its own block of W.
  int64_t offset = 0;
  for (const at::Tensor& hj : hs) {
    grad_hs.push_back(at::mm(grad_pre, weight.narrow(1, offset, hj.size(1))));
    offset += hj.size(1);
  }
  grad_weight = at::mm(grad_pre.t(), h);
  if (bias.defined()) grad_bias = grad_pre.sum(0);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> fusion_head_backward_cuda(
    const at::Tensor& grad_out, at::TensorList hs, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& out, c10::string_view activation_name) {
  const int64_t in_features = check_fusion_head_backward(grad_out, hs, weight, bias, out);
  TORCH_CHECK(grad_out.is_cuda(), "pf_kernels: fusion_head_backward (CUDA) needs CUDA tensors");
  const Activation act = parse_activation(std::string(activation_name));
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t B = hs[0].size(0), Dz = weight.size(0);
  const at::ScalarType dtype = hs[0].scalar_type(), acc = at::toOpMathType(dtype);
  // act' from the saved output where the autograd saves it for that (derivative_from_output), else
  // from y (gelu, tanh / sigmoid in 16-bit dtypes, no output given).
  const bool has_out = is_given(out);
  const bool from_y =
      act != Activation::None && (!has_out || !derivative_from_output(act, at::elementSize(dtype)));
  const at::Tensor g = grad_out.contiguous();
  // The kernels read act(y) where they do not compute y; none's derivative (1) ignores the value read,
  // so without a saved output they read grad_out (no branch in the GEMM's inner loop).
  const at::Tensor saved_out = has_out ? out->contiguous() : g;
  const at::Tensor bc = is_given(bias) ? bias->contiguous() : at::Tensor();
  const std::vector<int64_t> widths = widths_of(hs);
  const plan::FusionHeadBackward fp = plan::fusion_head_backward(
      B, Dz, widths.data(), static_cast<int64_t>(widths.size()), bc.defined(), from_y, at::elementSize(dtype),
      sm_count());
  std::vector<at::Tensor> grad_hs;
  at::Tensor grad_weight, grad_bias = at::empty({0}, grad_out.options());
  if (hs.size() <= static_cast<size_t>(kMaxInputs) && use_kernel(fp.linear.fused)) {
    // One launch (two with y): grad_pre computed where the GEMM tiles load it.
    const at::Tensor wc = weight.contiguous();
    GradPreSource src;
    src.grad_out = g;
    src.act = act;
    if (from_y && B > 0 && Dz > 0) {
      src.y = at::empty({B, Dz}, g.options().dtype(acc));
      src.y_bias = bc;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusion_head_y_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        launch_fusion_head<scalar_t, acc_t>(linear_inputs(hs), wc.data_ptr<scalar_t>(), wc.size(1), nullptr,
                                            src.y.data_ptr<acc_t>(), B, Dz, Activation::None);
      });
    } else {
      src.out = saved_out;
    }
    for (const at::Tensor& hj : hs) grad_hs.push_back(at::empty(hj.sizes(), g.options()));
    grad_weight = at::empty({Dz, in_features}, g.options());
    if (bc.defined()) grad_bias = at::empty({Dz}, g.options());
    linear_backward_fused(fp.linear, src, hs, wc, grad_hs, grad_weight, bc.defined() ? grad_bias : at::Tensor());
  } else {
    fusion_head_backward_gemm(g, hs, weight, bc, saved_out, act, from_y, grad_hs, grad_weight, grad_bias);
  }
  TORCH_CHECK(static_cast<int64_t>(grad_hs.size()) == static_cast<int64_t>(hs.size()),
              "pf_kernels: internal error: one gradient per input");
  return {grad_hs, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(pf_kernels, CUDA, m) {
  m.impl("fusion_head", &cuda::fusion_head_cuda);
  m.impl("fusion_head_backward", &cuda::fusion_head_backward_cuda);
}

}  // namespace pf_kernels
