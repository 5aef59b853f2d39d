"""Activation buffers kept from one forward to the next.

A fresh tensor per layer output costs its pages' first touch on every forward (for ResNet-50 at batch
8 on CPU, ~26,000 minor page faults and ~0.1 s of system time per forward); onnxruntime and OpenVINO
plan their activations into an arena instead. A Buffers object is that arena for one forward at a
time: a layer whose kernel can write where it is told takes its output from here, a buffer that no one
references any more (its last reader is done), or a new one the first time.
"""

from __future__ import annotations

import contextvars
import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["Buffers", "current", "keep_freed_memory", "using"]


# glibc's mallopt parameters. mmap: the most glibc accepts (and the ceiling of its own dynamic
# threshold) on 64-bit systems; larger blocks are still mapped afresh. Trim: glibc returns the whole free
# heap top to the system once it exceeds this, not only the excess, so it must hold a forward's freed
# outputs together with what was free before (64 MiB, glibc's own dynamic ceiling, did not always).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_TRIM_BYTES, _MMAP_BYTES = 1 << 30, 32 << 20
_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for the next forward instead of returning it to the system
    (once per process; False where the C library is not glibc). oneDNN's convolutions, which torch
    gives fresh outputs, are the layers that cannot write into our Buffers: between two forwards glibc
    trimmed their freed outputs from the heap, so each forward faulted them in again (bf16 ResNet-50,
    batch 8: ~6,500 minor faults and ~15 ms of system time per forward; none with these settings, on a
    Xeon with AMX). Blocks up to 32 MiB come from the heap, and up to 1 GiB of free heap top is kept
    for reuse, as onnxruntime's and OpenVINO's arenas keep their peak."""
    global _kept
    if _kept is None:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            _kept = False
        else:
            _kept = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES)) and bool(
                mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES)
            )
    return _kept


def _in_use(views: dict[tuple, Tensor]) -> bool:
    """Whether anything outside `views` (every tensor made so far on one block of memory) holds it: one of
    them, or another tensor on the memory (a slice, a tensor built on it)."""
    # Counted per view: the dict's reference, the loop variable and getrefcount's argument; per storage:
    # each view's and the Python storage object made here for the question.
    for t in views.values():
        if sys.getrefcount(t) > 3:
            return True
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) > len(views) + 1


class Buffers:
    """Output buffers (channels_last, pooled by size and dtype) and one scratch tensor, for one forward at a
    time (a model keeps one per concurrent forward). Everything is dropped when a forward starts with
    another input shape, dtype or device, so a changed input never keeps the old plan's memory."""

    def __init__(self) -> None:
        # By (size, dtype, device): per block of memory, its channels_last views by shape.
        self._pool: dict[tuple, list[dict[tuple, Tensor]]] = {}
        self._scratch: Tensor | None = None
        self._input: tuple = ()
        # The backend this forward's fused layers run on, resolved once when it starts (None: let each
        # layer resolve it, e.g. under autocast).
        self.backend: str | None = None
        # While a forward is recorded for replay (nn.replay): per step, (plan, its input's, residual's
        # and output's data pointers, the layer); None when not recording or when a step could not be.
        self.recording: list[tuple] | None = None
        # While nn.replay captures a replay: per kernel call, its C.Program.add arguments (ops.conv's
        # _describe). compiled: the replay's (program, C.Program, its steps' plans still being settled) on
        # this Buffers' memory, dropped with it.
        self.captured: list[dict] | None = None
        self.compiled: tuple | None = None

    def start(self, x: Tensor, backend: str | None = None) -> None:
        """A forward with input x begins, its fused layers on `backend`."""
        self.backend = backend
        key = (x.shape, x.dtype, x.device)
        if key != self._input:
            self._pool.clear()
            self._scratch = None
            self.compiled = None
            self._input = key

    def record(self, run, x: Tensor, residual: Tensor | None, out: Tensor, layer: tuple | None) -> None:
        """A step of a recorded forward: run(x, residual, buffers) gave out (layer: (conv, bn, plan key))."""
        if self.recording is not None:
            ptr = None if residual is None else residual.data_ptr()
            self.recording.append((run, x.data_ptr(), ptr, out.data_ptr(), layer))

    def unrecordable(self) -> None:
        """This forward took a step that cannot be replayed: no recording of it."""
        self.recording = None

    def output(self, shape: list[int], like: Tensor) -> Tensor:
        """A channels_last tensor of this shape with like's dtype and device that no one else references.

        Buffers are pooled by size, not shape: in ResNet-50 every stage's widest output has the size of the
        stem's (64x112x112 = 256x56x56), its narrow ones of the next stage's wide ones, so a size is reused
        across stages (ResNet-50, batch 8: a first forward's activations first touched 148 -> 105 MB)."""
        if len(shape) != 4:
            raise ValueError(f"Buffers.output: expected a 4-D shape, got {list(shape)}")
        n, c, h, w = shape
        pool = self._pool.setdefault((n * c * h * w, like.dtype, like.device), [])
        key = tuple(shape)
        for views in pool:
            if not _in_use(views):
                break
        else:
            views = {}
            pool.append(views)
            t = views[key] = torch.empty(
                shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last
            )
            return t
        t = views.get(key)
        if t is None:  # kept: making one per call cost ~3 us
            # On the block's storage, not a view of another tensor (a view would hold its base, which
            # would then never look free).
            memory = next(iter(views.values())).untyped_storage()
            t = views[key] = like.new_empty(0).set_(memory, 0, shape, (h * w * c, 1, w * c, c))
        return t

    def scratch(self, numel: int, device: torch.device) -> Tensor:
        """A 1-D float32 tensor of at least numel elements for a kernel's temporaries (valid until the next
        call): Winograd's, in float32 for either dtype."""
        if self._scratch is None or self._scratch.numel() < numel or self._scratch.device != device:
            self._scratch = torch.empty(numel, dtype=torch.float32, device=device)
        return self._scratch

    def nbytes(self) -> int:
        """Memory held, in bytes."""
        held = sum(next(iter(views.values())).nbytes for pool in self._pool.values() for views in pool)
        return held + (self._scratch.nbytes if self._scratch is not None else 0)


# The Buffers of the forward running in this thread, set by a model's forward (nn.fused's
# private_activations) only where no one outside it can see its activations. A contextvar: per thread,
# so concurrent forwards of one model do not see each other's.
_CURRENT: contextvars.ContextVar[Buffers | None] = contextvars.ContextVar("resnet_fast_buffers", default=None)


def current() -> Buffers | None:
    """The running forward's Buffers, or None outside a forward whose activations are private."""
    # A compiled graph never runs inside a private forward, and dynamo (torch 2.11) cannot trace
    # ContextVar.get: answer before it has to.
    if torch.compiler.is_compiling():
        return None
    return _CURRENT.get()


@contextmanager
def using(buffers: Buffers) -> Iterator[None]:
    token = _CURRENT.set(buffers)
    try:
        yield
    finally:
        _CURRENT.reset(token)
