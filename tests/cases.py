"""Shared test material: random inputs for every op and the comparison against the reference.

Every backend's tests use these, so each backend is held to the same cases and tolerances.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

import pf_kernels as pk
from pf_kernels import reference

ACTIVATIONS = ("none", "relu", "gelu", "tanh", "sigmoid")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Absolute floors for the error bound (relative to the inputs' scale, which is ~1).
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rand(shape, dtype=torch.float32, device="cpu", noncontiguous=False, requires_grad=False):
    """Fresh standard-normal values. noncontiguous: a view with a non-unit innermost stride (1-D,
    2-D) or with permuted storage order (3-D and more)."""
    shape = tuple(shape)
    if noncontiguous and len(shape) >= 3:
        t = torch.randn(*reversed(shape), dtype=torch.float64, device=device).to(dtype)
        t = t.permute(*reversed(range(len(shape))))
    elif noncontiguous and len(shape) >= 1:
        t = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64, device=device).to(dtype)[..., ::2]
    else:
        t = torch.randn(*shape, dtype=torch.float64, device=device).to(dtype)
    return t.requires_grad_(requires_grad)


def backproj_inputs(B, S, Dx, Dz, Dc, bias=True, dtype=torch.float32, device="cpu",
                    noncontiguous=False, requires_grad=True, weight_scale=None):
    scale = weight_scale if weight_scale is not None else Dz ** -0.5
    x = rand((B, *S, Dx), dtype, device, noncontiguous, requires_grad)
    z = rand((B, Dz), dtype, device, noncontiguous, requires_grad)
    w = (rand((Dc, Dz), torch.float64, device) * scale).to(dtype).requires_grad_(requires_grad)
    b = rand((Dc,), dtype, device, False, requires_grad) if bias else None
    return x, z, w, b


def fusion_inputs(B, dims, Dz, bias=True, dtype=torch.float32, device="cpu", noncontiguous=False,
                  requires_grad=True):
    hs = [rand((B, d), dtype, device, noncontiguous, requires_grad) for d in dims]
    w = (rand((Dz, sum(dims)), torch.float64, device) * sum(dims) ** -0.5).to(dtype)
    w.requires_grad_(requires_grad)
    b = rand((Dz,), dtype, device, False, requires_grad) if bias else None
    return hs, w, b


def _leaves(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _leaves(item)]
    return []


def _detached_copy(obj, dtype=None):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to(dtype) if dtype is not None else obj.detach().clone()
        return t.requires_grad_(obj.requires_grad)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached_copy(item, dtype) for item in obj)
    return obj


def _run(fn: Callable, args: Sequence, grad_outputs: Optional[List[torch.Tensor]]):
    out = _leaves(fn(*args))
    inputs = [t for t in _leaves(args) if t.requires_grad]
    if grad_outputs is None:
        grad_outputs = [torch.randn_like(o, dtype=torch.float64) for o in out]
    grads = []
    if inputs:
        grads = torch.autograd.grad(out, inputs, [g.to(o.dtype) for g, o in zip(grad_outputs, out)],
                                    allow_unused=True)
    return out, grads, grad_outputs


def assert_matches_reference(fn: Callable, ref_fn: Callable, args: Sequence, check_grads: bool = True):
    """fn(*args) and its gradients against ref_fn: the error against a float64 reference must be
    within twice eager PyTorch's error in the same dtype, plus a small floor (FlashAttention's rule)."""
    dtype = next(t.dtype for t in _leaves(args))
    exact_args = _detached_copy(args, torch.float64)
    exact_out, exact_grads, gouts = _run(ref_fn, exact_args, None)
    if not check_grads:
        exact_grads = []
    same_args = _detached_copy(args)
    eager_out, eager_grads, _ = _run(ref_fn, same_args, gouts if check_grads else [])
    test_args = _detached_copy(args)
    if not check_grads:
        for t in _leaves(test_args):
            t.requires_grad_(False)
    test_out, test_grads, _ = _run(fn, test_args, gouts if check_grads else [])
    assert len(test_out) == len(exact_out), f"{len(test_out)} outputs, expected {len(exact_out)}"
    pairs = [("output", i, t, e, r) for i, (t, e, r) in enumerate(zip(test_out, eager_out, exact_out))]
    if check_grads:
        pairs += [("grad", i, t, e, r) for i, (t, e, r) in enumerate(zip(test_grads, eager_grads, exact_grads))]
    for kind, i, test, eager, exact in pairs:
        if exact is None:
            assert test is None or not test.abs().any(), f"{kind} {i}: expected no gradient"
            continue
        assert test is not None, f"{kind} {i}: missing gradient"
        assert test.shape == exact.shape, f"{kind} {i}: shape {tuple(test.shape)} != {tuple(exact.shape)}"
        assert test.dtype == dtype, f"{kind} {i}: dtype {test.dtype} != {dtype}"
        scale = exact.abs().max().item() if exact.numel() else 0.0
        eager_err = (eager.double() - exact).abs().max().item() if exact.numel() else 0.0
        err = (test.double() - exact).abs().max().item() if exact.numel() else 0.0
        rtol = 1e-5 if dtype == torch.float32 else 0.0
        bound = 2 * eager_err + ATOL[dtype] * max(1.0, scale) + rtol * scale
        assert err <= bound, (f"{kind} {i} ({tuple(exact.shape)}, {dtype}): max error {err:.3g} > "
                              f"bound {bound:.3g} (eager error {eager_err:.3g}, scale {scale:.3g})")


# Shapes: (B, S, Dx, Dz, Dc), odd sizes, B = 0, one position, several position dims.
BACKPROJ_SHAPES = [
    (3, (), 5, 7, 3),
    (2, (1,), 4, 6, 5),
    (4, (9,), 3, 17, 11),
    (0, (5,), 4, 6, 3),
    (2, (3, 5), 6, 5, 7),
    (3, (2, 3, 2), 1, 3, 2),
    (5, (33,), 65, 33, 19),
]

# (B, dims, Dz): K from 1 to 4, odd widths, B = 0.
FUSION_SHAPES = [
    (4, (5,), 3),
    (3, (4, 7, 2), 9),
    (0, (3, 5), 4),
    (17, (16, 1, 31, 8), 13),
    (1, (6, 6), 33),
]


# (B, S, H, Dz, Dc) for context_linear: odd sizes, B = 0, one position, several position dims, and
# sizes past the CPU kernel's small-GEMM loops and its activation chunk.
CONTEXT_SHAPES = [
    (3, (), 5, 7, 3),
    (2, (1,), 4, 6, 5),
    (4, (9,), 3, 17, 11),
    (0, (5,), 4, 6, 3),
    (2, (3, 5), 6, 5, 7),
    (3, (2, 3, 2), 1, 3, 2),
    (5, (33,), 65, 33, 19),
    (64, (9,), 70, 40, 20),
]


def context_inputs(B, S, H, Dz, Dc, bias=True, dtype=torch.float32, device="cpu", noncontiguous=False,
                   requires_grad=True, x_features=6):
    """(p, z, bp_weight, bp_bias, proj_weight). proj_weight is always what hoisting passes: the last
    Dc columns of a Linear weight (H, x_features + Dc); noncontiguous also makes p and z strided and
    bp_weight transposed storage."""
    p = rand((B, *S, H), dtype, device, noncontiguous, requires_grad)
    z = rand((B, Dz), dtype, device, noncontiguous, requires_grad)
    if noncontiguous:
        bp_weight = (rand((Dz, Dc), torch.float64, device) * Dz ** -0.5).to(dtype).t()
    else:
        bp_weight = (rand((Dc, Dz), torch.float64, device) * Dz ** -0.5).to(dtype)
    bp_bias = rand((Dc,), dtype, device) if bias else None
    linear_weight = (rand((H, x_features + Dc), torch.float64, device) * max(Dc, 1) ** -0.5).to(dtype)  # Dc may be 0
    proj_weight = linear_weight[:, x_features:]
    leaves = [bp_weight, bp_bias, proj_weight]
    for t in leaves:
        if t is not None:
            t.requires_grad_(requires_grad)
    return p, z, bp_weight, bp_bias, proj_weight


def hoisted_step_inputs(B, dims, Dz, modalities, dtype=torch.float32, device="cpu", noncontiguous=False, Dcs=None,
                biases=None):
    """refine_step_hoisted's (hs, head_weight, head_bias, ps, bp_weights, bp_biases, proj_weights),
    leaves requiring grad.
    modalities: (positions, H) per modality; proj_weights are column slices of a Linear's weight, as
    hoisting passes them."""
    t = lambda shape, scale=1.0, nc=False: (rand(shape, torch.float64, device, nc) * scale).to(dtype)  # noqa: E731
    hs = [t((B, d), 1.0, noncontiguous) for d in dims]
    hw, hb = t((Dz, sum(dims)), sum(dims) ** -0.5), t((Dz,))
    Dcs = Dcs or [2 + j for j in range(len(modalities))]
    biases = biases or [j % 2 == 0 for j in range(len(modalities))]
    ps = [t((B, *S, H), 1.0, noncontiguous and j % 2 == 1) for j, (S, H) in enumerate(modalities)]
    ws = [t((c, Dz), Dz ** -0.5) for c in Dcs]
    bs = [t((c,)) if has else None for c, has in zip(Dcs, biases)]
    vs = [t((H, 3 + c), c ** -0.5)[:, 3:] for (S, H), c in zip(modalities, Dcs)]
    for x in [*hs, hw, hb, *ps, *ws, *bs, *vs]:
        if x is not None:
            x.requires_grad_(True)
    return hs, hw, hb, ps, ws, bs, vs


def hoisted_step_call(backend, head_act="gelu", bp_act="tanh", out_acts=("relu", "none", "sigmoid", "gelu")):
    """refine_step_hoisted on one backend, as a function of hoisted_step_inputs' tuple: [z, *outs]."""
    def call(hs, hw, hb, ps, ws, bs, vs):
        z, outs = pk.refine_step_hoisted(hs, hw, hb, ps, ws, bs, vs, head_act, bp_act, list(out_acts[:len(ps)]),
                                         backend=backend)
        return [z, *outs]
    return call


