"""The one place that picks a backend for a tensor's device.

Backends, in order of preference on each device:
  cuda: triton, cpp (CUDA part of resnet_fast._C), torch
  cpu:  cpp, torch
`RESNET_FAST_BACKEND=auto|triton|cpp|torch` or set_backend() overrides the choice.
"""

from __future__ import annotations

import functools
import os

import torch

from .. import _ext

BACKENDS = ("triton", "cpp", "torch")
_PREFERENCE = {"cuda": ("triton", "cpp", "torch"), "cpu": ("cpp", "torch")}
_override: str | None = None


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here."""


@functools.cache
def _triton_problem() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error})"
    return ""


def _cpp_problem(device_type: str) -> str:
    module = _ext.load()
    if module is None:
        return f"resnet_fast._C unavailable: {_ext.reason()}"
    if device_type == "cuda" and not module.with_cuda:
        return "resnet_fast._C was built without CUDA sources"
    return ""


def problem(backend: str, device_type: str) -> str:
    """Why `backend` cannot run on `device_type` ('' when it can)."""
    if backend == "torch":
        return ""
    if device_type not in _PREFERENCE:
        return f"resnet_fast has no fused kernels for device type {device_type!r}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if backend == "triton":
        return _triton_problem() if device_type == "cuda" else "Triton kernels run on CUDA tensors only"
    if backend == "cpp":
        return _cpp_problem(device_type)
    raise ValueError(f"unknown backend {backend!r}; expected one of auto, {', '.join(BACKENDS)}")


def _check_name(name: str) -> str:
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of auto, {', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for every fused op; None returns to $RESNET_FAST_BACKEND / 'auto'.

    Raises BackendUnavailable when the backend cannot run on any device here.
    """
    global _override
    if name is None:
        _override = None
        return
    name = _check_name(name)
    if name not in ("auto", "torch"):
        reasons = {dev: problem(name, dev) for dev in _PREFERENCE}
        if all(reasons.values()):
            raise BackendUnavailable(f"backend {name!r} is not usable here: {reasons}")
    _override = name


def get_backend() -> str:
    """The requested backend: set_backend()'s, else $RESNET_FAST_BACKEND, else 'auto'."""
    if _override is not None:
        return _override
    return _check_name(os.environ.get("RESNET_FAST_BACKEND", "auto"))


def backend_for(device: torch.device) -> str:
    """The backend that runs fused ops on tensors of `device`."""
    requested = _override if _override is not None else os.environ.get("RESNET_FAST_BACKEND", "auto")
    # Called for every fused layer: what a request resolves to on a device type does not change
    # within a process (the extension and Triton are loaded once), so resolve it once.
    name = _resolved.get((requested, device.type))
    if name is None:
        name = _resolved[(requested, device.type)] = _resolve(_check_name(requested), device.type)
    return name


_resolved: dict[tuple[str, str], str] = {}


def _resolve(requested: str, device_type: str) -> str:
    if requested == "auto":
        for name in _PREFERENCE.get(device_type, ("torch",)):
            if not problem(name, device_type):
                return name
        return "torch"
    why = problem(requested, device_type)
    if why:
        raise BackendUnavailable(f"backend {requested!r} cannot run on {device_type}: {why}")
    return requested


def status() -> dict[str, dict[str, str]]:
    """{backend: {device_type: '' if usable else why not}} for info()."""
    return {name: {dev: problem(name, dev) for dev in _PREFERENCE} for name in BACKENDS}
