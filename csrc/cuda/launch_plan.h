// Launch configurations of the CUDA kernels, as plain C++: compiled into the CUDA kernels' host code
// and, through pf_kernels::_launch_plan (csrc/ops/launch_plan.cpp), into every build, so the CPU tests
// check the arithmetic at the limits (any batch, any Dc, more than 2^31 elements) without a GPU.
// The loops over tasks that the kernels run (for_each_*, RowCursor) live here too, host and device
// alike, so the tests walk the kernels' own loops.
#pragma once

#include <algorithm>
#include <cstdint>

#include "activations.h"  // PF_HOST_DEVICE

// The for_each_* templates take device lambdas in the kernels and host lambdas in the tests.
#if defined(__CUDACC__)
#define PF_EXEC_CHECK_DISABLE _Pragma("nv_exec_check_disable")
#else
#define PF_EXEC_CHECK_DISABLE
#endif

namespace pf_kernels {
namespace plan {

constexpr int64_t kMaxGridX = 2147483647;  // gridDim.x limit; y and z stop at 65535, so never used
constexpr int kCopyThreads = 256;          // backproj_concat forward block
constexpr int64_t kContextChunk = 2048;    // context features staged in shared memory at a time
constexpr int kBwdCols = 32, kBwdRows = 8;  // backproj_concat backward block: 32 features x 8 rows
// The context act(z W^T + b) is computed inside the copy kernel (no GEMM launch) while each task's
// share of it stays small: at most kInlineTaskMacs multiply-adds per task (~1 us of one block) and
// kInlineTotalMacs over the launch (~1-2 us of L1-bound work on a full GPU). Beyond, a cuBLAS GEMM
// computes it once and the kernels read it.
constexpr int64_t kInlineTaskMacs = int64_t{1} << 15;
constexpr int64_t kInlineTotalMacs = int64_t{1} << 23;

PF_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Enough blocks to fill the GPU a few times over.
inline int64_t target_blocks(int64_t sm_count) { return 8 * std::max<int64_t>(1, sm_count); }

// Kernels loop over their tasks with a grid stride, so any task count runs in one launch.
inline int64_t grid_for(int64_t tasks) { return std::max<int64_t>(1, std::min(tasks, kMaxGridX)); }

// ---- backproj_concat forward: tasks are (batch row, run of positions). ----
struct BackprojForward {
  bool inline_context = false;  // dot products in the kernel; else a GEMM first
  int64_t group = 1;            // lanes per context feature for the inline dot products (power of 2, <= 32)
  int64_t rows_per_task = 0;    // positions per task
  int64_t tasks_per_row = 0;    // tasks per batch row
  int64_t tasks = 0;
  int64_t grid = 0;
};

// B >= 1, positions >= 1, Dx + Dc >= 1.
inline BackprojForward backproj_forward(int64_t B, int64_t positions, int64_t Dx, int64_t Dz, int64_t Dc,
                                        int64_t sm_count) {
  const int64_t D = Dx + Dc;
  // Each task writes at least 4 elements per thread.
  const int64_t base_rows = ceil_div(4 * kCopyThreads, std::max<int64_t>(D, 1));
  BackprojForward p;
  auto split = [&](int64_t min_rows) {
    p.tasks_per_row = std::max<int64_t>(
        1, std::min(ceil_div(target_blocks(sm_count), B), ceil_div(positions, std::max<int64_t>(1, min_rows))));
    p.rows_per_task = ceil_div(positions, p.tasks_per_row);
    p.tasks_per_row = ceil_div(positions, p.rows_per_task);
    p.tasks = B * p.tasks_per_row;
  };
  const int64_t macs = Dc * Dz;  // per task, inline
  if (Dc == 0 || Dz == 0) {      // nothing to multiply: the context is act(bias) or empty
    split(base_rows);
    p.inline_context = true;
  } else if (macs <= kInlineTaskMacs) {
    // Each task also writes at least a quarter as many elements as its dot products cost.
    split(std::max(base_rows, ceil_div(macs, 4 * D)));
    p.inline_context = p.tasks <= kInlineTotalMacs / macs;
  }
  if (!p.inline_context) split(base_rows);
  // Lanes per feature: about 8 multiply-adds per lane, a power of 2 up to a warp.
  const int64_t per_lane = ceil_div(std::max<int64_t>(Dz, 1), 8);
  while (p.group < 32 && p.group < per_lane) p.group *= 2;
  p.grid = grid_for(p.tasks);
  return p;
}

// One thread's (or block's) walk over a (rows x width) grid of items, row-major, from item `start` in
// steps of `step` (0 <= start < step < 2^32, width >= 1): (row, col) advance in 64 bits with no
// division per step, and at most one 32-bit division at the start (a 64-bit one is a call, whose
// saved registers spill). Rows and widths may exceed 2^32.
struct RowCursor {
  int64_t row, col, step_rows, step_cols;
  PF_HOST_DEVICE RowCursor(int64_t start, int64_t step, int64_t width) {
    if (width > step) {  // then start < width too
      row = 0;
      col = start;
      step_rows = 0;
      step_cols = step;
    } else {
      const uint32_t w = static_cast<uint32_t>(width), a = static_cast<uint32_t>(start),
                     s = static_cast<uint32_t>(step);
      row = a / w;
      col = a % w;
      step_rows = s / w;
      step_cols = s % w;
    }
  }
  PF_HOST_DEVICE void next(int64_t width) {
    row += step_rows;
    col += step_cols;
    if (col >= width) {
      col -= width;
      ++row;
    }
  }
};

// The forward's tasks that block `block` of `grid` runs, in order: f(b, first position, positions).
// The kernel and the host tests run this same loop.
PF_EXEC_CHECK_DISABLE
template <typename F>
PF_HOST_DEVICE void for_each_backproj_task(int64_t block, int64_t grid, int64_t B, int64_t positions,
                                           int64_t rows_per_task, int64_t tasks_per_row, F&& f) {
  for (RowCursor t(block, grid, tasks_per_row); t.row < B; t.next(tasks_per_row)) {
    const int64_t row0 = t.col * rows_per_task;
    f(t.row, row0, positions - row0 < rows_per_task ? positions - row0 : rows_per_task);
  }
}

// 16-byte vectors of V elements for both parts of every row: x's rows and the output's rows start
// 16-byte aligned and every part's width is a multiple of V. Addresses are taken modulo 16.
inline bool backproj_vector_ok(int64_t Dx, int64_t Dc, int64_t x_row_stride, int64_t x_addr, int64_t out_addr,
                               int64_t elem_size) {
  const int64_t V = 16 / elem_size;
  return Dx % V == 0 && Dc % V == 0 && kContextChunk % V == 0 && out_addr % 16 == 0 &&
         (Dx == 0 || (x_row_stride % V == 0 && x_addr % 16 == 0));
}

// ---- backproj_concat backward: tasks are (batch row, split of positions, tile of 32 features). ----
enum YSource : int64_t { kYFromOutput = 0, kYFromGemm = 1, kYInline = 2 };

struct BackprojBackward {
  int64_t c_tiles = 0, splits = 1, per_split = 0;
  int64_t tasks = 0, grid = 0;                // the first launch
  int64_t finish_tasks = 0, finish_grid = 0;  // the second, when splits > 1 (sums the splits)
  int64_t y_source = kYFromOutput;            // where act' reads y from (from_y only)
};

// B >= 1, positions >= 1, Dc >= 1.
inline BackprojBackward backproj_backward(int64_t B, int64_t positions, int64_t Dz, int64_t Dc, bool from_y,
                                          int64_t sm_count) {
  BackprojBackward p;
  p.c_tiles = ceil_div(Dc, kBwdCols);
  // Split positions across blocks only when B * c_tiles blocks cannot fill the GPU, and keep at
  // least 64 positions (8 per thread) per split.
  p.splits = std::max<int64_t>(
      1, std::min(ceil_div(target_blocks(sm_count), B * p.c_tiles), ceil_div(positions, 64)));
  p.per_split = ceil_div(positions, p.splits);
  p.splits = ceil_div(positions, p.per_split);
  p.tasks = B * p.c_tiles * p.splits;
  p.grid = grid_for(p.tasks);
  if (p.splits > 1) {
    p.finish_tasks = B * p.c_tiles;
    p.finish_grid = grid_for(p.finish_tasks);
  }
  if (from_y) {
    // y inline in the finishing launch: B * c_tiles tasks of up to 32 * Dz multiply-adds.
    const int64_t task_macs = std::min<int64_t>(Dc, kBwdCols) * Dz;
    const bool small = Dz == 0 || (Dc * Dz <= kInlineTaskMacs && B * p.c_tiles <= kInlineTotalMacs / task_macs);
    p.y_source = small ? kYInline : kYFromGemm;
  }
  return p;
}

// The backward's tasks that block `block` of `grid` runs, in order: f(b, split, feature tile). Feature
// tiles fastest, so neighbouring blocks read neighbouring features of the same grad_out rows.
// splits * c_tiles < 2^32 where splits > 1 (backproj_backward splits only when B * c_tiles is small).
PF_EXEC_CHECK_DISABLE
template <typename F>
PF_HOST_DEVICE void for_each_grad_task(int64_t block, int64_t grid, int64_t B, int64_t c_tiles, int64_t splits,
                                       F&& f) {
  const int64_t width = splits * c_tiles;
  for (RowCursor t(block, grid, width); t.row < B; t.next(width)) {
    const int64_t split = splits == 1 ? 0 : static_cast<uint32_t>(t.col) / static_cast<uint32_t>(c_tiles);
    f(t.row, split, t.col - split * c_tiles);
  }
}

// ---- fusion_head forward: square output tiles, one task each. ----
// The output tiles that block `block` of `grid` computes, in order: f(m tile, n tile).
PF_EXEC_CHECK_DISABLE
template <typename F>
PF_HOST_DEVICE void for_each_tile(int64_t block, int64_t grid, int64_t m_tiles, int64_t n_tiles, F&& f) {
  for (RowCursor t(block, grid, n_tiles); t.row < m_tiles; t.next(n_tiles)) f(t.row, t.col);
}

struct FusionHead {
  int64_t tile = 64, m_tiles = 0, n_tiles = 0, tasks = 0, grid = 0;
};

// B >= 1, Dz >= 1.
inline FusionHead fusion_head(int64_t B, int64_t Dz, int64_t sm_count) {
  FusionHead p;
  // 64 x 64 tiles unless they leave most SMs idle (small batches): then 32 x 32, four times the blocks.
  p.tile = ceil_div(B, 64) * ceil_div(Dz, 64) < sm_count ? 32 : 64;
  p.m_tiles = ceil_div(B, p.tile);
  p.n_tiles = ceil_div(Dz, p.tile);
  p.tasks = p.m_tiles * p.n_tiles;
  p.grid = grid_for(p.tasks);
  return p;
}

// ---- fusion_head and the linear maps' backward: one-launch kernels, or cuBLAS. ----
// Chosen per call by comparing two estimates of GPU time, in microseconds, for this GPU's SM count:
// - our one-launch kernels: MACs / kKernelMacsPerUs (the whole GPU busy) plus the serial k loop of one
//   output tile, kStepUs per k-step (a global-load round trip and two barriers, which a small grid has
//   nothing to overlap with). Measured on an H100 (benchmarks/results/nvidia-h100-80gb-hbm3.json,
//   fusion_head B=4096 "large", 7.5 G MACs): the SIMT fp32 and WMMA bf16 kernels took 762 and 776 us.
// - cuBLAS: kLaunchUs for each launch beyond the kernel's one (gather, epilogue, one GEMM per output;
//   3-5 us apiece on the GPU's timeline while the host issues them), plus MACs at cuBLAS's rate (eager
//   F.linear on the same row, cat and relu included: 343 us in fp32, 48 us in bf16).
constexpr double kLaunchUs = 4.0;
constexpr double kStepUs = 0.4;
constexpr double kKernelMacsPerUs = 9.0e6;   // 132 SMs; scaled by the SM count
constexpr double kGemmMacsPerUs16 = 1.5e8;  // fp16 / bf16 on tensor cores, 132 SMs
constexpr double kGemmMacsPerUs32 = 2.0e7;  // fp32 (no TF32) and fp64, 132 SMs
constexpr double kPlannedSms = 132.0;        // the SM count the rates were measured with
constexpr int kMaxInputs = 8;                // inputs the kernels' parameters hold; more are gathered first
constexpr int kFusionTcBK = 32, kFusionSimtBK = 16;  // k-tile of the WMMA and SIMT forward kernels
constexpr int kLinearTile = 32;              // the backward kernel's square output tile and k-tile

inline double kernel_macs_per_us(int64_t sm_count) {
  return kKernelMacsPerUs * static_cast<double>(std::max<int64_t>(1, sm_count)) / kPlannedSms;
}
inline double gemm_macs_per_us(int64_t elem_size, int64_t sm_count) {
  return (elem_size == 2 ? kGemmMacsPerUs16 : kGemmMacsPerUs32) * static_cast<double>(std::max<int64_t>(1, sm_count)) /
         kPlannedSms;
}

// The forward's path. widths: the inputs' D_j; tensor_cores: the WMMA kernel (16-bit on sm_80+; its
// k-tile is 32, the SIMT kernel's 16: each input's last k-tile is padded, so k-steps = sum ceil(D_j / bk)).
// activation: not "none" (the cuBLAS path then needs an epilogue pass; "none" is the GEMM's own output).
struct FusionHeadPath {
  bool gemm = false;
  int64_t launches = 0;                  // kernels this forward launches
  double kernel_us = 0.0, gemm_us = 0.0;  // the two estimates
};

inline FusionHeadPath fusion_head_path(int64_t B, int64_t Dz, const int64_t* widths, int64_t inputs,
                                       int64_t elem_size, bool tensor_cores, bool activation, int64_t sm_count) {
  int64_t D = 0, k_steps = 0;
  const int64_t bk = tensor_cores ? kFusionTcBK : kFusionSimtBK;
  for (int64_t j = 0; j < inputs; ++j) {
    D += widths[j];
    k_steps += ceil_div(widths[j], bk);
  }
  const bool gathered = inputs > kMaxInputs;  // the kernel then runs on one concatenated input
  if (gathered) k_steps = ceil_div(D, bk);
  const double macs = static_cast<double>(B) * static_cast<double>(Dz) * static_cast<double>(D);
  FusionHeadPath p;
  p.kernel_us = macs / kernel_macs_per_us(sm_count) + static_cast<double>(k_steps) * kStepUs +
                (gathered ? kLaunchUs : 0.0);
  const int64_t gemm_launches = (inputs > 1 ? 1 : 0) + 1 + (activation ? 1 : 0);
  p.gemm_us = static_cast<double>(gemm_launches - 1) * kLaunchUs + macs / gemm_macs_per_us(elem_size, sm_count);
  p.gemm = D > 0 && p.gemm_us < p.kernel_us;
  p.launches = p.gemm ? gemm_launches : 1 + (gathered ? 1 : 0);
  return p;
}

// ---- The backward of y = h W^T + b in one launch: h (B, D) in column blocks (the inputs), W (N, D),
// grad_pre (B, N) = grad_out * act', computed where the tiles load it. Part 0:
// grad_h = grad_pre W, tiles over (B, each input's columns), k over N. Part 1:
// [grad_W, grad_b] = grad_pre^T [h, 1], tiles over (N, each input's columns, then one bias tile), k over B.
// Square tiles of kLinearTile; col_tiles = sum over inputs of ceil(D_j / kLinearTile). ----
struct LinearBackward {
  bool fused = false;
  int64_t x_m_tiles = 0, x_cols = 0, w_m_tiles = 0, w_cols = 0;
  int64_t x_tasks = 0, w_tasks = 0, tasks = 0, grid = 0;
  double fused_us = 0.0, cublas_us = 0.0;  // the two estimates
};

// cublas_launches: what the cuBLAS path launches instead of the one fused kernel. B, N, D >= 0.
inline LinearBackward linear_backward(int64_t B, int64_t N, int64_t D, int64_t col_tiles, int64_t inputs, bool bias,
                                      int64_t elem_size, int64_t cublas_launches, int64_t sm_count) {
  LinearBackward p;
  p.x_m_tiles = ceil_div(B, kLinearTile);
  p.x_cols = col_tiles;
  p.w_m_tiles = ceil_div(N, kLinearTile);
  p.w_cols = col_tiles + (bias ? 1 : 0);
  p.x_tasks = p.x_m_tiles * p.x_cols;
  p.w_tasks = p.w_m_tiles * p.w_cols;
  p.tasks = p.x_tasks + p.w_tasks;
  p.grid = grid_for(p.tasks);
  const double macs = 2.0 * static_cast<double>(B) * static_cast<double>(N) * static_cast<double>(D);
  const int64_t depth = std::max(ceil_div(N, kLinearTile), ceil_div(B, kLinearTile));
  p.fused_us = macs / kernel_macs_per_us(sm_count) + static_cast<double>(depth) * kStepUs;
  p.cublas_us = static_cast<double>(cublas_launches - 1) * kLaunchUs + macs / gemm_macs_per_us(elem_size, sm_count);
  p.fused = inputs <= kMaxInputs && p.fused_us <= p.cublas_us;
  return p;
}

// The tasks that block `block` of `grid` runs, in order: f(part, m tile, column tile). Task t of the
// list [part 0's x_m_tiles x x_cols, then part 1's w_m_tiles x w_cols] (each row-major) goes to block
// t % grid; w_shift = (x_m_tiles * x_cols) % grid, computed on the host (no 64-bit division here).
PF_EXEC_CHECK_DISABLE
template <typename F>
PF_HOST_DEVICE void for_each_linear_backward_task(int64_t block, int64_t grid, int64_t x_m_tiles, int64_t x_cols,
                                                  int64_t w_m_tiles, int64_t w_cols, int64_t w_shift, F&& f) {
  if (x_cols > 0) {
    for (RowCursor t(block, grid, x_cols); t.row < x_m_tiles; t.next(x_cols)) f(0, t.row, t.col);
  }
  if (w_cols > 0) {
    // Part 1's first task for this block: the first t >= x_tasks with t % grid == block, less x_tasks.
    const int64_t start = block >= w_shift ? block - w_shift : block + grid - w_shift;
    for (RowCursor t(start, grid, w_cols); t.row < w_m_tiles; t.next(w_cols)) f(1, t.row, t.col);
  }
}

// fusion_head's backward: the fused kernel (plus, for act' from y, one launch of the forward kernel for y),
// or cuBLAS on the input dtype (fusion_head_cuda.cu: fusion_head_backward_gemm): [h_1..h_K] gathered
// (K > 1); [y GEMM]; grad_pre (1); one GEMM per input and one for W; the bias's sum. Its GEMMs read the
// input dtype (16-bit: tensor cores).
struct FusionHeadBackward {
  LinearBackward linear;
  int64_t launches = 0;
};

inline FusionHeadBackward fusion_head_backward(int64_t B, int64_t Dz, const int64_t* widths, int64_t inputs, bool bias,
                                               bool from_y, int64_t elem_size, int64_t sm_count) {
  FusionHeadBackward r;
  int64_t D = 0, col_tiles = 0;
  for (int64_t j = 0; j < inputs; ++j) {
    D += widths[j];
    col_tiles += ceil_div(widths[j], kLinearTile);
  }
  const int64_t cublas = (inputs > 1 ? 1 : 0) + 1 + inputs + 1 + (bias ? 1 : 0);
  r.linear = linear_backward(B, Dz, D, col_tiles, inputs, bias, elem_size, cublas, sm_count);
  r.launches = (from_y ? 1 : 0) + (r.linear.fused ? 1 : cublas);
  return r;
}

// Elementwise kernels: 256 threads, a grid stride over n >= 1 elements, at most 4 target waves.
constexpr int kElementwiseThreads = 256;
inline int64_t elementwise_grid(int64_t n, int64_t sm_count) {
  return std::min(ceil_div(n, kElementwiseThreads), 4 * target_blocks(sm_count));
}

}  // namespace plan
}  // namespace pf_kernels
