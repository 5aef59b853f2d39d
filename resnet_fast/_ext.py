"""Loading resnet_fast._C: the installed build, else a one-time build into a cache.

Never raises: a missing compiler or a failed build leaves the other backends working and
records why (shown by `resnet-fast info`).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from . import _build

_module: ModuleType | None = None
_reason: str | None = None  # None until load() ran


def _cache_dir(with_cuda: bool) -> Path:
    digest = hashlib.sha256()
    for src in [*_build.sources(with_cuda), str(_build.CSRC / "include" / "resnet_fast.h")]:
        digest.update(Path(src).read_bytes())
    root = Path(os.environ.get("RESNET_FAST_CACHE", Path.home() / ".cache" / "resnet_fast"))
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    return root / "ext" / f"{tag}-{'cuda' if with_cuda else 'cpu'}-{digest.hexdigest()[:12]}"


def _jit_build() -> ModuleType:
    if not _build.CSRC.is_dir():
        raise RuntimeError(f"C++ sources not found at {_build.CSRC}")
    cuda_home, _ = _build.cuda_build_problem()  # None without a GPU unless FORCE_CUDA=1
    # CUDA_HOME set even for a CPU build: torch's own guess from PATH is wrong here and warns.
    _build.prepare_env(cuda_home or _build.find_cuda_home())
    from torch.utils import cpp_extension

    with_cuda = cuda_home is not None
    build_dir = _cache_dir(with_cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    fresh = not any(build_dir.glob("*.so"))
    if fresh:
        print(
            f"resnet_fast: building the C++ extension ({'CPU+CUDA' if with_cuda else 'CPU'}) once for "
            f"torch {torch.__version__} into {build_dir}; this takes about "
            f"{'5' if with_cuda else '1'} minute(s)...",
            file=sys.stderr,
            flush=True,
        )
    start = time.perf_counter()
    kwargs = _build.extension_kwargs(with_cuda)
    flags = kwargs["extra_compile_args"]
    module = cpp_extension.load(
        name="resnet_fast_C",
        sources=_build.sources(with_cuda),
        extra_include_paths=kwargs["include_dirs"],
        extra_cflags=flags["cxx"],
        extra_cuda_cflags=flags.get("nvcc"),
        extra_ldflags=[f"-L{d}" for d in kwargs["library_dirs"]] + kwargs["extra_link_args"],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        verbose=False,
    )
    if fresh:
        print(f"resnet_fast: extension built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return module


def load() -> ModuleType | None:
    """resnet_fast._C, or None (see reason())."""
    global _module, _reason
    if _reason is not None:
        return _module
    if os.environ.get("RESNET_FAST_SKIP_EXT") == "1":
        _reason = "disabled by RESNET_FAST_SKIP_EXT=1"
        return None
    try:
        from . import _C  # built by `pip install --no-build-isolation -e .`

        if _C.torch_version != torch.__version__.split("+")[0]:
            raise ImportError(f"built for torch {_C.torch_version}")
        _module, _reason = _C, ""
    except ImportError as installed_error:
        if os.environ.get("RESNET_FAST_NO_JIT") == "1":
            _reason = f"resnet_fast._C not importable ({installed_error}) and RESNET_FAST_NO_JIT=1"
            return None
        try:
            _module, _reason = _jit_build(), ""
        except Exception as error:  # a build failure must not break the package
            lines = str(error).strip().splitlines()
            _reason = f"build failed: {' | '.join(lines[-3:]) if lines else type(error).__name__}"
            print(f"resnet_fast: C++ extension unavailable ({_reason})", file=sys.stderr)
    return _module


def reason() -> str:
    """Why the extension is not usable ('' when it is)."""
    load()
    return _reason or ""
