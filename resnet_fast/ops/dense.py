"""A classifier's nn.Linear at CPU inference: torch's F.linear, or our GEMM (csrc/cpu/conv_gemm.cpp's
1x1-convolution kernel, the weight packed once into 16-column panels), whichever layer_choice measured
faster for this shape on this CPU. ResNet-50's fc reads an 8 MB weight for a few rows of input (Zen 3,
2 threads: 0.41 vs 0.54 ms at batch 1, 0.50 vs 1.36 ms at batch 8, in an ad-hoc timing)."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _ext
from . import layer_choice

# Per Linear module: (what its plans depend on, {input shape: plan}). Weakly keyed: a plan dies with
# its module.
_PLANS: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple, dict]] = weakref.WeakKeyDictionary()


def linear(x: Tensor, fc: nn.Linear) -> Tensor:
    """fc(x): on our GEMM where it runs (float32, 2-D, CPU with AVX2 + FMA, no autograd wanted) and
    layer_choice found it faster, else F.linear. A changed weight or bias (in place or replaced) makes a
    new plan."""
    C = _ext.load()
    w, b = fc.weight, fc.bias
    if (
        C is None
        or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b)))
        or x.device.type != "cpu"
        or x.dim() != 2
        or x.dtype != torch.float32
        or w.dtype != torch.float32
        or (b is not None and b.dtype != torch.float32)
        or not C.conv_gemm_supported()
    ):
        return F.linear(x, w, b)
    try:
        key = tuple(None if t is None else (t.data_ptr(), t._version, t.shape, t.device) for t in (w, b))
    except RuntimeError:  # inference tensors have no version counter: nothing can be cached
        return F.linear(x, w, b)
    known = _PLANS.get(fc)
    if known is None or known[0] != key:
        known = _PLANS[fc] = (key, {})
    plans = known[1]
    run = plans.get(x.shape)
    if run is None:
        if len(plans) >= _MAX_PLANS:
            del plans[next(iter(plans))]  # the oldest
        run = plans[x.shape] = _plan(C, x, w, b)
    return run(x)


_MAX_PLANS = 4  # input shapes per Linear, as nn.fused keeps per conv


def _plan(C, x: Tensor, w: Tensor, b: Tensor | None) -> Callable[[Tensor], Tensor]:
    out_features, in_features = w.shape
    panels = -(-out_features // 16) * 16  # the kernel's 16-column panels; the padding is sliced off
    with torch.no_grad():
        padded = w.new_zeros(panels, in_features, 1, 1)
        padded[:out_features, :, 0, 0] = w
        bias = w.new_zeros(panels)
        if b is not None:
            bias[:out_features] = b
    packed = C.pack_conv_gemm_weight(padded)
    gemm = C.conv_gemm_bias_act

    def torch_linear(x: Tensor) -> Tensor:
        return F.linear(x, w, b)

    if packed is None:  # a NaN or Inf weight: torch's (the packer checks for the conv kernels' sake)
        return torch_linear

    def ours(x: Tensor) -> Tensor:
        # [N, K] contiguous is an [N, K, 1, 1] image with its channels adjacent: the kernel's input.
        x = x.contiguous().view(x.shape[0], in_features, 1, 1)
        out = gemm(x, packed, bias, None, False, [1, 1], [0, 0], [1, 1]).view(x.shape[0], panels)
        return out if panels == out_features else out[:, :out_features].contiguous()

    key = "linear " + layer_choice.conv_key(
        (x.shape[0], in_features, 1, 1),
        (panels, in_features, 1, 1),
        x.dtype,
        [1, 1],
        [0, 0],
        [1, 1],
        1,
        False,
        "cpu",
    )
    path = layer_choice.choose_cpu(key, {"torch": lambda: torch_linear(x), "gemm": lambda: ours(x)})
    return ours if path == "gemm" else torch_linear
