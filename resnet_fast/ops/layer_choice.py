"""Per conv shape, the fastest of a layer's candidate paths, measured once per shape (batch bucketed)
and machine, kept in memory and on disk, so a fused model is never slower than the library kernel
layer by layer. On CUDA: Triton implicit-GEMM conv with fused epilogue, or cuDNN conv followed by the
Triton epilogue. On CPU: oneDNN's fused convolution, or resnet_fast's own kernel where one runs the
shape (implicit GEMM, Winograd F(2x2, 3x3) and F(4x4, 3x3)). Ties go to the library kernel (cuDNN, oneDNN).

Timing on CUDA: each sample is one CUDA event pair around LAUNCHES back-to-back calls (one call per pair would
measure the host's launch latency, tens of us, not the GPU's work), rounds interleave the paths, the
medians decide. Nothing is timed or tuned during CUDA graph capture (it would synchronize and break the
capture): there, a key takes cuDNN unless its chosen path already ran (so was tuned and compiled) in
this process, and nothing is cached.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

LIBRARY_PATH = {"cuda": "cudnn", "cpu": "onednn"}  # the path a tie goes to, per device type


@dataclass(frozen=True)
class Choice:
    path: str  # on CUDA "triton" or "cudnn"; on CPU "onednn", "gemm", "gemm_rows", "amx", "amx_rows",
    # "winograd" or "winograd4"
    ms: dict[str, float]  # median milliseconds per call of every path measured
    # CPU close calls: median milliseconds of the close paths as they ran in a model's forwards, which
    # decided `path` (see settle_in_model); None until then, and for the other keys.
    in_model: dict[str, float] | None = None


LAUNCHES = 10  # calls per event pair
ROUNDS = 5  # samples per path, interleaved
# On CPU a ResNet layer takes 0.1-30 ms and a model's first call measures every new shape: one call
# per sample and fewer rounds keep that call near a second or two.
CPU_CALLS = 1
CPU_ROUNDS = 3
# A path 1.15x faster than the others in the first round is kept without the other rounds (a model's
# first call measures every new shape; each sample starts from cold weights, so one is steady); close
# calls still get the median of three.
CPU_DECISIVE = 1.15


# Close calls (no path CPU_DECISIVE times faster than another alone) are settled in the model's own
# forwards: this many calls of each close path there, after one untimed call each. Off (False, or
# RESNET_FAST_SETTLE=0) for outputs that never change from one call to the next: a settled close call
# switches path once, and paths differ in the last bits.
CPU_SETTLE_CALLS = 3
SETTLE_IN_MODEL = os.environ.get("RESNET_FAST_SETTLE", "1") != "0"


def batch_bucket(n: int) -> int:
    """The batch size as the key sees it: the next power of two, so nearby batch sizes share a choice."""
    return 1 << max(0, n - 1).bit_length()


def conv_key(
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    dtype: torch.dtype,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    has_residual: bool,
    device_type: str = "cuda",
) -> str:
    """What decides a conv's speed: shapes (batch bucketed), dtype, geometry, epilogue (ReLU costs nothing),
    and TF32 on CUDA, the thread count on CPU."""
    x_shape = (batch_bucket(x_shape[0]), *x_shape[1:])
    machine = f"tf32{int(_tf32())}" if device_type == "cuda" else f"threads{torch.get_num_threads()}"
    return (
        f"x{list(x_shape)} w{list(w_shape)} {str(dtype).removeprefix('torch.')} s{list(stride)} "
        f"p{list(padding)} d{list(dilation)} g{groups} res{int(has_residual)} {machine}"
    )


def _tf32() -> bool:
    from ..kernels.triton.conv import allow_tf32  # the flag the Triton conv follows

    return allow_tf32()


def cpu_name() -> str:
    """The CPU model, precise enough to tell its generations apart (two AMD EPYC generations both call
    themselves "AMD EPYC"): the model name with its family and model numbers."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break  # the first processor's block is enough
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    return f"{fields.get('model name', '?')} family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"


# Revision of our own kernels (csrc/cpu, kernels/): part of the cache file's name, raised whenever a
# kernel's speed changes or a candidate is added, so choices measured against an older one are measured
# again (11: Winograd F(2x2, 3x3) in bfloat16).
KERNELS_REVISION = 11


