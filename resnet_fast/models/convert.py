"""Conversion between torchvision ResNets and resnet_fast's, parameters and buffers included."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from .resnet import BasicBlock, Bottleneck, ResNet


def _norm_layer_like(bn: nn.Module) -> Callable[[int], nn.Module]:
    """A norm_layer that rebuilds BatchNorm2d modules with `bn`'s hyper-parameters."""
    if type(bn) is not nn.BatchNorm2d:
        raise TypeError(f"cannot infer norm_layer from {type(bn).__name__}; pass norm_layer= explicitly")
    # A partial, not a closure: models keep their norm_layer, and must pickle (torch.save, spawn).
    return functools.partial(
        nn.BatchNorm2d,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
    )


def _copy_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    dst.load_state_dict(src.state_dict(), strict=True)
    first = next(src.parameters())
    return dst.to(device=first.device, dtype=first.dtype).train(src.training)


def from_torchvision(model: nn.Module, norm_layer: Callable[..., nn.Module] | None = None) -> ResNet:
    """A resnet_fast ResNet equal to a torchvision ResNet (trained or not): same weights, BN
    buffers (num_batches_tracked included), device, dtype and train/eval mode."""
    from torchvision.models.resnet import BasicBlock as TVBasic
    from torchvision.models.resnet import ResNet as TVResNet

    if not isinstance(model, TVResNet):
        raise TypeError(f"expected a torchvision.models.ResNet, got {type(model).__name__}")
    block = BasicBlock if isinstance(model.layer1[0], TVBasic) else Bottleneck
    ours = ResNet(
        block,
        [len(model.layer1), len(model.layer2), len(model.layer3), len(model.layer4)],
        num_classes=model.fc.out_features,
        groups=model.groups,
        width_per_group=model.base_width,
        # A dilated stage keeps stride 1 in its first block.
        replace_stride_with_dilation=[
            layer[0].stride == 1 for layer in (model.layer2, model.layer3, model.layer4)
        ],
        norm_layer=norm_layer or _norm_layer_like(model.bn1),
        in_channels=model.conv1.in_channels,
    )
    return _copy_state(model, ours)


def to_torchvision(model: ResNet) -> nn.Module:
    """The torchvision ResNet equal to `model` (in_channels != 3 replaces the stem conv)."""
    from torchvision.models import resnet as tv

    config = model._config
    block = tv.BasicBlock if config["block"] is BasicBlock else tv.Bottleneck
    norm_layer = config["norm_layer"]
    if norm_layer is nn.BatchNorm2d:
        norm_layer = _norm_layer_like(model.bn1)
    theirs = tv.ResNet(
        block,
        config["layers"],
        num_classes=config["num_classes"],
        groups=config["groups"],
        width_per_group=config["width_per_group"],
        replace_stride_with_dilation=config["replace_stride_with_dilation"],
        norm_layer=norm_layer,
    )
    if config["in_channels"] != 3:
        theirs.conv1 = nn.Conv2d(config["in_channels"], 64, kernel_size=7, stride=2, padding=3, bias=False)
    return _copy_state(model, theirs)
