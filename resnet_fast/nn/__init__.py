"""Fused building blocks the models are made of."""

from .batchnorm import SyncBatchNorm, convert_sync_batchnorm
from .fused import ConvBN, conv_bn_act, to_model_layout

__all__ = ["ConvBN", "SyncBatchNorm", "conv_bn_act", "convert_sync_batchnorm", "to_model_layout"]