def cache_file(device_type: str = "cuda") -> Path:
    root = Path(os.environ.get("RESNET_FAST_CACHE", Path.home() / ".cache" / "resnet_fast"))
    if device_type == "cpu":
        name = "cpu-" + cpu_name()
    else:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "nogpu"
    slug = "".join(ch if ch.isalnum() else "_" for ch in name)
    return root / f"layer_choice-{slug}-torch{torch.__version__.split('+')[0]}-k{KERNELS_REVISION}.json"


class ChoiceCache:
    """Measured choices by conv key, loaded from and saved to one JSON file (one per device type)."""

    def __init__(self, path: Path | None = None, device_type: str = "cuda") -> None:
        self._path = path
        self._device_type = device_type
        self._choices: dict[str, Choice] | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path or cache_file(self._device_type)

    def _load(self) -> dict[str, Choice]:
        if self._choices is None:
            try:
                raw = json.loads(self.path.read_text())
                self._choices = {k: Choice(**v) for k, v in raw.items()}
            except (OSError, ValueError, TypeError):
                self._choices = {}  # no file yet, or an unreadable one: measure again
        return self._choices

    def get(self, key: str) -> Choice | None:
        return self._load().get(key)

    def put(self, key: str, choice: Choice) -> None:
        with self._lock:
            choices = self._load()
            choices[key] = choice
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({k: asdict(v) for k, v in choices.items()}, indent=1))
                tmp.replace(self.path)
            except OSError:
                pass  # a read-only home still works, it just measures again next process

    def items(self) -> list[tuple[str, Choice]]:
        return list(self._load().items())


CACHE = ChoiceCache()
CPU_CACHE = ChoiceCache(device_type="cpu")


def cuda_timer(fn: Callable[[], object], launches: int = LAUNCHES) -> float:
    """Milliseconds per call of fn(), from one CUDA event pair around `launches` back-to-back calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(launches):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / launches


def cpu_timer(fn: Callable[[], object], calls: int = CPU_CALLS) -> float:
    """Milliseconds per call of fn() on CPU, from perf_counter around `calls` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) * 1e3 / calls


def measure(
    run: dict[str, Callable[[], object]],
    timer: Callable[[Callable[[], object]], float] | None = None,
    library: str = LIBRARY_PATH["cuda"],
    rounds: int = ROUNDS,
    decisive: float | None = None,
    before: Callable[[str], object] | None = None,
) -> Choice:
    """Time each path (after a warm-up call that also autotunes Triton): ROUNDS samples per path, the
    rounds interleaved so that clock and thermal drift hit every path alike; medians decide, and ties
    go to the `library` path (the promise is "never slower than the library"). With `decisive`, the
    rounds stop early once one path's median is that many times faster than every other's. `before`,
    where given, runs untimed before each sample, given the path's name."""
    timer = timer or cuda_timer
    for fn in run.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in run}
    for _ in range(rounds):
        for name, fn in run.items():
            if before is not None:
                before(name)
            samples[name].append(timer(fn))
        ms = {name: statistics.median(values) for name, values in samples.items()}
        path = min(ms, key=lambda name: (ms[name], name != library))
        if decisive is not None and all(ms[path] * decisive <= v for n, v in ms.items() if n != path):
            break
    return Choice(path, ms)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# Keys whose chosen path ran outside capture in this process: tuned, compiled, safe to replay in a graph.
_RAN: set[str] = set()


def choose(key: str, run: dict[str, Callable[[], object]], cache: ChoiceCache | None = None) -> str:
    """The path for this CUDA conv: cached, else measured now. During CUDA graph capture, the cached path
    only if it already ran in this process (a "triton" choice read from disk would otherwise send the
    capture into an untuned autotuner), else cuDNN; nothing is measured or cached there."""
    cache = cache or CACHE
    known = cache.get(key)
    if _capturing():
        return known.path if known is not None and key in _RAN else "cudnn"
    if known is None:
        known = measure(run)
        cache.put(key, known)
    _RAN.add(key)  # the caller runs the path now (measure ran both)
    return known.path


