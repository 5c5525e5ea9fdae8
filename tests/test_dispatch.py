"""The backend registry: what is available, what auto picks, the environment override."""
import pytest
import torch

import pf_kernels as pk
from pf_kernels import _dispatch


def test_available_backends_reports_every_backend_with_reasons():
    report = pk.available_backends()
    assert set(report) >= {"torch", "cpu", "cuda", "triton"}
    assert report["torch"]["available"] and report["torch"]["reason"] is None
    for name, info in report.items():
        assert isinstance(info["available"], bool)
        if not info["available"]:
            assert info["reason"], f"{name} is missing without a reason"


def test_auto_on_cpu_picks_cpu_if_available_else_torch():
    picked = _dispatch.resolve_backend("auto", "backproj_concat", torch.device("cpu"), torch.float32)
    assert picked == ("cpu" if pk.available_backends()["cpu"]["available"] else "torch")


def test_auto_on_other_devices_falls_back_to_torch():
    picked = _dispatch.resolve_backend("auto", "fusion_head", torch.device("meta"), torch.float32)
    assert picked == "torch"


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    assert _dispatch.resolve_backend("auto", "backproj_concat", torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.setenv(_dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=_dispatch.ENV_VAR):
        pk.fusion_head([torch.randn(2, 3)], torch.randn(4, 3))


def test_explicit_backend_is_used(monkeypatch):
    calls = []
    original = _dispatch.get_impl

    def spy(name, op):
        calls.append((name, op))
        return original(name, op)

    monkeypatch.setattr("pf_kernels.ops.get_impl", spy)
    pk.fusion_head([torch.randn(2, 3)], torch.randn(4, 3), backend="torch")
    assert calls == [("torch", "fusion_head")]


def test_auto_follows_the_measured_order_per_device_and_op(monkeypatch):
    # Every backend pretends to serve: the order alone decides (benchmarks/results/ says why).
    monkeypatch.setattr(_dispatch, "_refusal", lambda *args: None)
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    pick = lambda op, device: _dispatch.resolve_backend("auto", op, torch.device(device), torch.float32)  # noqa: E731
    assert pick("backproj_concat", "cuda") == pick("fusion_head", "cuda") == "cuda"  # triton is host-bound
    assert pick("backproj_concat", "cpu") == "cpu"
    assert pick("fusion_head", "cpu") == "torch"  # the cpu kernel loses to eager's GEMM (0.92x)
    # Without the cuda kernels (an install without nvcc), eager's ops: triton lost to eager on every
    # row of the H100 run, host-bound.
    monkeypatch.setattr(_dispatch, "_refusal", lambda backend, *args: "absent" if backend.name == "cuda" else None)
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    assert pick("backproj_concat", "cuda") == pick("refine_step_hoisted", "cuda") == "torch"


@pytest.mark.skipif(not pk.available_backends()["cpu"]["available"], reason="needs the cpu kernels")
def test_auto_composes_refine_step_from_each_ops_own_choice(monkeypatch):
    calls = []
    real = _dispatch.get_impl

    def spy(name, op):
        calls.append((name, op))
        return real(name, op)

    monkeypatch.setattr(pk.ops, "get_impl", spy)
    monkeypatch.setattr(pk.ops, "_eager", False)  # the Python path (its C++ twin: tests/test_eager.py)
    hs, w = [torch.randn(3, 4)], torch.randn(5, 4)
    xs, ws = [torch.randn(3, 2, 6)], [torch.randn(2, 5)]
    z, (x1,) = pk.refine_step(hs, w, None, xs, ws, None, "relu", "tanh")
    assert ("torch", "fusion_head") in calls and ("cpu", "backproj_concat") in calls, calls
    want_z, (want_x1,) = pk.refine_step(hs, w, None, xs, ws, None, "relu", "tanh", backend="torch")
    torch.testing.assert_close(z, want_z)
    torch.testing.assert_close(x1, want_x1)


FLOAT8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
          if hasattr(torch, n)]
# What each compiled backend's kernels are instantiated for (README: dtypes).
KERNEL_DTYPES = {"cpu": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
                 "cuda": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
                 "triton": (torch.float32, torch.float16, torch.bfloat16)}


