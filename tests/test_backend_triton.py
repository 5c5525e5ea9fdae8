"""The triton backend against the reference, on CPU tensors through the Triton interpreter (on CUDA
tensors when a GPU is present): every op, odd shapes, B = 0, position dims none/(T,)/(H, W)/more,
every activation, bias or not, strided inputs, fp32/bf16/fp16, forward and every gradient;
torch.compile(fullgraph=True) and torch.library.opcheck on the registered ops. Also: every autotune
config of every kernel (forced one at a time), fp32 sigmoid/tanh to a relative bound, grid limits
of every launch (arithmetic on meta tensors), the device guard, offsets beyond 2^31 (a subprocess
with a 4 GB virtual buffer), no host synchronisation in any launch, autotune keys that do not
change with the batch size within a power of two.

TRITON_INTERPRET must be set before pf_kernels.triton is imported (the kernels are decorated then),
so it is set here, at collection. backend="auto" still picks "cpu" for CPU tensors.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

import pf_kernels as pk  # noqa: E402
from pf_kernels import reference  # noqa: E402
from tests.cases import (ACTIVATIONS, BACKPROJ_SHAPES, FUSION_SHAPES, assert_backproj_output_writable,  # noqa: E402
                         assert_fusion_output_writable, assert_matches_reference,
                         assert_ops_compile_without_graph_breaks, backproj_call, backproj_inputs,
                         context_call, context_inputs, fusion_call, fusion_inputs, hoisted_step_call,
                         hoisted_step_inputs, rand)

BACKEND = "triton"
_info = pk.available_backends()[BACKEND]
if not _info["available"]:
    pytest.skip(f"triton backend unavailable: {_info['reason']}", allow_module_level=True)
tr = sys.modules["pf_kernels.triton"]
DEVICE = "cpu" if tr.INTERPRET else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("pf_kernels.triton was imported before TRITON_INTERPRET=1 was set and there is no GPU; "
                "run this file on its own or set TRITON_INTERPRET=1", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
COMBOS = [(a, bias) for bias in (True, False) for a in ACTIVATIONS]  # 10


def combos(index, count=2):
    """A rotating pair of (activation, bias): across the cases of one dtype, every one appears."""
    return [COMBOS[(count * index + i) % len(COMBOS)] for i in range(count)]


def test_backend_serves_this_device_and_auto_keeps_cpu():
    assert DEVICE in _info["devices"]
    from pf_kernels._dispatch import resolve_backend
    assert resolve_backend("triton", "refine_step", torch.device(DEVICE), torch.float32) == "triton"
    if DEVICE == "cpu" and pk.available_backends()["cpu"]["available"]:
        assert resolve_backend("auto", "backproj_concat", torch.device("cpu"), torch.float32) == "cpu"
    assert "dtype" in tr.unsupported("fusion_head", torch.device(DEVICE), torch.float64)


@pytest.mark.parametrize("index,shape", list(enumerate(BACKPROJ_SHAPES)), ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contig", "strided"])
def test_backproj_concat(index, shape, dtype, noncontiguous):
    B, S, Dx, Dz, Dc = shape
    for activation, bias in combos(2 * index + noncontiguous):
        args = backproj_inputs(B, S, Dx, Dz, Dc, bias, dtype, DEVICE, noncontiguous=noncontiguous)
        assert_matches_reference(backproj_call(BACKEND, activation), backproj_call("torch", activation), args)


def test_backproj_concat_output_written_in_place():
    assert_backproj_output_writable(BACKEND, DEVICE)


def test_fusion_head_output_written_in_place():
    assert_fusion_output_writable(BACKEND, DEVICE)


def test_backproj_concat_larger_than_one_block():
    # positions, features and Dz beyond one block of every config the interpreter runs
    args = backproj_inputs(2, (5, 9), 70, 40, 37, True, torch.float32, DEVICE, noncontiguous=True)
    assert_matches_reference(backproj_call(BACKEND, "gelu"), backproj_call("torch", "gelu"), args)


@pytest.mark.parametrize("index,shape", list(enumerate(FUSION_SHAPES + [(5, tuple(range(1, 11)), 6)])),
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contig", "strided"])
def test_fusion_head(index, shape, dtype, noncontiguous):
    # the last shape has 10 inputs: more than MAX_K, served through a concatenated copy
    B, dims, Dz = shape
    for activation, bias in combos(2 * index + noncontiguous):
        hs, w, b = fusion_inputs(B, dims, Dz, bias, dtype, DEVICE, noncontiguous=noncontiguous)
        assert_matches_reference(fusion_call(BACKEND, activation), fusion_call("torch", activation), (w, b, *hs))


def test_fusion_head_several_tiles():
    hs, w, b = fusion_inputs(70, (40, 3, 33), 70, True, torch.float32, DEVICE, noncontiguous=True)
    assert_matches_reference(fusion_call(BACKEND, "sigmoid"), fusion_call("torch", "sigmoid"), (w, b, *hs))


def _refine_case(dtype, xs_shapes, cs, dims=(4, 5, 6), Dz=7, biases=(True, False, True), B=3,
                 noncontiguous=False):
    hs, hw, hb = fusion_inputs(B, dims, Dz, True, dtype, DEVICE, noncontiguous=noncontiguous)
    xs = [rand((B, *s), dtype, DEVICE, noncontiguous, True) for s in xs_shapes]
    ws = [(rand((c, Dz), torch.float64, DEVICE) * 0.4).to(dtype).requires_grad_(True) for c in cs]
    bs = [rand((c,), dtype, DEVICE, False, True) if has else None for c, has in zip(cs, biases)]
    return hs, hw, hb, xs, ws, bs


def _check_refine(hs, hw, hb, xs, ws, bs, head_act, bp_act):
    k, n = len(hs), len(xs)
    present = [i for i, b in enumerate(bs) if b is not None]

    def step(backend):
        def run(hw_, hb_, *rest):
            h, x, w = list(rest[:k]), list(rest[k:k + n]), list(rest[k + n:k + 2 * n])
            given = iter(rest[k + 2 * n:])
            b = [next(given) if i in present else None for i in range(n)]
            return pk.refine_step(h, hw_, hb_, x, w, b, head_act, bp_act, backend=backend)
        return run

    args = (hw, hb, *hs, *xs, *ws, *[bs[i] for i in present])
    assert_matches_reference(step(BACKEND), step("torch"), args)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_refine_step(activation, dtype):
    head_act = ACTIVATIONS[(ACTIVATIONS.index(activation) + 2) % len(ACTIVATIONS)]
    case = _refine_case(dtype, [(4,), (5, 2), (2, 3, 4)], (2, 3, 1),
                        noncontiguous=activation in ("gelu", "sigmoid"))
    _check_refine(*case, head_act, activation)


def test_refine_step_many_positions_and_splits():
    # 40 and 45 positions: several position blocks, so several programs share a batch row;
    # four position dims are merged into three; B beyond one row block.
    case = _refine_case(torch.float32, [(40, 3), (3, 3, 5, 1, 2)], (17, 2), dims=(9, 20), Dz=19,
                        biases=(False, True), B=37, noncontiguous=True)
    _check_refine(*case, "gelu", "tanh")


def test_refine_step_composed_outside_the_one_launch_limits():
    # 5 modalities (> MAX_MODALITIES) and B = 0
    case = _refine_case(torch.float32, [(2,), (3, 1), (1,), (2, 2, 1), (4,)], (1, 2, 3, 2, 1),
                        biases=(True, False, True, False, True))
    _check_refine(*case, "relu", "sigmoid")
    case = _refine_case(torch.bfloat16, [(2,), (3, 1)], (2, 2), biases=(True, True), B=0)
    _check_refine(*case, "relu", "none")


def test_refine_step_beyond_max_dz():
    from pf_kernels.triton.refine_step import MAX_DZ
    case = _refine_case(torch.float32, [(2,), (3, 1)], (2, 3), Dz=MAX_DZ + 3, biases=(True, False))
    _check_refine(*case, "tanh", "relu")


def test_grad_x_is_a_view_of_grad_out():
    x, z, w, b = backproj_inputs(2, (3,), 4, 5, 6, True, device=DEVICE, requires_grad=False)
    x.requires_grad_(True)
    out = pk.backproj_concat(x, z, w, b, backend=BACKEND)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    assert gx.data_ptr() == g.data_ptr() and gx.stride() == g.stride()


def test_inference_mode_and_no_grad():
    x, z, w, b = backproj_inputs(2, (3,), 4, 5, 6, True, device=DEVICE)
    hs, hw, hb = fusion_inputs(2, (3, 4), 5, device=DEVICE)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.testing.assert_close(pk.backproj_concat(x, z, w, b, backend=BACKEND),
                                       reference.backproj_concat(x, z, w, b))
            torch.testing.assert_close(pk.fusion_head(hs, hw, hb, "gelu", backend=BACKEND),
                                       reference.fusion_head(hs, hw, hb, "gelu"))
            z1, (x1,) = pk.refine_step(hs, hw, hb, [x], [w[:, :5]], [b], "gelu", backend=BACKEND)
            z2, (x2,) = reference.refine_step(hs, hw, hb, [x], [w[:, :5]], [b], "gelu")
            torch.testing.assert_close(z1, z2)
            torch.testing.assert_close(x1, x2)


def test_tf32_switch_only_changes_fp32_precision_name():
    from pf_kernels.triton._common import TF32_ENV, dot_precision
    old = os.environ.pop(TF32_ENV, None)
    try:
        assert dot_precision(torch.float32) == "ieee"
        os.environ[TF32_ENV] = "1"
        assert dot_precision(torch.float32) == "tf32"
    finally:
        os.environ.pop(TF32_ENV, None)
        if old is not None:
            os.environ[TF32_ENV] = old


def test_compile_fullgraph_without_graph_breaks():
    assert_ops_compile_without_graph_breaks(BACKEND, DEVICE)


def _opcheck_samples():
    x, z, w, b = backproj_inputs(3, (2, 2), 5, 6, 7, True, device=DEVICE)
    yield "backproj_concat", (x, z, w, b, "gelu")
    x, z, w, b = backproj_inputs(2, (3,), 4, 5, 3, False, torch.bfloat16, DEVICE, noncontiguous=True)
    yield "backproj_concat", (x, z, w, b, "tanh")
    hs, hw, hb = fusion_inputs(4, (3, 5, 2), 6, device=DEVICE)
    yield "fusion_head", (hs, hw, hb, "gelu", True)
    hs, hw, hb = fusion_inputs(0, (3, 2), 4, False, device=DEVICE)
    yield "fusion_head", (hs, hw, hb, "none", False)
    hs, hw, hb = fusion_inputs(3, (4, 5), 7, device=DEVICE)
    xs = [rand((3, 4), device=DEVICE, requires_grad=True), rand((3, 2, 3), device=DEVICE, requires_grad=True)]
    ws = [(rand((c, 7), device=DEVICE) * 0.4).requires_grad_(True) for c in (2, 3)]
    bs = [rand((3,), device=DEVICE, requires_grad=True)]
    yield "refine_step", (hs, hw, hb, xs, ws, bs, 0b10, "sigmoid", "gelu", True)
    vs = [rand((4, 2), device=DEVICE, requires_grad=True), rand((3, 3), device=DEVICE, requires_grad=True)]
    yield "refine_step_hoisted", (hs, hw, hb, xs, ws, bs, vs, 0b10, "sigmoid", "gelu", 1 | 2 << 3, True)


@pytest.mark.parametrize("name,args", list(_opcheck_samples()),
                         ids=["backproj", "backproj-bf16", "fusion", "fusion-B0", "refine", "refine-hoisted"])
def test_opcheck(name, args):
    importlib.import_module("pf_kernels.triton")
    torch.library.opcheck(getattr(torch.ops.pf_kernels_triton, name).default, args)


def test_opcheck_backward_ops():
    x, z, w, b = backproj_inputs(3, (4,), 5, 6, 7, True, device=DEVICE, requires_grad=False)
    out = pk.backproj_concat(x, z, w, b, "tanh", backend=BACKEND)
    torch.library.opcheck(torch.ops.pf_kernels_triton.backproj_concat_backward.default,
                          (torch.randn_like(out), z, w, b, "tanh", 5))
    hs, hw, hb = fusion_inputs(4, (3, 5), 6, device=DEVICE, requires_grad=False)
    out, pre = torch.ops.pf_kernels_triton.fusion_head(hs, hw, hb, "gelu", True)
    torch.library.opcheck(torch.ops.pf_kernels_triton.fusion_head_backward.default,
                          (torch.randn_like(out), hs, hw, pre, True, "gelu"))


# ------------------------------------------------------------ every config, knobs, autotune keys

common = importlib.import_module("pf_kernels.triton._common")


def _sweep_cases(dtype):
    """A few cases that go beyond one block of every config (positions, features, batch rows, input
    column tiles), and a position sum in two stages."""
    yield backproj_call(BACKEND, "gelu"), backproj_call("torch", "gelu"), \
        backproj_inputs(3, (5, 9), 40, 20, 37, True, dtype, DEVICE, noncontiguous=True)
    yield backproj_call(BACKEND, "sigmoid"), backproj_call("torch", "sigmoid"), \
        backproj_inputs(1, (700,), 3, 5, 4, False, dtype, DEVICE)
    hs, w, b = fusion_inputs(70, (40, 3, 20), 70, True, dtype, DEVICE, noncontiguous=True)
    yield fusion_call(BACKEND, "tanh"), fusion_call("torch", "tanh"), (w, b, *hs)
    yield context_call(BACKEND, "gelu", "sigmoid"), context_call("torch", "gelu", "sigmoid"), \
        context_inputs(3, (5, 9), 70, 40, 37, True, dtype, DEVICE, noncontiguous=True)
    yield context_call(BACKEND, "tanh", "relu"), context_call("torch", "tanh", "relu"), \
        context_inputs(1, (700,), 5, 4, 3, False, dtype, DEVICE)


@pytest.mark.parametrize("config", range(1, common.max_configs()), ids=lambda i: f"config{i}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_autotune_config(config, dtype):
    # config 0 (every kernel's safe config) runs in all the other tests
    with common.forced_config(config):
        assert all(t.tuner().configs[0] is t.configs[config % len(t.configs)] for t in common.TUNED)
        for fn, ref, args in _sweep_cases(dtype):
            assert_matches_reference(fn, ref, args)
        case = _refine_case(dtype, [(12, 3), (3, 3, 2, 1, 2)], (37, 2), dims=(9, 20), Dz=19,
                            biases=(False, True), B=17, noncontiguous=True)
        _check_refine(*case, "gelu", "tanh")
        args = hoisted_step_inputs(17, (9, 20), 40, [((9,), 70), ((3, 5), 33)], dtype, DEVICE, True, Dcs=[37, 5])
        assert_matches_reference(hoisted_step_call(BACKEND), hoisted_step_call("torch"), args)


def test_knobs_pick_configs_without_benchmarking(monkeypatch):
    tuned = common.TUNED[0]
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(common, "AUTOTUNE", True)
    monkeypatch.setattr(common, "_forced", None)
    assert tuned.index() is None and tuned.tuner().configs == tuned.configs  # autotuned
    monkeypatch.setattr(common, "AUTOTUNE", False)  # PF_KERNELS_TRITON_AUTOTUNE=0
    assert tuned.index() == tuned.safe and tuned.tuner().configs == [tuned.configs[tuned.safe]]
    with common.forced_config(len(tuned.configs) + 1):  # as PF_KERNELS_TRITON_CONFIG=i
        assert tuned.tuner().configs == [tuned.configs[1 % len(tuned.configs)]]
    monkeypatch.setenv(common.CONFIG_ENV, "1")
    assert common._config_from_env() == 1
    monkeypatch.setenv(common.CONFIG_ENV, "x")
    with pytest.raises(ValueError, match=common.CONFIG_ENV):
        common._config_from_env()
    assert all(t.key == ["SIZE_CLASS"] for t in common.TUNED)


class _Recorder:
    """Stands in for the kernel launch: records every launch's Tuned name, grid per config and
    arguments, and runs nothing (so launchers can be called on meta tensors of any size)."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel, grid, args, kwargs, device):
        self.launches.append((kernel, common.grids(kernel, grid), args, kwargs))


