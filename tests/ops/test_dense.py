"""The classifier's Linear on our GEMM (resnet_fast.ops.linear, nn.fused.linear): against a float64
reference, plans following the weights, and the cases that must stay torch's own nn.Linear.

Tolerance (fp32): 1e-5 of the output's magnitude against float64, as for the conv GEMM (K = 2048
terms of unit scale: ~sqrt(K) * 2^-24 ~ 3e-6 relative)."""

import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from resnet_fast import _ext
from resnet_fast.nn import fused
from resnet_fast.ops import dense, layer_choice

_C = _ext.load()
pytestmark = pytest.mark.skipif(
    _C is None or not _C.conv_gemm_supported(),
    reason="needs resnet_fast._C on an x86-64 CPU with AVX2 + FMA (the GEMM kernel's ISA)",
)


@pytest.fixture
def _gemm_chosen(monkeypatch):
    """As if layer_choice had measured our GEMM faster for a Linear; records the keys asked."""
    keys = []

    def choose(key, run, cache=None, before=None):
        if not key.startswith("linear "):
            return "onednn"  # a conv's
        keys.append(key)
        return "gemm"

    monkeypatch.setattr(layer_choice, "choose_cpu", choose)
    resnet_fast.set_backend("cpp")
    return keys


def _close(out, x, fc):
    expected = F.linear(x.double(), fc.weight.double(), None if fc.bias is None else fc.bias.double())
    assert out.shape == expected.shape and out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("batch, in_features, out_features", [(1, 2048, 1000), (3, 512, 16), (5, 64, 10)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_reference(_gemm_chosen, batch, in_features, out_features, bias):
    fc = torch.nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(batch, in_features)
    with torch.no_grad():
        _close(fused.linear(x, fc), x, fc)
    assert len(_gemm_chosen) == 1


def test_plans_follow_the_weights(_gemm_chosen):
    fc = torch.nn.Linear(64, 20)
    x = torch.randn(2, 64)
    with torch.no_grad():
        _close(fused.linear(x, fc), x, fc)
        fused.linear(x, fc)
        assert len(_gemm_chosen) == 1  # planned once
        fc.weight.mul_(-2)  # in place: version counter
        _close(fused.linear(x, fc), x, fc)
        fc.bias = torch.nn.Parameter(torch.randn(20))  # replaced
        _close(fused.linear(x, fc), x, fc)
        x3 = torch.randn(3, 64)  # another input shape: its own plan
        _close(fused.linear(x3, fc), x3, fc)
        for batch in range(4, 10):  # more shapes than plans kept: the oldest go
            xb = torch.randn(batch, 64)
            _close(fused.linear(xb, fc), xb, fc)
    assert list(dense._PLANS[fc][1]) == [torch.Size([b, 64]) for b in range(6, 10)]


def test_nan_and_inf_reach_the_outputs_torch_gives(_gemm_chosen):
    fc = torch.nn.Linear(32, 24)
    x = torch.randn(2, 32)
    x[0, 3], x[1, 7] = float("nan"), float("inf")
    with torch.no_grad():
        out, expected = fused.linear(x, fc), F.linear(x, fc.weight, fc.bias)
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.isinf(), expected.isinf())


def test_stays_torch_where_it_must(_gemm_chosen):
    fc = torch.nn.Linear(32, 16)
    x = torch.randn(2, 32)
    out = fused.linear(x, fc)  # autograd wanted: torch's Linear, with its graph
    assert out.grad_fn is not None
    seen = []
    fc.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        fused.linear(x, fc)  # a hook must see the call
        with torch.inference_mode():
            plain = torch.nn.Linear(32, 16)
            torch.testing.assert_close(fused.linear(torch.randn(2, 32), plain).shape, torch.Size([2, 16]))
        fused.linear(x.double(), torch.nn.Linear(32, 16).double())  # float64: torch's
    assert len(seen) == 1 and _gemm_chosen == []


def test_resnet_classifier_runs_on_it(_gemm_chosen):
    import torchvision

    theirs = torchvision.models.resnet18(num_classes=10).eval()
    ours = resnet_fast.from_torchvision(theirs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, expected = ours(x), theirs(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert ours.fc in dense._PLANS and len(_gemm_chosen) == 1
