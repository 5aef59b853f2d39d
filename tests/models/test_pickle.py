"""Every model pickles, deep-copies and round-trips through torch.save, whatever built it, before
and after a fused forward (whole-model saving and spawn-based multiprocessing pickle models)."""

import copy
import io
import pickle
from functools import partial

import pytest
import torch
import torchvision
from _utils import randomize_bn
from torch import nn

import resnet_fast


def _from_tv_default() -> nn.Module:
    return resnet_fast.from_torchvision(torchvision.models.resnet18(num_classes=10))


def _from_tv_custom_bn() -> nn.Module:
    tv = torchvision.models.resnet18(
        num_classes=10, norm_layer=partial(nn.BatchNorm2d, eps=1e-3, momentum=0.2)
    )
    return resnet_fast.from_torchvision(tv)


def _from_tv_explicit_norm() -> nn.Module:
    norm = partial(nn.BatchNorm2d, eps=1e-4)
    return resnet_fast.from_torchvision(
        torchvision.models.resnet18(num_classes=10, norm_layer=norm), norm_layer=norm
    )


def _sync_bn() -> nn.Module:
    return resnet_fast.convert_sync_batchnorm(resnet_fast.resnet18(num_classes=10))


MAKERS = {
    "builder": lambda: resnet_fast.resnet18(num_classes=10),
    "class": lambda: resnet_fast.ResNet50(num_classes=10),
    "from_torchvision": _from_tv_default,
    "from_torchvision_custom_bn": _from_tv_custom_bn,
    "from_torchvision_norm_layer": _from_tv_explicit_norm,
    "convert_sync_batchnorm": _sync_bn,
}


@pytest.mark.parametrize("forward_first", [False, True], ids=["fresh", "after_forward"])
@pytest.mark.parametrize("maker", list(MAKERS))
def test_model_pickles_copies_and_saves(maker, forward_first):
    model = randomize_bn(MAKERS[maker]()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)  # a fused forward: folds and prepacked weights are cached on the model
        if not forward_first:
            model = randomize_bn(MAKERS[maker]()).eval()
            expected = None
        unpickled = pickle.loads(pickle.dumps(model))
        clone = copy.deepcopy(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        if expected is None:
            expected = model(x)
        for other in (unpickled, clone, loaded):
            assert type(other) is type(model)
            torch.testing.assert_close(other(x), expected, rtol=0, atol=0)


def test_pickled_from_torchvision_keeps_its_norm_layer():
    model = _from_tv_custom_bn()
    loaded = pickle.loads(pickle.dumps(model))
    bn = loaded.layer1[0].bn1
    assert (bn.eps, bn.momentum) == (1e-3, 0.2)
    back = loaded.to_torchvision()  # rebuilds BN modules through the stored norm_layer
    assert (back.layer1[0].bn1.eps, back.layer1[0].bn1.momentum) == (1e-3, 0.2)