def _all_ops_on(device, B, P, Dx, Dz, Dc, dims, modalities=2, dtype=torch.float32):
    """Every op forward and backward launcher on tensors of these sizes (no autograd)."""
    bp = importlib.import_module("pf_kernels.triton.backproj_concat")
    fh = importlib.import_module("pf_kernels.triton.fusion_head")
    rs = importlib.import_module("pf_kernels.triton.refine_step")
    cl = importlib.import_module("pf_kernels.triton.context_linear")

    def e(*shape):
        return torch.empty(*shape, dtype=dtype, device=device)

    x, z, w, b = e(B, P, Dx), e(B, Dz), e(Dc, Dz), e(Dc)
    out = bp._forward(x, z, w, b, "gelu")
    bp._backward(out, z, w, b, "gelu", Dx)
    pw = e(Dx, Dc)
    p = cl._forward(x, z, w, b, pw, "tanh", "gelu")
    cl._backward(p, None, x, z, w, b, pw, "tanh", "gelu")
    hs, hw = [e(B, d) for d in dims], e(Dz, sum(dims))
    z2, pre = fh._forward(hs, hw, e(Dz), "tanh", True)
    fh.backward(z2, hs, hw, pre, True, "tanh")
    if Dz <= rs.MAX_DZ:
        xs = [e(B, P, Dx) for _ in range(modalities)]
        rs._forward(hs, hw, e(Dz), xs, [w] * modalities, [b], 1, "relu", "sigmoid", True)


