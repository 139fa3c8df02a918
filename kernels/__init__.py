"""Triton kernels for CUDA tensors, one file per op (kernel, autograd Function, torch reference).
Installed as `prefrank.kernels`; only `prefrank.ops.backends` calls them."""
