"""resnet_fast._C's own CPU convolutions against a float64 reference: the implicit GEMM
(conv_gemm_bias_act, any kernel size, stride, padding, dilation) and Winograd F(2x2, 3x3) and
F(4x4, 3x3) (conv_winograd_bias_act); their NaN/Inf behaviour against torch's, writing into a given tensor
(the residual itself, a kept buffer), their argument errors, and the CPU plan taking them where
layer_choice picks them, with the model's buffers kept from one forward to the next.

Tolerance (fp32): 1e-5 of the output's magnitude, compared with a float64 convolution of the same
fp32 inputs. The GEMM accumulates in fp32 over K = KH*KW*Cin <= 2,700 terms of unit scale: random
rounding errors give ~sqrt(K) * 2^-24 ~ 3e-6 relative to the magnitude. Winograd adds its transforms:
sums of at most 4 terms with coefficients 1 (input, output) and 1/2 (weights, done in float64), so a
few more roundings per output; measured here at 3e-7 to 8e-7, below torch's own fp32 conv (7e-7 to 3e-6).
F(4x4, 3x3)'s transforms have larger coefficients (input: up to 5, rows summing to 10 in magnitude;
output: up to 8, rows summing to 19; weights: 1/4 to 1/24, done in float64), which multiply the
roundings of the products they combine: measured at 2e-7 to 1e-5 of the magnitude (K up to 4,608), so
its tolerance is 5e-5. Through a whole ResNet-50 the logits stay within 2e-6 of torchvision's (relative
to their largest), against the 1e-4 the model promises (test_model_runs_every_layer_on_our_kernels).
"""

import resource
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from _utils import torchvision_pair

import resnet_fast
from resnet_fast import _ext, fold
from resnet_fast.nn import fused
from resnet_fast.ops import conv as conv_ops
from resnet_fast.ops import layer_choice
from resnet_fast.ops.buffers import Buffers

_C = _ext.load()
pytestmark = pytest.mark.skipif(
    _C is None or not _C.conv_gemm_supported(),
    reason="needs resnet_fast._C on an x86-64 CPU with AVX2 + FMA (the GEMM and Winograd kernels' ISA)",
)
CL = torch.channels_last

# (batch, cin, cout, h, w, kernel, stride, padding, dilation): rows not a multiple of the 6-row tile,
# one tile or many, K below and above the 256-wide K block, one 16-channel panel or many (panel groups
# when rows are few), padding wider than the kernel's reach, the stem's 7x7 stride 2.
GEMM_SHAPES = [
    (2, 8, 16, 5, 5, 1, 1, 0, 1),
    (3, 37, 32, 7, 6, 1, 2, 0, 1),
    (4, 600, 256, 7, 7, 1, 1, 0, 1),
    (2, 16, 128, 14, 13, 1, 1, 0, 1),
    (2, 64, 64, 9, 9, 3, 1, 1, 1),
    (2, 300, 48, 6, 5, 3, 2, 1, 1),
    (1, 24, 32, 7, 7, 3, 1, 2, 2),
    (2, 3, 64, 20, 22, 7, 2, 3, 1),
    (1, 16, 64, 14, 14, 1, 1, 0, 1),  # 196 rows: tasks of 66, 66 and 64 rows
    (1, 40, 112, 7, 7, 1, 1, 0, 1),  # 7 panels: AVX-512 tiles of 4 panels and of 3
]
# (batch, cin, cout, h, w, kernel, stride, padding) for the GEMM over kernel rows ("gemm_rows", layers
# with fewer than 8 input channels): the stem, MNIST's 1-channel first conv, no padding, stride 3.
ROWS_SHAPES = [
    (2, 3, 64, 23, 20, 7, 2, 3),
    (3, 1, 16, 28, 28, 3, 1, 1),
    (1, 5, 32, 9, 11, 5, 1, 0),
    (2, 3, 16, 16, 16, 4, 3, 2),
]
# (batch, cin, cout, h, w, padding): odd output sizes (partial 2x2 tiles), K above the K block.
WINOGRAD_SHAPES = [
    (2, 64, 64, 9, 9, 1),
    (1, 16, 16, 3, 3, 1),
    (2, 296, 32, 5, 7, 0),
    (1, 512, 48, 7, 7, 1),
]


@pytest.fixture(params=["avx2+fma", "avx512f"])
def isa(request, monkeypatch):
    """Each micro-kernel in turn: AVX2's (forced by RESNET_FAST_CPU_ISA=avx2 on an AVX-512 CPU), and
    AVX-512's where the CPU has it."""
    monkeypatch.delenv("RESNET_FAST_CPU_ISA", raising=False)
    if request.param == "avx2+fma":
        monkeypatch.setenv("RESNET_FAST_CPU_ISA", "avx2")
    elif _C.conv_gemm_isa() != "avx512f":
        pytest.skip("this CPU has no AVX-512F: the AVX-512 micro-kernel cannot run here")
    assert _C.conv_gemm_isa() == request.param
    return request.param


def _case(batch, cin, cout, h, w, k, stride, padding, dilation, residual):
    x = torch.randn(batch, cin, h, w).contiguous(memory_format=CL)
    weight = torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5
    bias = torch.randn(cout)
    oh = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    ow = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    res = torch.randn(batch, cout, oh, ow).contiguous(memory_format=CL) if residual else None
    return x, weight, bias, res


def _reference(x, weight, bias, res, relu, stride, padding, dilation):
    out = F.conv2d(
        x.double(), weight.double(), None if bias is None else bias.double(), stride, padding, dilation
    )
    if res is not None:
        out = out + res.double()
    return torch.relu(out) if relu else out


def _close(out, expected, tol=1e-5):
    assert out.is_contiguous(memory_format=CL) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


WINOGRAD_TOL = {2: 1e-5, 4: 5e-5}  # per tile size: see the module docstring


def _cl_view(memory, offset, shape):
    """A channels_last [N, C, H, W] tensor at `offset` floats into memory (a tensor or a storage)."""
    n, c, h, w = shape
    base = memory if isinstance(memory, torch.Tensor) else torch.tensor([], dtype=torch.float32).set_(memory)
    return base[offset : offset + n * c * h * w].view(n, h, w, c).permute(0, 3, 1, 2)


def _gemm(x, weight, bias, res, relu, s, p, d, out=None):
    return _C.conv_gemm_bias_act(
        x, _C.pack_conv_gemm_weight(weight), bias, res, relu, [s, s], [p, p], [d, d], out
    )