def context_call(backend: str, activation: str, out_activation: str) -> Callable:
    """context_linear on one backend, as a function of (p, z, bp_weight, bp_bias, proj_weight)."""
    return lambda p, z, w, b, pw: pk.context_linear(p, z, w, b, pw, activation, out_activation, backend=backend)


def backproj_call(backend: str, activation: str) -> Callable:
    """backproj_concat on one backend, as a function of (x, z, weight, bias)."""
    return lambda x, z, w, b: pk.backproj_concat(x, z, w, b, activation, backend=backend)


def written_into(call: Callable) -> Callable:
    """call's output then written in place, as a model may mask or normalise its input x~ (eager's
    torch.cat keeps nothing of its output, so its backward allows it): the first position overwritten,
    then everything scaled."""
    def written(*args):
        out = call(*args)
        out[:, :1] = 0.25
        return out.mul_(1.5)
    return written


def assert_backproj_output_writable(backend: str, device="cpu", dtype=torch.float32) -> None:
    for activation in ACTIVATIONS:
        for shape in [(3, (4, 2)), (2, ())]:  # positions, and none (a vector modality)
            args = backproj_inputs(*shape, 5, 6, 7, True, dtype, device)
            assert_matches_reference(written_into(backproj_call(backend, activation)),
                                     written_into(lambda x, z, w, b: reference.backproj_concat(x, z, w, b, activation)),
                                     args)


