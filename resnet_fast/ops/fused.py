"""The fused ops, registered once with torch.library; each call runs the backend that
ops.backend picks for its device.

Custom ops keep torch.compile(fullgraph=True) graphs whole, whatever the backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from ..kernels import reference
from .backend import backend_for


def _layout(x: Tensor) -> torch.memory_format:
    """channels_last when x is stored that way, else contiguous: outputs follow their input."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _add_relu_triton(a: Tensor, b: Tensor) -> Tensor:
    from ..kernels.triton import elementwise

    return elementwise.add_relu(a, b)


_ADD_RELU = {
    "triton": _add_relu_triton,
    "cpp": lambda a, b: _ext.load().add_relu(a, b),
    "torch": reference.add_relu,
}


@torch.library.custom_op("resnet_fast::add_relu", mutates_args=())
def add_relu(a: Tensor, b: Tensor) -> Tensor:
    """relu(a + b) for same-shape, same-dtype tensors; the output has a's layout."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(
            f"add_relu: expected equal shapes and dtypes, got {a.shape}/{a.dtype} and {b.shape}/{b.dtype}"
        )
    fmt = _layout(a)
    a, b = a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)
    return _ADD_RELU[backend_for(a.device)](a, b).contiguous(memory_format=fmt)


@add_relu.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    torch._check(a.shape == b.shape, lambda: f"add_relu: shapes differ: {a.shape} vs {b.shape}")
    return torch.empty(a.shape, dtype=a.dtype, device=a.device, memory_format=_layout(a))


def _add_relu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)


def _add_relu_backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
    (out,) = ctx.saved_tensors
    grad = torch.where(out <= 0, 0, grad)  # torch's relu backward: NaN passes
    return grad, grad


add_relu.register_autograd(_add_relu_backward, setup_context=_add_relu_setup)
