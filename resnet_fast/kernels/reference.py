"""Unfused PyTorch: the ground truth every fused backend is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def add_relu(a: Tensor, b: Tensor) -> Tensor:
    return torch.relu(a + b)


def conv_bn_act(
    x: Tensor, conv: nn.Module, bn: nn.Module, residual: Tensor | None = None, relu: bool = True
) -> Tensor:
    """Conv -> norm (-> += residual) (-> ReLU), the exact op sequence of torchvision's blocks."""
    out = bn(conv(x))
    if residual is not None:
        out += residual
    return F.relu(out, inplace=True) if relu else out
