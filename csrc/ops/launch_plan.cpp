// pf_kernels::_launch_plan: the CUDA kernels' launch arithmetic (cuda/launch_plan.h) run on the host,
// in every build, so that CPU tests check grids, task decompositions and index walks at the limits.
// Test-only: `what` names the function, `args` its integer arguments; returns its results as ints.
#include <torch/library.h>

#include <initializer_list>
#include <string>
#include <vector>

#include "cuda/launch_plan.h"

namespace pf_kernels {
namespace {

struct Enough {};  // thrown to leave a walk once it has produced max_items items

// The items a walk(emit) produces, flattened, at most max_items of them.
template <typename Walk>
std::vector<int64_t> walk(int64_t max_items, Walk&& run) {
  std::vector<int64_t> out;
  int64_t items = 0;
  try {
    run([&](std::initializer_list<int64_t> item) {
      if (items++ == max_items) throw Enough{};
      out.insert(out.end(), item);
    });
  } catch (const Enough&) {
  }
  return out;
}

std::vector<int64_t> launch_plan(c10::string_view what_view, std::vector<int64_t> a) {
  const std::string what(what_view);
  auto need = [&](size_t n) {
    TORCH_CHECK(a.size() == n, "pf_kernels::_launch_plan('", what, "') takes ", n, " integers, got ", a.size());
  };
  auto need_block = [&]() {  // a[0] = block, a[1] = grid, as a launch has them
    TORCH_CHECK(0 <= a[0] && a[0] < a[1] && a[1] <= plan::kMaxGridX, "_launch_plan: bad block ", a[0], " of ", a[1]);
  };
  if (what == "backproj_forward") {  // B, positions, Dx, Dz, Dc, sm_count
    need(6);
    const plan::BackprojForward p = plan::backproj_forward(a[0], a[1], a[2], a[3], a[4], a[5]);
    return {p.inline_context, p.group, p.rows_per_task, p.tasks_per_row, p.tasks, p.grid};
  }
  if (what == "backproj_tasks") {  // block, grid, B, positions, rows_per_task, tasks_per_row, max_items
    need(7);
    need_block();
    return walk(a[6], [&](auto&& emit) {
      plan::for_each_backproj_task(a[0], a[1], a[2], a[3], a[4], a[5], [&](int64_t b, int64_t row0, int64_t rows) {
        emit({b, row0, rows});
      });
    });
  }
  if (what == "backproj_vector_ok") {  // Dx, Dc, x_row_stride, x_addr, out_addr, elem_size
    need(6);
    return {plan::backproj_vector_ok(a[0], a[1], a[2], a[3], a[4], a[5])};
  }
  if (what == "row_cursor") {  // start < step, step, width, rows, max_steps -> row, col of each step
    need(5);
    TORCH_CHECK(0 <= a[0] && a[0] < a[1] && a[1] < (int64_t{1} << 32) && a[2] >= 1, "row_cursor: bad arguments");
    return walk(a[4], [&](auto&& emit) {
      for (plan::RowCursor k(a[0], a[1], a[2]); k.row < a[3]; k.next(a[2])) emit({k.row, k.col});
    });
  }
  if (what == "backproj_backward") {  // B, positions, Dz, Dc, from_y, sm_count
    need(6);
    const plan::BackprojBackward p = plan::backproj_backward(a[0], a[1], a[2], a[3], a[4] != 0, a[5]);
    return {p.c_tiles, p.splits, p.per_split, p.tasks, p.grid, p.finish_tasks, p.finish_grid, p.y_source};
  }
  if (what == "grad_tasks") {  // block, grid, B, c_tiles, splits, max_items
    need(6);
    need_block();
    return walk(a[5], [&](auto&& emit) {
      plan::for_each_grad_task(a[0], a[1], a[2], a[3], a[4], [&](int64_t b, int64_t split, int64_t c_tile) {
        emit({b, split, c_tile});
      });
    });
  }
  if (what == "tiles") {  // block, grid, m_tiles, n_tiles, max_items
    need(5);
    need_block();
    return walk(a[4], [&](auto&& emit) {
      plan::for_each_tile(a[0], a[1], a[2], a[3], [&](int64_t m, int64_t n) { emit({m, n}); });
    });
  }
  if (what == "fusion_head") {  // B, Dz, sm_count
    need(3);
    const plan::FusionHead p = plan::fusion_head(a[0], a[1], a[2]);
    return {p.tile, p.m_tiles, p.n_tiles, p.tasks, p.grid};
  }
  // Microseconds as integer nanoseconds.
  auto ns = [](double us) { return static_cast<int64_t>(us * 1000.0 + 0.5); };
  if (what == "fusion_head_path") {  // B, Dz, elem_size, tensor_cores, activation, sm_count, widths...
    TORCH_CHECK(a.size() >= 7, "pf_kernels::_launch_plan('fusion_head_path') takes at least 7 integers");
    const plan::FusionHeadPath p = plan::fusion_head_path(a[0], a[1], a.data() + 6, static_cast<int64_t>(a.size()) - 6,
                                                          a[2], a[3] != 0, a[4] != 0, a[5]);
    return {p.gemm, p.launches, ns(p.kernel_us), ns(p.gemm_us)};
  }
  auto linear = [&](const plan::LinearBackward& p) -> std::vector<int64_t> {
    return {p.fused, p.x_m_tiles, p.x_cols, p.w_m_tiles, p.w_cols, p.tasks, p.grid, ns(p.fused_us), ns(p.cublas_us)};
  };
  if (what == "fusion_head_backward") {  // B, Dz, bias, from_y, elem_size, sm_count, widths...
    TORCH_CHECK(a.size() >= 7, "pf_kernels::_launch_plan('fusion_head_backward') takes at least 7 integers");
    const plan::FusionHeadBackward r = plan::fusion_head_backward(
        a[0], a[1], a.data() + 6, static_cast<int64_t>(a.size()) - 6, a[2] != 0, a[3] != 0, a[4], a[5]);
    std::vector<int64_t> out = linear(r.linear);
    out.push_back(r.launches);
    return out;
  }
  if (what == "linear_backward_tasks") {  // block, grid, x_m_tiles, x_cols, w_m_tiles, w_cols, max_items
    need(7);
    need_block();
    const int64_t w_shift = (a[2] * a[3]) % a[1];
    return walk(a[6], [&](auto&& emit) {
      plan::for_each_linear_backward_task(a[0], a[1], a[2], a[3], a[4], a[5], w_shift,
                                          [&](int part, int64_t m, int64_t c) { emit({part, m, c}); });
    });
  }
  if (what == "elementwise") {  // n, sm_count
    need(2);
    return {plan::elementwise_grid(a[0], a[1])};
  }
  TORCH_CHECK(false, "pf_kernels::_launch_plan: unknown function '", what, "'");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pf_kernels, m) { m.def("_launch_plan(str what, int[] args) -> int[]", &launch_plan); }

}  // namespace pf_kernels
