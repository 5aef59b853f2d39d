"""Triton kernels (NVIDIA GPUs) and their launchers, one file per op family."""
