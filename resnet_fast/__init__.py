"""resnet_fast: drop-in, kernel-fused ResNets for PyTorch.

model = resnet_fast.ResNet50()      # instead of torchvision.models.resnet50()
"""

__version__ = "0.1.0"

from .models import *  # noqa: E402, F403
from .models import __all__ as _models_all  # noqa: E402
from .nn import convert_sync_batchnorm  # noqa: E402
from .ops import BackendUnavailable, get_backend, set_backend  # noqa: E402


def explain(model, input_shape, device=None) -> list[dict]:
    """Per conv of `model`: input shape, backend and path taken (Triton: measured times too)."""
    from .tools.explain import explain as _explain

    return _explain(model, input_shape, device)


def info() -> dict:
    """Versions, devices, and which backends are usable here (and why not)."""
    from .tools.info import info as _info

    return _info()


__all__ = [
    *_models_all,
    "BackendUnavailable",
    "convert_sync_batchnorm",
    "explain",
    "get_backend",
    "info",
    "set_backend",
]
