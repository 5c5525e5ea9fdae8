"""The reference ops against hand-written loops, and their gradients in float64."""
import itertools
import math

import pytest
import torch

import pf_kernels as pk
from pf_kernels import reference
from tests.cases import ACTIVATIONS, BACKPROJ_SHAPES, FUSION_SHAPES, backproj_inputs, fusion_inputs

SCALAR_ACT = {
    "none": lambda v: v,
    "relu": lambda v: max(v, 0.0),
    "gelu": lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))),
    "tanh": math.tanh,
    "sigmoid": lambda v: 1.0 / (1.0 + math.exp(-v)),
}


def loop_backproj_concat(x, z, w, b, activation):
    B, Dx, Dc, Dz = x.shape[0], x.shape[-1], w.shape[0], w.shape[1]
    positions = list(itertools.product(*[range(n) for n in x.shape[1:-1]]))
    out = torch.empty(*x.shape[:-1], Dx + Dc, dtype=torch.float64)
    for bi in range(B):
        context = []
        for c in range(Dc):
            acc = sum(float(z[bi, k]) * float(w[c, k]) for k in range(Dz)) + (float(b[c]) if b is not None else 0.0)
            context.append(SCALAR_ACT[activation](acc))
        for pos in positions:
            for d in range(Dx):
                out[(bi, *pos, d)] = float(x[(bi, *pos, d)])
            for c in range(Dc):
                out[(bi, *pos, Dx + c)] = context[c]
    return out


def loop_fusion_head(hs, w, b, activation):
    B, Dz = hs[0].shape[0], w.shape[0]
    out = torch.empty(B, Dz, dtype=torch.float64)
    for bi in range(B):
        row = [float(v) for h in hs for v in h[bi]]
        for o in range(Dz):
            acc = sum(r * float(w[o, k]) for k, r in enumerate(row)) + (float(b[o]) if b is not None else 0.0)
            out[bi, o] = SCALAR_ACT[activation](acc)
    return out


@pytest.mark.parametrize("shape", BACKPROJ_SHAPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_backproj_concat_matches_loops(shape, activation, bias):
    B, S, Dx, Dz, Dc = shape
    x, z, w, b = backproj_inputs(B, S, Dx, Dz, Dc, bias, torch.float64, requires_grad=False)
    out = reference.backproj_concat(x, z, w, b, activation)
    assert out.shape == (B, *S, Dx + Dc) and out.dtype == torch.float64
    torch.testing.assert_close(out, loop_backproj_concat(x, z, w, b, activation), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", FUSION_SHAPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_fusion_head_matches_loops(shape, activation, bias):
    B, dims, Dz = shape
    hs, w, b = fusion_inputs(B, dims, Dz, bias, torch.float64, requires_grad=False)
    out = reference.fusion_head(hs, w, b, activation)
    assert out.shape == (B, Dz)
    torch.testing.assert_close(out, loop_fusion_head(hs, w, b, activation), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_refine_step_is_head_then_backprojections(activation):
    hs, hw, hb = fusion_inputs(3, (4, 5, 6), 7, dtype=torch.float64, requires_grad=False)
    xs = [torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64),
          torch.randn(3, 2, 3, 4, dtype=torch.float64)]
    ws = [torch.randn(c, 7, dtype=torch.float64) for c in (2, 3, 1)]
    bs = [torch.randn(2, dtype=torch.float64), None, torch.randn(1, dtype=torch.float64)]
    z, outs = reference.refine_step(hs, hw, hb, xs, ws, bs, "tanh", activation)
    torch.testing.assert_close(z, loop_fusion_head(hs, hw, hb, "tanh"), rtol=1e-12, atol=1e-12)
    for x, w, b, out in zip(xs, ws, bs, outs):
        torch.testing.assert_close(out, loop_backproj_concat(x, z, w, b, activation), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_accumulates_in_fp32(dtype):
    # A long reduction in fp32 then one rounding: equals the fp64 result rounded to dtype.
    hs, w, b = fusion_inputs(8, (300, 200), 5, dtype=dtype, requires_grad=False)
    out = reference.fusion_head(hs, w, b, "none")
    exact = reference.fusion_head([h.double() for h in hs], w.double(), b.double(), "none")
    assert out.dtype == dtype
    torch.testing.assert_close(out, exact.to(dtype), rtol=torch.finfo(dtype).eps, atol=1e-3)


@pytest.mark.parametrize("activation", ["none", "gelu", "tanh", "sigmoid"])  # relu: kink, not smooth
def test_gradcheck_float64(activation):
    x, z, w, b = backproj_inputs(2, (3, 2), 3, 4, 2, True, torch.float64)
    assert torch.autograd.gradcheck(lambda *a: reference.backproj_concat(*a, activation), (x, z, w, b))
    hs, hw, hb = fusion_inputs(3, (2, 3, 1), 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w_, b_, *h: reference.fusion_head(h, w_, b_, activation),
                                    (hw, hb, *hs))


def test_per_modality_lists_of_another_length_are_refused_not_cut():
    torch.manual_seed(0)
    hs, hw = [torch.randn(3, 4)], torch.randn(5, 4)
    ps, ws, vs = [torch.randn(3, 2, 6), torch.randn(3, 6)], [torch.randn(2, 5)] * 2, [torch.randn(6, 2)] * 2
    z, outs = reference.refine_step_hoisted(hs, hw, None, ps, ws, [None, None], vs)  # out_activations "none"
    assert len(outs) == 2
    torch.testing.assert_close(outs[1], reference.context_linear(ps[1], z, ws[1], None, vs[1], "relu", "none"))
    with pytest.raises(ValueError, match="one entry per modality"):
        reference.refine_step_hoisted(hs, hw, None, ps, ws, [None, None], vs, out_activations=["relu"])
    with pytest.raises(ValueError, match="one entry per modality"):
        reference.backproj_concat_grouped([torch.randn(3, 2)] * 2, z, ws[:1], [None, None])


def test_per_modality_biases_may_be_none_as_in_the_public_ops():
    torch.manual_seed(0)
    hs, hw, hb = [torch.randn(2, 3), torch.randn(2, 4)], torch.randn(5, 7), torch.randn(5)
    xs, ps = [torch.randn(2, 3, 2), torch.randn(2, 1)], [torch.randn(2, 3, 6), torch.randn(2, 4)]
    ws, pws = [torch.randn(4, 5), torch.randn(3, 5)], [torch.randn(6, 4), torch.randn(4, 3)]
    z = torch.randn(2, 5)
    for got, want in [(reference.backproj_concat_grouped(xs, z, ws, None),
                       reference.backproj_concat_grouped(xs, z, ws, [None, None])),
                      (reference.refine_step(hs, hw, hb, xs, ws, None)[1], reference.refine_step(hs, hw, hb, xs, ws, [None] * 2)[1]),
                      (reference.refine_step_hoisted(hs, hw, hb, ps, ws, None, pws)[1],
                       reference.refine_step_hoisted(hs, hw, hb, ps, ws, [None] * 2, pws)[1])]:
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(pk.refine_step(hs, hw, hb, xs, ws, None, backend="torch")[1][0],
                               reference.refine_step(hs, hw, hb, xs, ws, None)[1][0])
