"""A model's private forward, recorded once and then replayed: the same layer plans called in the same
order, on the same kept buffers, without the Python between them (module calls, each layer's checks).

Between the kernels that Python runs with cold caches: benchmarks/cpu_layers.py put 3.7 ms of a
batch-1 ResNet-50 forward outside the convolutions on the Zen 3 (onnxruntime: 0.5-0.7 ms outside its
convolution nodes), several times what the same code takes in a hot loop. A replay checks once, at the
start, what the walk of the modules and each layer would have checked, as identity guards (_guards): the
same modules of the same types with the same submodules and no hooks, every BN in eval mode with its eps,
every conv with its geometry, its fold still the recorded one and so its plan for this input; the max
pool's arguments (they set every later input shape). What a fold depends on beyond its tensors' identity
(their memory, version counter, dtype, device and shape) is compared for all layers at once. On the cpp
backend the extension reads both: ResNet-50 at batch 1 on the Xeon, 0.49-0.54 ms in the forward (1,657 guards
and 265 tensors) where the walk and the checks in Python took 1.0 ms. Any other outcome records the
forward again.

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
from .fused import private_activations, private_backend


@dataclass(frozen=True)
class _Program:
    runs: tuple[Callable[..., Tensor], ...]  # per step: run(x, residual, buffers), a plan or the pool
    sources: tuple[tuple[int, int | None], ...]  # per step: its x and residual as step indices, -1 the input
    drops: tuple[tuple[int, ...], ...]  # per step: the values whose last use it is (freed after it)
    # What must still be as recorded, as (kind, obj, name, expected) (see _guards): the modules walked and
    # what each layer's plan depends on, but the fold sources' contents.
    guards: list[tuple]
    roots: tuple  # the owner's submodules, in order (guarded in _valid: a program must not hold its owner)
    guards_hold: Callable[[list[tuple]], bool]  # _guards_hold, or the extension's equivalent
    tensors: tuple[Tensor, ...]  # every fold's source tensors, in order
    states_of: Callable[[Sequence[Tensor]], list | bytes]  # fold.states, or the extension's (as bytes)
    states: list | bytes  # states_of(tensors) when recorded


# On the cpp backend a replay runs as one C++ call from its second time on (see _replay); False keeps it in
# Python (benchmarks/cpu_replay.py compares the two).
COMPILE = True

# Per model: its programs by input shape, dtype, device and backend. Weakly keyed: they die with it.
_PROGRAMS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Program]] = weakref.WeakKeyDictionary()


def run_private(
    owner: nn.Module,
    x: Tensor,
    features: Callable[[Tensor], Tensor],
    walk: Callable[[], Sequence[nn.Module] | None],
) -> Tensor:
    """features(x), for a forward that no autograd graph, trace or compile sees: replayed from the recording
    of an earlier call where that is still valid, else run inside private_activations(owner, x) when `walk`
    gives the modules features runs (in a fixed order; None where one of them could keep an activation, then
    features simply runs)."""
    programs = _PROGRAMS.get(owner)
    if programs:
        key = (x.shape, x.dtype, x.device, private_backend(x))
        program = programs.pop(key, None)
        if program is not None and _valid(program, owner):
            programs[key] = program
            with private_activations(owner, x) as buffers:
                return _replay(program, x, buffers)
    modules = walk()  # the modules' checks, where no valid program held them
    if modules is None:
        return features(x)
    with private_activations(owner, x) as buffers:
        key = (x.shape, x.dtype, x.device, buffers.backend)
        buffers.compiled = None  # a stale program's buffers would all look in use to this forward
        buffers.recording = [] if buffers.backend not in (None, "torch") else None
        out = features(x)
        if buffers.recording:
            program = _build(buffers.recording, x, out, owner, modules, buffers.backend)
            if program is not None:
                _PROGRAMS.setdefault(owner, {})[key] = program
        return out


def _valid(program: _Program, owner: nn.Module) -> bool:
    holds = program.guards_hold
    if not (holds([("values", owner, "_modules", program.roots)]) and holds(program.guards)):
        return False
    try:
        return program.states_of(program.tensors) == program.states
    except RuntimeError:  # a source replaced through .data by an inference tensor
        return False


def _guards(modules: Sequence[nn.Module], folds: list[tuple]) -> list[tuple]:
    """What the walk and each layer checked when the forward was recorded, as identity guards: the same
    walk (no global hook; from the owner's submodules, which _valid guards, every module of the same type,
    without hooks, with the same submodules in the same order), each max pool's arguments (they set every
    later input shape), and per conv + BN layer (conv, bn, its plan's key, the plan): BN's forward, mode
    and eps, the conv's padding mode and geometry, its fold (fold.last) and that fold's plan for the key,
    the fold's source tensors. A value set again, even an equal one, fails its guard: the forward is
    recorded again."""
    module = nn.modules.module
    guards = [
        (kind, module, name, ())
        for kind, name in (("values", "_global_forward_hooks"), ("values", "_global_forward_pre_hooks"))
    ]
    for m in modules:
        guards.append(("type", m, None, type(m)))
        guards += [("values", m, name, tuple(getattr(m, name).values())) for name in _WALKED]
        if isinstance(m, nn.MaxPool2d):
            guards += [("attr", m, name, getattr(m, name)) for name in _POOL_ARGS]
    for conv, bn, key, run in folds:
        guards.append(("attr", type(bn), "forward", type(bn).forward))
        guards += [("attr", bn, name, getattr(bn, name)) for name in ("training", "eps")]
        guards += [("attr", conv, name, getattr(conv, name)) for name in _CONV_ARGS]
        guards += fold.last_guards(conv)
        guards.append(("item", fold.last(conv).runners, key, run))
        guards += fold.source_guards(conv, bn)
    return guards


_WALKED = ("_forward_hooks", "_forward_pre_hooks", "_modules")
_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_CONV_ARGS = ("padding_mode", "stride", "padding", "dilation", "groups")


def _guards_hold(guards: list[tuple]) -> bool:
    """C.guards_hold in Python: whether getattr(obj, name) is expected ("attr"), obj.get(name) is expected
    ("item"), getattr(obj, name)'s values are expected's objects in order ("values"), type(obj) is expected
    ("type")."""
    for kind, obj, name, expected in guards:
        if kind == "type":
            holds = type(obj) is expected
        elif kind == "item":
            holds = obj.get(name) is expected
        else:
            try:
                value = getattr(obj, name)
            except AttributeError:
                return False
            if kind == "attr":
                holds = value is expected
            else:
                values = tuple(value.values())
                holds = len(values) == len(expected) and all(
                    a is b for a, b in zip(values, expected, strict=True)
                )
        if not holds:
            return False
    return True


def _build(
    recording: list[tuple],
    x: Tensor,
    out: Tensor,
    owner: nn.Module,
    modules: Sequence[nn.Module],
    backend: str,
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
            folds.append((conv, bn, key, run))
            tensors.extend(t for t in fold.sources(conv, bn) if t is not None)
    # The cpp backend has the extension loaded: it reads the guards and the tensors' states in C++ (ResNet-50
    # at batch 1: ~0.3 and 0.42 ms of Python per forward); another backend may not have it built.
    C = _ext.load() if backend == "cpp" else None
    states_of = C.tensor_states if C is not None else fold.states
    return _Program(
        tuple(r[0] for r in recording),
        tuple(sources),
        tuple(tuple(d) for d in drops),
        _guards(modules, folds),
        tuple(owner._modules.values()),
        C.guards_hold if C is not None else _guards_hold,
        tuple(tensors),
        states_of,
        states_of(tensors),
    )


def _replay(program: _Program, x: Tensor, buffers) -> Tensor:
    compiled = buffers.compiled
    # Compiled again once a plan that was timing its close paths when captured has chosen one.
    settled = compiled is not None and any(not layer_choice.settling(run) for run in compiled[2])
    if compiled is not None and compiled[0] is program and not settled and COMPILE:
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
                step = {**step, "workspace": buffers.scratch(0, x.device)}
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
