"""Training with the fused BN path vs torchvision on the same weights and data.

float64 is where parity is exact: logits, loss, every gradient, parameters and BN buffers after an
SGD step agree to rtol 1e-10 (atol 1e-10 * the tensor's largest magnitude) — the fused kernels run in
double there, so this proves the math and the running-statistics rules without rounding noise. The
20-step SGD trajectory and torch.compile also run in float64 (rtol 1e-8: steps and Inductor's own
fusions move results by a few ulp, which the steps amplify a little).
float32 and bf16 autocast are judged against a more precise torchvision run (float64, resp. float32):
resnet_fast's error must be at most 2x torchvision's own error (measured on these models: both sides
about 5e-6 (ResNet-18) and 5e-5 (ResNet-50) on fp32 logits, 4e-2 / 3e-1 in bf16). float32 gradients
get 5e-2 norm-wise on top: a ReLU whose input lies within rounding noise of 0 is masked in one run
and not in the other, moving upstream gradients by up to a few percent — torchvision's own float32
gradients differ that much from its float64 ones on ResNet-50 (measured: 2.4e-2). Any mistake in the
math (a missing term, a stale statistic) gives O(1) errors and fails all of these.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from _utils import like_fused, randomize_bn

import resnet_fast

RTOL64 = 1e-10
RTOL_TRAJECTORY = 1e-8
FUSED = resnet_fast.ops.backend_for(torch.device("cpu")) != "torch"
needs_fused = pytest.mark.skipif(not FUSED, reason="no fused CPU backend here (resnet_fast._C unavailable)")


def _pair(arch: str, **kwargs):
    theirs = randomize_bn(getattr(torchvision.models, arch)(num_classes=10, **kwargs))
    ours = getattr(resnet_fast, arch)(num_classes=10, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.train(), theirs.train()


def _close(actual, expected, what, rtol=1e-5):
    actual, expected = actual.detach(), expected.detach()
    scale = expected.abs().max().clamp_min(1e-12).item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


def _compare_state(ours, theirs, rtol, what):
    their_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        _close(p, their_params[name], f"{what} parameter {name}", rtol)
    their_buffers = dict(theirs.named_buffers())
    for name, b in ours.named_buffers():
        if b.is_floating_point():
            _close(b, their_buffers[name], f"{what} buffer {name}", rtol)
        else:
            assert torch.equal(b, their_buffers[name]), f"{what} buffer {name}"


@needs_fused
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_one_sgd_step_matches_torchvision_fp64(arch):
    ours, theirs = _pair(arch)
    ours, theirs = ours.double(), theirs.double()
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    target = torch.randint(0, 10, (4,))
    theirs, x = like_fused(theirs, x)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, theirs)]
    logits = [m(x) for m in (ours, theirs)]
    _close(logits[0], logits[1], "logits", RTOL64)
    losses = [F.cross_entropy(out, target) for out in logits]
    _close(losses[0], losses[1], "loss", RTOL64)
    for loss in losses:
        loss.backward()
    their_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        _close(p.grad, their_params[name].grad, f"grad of {name}", RTOL64)
    for opt in opts:
        opt.step()
    _compare_state(ours, theirs, RTOL64, "after one step:")


def _errors(ours, theirs, truth) -> tuple[float, float]:
    """Max-norm errors of ours and theirs against the truth, relative to the truth's largest value."""
    scale = truth.abs().max().item()
    return tuple(
        (t.detach().double() - truth.detach().double()).abs().max().item() / scale for t in (ours, theirs)
    )


def _grad_errors(ours, theirs, truth) -> tuple[float, float]:
    """Norm-wise errors of all parameter gradients together (one vector) against the truth's."""
    flat = [torch.cat([p.grad.double().flatten() for p in m.parameters()]) for m in (ours, theirs, truth)]
    return tuple(((g - flat[2]).norm() / flat[2].norm()).item() for g in flat[:2])


