"""Triton batch-norm kernels: parity on the CPU (interpreter), AOT compiles for sm_80/sm_90, GPU parity.

Reference: the same math in PyTorch (ops.batchnorm.TorchKernels, float32 on an input rounded to the
tested dtype). Tolerances: per-channel results (mean, var, sums) rtol 1e-5 and atol 1e-5 * the largest
magnitude (float32 sums in another order); elementwise dx in the input dtype within 2 ulp of that dtype
(the GPU may contract a multiply-add into an FMA, moving the float32 value by an ulp, which can flip the
final rounding) with atol 1e-6 * the largest magnitude; dy' (a masked copy of dy) exactly.
Against torch's own batch norm in float32 (non-finite inputs): float32 as tests/ops/test_batchnorm.py
(rtol 1e-5, atol 1e-5 * the largest magnitude); 16-bit results within 2 ulp of the dtype (relative, and
of the largest magnitude): the kernels compute in float32 and round once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

triton = pytest.importorskip("triton")  # Linux-only dependency

from resnet_fast.kernels.triton import batchnorm as tbn  # noqa: E402
from resnet_fast.kernels.triton import elementwise as ew  # noqa: E402
from resnet_fast.nn.batchnorm import train_forward  # noqa: E402
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


@interpreter_only
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_fused_stats_and_backward(affine, momentum):
    """batch_stats (+ running update) and backward against TorchKernels' composition of the same math;
    scale and shift bit for bit what scale_shift computes (nn/recompute.py rebuilds outputs with it)."""
    x, dy, _, w, b = _inputs((3, 5, 7, 9), True, torch.float32)
    w, b = (w, b) if affine else (None, None)
    rm, rv, nbt = torch.randn(5), torch.rand(5) + 0.5, torch.tensor(4)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    mean, var, invstd, scale, shift = tbn.batch_stats(x, w, b, 1e-5, rm, rv, momentum, nbt)
    ref = REF.batch_stats(x, w, b, 1e-5, rm_ref, rv_ref, momentum, nbt)
    for name, a, e in zip(("mean", "var", "invstd", "running_mean", "running_var"),
                          (mean, var, invstd, rm, rv), (*ref[:3], rm_ref, rv_ref), strict=True):  # fmt: skip
        _close(a, e, name)
    s_ref, t_ref = bnops.scale_shift(w, b, mean, invstd)
    assert torch.equal(scale, s_ref) and torch.equal(shift, t_ref)
    out = tbn.backward(dy, x, scale, shift, None, mean, invstd, True, False)
    out_ref = REF.backward(dy, x, scale, shift, None, mean, invstd, True, False)
    for name, a, e in zip(("dx", "dres", "dweight", "dbias"), out, out_ref, strict=True):
        if e is None:
            assert a is None
        else:
            _close(a, e, name)


class _CountLaunches(TorchDispatchMode):
    """Counts what would be GPU launches: Triton kernels (through their launchers) and torch ops that
    compute (not views, not allocations). Custom ops run their Python body inside the count."""

    FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}

    def __init__(self, monkeypatch):
        super().__init__()
        self.launches: list[str] = []
        for module, names in (
            (tbn, [n for n in dir(tbn) if n.endswith("_kernel")]),
            (ew, ["_scale_shift_act_kernel"]),
        ):
            for name in names:
                monkeypatch.setattr(module, name, self._counted(getattr(module, name), name))

    def _counted(self, kernel, name):
        counter = self

        class Counted:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    counter.launches.append(name)
                    with _disable_current_modes():  # the interpreter's host copies are not launches
                        return kernel[grid](*args, **kwargs)

                return launch

        return Counted()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "resnet_fast":
            op = getattr(bnops, func._opname)
            with self:
                return op._init_fn(*args, **kwargs)
        if not func.is_view and func._opname not in self.FREE:
            self.launches.append(str(func))
        return func(*args, **kwargs)


@interpreter_only
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_launches_per_bn(monkeypatch, residual, momentum):
    """Training BN on the Triton path: at most 4 launches forward (the running statistics included) and 3
    backward, counted through the launchers and torch's dispatcher."""
    monkeypatch.setattr(bnops, "kernels_for", lambda x: bnops.TritonKernels())
    bn = nn.BatchNorm2d(6, momentum=momentum).train()
    x, dy, r, _, _ = _inputs((2, 6, 5, 4), True, torch.float32)
    x.requires_grad_()
    r = r.requires_grad_() if residual else None
    counter = _CountLaunches(monkeypatch)
    with counter:
        y = train_forward(bn, x, r, relu=True)
    forward, counter.launches = counter.launches, []
    with counter:
        y.backward(dy)
    assert len(forward) <= 4, forward
    assert len(counter.launches) <= 3, counter.launches
    assert "_stats_kernel" in forward and "_bwd_elemt_kernel" in counter.launches  # the count sees them
    assert x.grad is not None and (r is None or r.grad is not None)


