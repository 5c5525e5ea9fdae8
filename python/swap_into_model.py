"""Swap pf_kernels into a model written the usual way, and show what it buys.

A multimodal model in MultiBench's style (pliang279/MultiBench: a wrapper that runs a list of
encoders over a list of inputs in a Python loop and keeps `reps` and `fuseout` for the training
loop, a ConcatWithLinear fusion; MLP, GRU and deep-averaging encoders; an MLP head), with
backward connections added by hand (Progressive Fusion: the fused vector, projected per modality
and broadcast over its positions, joins the modality's input for the next pass). No pf_kernels in
sight. pf_kernels.convert
captures its forward and swaps in the fused ops; the program prints what was swapped (and what
was not, and why), how many fused calls one forward makes, the largest difference to the
unconverted model (outputs, gradients, the attributes the training loop reads), and the time of a
training step and of inference, both models timed side by side in rounds (medians).

Run: python python/swap_into_model.py [--device cpu|cuda] [--batch 256] [--rounds 30] [--backend auto]
     [--steps 3] [--threads N]
"""
import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import pf_kernels
from pf_kernels.convert import count_fused_calls


class MLP(nn.Module):
    def __init__(self, indim, hiddim, outdim):
        super().__init__()
        self.fc = nn.Linear(indim, hiddim)
        self.fc2 = nn.Linear(hiddim, outdim)

    def forward(self, x):
        return self.fc2(F.relu(self.fc(x)))


class GRU(nn.Module):
    """A batch-first GRU; its final hidden state."""

    def __init__(self, indim, hiddim):
        super().__init__()
        self.gru = nn.GRU(indim, hiddim, batch_first=True)

    def forward(self, x):
        return self.gru(x)[1][-1]


class DAN(nn.Module):
    """A deep averaging network over a channels-last image read as H*W positions: LayerNorm, a
    Linear per position, the mean over positions, an MLP."""

    def __init__(self, indim, hiddim, outdim):
        super().__init__()
        self.norm = nn.LayerNorm(indim)
        self.embedding = nn.Linear(indim, hiddim)
        self.mlp = MLP(hiddim, hiddim, outdim)

    def forward(self, x):
        embedded = F.relu(self.embedding(self.norm(x)))
        return self.mlp(embedded.flatten(1, -2).mean(dim=1))


class ConcatWithLinear(nn.Module):
    def __init__(self, indim, outdim):
        super().__init__()
        self.fc = nn.Linear(indim, outdim)

    def forward(self, modalities):
        return F.relu(self.fc(torch.cat(modalities, dim=1)))


class ProgressiveMMDL(nn.Module):
    def __init__(self, encoders, fusion, head, fused_dim, context_dims, steps=3):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.fuse = fusion
        self.head = head
        self.back = nn.ModuleList(nn.Linear(fused_dim, c) for c in context_dims)
        self.context_dims = context_dims
        self.steps = steps
        self.reps, self.fuseout = [], None

    def forward(self, inputs):
        z = None
        for _ in range(self.steps):
            outs = []
            for i in range(len(inputs)):
                x = inputs[i]
                if z is None:
                    context = x.new_zeros(*x.shape[:-1], self.context_dims[i])
                else:
                    c = torch.relu(self.back[i](z))
                    context = c.view(c.shape[0], *([1] * (x.dim() - 2)), -1).expand(*x.shape[:-1], -1)
                outs.append(self.encoders[i](torch.cat([x, context], dim=x.dim() - 1)))
            self.reps = outs
            z = self.fuse(outs)
            self.fuseout = z
        return self.head(z)


def build(dims=(32, 16, 8), context=16, hidden=64, fused=64, steps=3):
    encoders = [MLP(dims[0] + context, hidden, hidden), GRU(dims[1] + context, hidden),
                DAN(dims[2] + context, hidden, hidden)]
    return ProgressiveMMDL(encoders, ConcatWithLinear(hidden * len(dims), fused), MLP(fused, hidden, 2),
                           fused, [context] * len(dims), steps)


def max_differences(reference, converted, inputs, target):
    out_ref, out = reference(inputs), converted(inputs)
    loss_ref, loss = F.cross_entropy(out_ref, target), F.cross_entropy(out, target)
    grads_ref = torch.autograd.grad(loss_ref, list(reference.parameters()))
    grads = torch.autograd.grad(loss, list(converted.parameters()))
    return {"output": (out - out_ref).abs().max().item(),
            "parameter gradients": max((g - r).abs().max().item() for g, r in zip(grads, grads_ref)),
            "model.reps": max((a - b).abs().max().item() for a, b in zip(converted.reps, reference.reps)),
            "model.fuseout": (converted.fuseout - reference.fuseout).abs().max().item()}


def side_by_side(models, make_step, rounds, sync):
    """Median seconds per call of each model's step, timed back to back in every round (a slow spell
    of a shared machine hits both alike)."""
    steps = {name: make_step(model) for name, model in models.items()}
    for step in steps.values():  # warm-up (the converted model captures here if it has not)
        for _ in range(3):
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=30, help="timing rounds (0: no timing)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--steps", type=int, default=3, help="refinement steps (Progressive Fusion's R)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (one is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    B, T, H, W = args.batch, 50, 6, 6
    inputs = [torch.randn(B, 32, device=device), torch.randn(B, T, 16, device=device),
              torch.randn(B, H, W, 8, device=device)]
    target = torch.randint(0, 2, (B,), device=device)
    model = build(steps=args.steps).to(device)
    reference = copy.deepcopy(model)

    print(f"MultiBench-style progressive model: vector 32, sequence {T}x16, channels-last image {H}x{W}x8, "
          f"{args.steps} steps, B={B}, fp32, {device}, backend={args.backend!r}, "
          f"{torch.get_num_threads()} CPU thread(s)\n")
    _, report = pf_kernels.convert(model, backend=args.backend, example_inputs=(inputs,))
    print(report)
    with count_fused_calls() as calls:
        model(inputs)
    print("\nfused calls per forward: " + ", ".join(f"{op} {n}" for op, n in calls.items()))
    diffs = max_differences(reference, model, inputs, target)
    print("max |difference| to the unconverted model: " + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def training_step(net):
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)

        def step():
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(inputs), target).backward()
            optimizer.step()
        return step

    def inference(net):
        def step():
            with torch.no_grad():
                net(inputs)
        return step

    if args.rounds <= 0:
        return
    print(f"\nmedian of {args.rounds} rounds, both models back to back in each:")
    print(f"{'':16}{'eager':>12}{'converted':>12}{'speed-up':>10}")
    for label, make_step in (("training step", training_step), ("inference", inference)):
        t = side_by_side({"eager": reference, "converted": model}, make_step, args.rounds, sync)
        print(f"{label:16}{t['eager'] * 1e3:>9.2f} ms{t['converted'] * 1e3:>9.2f} ms"
              f"{t['eager'] / t['converted']:>9.2f}x")


if __name__ == "__main__":
    main()
