"""How a block's Conv -> BN (-> +residual) (-> ReLU) runs: fused through resnet_fast.ops where
the modules are plain, else exactly as torchvision runs it."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .. import fold, ops
from ..kernels import reference
from .batchnorm import SyncBatchNorm, train_forward, uses_batch_stats
from .recompute import recomputed_when_saved


def plain_pair(conv: nn.Module, bn: nn.Module) -> bool:
    """True for an unmodified Conv2d + BatchNorm2d pair with no hooks: safe to replace by a fused op.

    Subclasses with their own forward, other norm layers (norm_layer=...) and hooked modules
    run unfused so their behaviour is kept.
    """
    return (
        type(conv) is nn.Conv2d
        and isinstance(bn, nn.BatchNorm2d)
        and type(bn).forward in (nn.BatchNorm2d.forward, SyncBatchNorm.forward)
        and not (conv._forward_hooks or conv._forward_pre_hooks or bn._forward_hooks or bn._forward_pre_hooks)
    )


def _exporting() -> bool:
    """A trace for a runtime that knows no resnet_fast op: an ONNX export (either exporter) or
    torch.jit.trace. The model then runs torchvision's op sequence, which those runtimes know (and
    whose Conv -> BN the ONNX exporters fold themselves). torch.export is not one: it keeps the ops.

    Cheap in eager mode (two flag reads): the TorchScript ONNX exporter traces with torch.jit, the
    dynamo one with torch.export, so torch.onnx is consulted only inside those."""
    return torch.jit.is_tracing() or (torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export())


# A model's forward (models/resnet.py) runs its layers inside private_activations() when no one
# outside the forward can see the tensors passed between them: the last conv of a block may then write
# its output into the residual (the block's input or its downsample's output), and the other layers
# into buffers kept from the last forward (ops.buffers.current()), as onnxruntime and OpenVINO do,
# instead of into fresh memory. Per model, its idle Buffers: one per forward running at once (a
# list's pop and append are atomic), so concurrent forwards never share a buffer.
_IDLE_BUFFERS: weakref.WeakKeyDictionary[nn.Module, list[ops.Buffers]] = weakref.WeakKeyDictionary()


@contextmanager
def private_activations(owner: nn.Module, x: Tensor) -> Iterator[ops.Buffers]:
    """Within: activations are the forward's own; outputs go into `owner`'s buffers for inputs like x."""
    idle = _IDLE_BUFFERS.setdefault(owner, [])
    try:
        buffers = idle.pop()
    except IndexError:
        buffers = ops.Buffers()
    buffers.start(x, private_backend(x))
    try:
        with ops.buffers.using(buffers):
            yield buffers
    finally:
        buffers.recording = None
        idle.append(buffers)


def private_backend(x: Tensor) -> str | None:
    """The backend a private forward's fused layers run on, resolved once per forward (each layer's own
    resolution costs ~2 us of Python, an environment read); None under autocast (each layer resolves it)."""
    return None if torch.is_autocast_enabled(x.device.type) else ops.backend_for(x.device)


def release_buffers(owner: nn.Module) -> int:
    """Drop the activation buffers a model keeps between forwards; returns the bytes they held."""
    return sum(b.nbytes() for b in _IDLE_BUFFERS.pop(owner, []))


def fused_backend(x: Tensor) -> bool:
    """Whether fused ops run for tensors like x (the backend for its device is not 'torch', and the
    model is not being exported to a runtime without resnet_fast)."""
    return ops.backend_for(x.device) != "torch" and not _exporting()


def conv_bn_act(
    x: Tensor, conv: nn.Module, bn: nn.Module, residual: Tensor | None = None, relu: bool = True
) -> Tensor:
    """act(bn(conv(x)) [+ residual]) through the fused ops where possible."""
    buffers = ops.buffers.current()
    if buffers is not None:
        if (
            buffers.backend not in (None, "torch")
            and plain_pair(conv, bn)
            and ready_to_fold(x.dtype, conv, bn)
        ):
            # Inside a model's private forward, which already knows: no gradients, eager, not exporting,
            # autocast off, the backend.
            return _eval_fused(x, conv, bn, residual, relu, buffers.backend, buffers)
        buffers.unrecordable()
    backend = ops.backend_for(x.device)
    if backend == "torch" or _exporting() or not plain_pair(conv, bn):
        return reference.conv_bn_act(x, conv, bn, residual, relu)
    if uses_batch_stats(bn):
        return _train_fused(x, conv, bn, residual, relu)
    if _foldable(x, conv, bn, residual):
        return _eval_fused(x, conv, bn, residual, relu, backend, ops.buffers.current())
    out = bn(conv(x))
    if residual is not None and relu:
        return ops.add_relu(out, residual)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def linear(x: Tensor, fc: nn.Module) -> Tensor:
    """fc(x), through resnet_fast.ops.linear (our GEMM where it is faster) for a plain, unhooked
    nn.Linear in eager mode on the cpp backend, autocast off; else fc(x) itself."""
    hooked = fc._forward_hooks or fc._forward_pre_hooks
    hooked = hooked or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    if (
        type(fc) is not nn.Linear
        or hooked
        or x.device.type != "cpu"
        or ops.backend_for(x.device) != "cpp"
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()  # an exported graph keeps torch's Linear
        or torch.jit.is_tracing()
        or torch.is_autocast_enabled("cpu")
    ):
        return fc(x)
    return ops.linear(x, fc)  # F.linear itself where autograd is wanted


def _train_fused(x: Tensor, conv: nn.Module, bn: nn.Module, residual: Tensor | None, relu: bool) -> Tensor:
    """Train mode (batch statistics): the conv, then ONE fused BN (+ residual) (+ ReLU) op that also
    updates the running statistics like nn.BatchNorm2d (synchronised for a SyncBatchNorm).

    When x is the previous fused BN+ReLU's output, the conv keeps its recipe instead of x for the
    backward (x is rebuilt then): one activation fewer held per conv."""
    with recomputed_when_saved(x):
        out = conv(x)
    return train_forward(bn, out, residual, relu)


def _foldable(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, residual: Tensor | None) -> bool:
    """Eval BN with running stats, no gradient needed, and a conv the fused op expresses exactly.

    Folded weights are cached without autograd history, so anything needing gradients runs unfused.
    Autocast and mixed dtypes keep torch's own semantics (unfused). Runs per layer per eager call,
    hence the registry reads (fold.sources) and the cheap checks first.
    """
    weight, bias, gamma, beta, mean, var = fold.sources(conv, bn)
    if bn.training or mean is None or var is None or x.dtype != weight.dtype:
        return False
    if conv.padding_mode != "zeros" or not isinstance(conv.padding, tuple):  # not 'same' / 'valid'
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    return not torch.is_grad_enabled() or not (
        x.requires_grad
        or (residual is not None and residual.requires_grad)
        or any(p is not None and p.requires_grad for p in (weight, bias, gamma, beta))
    )


def ready_to_fold(dtype: torch.dtype, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    """What _foldable checks beyond what a private forward knows: eval BN with running stats, one dtype,
    a padding the fused op expresses."""
    weight, _, _, _, mean, var = fold.sources(conv, bn)
    return (
        not bn.training
        and mean is not None
        and var is not None
        and dtype == weight.dtype
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
    )


def _eval_fused(
    x: Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    residual: Tensor | None,
    relu: bool,
    backend: str,
    buffers: ops.Buffers | None,
) -> Tensor:
    """Eval mode: BN folded into the conv (resnet_fast.fold), then ONE conv_bias_act op whose
    epilogue adds the bias, the residual and applies ReLU."""
    if torch.compiler.is_compiling():
        # Traced: the fold becomes part of the graph (the cache's version checks are not traceable),
        # and the op stays one node of it.
        weight, bias = fold.fold_conv_bn(
            conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, x.dtype
        )
        return ops.conv_bias_act(x, weight, bias, residual, relu, *_geometry(conv))
    # Eager: the layer's plan, resolved on first use for this input shape and kept with the fold
    # (so any change to a parameter, buffer or dtype drops it): one backend call, about what
    # F.conv2d costs in host time, instead of the custom op's dispatch and checks on every call.
    entry = fold.folded(conv, bn, x.dtype)
    inplace = residual is not None and buffers is not None
    # The geometry too: a changed padding or dilation can keep the output's shape.
    geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)
    key = (geometry, x.shape, x.device, residual is not None, relu, backend, inplace)
    run = entry.runners.get(key)
    if run is None:
        if len(entry.runners) >= _MAX_PLANS_PER_LAYER:
            del entry.runners[next(iter(entry.runners))]  # the oldest, with the prepacked weight it holds
        run = entry.runners[key] = ops.conv_runner(
            x, entry, entry.bias, residual, relu, *_geometry(conv), inplace=inplace
        )
    out = run(x, residual, buffers)
    if buffers is not None:
        buffers.record(run, x, residual, out, (conv, bn, key))
    return out


# Plans per layer (input shapes x epilogues): a plan can hold a prepacked weight for its input shape,
# so serving many batch sizes keeps the last few, like the backends' pack caches.
_MAX_PLANS_PER_LAYER = 4


def _geometry(conv: nn.Conv2d) -> tuple:
    """(stride, padding, dilation, groups) as conv_bias_act takes them."""
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


def to_model_layout(x: Tensor) -> Tensor:
    """Fused backends run NHWC: convert the input once at the model's entry."""
    return x.contiguous(memory_format=torch.channels_last) if fused_backend(x) else x


class ConvBN(nn.Sequential):
    """The downsample branch: nn.Sequential(conv, bn) as in torchvision (same state_dict keys), run fused."""

    def forward(self, x: Tensor) -> Tensor:
        return conv_bn_act(x, self[0], self[1], relu=False)