@pytest.mark.parametrize("sizes", [
    dict(B=3, P=2_200_000, Dx=4, Dz=8, Dc=5, dims=(3, 2)),  # a 130^3 volume: > 65535 position blocks
    dict(B=100_000, P=1, Dx=4, Dz=16, Dc=5, dims=(5, 3)),  # batch > 65535
    dict(B=2, P=3, Dx=4, Dz=100, Dc=3, dims=(3_000_000, 7)),  # > 65535 input column tiles
    dict(B=2, P=3, Dx=4, Dz=5_000_000, Dc=3, dims=(3, 7)),  # > 65535 output column tiles
], ids=["positions", "batch", "inputs", "outputs"])
def test_grid_limits_of_every_launch(monkeypatch, sizes):
    recorder = _Recorder()
    monkeypatch.setattr(common, "_run", recorder)
    for config in range(common.max_configs()):
        with common.forced_config(config):
            _all_ops_on("meta", **sizes)
    assert recorder.launches
    for kernel, grids, _args, _kwargs in recorder.launches:
        for grid in grids:
            assert all(0 <= n <= limit for n, limit in zip(grid, common.GRID_LIMITS)), (kernel, grid)


def test_fp16_backward_gemms_keep_the_references_range_and_precision():
    """dot_split sends an fp32 gradient into fp16 tensor-core dots as hi + lo. Unscaled, a gradient
    times gelu' (up to 1.13) beyond 65504 became inf, then NaN, where the reference (fp32 GEMMs)
    stays finite; and below 2^-14 both parts were subnormal, 16x less accurate than the reference."""
    torch.manual_seed(0)
    dev, dt = DEVICE, torch.float16
    h = [(torch.randn(16, 16, device=dev) * 0.01).to(dt) for _ in range(2)]
    w = (torch.randn(16, 32, device=dev) * 0.01).to(dt)
    b = torch.full((16,), 1.414, dtype=dt, device=dev)  # gelu' near its maximum
    g = torch.full((16, 16), 60000.0, dtype=dt, device=dev)
    grads = {}
    for backend in ("triton", "torch"):
        args = [t.clone().requires_grad_(True) for t in (*h, w, b)]
        pk.fusion_head(args[:2], args[2], args[3], "gelu", backend=backend).backward(g)
        grads[backend] = [a.grad for a in args[:3]]  # (the bias's batch sum is beyond fp16 in both)
    assert all(torch.isfinite(t).all() for t in grads["torch"])
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-2, atol=1.0)
    # Small gradients: against fp64, within twice the reference's own error.
    x = torch.randn(256, 32, device=dev).to(dt)
    w = (torch.randn(32, 32, device=dev) * 0.2).to(dt)
    b = torch.randn(32, device=dev).to(dt)
    g = (torch.randn(256, 32, device=dev) * 1e-6).to(dt)
    truth = [t.double().requires_grad_(True) for t in (x, w)]
    torch.sigmoid(truth[0] @ truth[1].T + b.double()).backward(g.double())
    errors = {}
    for backend in ("triton", "torch"):
        args = [t.clone().requires_grad_(True) for t in (x, w)]
        pk.fusion_head([args[0]], args[1], b, "sigmoid", backend=backend).backward(g)
        errors[backend] = [float((a.grad.double() - t.grad).norm() / t.grad.norm()) for a, t in zip(args, truth)]
    assert all(e <= 2 * r + 1e-4 for e, r in zip(errors["triton"], errors["torch"])), errors