def _winograd(x, weight, bias, res, relu, p, out=None, workspace=None, tile=2):
    return _C.conv_winograd_bias_act(
        x, _C.pack_winograd_weight(weight, tile), bias, res, relu, [p, p], out, workspace
    )


@pytest.mark.parametrize("shape", GEMM_SHAPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [True, False])
def test_gemm_matches_float64_reference(isa, shape, residual, relu):
    x, weight, bias, res = _case(*shape, residual)
    s, p, d = shape[-3:]
    _close(_gemm(x, weight, bias, res, relu, s, p, d), _reference(x, weight, bias, res, relu, s, p, d))


@pytest.mark.parametrize("shape", WINOGRAD_SHAPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_matches_float64_reference(isa, shape, residual, relu, tile):
    batch, cin, cout, h, w, p = shape
    x, weight, bias, res = _case(batch, cin, cout, h, w, 3, 1, p, 1, residual)
    out = _winograd(x, weight, bias, res, relu, p, tile=tile)
    _close(out, _reference(x, weight, bias, res, relu, 1, p, 1), WINOGRAD_TOL[tile])


@pytest.mark.parametrize("shape", ROWS_SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_gemm_over_kernel_rows_matches_float64_reference(isa, shape, residual):
    batch, cin, cout, h, w, k, stride, padding = shape
    x, weight, bias, res = _case(batch, cin, cout, h, w, k, stride, padding, 1, residual)
    geometry = ([stride] * 2, [padding] * 2, [1, 1])
    kernels = conv_ops._own_kernels(_C, {}, x, weight, lambda: weight, bias, True, *geometry, 1, None)
    assert list(kernels) == ["gemm_rows"]
    run = kernels["gemm_rows"][0]
    expected = _reference(x, weight, bias, res, True, stride, padding, 1)
    _close(run(x.contiguous(), res, None, None), expected)  # from NCHW: the padded copy converts
    # Into kept buffers, twice: the padded input's border must stay zero when its buffer is reused.
    buffers = Buffers()
    buffers.start(x)
    for _ in range(2):
        out = buffers.output(list(expected.shape), x)
        assert run(x, res, out, buffers).data_ptr() == out.data_ptr()
        _close(out, expected)
        x.mul_(-1)  # a new input (negated: the reference too) in the same buffers
        expected = _reference(x, weight, bias, res, True, stride, padding, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("extra", [0, 1, 5])  # zero channels added
def test_pad_cl_pads_space_and_channels(dtype, extra):
    """The padded copy the GEMM over kernel rows reads: x zero-padded in H, W and channels, whatever
    was in the buffer before, from a channels_last or a contiguous x."""
    x = torch.randn(2, 3, 5, 7, dtype=dtype)
    expected = F.pad(x, (2, 2, 1, 1, 0, extra))
    for source in (x, x.contiguous(memory_format=CL)):
        out = torch.full(expected.shape, float("nan"), dtype=dtype).contiguous(memory_format=CL)
        _C.pad_cl(source, [1, 2], out)
        assert torch.equal(out, expected)
    with pytest.raises(RuntimeError, match="out must be"):
        _C.pad_cl(x, [1, 1], torch.empty(2, 3, 7, 9, dtype=dtype))  # not channels_last


def test_without_bias():
    x, weight, _, _ = _case(2, 24, 32, 6, 6, 3, 1, 1, 1, False)
    expected = _reference(x, weight, None, None, True, 1, 1, 1)
    _close(_gemm(x, weight, None, None, True, 1, 1, 1), expected)
    _close(_winograd(x, weight, None, None, True, 1), expected)
    _close(_winograd(x, weight, None, None, True, 1, tile=4), expected, WINOGRAD_TOL[4])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["input", "residual"])
def test_gemm_puts_nan_and_inf_where_torch_does(isa, value, where):
    """The ReLU keeps NaN (torch.relu does; oneDNN's ReLU post-op would give 0), -Inf becomes 0. (A
    non-finite weight never reaches the kernel: see test_only_fitting_layers_are_candidates.)"""
    x, weight, bias, res = _case(2, 32, 32, 5, 5, 3, 1, 1, 1, True)
    {"input": x, "residual": res}[where][1, 5, 2, 2] = value
    out = _gemm(x, weight, bias, res, True, 1, 1, 1)
    expected = torch.relu(F.conv2d(x, weight, bias, 1, 1) + res)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "overflow"])
def test_winograd_refuses_what_its_transform_would_spread(tile, value):
    """The kernel returns None, having written nothing (here into the residual itself), where an input it
    reads is Inf or NaN, or large enough for its input transform to overflow (two adjacent 3e38: their
    sum is past float32's range, torch's convolution stays finite); a large finite input runs."""
    x, weight, bias, res = _case(2, 32, 32, 5, 5, 3, 1, 1, 1, True)
    before = res.clone()
    if value == "overflow":
        x[1, 5, 2, 2:4] = 3e38
        assert F.conv2d(x, weight, bias, 1, 1).isfinite().all()
    else:
        x[1, 5, 4, 4] = value  # a corner: in one tile only
    assert _winograd(x, weight, bias, res, True, 1, out=res, tile=tile) is None
    assert torch.equal(res, before)
    x[1, 5] = 1e30
    out = _winograd(x, weight, bias, res, True, 1, out=res, tile=tile)
    assert out is not None and out.data_ptr() == res.data_ptr() and out.isfinite().all()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["input", "residual"])
@pytest.mark.parametrize("_always_ours", ["winograd", "winograd4"], indirect=True)
def test_winograd_layer_puts_nan_and_inf_where_torch_does(request, _always_ours, value, where):
    """Winograd's transforms would spread one non-finite input over its 4x4 or 6x6 patch: the kernel
    refuses it and the layer's plan runs oneDNN's path for that call instead; a residual is added after
    them."""
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False).eval()
    bn = torch.nn.BatchNorm2d(32).eval()
    x, _, _, res = _case(2, 32, 32, 5, 5, 3, 1, 1, 1, True)
    with torch.no_grad():
        resnet_fast.nn.conv_bn_act(x, conv, bn, res)  # the plan, on finite inputs
        assert _always_ours == [request.node.callspec.params["_always_ours"]]
        {"input": x, "residual": res}[where][1, 5, 2, 2] = value
        out = resnet_fast.nn.conv_bn_act(x, conv, bn, res)
        expected = torch.relu(bn(conv(x)) + res)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("_always_ours", ["winograd", "winograd4"], indirect=True)
