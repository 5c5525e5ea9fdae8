"""torch.compile(fullgraph=True) traces every op on every backend this machine runs, forward and
backward, equal to eager; a whole ProgressiveFusion model too; new batch sizes do not recompile."""
import pytest
import torch
import torch._dynamo
from torch import nn

import pf_kernels as pk
from pf_kernels.nn import ProgressiveFusion
from tests.cases import backproj_inputs, fusion_inputs

CPU_BACKENDS = [b for b, info in pk.available_backends().items()
                if info["available"] and ("cpu" in info["devices"] or "*" in info["devices"])]


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=None)


def run_and_grads(fn, args):
    out = fn(*args)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    flat = [o for item in outs for o in (item if isinstance(item, list) else [item])]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad([o.sum() * 1.5 for o in flat], leaves)
    return flat, grads


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ops_compile_without_graph_breaks(backend):
    x, z, w, b = backproj_inputs(3, (4,), 5, 6, 7, True)
    hs, hw, hb = fusion_inputs(3, (3, 5), 6)

    def step(x, z, w, b, hw, hb, h0, h1):
        y = pk.backproj_concat(x, z, w, b, "gelu", backend=backend)
        f = pk.fusion_head([h0, h1], hw, hb, "tanh", backend=backend)
        zz, xs = pk.refine_step([h0, h1], hw, hb, [x], [w[:, :6]], [b], "relu", "sigmoid", backend=backend)
        return y, f, zz, xs[0]

    args = (x, z, w, b, hw, hb, *hs)
    eager_out, eager_grads = run_and_grads(step, args)
    explanation = torch._dynamo.explain(step)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    comp_out, comp_grads = run_and_grads(compiled(step), args)
    for a, e in zip(comp_out + list(comp_grads), eager_out + list(eager_grads)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_progressive_fusion_compiles_and_new_batch_sizes_do_not_recompile(backend):
    encoders = [nn.Sequential(nn.Linear(4 + 3, 8), nn.Tanh()), nn.Linear(2 + 3, 8)]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.pf = ProgressiveFusion(encoders, [8, 8], 6, 3, iterations=3, backend=backend)

        def forward(self, a, b):
            return self.pf([a, b.mean(1) if b.dim() == 3 else b])

    model = Model()
    fn = compiled(model)
    counts = []
    for B in (4, 7, 9, 12):
        a, b = torch.randn(B, 4), torch.randn(B, 2)
        out = fn(a, b)
        torch.testing.assert_close(out, model(a, b), rtol=1e-5, atol=1e-5)
        out.sum().backward()
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    # The first size compiles, the second marks the batch dynamic; later sizes reuse that graph.
    assert counts[-1] == counts[1], counts
