"""Triton elementwise kernels: parity on the CPU (interpreter), AOT compiles for sm_80/sm_90, GPU parity.

Tolerances against the same math in fp32 rounded once to the output dtype (what the kernels do):
- add_relu: exact. fp32 add and one round-to-nearest-even store, like PyTorch's reference.
- scale_shift_act: rtol = 2 ulp of the dtype (fp32 1.2e-7 -> 2.4e-7, fp16 2e-3, bf16 1.6e-2), atol 1e-6. The
  GPU may contract x*scale+shift into an FMA, which can move the fp32 result by an ulp and so flip
  the final rounding by one ulp of the output dtype.
"""

from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")  # Linux-only dependency

from resnet_fast.kernels.triton import elementwise as ew  # noqa: E402

# Kernels are interpreted when TRITON_INTERPRET=1 was set at `import triton` (see conftest.py).
INTERPRETED = not isinstance(ew._add_relu_kernel, triton.runtime.JITFunction)
interpreter_only = pytest.mark.skipif(
    not INTERPRETED, reason="runs on the CPU in the TRITON_INTERPRET=1 child (test_under_interpreter)"
)
not_interpreted = pytest.mark.skipif(INTERPRETED, reason="needs triton without TRITON_INTERPRET")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd channel counts; 2x24x7x9 = 3024 elements spans three 1024-element blocks with a ragged tail.
SHAPES = [(2, 24, 7, 9), (1, 3, 5, 5), (2, 72, 3, 3), (4, 5)]
LAYOUTS = ["contiguous", "channels_last", "strided-view"]


def make(shape, dtype, layout, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided-view":  # not dense: the launcher copies it once
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=g).to(device, dtype)[..., ::2]
    t = torch.randn(shape, generator=g).to(device, dtype)
    if layout == "channels_last" and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def is_channels_last(x):
    return x.dim() == 4 and not x.is_contiguous()


def layout_kept(out, layout, shape):
    """Dense inputs keep their layout; a strided 4-D view becomes channels_last (the model's layout)."""
    return is_channels_last(out) == (layout != "contiguous" and len(shape) == 4)


def scale_shift_reference(x, scale, shift, residual, relu):
    view = (1, -1) + (1,) * (x.dim() - 2)
    y = x.float() * scale.float().view(view) + shift.float().view(view)
    if residual is not None:
        y = y + residual.float()
    return (y.relu() if relu else y).to(x.dtype)


def ulp_rtol(dtype):
    return 2 * torch.finfo(dtype).eps


# ---------------------------------------------------------------- CPU, TRITON_INTERPRET=1 child


@not_interpreted
def test_under_interpreter(run_under_interpreter):
    run_under_interpreter(__file__)


@interpreter_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_relu(dtype, shape, layout, request):
    if dtype == torch.bfloat16:
        request.getfixturevalue("interpreter_bf16")
    a, b = make(shape, dtype, layout, 0), make(shape, dtype, "contiguous", 1)
    out = ew.add_relu(a, b)
    assert out.dtype == dtype and out.shape == a.shape
    assert layout_kept(out, layout, shape)
    torch.testing.assert_close(out, (a.float() + b.float()).relu().to(dtype), rtol=0, atol=0)


@interpreter_only
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_shift_act(dtype, shape, layout, residual, relu, request):
    if dtype == torch.bfloat16:
        request.getfixturevalue("interpreter_bf16")
    x = make(shape, dtype, layout, 0)
    res = make(shape, dtype, "contiguous", 1) if residual else None  # other layout than x on purpose
    g = torch.Generator().manual_seed(2)
    scale, shift = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    out = ew.scale_shift_act(x, scale, shift, res, relu=relu)
    assert out.dtype == dtype and out.shape == x.shape
    assert layout_kept(out, layout, shape)
    expected = scale_shift_reference(x, scale, shift, res, relu)
    torch.testing.assert_close(out, expected, rtol=ulp_rtol(dtype), atol=1e-6)


def _nonfinite(shape, dtype, seed):
    """Image 0 with a NaN patch, image 1 with one Inf and one -Inf, the rest clean."""
    t = make(shape, dtype, "channels_last", seed)
    t[0, :, 1:3, 1:3] = float("nan")
    t[1, 2, 0, 0], t[1, 0, 1, 1] = float("inf"), float("-inf")
    return t