def test_positions_stop_short_of_int32_overflow_in_the_kernels_loops():
    # The kernels' strided position loops step past the last position by up to 65535 programs x a
    # block (< 2^23); from 2^31 - 2^23 positions, that step would wrap int32. (Stride-0: no memory.)
    largest = torch.empty(1, 1, 2).expand(1, common.MAX_POSITIONS - 1, 2)
    assert common.positions(largest)[1][0] == common.MAX_POSITIONS - 1
    assert 65535 * max(c["BP"] for c in _bp_configs()) < 2 ** 31 - common.MAX_POSITIONS
    with pytest.raises(ValueError, match=r"2147483648 positions per batch row .* fewer than 2\^31 - 2\^23"):
        common.positions(torch.empty(1, 1, 2).expand(1, 2 ** 31, 2))
    with pytest.raises(ValueError, match="fewer than 2\\^31 - 2\\^23"):
        common.positions(torch.empty(1, 1, 1, 2).expand(1, 2 ** 16, 2 ** 15 - 2 ** 7, 2))


def _bp_configs():
    modules = [importlib.import_module(f"pf_kernels.triton.{m}")
               for m in ("context_linear", "refine_step", "refine_step_hoisted")]
    return [c for m in modules for name in dir(m) if name.endswith(("CONFIGS", "CONFIGS_FP32"))
            for c in getattr(m, name) if "BP" in c]


def test_grid_beyond_every_limit_is_a_clear_error():
    with pytest.raises(ValueError, match="grid axis 0"):
        common.check_grid("k", (2 ** 31, 1, 1))
    with pytest.raises(ValueError, match="grid axis 1"):
        common.check_grid("k", (1, 65536, 1))


def test_autotune_keys_bucket_the_batch_and_positions(monkeypatch):
    # a new batch size or sequence length in the same power-of-two bucket must not re-benchmark
    def keys(B, P):
        recorder = _Recorder()
        monkeypatch.setattr(common, "_run", recorder)
        _all_ops_on("meta", B=B, P=P, Dx=6, Dz=24, Dc=10, dims=(7, 9), modalities=1)
        return [(getattr(k, "fn", k), kw.get("SIZE_CLASS", a[-1])) for k, _g, a, kw in recorder.launches]

    base = keys(40, 300)
    assert base == keys(33, 300) == keys(63, 260) == keys(50, 511)
    assert base != keys(65, 300)  # the next bucket


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="fake cuda:1 tensors need a second GPU where CUDA is real; this stand-in "
                           "check runs wherever no GPU is visible (CI)")
def test_launches_on_the_tensors_device(monkeypatch):
    # Triton launches on the current device: tensors on cuda:1 with cuda:0 current need a guard.
    from torch._subclasses.fake_tensor import FakeTensorMode
    current = [0]
    seen = []

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    class Kernel:
        configs = [triton.Config({})]

        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(current[0])

    class Stub:
        name = "stub"

        def tuner(self):
            return Kernel()

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(common, "INTERPRET", True)  # call the stub as it is (no wrap_triton)
    with FakeTensorMode():
        on_1, on_0 = torch.empty(4, device="cuda:1"), torch.empty(4, device="cuda:0")
    common.launch(Stub(), (1,), on_1, 3)
    common.launch(Stub(), (1,), on_0, 3)
    assert seen == [1, 0] and current[0] == 0