@needs_fused
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_fp32_step_as_accurate_as_torchvision(arch):
    """float32 against a float64 torchvision run: ours no worse than 2x torchvision's own error."""
    ours, theirs = _pair(arch)
    truth = copy.deepcopy(theirs).double()
    x = torch.randn(4, 3, 64, 64)
    target = torch.randint(0, 10, (4,))
    theirs, x = like_fused(theirs, x)
    exact = truth(x.double())
    F.cross_entropy(exact, target).backward()
    logits = [m(x) for m in (ours, theirs)]
    err = _errors(*logits, exact)
    assert err[0] <= 2 * err[1] + 1e-6, f"logits: {err}"
    for loss in [F.cross_entropy(out, target) for out in logits]:
        loss.backward()
    truth_buffers = dict(truth.named_buffers())
    their_buffers = dict(theirs.named_buffers())
    for name, b in ours.named_buffers():
        if b.is_floating_point():
            err = _errors(b, their_buffers[name], truth_buffers[name])
            assert err[0] <= 2 * err[1] + 1e-6, f"buffer {name}: {err}"
    err = _grad_errors(ours, theirs, truth)
    # + 5e-2: ReLU-mask noise (module docstring), which either side may or may not hit
    assert err[0] <= 2 * err[1] + 5e-2, f"gradients: {err}"


@needs_fused
def test_sgd_trajectory_20_steps():
    ours, theirs = _pair("resnet18")
    ours, theirs = ours.double(), theirs.double().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(5)
    data = [
        (torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g))
        for _ in range(4)
    ]
    opts = [
        torch.optim.SGD(m.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4) for m in (ours, theirs)
    ]
    first = last = None
    for step in range(20):
        x, target = data[step % len(data)]
        losses = []
        for model, opt in zip((ours, theirs), opts, strict=True):
            opt.zero_grad()
            loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), target)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        _close(losses[0], losses[1], f"loss at step {step}", RTOL_TRAJECTORY)
        first = losses[1] if first is None else first
        last = losses[1]
    assert last < first  # the run trains: a trajectory worth comparing
    _compare_state(ours, theirs, RTOL_TRAJECTORY, "after 20 steps:")


@needs_fused
def test_momentum_none_and_no_running_stats():
    """Cumulative moving average (momentum=None) and track_running_stats=False (batch stats in eval too)."""
    ours, theirs = _pair("resnet18")
    for model in (ours, theirs):
        for i, m in enumerate(model.modules()):
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
                if i % 3 == 0:  # some layers without running statistics
                    m.track_running_stats = False
                    m.running_mean = m.running_var = m.num_batches_tracked = None
    ours, theirs = ours.double(), theirs.double()  # exact parity: no float32 rounding noise
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    theirs, x = like_fused(theirs, x)
    for _ in range(3):
        _close(ours(x), theirs(x), "train logits", RTOL64)
    _compare_state(ours, theirs, RTOL64, "buffers:")
    ours.eval(), theirs.eval()
    with torch.no_grad():
        _close(ours(x), theirs(x), "eval logits", RTOL64)


@needs_fused
def test_autocast_bf16_cpu():
    ours, theirs = _pair("resnet18")
    truth = copy.deepcopy(theirs)  # float32 ground truth
    x = torch.randn(4, 3, 64, 64)
    target = torch.randint(0, 10, (4,))
    theirs, x = like_fused(theirs, x)
    truth = truth.to(memory_format=torch.channels_last)
    exact = truth(x)
    F.cross_entropy(exact, target).backward()
    logits = []
    for model in (ours, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = F.cross_entropy(out, target)
        assert out.dtype == torch.bfloat16
        loss.backward()
        logits.append(out)
    err = _errors(*logits, exact)
    assert err[0] <= 2 * err[1], f"logits: {err}"
    err = _grad_errors(ours, theirs, truth)
    assert err[0] <= 2 * err[1], f"gradients: {err}"
    their_buffers = dict(theirs.named_buffers())
    for name, b in ours.named_buffers():
        assert b.dtype == their_buffers[name].dtype, name  # fp32 buffers stay fp32 under autocast


@needs_fused
def test_torch_compile_fullgraph_trains():
    ours, theirs = _pair("resnet18")
    ours, theirs = ours.double(), theirs.double()  # parity without float32 ReLU-mask noise
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (2,))
    theirs = theirs.to(memory_format=torch.channels_last)
    compiled = torch.compile(ours, fullgraph=True)
    for model in (compiled, theirs):
        F.cross_entropy(model(x), target).backward()
    their_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        _close(p.grad, their_params[name].grad, f"compiled grad of {name}", RTOL_TRAJECTORY)
    _compare_state(ours, theirs, RTOL_TRAJECTORY, "compiled:")
