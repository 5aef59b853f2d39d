"""Same numbers on bad inputs too (issue 15): a batch with NaN pixels in one image and an Inf pixel
in another gives non-finite logits exactly where torchvision's are, in eval and train (gradients and
running statistics included), on every CPU backend and dtype; the clean image matches as usual."""

import copy

import pytest
import torch
import torchvision
from _utils import like_fused, randomize_bn

import resnet_fast

# (dtype, relative tolerance of the clean image's logits against torchvision in the same dtype):
# fp64 exact math, fp32 BN folding reorders rounding (1e-4, as the parity tests), bf16/fp16 round
# differently on every layer (8 and 11 mantissa bits: a few percent of the logits' scale).
CASES = [(torch.float64, 1e-9), (torch.float32, 1e-4), (torch.bfloat16, 1e-1), (torch.float16, 2e-2)]


@pytest.fixture(params=["cpp", "torch"])
def backend(request):
    resnet_fast.set_backend(request.param)
    return request.param


def _batch(dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(3, 3, 48, 48, dtype=dtype)
    x[0, :, 10:20, 10:20] = float("nan")  # a 10x10 patch of NaN pixels
    x[1, 1, 30, 7] = float("inf")  # one Inf pixel
    return x  # image 2 is clean


def _models(dtype: torch.dtype):
    theirs = randomize_bn(torchvision.models.resnet18(num_classes=10)).to(dtype)
    ours = resnet_fast.from_torchvision(theirs)
    return ours, theirs


def _same_nonfinite(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(actual.isnan(), expected.isnan()), f"{name}: NaN positions differ"
    assert torch.equal(actual.isinf(), expected.isinf()), f"{name}: Inf positions differ"


@pytest.mark.parametrize("dtype, tol", CASES, ids=lambda v: str(v))
def test_eval_propagates_nan_and_inf(backend, dtype, tol):
    ours, theirs = _models(dtype)
    x = _batch(dtype)
    theirs_, x_ = like_fused(theirs, x)
    with torch.no_grad():
        expected = theirs_.eval()(x_)
        actual = ours.eval()(x)
    assert expected[0].isnan().all() and not expected[1].isfinite().all() and expected[2].isfinite().all()
    _same_nonfinite("logits", actual, expected)
    scale = expected[2].abs().max().item()
    torch.testing.assert_close(actual[2], expected[2], rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_train_propagates_nan_and_inf(backend, dtype):
    ours, theirs = _models(dtype)
    theirs_, x = like_fused(theirs, _batch(dtype))
    losses = []
    for model in (ours.train(), theirs_.train()):
        loss = model(x).float().logsumexp(1).sum()
        loss.backward()
        losses.append(loss)
    assert not losses[1].isfinite() and not losses[0].isfinite()
    for (name, p), q in zip(ours.named_parameters(), theirs_.parameters(), strict=True):
        _same_nonfinite(f"grad of {name}", p.grad, q.grad)
    for (name, b), c in zip(ours.named_buffers(), theirs_.buffers(), strict=True):
        if b.is_floating_point():
            _same_nonfinite(name, b, c)


def test_a_nonfinite_batch_does_not_poison_later_clean_batches(backend):
    """Eval with a NaN batch, then a clean one: cached folds and plans stay clean."""
    ours, theirs = _models(torch.float32)
    ours.eval()
    clean = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        before = ours(clean)
        ours(_batch(torch.float32))
        after = ours(clean)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert copy.deepcopy(ours) is not None
