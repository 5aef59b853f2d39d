"""Model API: state_dict round trips, torchvision kwargs, conversion, weights, odd and bad inputs."""

from functools import partial

import pytest
import torch
import torchvision
from _utils import like_fused, randomize_bn
from torch import nn

import resnet_fast


def _assert_same_outputs(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> None:
    theirs_, x_ = like_fused(theirs, x)
    # The reference path runs torchvision's exact ops: 1e-5. Fused eval folds BN into the conv
    # weights, which reorders fp32 rounding through ~50 layers: 1e-4 relative to the logits' scale.
    fused = resnet_fast.ops.backend_for(x.device) != "torch"
    tol = 1e-4 if fused else 1e-5
    with torch.no_grad():
        expected = theirs_.eval()(x_)
        scale = expected.abs().max().item()
        torch.testing.assert_close(ours.eval()(x), expected, rtol=tol, atol=tol * scale)


def test_state_dict_round_trips_both_ways():
    theirs = randomize_bn(torchvision.models.resnet18())
    ours = resnet_fast.resnet18()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = torchvision.models.resnet18()
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("resnet50", dict(replace_stride_with_dilation=[False, True, True])),
        ("resnet50", dict(zero_init_residual=True)),
        ("resnet18", dict(zero_init_residual=True)),
        ("resnet50", dict(groups=4, width_per_group=32)),
        ("resnet18", dict(norm_layer=partial(nn.BatchNorm2d, eps=1e-3, momentum=0.2))),
        ("resnet18", dict(norm_layer=lambda c: nn.GroupNorm(8, c))),
        ("resnet18", dict(num_classes=7)),
    ],
)
def test_kwargs_parity(arch, kwargs):
    torch.manual_seed(3)
    theirs = getattr(torchvision.models, arch)(**kwargs)
    torch.manual_seed(3)
    ours = getattr(resnet_fast, arch)(**kwargs)
    # Same seed, same construction order: identical initialisation (zero_init_residual included).
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    randomize_bn(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    _assert_same_outputs(ours, theirs, torch.randn(2, 3, 64, 64))


def test_fixed_kwargs_are_checked_like_torchvision():
    with pytest.raises(ValueError, match="groups"):
        resnet_fast.resnext50_32x4d(groups=8)


def test_classes_and_builders():
    model = resnet_fast.ResNet50(num_classes=10)
    assert isinstance(model, resnet_fast.ResNet)
    assert model.fc.out_features == 10
    assert isinstance(resnet_fast.resnet50(), resnet_fast.ResNet50)


def test_from_torchvision_trained_model_and_back():
    theirs = torchvision.models.resnet18(num_classes=5)
    opt = torch.optim.SGD(theirs.parameters(), lr=0.1)
    for _ in range(2):  # a "trained" model: moved weights, BN buffers, num_batches_tracked
        opt.zero_grad()
        theirs(torch.randn(4, 3, 32, 32)).sum().backward()
        opt.step()
    theirs.eval()
    ours = resnet_fast.from_torchvision(theirs)
    assert not ours.training
    assert int(ours.bn1.num_batches_tracked) == 2
    _assert_same_outputs(ours, theirs, torch.randn(2, 3, 48, 48))
    back = ours.to_torchvision()
    assert type(back) is torchvision.models.ResNet
    _assert_same_outputs(back, theirs, torch.randn(2, 3, 48, 48))


def test_from_torchvision_keeps_architecture_details():
    theirs = randomize_bn(
        torchvision.models.resnext50_32x4d(replace_stride_with_dilation=[False, False, True])
    )
    ours = resnet_fast.from_torchvision(theirs)
    assert ours.groups == 32 and ours.base_width == 4 and ours.layer4[1].conv2.dilation == (2, 2)
    _assert_same_outputs(ours, theirs, torch.randn(1, 3, 64, 64))


def test_to_torchvision_with_one_input_channel():
    ours = randomize_bn(resnet_fast.resnet18(in_channels=1, num_classes=10))
    theirs = ours.to_torchvision()
    _assert_same_outputs(ours, theirs, torch.randn(2, 1, 28, 28))


def test_weights_load_through_torchvision(monkeypatch):
    source = randomize_bn(torchvision.models.resnet18())
    calls = []

    def fake_get_state_dict(self, progress=True, check_hash=False):
        calls.append((self, check_hash))
        return source.state_dict()

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake_get_state_dict)
    for weights in (torchvision.models.ResNet18_Weights.IMAGENET1K_V1, "IMAGENET1K_V1", "DEFAULT"):
        model = resnet_fast.resnet18(weights=weights)
        _assert_same_outputs(model, source, torch.randn(1, 3, 32, 32))
    assert all(check for _, check in calls)
    with pytest.raises(ValueError, match="num_classes"):
        resnet_fast.resnet18(weights="DEFAULT", num_classes=10)


def test_weights_offline_error_names_cache_path(monkeypatch, tmp_path):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=str(tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth")):
        resnet_fast.resnet50(weights="IMAGENET1K_V1")


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize(
    "shape, in_channels",
    [((1, 3, 64, 64), 3), ((3, 3, 64, 64), 3), ((2, 3, 97, 131), 3), ((2, 1, 28, 28), 1)],
)
def test_odd_inputs(shape, in_channels, backend):
    resnet_fast.set_backend(backend)
    ours = randomize_bn(resnet_fast.resnet18(in_channels=in_channels, num_classes=10)).eval()
    x = torch.randn(shape)
    assert ours(x).shape == (shape[0], 10)
    _assert_same_outputs(ours, ours.to_torchvision(), x)


def test_channels_last_input():
    ours = randomize_bn(resnet_fast.resnet50(num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    _assert_same_outputs(ours, ours.to_torchvision(), x)


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(2, 4, 32, 32), ValueError, r"\[N, 3, H, W\]"),
        (torch.randn(3, 32, 32), ValueError, r"\[N, 3, H, W\]"),
        (torch.randint(0, 255, (2, 3, 32, 32)), TypeError, "floating-point"),
    ],
)
def test_bad_input_is_a_clear_error(x, error, match):
    with pytest.raises(error, match=match):
        resnet_fast.resnet18()(x)
