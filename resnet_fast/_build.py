"""How resnet_fast._C is built: shared by setup.py and the first-use (JIT) build.

setup.py loads this file by path, so it must not import the resnet_fast package.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
DEFAULT_ARCH_LIST = "8.0;9.0"


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder, or None.

    torch guesses dirname(dirname(which nvcc)), which is wrong when nvcc on PATH is a
    wrapper or symlink (here /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc), so
    ask nvcc itself where its toolkit is.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and Path(home, "bin", "nvcc").exists():
            return home
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        try:
            dry = subprocess.run(
                [nvcc, "-v", "--dryrun", "x.cu"], capture_output=True, text=True, timeout=60
            ).stderr
            match = re.search(r"^#\$ TOP=(.+)$", dry, re.MULTILINE)
            if match:
                top = Path(match.group(1).strip()).resolve()
                if (top / "bin" / "nvcc").exists():
                    return str(top)
        except (OSError, subprocess.SubprocessError):
            pass
        real = Path(nvcc).resolve().parent.parent
        if (real / "include" / "cuda_runtime.h").exists():
            return str(real)
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    return None


def nvcc_version(cuda_home: str) -> str | None:
    """'13.0' from `nvcc --version`, or None."""
    try:
        out = subprocess.run(
            [str(Path(cuda_home, "bin", "nvcc")), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def cuda_build_problem() -> tuple[str | None, str]:
    """(CUDA_HOME, '') when the CUDA sources can be built with the running torch, else (None, why not)."""
    import torch

    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is not a CUDA build"
    if os.environ.get("RESNET_FAST_SKIP_CUDA") == "1":
        return None, "RESNET_FAST_SKIP_CUDA=1"
    # As torchvision, mmcv and detectron2 do: CUDA sources only where a GPU can run them (they
    # take most of the build time), or when asked (CI compiles them to keep them building).
    if os.environ.get("FORCE_CUDA") != "1" and not torch.cuda.is_available():
        return None, "no CUDA GPU visible (FORCE_CUDA=1 compiles the CUDA sources anyway)"
    home = find_cuda_home()
    if home is None:
        return None, "nvcc not found (set CUDA_HOME to the CUDA toolkit folder)"
    version = nvcc_version(home)
    if version is None:
        return None, f"could not read nvcc's version in {home}"
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return None, f"nvcc {version} ({home}) does not match torch's CUDA {torch.version.cuda}"
    return home, ""


def nvidia_pip_dirs(kind: str) -> list[str]:
    """include/ or lib/ folders of the nvidia-* wheels torch depends on (cublas_v2.h, cusparse.h live there)."""
    dirs: list[str] = []
    for site in sys.path:
        for pattern in (f"nvidia/*/{kind}", f"nvidia/{kind}"):
            dirs += [d for d in glob.glob(os.path.join(site, pattern)) if os.path.isdir(d)]
    return sorted(set(dirs))


def sources(with_cuda: bool) -> list[str]:
    files = [CSRC / "api.cpp", *sorted((CSRC / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((CSRC / "cuda").glob("*.cu"))
    return [str(f) for f in files]


def prepare_env(cuda_home: str | None) -> None:
    """Environment that torch.utils.cpp_extension reads: set before it is imported."""
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    if "MAX_JOBS" not in os.environ:
        # One compile job can take ~2 GiB; don't let ninja run the machine out of memory.
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gib // 2))))


def extension_kwargs(with_cuda: bool) -> dict:
    """Arguments shared by CppExtension/CUDAExtension and cpp_extension.load."""
    cxx = ["-O3", *openmp_flags()]  # the C++ standard is chosen by torch.utils.cpp_extension
    nvcc = ["-O3", "--expt-relaxed-constexpr"]
    if with_cuda:
        cxx.append("-DWITH_CUDA")
        nvcc.append("-DWITH_CUDA")
    return {
        "include_dirs": [str(CSRC / "include"), *nvidia_pip_dirs("include")],
        "library_dirs": nvidia_pip_dirs("lib"),
        "extra_compile_args": {"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        "extra_link_args": openmp_flags(),
    }


def openmp_flags() -> list[str]:
    """-fopenmp where torch's at::parallel_for runs on OpenMP: its inline code parallelises only when
    the including file is compiled with OpenMP, so without the flag every C++ kernel runs on one
    thread. The runtime linked is the one torch already loaded (same soname, libgomp.so.1)."""
    import torch

    if not torch._C.has_openmp or sys.platform != "linux":
        return []
    return ["-fopenmp"]
