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
