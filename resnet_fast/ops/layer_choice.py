"""Per conv shape on CUDA: Triton implicit-GEMM conv with fused epilogue, or cuDNN conv followed
by the Triton epilogue, whichever measured faster. Measured once per shape and GPU, kept in
memory and on disk, so a fused model is never slower than cuDNN layer by layer.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PATHS = ("triton", "cudnn")


@dataclass(frozen=True)
class Choice:
    path: str  # "triton" or "cudnn"
    triton_ms: float | None
    cudnn_ms: float | None


def conv_key(
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    dtype: torch.dtype,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    has_residual: bool,
) -> str:
    """What decides a conv's speed: shapes, dtype, geometry, epilogue (ReLU costs nothing)."""
    return (
        f"x{list(x_shape)} w{list(w_shape)} {str(dtype).removeprefix('torch.')} s{list(stride)} "
        f"p{list(padding)} d{list(dilation)} g{groups} res{int(has_residual)} tf32{int(_tf32())}"
    )


def _tf32() -> bool:
    return bool(torch.backends.cudnn.allow_tf32)


def cache_file() -> Path:
    root = Path(os.environ.get("RESNET_FAST_CACHE", Path.home() / ".cache" / "resnet_fast"))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "nogpu"
    slug = "".join(ch if ch.isalnum() else "_" for ch in gpu)
    return root / f"layer_choice-{slug}-torch{torch.__version__.split('+')[0]}.json"


class ChoiceCache:
    """Measured choices by conv key, loaded from and saved to one JSON file."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._choices: dict[str, Choice] | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path or cache_file()

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


def cuda_timer(fn: Callable[[], object], rounds: int = 10) -> float:
    """Median milliseconds of fn() on the current CUDA stream."""
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(
    run: dict[str, Callable[[], object]], timer: Callable[[Callable[[], object], int], float] | None = None
) -> Choice:
    """Time each path (after a warm-up call that also autotunes Triton), rounds interleaved."""
    timer = timer or cuda_timer
    for fn in run.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in run}
    for _ in range(5):
        for name, fn in run.items():
            samples[name].append(timer(fn, 3))
    ms = {name: statistics.median(values) for name, values in samples.items()}
    # Ties go to cuDNN: the promise is "never slower than cuDNN".
    path = "triton" if ms["triton"] < ms["cudnn"] else "cudnn"
    return Choice(path, ms["triton"], ms["cudnn"])


def choose(key: str, run: dict[str, Callable[[], object]], cache: ChoiceCache | None = None) -> str:
    """The path for this conv: cached, else measured now, else (during CUDA graph capture,
    where nothing can be timed) cuDNN without caching."""
    cache = cache or CACHE
    known = cache.get(key)
    if known is not None:
        return known.path
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "cudnn"
    choice = measure(run)
    cache.put(key, choice)
    return choice.path
