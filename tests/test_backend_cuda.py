"""The cuda backend (CUDA kernels of pf_kernels._C) against the reference: the CPU backend's cases
on CUDA tensors (every shape, activation, dtype, layout, bias or not, forward and every gradient),
plus shapes that exercise the kernels' tiling, vector, split, GEMM and chunk paths, sizes past the
grid and int32 limits, and CUDA-graph capture. These need a GPU.

Without a GPU: the kernels' launch arithmetic (csrc/cuda/launch_plan.h, run on the host through
pf_kernels::_launch_plan) at the limits, the per-element activation code of the kernels at NaN and
inf, and static checks of the CUDA sources (device guard, no host syncs, no grid-y/z limits). One
opt-in test compiles the CUDA kernels (.ci/cuda_build_check.sh: no spills, ops registered): set
PF_KERNELS_CUDA_BUILD_CHECK=1; it takes minutes."""
import itertools
import os
import re
import subprocess
import sys

import pytest
import torch

import pf_kernels as pk
from tests.cases import (ACTIVATIONS, BACKPROJ_SHAPES, CONTEXT_SHAPES, FUSION_SHAPES,
                         assert_backproj_output_writable, assert_cpp_saves_what_the_backward_reads,
                         assert_fusion_output_writable, assert_matches_reference,
                         assert_refine_step_matches_reference, backproj_call, backproj_inputs, context_call,
                         context_inputs, cpp_saves_output, fusion_call, fusion_inputs)

from pf_kernels import reference

