"""The eager entry points of pf_kernels._C (csrc/ops/eager.cpp), which serve backend="auto" on CPU
tensors without pf_kernels.ops' Python: they compute exactly what the Python path computes (same
ops, same autograd graph), serve the common calls, and give every other call back to the Python
path (None), which names what is wrong."""
import inspect
import os
import re

import pytest
import torch
from torch.overrides import TorchFunctionMode

import pf_kernels as pk
from pf_kernels import _dispatch, ops
from tests import test_validation as bad

pytestmark = pytest.mark.skipif(not ops._eager_ops(), reason="pf_kernels._C is not built: no eager entry points "
                                "(the Python path, tested everywhere else, serves every call)")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ACTS = ("none", "relu", "gelu", "tanh", "sigmoid")


def _cuda_served() -> bool:
    return torch.cuda.is_available() and "cuda" in getattr(ops._eager_ops(), "eager_backends", {})


# The CPU cases are the CUDA ones' twins: the same code but for the device and the fusion head's
# kernel (cuda's own there, torch's ops on the CPU).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _cuda_served(), reason="needs a CUDA GPU "
                                                                "and the cuda kernels built"))]


def _leaf(*shape, dtype, device="cpu", transposed=False):
    """A leaf requiring grad; transposed: a column-major one (a view of a tensor that does not)."""
    if transposed:
        return torch.randn(*reversed(shape), dtype=dtype, device=device).t().requires_grad_()
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_()


def calls(dtype, device="cpu"):
    """(op, kwargs) for every op: odd sizes, a sequence of positions, a vector, no bias somewhere."""
    B, dims, Dz, Dc = 3, (5, 2, 7), 6, 4

    def leaf(*shape, transposed=False):
        return _leaf(*shape, dtype=dtype, device=device, transposed=transposed)
    hs = [leaf(B, d) for d in dims]
    head = dict(hs=hs, head_weight=leaf(Dz, sum(dims)), head_bias=leaf(Dz))
    z = leaf(B, Dz)
    xs = [leaf(B, 3), leaf(B, 5, 2), leaf(B, 2, 3, 4)]
    bp_weights = [leaf(Dc, Dz), leaf(1, Dz), leaf(Dc, Dz)]
    bp_biases = [leaf(Dc), None, leaf(Dc)]
    ps = [leaf(B, 9), leaf(B, 5, 8), leaf(B, 2, 3, 4)]
    proj = [leaf(9, Dc), leaf(8, 1), leaf(4, Dc, transposed=True)]
    return [
        ("fusion_head", dict(hs=hs, weight=head["head_weight"], bias=head["head_bias"], activation="gelu")),
        ("fusion_head", dict(hs=tuple(hs[:1]), weight=leaf(Dz, dims[0]), bias=None, activation="none")),
        ("backproj_concat", dict(x=xs[1], z=z, weight=bp_weights[0], bias=bp_biases[0], activation="tanh")),
        ("backproj_concat", dict(x=leaf(B, 3, transposed=True), z=z, weight=bp_weights[1], bias=None,
                                 activation="sigmoid")),
        ("backproj_concat_grouped", dict(xs=xs, z=z, weights=bp_weights, biases=bp_biases, activation="relu")),
        ("backproj_concat_grouped", dict(xs=xs[:2], z=z, weights=bp_weights[:2], biases=None, activation="gelu")),
        ("context_linear", dict(p=ps[1], z=z, bp_weight=bp_weights[1], bp_bias=None, proj_weight=proj[1],
                                activation="relu", out_activation="gelu")),
        ("context_linear", dict(p=ps[2], z=z, bp_weight=bp_weights[2], bp_bias=bp_biases[2], proj_weight=proj[2],
                                activation="sigmoid", out_activation="none")),
        ("refine_step", dict(**head, xs=xs, bp_weights=bp_weights, bp_biases=bp_biases, head_activation="tanh",
                             backproj_activation="relu")),
        ("refine_step_hoisted", dict(**head, ps=ps, bp_weights=bp_weights, bp_biases=tuple(bp_biases),
                                     proj_weights=proj, head_activation="relu", backproj_activation="gelu",
                                     out_activations=["relu", "none", "tanh"])),
        ("refine_step_hoisted", dict(**head, ps=ps[:2], bp_weights=bp_weights[:2], bp_biases=None,
                                     proj_weights=proj[:2], head_activation="sigmoid", backproj_activation="none",
                                     out_activations="relu")),
    ]