@interpreter_only
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_like_torch(dtype, residual, monkeypatch, request):
    """NaN in one image, Inf in another, NaN in the residual: outputs, every gradient and the running
    statistics are NaN / Inf exactly where torch's are; the clean channels match.

    The reference is torch's batch norm in float32 on the same (rounded) values, which is what the
    kernels compute before their one rounding to the dtype: so the ReLU masks agree (a same-dtype
    reference rounds before its ReLU and may put a value within an ulp of 0 on the other side)."""
    if dtype == torch.bfloat16:
        request.getfixturevalue("interpreter_bf16")
    monkeypatch.setattr(bnops, "kernels_for", lambda x: bnops.TritonKernels())
    x, dy, r, _, _ = _inputs((3, 6, 5, 4), True, dtype)
    x[0, 1, 2, 3], x[1, 3, 0, 0] = float("nan"), float("inf")
    r[2, 4, 1, 1] = float("nan")
    r = r if residual else None
    torch.manual_seed(0)
    ours = nn.BatchNorm2d(6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-0.5, 0.5)
    ours.to(dtype)
    ref = nn.BatchNorm2d(6)
    ref.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ours.state_dict().items()})
    results = []
    for bn, cast in ((ours, lambda t: t), (ref, lambda t: t.float())):
        xx = cast(x).detach().requires_grad_()
        rr = None if r is None else cast(r).detach().requires_grad_()
        if bn is ours:
            y = train_forward(bn, xx, rr, relu=True)
        else:
            y = F.relu(bn(xx) if rr is None else bn(xx) + rr)
        y.backward(cast(dy))
        tensors = [y, xx.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var]
        results.append(tensors + ([rr.grad] if rr is not None else []))
    names = ["y", "dx", "dweight", "dbias", "running_mean", "running_var", "dresidual"]
    for name, a, e in zip(names, *results, strict=False):  # "dresidual" only with a residual
        a, e = a.detach().float(), e.detach()
        assert torch.equal(a.isnan(), e.isnan()), f"{name}: NaN at {a.isnan().nonzero().tolist()}"
        assert torch.equal(a.isinf(), e.isinf()), f"{name}: Inf at {a.isinf().nonzero().tolist()}"
        finite = e.isfinite()
        assert finite.any(), name  # the clean channels are compared
        a, e = a[finite], e[finite]
        # float32: as tests/ops/test_batchnorm.py; 16-bit: the one rounding, 2 ulp of the largest value.
        tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(
            a, e, rtol=tol, atol=tol * e.abs().max().item(), msg=lambda m, name=name: f"{name}: {m}"
        )


def test_grids_fit_cuda_limits():
    """N*H*W = 2^23 (the stem at 224x224 from batch 168): every grid axis within CUDA's limits (x: 2^31 - 1,
    y and z: 65535). The elementwise backward used to put rows/64 = 131072 on axis 1."""
    for c in (1, 64, 2048):
        g = tbn.Geometry(torch.empty((128, c, 256, 256), device="meta"))
        assert g.rows == 2**23
        for grid in (g.reduce_grid, g.finalize_grid, g.elemt_grid):
            assert grid[0] < 2**31 and all(n <= 65535 for n in grid[1:]), (c, grid)
        assert g.elemt_grid[0] * tbn.BLOCK_R >= g.rows and g.reduce_grid[0] * g.tile_rows >= g.rows


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
    finalize = {"BLOCK_T": tbn.BLOCK_T, "BLOCK_C": 64}
    aot_compile(
        tbn._stats_finalize_kernel,
        pointers={
            "x_ptr": dtype,
            "w_ptr": f32,
            "b_ptr": f32,
            "run_mean_ptr": f32,
            "run_var_ptr": f32,
            "nbt_ptr": torch.int64,
            **{
                k: f32
                for k in (
                    "part_mean_ptr",
                    "part_m2_ptr",
                    "mean_ptr",
                    "var_ptr",
                    "invstd_ptr",
                    "scale_ptr",
                    "shift_ptr",
                )
            },
        },  # fmt: skip
        constexprs={
            "CHANNELS_LAST": channels_last,
            "HAS_W": True,
            "HAS_B": True,
            "RUNNING": True,
            "CUMULATIVE": not channels_last,
            **finalize,
        },  # fmt: skip
        divisible=("x_ptr", "part_mean_ptr", "part_m2_ptr", "C"),
        floats=("eps", "momentum", "unbias"),
        enable_fp_fusion=False,
        **kw,
    )
    aot_compile(
        tbn._bwd_finalize_kernel,
        pointers={
            k: f32
            for k in (
                "part_dy_ptr",
                "part_dy_xmu_ptr",
                "scale_ptr",
                "invstd_ptr",
                "sums_ptr",
                "coef_ptr",
                "dweight_ptr",
                "dbias_ptr",
            )
        },  # fmt: skip
        constexprs={"COEFFICIENTS": True, **finalize},
        divisible=("part_dy_ptr", "part_dy_xmu_ptr", "C"),
        floats=("count",),
        **kw,
    )


# ---------------------------------------------------------------- real GPU


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape, channels_last", [((8, 64, 28, 28), True), ((4, 24, 9, 7), False)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_reference(dtype, shape, channels_last):
    _check(shape, channels_last, dtype, residual=True, relu=True, device="cuda")
