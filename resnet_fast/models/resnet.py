"""ResNet, ResNeXt and Wide ResNet with torchvision's structure, names and state_dict keys.

The architecture mirrors torchvision/models/resnet.py; each Conv -> BN (-> +identity) -> ReLU
runs through resnet_fast.nn.conv_bn_act, which fuses it on the active backend.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any
from urllib.error import URLError

import torch
from torch import Tensor, nn

from ..nn import ConvBN, SyncBatchNorm, conv_bn_act, linear, max_pool2d, to_model_layout
from ..nn.replay import run_private

__all__ = [
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "BUILDERS",
    "BasicBlock",
    "Bottleneck",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
]


def conv3x3(
    in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1
) -> nn.Conv2d:
    """3x3 convolution with padding"""
    return nn.Conv2d(
        in_planes,
        out_planes,
        kernel_size=3,
        stride=stride,
        padding=dilation,
        groups=groups,
        bias=False,
        dilation=dilation,
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        # Both self.conv1 and self.downsample layers downsample the input when stride != 1
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = conv_bn_act(x, self.conv1, self.bn1)
        return conv_bn_act(out, self.conv2, self.bn2, residual=identity)


class Bottleneck(nn.Module):
    # Stride at the 3x3 conv (ResNet V1.5), as torchvision.
    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        # Both self.conv2 and self.downsample layers downsample the input when stride != 1
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = conv_bn_act(x, self.conv1, self.bn1)
        out = conv_bn_act(out, self.conv2, self.bn2)
        return conv_bn_act(out, self.conv3, self.bn3, residual=identity)


# Modules whose forward returns what it computed and keeps no reference to its input or output.
_KEEPS_NO_REFERENCE = (
    nn.Sequential,
    BasicBlock,
    Bottleneck,
    ConvBN,
    nn.Conv2d,
    nn.BatchNorm2d,
    SyncBatchNorm,
    nn.ReLU,
    nn.Identity,
)


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: list[bool] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        # Constructor arguments, for to_torchvision().
        self._config = dict(
            block=block,
            layers=list(layers),
            num_classes=num_classes,
            groups=groups,
            width_per_group=width_per_group,
            replace_stride_with_dilation=replace_stride_with_dilation,
            norm_layer=norm_layer,
            in_channels=in_channels,
        )

        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            # each element in the tuple indicates if we should replace
            # the 2x2 stride with a dilated convolution instead
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None "
                f"or a 3-element tuple, got {replace_stride_with_dilation}"
            )
        self.in_channels = in_channels
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(
            block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0]
        )
        self.layer3 = self._make_layer(
            block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1]
        )
        self.layer4 = self._make_layer(
            block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2]
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero-initialize the last BN in each residual branch,
        # so that the residual branch starts with zeros, and each residual block behaves like an identity.
        # This improves the model by 0.2~0.3% according to https://arxiv.org/abs/1706.02677
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(
        self,
        block: type[BasicBlock | Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = ConvBN(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )

        layers = []
        layers.append(
            block(
                self.inplanes,
                planes,
                stride,
                downsample,
                self.groups,
                self.base_width,
                previous_dilation,
                norm_layer,
            )
        )
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(
                    self.inplanes,
                    planes,
                    groups=self.groups,
                    base_width=self.base_width,
                    dilation=self.dilation,
                    norm_layer=norm_layer,
                )
            )

        return nn.Sequential(*layers)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape [N, {self.in_channels}, H, W] (in_channels={self.in_channels}), "
                f"got {list(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"expected a floating-point input (float32, float16 or bfloat16), got {x.dtype}; "
                "convert images with x.float() / 255 or a torchvision transform"
            )

    def _forward_impl(self, x: Tensor) -> Tensor:
        self._check_input(x)
        x = to_model_layout(x)
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
            x = self._features(x)  # an autograd graph, a compile or a trace sees the activations
        else:
            # Where no one else can see the tensors: residual adds in place, outputs into buffers kept from
            # the last forward, the forward replayed from a recording (see _private_modules and nn.replay).
            x = run_private(self, x, self._features, self._private_modules)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = linear(x, self.fc)  # self.fc(x), on our GEMM at CPU inference where that is faster

        return x

    def _features(self, x: Tensor) -> Tensor:
        x = conv_bn_act(x, self.conv1, self.bn1)
        x = max_pool2d(self.maxpool, x)  # self.maxpool(x), rebuilding its input in the backward
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)

    def _private_modules(self) -> list[nn.Module] | None:
        """The modules _features runs (the stem, then every module of the stages, in a fixed order) when
        no one outside the forward can see the tensors they pass on, else None: no gradients (no autograd
        graph keeps them), eager (not compiled, traced or exported), no forward hooks on the max pool or
        anywhere in the stages nor global ones, and every module in them one whose forward keeps no
        reference."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return None
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return None
        # layer1's input is the max pool's output: a fresh tensor only from a plain, unhooked MaxPool2d.
        pool = self.maxpool
        if type(pool) is not nn.MaxPool2d or pool._forward_hooks or pool._forward_pre_hooks:
            return None
        walked = [self.conv1, self.bn1, pool]
        stack = [self.layer4, self.layer3, self.layer2, self.layer1]
        while stack:  # every module of the stages (a plain walk: modules() costs ~4x more per forward)
            m = stack.pop()
            if m is None:
                continue
            if type(m) not in _KEEPS_NO_REFERENCE or m._forward_hooks or m._forward_pre_hooks:
                return None
            walked.append(m)
            stack.extend(reversed(m._modules.values()))
        return walked

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script cannot compile the fused ops' Python dispatch: say what works instead.
        raise RuntimeError(
            "torch.jit.script does not support resnet_fast models (their fused ops dispatch in Python). "
            "Supported: torch.export.export(model.eval(), (x,)) (then AOTInductor), "
            "torch.onnx.export(model.eval(), (x,), path), torch.jit.trace(model.eval(), x), "
            "or torch.jit.script(model.to_torchvision())."
        )

    def to_torchvision(self) -> nn.Module:
        """An equivalent torchvision ResNet holding copies of this model's parameters and buffers
        (in_channels != 3 replaces the stem conv)."""
        from torchvision.models import resnet as tv

        config = self._config
        block = tv.BasicBlock if config["block"] is BasicBlock else tv.Bottleneck
        norm_layer = config["norm_layer"]
        if norm_layer is nn.BatchNorm2d:
            norm_layer = _norm_layer_like(self.bn1)
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
            theirs.conv1 = nn.Conv2d(
                config["in_channels"], 64, kernel_size=7, stride=2, padding=3, bias=False
            )
        return _copy_state(self, theirs)


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


