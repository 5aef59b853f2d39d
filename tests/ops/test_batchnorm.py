"""resnet_fast::bn_act_train / bn_act_backward and the module-level train path, on every CPU backend.

Ground truth: torch.nn.functional.batch_norm (+ residual) (+ relu) and nn.BatchNorm2d's buffer updates.
Tolerances:
- float64: gradcheck (finite differences, its default tolerances).
- float32: rtol 1e-5 with atol 1e-5 * max|expected|: the kernels sum in another order than ATen
  (tiles merged in double) so results differ by a few ulp of the largest value, not more.
- float16 / bfloat16: the error against a float64 reference must be at most 2x the error of PyTorch's own
  batch norm in that dtype (plus one ulp of the output for ties); the kernels compute in float32 and round once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fast
from resnet_fast.nn.batchnorm import train_forward
from resnet_fast.ops import batchnorm as bnops

BACKENDS = [b for b in ("cpp", "torch") if not resnet_fast.ops.backend.problem(b, "cpu")]
# Odd, prime and tiny channel counts; NCHW, NHWC, 2-D and 3-D inputs.
SHAPES = [(2, 3, 5, 7), (3, 13, 4, 4), (4, 1, 3, 3), (2, 37, 2, 3), (8, 5), (2, 7, 11)]


def _make(shape, dtype=torch.float32, channels_last=False, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    if channels_last and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(
        torch.float32 if dtype != torch.float64 else dtype
    )
    b = torch.randn(c, generator=g, dtype=torch.float64).to(w.dtype)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if channels_last and len(shape) == 4:
        r = r.contiguous(memory_format=torch.channels_last)
    return x, w, b, r


def _reference(x, w, b, r, relu, eps=1e-5):
    y = F.batch_norm(x, None, None, w, b, True, 0.0, eps)
    if r is not None:
        y = y + r
    return F.relu(y) if relu else y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_fp64(backend, affine, residual, relu, channels_last):
    resnet_fast.set_backend(backend)
    x, w, b, r = _make((3, 4, 3, 2), torch.float64, channels_last)
    w, b = (w, b) if affine else (None, None)
    r = r if residual else None
    inputs = [t.requires_grad_() for t in (x, w, b, r) if t is not None]

    def fn(*args):
        it = iter(args)
        xx = next(it)
        ww, bb = (next(it), next(it)) if affine else (None, None)
        rr = next(it) if residual else None
        return bnops.bn_act_train(xx, ww, bb, rr, relu, 1e-5)[0]

    assert torch.autograd.gradcheck(fn, inputs)


def _assert_fp32_close(actual, expected, what):
    actual, expected = actual.detach(), expected.detach()
    scale = expected.abs().max().clamp_min(1e-12).item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual", [True, False])
def test_forward_backward_fp32(backend, shape, channels_last, residual):
    resnet_fast.set_backend(backend)
    x, w, b, r = _make(shape, channels_last=channels_last, offset=3.0)
    r = r if residual else None
    leaves = [t.requires_grad_() for t in (x, w, b, r) if t is not None]
    y, mean, var = bnops.batch_norm_act(x, w, b, r, relu=True)
    expected = _reference(x, w, b, r, relu=True)
    _assert_fp32_close(y, expected, "y")
    if len(shape) == 4:
        assert y.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
    dims = [d for d in range(x.dim()) if d != 1]
    var_ref, mean_ref = torch.var_mean(x.detach().double(), dim=dims, correction=0)
    _assert_fp32_close(mean.double(), mean_ref, "mean")
    _assert_fp32_close(var.double(), var_ref, "var")
    grad = torch.randn_like(y)
    ours = torch.autograd.grad(y, leaves, grad)
    theirs = torch.autograd.grad(expected, leaves, grad)
    for name, a, e in zip("xwbr", ours, theirs, strict=False):  # no "r" without residual
        _assert_fp32_close(a, e, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_variance_without_cancellation(backend, channels_last):
    """A large mean and a small spread: E[x^2] - E[x]^2 would lose every digit in float32."""
    resnet_fast.set_backend(backend)
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(8, 16, 12, 12, generator=g, dtype=torch.float64) * 1e-2 + 1e4
    x = x64.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _, mean, var = bnops.batch_norm_act(x, None, None, None, relu=False)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)  # of the rounded input
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-7, atol=0)


def _max_err(t, ref):
    return (t.double() - ref).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_precision_vs_torch(backend, dtype, channels_last):
    resnet_fast.set_backend(backend)
    x, w, b, r = _make((4, 24, 6, 5), dtype, channels_last, offset=1.0)
    leaves = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), r.requires_grad_()]
    y, _, _ = bnops.batch_norm_act(x, w, b, r, relu=True)
    # PyTorch in the same dtype (the same op sequence as torchvision) and a float64 ground truth.
    plain = F.relu(F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5) + r)
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    truth = _reference(x64, w64, b64, r64, relu=True)
    ulp = torch.finfo(dtype).eps * truth.abs().max().item()
    assert y.dtype == dtype
    assert _max_err(y, truth) <= 2 * _max_err(plain, truth) + ulp
    grad = torch.randn(y.shape, dtype=torch.float64)
    ours = torch.autograd.grad(y, leaves, grad.to(dtype))
    theirs = torch.autograd.grad(plain, leaves, grad.to(dtype))
    exact = torch.autograd.grad(truth, (x64, w64, b64, r64), grad)
    for name, a, p, e in zip("xwbr", ours, theirs, exact, strict=True):
        tol = 2 * _max_err(p, e) + torch.finfo(dtype).eps * e.abs().max().item()
        assert _max_err(a, e) <= tol, f"grad {name}: {_max_err(a, e)} > {tol}"


# ------------------------------------------------------------------------------ module-level behaviour


def _bn_pair(c, **kwargs):
    torch.manual_seed(1)
    ref = nn.BatchNorm2d(c, **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    ours = nn.BatchNorm2d(c, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"momentum": None},
        {"momentum": 0.3, "eps": 1e-3},
        {"affine": False},
        {"track_running_stats": False},
    ],
    ids=str,
)
def test_running_stats_like_batchnorm2d(backend, kwargs):
    resnet_fast.set_backend(backend)
    ours, ref = _bn_pair(7, **kwargs)
    for step in range(3):
        x = torch.randn(4, 7, 5, 5) * (step + 1) + step
        r = torch.randn_like(x)
        y = train_forward(ours, x, r, relu=True)
        expected = F.relu(ref(x) + r)
        _assert_fp32_close(y, expected, f"y at step {step}")
        for (name, a), e in zip(ours.named_buffers(), ref.buffers(), strict=True):
            if a.is_floating_point():
                _assert_fp32_close(a, e, f"{name} at step {step}")
            else:
                assert torch.equal(a, e), name
    if not ours.track_running_stats:
        # eval without running stats still uses batch statistics
        ours.eval(), ref.eval()
        x = torch.randn(3, 7, 4, 4)
        _assert_fp32_close(resnet_fast.nn.conv_bn_act(x, nn.Identity(), ours, relu=False), ref(x), "eval")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_value_per_channel_raises_like_torch(backend):
    resnet_fast.set_backend(backend)
    bn = nn.BatchNorm2d(3)
    x = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        train_forward(bn, x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        nn.BatchNorm2d(3)(x)
    assert int(bn.num_batches_tracked) == 0  # nothing updated before the error
    train_forward(bn, torch.randn(2, 3, 1, 1))  # two values per channel are fine
    assert int(bn.num_batches_tracked) == 1


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="residual must match"):
        bnops.bn_act_train(x, None, None, torch.randn(2, 3, 4, 5), True, 1e-5)
    with pytest.raises(ValueError, match=r"weight must be \[3\]"):
        bnops.bn_act_train(x, torch.ones(4), None, None, True, 1e-5)
    with pytest.raises(ValueError, match="floating-point input"):
        bnops.bn_act_train(x.long(), None, None, None, True, 1e-5)


def test_registered_ops_pass_opcheck():
    x, w, b, r = _make((2, 5, 3, 3), channels_last=True)
    ops = torch.ops.resnet_fast
    running = (torch.zeros(5), torch.ones(5))
    torch.library.opcheck(ops.bn_batch_stats.default, (x, w, b, 1e-5, *running, 0.1, None))
    torch.library.opcheck(ops.bn_batch_stats.default, (x, None, None, 1e-3, None, None, None, None))
    torch.library.opcheck(ops.bn_batch_stats.default, (x, w, b, 1e-5, *running, None, torch.tensor(3)))
    mean, var, invstd, scale, shift = ops.bn_batch_stats(x, w, b, 1e-5, None, None, None, None)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), r.requires_grad_()
    stats = (mean, invstd, scale, shift)
    torch.library.opcheck(ops.bn_act_apply.default, (x, w, b, r, True, *stats))
    torch.library.opcheck(ops.bn_act_apply.default, (x, None, None, None, False, *stats))
    y = ops.bn_act_apply(x, w, b, r, True, *stats)
    args = (torch.randn_like(y), x.detach(), w.detach(), b.detach(), y.detach(), *stats, True, True)
    torch.library.opcheck(ops.bn_act_backward.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_op_updates_running_stats_in_place(backend):
    """bn_batch_stats declares and does the update: nn.BatchNorm2d's numbers, momentum and cumulative."""
    resnet_fast.set_backend(backend)
    x = torch.randn(4, 6, 5, 5) * 3 + 1
    for momentum in (0.3, None):
        ref = nn.BatchNorm2d(6, momentum=momentum)
        rm, rv, nbt = torch.zeros(6), torch.ones(6), torch.tensor(0)
        for _ in range(2):
            ref(x)
            nbt.add_(1)
            torch.ops.resnet_fast.bn_batch_stats(x, None, None, 1e-5, rm, rv, momentum, nbt)
        _assert_fp32_close(rm, ref.running_mean, f"running_mean, momentum {momentum}")
        _assert_fp32_close(rv, ref.running_var, f"running_var, momentum {momentum}")
