"""Swap pf_kernels into a model written the usual way, and show what it buys.

An ordinary PyTorch multimodal model (late fusion with backward connections: nn.Linear, torch.cat and
a broadcast context, no pf_kernels in sight) is converted with pf_kernels.convert. The program prints
what was swapped, checks that outputs and gradients match, and times a training step of both, side
by side, on the current device.

Run: python python/swap_into_model.py [--device cpu|cuda] [--batch 256] [--steps 3]
"""
import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import pf_kernels


class Encoder(nn.Module):
    """(B, *positions, D) -> (B, H): a per-position MLP, then the mean over positions."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, d_out))

    def forward(self, x):
        y = self.net(x)
        return y.flatten(1, -2).mean(1) if y.dim() > 2 else y


class ProgressiveLateFusion(nn.Module):
    """Three modalities (a vector, a sequence, an image), late fusion, and backward connections."""

    def __init__(self, dims=(32, 16, 8), context=16, hidden=64, fused=64, steps=3):
        super().__init__()
        self.steps, self.context = steps, context
        self.encoders = nn.ModuleList(Encoder(d + context, hidden) for d in dims)
        self.fusion = nn.Linear(hidden * len(dims), fused)
        self.back = nn.ModuleList(nn.Linear(fused, context) for _ in dims)
        self.readout = nn.Linear(fused, 1)

    def forward(self, vec, seq, img):
        xs = [vec, seq, img]
        contexts = [x.new_zeros(x.shape[:-1] + (self.context,)) for x in xs]
        for _ in range(self.steps):
            hs = [enc(torch.cat([x, c], dim=-1)) for enc, x, c in zip(self.encoders, xs, contexts)]
            z = F.relu(self.fusion(torch.cat(hs, dim=-1)))
            c_vec = torch.relu(self.back[0](z))
            c_seq = torch.relu(self.back[1](z)).unsqueeze(1).expand(-1, seq.shape[1], -1)
            c_img = torch.relu(self.back[2](z))[:, None, None, :].expand(-1, img.shape[1], img.shape[2], -1)
            contexts = [c_vec, c_seq, c_img]
        return self.readout(z)


def train_step_time(model, inputs, target, repeats):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        loss = F.mse_loss(model(*inputs), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if target.is_cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ProgressiveLateFusion().to(device)
    B = args.batch
    inputs = (torch.randn(B, 32, device=device), torch.randn(B, 50, 16, device=device),
              torch.randn(B, 6, 6, 8, device=device))
    target = torch.randn(B, 1, device=device)

    original = copy.deepcopy(model)
    fused, report = pf_kernels.convert(model, backend="auto")
    print(report)

    out_a, out_b = original(*inputs), fused(*inputs)
    grads_a = torch.autograd.grad(out_a.square().sum(), list(original.parameters()))
    grads_b = torch.autograd.grad(out_b.square().sum(), list(fused.parameters()))
    max_out = (out_a - out_b).abs().max().item()
    max_grad = max((a - b).abs().max().item() for a, b in zip(grads_a, grads_b))
    print(f"\nmax |difference|: output {max_out:.3g}, parameter gradients {max_grad:.3g}")
    original.load_state_dict(fused.state_dict())  # the converted state_dict loads into the original

    t_eager = train_step_time(original, inputs, target, args.repeats)
    t_fused = train_step_time(fused, inputs, target, args.repeats)
    print(f"training step on {device} (B={B}, 3 modalities, 3 steps), median of {args.repeats}: "
          f"eager {t_eager * 1e3:.2f} ms, converted {t_fused * 1e3:.2f} ms, speed-up {t_eager / t_fused:.2f}x")


if __name__ == "__main__":
    main()
