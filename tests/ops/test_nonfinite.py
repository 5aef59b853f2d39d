"""NaN and Inf propagate through every fused op as through the unfused PyTorch ops (issue 15):
ReLU(NaN) = NaN, a NaN in the residual reaches the output, ReLU(+Inf) = +Inf, ReLU(-Inf) = 0.

CPU backends here (cpp and torch); the Triton kernels' cases run under the interpreter in
tests/kernels/, the CUDA C++ ones in tests/ops/test_conv_cuda.py (GPU)."""

import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from resnet_fast import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(params=["cpp", "torch"])
def backend(request):
    resnet_fast.set_backend(request.param)
    return request.param


def _poison(t: torch.Tensor) -> torch.Tensor:
    """NaN in image 0, +Inf in image 1, -Inf in image 2, image 3 clean."""
    t = t.clone()
    t[0, :, 1:3, 1:3] = float("nan")
    t[1, 0, 2, 2] = float("inf")
    t[2, 1, 0, 0] = float("-inf")
    return t


def _assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(actual.isnan(), expected.isnan()), "NaN positions differ"
    assert torch.equal(actual.isposinf(), expected.isposinf()), "+Inf positions differ"
    assert torch.equal(actual.isneginf(), expected.isneginf()), "-Inf positions differ"
    assert actual.isnan().any() or actual.isinf().any(), "the case must actually hold non-finite values"


def _conv_case(dtype, kernel, groups=1):
    x = torch.randn(4, 8, 6, 6, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 8 // groups, kernel, kernel, dtype=dtype) * 0.2
    b = torch.randn(16, dtype=dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize(
    "where, residual",
    [("input", False), ("input", True), ("weight", False), ("weight", True), ("residual", True)],
)
def test_conv_bias_act_propagates_nonfinite(backend, dtype, kernel, where, residual):
    x, w, b = _conv_case(dtype, kernel)
    pad = kernel // 2
    res = (
        torch.randn(4, 16, 6, 6, dtype=dtype).contiguous(memory_format=torch.channels_last)
        if residual
        else None
    )
    if where == "input":
        x = _poison(x).contiguous(memory_format=torch.channels_last)
    elif where == "residual":
        res = _poison(res).contiguous(memory_format=torch.channels_last)
    else:
        w = w.clone()
        w[3, 0, 0, 0] = float("nan")
        w[5, 1, 0, 0] = float("inf")
    for relu in (True, False):
        with torch.no_grad():
            actual = ops.conv_bias_act(x, w, b, res, relu, [1, 1], [pad, pad], [1, 1], 1)
            expected = F.conv2d(x, w, b, 1, pad)
            if res is not None:
                expected = expected + res
            expected = torch.relu(expected) if relu else expected
        _assert_same_nonfinite(actual, expected)
        finite = expected.isfinite()
        tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 5e-2)
        torch.testing.assert_close(actual[finite], expected[finite], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_bias_act_grouped_residual_propagates_nan(backend, dtype):
    x, w, b = _conv_case(dtype, 3, groups=2)
    res = _poison(torch.randn(4, 16, 6, 6, dtype=dtype)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        actual = ops.conv_bias_act(x, w, b, res, True, [1, 1], [1, 1], [1, 1], 2)
        expected = torch.relu(F.conv2d(x, w, b, 1, 1, 1, 2) + res)
    _assert_same_nonfinite(actual, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_scale_shift_act_and_add_relu_propagate_nonfinite(backend, dtype, layout):
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = _poison(torch.randn(4, 8, 5, 5, dtype=dtype)).contiguous(memory_format=fmt)
    r = _poison(torch.randn(4, 8, 5, 5, dtype=dtype).flip(0)).contiguous(memory_format=fmt)
    scale, shift = torch.rand(8, dtype=torch.float32) + 0.5, torch.randn(8, dtype=torch.float32)
    view = (1, -1, 1, 1)
    for res in (None, r):
        for relu in (True, False):
            expected = x * scale.view(view).to(dtype) + shift.view(view).to(dtype)
            expected = expected + res if res is not None else expected
            expected = torch.relu(expected) if relu else expected
            _assert_same_nonfinite(ops.scale_shift_act(x, scale, shift, res, relu), expected)
    _assert_same_nonfinite(ops.add_relu(x, r), torch.relu(x + r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("relu", [True, False])
def test_bn_act_train_propagates_nonfinite(backend, dtype, relu):
    x = torch.randn(4, 8, 5, 5, dtype=dtype)
    x[1, 2, 3, 3] = float("nan")  # channel 2 only
    x[0, 5, 0, 0] = float("inf")  # channel 5: inf - inf in the variance
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.rand(8, dtype=dtype if dtype == torch.float64 else torch.float32) + 0.5
    bias = torch.randn(8, dtype=weight.dtype)
    y, mean, var = ops.batch_norm_act(x, weight, bias, None, relu, 1e-5)
    y.backward(torch.ones_like(y))
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.batch_norm(x_ref, None, None, weight.to(dtype), bias.to(dtype), training=True, eps=1e-5)
    y_ref = torch.relu(y_ref) if relu else y_ref
    y_ref.backward(torch.ones_like(y_ref))
    # Channels 2 and 5 are NaN/Inf everywhere in torch (batch statistics mix the images); the others finite.
    bad = torch.zeros(8, dtype=torch.bool)
    bad[[2, 5]] = True
    for name, ours, theirs in (("y", y, y_ref), ("grad", x.grad, x_ref.grad)):
        ours_bad = (~ours.isfinite()).any(dim=(0, 2, 3))
        theirs_bad = (~theirs.isfinite()).any(dim=(0, 2, 3))
        assert torch.equal(theirs_bad, bad) or name == "grad", f"reference {name}: {theirs_bad}"
        assert torch.equal(ours_bad, theirs_bad), f"{name}: non-finite channels {ours_bad} vs {theirs_bad}"
    assert torch.equal(~mean.isfinite() | ~var.isfinite(), bad)