def test_no_host_synchronisation_in_any_launch(monkeypatch):
    # What would break CUDA-graph capture after a warm-up call (which compiles, and autotunes where
    # that is on): reading a tensor's value on the host, or synchronising.
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoHostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("_local_scalar_dense", "item", "equal", "is_nonzero"):
                self.reads.append(func)
            return func(*args, **(kwargs or {}))

    def no_sync(*args, **kwargs):
        raise AssertionError("torch.cuda.synchronize in a launch")

    x, z, w, b = backproj_inputs(2, (3,), 3, 4, 5, True, device=DEVICE)
    hs, hw, hb = fusion_inputs(2, (2, 4), 4, device=DEVICE)
    pw = rand((3, 5), device=DEVICE, requires_grad=True)

    def step():
        out = pk.backproj_concat(x, z, w, b, "tanh", backend=BACKEND)
        f = pk.fusion_head(hs, hw, hb, "gelu", backend=BACKEND)
        zz, (xt,) = pk.refine_step(hs, hw, hb, [x], [w], [b], "relu", "sigmoid", backend=BACKEND)
        c = pk.context_linear(x, z, w, b, pw, "gelu", "tanh", backend=BACKEND)
        torch.autograd.grad([out.sum(), f.sum(), zz.sum(), xt.sum(), c.sum()], [x, z, w, b, hw, hb, pw, *hs])

    step()  # the warm-up
    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    mode = NoHostReads()
    with mode:
        step()
    assert not mode.reads


def test_position_sum_in_two_stages_is_deterministic():
    bp = importlib.import_module("pf_kernels.triton.backproj_concat")
    B, P, Dc = 1, 700, 4
    assert bp.chunks(B, P, Dc)[0] > 1  # this case takes the two-stage path
    x, z, w, b = backproj_inputs(B, (P,), 3, 5, Dc, True, device=DEVICE)
    g = torch.randn(B, P, 3 + Dc, dtype=torch.float64, device=DEVICE).float()
    first = bp._backward(g, z.detach(), w.detach(), b.detach(), "gelu", 3)
    again = bp._backward(g, z.detach(), w.detach(), b.detach(), "gelu", 3)
    assert all(torch.equal(u, v) for u, v in zip(first, again))


def test_fusion_head_bias_gradient_without_input_columns():
    # every input 0 wide: no grad_weight tile at all, grad_bias must still be written
    hs = [rand((5, 0), device=DEVICE, requires_grad=True) for _ in range(2)]
    w, b = rand((4, 0), device=DEVICE, requires_grad=True), rand((4,), device=DEVICE, requires_grad=True)
    for activation in ("relu", "sigmoid"):
        assert_matches_reference(fusion_call(BACKEND, activation), fusion_call("torch", activation), (w, b, *hs))


# ------------------------------------------------------------------ precision of the activations

def _relative_error(got, exact):
    return ((got.double() - exact).abs() / exact.abs().clamp_min(1e-300)).max().item()


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_fp32_activation_and_derivative_to_a_relative_bound(activation):
    # pre-activations that are exactly y: one input of width 1 times a weight of 1, no bias. Then
    # the op's output is act(y) and the input's gradient (grad_out = 1) is act'(y), each rounded
    # once; both must be within ~1e-6 relative of the exact values, not only close in absolute
    # terms (sigmoid(-80) = 1.8e-35; tanh(1e-6) = 1e-6).
    if activation == "sigmoid":
        y = torch.cat([torch.linspace(-80, 30, 56), torch.tensor([-16.7, -10.0, -1e-3, 1e-3])])
    else:
        y = torch.cat([torch.linspace(-40, 40, 41), torch.tensor([1e-6, -3e-4, 0.1, -0.45, 0.55])])
        y = y[y != 0]
    y = y.to(torch.float32)
    yd = y.double()
    if activation == "sigmoid":
        e = torch.exp(-yd.abs())
        exact, exact_grad = torch.where(yd < 0, e, 1.0) / (1 + e), e / (1 + e) ** 2
        eager = torch.sigmoid(y)
    else:
        e = torch.exp(-2 * yd.abs())
        exact, exact_grad = torch.tanh(yd), 4 * e / (1 + e) ** 2
        eager = torch.tanh(y)
    one = torch.ones(1, 1, device=DEVICE)
    h = y.to(DEVICE).reshape(-1, 1).requires_grad_(True)
    results = {}
    out = pk.fusion_head([h], one, None, activation, backend=BACKEND)
    (grad,) = torch.autograd.grad(out, h, torch.ones_like(out))
    results["fusion_head"] = (out[:, 0], grad[:, 0])
    x = torch.zeros(len(y), 1, device=DEVICE)
    out = pk.backproj_concat(x, h, one, None, activation, backend=BACKEND)
    (grad,) = torch.autograd.grad(out, h, torch.ones_like(out))
    results["backproj_concat"] = (out[:, 1], grad[:, 0])
    z, (xt,) = pk.refine_step([h], one, None, [x], [one], [None], "none", activation, backend=BACKEND)
    results["refine_step"] = (xt[:, 1], None)
    bound = 1e-6
    assert _relative_error(eager, exact) <= bound  # torch itself is this close
    for op, (value, grad) in results.items():
        assert _relative_error(value.cpu(), exact) <= bound, f"{op}: {activation}(y)"
        if grad is not None:
            assert _relative_error(grad.cpu(), exact_grad) <= bound, f"{op}: {activation}'(y)"


def test_relu_keeps_nan_as_torch_does():
    h = torch.tensor([[float("nan")], [-1.0], [2.0]], device=DEVICE)
    out = pk.fusion_head([h], torch.ones(1, 1, device=DEVICE), None, "relu", backend=BACKEND)
    torch.testing.assert_close(out.cpu(), torch.relu(h).cpu(), equal_nan=True)


# ------------------------------------------------------------------ offsets beyond int32

