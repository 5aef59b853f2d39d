"""Activations rebuilt in the backward instead of kept from the forward.

The output y of a fused train-mode BN(+ReLU) without residual is act(x * scale + shift), where x,
weight, bias, mean and invstd are kept by the BN op's own backward anyway: rebuilding y costs one
elementwise pass and no memory. `attach` records that recipe on y; inside `recomputed_when_saved(y)`
an op that saves y for its backward (the next conv) saves the recipe instead, and `max_pool2d` (the
stem's pooling) keeps neither its input nor its indices. y is freed after the forward and rebuilt,
bit for bit (same kernel, same scale/shift), when the backward needs it.

Everything a recipe reads is also saved, and version-checked, by the BN op's backward, which runs
after the consumer's: an in-place change to it still fails the backward as in plain PyTorch. An
in-place change to y itself is checked here.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _ext
from ..ops import batchnorm as bnops
from ..ops import buffers as buffers_module
from ..ops.backend import backend_for

_ATTR = "_resnet_fast_recipe"


class Recipe(NamedTuple):
    """y = act(x * scale + shift), scale/shift from (weight, bias, mean, invstd): bn_act_train's apply."""

    x: Tensor
    weight: Tensor | None
    bias: Tensor | None
    mean: Tensor
    invstd: Tensor
    relu: bool

    def run(self) -> Tensor:
        x = self.x.contiguous(memory_format=bnops._layout(self.x))
        scale, shift = bnops.scale_shift(self.weight, self.bias, self.mean, self.invstd)
        return bnops.kernels_for(x).apply(x, scale, shift, None, self.relu)


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def attach(
    y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor, relu: bool
) -> None:
    """Record on y (the output of bn_act_train without residual) how to rebuild it."""
    if not torch.compiler.is_compiling():
        setattr(y, _ATTR, Recipe(x.detach(), _detach(weight), _detach(bias), mean, invstd, relu))


def _usable(y: Tensor) -> bool:
    """y has a recipe and the backward needs it; not under torch.compile (it plans memory itself), nor
    under someone else's saved-tensor hooks (activation checkpointing or offloading keep their own
    semantics)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return (
        getattr(y, _ATTR, None) is not None
        and torch.is_grad_enabled()
        and y.requires_grad
        and not torch.compiler.is_compiling()
        and top is not None
        and top(False) is None
    )


class _Packed(NamedTuple):
    recipe: Recipe
    ref: weakref.ref
    version: int


def _packed(y: Tensor) -> _Packed:
    return _Packed(getattr(y, _ATTR), weakref.ref(y), y._version)


def _rebuild(saved: _Packed) -> Tensor:
    y = saved.ref()
    if y is not None and y._version != saved.version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace "
            f"operation: a resnet_fast batch-norm output is at version {y._version}; expected version "
            f"{saved.version} instead."
        )
    with torch.no_grad():
        return saved.recipe.run()


def _pack(t: Tensor) -> Tensor | _Packed:
    return _packed(t) if getattr(t, _ATTR, None) is not None else t


def _unpack(saved: Tensor | _Packed) -> Tensor:
    return _rebuild(saved) if isinstance(saved, _Packed) else saved


@contextlib.contextmanager
def recomputed_when_saved(y: Tensor) -> Iterator[None]:
    """Ops run inside keep y's recipe, not y, for their backward (a no-op where y has none)."""
    if not _usable(y):
        yield
        return
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield


class _MaxPool(torch.autograd.Function):
    """max_pool2d that keeps only its input's recipe: the backward rebuilds the input and the indices."""

    @staticmethod
    def forward(ctx, x: Tensor, pool: nn.MaxPool2d) -> Tensor:
        ctx.saved, ctx.pool = _packed(x), pool
        return F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)

    @staticmethod
    def backward(ctx, grad: Tensor):
        p = ctx.pool
        x = _rebuild(ctx.saved)
        _, indices = F.max_pool2d(
            x, p.kernel_size, p.stride, p.padding, p.dilation, p.ceil_mode, return_indices=True
        )
        k, s, pad, d = (
            torch.nn.modules.utils._pair(v)
            for v in (p.kernel_size, p.stride or p.kernel_size, p.padding, p.dilation)
        )
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad, x, k, s, pad, d, p.ceil_mode, indices
        ), None


def max_pool2d(pool: nn.Module, x: Tensor) -> Tensor:
    """pool(x), keeping neither x nor the indices for the backward when x has a recipe; in a forward
    with private activations on the cpp backend, written into a kept buffer."""
    plain = type(pool) is nn.MaxPool2d and not (pool._forward_hooks or pool._forward_pre_hooks)
    buffers = buffers_module.current()
    if not (plain and not pool.return_indices):
        if buffers is not None:
            buffers.unrecordable()
        return pool(x)
    if buffers is not None and _into_buffer(pool, x):
        k, s, p = (
            torch.nn.modules.utils._pair(v)
            for v in (pool.kernel_size, pool.stride or pool.kernel_size, pool.padding)
        )
        shape = [x.shape[0], x.shape[1], *((x.shape[i + 2] + 2 * p[i] - k[i]) // s[i] + 1 for i in range(2))]
        out = _ext.load().max_pool_cl(x, k, s, p, buffers.output(shape, x))
        if buffers.captured is not None:  # for nn.replay's compiled program
            buffers.captured.append(dict(kind="max_pool", kernel=k, stride=s, padding=p, out=out))
        buffers.record(lambda x, residual, buffers: max_pool2d(pool, x), x, None, out, None)
        return out
    if buffers is not None:
        buffers.unrecordable()
    if not _usable(x):
        return pool(x)
    return _MaxPool.apply(x, pool)


def _into_buffer(pool: nn.MaxPool2d, x: Tensor) -> bool:
    """Where resnet_fast._C's max pool runs it: CPU on the cpp backend, channels_last, no gradient, no
    dilation, floor mode (the kernel refuses padding over half the kernel, as torch does)."""
    return (
        x.device.type == "cpu"
        and backend_for(x.device) == "cpp"
        and not torch.is_grad_enabled()
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and pool.dilation in (1, (1, 1))
        and not pool.ceil_mode
    )
