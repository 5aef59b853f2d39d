"""How a block's Conv -> BN (-> +residual) (-> ReLU) runs: fused through resnet_fast.ops where
the modules are plain, else exactly as torchvision runs it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..kernels import reference


def _plain(conv: nn.Module, bn: nn.Module) -> bool:
    """True for an unmodified Conv2d + BatchNorm2d pair with no hooks: safe to replace by a fused op.

    Subclasses with their own forward, other norm layers (norm_layer=...) and hooked modules
    run unfused so their behaviour is kept.
    """
    return (
        type(conv) is nn.Conv2d
        and isinstance(bn, nn.BatchNorm2d)
        and type(bn).forward is nn.BatchNorm2d.forward
        and not (conv._forward_hooks or conv._forward_pre_hooks or bn._forward_hooks or bn._forward_pre_hooks)
    )


def fused_backend(x: Tensor) -> bool:
    """Whether fused ops run for tensors like x (the backend for its device is not 'torch')."""
    return ops.backend_for(x.device) != "torch"


def conv_bn_act(
    x: Tensor, conv: nn.Module, bn: nn.Module, residual: Tensor | None = None, relu: bool = True
) -> Tensor:
    """act(bn(conv(x)) [+ residual]) through the fused ops where possible."""
    if not fused_backend(x) or not _plain(conv, bn):
        return reference.conv_bn_act(x, conv, bn, residual, relu)
    out = bn(conv(x))
    if residual is not None and relu:
        return ops.add_relu(out, residual)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def to_model_layout(x: Tensor) -> Tensor:
    """Fused backends run NHWC: convert the input once at the model's entry."""
    return x.contiguous(memory_format=torch.channels_last) if fused_backend(x) else x


class ConvBN(nn.Sequential):
    """The downsample branch: nn.Sequential(conv, bn) as in torchvision (same state_dict keys), run fused."""

    def forward(self, x: Tensor) -> Tensor:
        return conv_bn_act(x, self[0], self[1], relu=False)