_WIDE_OFFSETS = r"""
import sys
import torch, pf_kernels as pk
from pf_kernels.triton._matmul import mm
device = sys.argv[1]
torch.manual_seed(0)
S = 2 ** 29  # a feature stride: 4 features span more than 2^31 elements
# 4 GB of fp16: on the CPU only address space (a few pages touched); on a GPU real memory
buf = torch.empty(4 * S + 128, dtype=torch.float16, device=device)

def rand(*shape, dtype=torch.float16):
    return torch.randn(*shape, dtype=torch.float64).to(dtype).to(device)

def view(shape, strides, offset=0):
    v = buf.as_strided(shape, strides, offset)
    v.copy_(rand(*shape))
    return v

def check(name, got, want, tol=2e-2):
    for g, w in zip(got, want):
        err = (g.double() - w.double()).abs().max().item()
        assert err <= tol * max(1.0, w.double().abs().max().item()), (name, err)

# matmul: K * stride past 2^31
a = rand(3, 5, dtype=torch.float32)
b = view((5, 2), (S, 1), 7)
check("mm", [mm(a, b, torch.float32)], [a.double() @ b.double()])
# fusion_head: input feature stride and weight feature stride past 2^31
h = view((3, 5), (1, S), 16).requires_grad_(True)
w = view((2, 5), (1, S), 32).requires_grad_(True)
for backend in ("triton", "torch"):
    out = pk.fusion_head([h], w, None, "tanh", backend=backend)
    grads = torch.autograd.grad(out, [h, w], torch.ones_like(out))
    if backend == "triton":
        got = [out, *grads]
    else:
        check("fusion_head", got, [out, *grads])
# fusion_head and refine_step's head: the weight's row stride past 2^31 (row 4 at 4 S)
hr, xr, wb = rand(3, 4), rand(3, 2), rand(3, 5)
wr = view((5, 4), (S, 1), 112)
for backend in ("triton", "torch"):
    hr_, wr_ = hr.clone().requires_grad_(True), wr.requires_grad_(True)
    out = pk.fusion_head([hr_], wr_, None, "tanh", backend=backend)
    zr, (xt,) = pk.refine_step([hr_], wr_, None, [xr], [wb], [None], "tanh", "relu", backend=backend)
    grads = torch.autograd.grad(out.sum() + zr.square().sum() + xt.sum(), [hr_, wr_])
    if backend == "triton":
        got = [out, zr, xt, *grads]
    else:
        check("fusion_head/refine_step row stride", got, [out, zr, xt, *grads])
# backproj_concat and refine_step: x's feature stride past 2^31
x = view((2, 3, 5), (1, 2, S), 48).requires_grad_(True)
z, wz, hz, hw = rand(2, 4), rand(3, 4), rand(2, 4), rand(4, 4)
for backend in ("triton", "torch"):
    out = pk.backproj_concat(x, z, wz, None, "relu", backend=backend)
    zz, (xt,) = pk.refine_step([hz], hw, None, [x], [wz], [None], "relu", "relu", backend=backend)
    (gx,) = torch.autograd.grad(out, [x], torch.ones_like(out))
    if backend == "triton":
        got = [out, xt, gx]
    else:
        check("backproj_concat/refine_step", got, [out, xt, gx])
# context_linear: p's and grad_out's feature stride past 2^31 (read in place, no copy)
p = view((2, 3, 5), (1, 2, S), 80).requires_grad_(True)
g = view((2, 3, 5), (1, 2, S), 96)
wc = rand(5, 3)
results = {}
for backend in ("triton", "torch"):
    results[backend] = []
    for out_act in ("none", "gelu"):
        out = pk.context_linear(p, z, wz, None, wc, "relu", out_act, backend=backend)
        results[backend] += [out, *torch.autograd.grad(out, [p], g)]
check("context_linear", results["triton"], results["torch"])
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU the limit cases of tests/gpu/differential.py (an output of 2^31+ "
                           "elements) run the real kernels; the interpreter breaks on numpy >= 2.5 there")
def test_offsets_beyond_int32():
    # The kernels index with int64 where stride products can pass 2^31. In a subprocess: a wrapped
    # offset would read outside the buffer (and may crash). On a GPU it takes 4 GB of its memory.
    env = dict(os.environ)
    if DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", _WIDE_OFFSETS, DEVICE], env=env, capture_output=True,
                          text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-4000:]


def test_repeat_launches_take_the_config_chosen_first(monkeypatch):
    # A key's first launch goes through triton's autotuner, which chooses; later launches of that
    # key (same size classes and dtypes) skip it and run the chosen config: same results.
    common = importlib.import_module("pf_kernels.triton._common")
    tuner_runs = []
    autotuner = importlib.import_module("triton.runtime.autotuner").Autotuner
    original = autotuner.run
    monkeypatch.setattr(autotuner, "run", lambda self, *a, **k: tuner_runs.append(self) or original(self, *a, **k))
    kernels = [t.tuner() for t in common.TUNED]
    for kernel in kernels:
        monkeypatch.setattr(kernel, "pf_chosen", {})
    hs, w, b = fusion_inputs(5, (3, 6), 7, dtype=torch.float32, device=DEVICE)
    want = reference.fusion_head(hs, w, b, "gelu")
    for _ in range(3):
        torch.testing.assert_close(pk.fusion_head(hs, w, b, "gelu", backend=BACKEND), want)
    assert len(tuner_runs) == 1
    chosen = [k for k in kernels if k.pf_chosen]
    assert len(chosen) == 1 and len(chosen[0].pf_chosen) == 1
    # another dtype is another key: the autotuner chooses again
    hs16, w16, b16 = [h.to(torch.bfloat16) for h in hs], w.to(torch.bfloat16), b.to(torch.bfloat16)
    for _ in range(2):
        torch.testing.assert_close(pk.fusion_head(hs16, w16, b16, "gelu", backend=BACKEND).float(), want,
                                   rtol=3e-2, atol=3e-2)
    assert len(tuner_runs) == 2


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's own behaviour (on a GPU the kernels compile)")
def test_interpreter_patches_the_language_once_per_launch(monkeypatch):
    # Triton's interpreter patches triton.language per launch and again on every call of a jit
    # helper inside it; _common keeps the first (a helper's repeat only rescans the modules).
    interpreter = importlib.import_module("triton.runtime.interpreter")
    patched, launches = [], []
    original_builtin, original_launch = interpreter._patch_builtin, interpreter.GridExecutor.__call__
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *a: patched.append(a[0]) or original_builtin(*a))
    monkeypatch.setattr(interpreter.GridExecutor, "__call__",
                        lambda self, *a, **k: launches.append(self) or original_launch(self, *a, **k))
    x, z, w, b = backproj_inputs(3, (4,), 5, 6, 7, dtype=torch.float32, device=DEVICE)
    out = pk.backproj_concat(x, z, w, b, "gelu", backend=BACKEND)  # its kernels call jit helpers
    torch.testing.assert_close(out, reference.backproj_concat(x, z, w, b, "gelu"))
    assert launches
    # per launch: triton.language, its tensor and math, the descriptor base; core once, by tl.cdiv
    assert len(patched) <= 8 * len(launches), (len(patched), len(launches))


def test_eager_calls_skip_the_registered_op(monkeypatch):
    # Eager calls run the launcher directly (TritonOp); fake tensors (as torch.compile traces) go
    # through the registered op.
    from torch._subclasses.fake_tensor import FakeTensorMode
    fh = importlib.import_module("pf_kernels.triton.fusion_head")
    registered = []
    for entry in (fh.fusion_head_op, fh.fusion_head_backward_op):
        real = entry.op
        monkeypatch.setattr(entry, "op", lambda *a, real=real: registered.append(real) or real(*a))
    hs, w, b = fusion_inputs(4, (3, 5), 6, dtype=torch.float32, device=DEVICE)
    out = pk.fusion_head(hs, w, b, "tanh", backend=BACKEND)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [*hs, w, b], grad)
    want = torch.autograd.grad(reference.fusion_head(hs, w, b, "tanh"), [*hs, w, b], grad)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert registered == []
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (*hs, w, b)]
        pk.fusion_head(fake[:2], fake[2], fake[3], "tanh", backend=BACKEND)
    assert len(registered) == 1


def test_jit_trace_records_the_op():
    # torch.jit.trace sees ops, not Triton launches: a traced call must go through the registered op.
    hs, w, b = fusion_inputs(2, (3, 4), 5, requires_grad=False, device=DEVICE)
    traced = torch.jit.trace(lambda h0, h1, w_, b_: pk.fusion_head([h0, h1], w_, b_, "relu", backend=BACKEND),
                             (*hs, w, b), check_trace=False)
    assert "pf_kernels_triton::fusion_head" in [n.kind() for n in traced.graph.nodes()]
    fresh = [torch.randn_like(h) for h in hs]
    torch.testing.assert_close(traced(*fresh, w, b), reference.fusion_head(fresh, w, b))


def test_forward_mode_ad_raises_instead_of_dropping_the_tangent():
    import torch.autograd.forward_ad as fwAD
    hs, w, b = fusion_inputs(2, (3, 4), 5, requires_grad=False, device=DEVICE)
    with fwAD.dual_level():
        dual = fwAD.make_dual(hs[0], torch.randn_like(hs[0]))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            pk.fusion_head([dual, hs[1]], w, b, backend=BACKEND)
    torch.testing.assert_close(pk.fusion_head(hs, w, b, backend=BACKEND), reference.fusion_head(hs, w, b))


@pytest.mark.parametrize("where", ["NaN pre-activation", "NaN gradient where relu is off"])
def test_relu_backward_at_nan_is_torchs(where):
    """torch's relu backward selects (where(y <= 0, 0, g)): a NaN pre-activation passes g on, a NaN
    gradient where relu is off gives 0; a product (g * relu') differs both ways."""
    torch.manual_seed(0)
    h, hw, hb = rand((3, 4), device=DEVICE), rand((5, 4), device=DEVICE), rand((5,), device=DEVICE)
    x, z = rand((2, 3, 2), device=DEVICE), rand((2, 4), device=DEVICE)
    w, b = rand((3, 4), device=DEVICE), torch.tensor([-100.0, 0.5, 0.5], device=DEVICE)  # context 0 off
    p, pw = rand((2, 3, 5), device=DEVICE), rand((5, 3), device=DEVICE)
    g_head, g_cat, g_ctx = rand((3, 5), device=DEVICE), rand((2, 3, 5), device=DEVICE), rand((2, 3, 5), device=DEVICE)
    if where == "NaN pre-activation":
        h[1, 2] = float("nan")
        p[0, 1, 3] = float("nan")
    else:
        g_cat[0, 1, 2] = float("nan")
        g_head[0, 0] = float("nan")
    calls = {
        "fusion_head": (lambda m, h: m.fusion_head([h], hw, hb, "relu"), h, g_head),
        "backproj_concat": (lambda m, z: m.backproj_concat(x, z, w, b, "relu"), z, g_cat),
        "context_linear": (lambda m, p: m.context_linear(p, z, w, b, pw, "relu", "relu"), p, g_ctx),
    }
    for name, (call, leaf, grad_out) in calls.items():
        grads = []
        for module in (reference, tr):
            leaf_ = leaf.clone().requires_grad_()
            out = call(module, leaf_)
            grads.append(torch.autograd.grad(out, leaf_, grad_out)[0])
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("where", ["grad_out", "input"])
def test_a_non_finite_value_spoils_only_what_it_reaches(dtype, bad, where):
    """A 16-bit backward's products take the fp32 gradient as hi + lo in 16 bits: an inf gradient made
    lo NaN (inf - inf) where eager gives inf, and in fp16 it also set the tile's scale, flushing every
    other gradient of the tile to subnormals (finite gradients wrong by 30%); an inf input met lo's 0
    (0 * inf = NaN) where eager's product gives inf."""
    torch.manual_seed(0)
    dev = dict(device=DEVICE, dtype=dtype)
    hs, hw, hb = [rand((5, 7), **dev), rand((5, 6), **dev)], rand((9, 13), **dev) * 0.3, rand((9,), **dev)
    x, z, w, b = rand((3, 4, 2), **dev), rand((3, 5), **dev), rand((6, 5), **dev), rand((6,), **dev)
    p, pw = rand((3, 4, 7), **dev), rand((7, 6), **dev)
    g_head, g_cat, g_ctx = rand((5, 9), **dev), rand((3, 4, 8), **dev), rand((3, 4, 7), **dev)
    if where == "grad_out":
        g_head[0, 0], g_cat[1, 2, 3], g_ctx[2, 0, 1] = bad, bad, bad
    else:
        hs[1][2, 3], z[1, 0] = bad, bad
    calls = {
        "fusion_head": (lambda m, h0, h1, w_: m.fusion_head([h0, h1], w_, hb, "none"), (*hs, hw), g_head),
        "backproj_concat": (lambda m, z_, w_: m.backproj_concat(x, z_, w_, b, "tanh"), (z, w), g_cat),
        "context_linear": (lambda m, z_, pw_: m.context_linear(p, z_, w, b, pw_, "sigmoid", "none"), (z, pw), g_ctx),
    }
    for name, (call, leaves, grad_out) in calls.items():
        grads = []
        for module in (reference, tr):
            leaves_ = [t.clone().requires_grad_() for t in leaves]
            grads.append(torch.autograd.grad(call(module, *leaves_), leaves_, grad_out))
        for got, want in zip(*reversed(grads)):
            assert torch.equal(got.isfinite(), want.isfinite()), (name, got, want)
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2, equal_nan=True, msg=name)


