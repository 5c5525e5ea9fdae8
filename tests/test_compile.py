"""torch.compile(fullgraph=True) traces every op on every backend this machine runs, forward and
backward, equal to eager; a whole ProgressiveFusion model too; new batch sizes do not recompile."""
import pytest
import torch
import torch._dynamo
from torch import nn

import pf_kernels as pk
from pf_kernels._dispatch import implements
from pf_kernels.nn import ProgressiveFusion
from tests.cases import assert_ops_compile_without_graph_breaks

CPU_BACKENDS = [b for b, info in pk.available_backends().items()
                if info["available"] and ("cpu" in info["devices"] or "*" in info["devices"])]


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=None)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ops_compile_without_graph_breaks(backend):
    assert_ops_compile_without_graph_breaks(backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("hoist", [True, False], ids=["hoisted", "unhoisted"])
def test_progressive_fusion_compiles_and_new_batch_sizes_do_not_recompile(backend, hoist):
    encoders = [nn.Sequential(nn.Linear(4 + 3, 8), nn.Tanh()), nn.Linear(2 + 3, 8)]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.pf = ProgressiveFusion(encoders, [8, 8], 6, 3, iterations=3, backend=backend, hoist=hoist)

        def forward(self, a, b):
            return self.pf([a, b.mean(1) if b.dim() == 3 else b])

    model = Model()
    assert model.pf.hoisted == ((0, 1) if hoist and implements(backend, "context_linear") else ())
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
