"""pytest-benchmark suite: `pytest benchmarks --benchmark-only` (kept out of the normal test run).

Each op, forward+backward, on the quick grid, every provider on this device side by side; group by
case so pytest-benchmark prints the providers of one case together."""
import pytest
import torch

from pf_kernels import reference

from .cases import BackendOps, all_cases
from .run import OPS, fused_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = {"eager": reference, **{b: BackendOps(b) for b in fused_backends(DEVICE)}}
CASES = all_cases(quick=True, ops=OPS)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}[{c.label}]" for c in CASES])
def test_fwd_bwd(benchmark, case, provider):
    benchmark.group = f"{case.op} {case.label} fwd+bwd"
    inputs = case.make_inputs(DEVICE, torch.float32)
    ops = PROVIDERS[provider]
    outs = case.call(ops, *inputs)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    grads = [torch.randn_like(o) for o in outs]

    def step():
        result = case.call(ops, *inputs)
        result = list(result) if isinstance(result, (tuple, list)) else [result]
        torch.autograd.backward(result, grads)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
