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

Backends cache their prepacked forms of a folded weight in the fold's `packed` dict (packed_slot(weight)
finds it from the weight): it lives and dies with the fold, so it is refreshed whenever the fold is.
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


def _math_dtype(conv_weight: Tensor) -> torch.dtype:
    return torch.float64 if conv_weight.dtype == torch.float64 else torch.float32


def _scale_bias(
    conv_bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    math: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(gamma / sqrt(var + eps), b') in `math`: the per-output-channel scale of w', and b'."""

    def m(t: Tensor) -> Tensor:  # no cast node where none is needed (exported graphs stay small)
        return t if t.dtype == math else t.to(math)

    inv_std = torch.rsqrt(m(running_var) + eps)
    scale = inv_std if bn_weight is None else m(bn_weight) * inv_std
    bias = -m(running_mean) if conv_bias is None else m(conv_bias) - m(running_mean)
    bias = bias * scale
    if bn_bias is not None:
        bias = bias + m(bn_bias)
    return scale, bias


def _scaled(conv_weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """w' = w * scale[o] in scale's dtype, cast once to `dtype`."""
    math = scale.dtype
    weight = (conv_weight if conv_weight.dtype == math else conv_weight.to(math)) * scale.reshape(-1, 1, 1, 1)
    return weight if dtype == math else weight.to(dtype)


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
    scale, bias = _scale_bias(
        conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, _math_dtype(conv_weight)
    )
    return _scaled(conv_weight, scale, dtype), bias if bias.dtype == dtype else bias.to(dtype)


@dataclass(eq=False)
class Folded:
    """A folded conv+BN in the run dtype `dtype`: weight = source * scale[o] ([Cout, Cin/groups, KH, KW]),
    made on first use, and bias [Cout].

    The weight is made only where a path reads it dense: the CPU kernels pack straight from source and
    scale, and writing ResNet-50's 100 MB of folded weights first took ~45 ms of a 0.6 s first call
    (batch 8, Xeon)."""

    source: Tensor  # the conv weight
    scale: Tensor  # [Cout], in the fold's math dtype: float32 (float64 for a float64 conv weight)
    bias: Tensor
    dtype: torch.dtype
    packed: dict = field(default_factory=dict)  # backend prepacked forms of `weight`, see packed_slot()
    # Resolved backend calls (ops.conv_runner) by input shape, device, backend and epilogue: the
    # per-layer plans of nn.fused, kept exactly as long as this fold is valid.
    runners: dict = field(default_factory=dict)
    _weight: Tensor | None = field(default=None, repr=False)
    _version: int | None = field(default=None, repr=False)  # the conv weight's, when folded

    def __post_init__(self) -> None:
        try:
            self._version = self.source._version
        except RuntimeError:  # an inference tensor (no version counter): made now, while it is as folded
            self._make()

    @property
    def weight(self) -> Tensor:
        return self._weight if self._weight is not None else self._make()

    def _make(self) -> Tensor:
        if self._version is not None and self.source._version != self._version:
            raise RuntimeError(
                "resnet_fast: this fold's conv weight changed in place since it was folded; fold again "
                "(fold.folded) instead of reading a stale fold"
            )
        with torch.no_grad():
            self._weight = _scaled(self.source, self.scale, self.dtype)
        _SLOTS[self._weight] = self.packed
        return self._weight

    @property
    def shape(self) -> torch.Size:
        return self.source.shape

    @property
    def device(self) -> torch.device:
        return self.source.device


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


def source_guards(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> list[tuple]:
    """nn.replay's guards that sources(conv, bn) still gives the same tensors: ("item", registry, name,
    tensor), and ("attr", module, name, tensor) for one read outside the registries."""
    guards = []
    for module, registry, names in (
        (conv, "_parameters", ("weight", "bias")),
        (bn, "_parameters", ("weight", "bias")),
        (bn, "_buffers", ("running_mean", "running_var")),
    ):
        d = getattr(module, registry)
        guards.append(("attr", module, registry, d))
        for name in names:
            guards.append(
                ("item", d, name, d[name]) if name in d else ("attr", module, name, getattr(module, name))
            )
    return guards


def last_guards(conv: nn.Conv2d) -> list[tuple]:
    """nn.replay's guards that last(conv) is still the fold it returns now (not None)."""
    cache = conv.__dict__[_ATTR]
    return [("attr", conv, _ATTR, cache), ("attr", cache, "entry", cache.entry)]


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
        scale, bias = _scale_bias(*srcs[1:], bn.eps, _math_dtype(srcs[0]))
    entry = Folded(srcs[0], scale, bias if bias.dtype == dtype else bias.to(dtype), dtype)
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