def _same_nonfinite(out, expected):
    assert torch.equal(out.isnan(), expected.isnan()), out.isnan().nonzero().tolist()
    assert torch.equal(out.isinf(), expected.isinf()), out.isinf().nonzero().tolist()
    assert torch.equal(out.isposinf(), expected.isposinf())


@interpreter_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_propagate_like_torch(dtype, request):
    """relu(NaN) = NaN as torch.relu (tl.maximum's default would give 0), NaN in the residual reaches
    the output, Inf stays Inf; clean elements as in the parity tests above."""
    if dtype == torch.bfloat16:
        request.getfixturevalue("interpreter_bf16")
    shape = (3, 4, 4, 4)
    x, res = _nonfinite(shape, dtype, 0), make(shape, dtype, "channels_last", 1)
    res[2, 1, 3, 3] = float("nan")  # image 2: clean input, NaN residual
    expected = (x.float() + res.float()).relu().to(dtype)
    out = ew.add_relu(x, res)
    _same_nonfinite(out, expected)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    scale, shift = torch.rand(4) + 0.5, torch.randn(4)
    for r in (res, None):
        out = ew.scale_shift_act(x, scale, shift, r, relu=True)
        expected = scale_shift_reference(x, scale, shift, r, True)
        _same_nonfinite(out, expected)
        torch.testing.assert_close(out, expected, rtol=ulp_rtol(dtype), atol=1e-6, equal_nan=True)