@pytest.mark.parametrize("k", [1, 3])
def test_a_nonfinite_weight_runs_onednn(monkeypatch, _always_ours, cached, k):
    """Our packers report a NaN weight: with no cached choice, nothing is measured and oneDNN runs; with one
    (ours, measured on finite weights of the same shape), the plan runs oneDNN on the folded weight. Either
    way NaN goes where torch puts it (the GEMM would multiply it by a padding zero)."""
    if cached:
        monkeypatch.setattr(layer_choice, "known_cpu", lambda key, paths, cache=None: "ours")
    conv = torch.nn.Conv2d(16, 32, k, padding=k // 2, bias=False).eval()
    bn = torch.nn.BatchNorm2d(32).eval()
    with torch.no_grad():
        conv.weight[3, 2, 0, 0] = float("nan")
        x = torch.randn(2, 16, 6, 6)
        out = resnet_fast.nn.conv_bn_act(x, conv, bn)
        expected = torch.relu(bn(conv(x)))
    assert _always_ours == ([_always_ours[0]] if cached else [])  # measured (chosen) only when cached
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any()
    finite = expected.isfinite()
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["gemm", "winograd", "winograd4"])
@pytest.mark.parametrize("cin", [32, 600])  # one K block, three
def test_writes_into_the_residual_or_a_given_buffer(isa, kernel, cin):
    x, weight, bias, res = _case(2, cin, 48, 6, 6, 3, 1, 1, 1, True)
    tile = 4 if kernel == "winograd4" else 2

    def run(res, out=None):
        if kernel == "gemm":
            return _gemm(x, weight, bias, res, True, 1, 1, 1, out)
        return _winograd(x, weight, bias, res, True, 1, out, tile=tile)

    expected = run(res.clone())
    buffer = torch.full_like(res, float("nan"))
    assert run(res, buffer).data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer, expected, rtol=0, atol=0)
    out = run(res, res)  # in place
    assert out.data_ptr() == res.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # A buffer sharing memory with the input, or partly with the residual, is refused.
    base = torch.empty(2 * res.numel())
    residual, shifted = _cl_view(base, 0, res.shape).copy_(res), _cl_view(base, 16, res.shape)
    with pytest.raises(RuntimeError, match="single memory location"):
        run(residual, shifted)
    packed_x = _cl_view(torch.empty(x.numel() + res.numel()), 0, x.shape).copy_(x)
    out = _cl_view(packed_x.untyped_storage(), 8, res.shape)  # shares memory with the input
    with pytest.raises(RuntimeError, match="single memory location"):
        if kernel == "gemm":
            _C.conv_gemm_bias_act(
                packed_x, _C.pack_conv_gemm_weight(weight), bias, None, True, [1, 1], [1, 1], [1, 1], out
            )
        else:
            _C.conv_winograd_bias_act(
                packed_x, _C.pack_winograd_weight(weight, tile), bias, None, True, [1, 1], out
            )
    with pytest.raises(RuntimeError, match="out must be"):
        run(None, torch.empty(2, 48, 5, 5).contiguous(memory_format=CL))


