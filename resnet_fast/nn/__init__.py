"""Fused building blocks the models are made of."""

from .batchnorm import SyncBatchNorm, convert_sync_batchnorm
from .fused import ConvBN, conv_bn_act, linear, to_model_layout
from .recompute import max_pool2d

__all__ = [
    "ConvBN",
    "SyncBatchNorm",
    "conv_bn_act",
    "convert_sync_batchnorm",
    "linear",
    "max_pool2d",
    "to_model_layout",
]