BACKEND = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = os.path.join(ROOT, "csrc", "cuda")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Beyond the shared cases: vector path (Dx, D multiples of 8), many positions (several tasks per
# batch row; backward splits positions), tiles with remainders, Dc with several column tiles, the
# context from a GEMM (Dc * Dz > 2^15; y recomputed by a GEMM in the backward), Dc past one shared-
# memory chunk (2048) with and without the GEMM, K > 8 inputs (the concatenating fallback), 64-wide
# fusion tiles (>= 132 tiles on an H100), empty feature dims.
BACKPROJ_EXTRA = [
    (2, (300,), 64, 48, 64),
    (3, (17, 19), 8, 70, 40),
    (1, (2049,), 5, 9, 33),
    (70, (), 16, 33, 8),
    (2, (4,), 0, 5, 3),
    (3, (5,), 8, 200, 300),
    (2, (3,), 5, 4, 2500),
    (2, (3,), 8, 40, 4104),
    (2, (3,), 4, 0, 6),
    (2, (3,), 4, 5, 0),
]
FUSION_EXTRA = [
    (130, (64, 100), 70),
    (65, (1, 2, 3, 4, 5, 6, 7, 8, 9, 10), 17),
    (3, (0, 5), 4),
    (200, (256,), 128),
    (1100, (24, 9), 600),
    (5, (700, 600), 9),       # cuBLAS forward (deep k), fused backward
    (3, (1300,), 7),          # cuBLAS forward on one input
    (2100, (24, 9), 60),      # cuBLAS backward (many rows)
]


def launch_plan(what, *args):
    """csrc/cuda/launch_plan.h's function `what`, run on the host (pf_kernels::_launch_plan)."""
    return torch.ops.pf_kernels._launch_plan(what, [int(a) for a in args])


@pytest.fixture
def extension():
    if os.environ.get("PF_KERNELS_SKIP_EXTENSION") == "1":
        pytest.skip("built without the extension on purpose")
    from pf_kernels._extension import load
    load()


MAX_GRID_X = 2**31 - 1
H100_SMS = 132


def _forward_plan(B, P, Dx, Dz, Dc, sms=H100_SMS):
    keys = ("inline", "group", "rows_per_task", "tasks_per_row", "tasks", "grid")
    return dict(zip(keys, launch_plan("backproj_forward", B, P, Dx, Dz, Dc, sms)))


# (B, positions, Dx, Dz, Dc): small, the benchmark's large case, one huge row, batches past the old
# grid-y (65535, 2,097,120) and grid-x (2^31 - 1) limits, more than 2^31 output elements, Dc past the
# old shared-memory limit, empty feature dims.
FORWARD_PLAN_CASES = [
    (3, 5, 4, 6, 7), (8, 16, 32, 64, 16), (4096, 1, 1024, 1024, 1024), (1, 2**20, 64, 4096, 4096),
    (65536, 3, 5, 7, 9), (2_097_121, 1, 8, 8, 8), (2**31 + 7, 1, 1, 1, 1), (1, 2**34 + 3, 3, 2, 5),
    (2, 2**28, 8, 16, 8), (2, 7, 3, 4, 100_000), (5, 9, 0, 3, 4), (5, 9, 4, 0, 4), (5, 9, 4, 3, 0),
]


def _walk(what, *args, max_items=10**6):
    """The items (tuples of `size` ints) that block `args[0]` of grid `args[1]` visits in the kernel's loop."""
    flat = launch_plan(what, *args, max_items)
    size = 2 if what == "tiles" else 3
    return [tuple(flat[i:i + size]) for i in range(0, len(flat), size)]


@pytest.mark.parametrize("case", FORWARD_PLAN_CASES, ids=str)
def test_forward_plan_covers_every_row_in_one_launch(extension, case):
    B, P, Dx, Dz, Dc = case
    p = _forward_plan(*case)
    assert 1 <= p["grid"] <= MAX_GRID_X and p["grid"] <= p["tasks"]
    assert p["tasks"] == B * p["tasks_per_row"]
    rows, per_row, grid = p["rows_per_task"], p["tasks_per_row"], p["grid"]
    assert rows * per_row >= P > rows * (per_row - 1), "tasks of a batch row must cover its positions"
    assert p["group"] in (1, 2, 4, 8, 16, 32)

    def tasks(block, grid, max_items=10**6):
        return _walk("backproj_tasks", block, grid, B, P, rows, per_row, max_items=max_items)

    # The kernel's own loop at the edges: block 0, the block that runs the last task, the last block.
    last = p["tasks"] - 1
    for block in {0, last % grid, grid - 1}:
        visits = tasks(block, grid, max_items=3)
        assert visits, f"block {block} of {grid} runs nothing"
        for b, row0, n in visits:
            assert 0 <= b < B and 0 <= row0 and 1 <= n <= rows and row0 + n <= P
        if block == last % grid and p["tasks"] <= 3 * grid:
            assert visits[-1][0] == B - 1 and visits[-1][1] + visits[-1][2] == P  # the last row's last task
    if B * P <= 5000:  # small: every (batch row, position) exactly once, with the planned grid and a tiny one
        for g in {grid, 3, 1}:
            seen = [(b, row0 + i) for block in range(min(g, grid)) for b, row0, n in tasks(block, min(g, grid))
                    for i in range(n)]
            assert sorted(seen) == [(b, q) for b in range(B) for q in range(P)]


def test_forward_plan_computes_the_context_once_where_it_is_large(extension):
    assert not _forward_plan(4096, 1, 1024, 1024, 1024)["inline"]  # a GEMM, then the copy kernel
    assert not _forward_plan(1, 2**20, 64, 4096, 4096)["inline"]
    assert _forward_plan(8, 16, 32, 64, 16)["inline"]              # launch-bound: one kernel
    assert _forward_plan(5, 9, 4, 0, 4)["inline"] and _forward_plan(5, 9, 4, 3, 0)["inline"]
    for case in FORWARD_PLAN_CASES:  # the inline dot products stay within their budget
        B, P, Dx, Dz, Dc = case
        p = _forward_plan(*case)
        if p["inline"] and Dz and Dc:
            assert Dc * Dz <= 2**15 and p["tasks"] * Dc * Dz <= 2**23


@pytest.mark.parametrize("width", [1, 2, 3, 7, 8, 255, 256, 257, 1000])
@pytest.mark.parametrize("step", [1, 5, 256])
def test_row_cursor_visits_every_element_once(extension, width, step):
    rows = 4
    seen = []
    for start in range(step):
        pairs = _pairs(launch_plan("row_cursor", start, step, width, rows, 10**6))
        flat = [r * width + c for r, c in pairs]
        assert flat == list(range(start, rows * width, step))  # in order, no drift
        seen += flat
    assert sorted(seen) == list(range(rows * width))


def _pairs(flat):
    return list(zip(flat[::2], flat[1::2]))


def test_row_cursor_in_64_bits(extension):
    step = 2**32 - 1  # the largest step; rows wider than it (2^32 + 3), and narrow rows past 2^32 of them
    for width, rows in ((2**32 + 3, 3), (7, 2**40)):
        expected = [divmod(5 + k * step, width) for k in range(4)]
        assert _pairs(launch_plan("row_cursor", 5, step, width, rows, 4)) == expected


def test_vector_path_needs_alignment_of_every_part(extension):
    ok = lambda *a: bool(launch_plan("backproj_vector_ok", *a)[0])  # noqa: E731
    assert ok(64, 32, 64, 0, 0, 4) and ok(8, 8, 8, 16, 32, 2) and ok(0, 16, 0, 3, 0, 4)
    assert not ok(5, 32, 5, 0, 0, 4)      # x's width
    assert not ok(64, 30, 64, 0, 0, 4)    # the context's width
    assert not ok(64, 32, 65, 0, 0, 4)    # x's row stride (a view into wider rows)
    assert not ok(64, 32, 64, 4, 0, 4)    # x's start (a view one element in)
    assert not ok(64, 32, 64, 0, 8, 4)    # the output's start
    assert ok(4, 4, 4, 0, 0, 8) and not ok(4, 3, 4, 0, 0, 8)


BACKWARD_KEYS = ("c_tiles", "splits", "per_split", "tasks", "grid", "finish_tasks", "finish_grid", "y_source")


@pytest.mark.parametrize("case", [(3, 5, 6, 7), (2, 300, 48, 64), (1, 2**20, 64, 4096), (4096, 1, 1024, 1024),
                                  (2**31 + 7, 1, 3, 33), (70_000, 100, 4, 5), (1, 3, 2, 100_000)], ids=str)
@pytest.mark.parametrize("from_y", [False, True])
def test_backward_plan_covers_every_task_in_one_launch(extension, case, from_y):
    B, P, Dz, Dc = case
    p = dict(zip(BACKWARD_KEYS, launch_plan("backproj_backward", B, P, Dz, Dc, from_y, H100_SMS)))
    assert p["c_tiles"] * 32 >= Dc > (p["c_tiles"] - 1) * 32
    assert p["splits"] * p["per_split"] >= P > (p["splits"] - 1) * p["per_split"]
    assert p["tasks"] == B * p["c_tiles"] * p["splits"] and 1 <= p["grid"] <= min(MAX_GRID_X, p["tasks"])
    if p["splits"] > 1:
        assert p["finish_tasks"] == B * p["c_tiles"] and 1 <= p["finish_grid"] <= MAX_GRID_X
    if not from_y:
        assert p["y_source"] == 0
    elif Dc * Dz > 2**15:
        assert p["y_source"] == 1  # a GEMM, not B * Dc * Dz multiply-adds in the kernel
    if p["splits"] > 1:
        assert p["splits"] * p["c_tiles"] < 2**32  # for_each_grad_task's 32-bit split
    grid = p["grid"]
    for block in {0, (p["tasks"] - 1) % grid, grid - 1}:
        for b, split, c_tile in _walk("grad_tasks", block, grid, B, p["c_tiles"], p["splits"], max_items=3):
            assert 0 <= b < B and 0 <= split < p["splits"] and 0 <= c_tile < p["c_tiles"]
            assert ((b * p["splits"] + split) * p["c_tiles"] + c_tile) % grid == block
    if p["tasks"] <= 3000:  # every task exactly once, with the planned grid and a tiny one
        for g in {grid, 3}:
            seen = [t for block in range(min(g, grid)) for t in _walk("grad_tasks", block, min(g, grid), B,
                                                                      p["c_tiles"], p["splits"])]
            assert sorted(seen) == sorted(itertools.product(range(B), range(p["splits"]), range(p["c_tiles"])))


@pytest.mark.parametrize("B", [1, 65_535 * 32, 65_535 * 32 + 1, 10**9, 2**40])
@pytest.mark.parametrize("Dz", [1, 70, 3_000_000])
def test_fusion_head_plan_has_no_batch_limit(extension, B, Dz):
    tile, m_tiles, n_tiles, tasks, grid = launch_plan("fusion_head", B, Dz, H100_SMS)
    assert tile in (32, 64)
    assert m_tiles * tile >= B > (m_tiles - 1) * tile and n_tiles * tile >= Dz > (n_tiles - 1) * tile
    assert tasks == m_tiles * n_tiles and 1 <= grid <= min(tasks, MAX_GRID_X)
    for block in {0, (tasks - 1) % grid, grid - 1}:
        for m, n in _walk("tiles", block, grid, m_tiles, n_tiles, max_items=3):
            assert 0 <= m < m_tiles and 0 <= n < n_tiles and (m * n_tiles + n) % grid == block
    if tasks <= 3000:
        for g in {grid, 3}:
            seen = [t for block in range(min(g, grid)) for t in _walk("tiles", block, min(g, grid), m_tiles, n_tiles)]
            assert sorted(seen) == sorted(itertools.product(range(m_tiles), range(n_tiles)))


# The benchmark's fusion_head rows (benchmarks/cases.py FUSION_DIMS): (D_1, D_2, D_3, Dz).
FUSION_ROWS = {"small": (16, 16, 16, 16), "typical": (128, 64, 32, 256), "large": (1024, 512, 256, 1024)}


def _fusion_path(B, widths, Dz, elem=2, activation="relu", sms=H100_SMS):
    gemm, launches, kernel_ns, gemm_ns = launch_plan("fusion_head_path", B, Dz, elem, elem == 2,
                                                     activation != "none", sms, *widths)
    return dict(gemm=bool(gemm), launches=launches, kernel_us=kernel_ns / 1e3, gemm_us=gemm_ns / 1e3)


LINEAR_KEYS = ("fused", "x_m_tiles", "x_cols", "w_m_tiles", "w_cols", "tasks", "grid", "fused_ns", "cublas_ns")


def _fusion_backward(B, widths, Dz, bias=True, from_y=False, elem=2, sms=H100_SMS):
    out = launch_plan("fusion_head_backward", B, Dz, bias, from_y, elem, sms, *widths)
    return dict(zip(LINEAR_KEYS + ("launches",), out))


def _cublas_backward_launches(K, bias):
    """What the cuBLAS backward launches (fusion_head_cuda.cu: fusion_head_backward_gemm), any dtype:
    the gather (K > 1), grad_pre, K + 1 GEMMs on the input dtype, the bias's sum."""
    return (K > 1) + 1 + K + 1 + bias


def test_fusion_head_backward_rule(extension):
    """One launch for the whole backward (two with y for act') at the launch-bound rows (B <= 256, the
    large row at B = 8); cuBLAS (elementwise grad_pre, K + 1 GEMMs on the input dtype, the bias's sum) at B = 4096
    on the typical and large rows and at B = 256 on the large one. More than 8 inputs always take cuBLAS."""
    for name, (*widths, Dz) in FUSION_ROWS.items():
        for B in (8, 256, 4096):
            if name == "small" and B == 4096:
                continue  # 16 x 48 weights: the two estimates are within 1 us of each other
            for elem in (4, 2):
                p = _fusion_backward(B, widths, Dz, elem=elem)
                expect_fused = B <= 256 and (name != "large" or B == 8)
                assert bool(p["fused"]) == expect_fused, (name, B, elem, p)
                assert bool(p["fused"]) == (p["fused_ns"] <= p["cublas_ns"])
                assert p["launches"] == (1 if expect_fused else _cublas_backward_launches(3, True))
                y = _fusion_backward(B, widths, Dz, from_y=True, elem=elem)
                assert y["launches"] == p["launches"] + 1 and y["fused"] == p["fused"]
    assert not _fusion_backward(4, (1,) * 9, 3)["fused"]
    assert _fusion_backward(4, (1,) * 8, 3)["fused"]
    p = _fusion_backward(4096, (128, 64, 32), 256, bias=False, elem=4)
    assert not p["fused"] and p["launches"] == _cublas_backward_launches(3, False) == 1 + 1 + 3 + 1
    # The fused kernel's tasks walk all of B (grad_W) or all of Dz (grad_h) serially: a long batch on
    # a narrow head goes to cuBLAS however small the arithmetic.
    assert not _fusion_backward(2**20, (2,), 3, elem=4)["fused"]


@pytest.mark.parametrize("case", [
    (3, 5, (4, 7), True), (70, 40, (33, 1, 64), False), (0, 9, (5,), True), (6, 0, (5,), True),
    (5, 3, (0, 0), True), (5, 3, (0,), False), (100, 70, (31, 32, 33), True), (2**20, 3, (2,), True),
], ids=str)
def test_linear_backward_tasks_cover_every_tile_once(extension, case):
    """The fused backward's two parts in one grid: every grad_h tile and every grad_W / grad_b tile
    exactly once, task t on block t % grid, with the planned grid and capped ones (as past 2^31 - 1)."""
    B, N, widths, bias = case
    p = _fusion_backward(B, widths, N, bias=bias)
    col_tiles = sum(-(-w // 32) for w in widths)
    assert (p["x_m_tiles"], p["x_cols"]) == (-(-B // 32), col_tiles)
    assert (p["w_m_tiles"], p["w_cols"]) == (-(-N // 32), col_tiles + bias)
    x_tasks, w_tasks = p["x_m_tiles"] * p["x_cols"], p["w_m_tiles"] * p["w_cols"]
    assert p["tasks"] == x_tasks + w_tasks and 1 <= p["grid"] <= min(MAX_GRID_X, max(1, p["tasks"]))
    expected = ([(0, m, c) for m in range(p["x_m_tiles"]) for c in range(p["x_cols"])] +
                [(1, m, c) for m in range(p["w_m_tiles"]) for c in range(p["w_cols"])])
    if p["tasks"] > 5000:  # too many to list: the edges of the walk only
        grid = p["grid"]
        for block in {0, x_tasks % grid, (p["tasks"] - 1) % grid, grid - 1}:
            for part, m, c in _walk("linear_backward_tasks", block, grid, p["x_m_tiles"], p["x_cols"],
                                    p["w_m_tiles"], p["w_cols"], max_items=4):
                t = m * p["x_cols"] + c if part == 0 else x_tasks + m * p["w_cols"] + c
                assert t % grid == block and t < p["tasks"]
        return
    for grid in {p["grid"], 1, 3, 7}:
        seen = []
        for block in range(grid):
            for part, m, c in _walk("linear_backward_tasks", block, grid, p["x_m_tiles"], p["x_cols"],
                                    p["w_m_tiles"], p["w_cols"]):
                t = m * p["x_cols"] + c if part == 0 else x_tasks + m * p["w_cols"] + c
                assert t % grid == block, (grid, block, part, m, c)
                seen.append((part, m, c))
        assert sorted(seen) == sorted(expected), grid


def test_elementwise_grid(extension):
    assert launch_plan("elementwise", 1, H100_SMS) == [1]
    assert launch_plan("elementwise", 2**40, H100_SMS) == [4 * 8 * H100_SMS]


SPECIAL_VALUES = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 100.0, -100.0, 20.0, -20.0,
                  0.5, -0.5, 1e-30, -1e-30]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_activation_header_keeps_nan_and_inf_as_torch(extension, activation, dtype):
    """csrc/activations.h at NaN, +-inf, +-0 and saturation: value, derivative from y and from the value,
    against torch's forward and autograd in float64 (whose formulas torch's CUDA kernels share; torch's
    CPU fp32 gelu is NaN at +inf, a vectorisation artefact)."""
    y = torch.tensor(SPECIAL_VALUES, dtype=dtype)
    value, grad, grad_from_value = torch.ops.pf_kernels._activation_reference(y, activation)
    y64 = y.double().requires_grad_()
    expected = reference.apply_activation(y64, activation)
    (expected_grad,) = torch.autograd.grad(expected.sum(), y64)
    # NaN where torch has NaN, inf where it has inf; finite values to the dtype's rounding (fp32 sigmoid'
    # is 0 at y = 20, where float64 still has 2e-9, in torch as here).
    tol = dict(rtol=1e-6, atol=1e-7 if dtype == torch.float32 else 1e-15, equal_nan=True)
    torch.testing.assert_close(value.double(), expected.detach(), **tol)
    torch.testing.assert_close(grad.double(), expected_grad, **tol)
    if activation != "gelu":  # gelu's derivative cannot be read off its output
        torch.testing.assert_close(grad_from_value.double(), expected_grad, **tol)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_activation_header_passes_gradients_as_torch(extension, activation, dtype):
    """The gradient through activations.h's activation (apply_act_grad, which every CUDA backward uses),
    incoming gradients NaN and +-inf included, against torch's autograd: relu's is a select, so a NaN or
    inf gradient where relu is off gives 0 (a product with relu' = 0 gives NaN)."""
    torch.manual_seed(0)
    grads = [float("nan"), 2.5, -0.75] + ([float("inf"), -float("inf")] if activation in ("relu", "none") else [])
    y = torch.tensor(SPECIAL_VALUES, dtype=dtype).repeat(len(grads))
    g = torch.tensor(grads, dtype=dtype).repeat_interleave(len(SPECIAL_VALUES)) * (1 + torch.rand(y.shape, dtype=dtype))
    _, grad, grad_from_value = torch.ops.pf_kernels._activation_reference(y, activation, g)
    y64 = y.double().requires_grad_()
    (expected,) = torch.autograd.grad(reference.apply_activation(y64, activation), y64, g.double())
    tol = dict(rtol=1e-6, atol=1e-7 if dtype == torch.float32 else 1e-15, equal_nan=True)
    torch.testing.assert_close(grad.double(), expected, **tol)
    if activation != "gelu":
        torch.testing.assert_close(grad_from_value.double(), expected, **tol)


def test_cuda_backwards_take_the_activation_gradient_through_apply_act_grad():
    """Every CUDA function that reads act' (activation_grad, grad_from_activated) applies it with
    apply_act_grad, the select relu needs, not with a product of its own."""
    import pathlib
    readers = 0
    for path in sorted(pathlib.Path(__file__).resolve().parents[1].joinpath("csrc", "cuda").glob("*.cu")):
        for name, body in _function_bodies(path.read_text()).items():
            if re.search(r"\b(activation_grad|grad_from_activated)<", body):
                readers += 1
                assert "apply_act_grad(" in body, f"{path.name}: {name} reads act' without apply_act_grad"
    assert readers >= 4


def _function_bodies(source):
    """name -> body of each top-level-ish C++ function definition in a .cu file (brace matched)."""
    bodies = {}
    for m in re.finditer(r"\n[^\n;{}]*?\b(\w+)\(([^;{}]*?)\)\s*\{", source):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(source[i], 0)
            i += 1
        bodies.setdefault(m.group(1), source[m.end():i])
    return bodies


def _cuda_sources():
    return {name: open(os.path.join(CUDA_SOURCES, name)).read()
            for name in sorted(os.listdir(CUDA_SOURCES)) if name.endswith((".cu", ".cuh", ".h"))}


def test_every_cuda_entry_point_guards_its_device_first():
    """Each CUDA kernel registered for an op sets its tensors' device (CUDAGuard) before it asks for
    device properties, a stream, memory or a launch."""
    entries = 0
    for name, source in _cuda_sources().items():
        bodies = _function_bodies(source)
        for fn in re.findall(r'm\.impl\("\w+",\s*&cuda::(\w+)\)', source):
            entries += 1
            body = bodies[fn]
            guard = body.find("CUDAGuard guard(")
            assert guard >= 0, f"{name}: {fn} sets no CUDAGuard"
            for use in ("sm_count()", "getCurrentCUDAStream", "at::empty", "at::zeros", "<<<", "launch_"):
                pos = body.find(use)
                assert pos < 0 or pos > guard, f"{name}: {fn} uses {use} before its CUDAGuard"
    assert entries >= 4


def test_cuda_sources_are_graph_safe_and_take_any_size():
    """No host syncs or pageable copies (CUDA-graph capture), only static shared memory (no opt-in
    limit on Dc), 1-D grids (no 65535 limit on gridDim.y / z), launches on the current stream."""
    forbidden = {
        r"\.item\s*<|\.item\(\)|\.cpu\(\)|\.tolist\(|kCPU": "a device-to-host copy",
        r"cudaDeviceSynchronize|cudaStreamSynchronize|cudaMemcpy\(|cudaMalloc|cudaFree|\.synchronize\(": "a host sync or raw allocation",
        r"blockIdx\.[yz]|gridDim\.[yz]": "a grid dimension limited to 65535",
        r"extern\s+__shared__|cudaFuncSetAttribute|sharedMemPerBlockOptin": "dynamic shared memory",
        r"\bint\s+\w+\s*=\s*blockIdx\.x\s*\*": "an int32 global index",
    }
    for name, source in _cuda_sources().items():
        for pattern, what in forbidden.items():
            assert not re.search(pattern, source), f"{name}: {what} ({pattern})"
        for launch in re.findall(r"<<<(.*?)>>>", source, re.S):
            parts = [p.strip() for p in launch.split(",")]
            assert len(parts) == 4 and parts[2] == "0" and "stream" in parts[3], f"{name}: launch <<<{launch}>>>"
            assert parts[0].startswith("launch_grid(") or (
                parts[0] == "grid" and "grid = launch_grid(" in source), f"{name}: unplanned grid <<<{launch}>>>"


@needs_gpu
def test_cuda_backend_is_built():
    info = pk.available_backends()["cuda"]
    assert info["available"], info["reason"]


@needs_gpu
@pytest.mark.parametrize("shape", BACKPROJ_SHAPES + BACKPROJ_EXTRA, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contig", "strided"])
def test_backproj_concat(shape, dtype, noncontiguous):
    B, S, Dx, Dz, Dc = shape
    for activation in ACTIVATIONS:
        for bias in (True, False):
            args = backproj_inputs(B, S, Dx, Dz, Dc, bias, dtype, device="cuda", noncontiguous=noncontiguous,
                                   weight_scale=1.0 if Dz == 0 else None)
            assert_matches_reference(backproj_call(BACKEND, activation), backproj_call("torch", activation), args)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backproj_concat_output_written_in_place(dtype):
    assert_backproj_output_writable(BACKEND, "cuda", dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fusion_head_output_written_in_place(dtype):
    assert_fusion_output_writable(BACKEND, "cuda", dtype, saves_output=cpp_saves_output)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saves_what_the_backward_reads(dtype):
    assert_cpp_saves_what_the_backward_reads(BACKEND, "cuda", dtype)


@needs_gpu
@pytest.mark.parametrize("shape", FUSION_SHAPES + FUSION_EXTRA, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contig", "strided"])
def test_fusion_head(shape, dtype, noncontiguous):
    B, dims, Dz = shape
    for activation in ACTIVATIONS:
        for bias in (True, False):
            hs, w, b = fusion_inputs(B, dims, Dz, bias, dtype, device="cuda", noncontiguous=noncontiguous)
            assert_matches_reference(fusion_call(BACKEND, activation), fusion_call("torch", activation), (w, b, *hs))


@needs_gpu
@pytest.mark.parametrize("path", ["kernel", "cublas"])
@pytest.mark.parametrize("shape", [(4, (5, 3), 6), (17, (16, 1, 31, 8), 13), (65, tuple(range(1, 11)), 17),
                                   (3, (1300,), 7), (2100, (24, 9), 60), (0, (3, 5), 4)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fusion_head_on_either_path(monkeypatch, path, shape, dtype):
    """Both of fusion_head's paths (forward: our kernel or cuBLAS + epilogue; backward: the fused launch
    or cuBLAS) forced on the same shapes, whichever the plan would pick (PF_KERNELS_CUDA_PATH)."""
    monkeypatch.setenv("PF_KERNELS_CUDA_PATH", path)
    B, dims, Dz = shape
    for activation in ACTIVATIONS:
        for bias in (True, False):
            hs, w, b = fusion_inputs(B, dims, Dz, bias, dtype, device="cuda", noncontiguous=True)
            assert_matches_reference(fusion_call(BACKEND, activation), fusion_call("torch", activation), (w, b, *hs))


@needs_gpu
@pytest.mark.parametrize("path", ["kernel", "cublas"])
@pytest.mark.parametrize("shape", [(3, (5,), 8, 6, 16), (2, (3,), 8, 40, 4104), (2, (300,), 8, 200, 300),
                                   (3, (4, 5), 6, 5, 7), (0, (5,), 4, 6, 3)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backproj_concat_on_either_path(monkeypatch, path, shape, dtype):
    """backproj_concat's context computed inline or by a cuBLAS GEMM first, forced on the same shapes
    whichever the plan would pick (PF_KERNELS_CUDA_PATH)."""
    monkeypatch.setenv("PF_KERNELS_CUDA_PATH", path)
    B, S, Dx, Dz, Dc = shape
    for activation in ACTIVATIONS:
        args = backproj_inputs(B, S, Dx, Dz, Dc, activation != "none", dtype, device="cuda", noncontiguous=True)
        assert_matches_reference(backproj_call(BACKEND, activation), backproj_call("torch", activation), args)


@needs_gpu
@pytest.mark.parametrize("path", ["kernel", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_relu_backward_at_nan_gradient_is_torchs(monkeypatch, path, dtype):
    """torch's relu backward selects: a NaN or inf gradient where relu is off gives 0 (the CUDA
    backwards multiplied, g * 0 = NaN). Every CUDA backward that applies relu', on both paths; the
    CPU twin is test_activation_header_passes_gradients_as_torch (the same apply_act_grad)."""
    monkeypatch.setenv("PF_KERNELS_CUDA_PATH", path)
    torch.manual_seed(0)
    dev = dict(device="cuda", dtype=dtype)
    h, hw, hb = torch.randn(5, 4, **dev), torch.randn(6, 4, **dev), torch.full((6,), -100.0, **dev)
    hb[::2] = 0.5  # outputs 1, 3, 5 off
    x, z = torch.randn(5, 3, 2, **dev), torch.randn(5, 4, **dev)
    w, b = torch.randn(6, 4, **dev), hb.clone()
    p, pw = torch.randn(5, 3, 6, **dev), torch.randn(6, 6, **dev)
    g_head, g_cat, g_ctx = torch.randn(5, 6, **dev), torch.randn(5, 3, 8, **dev), torch.randn(5, 3, 6, **dev)
    g_head[:, 1], g_cat[0, 1, 3], g_ctx[1, 2, :] = float("nan"), float("inf"), float("nan")
    calls = {
        "fusion_head": (lambda be, h, w: pk.fusion_head([h], w, hb, "relu", backend=be), (h, hw), g_head),
        "backproj_concat": (lambda be, z, w: pk.backproj_concat(x, z, w, b, "relu", backend=be), (z, w), g_cat),
        "context_linear": (lambda be, p, z: pk.context_linear(p, z, w, b, pw, "relu", "relu", backend=be),
                           (p, z), g_ctx),
    }
    for name, (call, leaves, grad_out) in calls.items():
        grads = []
        for be in ("torch", BACKEND):
            leaves_ = [t.clone().requires_grad_() for t in leaves]
            grads.append(torch.autograd.grad(call(be, *leaves_), leaves_, grad_out))
        for got, want in zip(grads[1], grads[0]):
            assert torch.isnan(got).sum() == torch.isnan(want).sum(), name
            torch.testing.assert_close(got, want, rtol=2e-2 if dtype != torch.float32 else 1e-5, atol=1e-2,
                                       equal_nan=True, msg=name)


@needs_gpu
def test_backproj_concat_unaligned_x_views():
    # x a view starting one element in: rows not 16-byte aligned, so the scalar path must be taken.
    base = torch.randn(2, 5, 17, device="cuda")
    x = base[..., 1:]
    z, w, b = torch.randn(2, 6, device="cuda"), torch.randn(8, 6, device="cuda"), torch.randn(8, device="cuda")
    out = pk.backproj_concat(x, z, w, b, "tanh", backend=BACKEND)
    torch.testing.assert_close(out, pk.backproj_concat(x, z, w, b, "tanh", backend="torch"))


@needs_gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_refine_step(activation):
    assert_refine_step_matches_reference(BACKEND, activation, device="cuda")


@needs_gpu
@pytest.mark.parametrize("activation", ["none", "gelu", "tanh", "sigmoid"])
def test_gradcheck_float64(activation):
    args = backproj_inputs(2, (3, 2), 3, 4, 2, True, torch.float64, device="cuda")
    assert torch.autograd.gradcheck(backproj_call(BACKEND, activation), args)
    args = backproj_inputs(2, (3,), 3, 4, 2, False, torch.float64, device="cuda", noncontiguous=True)
    assert torch.autograd.gradcheck(backproj_call(BACKEND, activation), args)
    hs, w, b = fusion_inputs(3, (2, 3, 1), 4, dtype=torch.float64, device="cuda")
    assert torch.autograd.gradcheck(fusion_call(BACKEND, activation), (w, b, *hs))


@needs_gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradgradcheck_float64(activation):
    # A backward with create_graph=True takes its gradients with ATen ops (CPU twin: test_backend_cpu's).
    torch.manual_seed(1)
    args = backproj_inputs(2, (3, 2), 3, 4, 2, True, torch.float64, device="cuda")
    assert torch.autograd.gradgradcheck(backproj_call(BACKEND, activation), args)
    hs, w, b = fusion_inputs(3, (2, 3, 1), 4, dtype=torch.float64, device="cuda")
    assert torch.autograd.gradgradcheck(fusion_call(BACKEND, activation), (w, b, *hs))
    for out_activation in ACTIVATIONS:
        args = context_inputs(2, (3,), 5, 4, 3, True, torch.float64, device="cuda")
        assert torch.autograd.gradgradcheck(context_call(BACKEND, activation, out_activation), args), out_activation


@needs_gpu
def test_only_x_needs_grad():
    x, z, w, b = backproj_inputs(2, (3,), 4, 5, 6, True, device="cuda", requires_grad=False)
    x.requires_grad_(True)
    out = pk.backproj_concat(x, z, w, b, backend=BACKEND)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(gx, g[..., :4], rtol=0, atol=0)


@needs_gpu
def test_direct_calls_check_their_arguments():
    pk.available_backends()
    ops = torch.ops.pf_kernels
    x, z, w = (torch.randn(2, 3, 4, device="cuda"), torch.randn(2, 5, device="cuda"),
               torch.randn(6, 5, device="cuda"))
    with pytest.raises(RuntimeError, match="weight"):
        ops.backproj_concat(x, z, torch.randn(6, 4, device="cuda"), None, "relu")
    with pytest.raises(RuntimeError, match="is on"):
        ops.backproj_concat(x, z.cpu(), w, None, "relu")
    with pytest.raises(ValueError, match="activation"):
        ops.fusion_head([z], w, None, "swish")
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.backproj_concat_backward(torch.randn(2, 3, 9, device="cuda"), torch.randn(2, 6, device="cuda"),
                                     z, w, None, "relu", 4)
    with pytest.raises(RuntimeError, match="context must be"):
        ops.backproj_concat_backward(torch.randn(2, 3, 10, device="cuda"), torch.randn(2, 3, 6, device="cuda"),
                                     z, w, None, "relu", 4)


@needs_gpu
def test_kernels_run_on_the_inputs_device_and_current_stream():
    stream = torch.cuda.Stream()
    x, z, w, b = backproj_inputs(4, (64,), 32, 16, 24, True, device="cuda", requires_grad=False)
    hs, hw, hb = fusion_inputs(4, (8, 9), 10, device="cuda", requires_grad=False)
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        out = pk.backproj_concat(x, z, w, b, backend=BACKEND)
        head = pk.fusion_head(hs, hw, hb, backend=BACKEND)
    stream.synchronize()
    torch.testing.assert_close(out, pk.backproj_concat(x, z, w, b, backend="torch"))
    torch.testing.assert_close(head, pk.fusion_head(hs, hw, hb, backend="torch"))


@needs_gpu
def test_opcheck_on_cuda_tensors():
    # Schema, fake kernels, autograd registration and AOT dispatch against the CUDA kernels.
    ops = torch.ops.pf_kernels
    for args in (backproj_inputs(3, (4,), 5, 6, 7, True, device="cuda") + ("relu",),
                 backproj_inputs(2, (3, 2), 8, 5, 16, False, torch.bfloat16, device="cuda") + ("gelu",),
                 backproj_inputs(0, (5,), 4, 6, 3, True, device="cuda") + ("tanh",),
                 backproj_inputs(3, (4,), 5, 6, 7, True, device="cuda", noncontiguous=True) + ("sigmoid",)):
        torch.library.opcheck(ops.backproj_concat.default, args)
    for (hs, w, b), act in ((fusion_inputs(4, (3, 5, 2), 6, device="cuda"), "relu"),
                            (fusion_inputs(3, (4, 4), 5, False, torch.float16, device="cuda"), "gelu"),
                            (fusion_inputs(0, (3, 2), 4, device="cuda"), "none"),
                            (fusion_inputs(5, (7, 1), 3, device="cuda", noncontiguous=True), "sigmoid")):
        torch.library.opcheck(ops.fusion_head.default, (hs, w, b, act))
    x, z, w, b = backproj_inputs(3, (4,), 5, 6, 7, True, device="cuda", requires_grad=False)
    out = ops.backproj_concat(x, z, w, b, "tanh")
    for context in (out[:, 0, 5:].clone(), None):  # act(y) saved, or recomputed from z
        torch.library.opcheck(ops.backproj_concat_backward.default,
                              (torch.randn_like(out), context, z, w, b, "tanh", 5))
    hs, hw, hb = fusion_inputs(4, (3, 5), 6, device="cuda", requires_grad=False)
    out = ops.fusion_head(hs, hw, hb, "relu")
    for saved in (out, None):  # act(y) saved, or recomputed
        torch.library.opcheck(ops.fusion_head_backward.default, (torch.randn_like(out), hs, hw, hb, saved, "relu"))


@needs_gpu
def test_torch_compile_fullgraph():
    x, z, w, b = backproj_inputs(2, (5,), 4, 6, 3, True, device="cuda")
    hs, hw, hb = fusion_inputs(2, (3, 4), 6, device="cuda")

    def step(x, z, w, b, hw, hb, h0, h1):
        zz = pk.fusion_head([h0, h1], hw, hb, "tanh", backend=BACKEND)
        return pk.backproj_concat(x, z + zz, w, b, "gelu", backend=BACKEND)

    compiled = torch.compile(step, fullgraph=True)
    out = compiled(x, z, w, b, hw, hb, *hs)
    torch.testing.assert_close(out, step(x, z, w, b, hw, hb, *hs))
    out.sum().backward()
    assert all(t.grad is not None for t in (z, w, b, hw, hb, *hs))


# context_linear beyond the shared cases: the 16-byte path (H a multiple of 8) with positions split
# across blocks in the backward, many positions on the scalar path, many batch rows, one feature,
# no context columns (Dc = 0: a hoisted modality with context_dims 0).
CONTEXT_EXTRA = [
    (2, (300,), 64, 48, 64),
    (3, (17, 19), 8, 70, 40),
    (1, (2049,), 5, 9, 33),
    (700, (), 16, 33, 8),
    (2, (4,), 1, 5, 3),
    (3, (4,), 8, 5, 0),
]


@needs_gpu
@pytest.mark.parametrize("index,shape", list(enumerate(CONTEXT_SHAPES + CONTEXT_EXTRA)), ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float64] + DTYPES, ids=str)
@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contig", "strided"])
def test_context_linear(index, shape, dtype, noncontiguous):
    B, S, H, Dz, Dc = shape
    for i, activation in enumerate(ACTIVATIONS):  # every (activation, out_activation) pair over 5 shapes
        out_activation = ACTIVATIONS[(i + 2 * index + noncontiguous) % 5]
        args = context_inputs(B, S, H, Dz, Dc, (i + index) % 2 == 0, dtype, "cuda", noncontiguous)
        assert_matches_reference(context_call(BACKEND, activation, out_activation),
                                 context_call("torch", activation, out_activation), args)


@needs_gpu
def test_context_linear_unaligned_p_and_grad_p_is_grad_out():
    # p a view starting one element in: rows not 16-byte aligned, so the scalar path must be taken.
    base = torch.randn(2, 5, 17, device="cuda")
    p = base[..., 1:].requires_grad_(False)
    _, z, w, b, pw = context_inputs(2, (5,), 16, 6, 8, True, device="cuda", requires_grad=False)
    for out_activation in ("none", "gelu"):
        torch.testing.assert_close(pk.context_linear(p, z, w, b, pw, "tanh", out_activation, backend=BACKEND),
                                   pk.context_linear(p, z, w, b, pw, "tanh", out_activation, backend="torch"))
    p = p.clone().requires_grad_(True)
    out = pk.context_linear(p, z, w, b, pw, backend=BACKEND)
    g = torch.randn_like(out)
    (gp,) = torch.autograd.grad(out, p, g)
    assert gp.data_ptr() == g.data_ptr()


@needs_gpu
def test_context_linear_gradcheck_float64():
    for activation, out_activation in (("gelu", "none"), ("tanh", "sigmoid"), ("sigmoid", "gelu"), ("none", "tanh")):
        args = context_inputs(2, (3, 2), 4, 3, 2, True, torch.float64, "cuda")
        assert torch.autograd.gradcheck(context_call(BACKEND, activation, out_activation), args)
    args = context_inputs(3, (2,), 3, 4, 2, False, torch.float64, "cuda", noncontiguous=True)
    assert torch.autograd.gradcheck(context_call(BACKEND, "tanh", "tanh"), args)


@needs_gpu
def test_context_linear_opcheck_on_cuda_tensors():
    ops = torch.ops.pf_kernels
    for args in (context_inputs(3, (4,), 5, 6, 7, True, device="cuda") + ("relu", "none"),
                 context_inputs(2, (3, 2), 8, 5, 16, False, torch.bfloat16, "cuda") + ("gelu", "gelu"),
                 context_inputs(0, (5,), 4, 6, 3, True, device="cuda") + ("tanh", "relu"),
                 context_inputs(3, (4,), 5, 6, 7, True, device="cuda", noncontiguous=True) + ("sigmoid", "tanh")):
        torch.library.opcheck(ops.context_linear.default, args)
    p, z, w, b, pw = context_inputs(3, (4,), 5, 6, 7, True, device="cuda", requires_grad=False)
    for out_activation, saved_out, saved_p in (("none", None, None), ("relu", True, None), ("gelu", None, True)):
        out = ops.context_linear(p, z, w, b, pw, "tanh", out_activation)
        torch.library.opcheck(ops.context_linear_backward.default,
                              (torch.randn_like(out), out if saved_out else None, p if saved_p else None, z, w, b,
                               pw, "tanh", out_activation))


@needs_gpu
def test_context_linear_is_deterministic_and_graph_capturable():
    p, z, w, b, pw = context_inputs(4, (3000,), 32, 16, 8, True, device="cuda")
    g = torch.randn(p.shape, device="cuda")

    def grads():
        out = pk.context_linear(p, z, w, b, pw, "tanh", "relu", backend=BACKEND)
        return torch.autograd.grad(out, [p, z, w, b, pw], g)

    first = grads()
    for a, c in zip(first, grads()):
        assert torch.equal(a, c)  # positions reduced in a fixed order
    # No host synchronisation: the forward captures into a CUDA graph and replays equal.
    static_p = p.detach().clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        pk.context_linear(static_p, z, w, b, pw, "gelu", "tanh", backend=BACKEND)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = pk.context_linear(static_p, z, w, b, pw, "gelu", "tanh", backend=BACKEND)
    static_p.copy_(torch.randn_like(static_p))
    graph.replay()
    torch.testing.assert_close(static_out, pk.context_linear(static_p, z, w, b, pw, "gelu", "tanh", backend="torch"))


def test_cuda_build_check_script():
    """Compiles the CUDA kernels without a GPU and fails on spills (opt-in: it takes minutes)."""
    if not os.path.exists("/usr/local/cuda/bin/nvcc") and not os.environ.get("CUDA_HOME"):
        pytest.skip("no CUDA toolkit (/usr/local/cuda/bin/nvcc)")
    if os.environ.get("PF_KERNELS_CUDA_BUILD_CHECK") != "1":
        pytest.skip("opt-in: set PF_KERNELS_CUDA_BUILD_CHECK=1 to compile the CUDA kernels (minutes)")
    script = os.path.join(ROOT, ".ci", "cuda_build_check.sh")
    result = subprocess.run(["bash", script], capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    assert result.returncode == 0, result.stderr[-4000:]
    if "SKIPPED" in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[-2])


def test_kernel_calls_script_covers_every_code_path(extension):
    """tests/gpu/cuda_kernel_calls.py (run under compute-sanitizer on the GPU) reaches every path of
    the kernels' launch plans, on an H100 / H200 (132 SMs) and an A100 (108)."""
    from tests.gpu import cuda_kernel_calls
    for sm_count in ("132", "108"):
        assert cuda_kernel_calls.main(["--plan-only", "--sm-count", sm_count]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run of machines without a GPU")
def test_kernel_calls_script_skips_without_a_gpu():
    script = os.path.join(ROOT, "tests", "gpu", "cuda_kernel_calls.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.startswith("SKIPPED"), result.stdout + result.stderr


@needs_gpu
def test_sizes_past_the_old_grid_and_shared_memory_limits():
    # fusion_head's batch was on gridDim.y (B <= 2,097,120); backproj_concat's context lived in
    # shared memory (fp32 Dc <= 58,112 on an H100); B > 65535 rows for the copy kernel.
    hs, w, b = fusion_inputs(65_535 * 32 + 5, (3, 2), 2, device="cuda")
    assert_matches_reference(fusion_call(BACKEND, "tanh"), fusion_call("torch", "tanh"), (w, b, *hs))
    args = backproj_inputs(70_000, (), 2, 3, 2, True, device="cuda")
    assert_matches_reference(backproj_call(BACKEND, "relu"), backproj_call("torch", "relu"), args)
    for Dz in (0, 3):  # the context inline (Dz = 0: act(bias)) and from a GEMM, 30 shared-memory chunks each
        args = backproj_inputs(2, (3,), 5, Dz, 60_000, True, device="cuda", weight_scale=1.0)
        assert_matches_reference(backproj_call(BACKEND, "gelu"), backproj_call("torch", "gelu"), args)


@needs_gpu
def test_more_than_2_31_output_elements():
    """B * positions * (Dx + Dc) >= 2^31 (fp16: 4 GiB out): the index math is 64-bit throughout.
    Checked on slices (a float64 reference of the whole would need 17 GiB)."""
    P, Dx, Dz, Dc = 2**27 + 3, 8, 4, 8
    x = torch.randn(1, P, Dx, device="cuda", dtype=torch.float16)
    z = torch.randn(1, Dz, device="cuda", dtype=torch.float16, requires_grad=True)
    w = (torch.randn(Dc, Dz, device="cuda") * 0.5).half().requires_grad_()
    b = torch.randn(Dc, device="cuda", dtype=torch.float16, requires_grad=True)
    out = pk.backproj_concat(x, z, w, b, "tanh", backend=BACKEND)
    assert out.numel() >= 2**31
    context = reference.linear_act(z.detach(), w.detach(), b.detach(), "tanh")[0]
    for rows in (slice(0, 3), slice(P // 2, P // 2 + 3), slice(P - 3, P)):
        assert torch.equal(out[0, rows, :Dx], x[0, rows])
        torch.testing.assert_close(out[0, rows, Dx:], context.expand(3, Dc), rtol=1e-3, atol=1e-3)
    del x
    grad_out = torch.full_like(out, 2.0**-20)  # the context's gradient: P * 2^-20 = 128 per feature
    gz, gw, gb = torch.autograd.grad(out, (z, w, b), grad_out)
    del out, grad_out
    z64, w64, b64 = (t.detach().double().requires_grad_() for t in (z, w, b))
    y = reference.apply_activation(z64 @ w64.T + b64, "tanh")
    ez, ew, eb = torch.autograd.grad(y, (z64, w64, b64), torch.full_like(y, P * 2.0**-20))
    for got, exact in ((gz, ez), (gw, ew), (gb, eb)):
        torch.testing.assert_close(got.double(), exact, rtol=4e-3, atol=1e-2 * exact.abs().max().item())


def _graph_capture_matches_eager(step, inputs):
    """Captures step(*inputs) (forward and backward) with torch.cuda.graph after a warm-up, replays
    it on fresh input values and compares with eager."""
    static = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(*static)
    for t in static:
        with torch.no_grad():
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    fresh = [t.detach().clone().requires_grad_(t.requires_grad) for t in static]
    for got, want in zip(captured, step(*fresh)):
        torch.testing.assert_close(got, want)


@needs_gpu
@pytest.mark.parametrize("shape", [(4, (5,), 6, 7, 9), (2, (300,), 8, 200, 300)], ids=["inline", "gemm-split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_capture_of_forward_and_backward(shape, dtype):
    x, z, w, b = backproj_inputs(*shape, True, dtype, device="cuda")
    B, S, Dx, Dz, Dc = shape
    hs, hw, hb = fusion_inputs(B, (5, 3), Dz, True, dtype, device="cuda")
    gout = torch.randn(B, *S, Dx + Dc, device="cuda", dtype=dtype)

    def step(x, z, w, b, hw, hb, h0, h1):
        zz = pk.fusion_head([h0, h1], hw, hb, "tanh", backend=BACKEND)
        out = pk.backproj_concat(x, z + zz, w, b, "gelu", backend=BACKEND)
        return (out, *torch.autograd.grad((out * gout).sum(), (z, w, b, hw, hb, h0, h1)))

    _graph_capture_matches_eager(step, (x, z, w, b, hw, hb, *hs))