# The weight transform's G per tile size: F(2x2, 3x3) on the points 0, 1, -1, infinity; F(4x4, 3x3) on 0,
# 1, -1, 2, -2, infinity.
_G = {
    2: [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
    4: [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
}


@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_weight_is_g_w_gt_from_float64(tile):
    """The packed weight U = G g G^T in [positions][Cout/16][Cin][16] panels, against float64: F(2x2)'s
    halves are exact, so U is the float64 result rounded to float32; F(4x4)'s sixths and 24ths are not,
    and U may sit one float32 step from it (one float64 division, then the rounding to float32)."""
    torch.manual_seed(0)
    cout, cin, n = 48, 24, tile + 2
    weight = torch.randn(cout, cin, 3, 3) * torch.logspace(-3, 3, cin).reshape(1, cin, 1, 1)
    G = torch.tensor(_G[tile], dtype=torch.float64)
    u = (G @ weight.double() @ G.T).reshape(cout // 16, 16, cin, n * n).permute(3, 0, 2, 1)
    packed = _C.pack_winograd_weight(weight, tile)
    assert packed.shape == (n * n, cout // 16, cin, 16) and packed.dtype == torch.float32
    if tile == 2:
        assert torch.equal(packed, u.float())
    else:
        step = torch.finfo(torch.float32).eps * u.abs()  # at least one float32 step of the value
        assert ((packed.double() - u).abs() <= step).all()


@pytest.mark.parametrize(
    "kind",
    ["gemm float32", "gemm bfloat16", "gemm 3x3 bfloat16", "winograd 2", "winograd 4", "winograd 2 bfloat16"],
)
def test_packing_from_conv_weight_and_bn_scale_is_packing_the_folded_weight(kind):
    """A BN fold is packed from the conv weight and the BN scale without writing the folded weight: the same
    bits as packing the weight fold.folded makes (float32 product, one rounding to the run dtype); None where
    a packed value is not finite (a NaN weight, or a product or transform past float32's range)."""
    if "bfloat16" in kind and not _C.conv_gemm_bf16_supported():
        pytest.skip("bfloat16 packing is for CPUs with AVX512_BF16; this one has none")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if "bfloat16" in kind else torch.float32
    k = 1 if kind.startswith("gemm") and "3x3" not in kind else 3
    weight = torch.randn(48, 24, k, k).to(dtype)
    scale = torch.rand(48) * 3 + 0.01
    if kind.startswith("winograd"):
        tile = int(kind.split()[1])

        def pack(w, s=None):
            return _C.pack_winograd_weight(w, tile, s)

    else:

        def pack(w, s=None):
            return _C.pack_conv_gemm_weight(w, s)

    assert torch.equal(pack(weight, scale), pack(fold._scaled(weight, scale, dtype)))
    assert torch.equal(pack(weight), pack(weight, torch.ones(48)))
    nan = weight.clone()
    nan[5, 3, 0, 0] = float("nan")
    assert pack(nan) is None and pack(nan, scale) is None
    big = weight.clone()
    big[7, 1] = 2e38  # every tap
    assert pack(big, torch.full((48,), 2.0)) is None  # 4e38: Inf
    # F(2x2)'s G rows sum to 1.5 in magnitude (F(4x4)'s to at most 1): its transform alone passes the range.
    assert (pack(big) is None) == kind.startswith("winograd 2")
    with pytest.raises(RuntimeError, match="scale must be"):
        pack(weight, torch.ones(47))


@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_workspace(tile):
    x, weight, bias, _ = _case(2, 64, 32, 9, 9, 3, 1, 1, 1, False)
    need = _C.winograd_workspace_size(list(x.shape), 32, [1, 1], tile)
    tiles = 2 * (-(-9 // tile)) ** 2  # 9x9 outputs per image in tiles of tile x tile
    assert need == (tile + 2) ** 2 * tiles * (64 + 32)
    expected = _winograd(x, weight, bias, None, True, 1, tile=tile)
    torch.testing.assert_close(
        _winograd(x, weight, bias, None, True, 1, workspace=torch.empty(need), tile=tile), expected
    )
    with pytest.raises(RuntimeError, match="workspace"):
        _winograd(x, weight, bias, None, True, 1, workspace=torch.empty(need - 1), tile=tile)


def test_clear_errors():
    x, weight, bias, _ = _case(2, 32, 32, 5, 5, 3, 1, 1, 1, False)
    packed = _C.pack_conv_gemm_weight(weight)
    geometry = ([1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="channels_last"):
        _C.conv_gemm_bias_act(x.contiguous(), packed, bias, None, True, *geometry)
    with pytest.raises(RuntimeError, match="float32"):
        _C.conv_gemm_bias_act(x.double(), packed, bias, None, True, *geometry)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        _C.pack_conv_gemm_weight(torch.randn(24, 32, 1, 1))
    with pytest.raises(RuntimeError, match="not packed"):
        _C.conv_gemm_bias_act(
            x, _C.pack_conv_gemm_weight(torch.randn(32, 16, 3, 3)), bias, None, True, *geometry
        )
    with pytest.raises(RuntimeError, match="residual"):
        _C.conv_gemm_bias_act(
            x, packed, bias, torch.randn(2, 32, 4, 4).contiguous(memory_format=CL), True, *geometry
        )
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        _C.conv_gemm_bias_act(x, packed, bias, None, True, [1, 1], [0, 0], [3, 3])
    with pytest.raises(RuntimeError, match="3, 3"):
        _C.pack_winograd_weight(torch.randn(32, 32, 1, 1))
    with pytest.raises(RuntimeError, match="tile must be 2"):
        _C.pack_winograd_weight(weight, 3)
    with pytest.raises(RuntimeError, match="not packed|AVX512_BF16"):  # its packed weight is float32
        _C.conv_winograd_bias_act(x.bfloat16(), _C.pack_winograd_weight(weight), bias, None, True, [1, 1])
    with pytest.raises(RuntimeError, match="multiple of 8"):
        _winograd(
            torch.randn(1, 12, 5, 5).contiguous(memory_format=CL),
            torch.randn(16, 12, 3, 3),
            None,
            None,
            True,
            1,
        )


@pytest.fixture
def _always_ours(request, monkeypatch):
    """The CPU plan as if layer_choice had measured our kernel faster wherever one runs the layer
    (Winograd F(2x2, 3x3), or the path given as the fixture's parameter, for 3x3 stride-1 layers; the
    parameter "amx" takes the AMX paths wherever they run); returns the paths taken, one per plan made."""
    taken = []
    winograd = getattr(request, "param", "winograd")

    def choose(key, run, cache=None, before=None):
        path = next((p for p in (winograd, f"{winograd}_rows", "gemm", "gemm_rows") if p in run), "onednn")
        taken.append(path)
        return path

    monkeypatch.setattr(layer_choice, "choose_cpu", choose)
    resnet_fast.set_backend("cpp")
    return taken


def _assert_matches(out, expected):
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("_always_ours", ["winograd", "winograd4"], indirect=True)
def test_model_runs_every_layer_on_our_kernels(request, _always_ours):
    ours, theirs = torchvision_pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x)
        out = ours(x)
        again = ours(x.contiguous(memory_format=CL))  # same shape, other layout: the plan converts
    convs = [m for m in ours.modules() if isinstance(m, torch.nn.Conv2d)]
    winograd = [c for c in convs if c.kernel_size == (3, 3) and c.stride == (1, 1)]
    assert _always_ours.count(request.node.callspec.params["_always_ours"]) == len(winograd) == 13
    assert _always_ours.count("gemm_rows") == 1  # the stem
    # 1x1s and 3x3 stride 2 (all but the stem), and the classifier's Linear
    assert _always_ours.count("gemm") == len(convs) - len(winograd) - 1 + 1
    _assert_matches(out, expected)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    # Packed from each conv weight and BN scale: no folded weight was made (oneDNN would read one).
    assert all(fold.last(c)._weight is None for c in convs)


def _assert_bf16_close(out, expected, theirs, bound=2**-8):
    """out (bfloat16) within `bound` of the float64 reference's magnitude, and no worse than 2x torch's own
    bfloat16 result `theirs` (or half a bfloat16 ulp of the magnitude, where torch's happens to be exact)."""
    assert out.dtype == torch.bfloat16
    scale = expected.abs().max().item()
    error = (out.double() - expected).abs().max().item()
    assert error <= bound * scale
    assert error <= max(2 * (theirs.double() - expected).abs().max().item(), 2**-9 * scale)


needs_bf16 = pytest.mark.skipif(
    _C is None or not _C.conv_gemm_bf16_supported(),
    reason="this CPU has no AVX512_BF16: the bfloat16 GEMM cannot run here",
)


@needs_bf16
@pytest.mark.parametrize("shape", [s for s in GEMM_SHAPES if s[1] % 2 == 0])
@pytest.mark.parametrize("residual", [False, True])
def test_bf16_gemm_matches_float64_reference(shape, residual):
    """bfloat16 in and out, float32 sums (vdpbf16ps), one rounding at the store: within half a
    bfloat16 ulp of the output's magnitude (2^-9) plus the float32 sums', and no worse than torch's
    own bfloat16 convolution (which rounds the conv, then the residual add, each to bfloat16)."""
    x, weight, bias, res = (t if t is None else t.bfloat16() for t in _case(*shape, residual))
    s, p, d = shape[-3:]
    bias = bias.float()
    expected = _reference(x, weight, bias, res, True, s, p, d)
    out = _C.conv_gemm_bias_act(
        x, _C.pack_conv_gemm_weight(weight), bias, res, True, [s] * 2, [p] * 2, [d] * 2
    )
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=CL)
    theirs = F.conv2d(x, weight, bias.bfloat16(), s, p, d)
    _assert_bf16_close(out, expected, torch.relu(theirs + res if residual else theirs))


@needs_bf16
@pytest.mark.parametrize("shape", ROWS_SHAPES)
def test_bf16_gemm_over_kernel_rows_matches_float64_reference(shape):
    """The bfloat16 GEMM over kernel rows (an odd KW x Cin gets a zero channel in the padded copy and
    the weight), with test_bf16_gemm_matches_float64_reference's bounds, twice into kept buffers."""
    batch, cin, cout, h, w, k, stride, padding = shape
    x, weight, bias, res = (t.bfloat16() for t in _case(batch, cin, cout, h, w, k, stride, padding, 1, True))
    geometry = ([stride] * 2, [padding] * 2, [1, 1])
    kernels = conv_ops._own_kernels(_C, {}, x, weight, lambda: weight, bias, True, *geometry, 1, None)
    # On AMX tiles too where a kernel row's channels (given a zero one where odd) fit one tile's 32.
    amx = _C.conv_amx_supported() and cout % 32 == 0 and k * (cin + k * cin % 2) <= 32
    assert list(kernels) == ["gemm_rows"] + ["amx_rows"] * amx
    expected = _reference(x, weight, bias.float(), res, True, stride, padding, 1)
    theirs = torch.relu(F.conv2d(x, weight, bias, stride, padding) + res)
    buffers = Buffers()
    buffers.start(x)
    for path in list(kernels) * 2:
        _assert_bf16_close(kernels[path][0](x, res, None, buffers), expected, theirs)


@needs_bf16
def test_bf16_gemm_writes_into_the_residual_and_checks_dtypes():
    x, weight, bias, res = (t.bfloat16() for t in _case(2, 64, 48, 6, 6, 1, 1, 0, 1, True))
    packed, bias = _C.pack_conv_gemm_weight(weight), bias.float()
    expected = _C.conv_gemm_bias_act(x, packed, bias, res.clone(), True, [1, 1], [0, 0], [1, 1])
    out = _C.conv_gemm_bias_act(x, packed, bias, res, True, [1, 1], [0, 0], [1, 1], res)
    assert out.data_ptr() == res.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="weight not packed"):
        _C.conv_gemm_bias_act(x.float(), packed, bias, None, True, [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="residual must be"):
        _C.conv_gemm_bias_act(x, packed, bias, res.float(), True, [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="even Cin"):
        _C.pack_conv_gemm_weight(torch.randn(16, 3, 1, 1).bfloat16())


@needs_bf16
@pytest.mark.parametrize("shape", WINOGRAD_SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_bf16_winograd_matches_float64_reference(shape, residual):
    """bfloat16 Winograd F(2x2, 3x3): transforms in float32, V = B^T d B and U = G g G^T each rounded to
    bfloat16 (two more roundings of 2^-9 per product than the direct convolution), float32 sums, one
    rounding at the store. Within 2^-7 of the output's magnitude, and no worse than 2x torch's own
    bfloat16 convolution (measured 1.0-1.7x its error at ResNet-50's shapes)."""
    batch, cin, cout, h, w, p = shape
    x, weight, bias, res = (
        t if t is None else t.bfloat16() for t in _case(batch, cin, cout, h, w, 3, 1, p, 1, residual)
    )
    bias = bias.float()
    expected = _reference(x, weight, bias, res, True, 1, p, 1)
    out = _winograd(x, weight, bias, res, True, p)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=CL)
    theirs = F.conv2d(x, weight, bias.bfloat16(), 1, p)
    _assert_bf16_close(out, expected, torch.relu(theirs + res if residual else theirs), 2**-7)


@needs_bf16
def test_bf16_winograd_writes_into_the_residual_and_refuses_nonfinite():
    """In place over the residual, or into a given float32 workspace, the same bits as into a fresh
    tensor; an Inf input is refused with nothing written (as in float32); float32 and bfloat16 packs do
    not mix, and bfloat16 has no F(4x4, 3x3)."""
    x, weight, bias, res = (t.bfloat16() for t in _case(2, 64, 48, 6, 6, 3, 1, 1, 1, True))
    packed, bias = _C.pack_winograd_weight(weight, 2), bias.float()
    assert packed.shape == (16, 3, 32, 16, 2) and packed.dtype == torch.bfloat16
    expected = _C.conv_winograd_bias_act(x, packed, bias, res.clone(), True, [1, 1])
    space = torch.empty(_C.winograd_workspace_size(list(x.shape), 48, [1, 1], 2))
    out = _C.conv_winograd_bias_act(x, packed, bias, res, True, [1, 1], res, space)
    assert out.data_ptr() == res.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    before = res.clone()
    x[1, 7, 3, 3] = float("inf")
    assert _C.conv_winograd_bias_act(x, packed, bias, res, True, [1, 1], res) is None
    assert torch.equal(res, before)
    with pytest.raises(RuntimeError, match="weight not packed"):
        _C.conv_winograd_bias_act(x.float(), packed, bias, None, True, [1, 1])
    with pytest.raises(RuntimeError, match="tile 2"):
        _C.pack_winograd_weight(weight, 4)


@needs_bf16
@pytest.mark.parametrize("_always_ours", ["gemm", "winograd"], indirect=True)
def test_bf16_model_runs_on_our_kernels(request, _always_ours):
    """A bfloat16 ResNet-50: every conv on our GEMM (the stem's 3 channels, given a zero fourth, on the
    GEMM over kernel rows), or its 3x3 stride-1 ones on Winograd F(2x2, 3x3), within 2x torch's own
    bfloat16 error of the float32 model."""
    ours, theirs = torchvision_pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x).double()
        out = ours.bfloat16()(x.bfloat16())
        torch_bf16 = theirs.bfloat16()(x.bfloat16())
    winograd = 13 if request.node.callspec.params["_always_ours"] == "winograd" else 0
    assert _always_ours[0] == "gemm_rows" and len(_always_ours) == 53  # the classifier runs F.linear
    assert _always_ours.count("winograd") == winograd and _always_ours.count("gemm") == 52 - winograd
    error = (out.double() - expected).abs().max()
    assert error <= 2 * (torch_bf16.double() - expected).abs().max()


needs_amx = pytest.mark.skipif(
    _C is None or not _C.conv_amx_supported(),
    reason="this CPU has no AMX-BF16 (or the OS does not let this process use it): the AMX kernel cannot run here",
)
# (batch, cin, cout, h, w, kernel, stride, padding) for the AMX kernel (channels in multiples of 32): a
# 1x1 stride-1 layer whose pixels end mid-tile (49), output rows shorter and longer than a 16-pixel
# tile, stride 2 with and without padding, padding 2, a single pixel, a non-square input, no padding,
# fewer input channels than a step's 32.
AMX_SHAPES = [
    (1, 32, 64, 7, 7, 1, 1, 0),
    (3, 64, 96, 13, 13, 1, 2, 0),
    (2, 64, 64, 9, 9, 3, 2, 1),
    (2, 96, 32, 33, 33, 3, 1, 1),
    (1, 32, 32, 4, 4, 3, 1, 2),
    (1, 64, 64, 1, 1, 1, 1, 0),
    (1, 32, 64, 5, 19, 3, 1, 1),
    (2, 32, 32, 6, 9, 3, 1, 0),
    (2, 16, 32, 6, 6, 3, 1, 1),  # 16 input channels: one step of 16, not 32
]


@needs_amx
@pytest.mark.parametrize("shape", AMX_SHAPES)
def test_amx_matches_float64_reference(shape):
    """The AMX kernel with test_bf16_gemm_matches_float64_reference's bounds: called directly (a padded
    layer padded inside), and as the layer plan runs it (a padded copy in the run's buffers), twice."""
    batch, cin, cout, h, w, k, stride, padding = shape
    x, weight, bias, res = (t.bfloat16() for t in _case(batch, cin, cout, h, w, k, stride, padding, 1, True))
    bias = bias.float()
    expected = _reference(x, weight, bias, res, True, stride, padding, 1)
    theirs = torch.relu(F.conv2d(x, weight, bias.bfloat16(), stride, padding) + res)
    geometry = ([stride] * 2, [padding] * 2)
    kernels = conv_ops._own_kernels(_C, {}, x, weight, lambda: weight, bias, True, *geometry, [1, 1], 1, None)
    assert list(kernels) == ["gemm", "amx"]
    buffers = Buffers()
    buffers.start(x)
    outs = [_C.conv_amx_bias_act(x, _C.pack_conv_gemm_weight(weight), bias, res, True, *geometry)]
    outs += [kernels["amx"][0](x, res, None, buffers) for _ in range(2)]
    for out in outs:
        assert out.is_contiguous(memory_format=CL)
        _assert_bf16_close(out, expected, theirs)


@needs_amx
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["input", "residual"])
def test_amx_puts_nan_and_inf_where_torch_does(value, where):
    x, weight, bias, res = (t.bfloat16() for t in _case(2, 32, 32, 5, 5, 3, 1, 1, 1, True))
    {"input": x, "residual": res}[where][1, 5, 2, 2] = value
    out = _C.conv_amx_bias_act(x, _C.pack_conv_gemm_weight(weight), bias.float(), res, True, [1, 1], [1, 1])
    expected = torch.relu(F.conv2d(x.float(), weight.float(), bias.float(), 1, 1) + res.float())
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(
        out[finite].float(), expected[finite], rtol=2**-7, atol=2**-7 * expected[finite].abs().max().item()
    )


@needs_amx
def test_amx_writes_into_the_residual_and_checks_its_arguments():
    x, weight, bias, res = (t.bfloat16() for t in _case(2, 64, 64, 6, 6, 3, 1, 1, 1, True))
    packed, bias, geometry = _C.pack_conv_gemm_weight(weight), bias.float(), ([1, 1], [1, 1])
    expected = _C.conv_amx_bias_act(x, packed, bias, res.clone(), True, *geometry)
    out = _C.conv_amx_bias_act(x, packed, bias, res, True, *geometry, res)
    assert out.data_ptr() == res.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="expected a bfloat16 input"):
        _C.conv_amx_bias_act(x.float(), packed, bias, None, True, *geometry)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        narrow = torch.randn(48, 48, 1, 1).bfloat16()
        _C.conv_amx_bias_act(
            torch.randn(1, 48, 3, 3).bfloat16(),
            _C.pack_conv_gemm_weight(narrow),
            None,
            None,
            True,
            [1, 1],
            [0, 0],
        )
    with pytest.raises(RuntimeError, match="residual must be"):
        _C.conv_amx_bias_act(x, packed, bias, res.float(), True, *geometry)


@needs_amx
@pytest.mark.parametrize("_always_ours", ["amx"], indirect=True)
def test_bf16_model_runs_on_amx(_always_ours):
    """A bfloat16 ResNet-50 with every conv on AMX tiles (the stem over kernel rows), within 2x torch's
    own bfloat16 error of the float32 model."""
    ours, theirs = torchvision_pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x).double()
        out = ours.bfloat16()(x.bfloat16())
        torch_bf16 = theirs.bfloat16()(x.bfloat16())
    assert _always_ours == ["amx_rows"] + ["amx"] * 52
    error = (out.double() - expected).abs().max()
    assert error <= 2 * (torch_bf16.double() - expected).abs().max()


@pytest.mark.parametrize("chosen", ["winograd", "winograd4", "onednn", None])  # None: measured now
def test_only_the_chosen_path_keeps_a_packed_weight(monkeypatch, tmp_path, chosen):
    """Weights are packed on a path's first call: a choice read from the cache packs only that path's,
    and after a measurement the other paths' packs are dropped."""
    if chosen is None:
        monkeypatch.setattr(
            layer_choice, "CPU_CACHE", layer_choice.ChoiceCache(tmp_path / "c.json", device_type="cpu")
        )
    else:
        monkeypatch.setattr(layer_choice, "choose_cpu", lambda key, run, cache=None, before=None: chosen)
    resnet_fast.set_backend("cpp")
    conv, bn = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False).eval(), torch.nn.BatchNorm2d(32).eval()
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=CL)
    with torch.no_grad():
        torch.testing.assert_close(
            resnet_fast.nn.conv_bn_act(x, conv, bn), torch.relu(bn(conv(x))), rtol=1e-4, atol=1e-4
        )
    kinds = {k[0] for k in fold.folded(conv, bn).packed}
    path = chosen or layer_choice.CPU_CACHE.items()[0][1].path
    assert kinds == ({"cpp"} if path == "onednn" else {path})  # "cpp": oneDNN's prepacked weight


