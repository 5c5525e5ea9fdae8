import os
import zlib

import pytest
import torch

# The triton backend's tests run its kernels on CPU tensors through the Triton interpreter. It must
# be switched on before anything imports triton.language (importing pf_kernels does, through
# torch._dynamo), so here, first; only where no GPU can run the kernels for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests import cases  # noqa: F401  (the shared case generators)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test, fixed per test name so that a failure reproduces.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))  # hash() differs per process
    yield


def pytest_runtest_logreport(report):
    # `make gpu-check` sets PF_KERNELS_FAILURE_LOG: each failure is written the moment it happens,
    # so a run cut short by its time limit still says what failed and why. Written by the
    # controlling process only (pytest-xdist forwards its workers' reports there).
    path = os.environ.get("PF_KERNELS_FAILURE_LOG")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as f:
            f.write(f"FAILED {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n\n")