@pytest.mark.parametrize("name", sorted(KERNEL_DTYPES))
def test_each_compiled_backend_refuses_the_dtypes_its_kernels_lack(name):
    from pf_kernels import _extension
    module = _dispatch._BACKENDS[name].load()
    if module is None and name == "triton":
        pytest.skip(pk.available_backends()["triton"]["reason"])
    if module is None:  # no kernels or no GPU here: the hook both C++ backends re-export
        module = _extension
    if name == "cpu":
        assert module.unsupported is _extension.unsupported
    device = torch.device("cpu" if name == "cpu" else "cuda")
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16, *FLOAT8):
        why = module.unsupported("backproj_concat", device, dtype)
        if dtype in KERNEL_DTYPES[name]:
            assert why is None, (dtype, why)
        else:
            assert str(dtype) in why


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_auto_serves_float8_through_torch_and_a_kernel_backend_named_refuses_it(dtype):
    """float8 passes validation and the reference computes it right (fp32, rounded once: the float64
    result rounded to float8), so auto falls back to torch rather than failing in a C++ kernel."""
    x, z, w, b = (torch.randn(*s).to(dtype) for s in [(2, 3, 4), (2, 5), (3, 5), (3,)])
    pw = torch.randn(4, 3).to(dtype)
    wide = [t.double() for t in (x, z, w, b, pw)]
    bits = lambda t: t.view(torch.uint8)  # noqa: E731  (torch.equal does not take float8)
    exact = pk.reference.backproj_concat(*wide[:4], "tanh").to(dtype)
    assert torch.equal(bits(pk.backproj_concat(x, z, w, b, "tanh")), bits(exact))
    context = pk.reference.linear_act(wide[1], wide[2], wide[3], "gelu").to(dtype).double()  # rounded, as specified
    exact = torch.sigmoid(wide[0] + (context @ wide[4].T)[:, None]).to(dtype)
    assert torch.equal(bits(pk.context_linear(x, z, w, b, pw, "gelu", "sigmoid")), bits(exact))
    hz, (hx,) = pk.refine_step([z], w, b, [x], [w[:, :3].contiguous()], None)
    assert hz.dtype == hx.dtype == dtype
    for op in _dispatch.OPS:
        assert _dispatch.resolve_backend("auto", op, torch.device("cpu"), dtype) == "torch"
    if pk.available_backends()["cpu"]["available"]:
        with pytest.raises(RuntimeError, match=f"'cpu'.*{dtype}"):
            pk.backproj_concat(x, z, w, b, backend="cpu")
        with pytest.raises(RuntimeError, match=str(dtype)):
            pk.fusion_head([z], w, b, backend="cpu")