def _flat(out):
    """The tensors in out, nested lists and tuples flattened in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _flat(item)]
    return []


def _run(op, kwargs, eager: bool, monkeypatch):
    leaves = [t for t in _flat(list(kwargs.values())) if t.requires_grad]
    for t in leaves:
        t.grad = None
    with monkeypatch.context() as m:
        if not eager:
            m.setattr(ops, "_eager", False)  # the Python path
        out = getattr(pk, op)(**kwargs)
    flat = _flat(out)
    torch.autograd.backward(flat, [torch.ones_like(t) * (j + 1) for j, t in enumerate(flat)])
    return out, [None if t.grad is None else t.grad.clone() for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equal_to_the_python_path_bitwise_with_gradients(dtype, device, monkeypatch):
    for op, kwargs in calls(dtype, device):
        served = getattr(ops._eager, op)(*kwargs.values())
        assert served is not None, f"{op}: the eager entry point gave a common call back"
        fast, fast_grads = _run(op, kwargs, True, monkeypatch)
        slow, slow_grads = _run(op, kwargs, False, monkeypatch)
        assert type(fast) is type(slow) and len(_flat(fast)) == len(_flat(slow)), op
        if isinstance(slow, tuple):
            assert type(fast[1]) is type(slow[1]), op
        for a, b in zip(_flat(fast), _flat(slow)):
            assert a.dtype == b.dtype and a.shape == b.shape and type(a.grad_fn) is type(b.grad_fn), op
            assert torch.equal(a, b), op
        for a, b in zip(fast_grads, slow_grads):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), op


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_each_serves_with_the_backends_the_python_path_resolves(dtype, device, monkeypatch):
    """eager.cpp hard-codes auto's CPU choice (_dispatch._AUTO_ORDER): a change to one shows here."""
    from benchmarks.proof import describe_backends, record_backend_choice
    for op, kwargs in calls(dtype, device):
        with record_backend_choice() as fast:
            getattr(pk, op)(**kwargs)
        with monkeypatch.context() as m:
            m.setattr(ops, "_eager", False)
            with record_backend_choice() as slow:
                getattr(pk, op)(**kwargs)
        assert fast and describe_backends(fast) == describe_backends(slow), op


@pytest.mark.parametrize("device", DEVICES)
def test_auto_serves_common_calls_without_the_python_path(device, monkeypatch):
    """The speed of auto on small CPU calls rests on this: no backend resolution, no Python checks."""
    def no(*args, **kwargs):
        raise AssertionError("the Python path ran")
    monkeypatch.setattr(ops, "resolve_backend", no)
    monkeypatch.setattr(ops.checks, "check_fusion_head", no)
    for op, kwargs in calls(torch.float32, device):
        getattr(pk, op)(**kwargs)


def _bad_calls():
    """Every invalid call of tests/test_validation.py, as (op, kwargs)."""
    out = [("backproj_concat", {**bad.good_backproj(), **o}) for _, o, _, _ in bad.BACKPROJ_BAD]
    out += [("fusion_head", {**bad.good_fusion(), **o}) for _, o, _, _ in bad.FUSION_BAD]
    out += [("refine_step", {**bad.refine_args(), **o}) for _, o, _, _ in bad.REFINE_BAD]
    out += [("refine_step_hoisted", {**bad.hoisted_args(), **o}) for name, o in bad.HOISTED_CASES
            if name not in ("good", "one out activation", "no biases", "tuples")]
    out += [("backproj_concat_grouped", dict(xs=[torch.randn(2, 3)], z=torch.randn(2, 5),
                                             weights=[torch.randn(4, 5)] * 2))]
    for activation in ("swish", "RELU", None, "relu\x00", "relu "):
        out.append(("fusion_head", {**bad.good_fusion(), "activation": activation}))
        out.append(("backproj_concat", {**bad.good_backproj(), "activation": activation}))
    return out


@pytest.mark.parametrize("call", _bad_calls(), ids=lambda c: c[0])
def test_every_invalid_call_goes_to_the_python_path_which_names_it(call, monkeypatch):
    op, kwargs = call
    with monkeypatch.context() as m:
        m.setattr(ops, "_eager", False)
        with pytest.raises((TypeError, ValueError)):
            getattr(pk, op)(**kwargs)
    call = inspect.signature(getattr(pk, op)).bind(**kwargs)
    call.apply_defaults()  # the entry points take every argument but backend, in order
    assert getattr(ops._eager, op)(*(v for n, v in call.arguments.items() if n != "backend")) is None


