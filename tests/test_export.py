"""torch.export of the modules and of ProgressiveFusion (hoisted or not) on every backend this
machine runs: the exported program equals eager on batch sizes and lengths it was not traced with,
and a saved program loads and runs in a fresh process that only imported pf_kernels (the import
registers the compiled ops)."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.export import Dim

import pf_kernels as pk
from pf_kernels.nn import BackProjection, FusionHead, ProgressiveFusion

CPU_BACKENDS = [b for b, info in pk.available_backends().items()
                if info["available"] and ("cpu" in info["devices"] or "*" in info["devices"])]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MeanOverTime(nn.Module):
    def forward(self, h):
        return h.mean(1)


def progressive_fusion(backend, hoist):
    torch.manual_seed(0)
    encoders = [nn.Sequential(nn.Linear(5 + 3, 8), nn.Tanh()),
                nn.Sequential(nn.Linear(4 + 2, 8), nn.GELU(), MeanOverTime())]
    return ProgressiveFusion(encoders, [8, 8], 6, [3, 2], iterations=3, backend=backend, hoist=hoist)


def inputs(b, t):
    return [torch.randn(b, 5), torch.randn(b, t, 4)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("hoist", [True, False], ids=["hoisted", "unhoisted"])
def test_progressive_fusion_exports_with_dynamic_batch_and_length(backend, hoist):
    model = progressive_fusion(backend, hoist).eval()
    batch, length = Dim("batch", min=2, max=4096), Dim("length", min=2, max=4096)
    program = torch.export.export(model, (inputs(3, 7),), dynamic_shapes=([{0: batch}, {0: batch, 1: length}],))
    if backend != "torch":
        assert any(str(node.target).startswith("pf_kernels") for node in program.graph.nodes), program.graph
    exported = program.module()
    for b, t in [(2, 2), (9, 5), (33, 17)]:
        xs = inputs(b, t)
        torch.testing.assert_close(exported(xs), model(xs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_modules_export_with_dynamic_batch(backend):
    torch.manual_seed(0)
    batch = Dim("batch", min=2, max=4096)
    back_projection = BackProjection(6, 3, activation="tanh", backend=backend)
    head = FusionHead([4, 5], 6, activation="sigmoid", backend=backend)
    cases = [(back_projection, lambda b: (torch.randn(b, 7, 4), torch.randn(b, 6)), ({0: batch}, {0: batch})),
             (head, lambda b: ([torch.randn(b, 4), torch.randn(b, 5)],), ([{0: batch}, {0: batch}],))]
    for module, make, dynamic_shapes in cases:
        exported = torch.export.export(module, make(3), dynamic_shapes=dynamic_shapes).module()
        for b in (2, 11):
            args = make(b)
            torch.testing.assert_close(exported(*args), module(*args), rtol=1e-5, atol=1e-6)


_LOAD_IN_A_FRESH_PROCESS = r"""
import sys
import torch
import pf_kernels  # registers the compiled ops the program calls
program = torch.export.load(sys.argv[1])
xs, expected = torch.load(sys.argv[2])
torch.testing.assert_close(program.module()(xs), expected, rtol=1e-5, atol=1e-6)
print("ok")
"""


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b in ("cpu", "auto")])
def test_saved_program_loads_in_a_process_that_imported_pf_kernels(backend, tmp_path):
    model = progressive_fusion(backend, hoist=True).eval()
    program = torch.export.export(model, (inputs(3, 7),))
    assert any(str(node.target).startswith("pf_kernels") for node in program.graph.nodes)
    torch.export.save(program, tmp_path / "model.pt2")
    xs = inputs(3, 7)
    torch.save((xs, model(xs)), tmp_path / "io.pt")
    done = subprocess.run([sys.executable, "-c", _LOAD_IN_A_FRESH_PROCESS, str(tmp_path / "model.pt2"),
                           str(tmp_path / "io.pt")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_converted_model_exports_and_traces_its_plain_forward():
    """torch.export (strict or not), torch.jit.trace and torch.fx of a converted model see the model's
    own forward (non-strict export raised AttributeError: 'ConvertedForward' object has no attribute
    '__code__'; jit.trace refused a dynamo-optimized function); the conversion stays on for eager calls."""
    from pf_kernels.convert import count_fused_calls
    from tests.convert_cases import tanh_progressive_inputs, tanh_progressive_model
    torch.manual_seed(0)
    model = tanh_progressive_model()[0].eval()
    args, new = tanh_progressive_inputs(), tanh_progressive_inputs()
    expected = model(*args)
    pk.convert(model, example_inputs=args)
    for strict in (False, True):
        program = torch.export.export(model, args, strict=strict)
        torch.testing.assert_close(program.module()(*args), expected, rtol=1e-5, atol=1e-6)
    traced = torch.jit.trace(model, args, check_trace=False)
    torch.testing.assert_close(traced(*new), model(*new), rtol=1e-5, atol=1e-6)
    with count_fused_calls() as calls:
        torch.testing.assert_close(model(*args), expected, rtol=1e-5, atol=1e-6)
    assert calls["fusion_head"] >= 1, dict(calls)