@interpreter_only
def test_every_launch_is_guarded_by_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: every launcher enters common.on_device(input) around
    its launches (checked here on CPU tensors: the guard is entered for the tensor, around each launch)."""
    import contextlib

    from resnet_fast.kernels.triton import batchnorm as tbn
    from resnet_fast.kernels.triton import common, conv

    guarded, launches = [], []

    @contextlib.contextmanager
    def on_device(t):
        guarded.append(t.device)
        yield
        guarded.pop()

    monkeypatch.setattr(common, "on_device", on_device)
    for module in (ew, tbn, conv):
        for name in [n for n in dir(module) if n.endswith("_kernel")]:
            kernel = getattr(module, name)

            class Guarded:
                def __getitem__(self, grid, kernel=kernel, name=name):
                    def launch(*args, **kwargs):
                        launches.append((name, list(guarded)))
                        return kernel[grid](*args, **kwargs)

                    return launch

            monkeypatch.setattr(module, name, Guarded())
    x = make((2, 8, 3, 3), torch.float32, "channels_last", 0)
    v = torch.rand(8) + 0.5
    ew.add_relu(x, x)
    ew.scale_shift_act(x, v, v)
    conv.conv_bias_act(x, torch.randn(8, 8, 3, 3), None, padding=(1, 1))
    mean, _, invstd, scale, shift = tbn.batch_stats(x, v, v, 1e-5)
    tbn.backward(x, x, scale, shift, None, mean, invstd, True, True)
    assert {name for name, _ in launches} >= {"_add_relu_kernel", "_scale_shift_act_kernel", "_conv_fwd_kernel",
                                             "_stats_kernel", "_stats_finalize_kernel", "_bwd_reduce_kernel",
                                             "_bwd_finalize_kernel", "_bwd_elemt_kernel"}  # fmt: skip
    assert all(devices == [x.device] for _, devices in launches), launches


def test_rejects_bad_arguments():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError):
        ew.add_relu(x, x.half())
    with pytest.raises(ValueError):
        ew.scale_shift_act(x, torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError):
        ew.scale_shift_act(x, torch.ones(3), torch.zeros(3), residual=torch.randn(2, 3, 4, 5))


# ---------------------------------------------------------------- ahead-of-time compiles, no GPU

AOT_CASES = [pytest.param(dtype, cc, id=f"sm{cc}-{str(dtype)[6:]}") for cc in (80, 90) for dtype in DTYPES]


def _offsets_are_64_bit(compiled):
    bits = re.findall(
        r"tt\.addptr [^:]*: tensor<\d+x!tt\.ptr<\w+>>, tensor<\d+x(i\d+)>", compiled.asm["ttir"]
    )
    return bits and "i64" in bits


@not_interpreted
@pytest.mark.parametrize("dtype, cc", AOT_CASES)
def test_aot_add_relu(aot_compile, dtype, cc):
    compiled = aot_compile(
        ew._add_relu_kernel,
        pointers={"a_ptr": dtype, "b_ptr": dtype, "out_ptr": dtype},
        constexprs={"BLOCK": ew.BLOCK_SIZE},
        divisible=("a_ptr", "b_ptr", "out_ptr", "n_elements"),
        cc=cc,
        num_warps=ew.NUM_WARPS,
        num_stages=1,
    )
    assert _offsets_are_64_bit(compiled)


@not_interpreted
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype, cc", AOT_CASES)
def test_aot_scale_shift_act(aot_compile, dtype, cc, channels_last):
    compiled = aot_compile(
        ew._scale_shift_act_kernel,
        pointers={
            "x_ptr": dtype,
            "scale_ptr": torch.float32,
            "shift_ptr": torch.float32,
            "res_ptr": dtype,
            "out_ptr": dtype,
        },
        constexprs={"HAS_RES": True, "RELU": True, "CHANNELS_LAST": channels_last, "BLOCK": ew.BLOCK_SIZE},
        divisible=("x_ptr", "scale_ptr", "shift_ptr", "res_ptr", "out_ptr", "n_elements", "C"),
        cc=cc,
        num_warps=ew.NUM_WARPS,
        num_stages=1,
    )
    assert _offsets_are_64_bit(compiled)


def assert_relu_keeps_nan(compiled):
    """No NaN-dropping float max in the PTX: a ReLU must be max.NaN (or a compare and select)."""
    ptx = compiled.asm["ptx"]
    dropping = re.findall(r"\bmax(?!\.NaN)(?:\.ftz)?\.(?:f32|f16|bf16)(?:x2)?\b", ptx)
    assert not dropping, dropping


@not_interpreted
@pytest.mark.parametrize("dtype, cc", AOT_CASES)
def test_aot_relu_propagates_nan(aot_compile, dtype, cc):
    common = dict(cc=cc, num_warps=ew.NUM_WARPS, num_stages=1)
    for compiled in (
        aot_compile(
            ew._add_relu_kernel, pointers={"a_ptr": dtype, "b_ptr": dtype, "out_ptr": dtype},
            constexprs={"BLOCK": ew.BLOCK_SIZE}, divisible=("a_ptr", "b_ptr", "out_ptr", "n_elements"), **common,
        ),
        aot_compile(
            ew._scale_shift_act_kernel,
            pointers={"x_ptr": dtype, "scale_ptr": torch.float32, "shift_ptr": torch.float32, "res_ptr": dtype,
                      "out_ptr": dtype},
            constexprs={"HAS_RES": True, "RELU": True, "CHANNELS_LAST": True, "BLOCK": ew.BLOCK_SIZE},
            divisible=("x_ptr", "scale_ptr", "shift_ptr", "res_ptr", "out_ptr", "n_elements", "C"), **common,
        ),
    ):  # fmt: skip
        assert_relu_keeps_nan(compiled)
        assert "max.NaN" in compiled.asm["ptx"]


# ---------------------------------------------------------------- real GPU


@pytest.mark.gpu
@needs_gpu
@not_interpreted
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_reference(dtype, layout):
    shape = (8, 72, 28, 28)
    x, res = make(shape, dtype, layout, 0, "cuda"), make(shape, dtype, layout, 1, "cuda")
    scale, shift = torch.randn(72, device="cuda"), torch.randn(72, device="cuda")
    torch.testing.assert_close(
        ew.add_relu(x, res), (x.float() + res.float()).relu().to(dtype), rtol=0, atol=0
    )
    out = ew.scale_shift_act(x, scale, shift, res)
    expected = scale_shift_reference(x, scale, shift, res, True)
    torch.testing.assert_close(out, expected, rtol=ulp_rtol(dtype), atol=1e-6)


@pytest.mark.gpu
@needs_gpu
@not_interpreted
def test_gpu_past_2_31_elements():
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    shape = (2**31 // (64 * 224 * 224) + 1, 64, 224, 224)  # NHWC 1024x224x224x64 class of size
    # torch.zeros takes no memory_format
    x = torch.empty(shape, device="cuda", dtype=torch.float16, memory_format=torch.channels_last).zero_()
    x[-1].normal_()
    out = ew.scale_shift_act(
        x, torch.full((64,), 2.0, device="cuda"), torch.zeros(64, device="cuda"), relu=False
    )
    torch.testing.assert_close(out[-1], x[-1] * 2, rtol=0, atol=0)
    del out
    torch.testing.assert_close(ew.add_relu(x, x)[-1], (x[-1] * 2).relu(), rtol=0, atol=0)
