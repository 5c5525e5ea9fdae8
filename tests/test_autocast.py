"""Mixed precision: under torch.autocast every op behaves as nn.Linear does. Its floating inputs
(fp64 excepted) are cast to the autocast dtype, it computes in that dtype with fp32 accumulation,
and each input's gradient comes back in that input's own dtype. On every backend this machine runs
(cpu autocast: bf16 and fp16), and on CUDA autocast (fp16, bf16) where a GPU is present; the CPU
cases are the twins of the CUDA ones.

The strongest check: under autocast, an op equals the same op called on inputs already cast to the
autocast dtype, bit for bit, forward and backward (backward run inside the autocast region too).
That fails if autocast leaks into a kernel's own fp32 GEMMs (the C++ ops exclude it), and each
backend's dtype tests already hold the op on 16-bit inputs to the reference.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pf_kernels as pk
from pf_kernels._dispatch import implements
from pf_kernels.nn import ProgressiveFusion
from tests.cases import rand

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _backends(device):
    return [name for name, info in pk.available_backends().items()
            if info["available"] and (device in info["devices"] or "*" in info["devices"])]


CASES = [(device, backend, dtype) for device in DEVICES for backend in _backends(device)
         for dtype in (torch.bfloat16, torch.float16)]


def _ids(case):
    device, backend, dtype = case
    return f"{device}-{backend}-{str(dtype).split('.')[-1]}"


def _op_calls(backend):
    """(name, fn(*tensors) -> outputs, input shapes, indices of the encoder outputs hs) for every
    op; the shapes are odd on purpose."""
    def backproj(x, z, w, b):
        return pk.backproj_concat(x, z, w, b, "gelu", backend=backend)

    def grouped(z, x0, x1, w0, w1, b0):
        return pk.backproj_concat_grouped([x0, x1], z, [w0, w1], [b0, None], "tanh", backend=backend)

    def head(w, b, h0, h1, h2):
        return pk.fusion_head([h0, h1, h2], w, b, "sigmoid", backend=backend)

    def step(hw, hb, h0, h1, x0, x1, w0, w1, b0, b1):
        z, xs = pk.refine_step([h0, h1], hw, hb, [x0, x1], [w0, w1], [b0, b1], "relu", "tanh",
                               backend=backend)
        return [z, *xs]

    def context(p, z, w, b, pw):
        return pk.context_linear(p, z, w, b, pw, "tanh", "gelu", backend=backend)

    B, Dz = 5, 7
    calls = [
        ("backproj_concat", backproj, [(B, 3, 4), (B, Dz), (6, Dz), (6,)], ()),
        ("backproj_concat_grouped", grouped, [(B, Dz), (B, 3), (B, 2, 3, 5), (4, Dz), (2, Dz), (4,)], ()),
        ("fusion_head", head, [(Dz, 3 + 5 + 2), (Dz,), (B, 3), (B, 5), (B, 2)], (2, 3, 4)),
        ("refine_step", step, [(Dz, 9), (Dz,), (B, 4), (B, 5), (B, 3), (B, 2, 6), (3, Dz), (2, Dz),
                               (3,), (2,)], (2, 3)),
    ]
    def hoisted(hw, hb, h0, h1, p0, p1, w0, w1, b0, v0, v1):
        z, outs = pk.refine_step_hoisted([h0, h1], hw, hb, [p0, p1], [w0, w1], [b0, None], [v0, v1], "relu", "tanh",
                                         ["gelu", "none"], backend=backend)
        return [z, *outs]

    if implements(backend, "context_linear"):
        calls.append(("context_linear", context, [(B, 3, 4), (B, Dz), (6, Dz), (6,), (4, 6)], ()))
        calls.append(("refine_step_hoisted", hoisted, [(Dz, 9), (Dz,), (B, 4), (B, 5), (B, 3, 4), (B, 6), (3, Dz),
                                                       (2, Dz), (3,), (4, 3), (6, 2)], (2, 3)))
    return calls


def _outputs(result):
    return list(result) if isinstance(result, (list, tuple)) else [result]


def _run(fn, args, grad_outs, autocast_dtype, device, backward_inside):
    """Outputs and input gradients; backward_inside: the backward runs in the autocast region too
    (not recommended by PyTorch, but common: the compiled kernels must not be recast there)."""
    enabled = autocast_dtype is not None
    with torch.autocast(device, dtype=autocast_dtype, enabled=enabled):
        outs = _outputs(fn(*args))
    with torch.autocast(device, dtype=autocast_dtype, enabled=enabled and backward_inside):
        grads = torch.autograd.grad(outs, args, [g.to(o.dtype) for g, o in zip(grad_outs, outs)])
    return outs, grads


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_op_under_autocast_equals_the_op_on_cast_inputs(case):
    device, backend, dtype = case
    for name, fn, shapes, hs in _op_calls(backend):
        # hs as an autocast encoder hands them over (already 16-bit), everything else fp32
        fp32 = [rand(s, dtype if i in hs else torch.float32, device, requires_grad=True)
                for i, s in enumerate(shapes)]
        cast = [t.detach().to(dtype).requires_grad_(True) for t in fp32]
        probe = _outputs(fn(*cast))
        grad_outs = [torch.randn_like(o, dtype=torch.float32) for o in probe]

        # The reference's own autograd follows PyTorch's rules: its backward is recast in an
        # autocast region like any eager op's, so it is run outside.
        outs, grads = _run(fn, fp32, grad_outs, dtype, device, backward_inside=backend != "torch")
        want_outs, want_grads = _run(fn, cast, grad_outs, None, device, backward_inside=False)
        for i, (got, want) in enumerate(zip(outs, want_outs)):
            assert got.dtype == dtype, f"{name} output {i}: {got.dtype}, autocast asked for {dtype}"
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name} output {i}")
        for i, (got, want, inp) in enumerate(zip(grads, want_grads, fp32)):
            assert got.dtype == inp.dtype, f"{name} grad {i}: {got.dtype}, the input is {inp.dtype}"
            torch.testing.assert_close(got, want.to(inp.dtype), rtol=0, atol=0, msg=f"{name} grad {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_fp64_inputs_are_left_alone_as_autocast_does(device):
    x, z, w = (rand(s, torch.float64, device) for s in ((3, 4), (3, 5), (2, 5)))
    with torch.autocast(device, dtype=torch.bfloat16):
        out = pk.backproj_concat(x, z, w, None, "relu", backend="torch")
        head = pk.fusion_head([x, z], torch.randn(3, 9, dtype=torch.float64, device=device))
    assert out.dtype == torch.float64 and head.dtype == torch.float64


def _plain_progressive(model, xs):
    """The same model written with plain PyTorch ops, as a user would."""
    head, bps = model.fusion_head, model.back_projections
    inputs = [torch.cat([x, x.new_zeros(*x.shape[:-1], bp.out_features)], -1) for x, bp in zip(xs, bps)]
    for step in range(model.iterations):
        z = torch.relu(F.linear(torch.cat([enc(x) for enc, x in zip(model.encoders, inputs)], -1),
                                head.weight, head.bias))
        if step < model.iterations - 1:
            inputs = []
            for x, bp in zip(xs, bps):
                c = torch.tanh(F.linear(z, bp.weight, bp.bias))
                c = c.view(c.shape[0], *([1] * (x.dim() - 2)), c.shape[-1]).expand(*x.shape[:-1], -1)
                inputs.append(torch.cat([x, c], -1))
    return z


@pytest.mark.parametrize("case", [c for c in CASES if c[2] == torch.bfloat16], ids=_ids)
def test_progressive_fusion_trains_under_autocast(case):
    device, backend, dtype = case
    encoders = [nn.Sequential(nn.Linear(6 + 3, 16), nn.Tanh()),
                nn.Sequential(nn.Flatten(1), nn.Linear(4 * (5 + 2), 16), nn.ReLU())]
    model = ProgressiveFusion(encoders, [16, 16], 12, [3, 2], iterations=3, context_activation="tanh",
                              backend=backend).to(device)
    xs = [rand((8, 6), device=device), rand((8, 4, 5), device=device)]
    with torch.autocast(device, dtype=dtype):
        z = model(xs)
    assert z.dtype == dtype
    z.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads.values())

    # The same model in plain PyTorch under the same autocast: equal within 16-bit rounding.
    model.zero_grad()
    with torch.autocast(device, dtype=dtype):
        want = _plain_progressive(model, xs)
    want.float().square().mean().backward()
    torch.testing.assert_close(z.float(), want.float(), rtol=3e-2, atol=3e-2)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=5e-2, atol=5e-3, msg=n)


@pytest.mark.parametrize("case", [c for c in CASES if c[2] == torch.bfloat16], ids=_ids)
def test_autocast_casts_are_compiled_into_the_graph(case):
    device, backend, dtype = case
    import torch._dynamo

    hs = [rand((4, 3), device=device), rand((4, 5), device=device)]
    w = rand((6, 8), device=device, requires_grad=True)
    x = rand((4, 2, 3), device=device)
    bw = rand((2, 6), device=device, requires_grad=True)

    def step(h0, h1, w, x, bw):
        with torch.autocast(device, dtype=dtype):
            z = pk.fusion_head([h0, h1], w, None, "relu", backend=backend)
            return pk.backproj_concat(x, z, bw, None, "tanh", backend=backend)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(*hs, w, x, bw)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(*hs, w, x, bw)
    want = step(*hs, w, x, bw)
    assert got.dtype == dtype
    # inductor generates its own code for the reference's plain ops (one 16-bit rounding apart)
    tol = 1.6e-2 if backend == "torch" else 0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    g_got = torch.autograd.grad(got.float().sum(), [w, bw])
    g_want = torch.autograd.grad(want.float().sum(), [w, bw])
    for a, b in zip(g_got, g_want):
        assert a.dtype == torch.float32
        # eager rounds a parameter's gradient to 16 bits before the cast back; inductor may not
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())
