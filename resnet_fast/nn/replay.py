"""A model's private forward, recorded once and then replayed: the same layer plans called in the same
order, on the same kept buffers, without the Python between them (module calls, each layer's checks).

Between the kernels that Python runs with cold caches: benchmarks/cpu_layers.py put 3.7 ms of a
batch-1 ResNet-50 forward outside the convolutions on the Zen 3 (onnxruntime: 0.5-0.7 ms outside its
convolution nodes), several times what the same code takes in a hot loop. A replay checks once, at the start, in one loop, what each layer
would have checked: the modules walked are the same objects (none replaced), every conv + BN is still
plain and in eval mode, its fold is still the recorded one, and so is its plan for this input and the
conv's geometry; the max pool's arguments are the recorded ones (they set every later input shape). What a
fold depends on (fold.folded's key: every source tensor's identity, memory, version counter, dtype,
device and shape, and eps) is compared for all layers in one list: ResNet-50's 53 layers in 0.48 ms
(hot, Xeon) where asking fold.folded layer by layer took 0.65; on the cpp backend the extension reads
those fields. Any other outcome records the forward again.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from .. import _ext, fold
from .fused import plain_pair, private_activations


@dataclass(frozen=True)
class _Program:
    modules: tuple[nn.Module, ...]  # walked when recorded, in order
    runs: tuple[Callable[..., Tensor], ...]  # per step: run(x, residual, buffers), a plan or the pool
    sources: tuple[tuple[int, int | None], ...]  # per step: its x and residual as step indices, -1 the input
    drops: tuple[tuple[int, ...], ...]  # per step: the values whose last use it is (freed after it)
    # Per conv step: (conv, bn, its fold, the plan's key there, the plan, its sources' ids, BN's eps).
    folds: tuple[tuple, ...]
    pools: tuple[tuple[nn.Module, tuple], ...]  # per max pool walked: (pool, its arguments when recorded)
    tensors: tuple[Tensor, ...]  # every fold's source tensors, in order
    states_of: Callable[[Sequence[Tensor]], list]  # fold.states, or the extension's faster equivalent
    states: list  # states_of(tensors) when recorded


# Per model: its programs by input shape, dtype, device and backend. Weakly keyed: they die with it.
_PROGRAMS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Program]] = weakref.WeakKeyDictionary()


def run_private(
    owner: nn.Module, x: Tensor, features: Callable[[Tensor], Tensor], modules: Sequence[nn.Module]
) -> Tensor:
    """features(x) inside private_activations(owner, x), replayed from the recording of an earlier call
    where that is still valid. `modules`: what features runs, walked in a fixed order."""
    with private_activations(owner, x) as buffers:
        key = (x.shape, x.dtype, x.device, buffers.backend)
        programs = _PROGRAMS.setdefault(owner, {})
        program = programs.pop(key, None)
        if program is not None and _valid(program, modules):
            programs[key] = program
            return _replay(program, x, buffers)
        buffers.recording = [] if buffers.backend not in (None, "torch") else None
        out = features(x)
        if buffers.recording:
            program = _build(buffers.recording, x, out, modules, buffers.backend)
            if program is not None:
                programs[key] = program
        return out


def _valid(program: _Program, modules: Sequence[nn.Module]) -> bool:
    if len(modules) != len(program.modules) or any(
        a is not b for a, b in zip(modules, program.modules, strict=True)
    ):
        return False
    if any(_pool_args(pool) != args for pool, args in program.pools):
        return False  # another output shape: every later layer's plan is for another input
    for conv, bn, entry, key, run, ids, eps in program.folds:
        if (
            fold.last(conv) is not entry
            or key[0] != (conv.stride, conv.padding, conv.dilation, conv.groups)  # the plan's geometry
            or entry.runners.get(key) is not run
            or not plain_pair(conv, bn)
            or bn.training
            or bn.eps != eps
            or conv.padding_mode != "zeros"
            or not isinstance(conv.padding, tuple)
            or tuple(map(id, fold.sources(conv, bn))) != ids
        ):
            return False
    try:
        return program.states_of(program.tensors) == program.states
    except RuntimeError:  # a source replaced through .data by an inference tensor
        return False


def _pool_args(pool: nn.MaxPool2d) -> tuple:
    return (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode, pool.return_indices)


def _build(
    recording: list[tuple], x: Tensor, out: Tensor, modules: Sequence[nn.Module], backend: str
) -> _Program | None:
    """The program of a recorded forward: each step's inputs are the outputs of the steps that last
    wrote their memory (kept buffers are reused, and a block's last conv writes into its residual)."""
    writer = {x.data_ptr(): -1}
    sources = []
    for i, (_, x_ptr, residual_ptr, out_ptr, _) in enumerate(recording):
        if x_ptr not in writer or (residual_ptr is not None and residual_ptr not in writer):
            return None  # an input made outside the recorded steps
        sources.append((writer[x_ptr], None if residual_ptr is None else writer[residual_ptr]))
        writer[out_ptr] = i
    if writer.get(out.data_ptr()) != len(recording) - 1:
        return None
    last_use: dict[int, int] = {}
    for i, source in enumerate(sources):
        for s in source:
            if s is not None and s >= 0:
                last_use[s] = i
    drops: list[list[int]] = [[] for _ in recording]
    for s, i in last_use.items():
        drops[i].append(s)
    folds, tensors = [], []
    for run, *_, layer in recording:
        if layer is not None:
            conv, bn, key = layer
            entry = fold.current(conv, bn, x.dtype)
            if entry is None or entry.runners.get(key) is not run:
                return None  # not cached (inference tensors), or changed during the forward
            srcs = fold.sources(conv, bn)
            folds.append((conv, bn, entry, key, run, tuple(map(id, srcs)), bn.eps))
            tensors.extend(t for t in srcs if t is not None)
    # The cpp backend has the extension loaded: its tensor_states reads the same fields in C++ (0.42 ->
    # ~0.05 ms per ResNet-50 forward); another backend may not have it built.
    states_of = _ext.load().tensor_states if backend == "cpp" else fold.states
    return _Program(
        tuple(modules),
        tuple(r[0] for r in recording),
        tuple(sources),
        tuple(tuple(d) for d in drops),
        tuple(folds),
        tuple((m, _pool_args(m)) for m in modules if isinstance(m, nn.MaxPool2d)),
        tuple(tensors),
        states_of,
        states_of(tensors),
    )


def _replay(program: _Program, x: Tensor, buffers) -> Tensor:
    values: list[Tensor | None] = []
    for run, (xs, rs), drops in zip(program.runs, program.sources, program.drops, strict=True):
        a = x if xs < 0 else values[xs]
        r = None if rs is None else (x if rs < 0 else values[rs])
        values.append(run(a, r, buffers))
        a = r = None  # as the forward drops them, so that kept buffers can be reused
        for d in drops:
            values[d] = None
    return values[-1]
