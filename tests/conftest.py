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


SHARD_ENV = "PF_KERNELS_TEST_SHARD"


def pytest_collection_modifyitems(config, items):
    # PF_KERNELS_TEST_SHARD=i/n keeps every n-th test from the i-th: n processes run one file in
    # parallel. On a GPU the triton tests are bound by Triton compiling each kernel
    # specialisation on one core; shards spread that over the cores (share TRITON_CACHE_DIR).
    shard = os.environ.get(SHARD_ENV)
    if not shard:
        return
    try:
        index, count = (int(v) for v in shard.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        raise pytest.UsageError(f"{SHARD_ENV} must be i/n with 0 <= i < n, got {shard!r}")
    keep = [item for k, item in enumerate(items) if k % count == index]
    config.hook.pytest_deselected(items=[item for k, item in enumerate(items) if k % count != index])
    items[:] = keep
