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

On the cpp backend the first replay is also captured: each plan describes its kernel call (ops.conv's
_describe) with the buffers it used, and the program is compiled into one C.Program
(csrc/cpu/program.cpp) that later replays run in one call on that same memory. It belongs to the Buffers
it was captured on (one forward at a time), and is dropped when that Buffers drops its memory.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from .. import _ext, fold
from ..ops import layer_choice
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


# On the cpp backend a replay runs as one C++ call from its second time on (see _replay); False keeps it in
# Python (benchmarks/cpu_replay.py compares the two).
COMPILE = True

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
    compiled = buffers.compiled
    if compiled is not None and compiled[0] is program and not any(map(_settled, compiled[2])) and COMPILE:
        return compiled[1].run(x, buffers)
    # Captured: the replay in Python, each kernel call described (ops.conv), then compiled into one
    # C.Program on the memory this Buffers gave them. Its buffers are dropped first: else every kept
    # buffer would look in use to this replay's Buffers.output.
    buffers.compiled = None
    compile_it = COMPILE and buffers.backend == "cpp" and x.numel() > 0
    buffers.captured = [] if compile_it else None
    steps: list[tuple] = []
    values: list[Tensor | None] = []
    try:
        for run, (xs, rs), drops in zip(program.runs, program.sources, program.drops, strict=True):
            a = x if xs < 0 else values[xs]
            r = None if rs is None else (x if rs < 0 else values[rs])
            values.append(run(a, r, buffers))
            if compile_it:
                steps.append((run, xs, rs, drops, _captured(buffers, run, r)))
            a = r = None  # as the forward drops them, so that kept buffers can be reused
            for d in drops:
                values[d] = None
    finally:
        buffers.captured = None
    if compile_it:
        buffers.compiled = _compile(program, steps, buffers, x)
    return values[-1]


def _compile(program: _Program, steps: list[tuple], buffers, x: Tensor) -> tuple:
    """buffers.compiled for the captured steps: (program, the C.Program, the plans still settling in it)."""
    compiled = _ext.load().Program()
    for run, xs, rs, drops, step in steps:
        args = None
        if step is not None:
            if "workspace" in step:  # the scratch only grows: the last one serves every step
                step = {**step, "workspace": buffers.scratch(0, x)}
            args = {k: v() if isinstance(v, weakref.ref) else v for k, v in step.items()}
            if any(args[k] is None for k, v in step.items() if isinstance(v, weakref.ref)):
                args = None  # a tensor it wrote or read is gone: the plan runs in Python
        if args is None:
            compiled.add_python(run, xs, rs, list(drops))
        else:
            compiled.add(x=xs, residual=rs, drops=list(drops), **args)
    settling = tuple(run for run, *_, step in steps if step is None and layer_choice.settling(run))
    return program, compiled, settling


def _captured(buffers, run, residual: Tensor | None) -> dict | None:
    """The step `run` just took, as C.Program.add's arguments with every tensor weakly held (a kept buffer
    referenced here would look in use to the next step's Buffers.output; Buffers and the plans hold every
    tensor described), or None where it runs in Python: not one kernel call, or a path on trial."""
    described, buffers.captured = buffers.captured, []
    if len(described) != 1 or layer_choice.settling(run):
        return None
    step = described[0]
    if residual is not None and step.get("out") is residual:
        step = {**step, "out": None, "in_place": True}
    return {k: weakref.ref(v) if isinstance(v, Tensor) else v for k, v in step.items()}


def _settled(run) -> bool:
    """A plan that was timing its close paths when a program was captured, and has chosen since."""
    return not layer_choice.settling(run)
