"""resnet_fast._C's 1x1 convolution as one GEMM (conv1x1_bias_act) against a float64 reference, its NaN/Inf
behaviour against torch's, its argument errors, and the CPU plan taking it where layer_choice picks it.

Tolerance (fp32): 1e-5 of the output's magnitude. The kernel accumulates in fp32 over K <= 600 terms of
unit scale (relative rounding error about K * 2^-24 ~ 4e-5 at worst, ~1e-6 typically, as the errors
are random), compared with a float64 convolution of the same fp32 inputs.
"""

import pytest
import torch
import torch.nn.functional as F
import torchvision

import resnet_fast
from resnet_fast import _ext
from resnet_fast.ops import conv as conv_ops
from resnet_fast.ops import layer_choice

_C = _ext.load()
pytestmark = pytest.mark.skipif(
    _C is None or not _C.conv1x1_supported(),
    reason="needs resnet_fast._C on an x86-64 CPU with AVX2 + FMA (the 1x1 GEMM kernel's ISA)",
)
CL = torch.channels_last

# (batch, cin, cout, h, w, stride): rows not a multiple of the 6-row tile, one tile or many, K below
# and above the 256-wide K block, one 16-channel panel or many (panel groups when rows are few).
SHAPES = [
    (2, 8, 16, 5, 5, 1),
    (3, 37, 32, 7, 6, 2),
    (1, 300, 48, 3, 3, 1),
    (2, 64, 64, 9, 9, 2),
    (4, 600, 256, 7, 7, 1),
    (2, 16, 128, 14, 13, 1),
]


def _case(batch, cin, cout, h, w, stride, residual):
    x = torch.randn(batch, cin, h, w).contiguous(memory_format=CL)
    weight = torch.randn(cout, cin, 1, 1) / cin**0.5
    bias = torch.randn(cout)
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    res = torch.randn(batch, cout, oh, ow).contiguous(memory_format=CL) if residual else None
    return x, weight, bias, res


def _reference(x, weight, bias, res, relu, stride):
    out = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride)
    if res is not None:
        out = out + res.double()
    return torch.relu(out) if relu else out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [True, False])
def test_matches_float64_reference(shape, residual, relu):
    x, weight, bias, res = _case(*shape, residual)
    stride = shape[-1]
    out = _C.conv1x1_bias_act(x, _C.pack_conv1x1_weight(weight), bias, res, relu, stride)
    expected = _reference(x, weight, bias, res, relu, stride)
    assert out.is_contiguous(memory_format=CL) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_without_bias():
    x, weight, _, _ = _case(2, 24, 32, 6, 6, 1, False)
    out = _C.conv1x1_bias_act(x, _C.pack_conv1x1_weight(weight), None, None, True, 1)
    expected = _reference(x, weight, None, None, True, 1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["input", "residual", "weight"])
def test_nan_and_inf_land_where_torch_puts_them(value, where):
    """The ReLU keeps NaN (torch.relu does; oneDNN's ReLU post-op would give 0), -Inf becomes 0."""
    x, weight, bias, res = _case(2, 32, 32, 5, 5, 1, True)
    {"input": x, "residual": res, "weight": weight}[where][1, 5, 0, 0] = value
    out = _C.conv1x1_bias_act(x, _C.pack_conv1x1_weight(weight), bias, res, True, 1)
    expected = torch.relu(F.conv2d(x, weight, bias) + res)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cin", [32, 600])  # one K block, three
def test_in_place_writes_the_residual(cin):
    x, weight, bias, res = _case(2, cin, 48, 6, 6, 1, True)
    packed = _C.pack_conv1x1_weight(weight)
    expected = _C.conv1x1_bias_act(x, packed, bias, res, True, 1)
    out = _C.conv1x1_bias_act(x, packed, bias, res, True, 1, inplace=True)
    assert out.data_ptr() == res.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="inplace needs a residual"):
        _C.conv1x1_bias_act(x, packed, bias, None, True, 1, inplace=True)


