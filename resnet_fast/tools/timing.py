"""The measurement harness shared by `resnet-fast bench`, `resnet-fast validate` and benchmarks/:
argument checks, interleaved timing with medians, peak memory, and a description of the machine.

Timing method: every contender runs in the same process; a round calls each contender once, in an
order rotated from round to round (so none always runs right after another's cache-trashing call);
the figure is the median over rounds. GPU work is synchronized before each clock read. Comparisons
against other libraries on the CPU time each call right after an untimed call of the same contender
(`after_itself`): onnxruntime's worker threads spin on after a run (5 ticks = 50 ms of CPU time in the
0.5 s after one ResNet-50 batch-8 run, none after ours; Zen 3, 2 cores), which slowed the forward that
came next by 9% — a cost a server running one engine never pays. That spin outlasts a batch-1 call, so
such comparisons also leave the machine idle for a moment (`settle`) before each contender's calls: on
the Zen 4, onnxruntime's workers used 40-50 ms of CPU in the 0.05-0.1 s after a batch-1 run, and our
batch-1 forward, timed after itself between onnxruntime's and OpenVINO's, took 60.8 ms against 46.9-51.2
ms alone in the same process (onnxruntime 52.9 against 49.9; an ad hoc measurement, 2026-12-02).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit status 2."""


# --- argument checks (one place for bench and validate) ---------------------------------------


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--arch, --device, --dtype, --backend: shared by `bench` and `validate`."""
    p.add_argument(
        "--arch", default="resnet50", help="a resnet_fast / torchvision builder name (default resnet50)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)} (default float32)")
    p.add_argument("--backend", default="auto", help="resnet_fast backend: auto, triton, cpp or torch")


def check_arch(arch: str) -> Callable[..., torch.nn.Module]:
    """The resnet_fast builder for `arch`; torchvision has a builder of the same name."""
    from ..models import BUILDERS

    if arch not in BUILDERS:
        raise UsageError(f"unknown arch {arch!r}; expected one of {', '.join(BUILDERS)}")
    return BUILDERS[arch]


def check_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype, or a UsageError saying why they cannot run here."""
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    try:
        dev = torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"unknown device {device!r} ({error})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA GPU is available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise UsageError(f"--dtype bfloat16: {torch.cuda.get_device_name(dev)} has no bfloat16 support")
    elif dev.type == "cpu":
        # PyTorch's CPU float16 convolutions fall back to a slow path on most CPUs (about 8x slower
        # than float32 on this project's AMD EPYC): measuring or validating them says nothing useful.
        if dtype == "float16":
            raise UsageError("--dtype float16 is not supported on CPU (slow reference path); use bfloat16")
    else:
        raise UsageError(f"unsupported device {device!r}; expected cpu or cuda[:N]")
    return dev, DTYPES[dtype]


def set_backend_for(backend: str, device: torch.device) -> str:
    """Apply --backend for resnet_fast and return the backend that will run on `device`."""
    from ..ops import backend as _backend

    try:
        _backend.set_backend(None if backend == "auto" else backend)
        return _backend.backend_for(device)
    except (ValueError, _backend.BackendUnavailable) as error:
        raise UsageError(f"--backend {backend}: {error}") from None


def fused_ops() -> list[str]:
    """The fused ops resnet_fast.ops offers today (they grow as backends land)."""
    from .. import ops

    return [
        name
        for name in ("add_relu", "conv_bias_act", "scale_shift_act", "bn_act_train")
        if hasattr(ops, name)
    ]


# --- timing -------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of fn takes, GPU work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def settle(fn: Callable[[], object], limit: int = 40) -> int:
    """Calls fn until a call runs no layer plan still timing its close paths (resnet_fast's CPU plans
    settle a close call in the model's first forwards: layer_choice.settle_in_model), at most `limit`
    times; returns the calls. Other contenders' fn is called once."""
    from ..ops import layer_choice

    calls = 1
    while layer_choice.runs_unsettled(fn) and calls < limit:
        calls += 1
    return calls


def interleaved(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    device: torch.device,
    on_call: Callable[[str], None] | None = None,
    after_itself: bool = False,
    settle: float = 0.0,
) -> dict[str, list[float]]:
    """Seconds per call of each fn over `rounds` rounds; each round calls every fn once, order rotated.
    With `after_itself`, each timed call follows an untimed call of the same fn; with `settle`, each
    contender's turn starts after that many idle seconds (see the module docstring)."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if settle:
                time.sleep(settle)
            if after_itself:
                fns[name]()
            times[name].append(timed(fns[name], device))
            if on_call is not None:
                on_call(name)
    return times


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median and quartiles in milliseconds (quartiles show the spread the median hides)."""
    ms = sorted(s * 1e3 for s in seconds)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {"median_ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3, "min_ms": ms[0], "rounds": len(ms)}


# --- peak memory --------------------------------------------------------------------------------

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() during one call, minus the memory allocated before it",
    "cpu": (
        "torch.profiler(profile_memory=True): peak of the bytes allocated through PyTorch's CPU allocator "
        "during one call, minus those held before it (tensors and oneDNN/Inductor buffers; not memory that "
        "other libraries allocate themselves)"
    ),
}


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Kineto prints start/stop lines on fd 2 for every profile; keep the bench table readable."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes one call of fn needs above what is allocated before it (activations, workspace,
    gradients; weights that persist across calls are not counted). See MEMORY_METHOD."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)

    from torch.profiler import ProfilerActivity, profile, record_function

    # Two calls, and only the second counts: frees of blocks allocated before profiling started
    # have no known size, while every block the second call frees was seen being allocated.
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        with record_function("resnet_fast.measured_call"):
            fn()
    events = list(prof.profiler.kineto_results.events())
    span = next(e for e in events if e.name() == "resnet_fast.measured_call")
    start, end = span.start_ns(), span.start_ns() + span.duration_ns()
    held = peak = 0
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if event.start_ns() < start:
            continue
        if event.start_ns() > end:
            break
        held += event.nbytes()
        peak = max(peak, held)
    return peak


# --- the machine --------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction sets that decide which CPU kernels run (oneDNN, MLAS, OpenVINO pick by these).
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_isa() -> list[str]:
    """The CPU's vector instruction sets among _ISA_FLAGS (Linux: /proc/cpuinfo), else []."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in _ISA_FLAGS if flag in flags]


def machine_info(device: torch.device | None = None) -> dict:
    """The machine, versions and backend status, for result files."""
    from .. import __version__
    from ..ops import backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "triton": triton_version,
        "resnet_fast": __version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "backends": backend.status(),
        "fused_ops": fused_ops(),
    }
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["tf32_conv"] = bool(torch.backends.cudnn.allow_tf32)
        info["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return info


def machine_tag(info: dict, device: torch.device) -> str:
    """A file-name-safe name for the machine a result belongs to, e.g. 'nvidia-h100-80gb-hbm3' or
    'amd-epyc-2c'."""
    name = info.get("gpu") if device.type == "cuda" else f"{info['cpu']} {info['cpu_cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-") or "unknown"


def describe_machine(info: dict, device: torch.device) -> str:
    if device.type == "cuda":
        return f"{info.get('gpu')} (CUDA {info['cuda']}), host CPU {info['cpu']}"
    return f"{info['cpu']}, {info['cpu_cores']} cores ({info['torch_threads']} torch threads)"


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None
