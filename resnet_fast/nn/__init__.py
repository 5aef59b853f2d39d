"""Fused building blocks the models are made of."""

from .fused import ConvBN, conv_bn_act, to_model_layout

__all__ = ["ConvBN", "conv_bn_act", "to_model_layout"]
