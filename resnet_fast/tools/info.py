"""What is installed and which backends can run here, and why not."""

from __future__ import annotations

import platform
import sys

import torch

from .. import __version__, _ext
from ..ops import backend, conv_route


def info() -> dict:
    """Versions, devices and backend usability, as a dict (printed by `resnet-fast info`)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    module = _ext.load()
    devices = ["cpu"] + [
        f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())
    ]
    return {
        "resnet_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "triton": triton_version,
        "cuda (torch built with)": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "devices": devices,
        "extension": {
            "usable": module is not None,
            "cuda": bool(module is not None and module.with_cuda),
            "cuda why not": "" if module is not None and module.with_cuda else _cuda_sources_why_not(),
            "cpu threads": None
            if module is None
            else (f"{torch.get_num_threads()} (OpenMP)" if module.openmp else "1 (built without OpenMP)"),
            "why not": _ext.reason(),
        },
        "cpp conv route": {
            "cpu float32": conv_route("cpu", torch.float32),
            "cpu bfloat16": conv_route("cpu", torch.bfloat16),
            "cuda": conv_route("cuda", torch.float32),
            "cpu float32 own kernels": _own_kernels(module),
        },
        "cpu bfloat16": _cpu_bf16(),
        "requested backend": backend.get_backend(),
        "backends": backend.status(),
        "auto choice": {dev: backend.backend_for(torch.device(dev)) for dev in ("cpu", "cuda")},
    }


def _own_kernels(module) -> str:
    """Whether float32 CPU layers have our kernels as candidates beside oneDNN."""
    from ..ops import layer_choice

    if module is None:
        return "oneDNN only (resnet_fast._C unavailable)"
    if not module.conv_gemm_supported():
        return "oneDNN only (our GEMM and Winograd kernels need an x86-64 CPU with AVX2 + FMA)"
    return (
        f"oneDNN, the implicit GEMM, or Winograd F(2x2, 3x3) or F(4x4, 3x3) for 3x3 stride-1 layers ({module.conv_gemm_isa()} "
        "micro-kernel; groups 1, output channels a multiple of 16), whichever measured faster per layer shape; "
        f"choices in {layer_choice.cache_file('cpu')}"
        + (
            "; bfloat16: oneDNN or the implicit GEMM on AVX512_BF16"
            + (" or on AMX tiles (channels in multiples of 32)" if module.conv_amx_supported() else "")
            if module.conv_gemm_bf16_supported()
            else ""
        )
    )


def _cpu_bf16() -> str:
    """Whether this CPU multiplies bfloat16 natively or emulates it (converting to float32)."""
    from .timing import cpu_isa

    native = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in cpu_isa()]
    if native:
        return f"native ({', '.join(native)})"
    return "emulated: no AVX512_BF16/AMX here, bfloat16 runs through float32 arithmetic (expect float32 speed or less)"


def _cuda_sources_why_not() -> str:
    """Why the extension holds no CUDA code, and how to rebuild it with."""
    from .. import _build

    home, why = _build.cuda_build_problem()
    if home is None and "FORCE_CUDA" not in why:
        return why
    return (
        f"{why + '; ' if why else ''}rebuild with them: "
        "FORCE_CUDA=1 pip install --no-build-isolation -e . (from the repository)"
    )


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None


def format_info(data: dict) -> str:
    lines = []
    for key, value in data.items():
        if key == "backends":
            lines.append("backends:")
            for name, per_device in value.items():
                for dev, why in per_device.items():
                    lines.append(f"  {name:7s} {dev:5s} {'usable' if not why else 'not usable: ' + why}")
        elif key == "cpp conv route":
            lines.append("cpp conv route:")
            lines += [f"  {where}: {route}" for where, route in value.items()]
        elif key == "extension":
            state = "usable" if value["usable"] else f"not usable: {value['why not']}"
            threads = f"; C++ CPU kernels on {value['cpu threads']} threads" if value["usable"] else ""
            cuda = "yes" if value["cuda"] else f"no: {value['cuda why not']}"
            lines.append(f"extension resnet_fast._C: {state} (CUDA sources: {cuda}{threads})")
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


def print_info(file=sys.stdout) -> None:
    print(format_info(info()), file=file)
