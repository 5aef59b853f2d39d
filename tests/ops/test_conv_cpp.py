"""resnet_fast::conv_bias_act and resnet_fast::scale_shift_act on the cpp backend (resnet_fast._C)
against the unfused PyTorch reference; the eval model running on them.

Tolerances:
- fp32: 1e-4 of the output's magnitude. Both sides are fp32 convolutions accumulating in fp32,
  but oneDNN's fused kernel and torch's conv + separate epilogue order the sums differently.
- fp64 (the aten route): 1e-10, rounding only.
- bf16/fp16: against an fp32 reference computed from the same 16-bit-rounded inputs, the error
  must stay within 2x plain PyTorch's own 16-bit error (torch rounds after the conv and again
  after each epilogue op; ours rounds once), plus one 16-bit ulp of the output's magnitude for
  cases where torch happens to be nearly exact.
"""

import pytest
import torch
from _utils import record_conv_calls

import resnet_fast
from resnet_fast import _ext, fold, ops
from resnet_fast.ops import conv as conv_ops

_C = _ext.load()
pytestmark = pytest.mark.skipif(_C is None, reason=f"resnet_fast._C unavailable: {_ext.reason()}")
CL = torch.channels_last

# (cin, cout, kernel, stride, padding, dilation, groups, H, W): stem, odd channels, stride 2,
# dilation, 1x1, ResNeXt groups, downsample, a tiny spatial output.
SHAPES = [
    (3, 24, 7, 2, 3, 1, 1, 17, 19),
    (24, 72, 3, 2, 1, 1, 1, 9, 11),
    (72, 72, 3, 1, 2, 2, 1, 10, 10),
    (72, 24, 1, 1, 0, 1, 1, 7, 9),
    (64, 64, 3, 1, 1, 1, 32, 8, 8),
    (24, 48, 1, 2, 0, 1, 1, 9, 9),
    (16, 32, 3, 1, 1, 1, 1, 1, 1),
]


@pytest.fixture(autouse=True)
def _cpp_backend():
    resnet_fast.set_backend("cpp")
    yield
    _C.set_cpu_conv_route("auto")


