"""The ResNet family: torchvision's architectures, run through resnet_fast's fused ops."""

from .convert import from_torchvision, to_torchvision
from .resnet import *  # noqa: F403
from .resnet import __all__ as _resnet_all

__all__ = [*_resnet_all, "from_torchvision", "to_torchvision"]