def test_registered_ops_called_directly_check_their_inputs():
    hs, hw = [rand((4, 3), device=DEVICE, requires_grad=True)], rand((5, 3), device=DEVICE, requires_grad=True)
    ops = torch.ops.pf_kernels_triton
    for name in ("fusion_head", "refine_step"):
        if name == "fusion_head":
            out = ops.fusion_head(hs, hw, None, "relu", False)[0]
        else:
            x, w = rand((4, 2), device=DEVICE), rand((3, 5), device=DEVICE)
            out = ops.refine_step(hs, hw, None, [x], [w], [], 0, "relu", "relu", False)[0]
        with pytest.raises(RuntimeError, match=f"{name} ran with save_pre=False"):
            out.sum().backward()
    with pytest.raises(RuntimeError, match=r"pre must be the forward's \(4, 5\) float32 pre-activation"):
        ops.fusion_head_backward(rand((4, 5), device=DEVICE), hs, hw, hw.new_empty(0), False, "relu")
    x, z, w = rand((6, 3, 4), device=DEVICE), rand((2, 5), device=DEVICE), rand((3, 5), device=DEVICE)
    with pytest.raises(ValueError, match=r"batch sizes differ: x \(6, 3, 4\) vs z \(2, 5\)"):
        ops.backproj_concat(x, z, w, None, "relu")
    with pytest.raises(ValueError, match=r"grad_out must be \(B, \*positions, x_features \+ Dc\) = \(2, ..., 403\)"):
        ops.backproj_concat_backward(rand((2, 3, 7), device=DEVICE), z, w, None, "relu", 400)
    with pytest.raises(ValueError, match=r"p must be \(B, \*positions, H\)"):
        ops.context_linear(rand((5,), device=DEVICE), z, w, None, rand((5, 3), device=DEVICE), "relu", "none")


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu"])
def test_double_backward_equals_torch(activation):
    """A backward with create_graph=True (a gradient penalty) is differentiable: it raised "no autograd
    formula was registered" at the second backward. Every op, one tensor twice in hs, every output
    activation, fp32 (the interpreter and the GPU) against backend="torch"."""
    torch.manual_seed(0)

    def second_order(call, inputs):
        first = torch.autograd.grad(call().square().sum(), inputs, create_graph=True)
        return [*first, *torch.autograd.grad(sum(g.square().sum() for g in first), inputs)]

    x = torch.randn(2, 3, 4, device=DEVICE)
    z, w, b = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((2, 5), (6, 5), (6,)))
    h = torch.randn(2, 3, device=DEVICE, requires_grad=True)
    hw = torch.randn(5, 6, device=DEVICE, requires_grad=True)
    p, pw = torch.randn(2, 3, 7, device=DEVICE, requires_grad=True), torch.randn(7, 6, device=DEVICE, requires_grad=True)
    cases = [(lambda be: pk.backproj_concat(x, z, w, b, activation, backend=be), [z, w, b]),
             (lambda be: pk.fusion_head([h, h], hw, None, activation, backend=be), [h, hw])]
    cases += [(lambda be, a=a: pk.context_linear(p, z, w, b, pw, activation, a, backend=be), [p, z, w, b, pw])
              for a in ("none", "relu", "sigmoid")]
    for call, inputs in cases:
        for got, want in zip(second_order(lambda: call(BACKEND), inputs), second_order(lambda: call("torch"), inputs)):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)  # (second order, in fp32)


@pytest.mark.parametrize("hoist", [True, False])
def test_a_gradient_penalty_through_progressive_fusion_equals_torch(hoist):
    # The refinement steps run refine_step(_hoisted) in one launch: their double backward too.
    from torch import nn
    from pf_kernels.nn import ProgressiveFusion

    class MeanOverTime(nn.Module):
        def forward(self, h):
            return h.mean(1)

    grads = {}
    for backend in (BACKEND, "torch"):
        torch.manual_seed(0)
        encoders = [nn.Sequential(nn.Linear(5 + 2, 4), nn.Tanh()), nn.Sequential(nn.Linear(3 + 3, 4), MeanOverTime())]
        model = ProgressiveFusion(encoders, [4, 4], 6, [2, 3], iterations=3, backend=backend, hoist=hoist).to(DEVICE)
        xs = [torch.randn(3, 5, device=DEVICE, requires_grad=True), torch.randn(3, 7, 3, device=DEVICE, requires_grad=True)]
        z = model(xs)
        dx = torch.autograd.grad(z.square().sum(), xs, create_graph=True)
        grads[backend] = torch.autograd.grad(sum(g.square().sum() for g in dx), [*model.parameters(), *xs])
    for got, want in zip(grads[BACKEND], grads["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
