"""What every Triton kernel file shares: the NaN-propagating ReLU and the launch device guard."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def relu(x):
    # torch.relu(NaN) is NaN. tl.maximum's default (max.f32, numpy's fmax) returns the other operand
    # for a NaN, so a corrupted input would come out as a clean 0; PropagateNan.ALL is max.NaN.f32.
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context for a launch on t: Triton launches on the current CUDA device (and its stream), which on a
    multi-GPU machine need not be t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
