"""Train-mode BN+ReLU outputs rebuilt in the backward (resnet_fast/nn/recompute.py) instead of kept.

The rebuilt tensor is computed by the same kernel from the same inputs as in the forward, so
gradients with and without the recomputation must be bit-identical (torch.equal), in float32.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from _utils import randomize_bn

import resnet_fast
from resnet_fast.nn import recompute
from resnet_fast.nn.batchnorm import train_forward

FUSED = resnet_fast.ops.backend_for(torch.device("cpu")) != "torch"
pytestmark = pytest.mark.skipif(not FUSED, reason="no fused CPU backend here (resnet_fast._C unavailable)")


def _grads(model, x, target):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), target).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_gradients_bit_identical_with_and_without_recomputation(arch):
    torch.manual_seed(0)
    model = randomize_bn(getattr(resnet_fast, arch)(num_classes=10)).train()
    x, target = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    recomputed = _grads(model, x, target)
    model.load_state_dict(state)  # the same running statistics before the second step
    # Someone else's saved-tensor hooks switch the recomputation off (they keep their semantics).
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        kept = _grads(model, x, target)
    for name, g in recomputed.items():
        assert torch.equal(g, kept[name]), name


def test_rebuilt_outputs_are_not_kept_alive(monkeypatch):
    """Every BN(+ReLU) output with a recipe is freed once the forward is done (the graph still alive)."""
    outputs = []
    attach = recompute.attach

    def recording_attach(y, *args):
        attach(y, *args)
        outputs.append(weakref.ref(y))

    monkeypatch.setattr(recompute, "attach", recording_attach)
    model = resnet_fast.resnet50(num_classes=10).train()
    loss = model(torch.randn(2, 3, 64, 64)).sum()
    gc.collect()
    # Stem, conv1/conv2 of 16 bottlenecks, 4 downsample branches.
    assert len(outputs) == 1 + 2 * 16 + 4
    assert all(ref() is None for ref in outputs)
    loss.backward()  # and the backward rebuilds them


def test_in_place_change_of_a_rebuilt_output_raises():
    bn, conv = torch.nn.BatchNorm2d(4).train(), torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    y = train_forward(bn, x, None, True)
    with recompute.recomputed_when_saved(y):
        z = conv(y)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_max_pool_helper_falls_back_for_other_modules():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    identity = torch.nn.Identity()
    assert recompute.max_pool2d(identity, x) is x
    pool = torch.nn.MaxPool2d(3, 2, 1)
    torch.testing.assert_close(recompute.max_pool2d(pool, x), pool(x), rtol=0, atol=0)
