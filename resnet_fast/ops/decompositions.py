"""Each eval-mode fused op spelled in aten ops, for programs that must run without resnet_fast.

torch.export keeps the fused ops in its graph (resnet_fast::conv_bias_act, ...). A runtime that
cannot call resnet_fast's Python needs them as aten ops: an AOTInductor package loaded from C++, or
the ONNX exporter given an ExportedProgram rather than the model:

    ep = ep.run_decompositions(resnet_fast.ops.decompositions())

The decompositions are the reference implementations every backend is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels import reference
from . import conv

__all__ = ["decompositions"]


def decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """{fused op: its aten decomposition}, for ExportedProgram.run_decompositions."""
    ops = torch.ops.resnet_fast
    return {
        ops.conv_bias_act.default: conv._conv_torch,
        ops.scale_shift_act.default: conv._scale_shift_torch,
        ops.add_relu.default: reference.add_relu,
    }