def test_clear_errors():
    x, weight, bias, _ = _case(2, 32, 32, 5, 5, 1, False)
    packed = _C.pack_conv1x1_weight(weight)
    with pytest.raises(RuntimeError, match="channels_last"):
        _C.conv1x1_bias_act(x.contiguous(), packed, bias, None, True, 1)
    with pytest.raises(RuntimeError, match="float32"):
        _C.conv1x1_bias_act(x.double(), packed, bias, None, True, 1)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        _C.pack_conv1x1_weight(torch.randn(24, 32, 1, 1))
    with pytest.raises(RuntimeError, match="1, 1"):
        _C.pack_conv1x1_weight(torch.randn(32, 32, 3, 3))
    with pytest.raises(RuntimeError, match="not packed"):
        _C.conv1x1_bias_act(x, _C.pack_conv1x1_weight(torch.randn(32, 16, 1, 1)), bias, None, True, 1)
    with pytest.raises(RuntimeError, match="residual"):
        _C.conv1x1_bias_act(x, packed, bias, torch.randn(2, 32, 4, 4).contiguous(memory_format=CL), True, 1)


@pytest.fixture
def _always_gemm(monkeypatch):
    """The CPU plan as if layer_choice had measured the GEMM faster for every 1x1 layer."""
    made = []
    real = conv_ops._gemm1x1_runner

    def recording(*args):
        made.append(id(args[2]))  # the layer's weight (an in-place layer makes two runners)
        return real(*args)

    monkeypatch.setattr(conv_ops, "_gemm1x1_runner", recording)
    monkeypatch.setattr(
        layer_choice, "choose_cpu", lambda key, run, cache=None: "gemm1x1" if "gemm1x1" in run else "onednn"
    )
    resnet_fast.set_backend("cpp")
    return made


def _resnet50_pair():
    theirs = torchvision.models.resnet50(num_classes=10).eval()
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return resnet_fast.from_torchvision(theirs).eval(), theirs


def test_model_runs_its_1x1_layers_on_the_gemm(_always_gemm):
    ours, theirs = _resnet50_pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x)
        out = ours(x)
        again = ours(x.contiguous(memory_format=CL))  # same shape, other layout: the plan converts
    assert len(set(_always_gemm)) == sum(  # every 1x1 conv of ResNet-50 fits the kernel
        1 for m in ours.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)
    )
    scale = expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


def test_only_fitting_layers_are_candidates(_always_gemm):
    conv = torch.nn.Conv2d(32, 24, 1, bias=False).eval()  # 24 output channels: not a multiple of 16
    bn = torch.nn.BatchNorm2d(24).eval()
    x = torch.randn(2, 32, 5, 5)
    with torch.no_grad():
        resnet_fast.nn.conv_bn_act(x, conv, bn)
        resnet_fast.nn.conv_bn_act(x.double(), conv.double(), bn.double())  # float64: oneDNN/aten only
    assert _always_gemm == []


def test_info_names_the_candidate():
    assert resnet_fast.info()["cpp conv route"]["cpu float32 1x1"].startswith("oneDNN or the 1x1 GEMM kernel")


def _in_place_plans(model) -> int:
    plans = [
        k
        for m in model.modules()
        if "_resnet_fast_fold" in m.__dict__
        for k in m._resnet_fast_fold.entry.runners
    ]
    return sum(1 for key in plans if key[-1])  # the plan key's last field: residual written in place


def test_residual_added_in_place_only_where_no_one_else_sees_it(_always_gemm):
    """In the model's own forward (no grad, no hooks) each block's last conv writes into its residual;
    a block called directly, or a model with a hook, leaves every tensor the caller holds untouched."""
    ours, theirs = _resnet50_pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
        assert _in_place_plans(ours) == 16  # the last conv of each of ResNet-50's 16 blocks
        held = torch.randn(2, 256, 16, 16).contiguous(memory_format=CL)
        before = held.clone()
        ours.layer1[1](held)  # outside the model's forward: not private
        assert torch.equal(held, before)
        seen = []
        hook = ours.layer1[0].register_forward_hook(lambda m, args, out: seen.append((out, out.clone())))
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
        hook.remove()
        out, copy = seen[0]
        assert torch.equal(out, copy)  # layer1[1] did not write into the output the hook kept


def test_a_hooked_max_pool_keeps_its_output(_always_gemm):
    """ResNet-18's first block has no downsample: its residual is the max pool's output."""
    theirs = torchvision.models.resnet18(num_classes=10).eval()
    ours = resnet_fast.from_torchvision(theirs).eval()
    seen = []
    ours.maxpool.register_forward_hook(lambda m, args, out: seen.append((out, out.clone())))
    with torch.no_grad():
        ours(torch.randn(2, 3, 64, 64))
        assert not ours._activations_private()
    out, copy = seen[0]
    assert torch.equal(out, copy)