@pytest.mark.parametrize("size", [2, 9])
def test_a_3x3_layer_with_fewer_pixels_than_channels_may_take_the_gemm(monkeypatch, size):
    """A 3x3 stride-1 layer's candidates are Winograd's two tiles, and the implicit GEMM too where its
    weights outweigh its input (fewer input pixels than output channels); the GEMM, taken, is right."""
    offered = []

    def choose(key, run, cache=None, before=None):
        offered.append(sorted(run))
        return "gemm" if "gemm" in run else "winograd"

    monkeypatch.setattr(layer_choice, "choose_cpu", choose)
    resnet_fast.set_backend("cpp")
    conv, bn = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False).eval(), torch.nn.BatchNorm2d(32).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 16, size, size).contiguous(memory_format=CL)  # 8 pixels < 32 channels, or 162 > 32
    with torch.no_grad():
        out = resnet_fast.nn.conv_bn_act(x, conv, bn)
        expected = torch.relu(bn(conv(x)))
    expected_paths = (
        ["gemm", "onednn", "winograd", "winograd4"] if size == 2 else ["onednn", "winograd", "winograd4"]
    )
    assert offered == [expected_paths]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_first_input_with_nan_is_timed_on_finite_values(monkeypatch):
    """Winograd returns at once on a NaN input: a layer's first call with one times every candidate on a
    finite copy (else Winograd would look fastest), and that call still puts NaN where torch does."""
    sampled = {}

    def choose(key, run, cache=None, before=None):
        for name, fn in run.items():
            sampled[name] = fn()
        return "onednn"

    monkeypatch.setattr(layer_choice, "choose_cpu", choose)
    resnet_fast.set_backend("cpp")
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False).eval()
    bn = torch.nn.BatchNorm2d(32).eval()
    x = torch.randn(2, 32, 9, 9).contiguous(memory_format=CL)
    x[1, 5, 4, 4] = float("nan")
    with torch.no_grad():
        out = resnet_fast.nn.conv_bn_act(x, conv, bn)
        expected = torch.relu(bn(conv(x)))
    assert set(sampled) == {"onednn", "winograd", "winograd4"}
    assert all(s is not None and s.isfinite().all() for s in sampled.values())
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any()


