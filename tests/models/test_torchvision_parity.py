"""resnet_fast vs torchvision on the same weights: every builder, eval and train, every backend usable here.

fp32 within 1e-5 relative: the reference path runs torchvision's exact op sequence, and the
fused ops on this machine (add+ReLU) compute the same fp32 values. Fused backends run NHWC, so
torchvision runs channels_last against them (the same conv algorithms on both sides).
"""

import pytest
import torch
import torchvision
from _utils import like_fused, randomize_bn

import resnet_fast

BUILDERS = list(resnet_fast.BUILDERS)
BACKENDS = ["torch", "auto"]
RTOL = 1e-5


def _pair(arch: str):
    theirs = randomize_bn(getattr(torchvision.models, arch)(num_classes=10))
    ours = getattr(resnet_fast, arch)(num_classes=10)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _close(actual, expected, what):
    scale = expected.abs().max().clamp_min(1e-12)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", BUILDERS)
def test_eval_and_train_parity(arch, backend):
    resnet_fast.set_backend(backend)
    ours, theirs = _pair(arch)
    x = torch.randn(2, 3, 64, 64)
    theirs, x = like_fused(theirs, x)

    with torch.no_grad():
        _close(ours.eval()(x), theirs.eval()(x), "eval logits")

    ours.train(), theirs.train()
    if backend != "torch":
        # The fused train BN (tests/models/test_train_parity.py) sums in another order than ATen; in
        # float32 a ReLU input within rounding noise of 0 can then be masked on one side only, moving
        # gradients by percents (torchvision's own float32 gradients differ that much from float64).
        # float64 shows the exact parity.
        ours, theirs, x = ours.double(), theirs.double(), x.double()
    target = torch.randint(0, 10, (2,))
    losses = []
    for model in (ours, theirs):
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        losses.append(loss.detach())
    _close(losses[0], losses[1], "train loss")
    their_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        _close(p.grad, their_params[name].grad, f"grad of {name}")
    their_buffers = dict(theirs.named_buffers())
    for name, b in ours.named_buffers():
        if b.is_floating_point():
            _close(b, their_buffers[name], f"buffer {name}")
        else:
            assert torch.equal(b, their_buffers[name]), name
