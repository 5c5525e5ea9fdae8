"""Under DistributedDataParallel (gloo, 2 processes on this CPU), a converted model trains exactly as
the unconverted model does, and a hoisted ProgressiveFusion as the same model unhoisted: same
gradients after DDP's all-reduce, same parameters after the steps, the same on both ranks."""
import copy
import datetime
import json
import os
import socket
import sys
import traceback

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import pf_kernels as pk
from pf_kernels.convert import count_fused_calls
from tests.convert_cases import small_progressive_inputs, small_progressive_model

WORLD = 2
STEPS = 3


def _convert_pair():
    """(model, reference, fused calls expected per forward, what convert() reported, a batch)."""
    model, expected = small_progressive_model()
    reference = copy.deepcopy(model)
    _, report = pk.convert(model)  # captured at the first call, inside DDP's forward
    return model, reference, expected, lambda: report.counts, lambda: small_progressive_inputs()[0]


def _progressive_fusion_pair():
    """A hoisted ProgressiveFusion (a sequence encoder, a vector one) and its unhoisted twin."""
    encoders = [nn.Sequential(nn.Linear(5 + 3, 8), nn.GELU(), nn.Linear(8, 8), Mean(1)),
                nn.Sequential(nn.Linear(4 + 2, 8), nn.Tanh())]
    model = _Head(pk.nn.ProgressiveFusion(encoders, [8, 8], 6, [3, 2], iterations=3))
    reference = copy.deepcopy(model)
    reference.body.hoist = False
    assert reference.body.hoisted == ()
    return model, reference, {"hoisted": [0, 1]}, lambda: {"hoisted": list(model.body.hoisted)}, \
        lambda: [torch.randn(4, 7, 5), torch.randn(4, 4)]


class Mean(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, h):
        return h.mean(self.dim)


class _Head(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body, self.out = body, nn.Linear(6, 2)

    def forward(self, xs):
        return self.out(self.body(xs))


def _worker(rank, port, out_dir, kind):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks
        model, reference, expected, counts, batch = _convert_pair() if kind == "convert" else _progressive_fusion_pair()
        # tiny buckets: torch.compile's DDP optimizer would cut the graph at every one
        ddp = DistributedDataParallel(model, bucket_cap_mb=1e-4)
        ddp_ref = DistributedDataParallel(reference, bucket_cap_mb=1e-4)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        opt_ref = torch.optim.SGD(ddp_ref.parameters(), lr=0.1, momentum=0.9)
        grad_diff, calls = 0.0, None
        for step in range(STEPS):
            torch.manual_seed(100 + 10 * step + rank)  # each rank its own batch
            inputs, target = batch(), torch.randint(0, 2, (4,))
            for net, optimizer in ((ddp_ref, opt_ref), (ddp, opt)):
                optimizer.zero_grad()
                with count_fused_calls() as counted:
                    loss = torch.nn.functional.cross_entropy(net(inputs), target)
                loss.backward()
                if net is ddp:
                    calls = dict(counted) if kind == "convert" else {"hoisted": list(model.body.hoisted)}
            grad_diff = max([grad_diff] + [(p.grad - q.grad).abs().max().item()
                                           for p, q in zip(model.parameters(), reference.parameters())])
            opt_ref.step()
            opt.step()
        param_diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
        # DDP all-reduced: every rank holds the same parameters
        gathered = [torch.zeros(1) for _ in range(WORLD)]
        dist.all_gather(gathered, torch.stack([p.sum() for p in model.parameters()]).sum().reshape(1))
        result = {"grad_diff": grad_diff, "param_diff": param_diff, "calls": calls, "expected": expected,
                  "counts": counts(),
                  "rank_spread": (gathered[0] - gathered[1]).abs().item()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
        code = 0
    except BaseException:
        traceback.print_exc()
        code = 1
    # Leave without tearing gloo down: ProcessGroupGloo's destructor joins its run-loop thread while
    # holding the GIL, and that thread may be waiting for the GIL (hung a CI run in
    # destroy_process_group). The results are on disk; the parent checks them and the exit code.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo in this torch")
@pytest.mark.parametrize("kind", ["convert", "progressive_fusion"])
def test_under_ddp_trains_like_the_original(tmp_path, kind):
    # fork where it is safe: the workers start with torch and pf_kernels imported (spawn imports
    # them again in each: several seconds here). A CUDA build of torch starts autograd device
    # threads at the first backward, after which a forked child cannot run backward; a CPU-only
    # build starts none (and each worker runs one OpenMP thread).
    method = "fork" if torch.version.cuda is None and "fork" in mp.get_all_start_methods() else "spawn"
    torch._dynamo.reset()
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path), kind), nprocs=WORLD, join=True, start_method=method)
    for rank in range(WORLD):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["calls"] == result["expected"] == result["counts"], result
        assert result["grad_diff"] < 1e-5 and result["param_diff"] < 1e-5, result
        assert result["rank_spread"] < 1e-5, result