@pytest.mark.parametrize("kernel", [1, 3])  # a 1x1 layer: the GEMM; a 3x3 stride-1 layer: Winograd
def test_only_a_winograd_plan_keeps_onednns_pack(monkeypatch, kernel):
    """After both paths ran in the measurement and ours won, oneDNN's prepacked weight is freed, except
    where Winograd keeps it for inputs with Inf/NaN."""
    import gc
    import weakref

    packs = []
    prepack = _C.prepack_conv_weight

    def recorded(*args):
        packed = prepack(*args)
        packs.append(weakref.ref(packed))
        return packed

    def choose(key, run, cache=None, before=None):
        for fn in run.values():
            fn()
        return next(p for p in run if p != "onednn")

    monkeypatch.setattr(_C, "prepack_conv_weight", recorded)
    monkeypatch.setattr(layer_choice, "choose_cpu", choose)
    resnet_fast.set_backend("cpp")
    conv = torch.nn.Conv2d(16, 32, kernel, padding=kernel // 2, bias=False).eval()
    bn = torch.nn.BatchNorm2d(32).eval()
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=CL)
    with torch.no_grad():
        resnet_fast.nn.conv_bn_act(x, conv, bn)
    gc.collect()
    assert len(packs) == 1
    assert (packs[0]() is not None) == (kernel == 3)


