"""Conversion between torchvision ResNets and resnet_fast's, parameters and buffers included."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .resnet import BasicBlock, Bottleneck, ResNet, _copy_state, _norm_layer_like


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
    return model.to_torchvision()