def cpp_saves_output(activation: str, dtype: torch.dtype) -> bool:
    """Whether the C++ autograd of the cpu/cuda backends keeps act(y) (fusion_head's output, a copy
    of backproj_concat's context) for the backward: relu, and tanh/sigmoid but in 16-bit dtypes,
    whose backwards differentiate from y (csrc/activations.h: derivative_from_output)."""
    return activation == "relu" or (activation in ("tanh", "sigmoid") and dtype.itemsize > 2)


def assert_fusion_output_writable(backend: str, device="cpu", dtype=torch.float32,
                                  saves_output: Callable[[str, torch.dtype], bool] = None) -> None:
    """Writes into the head's output (z += r): where the backward keeps nothing of it (no
    activation; gelu keeps its input; saves_output false) they are legal and the gradients equal the
    reference's; where it keeps the result (by default relu, tanh, sigmoid, as eager's activations
    do), the backward may refuse as eager's does, but never reads the overwritten values."""
    saves_output = saves_output or (lambda activation, dtype: activation in ("relu", "tanh", "sigmoid"))
    args = fusion_inputs(3, (4, 5), 6, True, dtype, device)
    for activation in ACTIVATIONS:
        truth = written_into(lambda w, b, *hs: reference.fusion_head(list(hs), w, b, activation).clone())
        try:
            assert_matches_reference(written_into(fusion_call(backend, activation)), truth,
                                     (args[1], args[2], *args[0]))
        except RuntimeError as e:
            if not saves_output(activation, dtype) or "modified by an inplace operation" not in str(e):
                raise