def test_only_fitting_layers_are_candidates(_always_ours):
    conv = torch.nn.Conv2d(32, 24, 1, bias=False).eval()  # 24 output channels: not a multiple of 16
    bn = torch.nn.BatchNorm2d(24).eval()
    x = torch.randn(2, 32, 5, 5)
    with torch.no_grad():
        resnet_fast.nn.conv_bn_act(x, conv, bn)
        resnet_fast.nn.conv_bn_act(x.double(), conv.double(), bn.double())  # float64: oneDNN/aten only
        grouped = torch.nn.Conv2d(32, 32, 3, padding=1, groups=2, bias=False).eval()
        resnet_fast.nn.conv_bn_act(x, grouped, torch.nn.BatchNorm2d(32).eval())
        # A NaN weight: torch skips the padding where the GEMM would multiply it by zero.
        broken = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False).eval()
        broken.weight[1, 5, 2, 2] = float("nan")
        out = resnet_fast.nn.conv_bn_act(x, broken, torch.nn.BatchNorm2d(32).eval())
        assert torch.equal(out.isnan(), torch.relu(F.conv2d(x, broken.weight, None, 1, 1)).isnan())
    assert _always_ours == []


def test_info_names_the_candidates(isa):
    own = resnet_fast.info()["cpp conv route"]["cpu float32 own kernels"]
    assert own.startswith("oneDNN, the implicit GEMM") and f"({isa} micro-kernel" in own


def _in_place_plans(model) -> int:
    plans = [
        k
        for m in model.modules()
        if "_resnet_fast_fold" in m.__dict__
        for k in m._resnet_fast_fold.entry.runners
    ]
    return sum(1 for key in plans if key[-1])  # the plan key's last field: residual written in place


def test_residual_added_in_place_only_where_no_one_else_sees_it(_always_ours):
    """In the model's own forward (no grad, no hooks) each block's last conv writes into its residual;
    a block called directly, or a model with a hook, leaves every tensor the caller holds untouched."""
    ours, theirs = torchvision_pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x)
        _assert_matches(ours(x), expected)
        assert _in_place_plans(ours) == 16  # the last conv of each of ResNet-50's 16 blocks
        held = torch.randn(2, 256, 16, 16).contiguous(memory_format=CL)
        before = held.clone()
        ours.layer1[1](held)  # outside the model's forward: not private
        assert torch.equal(held, before)
        seen = []
        hook = ours.layer1[0].register_forward_hook(lambda m, args, out: seen.append((out, out.clone())))
        _assert_matches(ours(x), expected)
        hook.remove()
        out, copy = seen[0]
        assert torch.equal(out, copy)  # layer1[1] did not write into the output the hook kept


