"""Builds resnet_fast._C when torch is importable at build time.

`pip install -e .` with build isolation has no torch here: the package then installs as pure
Python and resnet_fast._C is built on first use (resnet_fast/_ext.py). With
`--no-build-isolation` (the README's command) the extension is built now.
Switches: RESNET_FAST_SKIP_EXT=1 (no extension), RESNET_FAST_SKIP_CUDA=1 (CPU sources only),
TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS, CUDA_HOME.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup


def _load_build_helpers():
    spec = importlib.util.spec_from_file_location(
        "_rf_build", Path(__file__).parent / "resnet_fast" / "_build.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions() -> dict:
    if os.environ.get("RESNET_FAST_SKIP_EXT") == "1":
        print("resnet_fast: RESNET_FAST_SKIP_EXT=1, installing without the C++ extension", file=sys.stderr)
        return {}
    try:
        import torch  # noqa: F401
    except ImportError:
        print(
            "resnet_fast: torch is not importable in the build environment; "
            "resnet_fast._C will be built on first use",
            file=sys.stderr,
        )
        return {}
    build = _load_build_helpers()
    cuda_home, why_not = build.cuda_build_problem()
    build.prepare_env(cuda_home)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = cuda_home is not None
    print(f"resnet_fast: building _C with CUDA: {with_cuda} {why_not}", file=sys.stderr)
    ext_class = CUDAExtension if with_cuda else CppExtension
    # setuptools wants source paths relative to setup.py.
    sources = [os.path.relpath(src, Path(__file__).parent) for src in build.sources(with_cuda)]
    ext = ext_class("resnet_fast._C", sources, **build.extension_kwargs(with_cuda))
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_extensions())
