"""Batch norm in training mode through the fused op, with nn.BatchNorm2d's running-statistics rules,
and a SyncBatchNorm that synchronises batch statistics across processes (torch.distributed).

train_forward(bn, x, residual, relu) is what nn/fused.py runs for a train-mode BN: the fused op
(batch statistics, apply, ReLU), then the buffers updated as nn.BatchNorm2d updates them.
Outputs without residual carry how to rebuild them (nn/recompute.py), so the ops that consume them
need not keep them for the backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..ops import batchnorm as bnops
from . import recompute


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """Whether bn normalizes with batch statistics: in training, or in eval without running stats."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _verify_batch_size(x: Tensor, count: int | None = None) -> None:
    count = x.numel() // x.shape[1] if count is None else count
    if count == 1:  # the message of torch.nn.functional.batch_norm
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


def _running_args(bn: nn.BatchNorm2d) -> tuple:
    """(running_mean, running_var, momentum, num_batches_tracked) for bn_act_train when bn updates its
    running statistics in this step, after counting the step as nn.BatchNorm2d does; () otherwise."""
    if not (bn.training and bn.track_running_stats):
        return ()
    bn.num_batches_tracked.add_(1)
    return bn.running_mean, bn.running_var, bn.momentum, bn.num_batches_tracked


def update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int | Tensor) -> None:
    """running_mean/var and num_batches_tracked as nn.BatchNorm2d updates them in training mode, from
    statistics computed elsewhere (SyncBatchNorm). momentum=None is a cumulative moving average (factor
    1/num_batches_tracked). Tensor arithmetic only: no host sync, no graph break."""
    running = _running_args(bn)
    if running:
        factor = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.to(mean.dtype)
        bnops.update_running(bn.running_mean, bn.running_var, mean, var, count, factor)


def train_forward(bn: nn.BatchNorm2d, x: Tensor, residual: Tensor | None = None, relu: bool = True) -> Tensor:
    """act(bn(x) (+ residual)) for a bn that uses batch statistics, as one fused op (the running
    statistics are updated by it).

    A SyncBatchNorm in a process group of more than one process synchronises the statistics.
    """
    if isinstance(bn, SyncBatchNorm) and bn.sync_group() is not None:
        return bn.sync_forward(x, residual, relu)
    _verify_batch_size(x)
    y, mean, _, invstd = bnops.bn_act_train(x, bn.weight, bn.bias, residual, relu, bn.eps, *_running_args(bn))
    if residual is None:
        recompute.attach(y, x, bn.weight, bn.bias, mean, invstd, relu)
    return y


# ------------------------------------------------------------------------------------------ SyncBN


def _gather_moments(count: int, mean: Tensor, var: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """Global (count, mean, biased var) from each process's: one all_gather of (count, mean, M2) triplets,
    merged with Chan's parallel formula in float64 (no E[x^2] - E[x]^2). The count stays a (0-d float64)
    tensor: reading it on the host would wait for the GPU in every layer."""
    local = torch.stack([torch.full_like(mean, count), mean, var * count]).to(torch.float64)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    n, m, m2 = torch.stack(parts).unbind(1)  # each [world, C]
    total = n.sum(0)
    gmean = (n * m).sum(0) / total
    gm2 = m2.sum(0) + (n * (m - gmean) ** 2).sum(0)
    return total[0], gmean.to(mean.dtype), (gm2 / total).to(var.dtype)


class _SyncBNAct(torch.autograd.Function):
    """The fused op's math with statistics and gradient sums all-reduced over a process group."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, relu: bool, eps: float, group, bn):
        k = bnops.kernels_for(x)
        fmt = bnops._layout(x)
        x = x.contiguous(memory_format=fmt)
        residual = None if residual is None else residual.contiguous(memory_format=fmt)
        mean, var = k.stats(x)
        local = x.numel() // x.shape[1]
        count, mean, var = _gather_moments(local, mean, var, group)
        if local == 1:  # only then can the global count be 1: the one case worth a host sync
            _verify_batch_size(x, int(count.item()))
        invstd = torch.rsqrt(var + eps)
        scale, shift = bnops.scale_shift(weight, bias, mean, invstd)
        y = k.apply(x, scale, shift, residual, relu)
        update_running_stats(bn, mean, var, count)
        ctx.save_for_backward(x, weight, bias, bnops.mask_source(y, residual, relu), mean, invstd)
        ctx.relu, ctx.group, ctx.count, ctx.has_residual = relu, group, count, residual is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, output, mean, invstd = ctx.saved_tensors
        k = bnops.kernels_for(x)
        grad_y = grad_y.contiguous(memory_format=bnops._layout(x))
        scale, shift = bnops.scale_shift(weight, bias, mean, invstd)
        sum_dy, sum_dy_xmu = k.backward_reduce(grad_y, x, scale, shift, output, mean, ctx.relu)
        # dweight/dbias stay local (DDP averages parameter gradients); dx needs the global sums.
        dweight = None if weight is None else (sum_dy_xmu * invstd).to(weight.dtype)
        dbias = None if bias is None else sum_dy.to(bias.dtype)
        sums = torch.cat([sum_dy, sum_dy_xmu])
        dist.all_reduce(sums, group=ctx.group)
        g_dy, g_dy_xmu = sums.chunk(2)
        ka, kb, kc = bnops.grad_coefficients(scale, invstd, g_dy, g_dy_xmu, ctx.count)
        dx, dres = k.backward_elemt(
            grad_y, x, scale, shift, output, mean, ka, kb, kc, ctx.relu, ctx.has_residual
        )
        return dx, dweight, dbias, dres, None, None, None, None


class SyncBatchNorm(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode batch statistics are those of the whole process group.

    Same parameters, buffers and state_dict as nn.BatchNorm2d; matches torch.nn.SyncBatchNorm, and
    also runs on CPU tensors (gloo). Without an initialised process group of more than one process,
    or in eval mode, it is a plain BatchNorm2d. Built by convert_sync_batchnorm().
    """

    def __init__(self, *args, process_group=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def sync_group(self):
        """The process group to synchronise over now, or None (eval, not distributed, one process)."""
        if not (uses_batch_stats(self) and self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def sync_forward(self, x: Tensor, residual: Tensor | None = None, relu: bool = False) -> Tensor:
        return _SyncBNAct.apply(x, self.weight, self.bias, residual, relu, self.eps, self.sync_group(), self)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if self.sync_group() is None:
            return super().forward(x)
        return self.sync_forward(x)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every nn.BatchNorm2d in module by a resnet_fast SyncBatchNorm holding the same parameters
    and buffers (like torch.nn.SyncBatchNorm.convert_sync_batchnorm); the fused train path syncs them."""
    if type(module) is nn.BatchNorm2d:
        sync = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group=process_group,
        )
        if module.affine:
            with torch.no_grad():
                sync.weight = module.weight
                sync.bias = module.bias
        sync.running_mean = module.running_mean
        sync.running_var = module.running_var
        sync.num_batches_tracked = module.num_batches_tracked
        sync.training = module.training
        if hasattr(module, "qconfig"):
            sync.qconfig = module.qconfig
        return sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
