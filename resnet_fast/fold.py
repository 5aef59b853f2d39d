"""BN folding for inference: Conv2d -> BatchNorm2d (eval) becomes one convolution with a bias.

    w' = w * gamma / sqrt(var + eps)
    b' = beta + (b - mean) * gamma / sqrt(var + eps)

computed in float32 (float64 when the parameters are float64) and cast once to the run dtype.

folded(conv, bn, dtype) caches the result on the conv module. The cache key holds, for every
source tensor (conv weight/bias, BN weight/bias/running stats), its data_ptr, version counter,
dtype, device and shape, plus eps and the run dtype: in-place updates (load_state_dict, optimizer
steps, running stats updated by a train-mode forward) bump the version, and .to()/.half()/.cuda()
change data_ptr or dtype, so a cached fold is never used after its sources changed. Writes
through `tensor.data` bypass version counters: call invalidate(model) after those.

Backends cache their prepacked forms of a folded weight in packed_slot(weight): it lives and dies
with the folded weight, so it is refreshed whenever the fold is.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "Folded",
    "current",
    "fold_conv_bn",
    "folded",
    "invalidate",
    "last",
    "packed_slot",
    "sources",
    "states",
]

_ATTR = "_resnet_fast_fold"
# Folded weight -> its backend pack cache; entries vanish when the folded weight is dropped.
_SLOTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def fold_conv_bn(
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """(w', b') of conv -> BN in eval mode, in `dtype` (default: the conv weight's dtype).

    Plain tensor math: traceable by torch.compile, differentiable.
    """
    dtype = conv_weight.dtype if dtype is None else dtype
    math = torch.float64 if conv_weight.dtype == torch.float64 else torch.float32

    def m(t: Tensor) -> Tensor:  # no cast node where none is needed (exported graphs stay small)
        return t if t.dtype == math else t.to(math)

    inv_std = torch.rsqrt(m(running_var) + eps)
    scale = inv_std if bn_weight is None else m(bn_weight) * inv_std
    weight = m(conv_weight) * scale.reshape(-1, 1, 1, 1)
    bias = -m(running_mean) if conv_bias is None else m(conv_bias) - m(running_mean)
    bias = bias * scale
    if bn_bias is not None:
        bias = bias + m(bn_bias)
    return (weight, bias) if dtype == math else (weight.to(dtype), bias.to(dtype))


@dataclass(eq=False)
class Folded:
    """A folded conv+BN: weight [Cout, Cin/groups, KH, KW] and bias [Cout] in the run dtype."""

    weight: Tensor
    bias: Tensor
    packed: dict = field(default_factory=dict)  # backend prepacked forms of `weight`, see packed_slot()
    # Resolved backend calls (ops.conv_runner) by input shape, device, backend and epilogue: the
    # per-layer plans of nn.fused, kept exactly as long as this fold is valid.
    runners: dict = field(default_factory=dict)


class _Cache:
    """The per-module cache; copies and pickles of a module start empty (prepacked oneDNN tensors
    can be neither deep-copied nor saved, and a copy's parameters live elsewhere anyway)."""

    __slots__ = ("key", "entry")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.entry: Folded | None = None

    def __deepcopy__(self, memo: dict) -> _Cache:
        return _Cache()

    def __reduce__(self):
        return (_Cache, ())


def sources(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple:
    """(conv weight, conv bias, BN weight, BN bias, running mean, running var).

    Read from the modules' registries: this runs for every layer of every eager call, and each
    attribute read through nn.Module.__getattr__ costs about a microsecond."""
    try:
        p, q, b = conv._parameters, bn._parameters, bn._buffers
        return (p["weight"], p["bias"], q["weight"], q["bias"], b["running_mean"], b["running_var"])
    except KeyError:  # moved out of the registries (old-style weight_norm...): the plain reads
        return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)


def states(tensors: tuple | list) -> list:
    """Per tensor (None kept): what a fold depends on, its memory, version counter, dtype, device and
    shape. Raises RuntimeError for inference tensors (no version counter)."""
    return [None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors]


def _key(dtype: torch.dtype, eps: float, srcs: tuple) -> tuple | None:
    """What the fold depends on; None for inference tensors (no version counter: never cached)."""
    try:
        return (dtype, eps, *states(srcs))
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype | None = None) -> Folded:
    """The folded weight and bias of `conv` -> `bn` (eval) in `dtype`, cached on `conv`.

    Needs BN running statistics. Inference tensors (made under torch.inference_mode) have no
    version counter; their folds are computed afresh on each call, never cached.
    """
    srcs = sources(conv, bn)
    if srcs[4] is None or srcs[5] is None:
        raise ValueError("BN folding needs running statistics (track_running_stats=True)")
    dtype = srcs[0].dtype if dtype is None else dtype
    key = _key(dtype, bn.eps, srcs)
    cache = conv.__dict__.get(_ATTR)
    if cache is not None and key is not None and cache.key == key:
        return cache.entry
    with torch.no_grad():
        weight, bias = fold_conv_bn(*srcs, bn.eps, dtype)
    entry = Folded(weight, bias)
    if key is None:
        warnings.warn(
            "resnet_fast: this model's parameters are inference tensors (made under torch.inference_mode), "
            "which have no version counter, so BN folds and prepacked weights cannot be cached: every call "
            "folds and packs again, several times slower. Create the model outside inference_mode (calling "
            "it inside is fine).",
            stacklevel=3,
        )
        return entry
    if cache is None:
        cache = _Cache()
        object.__setattr__(conv, _ATTR, cache)  # a plain attribute: not a parameter, buffer or submodule
    cache.key, cache.entry = key, entry
    _SLOTS[weight] = entry.packed
    return entry


def last(conv: nn.Conv2d) -> Folded | None:
    """The fold last cached on conv, valid or not (None after invalidate())."""
    cache = conv.__dict__.get(_ATTR)
    return None if cache is None else cache.entry


def current(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> Folded | None:
    """The fold folded(conv, bn, dtype) would return from its cache now, or None (none cached, or stale)."""
    cache = conv.__dict__.get(_ATTR)
    if cache is None or cache.key is None:
        return None
    return cache.entry if cache.key == _key(dtype, bn.eps, sources(conv, bn)) else None


def packed_slot(weight: Tensor) -> dict | None:
    """The dict where backends cache prepacked forms of a weight returned by folded(), else None.

    Backends key their entries by whatever the packed form depends on (backend, input size...).
    """
    return _SLOTS.get(weight)


def invalidate(module: nn.Module) -> None:
    """Drop the cached folds (and prepacked weights) of `module` and its submodules.

    Needed only after writes that bypass version counters (`param.data.copy_(...)`, `param.data = ...`
    with a same-sized tensor reusing the old memory).
    """
    for m in module.modules():
        m.__dict__.pop(_ATTR, None)
