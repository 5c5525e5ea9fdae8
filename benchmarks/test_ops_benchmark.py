"""pytest-benchmark suite: `pytest benchmarks --benchmark-only` (kept out of the normal test run).

Each op, forward+backward, on the quick grid, every provider on this device side by side; group by
case so pytest-benchmark prints the providers of one case together. `python -m benchmarks` is the
main benchmark (torch.compile, what ran, bytes and roofline); this suite is for pytest-benchmark's
own statistics and its --benchmark-compare."""
import pytest
import torch

from .cases import EAGER, OPS, BackendOps, all_cases
from .run import fused_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = {"eager": EAGER, **{b: BackendOps(b) for b in fused_backends(DEVICE)}}
CASES = all_cases(quick=True, ops=OPS, device_type=DEVICE.type)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}[{c.label}]" for c in CASES])
def test_fwd_bwd(benchmark, case, provider):
    benchmark.group = f"{case.op} {case.label} fwd+bwd"
    inputs = case.make_inputs(DEVICE, torch.float32)
    leaves = [t for t in inputs if t.requires_grad]
    ops = PROVIDERS[provider]
    outs = case.call(ops, *inputs)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    grads = [torch.randn_like(o) for o in outs]

    def step():
        result = case.call(ops, *inputs)
        result = list(result) if isinstance(result, (tuple, list)) else [result]
        torch.autograd.grad(result, leaves, grads)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