def choose_cpu(
    key: str,
    run: dict[str, Callable[[], object]],
    cache: ChoiceCache | None = None,
    before: Callable[[str], object] | None = None,
) -> str:
    """The path for this CPU conv: cached (per CPU model and torch version), else measured now, with
    `before(path)` run untimed before each sample. A key with one candidate takes it unmeasured."""
    if len(run) == 1:
        return next(iter(run))
    cache = cache or CPU_CACHE
    path = known_cpu(key, run, cache)
    if path is None:
        known = measure(run, cpu_timer, LIBRARY_PATH["cpu"], CPU_ROUNDS, CPU_DECISIVE, before)
        cache.put(key, known)
        path = known.path
    return path


def known_cpu(key: str, paths: Iterable[str], cache: ChoiceCache | None = None) -> str | None:
    """The cached path for this CPU conv if it was measured among exactly these paths, else None
    (choose_cpu would measure them)."""
    known = (cache or CPU_CACHE).get(key)
    return known.path if known is not None and set(known.ms) == set(paths) else None


# Plans made by settle_in_model still timing their paths, and those of them that ran since
# runs_unsettled began (weakly held: a dropped plan leaves).
_SETTLING: weakref.WeakSet = weakref.WeakSet()
_TRIED: weakref.WeakSet = weakref.WeakSet()


def runs_unsettled(fn: Callable[[], object]) -> bool:
    """Calls fn(); whether it ran a layer plan that is still timing its close paths after it. Benchmarks
    warm up until it does not, so that no timed call runs a path on trial."""
    _TRIED.clear()
    fn()
    return any(run in _SETTLING for run in _TRIED)


def settling(run: Callable[..., object]) -> bool:
    """Whether `run` is a plan of settle_in_model still timing its paths (each call may run another)."""
    return run in _SETTLING


def rivals_cpu(key: str, path: str, cache: ChoiceCache | None = None) -> list[str]:
    """The paths that measured within CPU_DECISIVE of `path` (the choice for `key`) alone and have not
    been settled in a model yet: [] for a decisive or settled choice, or with SETTLE_IN_MODEL off."""
    known = (cache or CPU_CACHE).get(key)
    if not SETTLE_IN_MODEL or known is None or known.in_model is not None or path not in known.ms:
        return []
    return [p for p, ms in known.ms.items() if p != path and ms < known.ms[path] * CPU_DECISIVE]


def settle_in_model(
    key: str,
    runs: dict[str, Callable[..., object]],
    cache: ChoiceCache | None = None,
    on_settled: Callable[[str], object] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Callable[..., object]:
    """A layer's plan for a close call between `runs` (path -> run(*args), the measured choice first):
    each call runs the next path in turn, timed, until every path has CPU_SETTLE_CALLS timed calls after
    an untimed one; then the fastest median (ties to the library) runs from there on, and the cache
    records it with those medians. Alone each sample starts from cold weights with the caches empty of
    anything else; in a forward the other layers fill them, and with a last-level cache about the size
    of the model's weights that can reverse a close call (ResNet-50's 7x7, 512-channel 3x3 layers at
    batch 1 on the Xeon: Winograd 1.6-1.7 ms against the GEMM's 1.74-1.9 alone, 2.2-2.5 against
    1.75-1.8 in the model)."""
    cache = cache or CPU_CACHE
    runs = dict(runs)
    order = list(runs)
    samples: dict[str, list[float]] = {p: [] for p in order}
    calls = [0]
    settled: list[Callable[..., object]] = []

    def run(*args):
        if settled:
            return settled[0](*args)
        _TRIED.add(run)
        name = order[calls[0] % len(order)]
        timed = calls[0] >= len(order)  # the first call of each path is untimed
        calls[0] += 1
        path_run = runs.get(name)
        if path_run is None:  # another thread's call settled it meanwhile
            return settled[0](*args)
        start = clock()
        out = path_run(*args)
        if timed:
            samples[name].append((clock() - start) * 1e3)
        if not settled and all(len(v) >= CPU_SETTLE_CALLS for v in samples.values()):
            ms = {p: statistics.median(v) for p, v in samples.items()}
            path = min(ms, key=lambda p: (ms[p], p != LIBRARY_PATH["cpu"]))
            settled.append(runs[path])
            run.__name__ = path
            for p in order:  # the other paths' plans, and the packed weights they hold, go
                if p != path:
                    runs.pop(p, None)
            _SETTLING.discard(run)
            known = cache.get(key)
            if known is not None:
                cache.put(key, replace(known, path=path, in_model=ms))
            if on_settled is not None:
                on_settled(path)
        return out

    run.__name__ = order[0]
    _SETTLING.add(run)
    return run