def test_a_hooked_max_pool_keeps_its_output(_always_ours):
    """ResNet-18's first block has no downsample: its residual is the max pool's output."""
    theirs = torchvision.models.resnet18(num_classes=10).eval()
    ours = resnet_fast.from_torchvision(theirs).eval()
    seen = []
    ours.maxpool.register_forward_hook(lambda m, args, out: seen.append((out, out.clone())))
    with torch.no_grad():
        ours(torch.randn(2, 3, 64, 64))
        assert ours._private_modules() is None
    out, copy = seen[0]
    assert torch.equal(out, copy)


def test_buffers_are_kept_between_forwards(_always_ours):
    """Warm forwards write into the buffers of the last one: no fresh pages, the same memory, the same
    numbers; a new input shape drops them; release_buffers frees them."""
    ours, theirs = torchvision_pair()
    x = torch.randn(4, 3, 96, 96)
    with torch.no_grad():
        expected = theirs(x)
        first = ours(x)
        ours(x)
        held = fused._IDLE_BUFFERS[ours][0].nbytes()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        again = ours(x)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        assert fused._IDLE_BUFFERS[ours][0].nbytes() == held > 0  # nothing new allocated
        # The layers' outputs alone would fault in `held` bytes (4 KiB pages) if they were fresh.
        assert faults < 0.1 * held / 4096
        _assert_matches(first, expected)
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        small = torch.randn(1, 3, 64, 64)
        _assert_matches(ours(small), theirs(small))
        assert fused._IDLE_BUFFERS[ours][0].nbytes() < held  # the old shape's buffers were dropped
        assert fused.release_buffers(ours) > 0 and ours not in fused._IDLE_BUFFERS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
def test_freed_memory_comes_back_without_page_faults():
    """What oneDNN layers' fresh outputs cost in the next forward: with keep_freed_memory(), three 12 MiB
    blocks allocated and freed round after round come from the heap once it has settled (in fresh
    processes: from the second to the fifth round). With glibc's defaults the free heap top goes over
    its dynamic trim threshold and is returned: 6,112 of the 9,216 pages faulted in again on every
    round from the third or fourth on."""
    assert resnet_fast.ops.buffers.keep_freed_memory() and resnet_fast.ops.buffers.keep_freed_memory()
    pages = 3 * (12 << 20) // 4096
    faults = []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.empty(12 << 20, dtype=torch.uint8).fill_(1) for _ in range(3)]
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del blocks
    assert all(f < 0.1 * pages for f in faults[-4:]), faults


def test_a_buffer_someone_holds_is_not_reused():
    buffers = resnet_fast.ops.Buffers()
    like = torch.empty(0)
    a = buffers.output([2, 16, 4, 4], like)
    assert a.is_contiguous(memory_format=CL)
    b = buffers.output([2, 16, 4, 4], like)  # a is held here
    assert b.data_ptr() != a.data_ptr()
    view = a[:1]
    del a
    c = buffers.output([2, 16, 4, 4], like)  # a's memory is held by the view
    assert c.data_ptr() not in (view.data_ptr(), b.data_ptr())
    ptr = view.data_ptr()
    del view, c
    assert buffers.output([2, 16, 4, 4], like).data_ptr() == ptr  # free again: reused


def test_buffers_are_shared_by_shapes_of_one_size():
    buffers = resnet_fast.ops.Buffers()
    like = torch.empty(0)
    stem = buffers.output([2, 64, 8, 8], like)
    ptr = stem.data_ptr()
    wide = buffers.output([2, 256, 4, 4], like)  # same size, stem still held: another buffer
    assert wide.data_ptr() != ptr and wide.shape == (2, 256, 4, 4) and wide.is_contiguous(memory_format=CL)
    del stem
    again = buffers.output([2, 256, 4, 4], like)  # the stem's memory, free again, in the new shape
    assert again.data_ptr() == ptr and again.shape == (2, 256, 4, 4) and again.is_contiguous(memory_format=CL)
    assert buffers.output([2, 16, 8, 8], like).data_ptr() not in (ptr, wide.data_ptr())  # another size
    with pytest.raises(ValueError, match="4-D"):
        buffers.output([2, 64, 64], like)


def test_concurrent_forwards_use_their_own_buffers(_always_ours):
    import threading

    ours, theirs = torchvision_pair()
    xs = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    with torch.no_grad():
        expected = [theirs(x) for x in xs]
        ours(xs[0])
    results, errors = {}, []

    def worker(i):
        try:
            with torch.no_grad():
                for _ in range(3):
                    results[i] = ours(xs[i])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        _assert_matches(results[i], expected[i])


def test_close_calls_are_settled_in_the_model_forwards(monkeypatch, tmp_path):
    """Every candidate timed alike alone (a fake timer): every layer is a close call, so its plan runs
    each candidate in turn in the model's forwards (real clock) until each has its timed calls; every
    forward matches torchvision's meanwhile, and then every choice holds its in-model medians, its path
    the fastest of them, and the other candidates' packed weights are gone."""
    cache = layer_choice.ChoiceCache(tmp_path / "c.json", device_type="cpu")
    monkeypatch.setattr(layer_choice, "CPU_CACHE", cache)
    monkeypatch.setattr(layer_choice, "SETTLE_IN_MODEL", True)
    monkeypatch.setattr(layer_choice, "cpu_timer", lambda fn, calls=1: [fn(), 1.0][1])
    resnet_fast.set_backend("cpp")
    ours, theirs = torchvision_pair("resnet18")
    x = torch.randn(2, 3, 32, 32)
    paths = 4  # at most: oneDNN, both Winograd tiles and the GEMM (layer4 at 1x1)
    with torch.no_grad():
        expected = theirs(x)
        for _ in range(paths * (1 + layer_choice.CPU_SETTLE_CALLS)):
            out = ours(x)
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
        # Paths on trial ran as Python steps of the compiled replay; once chosen, it is compiled again.
        ours(x)
        (buffers,) = fused._IDLE_BUFFERS[ours]
        assert buffers.compiled is not None and "python" not in buffers.compiled[1].kinds()
    choices = [c for k, c in cache.items() if len(c.ms) > 1 and not k.startswith("linear")]  # convs
    assert choices and all(set(c.in_model) == set(c.ms) for c in choices)
    assert all(c.path == min(c.in_model, key=c.in_model.get) for c in choices)
    for m in ours.modules():
        if isinstance(m, torch.nn.Conv2d):
            kinds = {k[0] for k in fold.last(m).packed}
            assert len(kinds) <= 1  # the chosen path's own ("cpp": oneDNN's prepacked weight)
