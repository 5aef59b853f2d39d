"""resnet_fast._C: it builds (CPU and, with nvcc, CUDA sources), its op matches torch, and the
package works without it."""

import json
import os
import subprocess
import sys

import pytest
import torch
from _utils import record_conv_calls

import resnet_fast
from resnet_fast import _ext, ops

_C = _ext.load()
needs_ext = pytest.mark.skipif(_C is None, reason=f"resnet_fast._C unavailable: {_ext.reason()}")


@needs_ext
def test_cuda_sources_were_compiled_when_nvcc_is_present():
    from resnet_fast import _build

    cuda_home, why = _build.cuda_build_problem()
    if cuda_home is None:
        pytest.skip(f"CUDA sources not buildable here: {why}")
    # The installed build compiles csrc/cuda/*.cu for sm_80/sm_90 whenever nvcc matches torch.
    assert _C.with_cuda


def test_cuda_sources_only_with_a_gpu_or_force_cuda(monkeypatch):
    """As torchvision/mmcv/detectron2: nvcc alone does not make a CUDA build (it triples the build time
    for kernels that cannot run); a visible GPU or FORCE_CUDA=1 does."""
    from resnet_fast import _build

    if torch.version.cuda is None or _build.find_cuda_home() is None:
        pytest.skip("needs a CUDA build of torch and nvcc")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RESNET_FAST_SKIP_CUDA", raising=False)
    monkeypatch.delenv("FORCE_CUDA", raising=False)
    home, why = _build.cuda_build_problem()
    assert home is None and "FORCE_CUDA=1" in why
    monkeypatch.setenv("FORCE_CUDA", "1")
    assert _build.cuda_build_problem()[0] is not None


@needs_ext
def test_cpu_kernels_run_on_torchs_threads():
    """Built without OpenMP, at::parallel_for (inline) would run every C++ kernel on one thread."""
    import sys

    assert _C.openmp == (torch._C.has_openmp and sys.platform == "linux")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed", "strided"])
def test_add_relu_matches_torch(dtype, layout):
    a = torch.randn(3, 5, 7, 9, dtype=dtype)
    b = torch.randn(3, 5, 7, 9, dtype=dtype)
    if layout in ("channels_last", "mixed"):
        a = a.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last":
        b = b.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        a = torch.randn(3, 5, 7, 18, dtype=dtype)[..., ::2]
    out = _C.add_relu(a, b)
    # Same rounding as torch: one add in the dtype (bf16/fp16 computed in fp32 and rounded once).
    assert torch.equal(out, torch.relu(a + b))
    expected_format = torch.channels_last if layout in ("channels_last", "mixed") else torch.contiguous_format
    assert out.is_contiguous(memory_format=expected_format)


@needs_ext
def test_add_relu_propagates_nan_like_torch():
    a = torch.tensor([float("nan"), -1.0, 2.0] * 11)
    assert torch.equal(_C.add_relu(a, torch.zeros_like(a)).isnan(), a.isnan())


@needs_ext
@pytest.mark.parametrize(
    "a, b, match",
    [
        (torch.randn(2, 3), torch.randn(3, 2), "shapes differ"),
        (torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64), "dtypes differ"),
        (torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.int32), "floating-point"),
    ],
)
def test_add_relu_input_checks(a, b, match):
    with pytest.raises(RuntimeError, match=match):
        _C.add_relu(a, b)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_add_relu_op_autograd_and_compile(backend):
    resnet_fast.set_backend(backend)
    a = torch.randn(2, 4, 5, 5, requires_grad=True)
    b = torch.randn(2, 4, 5, 5, requires_grad=True)
    torch.autograd.gradcheck(ops.add_relu, (a.double(), b.double()))
    compiled = torch.compile(ops.add_relu, fullgraph=True, backend="eager")
    assert torch.equal(compiled(a, b), torch.relu(a + b))


def test_add_relu_op_rejects_broadcasting():
    with pytest.raises(ValueError, match="equal shapes"):
        ops.add_relu(torch.randn(2, 3), torch.randn(3))


@needs_ext
def test_model_dispatches_to_the_extension(monkeypatch):
    calls = []
    record_conv_calls(monkeypatch, "cpp", lambda x, *rest: calls.append(x.shape))
    resnet_fast.set_backend("cpp")
    with torch.no_grad():
        resnet_fast.resnet18(num_classes=10).eval()(torch.randn(1, 3, 32, 32))
    # Eval: every Conv+BN (+ block tail's residual add + ReLU) of ResNet-18 is one conv_bias_act.
    assert len(calls) == 20


def test_package_works_without_the_extension():
    env = {**os.environ, "RESNET_FAST_SKIP_EXT": "1"}
    code = (
        "import json, torch, resnet_fast;"
        "print(resnet_fast.ResNet50(num_classes=3).eval()(torch.randn(1, 3, 64, 64)).shape);"
        "info = resnet_fast.info(); print(json.dumps([info['extension'], info['auto choice']]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    shape, state = out.stdout.strip().splitlines()
    assert shape == "torch.Size([1, 3])"
    extension, choice = json.loads(state)
    assert not extension["usable"] and "RESNET_FAST_SKIP_EXT" in extension["why not"]
    assert choice["cpu"] == "torch"


def test_info_can_be_called_again():
    # The report's module once had the function's name: importing it replaced resnet_fast.info.
    first = resnet_fast.info()
    assert callable(resnet_fast.info) and resnet_fast.info().keys() == first.keys()


def _thp_mode() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), None where unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def _huge_page_eligible(t: torch.Tensor) -> bool:
    """Whether the memory mapping holding t's first byte may get huge pages (/proc/self/smaps)."""
    address, inside = t.data_ptr(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header: start-end perms offset dev ...
                start, end = (int(v, 16) for v in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "THPeligible:":
                return fields[1] == "1"
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_huge_puts_large_tensors_on_huge_pages(dtype, monkeypatch):
    """With RESNET_FAST_HUGE_PAGES=1, packed weights of 2 MiB or more are marked for 2 MiB pages (a
    forward streaming them needs 512x fewer TLB entries); smaller ones, and all by default, come from
    torch's allocator."""
    if _thp_mode() in (None, "never"):
        pytest.skip(f"needs Linux transparent huge pages (mode here: {_thp_mode()})")
    monkeypatch.setenv("RESNET_FAST_HUGE_PAGES", "1")
    large = _C.empty_huge([3, 1 << 20], dtype)
    assert large.shape == (3, 1 << 20) and large.dtype == dtype and large.is_contiguous()
    assert large.data_ptr() % (2 << 20) == 0 and _huge_page_eligible(large)
    large.fill_(2)  # its memory is usable to the end
    assert large.sum().item() == 2 * large.numel()
    small = _C.empty_huge([1000], dtype)
    assert small.shape == (1000,) and small.dtype == dtype
    if _thp_mode() == "madvise":  # elsewhere ("always") every mapping is eligible
        monkeypatch.delenv("RESNET_FAST_HUGE_PAGES")
        assert not _huge_page_eligible(_C.empty_huge([3, 1 << 20], dtype))
