"""torch.library.opcheck on every registered op: schema, fake tensors, autograd registration, AOT."""
import pytest
import torch

import pf_kernels as pk
from tests.cases import backproj_inputs, fusion_inputs

HAS_C = pk.available_backends()["cpu"]["available"]
pytestmark = pytest.mark.skipif(not HAS_C, reason="pf_kernels._C is not built")


def backproj_samples():
    yield backproj_inputs(3, (4,), 5, 6, 7, True) + ("relu",)
    yield backproj_inputs(2, (3, 2), 4, 5, 3, False, torch.bfloat16) + ("gelu",)
    yield backproj_inputs(0, (5,), 4, 6, 3, True) + ("tanh",)
    yield backproj_inputs(3, (4,), 5, 6, 7, True, noncontiguous=True) + ("sigmoid",)


def fusion_samples():
    hs, w, b = fusion_inputs(4, (3, 5, 2), 6)
    yield hs, w, b, "relu"
    hs, w, b = fusion_inputs(3, (4, 4), 5, False, torch.bfloat16)
    yield hs, w, b, "gelu"
    hs, w, b = fusion_inputs(0, (3, 2), 4)
    yield hs, w, b, "none"
    hs, w, b = fusion_inputs(5, (7, 1), 3, noncontiguous=True)
    yield hs, w, b, "sigmoid"


@pytest.mark.parametrize("sample", list(backproj_samples()), ids=["fp32", "bf16", "B0", "strided"])
def test_opcheck_backproj_concat(sample):
    torch.library.opcheck(torch.ops.pf_kernels.backproj_concat.default, sample)


@pytest.mark.parametrize("sample", list(fusion_samples()), ids=["fp32", "bf16", "B0", "strided"])
def test_opcheck_fusion_head(sample):
    torch.library.opcheck(torch.ops.pf_kernels.fusion_head.default, sample)


def test_opcheck_backward_ops():
    x, z, w, b = backproj_inputs(3, (4,), 5, 6, 7, True, requires_grad=False)
    out = torch.ops.pf_kernels.backproj_concat(x, z, w, b, "tanh")
    for context in (out[:, 0, 5:].clone(), None):  # act(y) saved, or recomputed from z
        torch.library.opcheck(torch.ops.pf_kernels.backproj_concat_backward.default,
                              (torch.randn_like(out), context, z, w, b, "tanh", 5))
    hs, hw, hb = fusion_inputs(4, (3, 5), 6, requires_grad=False)
    out = torch.ops.pf_kernels.fusion_head(hs, hw, hb, "relu")
    for saved in (out, None):  # act(y) saved, or recomputed
        torch.library.opcheck(torch.ops.pf_kernels.fusion_head_backward.default,
                              (torch.randn_like(out), hs, hw, hb, saved, "relu"))
