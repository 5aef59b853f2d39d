"""Training batch norm (+ residual) (+ ReLU) as two torch.library ops, with autograd.

    y, mean, var, invstd = bn_act_train(x, weight, bias, residual, relu, eps[, running stats])
    y = act((x - mean) * invstd * weight + bias (+ residual)), statistics over all dims but 1

resnet_fast::bn_batch_stats: per-channel batch mean and biased variance (tiles reduced in two passes and
merged with Chan's (count, mean, M2) formula, never E[x^2] - E[x]^2), invstd, scale = weight * invstd,
shift = bias - mean * scale, and nn.BatchNorm2d's update of the running statistics, which the op
declares as mutated. It is not differentiable (called on detached tensors): the gradient through the
statistics is part of the next op's backward.
resnet_fast::bn_act_apply: y = act(x * scale + shift (+ residual)), one elementwise pass. Its backward
(resnet_fast::bn_act_backward) is the whole batch-norm gradient: one reduction pass, sums of dy' and
dy' * (x - mean) per channel with dy' = dy masked by the ReLU as torch's relu backward masks it, and
one elementwise pass giving dx and the residual's gradient (dy'). Saved: x (kept alive anyway as the
conv's output), mean, invstd, scale, shift; no pre-activation tensor. The mask is recomputed from x;
with a residual it is read from the output (as torch's relu backward), which the next block's conv
keeps alive anyway, so the residual itself is not kept.

The kernels behind the ops come from `kernels_for(x)`: Triton (two launches for the statistics, one
for the apply, three for the backward), resnet_fast._C (C++/CUDA) or plain PyTorch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _ext
from .backend import backend_for
from .fused import _layout


class Kernels:
    """One backend's batch-norm kernels; x, dy, residual dense in one format, vectors in x's math type.

    Backends implement the four primitives; batch_stats and backward compose them (a backend with
    fused kernels for those, Triton, overrides them). SyncBatchNorm uses the primitives.
    """

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:  # (mean, biased var)
        raise NotImplementedError

    def apply(self, x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
        raise NotImplementedError

    def backward_reduce(
        self,
        dy: Tensor,
        x: Tensor,
        scale: Tensor,
        shift: Tensor,
        output: Tensor | None,
        mean: Tensor,
        relu: bool,
    ) -> tuple[Tensor, Tensor]:  # (sum dy', sum dy' * (x - mean)); see bn_act_backward
        raise NotImplementedError

    def backward_elemt(
        self,
        dy: Tensor,
        x: Tensor,
        scale: Tensor,
        shift: Tensor,
        output: Tensor | None,
        mean: Tensor,
        ka: Tensor,
        kb: Tensor,
        kc: Tensor,
        relu: bool,
        residual_grad: bool,
    ) -> tuple[Tensor, Tensor | None]:  # (dx = ka*dy' + kb*(x - mean) + kc, dy' or None)
        raise NotImplementedError

    def batch_stats(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float | None,
        num_batches_tracked: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(mean, var, invstd, scale, shift), and the running statistics updated (see bn_batch_stats)."""
        mean, var = self.stats(x)
        invstd = torch.rsqrt(var + eps)
        scale, shift = scale_shift(weight, bias, mean, invstd)
        if scale is invstd:  # no weight: op outputs must not alias each other
            scale = invstd.clone()
        if running_mean is not None:
            factor = momentum if momentum is not None else 1.0 / num_batches_tracked.to(mean.dtype)
            update_running(running_mean, running_var, mean, var, x.numel() // x.shape[1], factor)
        return mean, var, invstd, scale, shift

    def backward(
        self,
        dy: Tensor,
        x: Tensor,
        scale: Tensor,
        shift: Tensor,
        output: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        relu: bool,
        residual_grad: bool,
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """(dx, dy' or None, dweight, dbias) in the math type, with batch statistics."""
        sum_dy, sum_dy_xmu = self.backward_reduce(dy, x, scale, shift, output, mean, relu)
        ka, kb, kc = grad_coefficients(scale, invstd, sum_dy, sum_dy_xmu, x.numel() // x.shape[1])
        dx, dres = self.backward_elemt(dy, x, scale, shift, output, mean, ka, kb, kc, relu, residual_grad)
        return dx, dres, sum_dy_xmu * invstd, sum_dy


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The math type of the kernels (and of mean/invstd): float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cview(v: Tensor, x: Tensor) -> Tensor:
    return v.view((1, -1) + (1,) * (x.dim() - 2))


class TorchKernels(Kernels):
    """Plain PyTorch, the same math as the fused kernels: for the 'torch' backend and devices without kernels."""

    @staticmethod
    def _pre(x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None) -> Tensor:
        pre = x.to(scale.dtype) * _cview(scale, x) + _cview(shift, x)
        return pre if residual is None else pre + residual.to(scale.dtype)

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(x.to(opmath(x.dtype)), dim=dims, correction=0)  # Welford in ATen
        return mean, var

    def apply(self, x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
        y = self._pre(x, scale, shift, residual)
        return (torch.relu(y) if relu else y).to(x.dtype)

    def _masked(self, dy, x, scale, shift, output, relu) -> Tensor:
        g = dy.to(scale.dtype)
        if relu:
            pre = self._pre(x, scale, shift, None) if output is None else output
            g = torch.where(pre <= 0, 0, g)  # torch's relu backward: NaN passes dy on
        return g

    def backward_reduce(self, dy, x, scale, shift, output, mean, relu):
        g = self._masked(dy, x, scale, shift, output, relu)
        dims = [d for d in range(x.dim()) if d != 1]
        return g.sum(dims), (g * (x.to(mean.dtype) - _cview(mean, x))).sum(dims)

    def backward_elemt(self, dy, x, scale, shift, output, mean, ka, kb, kc, relu, residual_grad):
        g = self._masked(dy, x, scale, shift, output, relu)
        dx = _cview(ka, x) * g + _cview(kb, x) * (x.to(mean.dtype) - _cview(mean, x)) + _cview(kc, x)
        return dx.to(x.dtype), (g.to(x.dtype, copy=True) if residual_grad else None)  # never dy itself


class CppKernels(Kernels):
    """resnet_fast._C: C++ (at::vec, at::parallel_for; AVX2+FMA where the CPU has it) on the CPU, CUDA C++
    on GPUs. The apply pass is bn_apply (the CPU arithmetic the backward's mask recomputes)."""

    def stats(self, x):
        return _ext.load().bn_stats(x)

    def apply(self, x, scale, shift, residual, relu):
        return _ext.load().bn_apply(x, scale, shift, residual, relu)

    def backward_reduce(self, dy, x, scale, shift, output, mean, relu):
        return _ext.load().bn_backward_reduce(dy, x, scale, shift, output, mean, relu)

    def backward_elemt(self, dy, x, scale, shift, output, mean, ka, kb, kc, relu, residual_grad):
        return _ext.load().bn_backward_elemt(
            dy, x, scale, shift, output, mean, ka, kb, kc, relu, residual_grad
        )


class TritonKernels(Kernels):
    """Triton kernels (kernels/triton/batchnorm.py) and the shared scale_shift_act for the apply pass;
    batch_stats and backward are fused (2 and 3 launches)."""

    def stats(self, x):
        from ..kernels.triton import batchnorm

        return batchnorm.stats(x)

    def apply(self, x, scale, shift, residual, relu):
        from ..kernels.triton import elementwise

        return elementwise.scale_shift_act(x, scale, shift, residual, relu)

    def backward_reduce(self, dy, x, scale, shift, output, mean, relu):
        from ..kernels.triton import batchnorm

        return batchnorm.backward_reduce(dy, x, scale, shift, output, mean, relu)

    def backward_elemt(self, dy, x, scale, shift, output, mean, ka, kb, kc, relu, residual_grad):
        from ..kernels.triton import batchnorm

        return batchnorm.backward_elemt(dy, x, scale, shift, output, mean, ka, kb, kc, relu, residual_grad)

    def batch_stats(self, x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked):
        from ..kernels.triton import batchnorm

        return batchnorm.batch_stats(
            x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked
        )

    def backward(self, dy, x, scale, shift, output, mean, invstd, relu, residual_grad):
        from ..kernels.triton import batchnorm

        return batchnorm.backward(dy, x, scale, shift, output, mean, invstd, relu, residual_grad)


_KERNELS: dict[str, Kernels] = {"triton": TritonKernels(), "cpp": CppKernels(), "torch": TorchKernels()}


def kernels_for(x: Tensor) -> Kernels:
    """The batch-norm kernels of the backend that runs on x's device (Triton's compute in float32:
    float64 runs the PyTorch kernels there)."""
    backend = backend_for(x.device)
    if backend == "triton" and x.dtype == torch.float64:
        backend = "torch"
    return _KERNELS[backend]


# ------------------------------------------------------------------------------------- shared math


def scale_shift(
    weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-channel scale = weight * invstd, shift = bias - mean * scale in mean's dtype.

    The one place this is computed: forward and backward get bit-identical values, so the backward's
    recomputed ReLU mask is the forward's.
    """
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = -mean * scale if bias is None else bias.to(mean.dtype) - mean * scale
    return scale, shift


class GradCoefficients(NamedTuple):
    ka: Tensor
    kb: Tensor
    kc: Tensor


def grad_coefficients(scale: Tensor, invstd: Tensor, sum_dy: Tensor, sum_dy_xmu: Tensor, count: int | Tensor):
    """dx = ka*dy' + kb*(x - mean) + kc, the batch-norm input gradient with batch statistics:
    dx = w*invstd * (dy' - mean(dy') - x_hat * mean(dy' * x_hat)), x_hat = (x - mean) * invstd."""
    kb = -scale * invstd * invstd * sum_dy_xmu / count
    kc = -scale * sum_dy / count
    return GradCoefficients(scale, kb, kc)


@torch.no_grad()
def update_running(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int | Tensor,
    factor: float | Tensor,
) -> None:
    """nn.BatchNorm2d's update: running = (1 - factor) * running + factor * batch value, with the unbiased
    variance var * n / (n - 1). Tensor arithmetic only (count and factor may be tensors): no host sync."""
    unbiased = var * (
        count / (count - 1).clamp(min=1) if isinstance(count, Tensor) else count / max(count - 1, 1)
    )
    running_mean.copy_(running_mean * (1 - factor) + mean.to(running_mean.dtype) * factor)
    running_var.copy_(running_var * (1 - factor) + unbiased.to(running_var.dtype) * factor)


def check_inputs(
    op: str, x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None
) -> None:
    if not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"{op}: expected a floating-point input [N, C, ...], got {x.dtype} {tuple(x.shape)}")
    c = x.shape[1]
    for name, v in (("weight", weight), ("bias", bias)):
        if v is not None and (v.shape != (c,) or v.device != x.device):
            raise ValueError(f"{op}: {name} must be [{c}] on {x.device}, got {tuple(v.shape)} on {v.device}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"{op}: residual must match the input ({tuple(x.shape)}, {x.dtype}), "
            f"got {tuple(residual.shape)}, {residual.dtype}"
        )


def _dense(t: Tensor | None, fmt: torch.memory_format) -> Tensor | None:
    return None if t is None else t.contiguous(memory_format=fmt)


# ---------------------------------------------------------------------------------------- the ops


@torch.library.custom_op("resnet_fast::bn_batch_stats", mutates_args=("running_mean", "running_var"))
def bn_batch_stats(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(mean, biased var, invstd, scale, shift) per channel in the math type (float32, float64 for float64
    x); invstd = 1/sqrt(var + eps), scale = weight * invstd, shift = bias - mean * scale (scale_shift).

    With running_mean and running_var: nn.BatchNorm2d's update of them, in place, with factor momentum,
    or 1 / num_batches_tracked when momentum is None (the caller increments num_batches_tracked first).
    """
    fmt = _layout(x)
    x = x.contiguous(memory_format=fmt)
    return kernels_for(x).batch_stats(
        x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked
    )


@bn_batch_stats.register_fake
def _(x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked):
    c, dt = x.shape[1], opmath(x.dtype)
    return tuple(x.new_empty(c, dtype=dt) for _ in range(5))


@torch.library.custom_op("resnet_fast::bn_act_apply", mutates_args=())
def bn_act_apply(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    relu: bool,
    mean: Tensor,
    invstd: Tensor,
    scale: Tensor,
    shift: Tensor,
) -> Tensor:
    """act(x * scale + shift (+ residual)) in x's dtype and layout, where (mean, invstd, scale, shift) are
    bn_batch_stats(x, weight, bias, ...): the backward is batch norm's, through the statistics too."""
    fmt = _layout(x)
    x, residual = x.contiguous(memory_format=fmt), _dense(residual, fmt)
    return kernels_for(x).apply(x, scale, shift, residual, relu).contiguous(memory_format=fmt)


@bn_act_apply.register_fake
def _(x, weight, bias, residual, relu, mean, invstd, scale, shift):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_layout(x))


@torch.library.custom_op("resnet_fast::bn_act_backward", mutates_args=())
def bn_act_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    output: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    scale: Tensor,
    shift: Tensor,
    relu: bool,
    residual_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dresidual) of bn_act_apply with batch statistics; dweight/dbias are empty
    when their input is None, dresidual unless residual_grad. output (the forward's y) gives the ReLU
    mask, y <= 0; None recomputes it from x."""
    fmt = _layout(x)
    x, grad_y, output = (
        x.contiguous(memory_format=fmt),
        grad_y.contiguous(memory_format=fmt),
        _dense(output, fmt),
    )
    dx, dres, dweight, dbias = kernels_for(x).backward(
        grad_y, x, scale, shift, output, mean, invstd, relu, residual_grad
    )
    dweight = x.new_empty(0) if weight is None else dweight.to(weight.dtype)
    dbias = x.new_empty(0) if bias is None else dbias.to(bias.dtype)
    dres = x.new_empty(0) if dres is None else dres.contiguous(memory_format=fmt)
    return dx.contiguous(memory_format=fmt), dweight, dbias, dres


@bn_act_backward.register_fake
def _(grad_y, x, weight, bias, output, mean, invstd, scale, shift, relu, residual_grad):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_layout(x))
    dweight = x.new_empty(0) if weight is None else weight.new_empty(weight.shape)
    dbias = x.new_empty(0) if bias is None else bias.new_empty(bias.shape)
    dres = torch.empty_like(dx) if residual_grad else x.new_empty(0)
    return dx, dweight, dbias, dres


def mask_source(y: Tensor, residual: Tensor | None, relu: bool) -> Tensor | None:
    """What the backward reads the ReLU mask from: the output y with a residual (so the residual need
    not be kept), None (recompute from x) otherwise."""
    return y if relu and residual is not None else None


def _setup(ctx, inputs, output) -> None:
    x, weight, bias, residual, relu, mean, invstd, scale, shift = inputs
    ctx.relu = relu
    ctx.has = (weight is not None, bias is not None, residual is not None)
    ctx.save_for_backward(x, weight, bias, mask_source(output, residual, relu), mean, invstd, scale, shift)


def _backward(ctx, grad_y):
    x, weight, bias, output, mean, invstd, scale, shift = ctx.saved_tensors
    has_w, has_b, has_r = ctx.has
    dx, dweight, dbias, dres = bn_act_backward(
        grad_y, x, weight, bias, output, mean, invstd, scale, shift, ctx.relu, has_r
    )
    grads = (dx, dweight if has_w else None, dbias if has_b else None, dres if has_r else None)
    return *grads, None, None, None, None, None


bn_act_apply.register_autograd(_backward, setup_context=_setup)


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def bn_act_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    relu: bool,
    eps: float,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float | None = 0.1,
    num_batches_tracked: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, var, invstd): batch norm with batch statistics (+ residual) (+ ReLU), differentiable in
    x, weight, bias and residual; the running statistics, when given, updated as bn_batch_stats says.

    mean, biased var and invstd are per channel in the math type (float32, float64 for float64 x); y has
    x's dtype and layout.
    """
    check_inputs("bn_act_train", x, weight, bias, residual)
    # The statistics op sees detached tensors: its outputs carry no graph, bn_act_apply's backward
    # differentiates through them.
    mean, var, invstd, scale, shift = bn_batch_stats(
        x.detach(),
        _detach(weight),
        _detach(bias),
        eps,
        running_mean,
        running_var,
        momentum,
        num_batches_tracked,
    )
    y = bn_act_apply(x, weight, bias, residual, relu, mean, invstd, scale, shift)
    return y, mean, var, invstd


def batch_norm_act(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None = None,
    relu: bool = True,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var): act(batch_norm(x) (+ residual)) with batch statistics, through the fused ops."""
    y, mean, var, _ = bn_act_train(x, weight, bias, residual, relu, eps)
    return y, mean, var
