// The backward of y = [h_1..h_K] W^T + b in one launch: grad_h_j = grad_y W_j, grad_W = grad_y^T h,
// grad_b = column sums of grad_y, each a tiled GEMM task of one kernel (launch_plan.h: linear_backward).
// grad_y is computed where it is loaded (grad_out * act'), so fusion_head's whole backward is this one
// launch. SIMT in the accumulation dtype for every input dtype, rounded once at
// the end: it serves the sizes where launches, not arithmetic, set the time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "activations.h"
#include "cuda/common.cuh"
#include "cuda/launch_plan.h"
#include "cuda/linear_backward.h"

namespace pf_kernels {
namespace cuda {
namespace {

constexpr int T = plan::kLinearTile;  // output tile T x T, k-tile T
constexpr int kThreads = 256;         // 16 x 16 threads, 2 x 2 outputs each
constexpr int kLoadRows = kThreads / T;

template <typename scalar_t, typename acc_t>
struct LinearBackwardArgs {
  const scalar_t* g;      // (B, N)
  const scalar_t* o;      // (B, N) act(y), when y is null
  const acc_t* y;         // (B, N) y less the bias, or null
  const scalar_t* y_bias;
  Activation act;
  const scalar_t* w;  // (N, D) contiguous
  int64_t D;
  LinearInputs in;                        // h_j (B, D_j), offset = first column of W_j
  scalar_t* grad_in[plan::kMaxInputs];    // (B, D_j) contiguous
  scalar_t* grad_w;                       // (N, D) contiguous
  scalar_t* grad_b;                       // (N,) or null
  int64_t col_start[plan::kMaxInputs + 1];  // first column tile of input j; [count] = the bias tile
  int64_t B, N;
  int64_t x_m_tiles, x_cols, w_m_tiles, w_cols, w_shift;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    linear_backward_kernel(const __grid_constant__ LinearBackwardArgs<scalar_t, acc_t> a) {
  // Operand tiles k-major: As[k][m], Bs[k][c]; +1 keeps part 0's transposed stores off one bank.
  __shared__ acc_t As[T][T + 1];
  __shared__ acc_t Bs[T][T + 1];
  const int tid = threadIdx.x;
  const int tr = tid / 16, tc = tid % 16;           // outputs: rows tr + 16 i, columns tc + 16 j
  const int lane = tid % T, lrow = tid / T;         // loads: lane along the contiguous dim, rows lrow + 8 e
  plan::for_each_linear_backward_task(
      blockIdx.x, gridDim.x, a.x_m_tiles, a.x_cols, a.w_m_tiles, a.w_cols, a.w_shift,
      [&](int part, int64_t m_tile, int64_t col_tile) {
        int j = 0;  // the input this column tile belongs to; j == count: the bias tile (part 1 only)
        while (j < a.in.count && col_tile >= a.col_start[j + 1]) ++j;
        const bool bias_tile = j == a.in.count;
        const int64_t width = bias_tile ? 1 : a.in.width[j];
        const int64_t c0 = (col_tile - a.col_start[j]) * T, m0 = m_tile * T;
        const scalar_t* h = bias_tile ? nullptr : static_cast<const scalar_t*>(a.in.ptr[j]);
        const int64_t rs = bias_tile ? 0 : a.in.row_stride[j], cs = bias_tile ? 0 : a.in.col_stride[j];
        const int64_t w_col = bias_tile ? 0 : a.in.offset[j];
        acc_t acc[2][2] = {{acc_t(0), acc_t(0)}, {acc_t(0), acc_t(0)}};
        const int64_t depth = part == 0 ? a.N : a.B;  // k runs over N (part 0) or B (part 1)
        for (int64_t k0 = 0; k0 < depth; k0 += T) {
          // Every load of the k-step first (grad_out, the activation's input, the other operand),
          // then grad_y and the stores: the loads are in flight together, one memory round trip per
          // k-step (loaded and stored row by row, each waited for the last: sm_90 SASS).
          constexpr int E = T / kLoadRows;
          acc_t g_v[E], s_v[E], b_v[E];  // grad_out, y or act(y), and B's value
          bool in_a[E];
          // n: grad_y's column, the same for every row this thread loads
          const int64_t n = part == 0 ? k0 + lane : m0 + lane;
          const bool add_bias = a.y != nullptr && a.y_bias != nullptr;
          const acc_t n_bias = add_bias && n < a.N ? static_cast<acc_t>(a.y_bias[n]) : acc_t(0);
          if (part == 0) {
            // A[b][n] = grad_y[m0 + r][k0 + lane], B[n][c] = W[k0 + r][w_col + c0 + lane].
            const int64_t c = c0 + lane;
#pragma unroll
            for (int e = 0; e < E; ++e) {
              const int r = lrow + e * kLoadRows;
              const int64_t b = m0 + r, kn = k0 + r;
              in_a[e] = b < a.B && n < a.N;
              g_v[e] = in_a[e] ? static_cast<acc_t>(a.g[b * a.N + n]) : acc_t(0);
              s_v[e] = !in_a[e] ? acc_t(0) : a.y != nullptr ? a.y[b * a.N + n] : static_cast<acc_t>(a.o[b * a.N + n]);
              b_v[e] = kn < a.N && c < width ? static_cast<acc_t>(a.w[kn * a.D + w_col + c]) : acc_t(0);
            }
          } else {
            // A[n][b] = grad_y[k0 + r][m0 + lane], B[b][c] = h_j[k0 + r][c0 + lane] or 1.
            const int64_t c = c0 + lane;
#pragma unroll
            for (int e = 0; e < E; ++e) {
              const int r = lrow + e * kLoadRows;
              const int64_t b = k0 + r;
              in_a[e] = b < a.B && n < a.N;
              g_v[e] = in_a[e] ? static_cast<acc_t>(a.g[b * a.N + n]) : acc_t(0);
              s_v[e] = !in_a[e] ? acc_t(0) : a.y != nullptr ? a.y[b * a.N + n] : static_cast<acc_t>(a.o[b * a.N + n]);
              b_v[e] = b < a.B && c < width ? (bias_tile ? acc_t(1) : static_cast<acc_t>(h[b * rs + c * cs])) : acc_t(0);
            }
          }
#pragma unroll
          for (int e = 0; e < E; ++e) {
            const int r = lrow + e * kLoadRows;
            // grad_y = grad_out * act', as the reference computes it (y plus the bias, or act(y))
            const acc_t d = a.y != nullptr ? activation_grad<acc_t>(add_bias ? s_v[e] + n_bias : s_v[e], a.act)
                                           : grad_from_activated<acc_t>(s_v[e], a.act);
            const acc_t grad_y = in_a[e] ? apply_act_grad(g_v[e], d, a.act) : acc_t(0);
            if (part == 0) {
              As[lane][r] = grad_y;
              Bs[r][lane] = b_v[e];
            } else {
              As[r][lane] = grad_y;
              Bs[r][lane] = b_v[e];
            }
          }
          __syncthreads();
#pragma unroll 8
          for (int kk = 0; kk < T; ++kk) {
            const acc_t a0 = As[kk][tr], a1 = As[kk][tr + 16];
            const acc_t b0 = Bs[kk][tc], b1 = Bs[kk][tc + 16];
            acc[0][0] += a0 * b0;
            acc[0][1] += a0 * b1;
            acc[1][0] += a1 * b0;
            acc[1][1] += a1 * b1;
          }
          __syncthreads();  // before the next k-tile (or task) overwrites the operand tiles
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int64_t m = m0 + tr + 16 * i;
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {
            const int64_t c = c0 + tc + 16 * jj;
            if (c >= width) continue;
            const scalar_t v = static_cast<scalar_t>(acc[i][jj]);
            if (part == 0) {
              if (m < a.B) a.grad_in[j][m * width + c] = v;
            } else if (m < a.N) {
              if (bias_tile) {
                a.grad_b[m] = v;
              } else {
                a.grad_w[m * a.D + w_col + c] = v;
              }
            }
          }
        }
      });
}

}  // namespace

void linear_backward_fused(const plan::LinearBackward& p, const GradPreSource& src, at::TensorList hs,
                           const at::Tensor& weight, at::TensorList grad_hs, const at::Tensor& grad_weight,
                           const at::Tensor& grad_bias) {
  const int64_t B = hs[0].size(0), N = weight.size(0), D = weight.size(1);
  TORCH_CHECK(weight.is_contiguous() && grad_weight.is_contiguous() && grad_hs.size() == hs.size(),
              "pf_kernels: internal error: linear_backward_fused takes a contiguous weight and one gradient per input");
  if (p.tasks == 0) return;
  const LinearInputs in = linear_inputs(hs);
  const unsigned grid = launch_grid(p.grid);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hs[0].scalar_type(), "linear_backward_fused", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LinearBackwardArgs<scalar_t, acc_t> a{};
    a.g = src.grad_out.data_ptr<scalar_t>();
    a.o = src.out.defined() ? src.out.data_ptr<scalar_t>() : nullptr;
    a.y = src.y.defined() ? src.y.data_ptr<acc_t>() : nullptr;
    a.y_bias = src.y_bias.defined() ? src.y_bias.data_ptr<scalar_t>() : nullptr;
    a.act = src.act;
    a.w = weight.data_ptr<scalar_t>();
    a.D = D;
    a.in = in;
    int64_t tiles = 0;
    for (int j = 0; j < in.count; ++j) {
      TORCH_CHECK(grad_hs[j].is_contiguous() && grad_hs[j].sizes() == hs[j].sizes(),
                  "pf_kernels: internal error: grad_hs[", j, "] must be contiguous ", hs[j].sizes());
      a.grad_in[j] = grad_hs[j].data_ptr<scalar_t>();
      a.col_start[j] = tiles;
      tiles += plan::ceil_div(in.width[j], T);
    }
    a.col_start[in.count] = tiles;
    TORCH_CHECK(tiles == p.x_cols && p.w_cols == tiles + (grad_bias.defined() ? 1 : 0),
                "pf_kernels: internal error: the plan's column tiles do not match the inputs");
    a.grad_w = grad_weight.data_ptr<scalar_t>();
    a.grad_b = grad_bias.defined() ? grad_bias.data_ptr<scalar_t>() : nullptr;
    a.B = B;
    a.N = N;
    a.x_m_tiles = p.x_m_tiles;
    a.x_cols = p.x_cols;
    a.w_m_tiles = p.w_m_tiles;
    a.w_cols = p.w_cols;
    a.w_shift = p.x_tasks % grid;  // with the grid as launched (launch_grid may cap it)
    linear_backward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace pf_kernels