def assert_cpp_saves_what_the_backward_reads(backend: str, device="cpu", dtype=torch.float32) -> None:
    """The (B, Dc) context copy and the (B, Dz) output are saved exactly where cpp_saves_output says
    (counted by a saved-tensors hook)."""
    B, Dz, Dc = 3, 6, 5
    for activation in ACTIVATIONS:
        x, z, w, b = backproj_inputs(B, (4,), 2, Dz, Dc, True, dtype, device)
        hs, hw, hb = fusion_inputs(B, (4, 5), Dz, True, dtype, device)
        for name, call, shape in (("backproj_concat", lambda: pk.backproj_concat(x, z, w, b, activation,
                                                                                 backend=backend), (B, Dc)),
                                  ("fusion_head", lambda: pk.fusion_head(hs, hw, hb, activation, backend=backend),
                                   (B, Dz))):
            packed = []

            def pack(t):
                packed.append(tuple(t.shape))
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                call()
            assert (shape in packed) == cpp_saves_output(activation, dtype), (name, activation, dtype, packed)


def fusion_call(backend: str, activation: str) -> Callable:
    """fusion_head on one backend, as a function of (weight, bias, *hs)."""
    return lambda w, b, *hs: pk.fusion_head(list(hs), w, b, activation, backend=backend)


def assert_refine_step_matches_reference(backend: str, activation: str, device="cpu") -> None:
    """refine_step over three modalities (vector, sequence, image; one without a bias), forward and
    every gradient, against the reference."""
    hs, hw, hb = fusion_inputs(3, (4, 5, 6), 7, device=device)
    xs = [torch.randn(3, 4, device=device), torch.randn(3, 5, 2, device=device),
          torch.randn(3, 2, 3, 4, device=device)]
    ws = [torch.randn(c, 7, device=device) * 0.4 for c in (2, 3, 1)]
    bs = [torch.randn(2, device=device), None, torch.randn(1, device=device)]
    for t in [*xs, *ws, bs[0], bs[2]]:
        t.requires_grad_(True)

    def step(name):
        def run(hw_, hb_, *rest):
            h, x, w = list(rest[:3]), list(rest[3:6]), list(rest[6:9])
            return pk.refine_step(h, hw_, hb_, x, w, [rest[9], None, rest[10]], "tanh", activation, backend=name)
        return run

    assert_matches_reference(step(backend), step("torch"), (hw, hb, *hs, *xs, *ws, bs[0], bs[2]))


def assert_ops_compile_without_graph_breaks(backend: str, device="cpu") -> None:
    """Every op on one backend under torch.compile(fullgraph=True): no graph break, and outputs and
    gradients equal to eager. (context_linear and refine_step_hoisted where the backend has it.)"""
    import torch._dynamo
    from pf_kernels._dispatch import implements

    x, z, w, b = backproj_inputs(3, (4,), 5, 6, 7, True, device=device)
    hs, hw, hb = fusion_inputs(3, (3, 5), 6, device=device)
    with_context_linear = implements(backend, "context_linear")
    pw = rand((4, 7), device=device, requires_grad=with_context_linear)

    def step(x, z, w, b, hw, hb, pw, h0, h1):
        y = pk.backproj_concat(x, z, w, b, "gelu", backend=backend)
        f = pk.fusion_head([h0, h1], hw, hb, "tanh", backend=backend)
        zz, xs = pk.refine_step([h0, h1], hw, hb, [x], [w[:, :6]], [b], "relu", "sigmoid", backend=backend)
        outs = (y, f, zz, xs[0])
        if with_context_linear:
            outs += (pk.context_linear(y[..., :4], z, w, b, pw, "tanh", "relu", backend=backend),
                     pk.context_linear(x[..., :4], zz, w[:, :6], None, pw, "gelu", "none", backend=backend))
            zh, (ph,) = pk.refine_step_hoisted([h0, h1], hw, hb, [x[..., :4]], [w[:, :6]], [b], [pw], "relu",
                                               "sigmoid", "gelu", backend=backend)
            outs += (zh, ph)
        return outs

    args = (x, z, w, b, hw, hb, pw, *hs)

    def outputs_and_grads(fn):
        outs = list(fn(*args))
        grads = torch.autograd.grad([o.sum() * 1.5 for o in outs], [a for a in args if a.requires_grad])
        return outs + list(grads)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(outputs_and_grads(compiled), outputs_and_grads(step)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
