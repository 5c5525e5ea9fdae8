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


def test_separately_built_models_share_their_compiled_graph():
    """A model built again (another test, another seed) compiles to the graph the first one did: the
    hoisted tails are one function per distinct code. (They were a GraphModule each, a class of its
    own that torch.compile guarded on: every model compiled anew, and under fullgraph=True the ninth
    raised, as dynamo's recompile limit is 8.)"""
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # (torch 2.11's reset keeps counters)
    for seed in range(10):
        torch.manual_seed(seed)
        model = ProgressiveFusion([nn.Sequential(nn.Linear(3 + 4, 8), nn.Tanh(), nn.Linear(8, 8)),
                                   nn.Sequential(nn.Linear(5 + 4, 8), nn.ReLU())], [8, 8], 6, 4, iterations=3)
        assert model.hoisted == (0, 1)
        xs = [torch.randn(5, 3), torch.randn(5, 5)]
        out = torch.compile(model, fullgraph=True)(xs)
        torch.testing.assert_close(out, model(xs), rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1