def _case(shape, dtype=torch.float32, residual=True, batch=2):
    cin, cout, k, s, p, d, g, h, w = shape
    x = torch.randn(batch, cin, h, w).contiguous(memory_format=CL).to(dtype)
    weight = (torch.randn(cout, cin // g, k, k) / (cin // g * k * k) ** 0.5).to(dtype)
    bias = torch.randn(cout).to(dtype)
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    res = torch.randn(batch, cout, oh, ow).contiguous(memory_format=CL).to(dtype) if residual else None
    return x, weight, bias, res, dict(stride=[s, s], padding=[p, p], dilation=[d, d], groups=g)


def _reference(x, w, b, res, relu, conv):
    return conv_ops._conv_torch(
        x, w, b, res, relu, conv["stride"], conv["padding"], conv["dilation"], conv["groups"]
    )


def _call(x, w, b, res, relu, conv):
    return ops.conv_bias_act(
        x, w, b, res, relu, conv["stride"], conv["padding"], conv["dilation"], conv["groups"]
    )


def _assert_close(actual, expected, tol):
    scale = expected.abs().max().clamp_min(1e-6)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("route", ["auto", "aten"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv_bias_act_fp32(shape, residual, relu, route):
    _C.set_cpu_conv_route(route)
    x, w, b, res, conv = _case(shape, residual=residual)
    out = _call(x, w, b, res, relu, conv)
    assert out.is_contiguous(memory_format=CL)
    _assert_close(out, _reference(x, w, b, res, relu, conv), 1e-4)


def test_conv_bias_act_without_bias_and_nchw_input():
    x, w, _, res, conv = _case(SHAPES[1])
    out = _call(x.contiguous(), w, None, res.contiguous(), True, conv)
    assert out.is_contiguous(memory_format=CL)  # the op's output is always channels_last
    _assert_close(out, _reference(x, w, None, res, True, conv), 1e-4)


def test_conv_bias_act_fp64_takes_the_aten_route():
    assert _C.conv_route("cpu", torch.float64).startswith("aten")
    x, w, b, res, conv = _case(SHAPES[4], dtype=torch.float64)
    _assert_close(_call(x, w, b, res, True, conv), _reference(x, w, b, res, True, conv), 1e-10)


def _low_precision_errors(shape, dtype, residual, relu):
    x, w, b, res, conv = _case(shape, dtype=dtype, residual=residual)
    up = lambda t: None if t is None else t.float()  # noqa: E731
    exact = _reference(up(x), up(w), up(b), up(res), relu, conv)
    ours = (_call(x, w, b, res, relu, conv).float() - exact).abs().max()
    theirs = (_reference(x, w, b, res, relu, conv).float() - exact).abs().max()
    ulp = exact.abs().max() * (2**-8 if dtype == torch.bfloat16 else 2**-11)
    return ours, theirs, ulp


@pytest.mark.parametrize("route", ["auto", "aten"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("shape", SHAPES[:5], ids=lambda s: "x".join(map(str, s)))
def test_conv_bias_act_bf16_error_within_2x_torch(shape, residual, route):
    _C.set_cpu_conv_route(route)
    ours, theirs, ulp = _low_precision_errors(shape, torch.bfloat16, residual, relu=True)
    assert ours <= 2 * theirs + ulp, f"bf16 error {ours:.3g} vs torch's {theirs:.3g}"


def test_conv_bias_act_fp16_error_within_2x_torch():
    for shape in SHAPES[:3]:
        ours, theirs, ulp = _low_precision_errors(shape, torch.float16, True, relu=True)
        assert ours <= 2 * theirs + ulp, f"fp16 error {ours:.3g} vs torch's {theirs:.3g}"


def test_prepacked_weight_is_used_and_matches():
    x, w, b, res, conv = _case(SHAPES[1])
    packed = _C.prepack_conv_weight(
        w, conv["stride"], conv["padding"], conv["dilation"], conv["groups"], list(x.shape)
    )
    assert packed.is_mkldnn == _C.conv_route("cpu", torch.float32).startswith("onednn")
    out = _C.conv_bias_act(
        x, packed, b, res, True, conv["stride"], conv["padding"], conv["dilation"], conv["groups"]
    )
    _assert_close(out, _reference(x, w, b, res, True, conv), 1e-4)
    # Other batch sizes run with the same packed weight.
    x1 = x[:1].contiguous(memory_format=CL)
    out1 = _C.conv_bias_act(
        x1, packed, b, res[:1], True, conv["stride"], conv["padding"], conv["dilation"], 1
    )
    _assert_close(out1, _reference(x1, w, b, res[:1], True, conv), 1e-4)


def test_zero_batch():
    x, w, b, res, conv = _case(SHAPES[1], batch=0)
    out = _call(x, w, b, res, True, conv)
    assert out.shape == (0, 72, 5, 6) and out.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("channels", [3, 24, 33, 72])
def test_scale_shift_act(channels, layout, dtype):
    x = torch.randn(2, channels, 5, 7, dtype=dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=CL)
    scale, shift = torch.randn(channels), torch.randn(channels)
    res = torch.randn(x.shape, dtype=dtype)  # NCHW: converted to x's layout by the op
    for residual, relu in ((None, True), (res, True), (res, False)):
        out = ops.scale_shift_act(x, scale, shift, residual, relu)
        assert out.dtype == dtype and out.stride() == x.stride()
        expected = x.double() * scale.double()[:, None, None] + shift.double()[:, None, None]
        if residual is not None:
            expected = expected + residual.double()
        if relu:
            expected = expected.relu()
        # Math in fp32 (fp64 for fp64), one rounding to the output dtype.
        tol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(
            dtype, 2 ** -(8 if dtype == torch.bfloat16 else 11)
        )
        _assert_close(out.double(), expected, tol)


def test_scale_shift_act_2d_and_nan():
    x = torch.tensor([[float("nan"), -1.0, 2.0]] * 4)
    out = ops.scale_shift_act(x, torch.ones(3), torch.zeros(3), None, True)
    assert torch.equal(out.isnan(), x.isnan())  # ReLU propagates NaN like torch.relu


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: {**a, "w": a["w"].double()}, "w is torch.float64"),
        (lambda a: {**a, "groups": 5}, "do not match"),
        (lambda a: {**a, "residual": a["residual"][:, :, :2]}, "residual shape"),
        (
            lambda a: {**a, "x": a["x"][:, :, :1, :1], "padding": [0, 0], "residual": None},
            "smaller than the kernel",
        ),
        (lambda a: {**a, "stride": [0, 1]}, "stride must be"),
        (lambda a: {**a, "b": a["b"][:3]}, "b must have shape"),
        (lambda a: {**a, "x": a["x"].int()}, "floating-point"),
    ],
)
def test_conv_bias_act_bad_input(mutate, match):
    x, w, b, res, conv = _case(SHAPES[1])
    args = mutate(dict(x=x, w=w, b=b, residual=res, relu=True, **conv))
    with pytest.raises((ValueError, TypeError), match=match):
        ops.conv_bias_act(**args)


def test_extension_checks_its_inputs():
    x, w, b, res, conv = _case(SHAPES[1])
    args = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    with pytest.raises(RuntimeError, match="bias must be 1-D with 72"):
        _C.conv_bias_act(x, w, b[:5], res, True, *args)
    with pytest.raises(RuntimeError, match="residual shape"):
        _C.conv_bias_act(x, w, b, res[:1], True, *args)
    with pytest.raises(RuntimeError, match="weight dtype"):
        _C.conv_bias_act(x, w.double(), b, res, True, *args)
    with pytest.raises(RuntimeError, match="stride must have 2 values"):
        _C.conv_bias_act(x, w, b, res, True, [1], *args[1:])
    with pytest.raises(RuntimeError, match="scale must be 1-D with 24"):
        _C.scale_shift_act(x, torch.ones(3), torch.ones(24), None, True)
    with pytest.raises(RuntimeError, match="expected 'auto' or 'aten'"):
        _C.set_cpu_conv_route("fast")


def test_scale_shift_act_bad_input():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="scale must be"):
        ops.scale_shift_act(x, torch.ones(5), torch.ones(4), None, True)
    with pytest.raises(ValueError, match="residual"):
        ops.scale_shift_act(x, torch.ones(4), torch.ones(4), x.double(), True)


def test_opcheck_fake_and_autograd_registration():
    x, w, b, res, conv = _case(SHAPES[1], dtype=torch.float64)
    args = (x, w, b, res, True, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    torch.library.opcheck(torch.ops.resnet_fast.conv_bias_act.default, args)
    torch.library.opcheck(
        torch.ops.resnet_fast.scale_shift_act.default,
        (x, torch.randn(24, dtype=torch.float64), torch.randn(24), x, True),
    )


def test_gradients_match_torch():
    # Tiny fp64 shapes: gradcheck costs two forwards per input element.
    x, w, b, res, conv = _case((4, 4, 3, 1, 1, 1, 2, 4, 5), dtype=torch.float64, batch=1)
    for t in (x, w, b, res):
        t.requires_grad_(True)
    torch.autograd.gradcheck(lambda *t: _call(*t, True, conv), (x, w, b, res))
    scale = torch.randn(4, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *t: ops.scale_shift_act(*t, True), (x, scale, shift, torch.randn_like(x)))


def test_compile_fullgraph_keeps_the_fused_eval_model_whole():
    model = resnet_fast.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        _assert_close(compiled(x), expected, 1e-5)


def _count_cpp_convs(monkeypatch, model, x):
    calls = []
    with monkeypatch.context() as patch:
        record_conv_calls(patch, "cpp", lambda x, w, *rest: calls.append(w.shape))
        with torch.no_grad():
            out = model(x)
    return out, calls


def test_eval_resnet50_runs_every_conv_through_cpp_conv_bias_act(monkeypatch):
    model = resnet_fast.ResNet50(num_classes=10).eval()
    bn_calls = []
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda *a: bn_calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    # Hooks make a pair unfused (their behaviour must run): remove them, count again.
    out, calls = _count_cpp_convs(monkeypatch, model, x)
    assert calls == [] and len(bn_calls) == 53
    for m in model.modules():
        m._forward_pre_hooks.clear()
    bn_calls.clear()
    fused_out, calls = _count_cpp_convs(monkeypatch, model, x)
    assert len(calls) == 53 and not bn_calls  # stem + 16 blocks x 3 + 4 downsamples, no BN module runs
    _assert_close(fused_out, out, 1e-4)


def test_training_and_grad_mode_stay_unfused(monkeypatch):
    model = resnet_fast.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    calls = []
    record_conv_calls(monkeypatch, "cpp", lambda *a: calls.append(1))
    model(x).sum().backward()  # grads needed: the fold would cut them off
    assert not calls and x.grad is not None
    with torch.no_grad():
        model(x)
    assert len(calls) == 20
    assert fold.folded(model.conv1, model.bn1).packed  # the stem weight was prepacked and cached


@pytest.mark.parametrize("arch", list(resnet_fast.BUILDERS))
def test_eval_model_matches_torchvision(arch, monkeypatch):
    import torchvision
    from _utils import like_fused, randomize_bn

    theirs = randomize_bn(getattr(torchvision.models, arch)(num_classes=10)).eval()
    ours = getattr(resnet_fast, arch)(num_classes=10).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 3, 64, 64)
    theirs, x = like_fused(theirs, x)
    out, calls = _count_cpp_convs(monkeypatch, ours, x)
    assert len(calls) == sum(isinstance(m, torch.nn.Conv2d) for m in ours.modules())
    with torch.no_grad():
        expected = theirs(x)
    # Folding changes the fp32 rounding of every layer (w * s summed vs sum then * s): 1e-4 of the
    # logits' magnitude leaves room for it through 100+ layers; a wrong fold is off by O(1).
    _assert_close(out, expected, 1e-4)


def test_one_prepacked_weight_per_input_shape_at_most_four(monkeypatch):
    from resnet_fast.ops import layer_choice

    monkeypatch.setattr(layer_choice, "choose_cpu", lambda key, run, cache=None, before=None: "onednn")
    conv, bn = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False).eval(), torch.nn.BatchNorm2d(16).eval()
    for batch in (1, 2, 3, 4, 5, 1):
        x = torch.randn(batch, 8, 6, 6).contiguous(memory_format=CL)
        with torch.no_grad():
            _assert_close(resnet_fast.nn.conv_bn_act(x, conv, bn), torch.relu(bn(conv(x))), 1e-4)
    packed = [k for k in fold.folded(conv, bn).packed if k[0] == "cpp"]  # oneDNN's (ours: none, not chosen)
    assert len(packed) == conv_ops._MAX_PACKS_PER_WEIGHT
    assert sorted(k[-4] for k in packed) == [1, 3, 4, 5]  # oldest evicted first; batch 1 packed again
    assert ("winograd",) not in fold.folded(conv, bn).packed


@pytest.mark.parametrize("poison", [None, "input", "residual"])
def test_onednn_adds_the_residual_in_place_where_allowed(monkeypatch, poison):
    """In a forward with private activations, a oneDNN layer's output goes into its residual (oneDNN's
    in-place binary op), NaN kept as torch keeps it; outside one, the residual is left alone."""
    from resnet_fast.ops import layer_choice

    monkeypatch.setattr(layer_choice, "choose_cpu", lambda key, run, cache=None, before=None: "onednn")
    resnet_fast.set_backend("cpp")
    conv, bn = torch.nn.Conv2d(32, 64, 1, bias=False).eval(), torch.nn.BatchNorm2d(64).eval()
    x = torch.randn(2, 32, 5, 5).contiguous(memory_format=CL)
    res = torch.randn(2, 64, 5, 5).contiguous(memory_format=CL)
    if poison is not None:
        {"input": x, "residual": res}[poison][1, 3, 2, 2] = float("nan")
    with torch.no_grad():
        expected = torch.relu(bn(conv(x)) + res)
        held = res.clone()
        out = resnet_fast.nn.conv_bn_act(x, conv, bn, held)
        assert torch.equal(held.nan_to_num(), res.nan_to_num())  # not private: untouched
        with ops.buffers.using(ops.Buffers()):
            out = resnet_fast.nn.conv_bn_act(x, conv, bn, held)
    assert out.data_ptr() == held.data_ptr()
    assert torch.equal(out.isnan(), expected.isnan())
    _assert_close(out.nan_to_num(), expected.nan_to_num(), 1e-5)