class _Tagged(torch.Tensor):
    pass


class _Recording(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_calls_with_something_to_honour_take_the_python_path(monkeypatch):
    good = dict(hs=[torch.randn(2, 3), torch.randn(2, 4)], weight=torch.randn(5, 7), bias=torch.randn(5),
                activation="relu")
    eager = ops._eager

    def fast(hs, weight, bias, activation):
        return eager.fusion_head(hs, weight, bias, activation)

    assert fast(**good) is not None
    # a tensor subclass (its __torch_function__), a torch function mode, autocast, the environment
    sub = {**good, "weight": good["weight"].as_subclass(_Tagged)}
    assert fast(**sub) is None
    assert isinstance(pk.fusion_head(**sub), _Tagged)
    mode = _Recording()
    with mode:
        assert fast(**good) is None
        pk.fusion_head(**good)
    assert mode.seen, "the mode saw nothing of the call"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(**good) is None
        assert pk.fusion_head(**good).dtype == torch.bfloat16
    # PF_KERNELS_BACKEND as os.environ holds it (the C environment may differ: os.unsetenv)
    with monkeypatch.context() as m:
        m.setattr(ops, "_eager", _Refusing(eager))
        for value in ("torch", "cpu", "auto", ""):
            m.setenv(_dispatch.ENV_VAR, value)
            os.unsetenv(_dispatch.ENV_VAR)
            assert pk.fusion_head(**good) is not None  # served by the Python path, whatever the value
    # dtypes the kernels lack, devices other than the CPU: the Python path decides
    meta = {**good, "hs": [h.to("meta") for h in good["hs"]], "weight": good["weight"].to("meta"),
            "bias": good["bias"].to("meta")}
    assert fast(**meta) is None and pk.fusion_head(**meta).device.type == "meta"
    f8 = getattr(torch, "float8_e4m3fn", None)
    if f8 is not None:
        low = {**good, "hs": [h.to(f8) for h in good["hs"]], "weight": good["weight"].to(f8),
               "bias": good["bias"].to(f8)}
        assert fast(**low) is None


class _DeviceContextSubclass(torch.utils._device.DeviceContext):
    pass


@pytest.mark.parametrize("device", DEVICES)
def test_the_default_device_mode_alone_is_served(device, monkeypatch):
    # torch.set_default_device and `with torch.device(...)` push a DeviceContext mode: common in
    # scripts, and nothing for the ops to honour (they make no tensor without a device).
    eager = ops._eager
    for op, kwargs in calls(torch.float32, device):
        call = inspect.signature(getattr(pk, op)).bind(**kwargs)
        call.apply_defaults()
        args = [v for n, v in call.arguments.items() if n != "backend"]
        with torch.device(device):
            assert getattr(eager, op)(*args) is not None, op
            with _Recording():
                assert getattr(eager, op)(*args) is None, op
        with _DeviceContextSubclass(device):
            assert getattr(eager, op)(*args) is None, op
        torch.set_default_device("meta")  # another device than the tensors': the ops follow their inputs
        try:
            assert getattr(eager, op)(*args) is not None, op
            fast, fast_grads = _run(op, kwargs, True, monkeypatch)
            slow, slow_grads = _run(op, kwargs, False, monkeypatch)
        finally:
            torch.set_default_device(None)
        for a, b in zip(_flat(fast) + fast_grads, _flat(slow) + slow_grads):
            assert (a is None and b is None) or torch.equal(a, b), op


class _Refusing:
    """Eager entry points that fail the test if asked."""

    def __init__(self, eager):
        self.eager_backends = eager.eager_backends

    def __getattr__(self, op):
        raise AssertionError(f"the eager entry point {op} was asked")


def test_transforms_wrappers_and_symbolic_sizes_take_the_python_path():
    """vmap's and functionalize's wrappers are torch.Tensors to Python; over fake tensors with
    symbolic sizes, the eager path would fail (vmap) or pin every size to a constant (functionalize)."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    def symbolic(mode, t, name):
        return mode.from_tensor(t, source=ConstantSource(name), symbolic_context=StatelessSymbolicContext(
            dynamic_sizes=[DimDynamic.DYNAMIC] * t.dim()))

    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    h, w = symbolic(mode, torch.randn(3, 4), "h"), symbolic(mode, torch.randn(5, 4), "w")
    hb, wb = symbolic(mode, torch.randn(2, 3, 4), "hb"), symbolic(mode, torch.randn(2, 5, 4), "wb")
    head = lambda h_, w_: pk.fusion_head([h_], w_, None, "relu")  # noqa: E731
    with mode:
        out = torch.func.functionalize(head)(h, w)
        pinned = [str(g.expr) for g in env.guards if re.fullmatch(r"Eq\(\w+, \d+\)", str(g.expr))]
        batched = torch.func.vmap(head)(hb, wb)
    assert not all(isinstance(d, int) for d in out.shape) and not pinned, (out.shape, pinned)
    assert batched.dim() == 3

    def declined(h_, w_):  # over real tensors too: transforms' warnings and errors are the Python path's
        assert ops._eager.fusion_head([h_], w_, None, "relu") is None
        return head(h_, w_)
    assert torch.func.vmap(declined)(torch.randn(2, 3, 4), torch.randn(2, 5, 4)).shape == (2, 3, 5)
    assert torch.func.functionalize(declined)(torch.randn(3, 4), torch.randn(5, 4)).shape == (3, 5)
    assert torch.func.grad(lambda h_: declined(h_, torch.randn(5, 4)).sum())(torch.randn(3, 4)).shape == (3, 4)


def test_widths_that_overflow_together_are_refused_by_name():
    hs = [torch.empty(0, 2 ** 62)] * 4  # no memory: 2**64 features in all, 0 once wrapped to int64
    weight = torch.randn(5, 0)
    assert ops._eager.fusion_head(hs, weight, None, "relu") is None
    with pytest.raises(ValueError, match="in_features"):
        pk.fusion_head(hs, weight, None, "relu")


def test_an_error_inside_the_ops_is_a_python_exception():
    # Valid by the checks, refused by ATen (28 TB to allocate): a RuntimeError with ATen's message.
    hs = [torch.randn(1, 3).expand(2 ** 40, 3), torch.randn(1, 4).expand(2 ** 40, 4)]
    with pytest.raises(RuntimeError, match="allocate"):
        pk.fusion_head(hs, torch.randn(5, 7), None, "relu")


def test_forward_mode_and_vmap_agree_with_the_python_path(monkeypatch):
    hs = [torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)]
    w, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    tangents = [torch.randn_like(h) for h in hs]

    def head(*hs_):
        return pk.fusion_head(list(hs_), w, b, "tanh")

    fast = torch.func.jvp(head, tuple(hs), tuple(tangents))
    batched = torch.func.vmap(head)(*[torch.stack([h, 2 * h]) for h in hs])
    with monkeypatch.context() as m:
        m.setattr(ops, "_eager", False)
        slow = torch.func.jvp(head, tuple(hs), tuple(tangents))
        slow_batched = torch.func.vmap(head)(*[torch.stack([h, 2 * h]) for h in hs])
    assert all(torch.allclose(a, c, rtol=1e-12, atol=1e-12) for a, c in zip(fast, slow))
    assert torch.allclose(batched, slow_batched, rtol=1e-12, atol=1e-12)


def test_threads_release_the_interpreter():
    # The ops run with the GIL released, as torch's own Python bindings run them: two threads calling
    # at once get the results one thread gets.
    import threading
    hs = [torch.randn(64, 128) for _ in range(3)]
    w, b = torch.randn(256, 384), torch.randn(256)
    want = pk.fusion_head(hs, w, b, "gelu")
    results = []

    def work():
        for _ in range(20):
            results.append(torch.equal(pk.fusion_head(hs, w, b, "gelu"), want))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 40 and all(results)


def test_the_python_path_serves_where_no_extension_loads(monkeypatch):
    monkeypatch.setattr(ops, "_eager", False)
    hs = [torch.randn(2, 3), torch.randn(2, 4)]
    w, b = torch.randn(5, 7), torch.randn(5)
    assert torch.allclose(pk.fusion_head(hs, w, b), torch.relu(torch.cat(hs, 1) @ w.t() + b), rtol=1e-5, atol=1e-6)
