"""The op contract: fused ops (registered with torch.library) and backend selection."""

from .backend import BACKENDS, BackendUnavailable, backend_for, get_backend, set_backend, status
from .fused import add_relu

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "add_relu",
    "backend_for",
    "get_backend",
    "set_backend",
    "status",
]
