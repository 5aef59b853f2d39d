"""The op contract: fused ops (registered with torch.library) and backend selection."""

from .backend import BACKENDS, BackendUnavailable, backend_for, get_backend, set_backend, status
from .batchnorm import batch_norm_act, bn_act_backward, bn_act_train
from .buffers import Buffers
from .conv import conv_bias_act, conv_route, conv_runner, scale_shift_act
from .decompositions import decompositions
from .dense import linear
from .fused import add_relu

__all__ = [
    "BACKENDS",
    "Buffers",
    "BackendUnavailable",
    "add_relu",
    "backend_for",
    "batch_norm_act",
    "bn_act_backward",
    "bn_act_train",
    "conv_bias_act",
    "conv_route",
    "conv_runner",
    "decompositions",
    "get_backend",
    "linear",
    "scale_shift_act",
    "set_backend",
    "status",
]
