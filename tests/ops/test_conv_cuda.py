"""The CUDA part of resnet_fast._C (cuDNN fused conv + epilogue kernel) against the PyTorch
reference on the GPU. Marked `gpu`: skipped with a reason where there is none.

Tolerances: fp32 with TF32 off, 1e-4 of the output's magnitude (cuDNN's fused and unfused kernels
order their sums differently); 16-bit types within 2x PyTorch's own error against an fp32
reference from the same rounded inputs, plus one ulp of the output's magnitude.
"""

import pytest
import torch

import resnet_fast
from resnet_fast import _ext, ops
from resnet_fast.ops import conv as conv_ops

pytestmark = pytest.mark.gpu
CL = torch.channels_last
SHAPES = [  # (cin, cout, kernel, stride, padding, dilation, groups, H, W)
    (3, 24, 7, 2, 3, 1, 1, 17, 19),
    (24, 72, 3, 2, 1, 1, 1, 9, 11),
    (72, 72, 3, 1, 2, 2, 1, 10, 10),
    (64, 64, 3, 1, 1, 1, 32, 8, 8),
    (24, 48, 1, 2, 0, 1, 1, 9, 9),
]


@pytest.fixture(autouse=True)
def _cpp_on_cuda():
    module = _ext.load()
    if module is None or not module.with_cuda:
        pytest.skip(f"resnet_fast._C has no CUDA sources here: {_ext.reason() or 'built without them'}")
    resnet_fast.set_backend("cpp")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = tf32


def _case(shape, dtype, residual):
    cin, cout, k, s, p, d, g, h, w = shape
    x = torch.randn(2, cin, h, w, device="cuda").contiguous(memory_format=CL).to(dtype)
    weight = (torch.randn(cout, cin // g, k, k, device="cuda") / (cin // g * k * k) ** 0.5).to(dtype)
    bias = torch.randn(cout, device="cuda").to(dtype)
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    res = (
        torch.randn(2, cout, oh, ow, device="cuda").contiguous(memory_format=CL).to(dtype)
        if residual
        else None
    )
    return (x, weight, bias, res), ([s, s], [p, p], [d, d], g)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv_bias_act_cuda_fp32(shape, residual, relu):
    (x, w, b, res), conv = _case(shape, torch.float32, residual)
    out = ops.conv_bias_act(x, w, b, res, relu, *conv)
    expected = conv_ops._conv_torch(x, w, b, res, relu, *conv)
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv_bias_act_cuda_16bit(shape, dtype):
    args, conv = _case(shape, dtype, residual=True)
    exact = conv_ops._conv_torch(*(t.float() for t in args), True, *conv)
    ours = (ops.conv_bias_act(*args, True, *conv).float() - exact).abs().max()
    theirs = (conv_ops._conv_torch(*args, True, *conv).float() - exact).abs().max()
    ulp = exact.abs().max() * (2**-8 if dtype == torch.bfloat16 else 2**-11)
    assert ours <= 2 * theirs + ulp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "misaligned"])
def test_scale_shift_act_cuda(dtype, layout):
    x = torch.randn(3, 72, 5, 7, device="cuda", dtype=dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=CL)
    if layout == "misaligned":  # not 16-byte aligned: the scalar path
        x = torch.randn(3 * 72 * 5 * 7 + 1, device="cuda", dtype=dtype)[1:].view(3, 72, 5, 7)
    scale, shift = torch.randn(72, device="cuda"), torch.randn(72, device="cuda")
    res = torch.randn_like(x)
    out = ops.scale_shift_act(x, scale, shift, res, True)
    expected = (
        x.double() * scale.double()[:, None, None] + shift.double()[:, None, None] + res.double()
    ).relu()
    tol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 2 ** -(8 if dtype == torch.bfloat16 else 11))
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.abs().max())


def test_eval_resnet50_cuda_matches_torchvision():
    import torchvision
    from _utils import randomize_bn

    theirs = randomize_bn(torchvision.models.resnet50(num_classes=10)).eval().cuda().to(memory_format=CL)
    ours = resnet_fast.resnet50(num_classes=10).eval().cuda()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64, device="cuda").contiguous(memory_format=CL)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual", [True, False])
def test_nan_and_inf_propagate_like_torch(dtype, residual):
    """NaN patch in image 0, one Inf pixel in image 1, a NaN in image 2's residual: the CUDA route (conv,
    then the NaN-propagating epilogue) is non-finite exactly where PyTorch is; image 3 clean."""
    (x, w, b, res), conv = _case((24, 72, 3, 1, 1, 1, 1, 9, 9), torch.float32, residual)
    x, res = torch.cat([x, x]), None if res is None else torch.cat([res, res])
    x[0, :, 2:5, 2:5] = float("nan")
    x[1, 3, 4, 4] = float("inf")
    if res is not None:
        res[2, 5, 1, 1] = float("nan")
    x, w, b = (t.to(dtype) for t in (x, w, b))
    res = None if res is None else res.to(dtype)
    out = ops.conv_bias_act(x, w, b, res, True, *conv)
    expected = conv_ops._conv_torch(
        x.float(), w.float(), b.float(), None if res is None else res.float(), True, *conv
    )
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.isinf(), expected.isinf())
    # A lone Inf pixel meets each output once: +-Inf there (NaN only where a kernel mixes it, e.g.
    # Winograd), so image 1 is checked for non-finite values, not NaN.
    assert out[0].isnan().any() and not out[1].isfinite().all()
    # The epilogue alone (eval BN without a fused conv): NaN and Inf of its input and residual pass through.
    y = conv_ops._conv_torch(x, w, None, None, False, *conv)
    scale = torch.rand(72, device="cuda") + 0.5
    out = ops.scale_shift_act(y, scale, scale, res, True)
    ref = y.float() * scale[:, None, None] + scale[:, None, None]
    ref = (ref if res is None else ref + res.float()).relu()
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
