"""Microbenchmarks of pf_kernels: fused backends vs eager PyTorch vs torch.compile (`python -m benchmarks`)."""