def _load_weights(model: ResNet, weights: Any, progress: bool) -> None:
    """Load torchvision weights; offline, say where to put the file."""
    url = weights.url
    try:
        state_dict = weights.get_state_dict(progress=progress, check_hash=True)
    except (URLError, OSError) as error:
        hub_dir = torch.hub.get_dir()
        path = os.path.join(hub_dir, "checkpoints", os.path.basename(url))
        raise RuntimeError(
            f"could not download {weights} from {url} ({error}). Offline, put the file at {path} "
            "(torch.hub's cache; set TORCH_HOME to move it)."
        ) from error
    model.load_state_dict(state_dict)


def _set_fixed(kwargs: dict[str, Any], name: str, value: Any) -> None:
    if kwargs.get(name, value) != value:
        raise ValueError(f"The parameter '{name}' expected value {value} but got {kwargs[name]} instead.")
    kwargs[name] = value


class _Preset(ResNet):
    """A named architecture: builds the ResNet and loads torchvision `weights` if given."""

    arch: str
    block: type[BasicBlock | Bottleneck]
    layers: list[int]
    fixed: dict[str, Any] = {}

    def __init__(self, *, weights: Any = None, progress: bool = True, **kwargs: Any) -> None:
        for name, value in self.fixed.items():
            _set_fixed(kwargs, name, value)
        if weights is not None:
            from torchvision.models import get_model_weights

            weights = get_model_weights(self.arch).verify(weights)
            _set_fixed(kwargs, "num_classes", len(weights.meta["categories"]))
            if kwargs.get("in_channels", 3) != 3:
                raise ValueError("pretrained weights expect in_channels=3")
        super().__init__(self.block, self.layers, **kwargs)
        if weights is not None:
            _load_weights(self, weights, progress)


class ResNet18(_Preset):
    arch, block, layers = "resnet18", BasicBlock, [2, 2, 2, 2]


class ResNet34(_Preset):
    arch, block, layers = "resnet34", BasicBlock, [3, 4, 6, 3]


class ResNet50(_Preset):
    arch, block, layers = "resnet50", Bottleneck, [3, 4, 6, 3]


class ResNet101(_Preset):
    arch, block, layers = "resnet101", Bottleneck, [3, 4, 23, 3]


class ResNet152(_Preset):
    arch, block, layers = "resnet152", Bottleneck, [3, 8, 36, 3]


class ResNeXt50_32X4D(_Preset):
    arch, block, layers = "resnext50_32x4d", Bottleneck, [3, 4, 6, 3]
    fixed = {"groups": 32, "width_per_group": 4}


class ResNeXt101_32X8D(_Preset):
    arch, block, layers = "resnext101_32x8d", Bottleneck, [3, 4, 23, 3]
    fixed = {"groups": 32, "width_per_group": 8}


class ResNeXt101_64X4D(_Preset):
    arch, block, layers = "resnext101_64x4d", Bottleneck, [3, 4, 23, 3]
    fixed = {"groups": 64, "width_per_group": 4}


class Wide_ResNet50_2(_Preset):
    arch, block, layers = "wide_resnet50_2", Bottleneck, [3, 4, 6, 3]
    fixed = {"width_per_group": 128}


class Wide_ResNet101_2(_Preset):
    arch, block, layers = "wide_resnet101_2", Bottleneck, [3, 4, 23, 3]
    fixed = {"width_per_group": 128}


# torchvision-style builders: same keyword arguments, plus in_channels.
def resnet18(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return ResNet18(weights=weights, progress=progress, **kwargs)


def resnet34(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return ResNet34(weights=weights, progress=progress, **kwargs)


def resnet50(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return ResNet50(weights=weights, progress=progress, **kwargs)


def resnet101(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return ResNet101(weights=weights, progress=progress, **kwargs)


def resnet152(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return ResNet152(weights=weights, progress=progress, **kwargs)


def resnext50_32x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return ResNeXt50_32X4D(weights=weights, progress=progress, **kwargs)


def resnext101_32x8d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return ResNeXt101_32X8D(weights=weights, progress=progress, **kwargs)


def resnext101_64x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return ResNeXt101_64X4D(weights=weights, progress=progress, **kwargs)


def wide_resnet50_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return Wide_ResNet50_2(weights=weights, progress=progress, **kwargs)


def wide_resnet101_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return Wide_ResNet101_2(weights=weights, progress=progress, **kwargs)


BUILDERS = {
    fn.__name__: fn
    for fn in (
        resnet18,
        resnet34,
        resnet50,
        resnet101,
        resnet152,
        resnext50_32x4d,
        resnext101_32x8d,
        resnext101_64x4d,
        wide_resnet50_2,
        wide_resnet101_2,
    )
}
