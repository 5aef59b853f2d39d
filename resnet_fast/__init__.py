"""resnet_fast: drop-in, kernel-fused ResNets for PyTorch.

model = resnet_fast.ResNet50()      # instead of torchvision.models.resnet50()
"""

__version__ = "0.1.0"

from .models import *  # noqa: E402, F403
from .models import __all__ as _models_all  # noqa: E402
from .nn import convert_sync_batchnorm  # noqa: E402
from .ops import BackendUnavailable, get_backend, set_backend  # noqa: E402


def info() -> dict:
    """Versions, devices, and which backends are usable here (and why not)."""
    from .info import info as _info

    return _info()


__all__ = [*_models_all, "BackendUnavailable", "convert_sync_batchnorm", "get_backend", "info", "set_backend"]
