"""Triton batch-norm kernels: parity on the CPU (interpreter), AOT compiles for sm_80/sm_90, GPU parity.

Reference: the same math in PyTorch (ops.batchnorm.TorchKernels, float32 on an input rounded to the
tested dtype). Tolerances: per-channel results (mean, var, sums) rtol 1e-5 and atol 1e-5 * the largest
magnitude (float32 sums in another order); elementwise dx in the input dtype within 2 ulp of that dtype
(the GPU may contract a multiply-add into an FMA, moving the float32 value by an ulp, which can flip the
final rounding) with atol 1e-6 * the largest magnitude; dy' (a masked copy of dy) exactly.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")  # Linux-only dependency

from resnet_fast.kernels.triton import batchnorm as tbn  # noqa: E402
from resnet_fast.ops import batchnorm as bnops  # noqa: E402

INTERPRETED = not isinstance(tbn._stats_kernel, triton.runtime.JITFunction)
interpreter_only = pytest.mark.skipif(
    not INTERPRETED, reason="runs on the CPU in the TRITON_INTERPRET=1 child (test_under_interpreter)"
)
not_interpreted = pytest.mark.skipif(INTERPRETED, reason="needs triton without TRITON_INTERPRET")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Prime / tiny channel counts, a ragged last row block, NHWC and NCHW, a 2-D input.
CASES = [
    ((3, 5, 7, 9), True),
    ((3, 5, 7, 9), False),
    ((2, 67, 5, 3), True),
    ((1, 1, 9, 11), True),
    ((70, 3), False),
]
REF = bnops.TorchKernels()


def _inputs(shape, channels_last, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*s, scale=1.0, offset=0.0):
        return (torch.randn(*s, generator=g) * scale + offset).to(device)

    x, dy, r = t(*shape, scale=2.0, offset=1.5).to(dtype), t(*shape).to(dtype), t(*shape).to(dtype)
    if channels_last:
        x, dy, r = (v.contiguous(memory_format=torch.channels_last) for v in (x, dy, r))
    c = shape[1]
    w, b = t(c).abs() + 0.5, t(c)
    return x, dy, r, w, b


def _close(actual, expected, what, rtol=1e-5):
    actual, expected = actual.float(), expected.float()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def _check(shape, channels_last, dtype, residual, relu, device="cpu"):
    x, dy, r, w, b = _inputs(shape, channels_last, dtype, device)
    r = r if residual else None
    mean, var = tbn.stats(x)
    mean_ref, var_ref = REF.stats(x)
    _close(mean, mean_ref, "mean")
    _close(var, var_ref, "var")
    invstd = torch.rsqrt(var_ref + 1e-5)
    scale, shift = bnops.scale_shift(w, b, mean_ref, invstd)
    y = REF.apply(x, scale, shift, r, relu) if residual else None  # the residual path's mask source
    sums = tbn.backward_reduce(dy, x, scale, shift, y, mean_ref, relu)
    sums_ref = REF.backward_reduce(dy, x, scale, shift, y, mean_ref, relu)
    _close(sums[0], sums_ref[0], "sum dy'")
    _close(sums[1], sums_ref[1], "sum dy' * (x - mean)")
    k = bnops.grad_coefficients(scale, invstd, *sums_ref, x.numel() // x.shape[1])
    dx, dres = tbn.backward_elemt(dy, x, scale, shift, y, mean_ref, *k, relu, residual)
    dx_ref, dres_ref = REF.backward_elemt(dy, x, scale, shift, y, mean_ref, *k, relu, residual)
    assert dx.dtype == dtype and dx.stride() == x.stride()
    _close(dx, dx_ref, "dx", rtol=2 * torch.finfo(dtype).eps)
    if residual:
        assert torch.equal(dres, dres_ref)
    else:
        assert dres is None


# ---------------------------------------------------------------- CPU, TRITON_INTERPRET=1 child


@not_interpreted
def test_under_interpreter(run_under_interpreter):
    run_under_interpreter(__file__)


@interpreter_only
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("shape, channels_last", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernels_match_reference(dtype, shape, channels_last, residual, relu, request):
    if dtype == torch.bfloat16:
        request.getfixturevalue("interpreter_bf16")
    _check(shape, channels_last, dtype, residual, relu)


@interpreter_only
def test_stats_without_cancellation():
    """Mean 1e4, spread 1e-2: E[x^2] - E[x]^2 in float32 would lose every digit."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 8, 40, 40, generator=g, dtype=torch.float64) * 1e-2 + 1e4).float()
    x = x.contiguous(memory_format=torch.channels_last)
    _, var = tbn.stats(x)
    var_ref = x.double().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-4, atol=0)


@interpreter_only
def test_rejects_float64():
    with pytest.raises(TypeError, match="float32"):
        tbn.stats(torch.randn(2, 3, 4, 4, dtype=torch.float64))


# ---------------------------------------------------------------- ahead of time, sm_80 / sm_90

AOT_CASES = [pytest.param(dtype, cc, id=f"sm{cc}-{str(dtype)[6:]}") for cc in (80, 90) for dtype in DTYPES]


@not_interpreted
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype, cc", AOT_CASES)
def test_aot_compiles(aot_compile, dtype, cc, channels_last):
    f32 = torch.float32
    common = {"CHANNELS_LAST": channels_last, "BLOCK_R": tbn.BLOCK_R, "BLOCK_C": 64}
    has_out = channels_last  # both ReLU-mask sources (saved output, recomputed) without doubling the cases
    kw = {"cc": cc, "num_warps": tbn.NUM_WARPS, "num_stages": 1}
    aot_compile(
        tbn._stats_kernel,
        pointers={"x_ptr": dtype, "mean_ptr": f32, "m2_ptr": f32},
        constexprs=common,
        divisible=("x_ptr", "mean_ptr", "m2_ptr", "C"),
        **kw,
    )
    vectors = {"scale_ptr": f32, "shift_ptr": f32, "mean_ptr": f32}
    aot_compile(
        tbn._bwd_reduce_kernel,
        pointers={
            "dy_ptr": dtype,
            "x_ptr": dtype,
            "out_ptr": dtype,
            **vectors,
            "sum_dy_ptr": f32,
            "sum_dy_xmu_ptr": f32,
        },
        constexprs={"HAS_OUT": has_out, "RELU": True, **common},
        divisible=("dy_ptr", "x_ptr", "out_ptr", "C"),
        **kw,
    )
    aot_compile(
        tbn._bwd_elemt_kernel,
        pointers={
            "dy_ptr": dtype,
            "x_ptr": dtype,
            "out_ptr": dtype,
            **vectors,
            "ka_ptr": f32,
            "kb_ptr": f32,
            "kc_ptr": f32,
            "dx_ptr": dtype,
            "dres_ptr": dtype,
        },  # fmt: skip
        constexprs={"HAS_OUT": has_out, "RELU": True, "RES_GRAD": True, **common},
        divisible=("dy_ptr", "x_ptr", "out_ptr", "dx_ptr", "dres_ptr", "C"),
        **kw,
    )


# ---------------------------------------------------------------- real GPU


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape, channels_last", [((8, 64, 28, 28), True), ((4, 24, 9, 7), False)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_reference(dtype, shape, channels_last):
    _check(shape, channels_last, dtype, residual=True, relu=True, device="cuda")