def _cpu_backends():
    return [name for name, info in pk.available_backends().items()
            if info["available"] and ("cpu" in info["devices"] or "*" in info["devices"])] + ["auto"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", _cpu_backends())
def test_inputs_made_under_inference_mode_train_as_in_eager(backend, dtype):
    """Features computed under torch.inference_mode (a frozen encoder), then a trained head: eager
    saves its own intermediates (cat's output, p + term), so it trains; the fused ops saved the
    inputs themselves, which autograd refuses for inference tensors."""
    torch.manual_seed(0)
    with torch.inference_mode():
        hs = [torch.randn(3, 4).to(dtype), torch.randn(3, 5).to(dtype)]
        x = torch.randn(3, 6, 2).to(dtype)
        p = torch.randn(3, 6, 7).to(dtype)
    params = [(torch.randn(8, 9) / 3).to(dtype).requires_grad_(), torch.randn(8).to(dtype).requires_grad_(),
              (torch.randn(5, 8) / 3).to(dtype).requires_grad_(), torch.randn(5).to(dtype).requires_grad_(),
              (torch.randn(7, 5) / 3).to(dtype).requires_grad_()]

    def run(backend_):
        hw, hb, bw, bb, pw = params
        z = pk.fusion_head(hs, hw, hb, "tanh", backend=backend_)
        outs = [z, pk.backproj_concat(x, z, bw, bb, "relu", backend=backend_)]
        outs += [pk.context_linear(p, z, bw, bb, pw, "relu", a, backend=backend_) for a in ("relu", "gelu")]
        loss = sum((o.float() * torch.linspace(-1, 1, o.shape[-1])).sum() for o in outs)
        return outs, torch.autograd.grad(loss, params)

    outs, grads = run(backend)
    want_outs, want_grads = run("torch")
    for got, want in zip(list(outs) + list(grads), list(want_outs) + list(want_grads)):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:  # bf16: each rounds its intermediates its own way; the whole tensor agrees
            assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 2e-2


def _each_op(backend):
    """Every op on small fp64 inputs, as functions of one weight (for grad/jacrev/jvp) and of x or z."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x, z, w, b = r(3, 4, 5), r(3, 6), r(2, 6), r(2)
    hs, head_w = [r(3, 4), r(3, 2)], r(6, 6)
    p, proj = r(3, 4, 7), r(7, 2)
    return {
        "backproj_concat": (lambda w_: pk.backproj_concat(x, z, w_, b, "tanh", backend=backend), w),
        "backproj_concat_grouped": (lambda w_: torch.cat([o.flatten() for o in pk.backproj_concat_grouped(
            [x, x[:, 0]], z, [w_, w_], [b, None], "gelu", backend=backend)]), w),
        "fusion_head": (lambda w_: pk.fusion_head(hs, w_, None, "sigmoid", backend=backend), head_w),
        "refine_step": (lambda w_: pk.refine_step(hs, head_w, None, [x], [w_], [b], backend=backend)[1][0], w),
        "context_linear": (lambda w_: pk.context_linear(p, z, w_, b, proj, "relu", "tanh", backend=backend), w),
        "refine_step_hoisted": (lambda w_: pk.refine_step_hoisted(hs, head_w, None, [p], [w_], [b], [proj],
                                                                  backend=backend)[1][0], w),
    }


@pytest.mark.parametrize("op", list(_each_op("auto")))
def test_auto_serves_torch_func_transforms_with_the_plain_ops(op):
    """The fused backends' autograd cannot run under torch.func; auto hands those calls to torch."""
    (fused, w), (plain, _) = _each_op("auto")[op], _each_op("torch")[op]
    tangent = torch.randn_like(w)
    with torch.no_grad():  # outside a transform, auto takes a fused kernel where it has one
        torch.testing.assert_close(fused(w), plain(w))
    torch.testing.assert_close(torch.func.jacrev(fused)(w), torch.func.jacrev(plain)(w))
    torch.testing.assert_close(torch.func.grad(lambda w_: fused(w_).square().sum())(w),
                               torch.func.grad(lambda w_: plain(w_).square().sum())(w))
    torch.testing.assert_close(torch.func.jvp(fused, (w,), (tangent,)), torch.func.jvp(plain, (w,), (tangent,)))
    ws = torch.stack([w, 2 * w, -w])
    torch.testing.assert_close(torch.func.vmap(fused)(ws), torch.func.vmap(plain)(ws))


def test_a_fused_backend_named_under_a_transform_raises():
    if not pk.available_backends()["cpu"]["available"]:
        pytest.skip("the cpu backend is not built here")
    fused, w = _each_op("cpu")["backproj_concat"]
    for transform in (lambda f: torch.func.grad(lambda w_: f(w_).sum()), torch.func.jacrev,
                      lambda f: (lambda w_: torch.func.jvp(f, (w_,), (w_,)))):
        with pytest.raises(RuntimeError, match="backend 'cpu' cannot run inside torch.func's grad.*'torch'"):
            transform(fused)(w)
    torch.testing.assert_close(torch.func.vmap(fused)(torch.stack([w, -w])),  # PyTorch's per-sample fallback
                               torch.func.vmap(_each_op("torch")["backproj_concat"][0])(torch.stack([w, -w])))


@pytest.mark.parametrize("op", list(_each_op("auto")))
def test_auto_serves_dual_tensors_with_the_plain_ops(op):
    """Forward-mode AD with dual tensors (torch.autograd.forward_ad): the fused ops have no jvp rule;
    inside a dual level auto takes torch, and the tangent is torch's."""
    import torch.autograd.forward_ad as fwAD
    (fused, w), (plain, _) = _each_op("auto")[op], _each_op("torch")[op]
    tangent = torch.randn_like(w)
    got, want = [], []
    for f, out in ((fused, got), (plain, want)):
        with fwAD.dual_level():
            primal, t = fwAD.unpack_dual(f(fwAD.make_dual(w, tangent)))
            out += [primal, t]
    assert got[1] is not None
    torch.testing.assert_close(got, want)
