"""Wrap two encoders in ProgressiveFusion, train it for a few steps on a toy task, report backends.

Run: python python/quickstart.py
"""
import time

import torch
from torch import nn

import pf_kernels
from pf_kernels.nn import ProgressiveFusion


class SequenceEncoder(nn.Module):
    """(B, T, D) -> (B, H): a GRU, its last hidden state."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.gru = nn.GRU(in_dim, hidden, batch_first=True)

    def forward(self, x):
        return self.gru(x)[1][-1]


def main():
    torch.manual_seed(0)
    print("backends:")
    for name, info in pf_kernels.available_backends().items():
        print(f"  {name:7s} {'yes' if info['available'] else 'no '}  {info['reason'] or info['description']}")
    B, T, context = 64, 20, 4
    encoders = [nn.Sequential(nn.Linear(8 + context, 32), nn.ReLU(), nn.Linear(32, 16)),  # vector modality
                SequenceEncoder(3 + context, 16)]                                          # sequence modality
    model = ProgressiveFusion(encoders, encoder_dims=[16, 16], fused_dim=16, context_dims=context,
                              iterations=3)
    readout = nn.Linear(16, 1)
    opt = torch.optim.Adam([*model.parameters(), *readout.parameters()], lr=3e-3)
    vec, seq = torch.randn(B * 8, 8), torch.randn(B * 8, T, 3)
    target = (vec[:, :1] * seq[:, -5:, :1].mean(1)).tanh()
    start = time.perf_counter()
    for step in range(60):
        idx = torch.randint(0, vec.shape[0], (B,))
        loss = nn.functional.mse_loss(readout(model([vec[idx], seq[idx]])), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == 59:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"60 training steps in {time.perf_counter() - start:.2f} s "
          f"(backend {model.backend!r}, {sum(p.numel() for p in model.parameters())} parameters)")


if __name__ == "__main__":
    main()
