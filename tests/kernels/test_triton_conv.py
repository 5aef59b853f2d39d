"""Triton implicit-GEMM conv: parity on the CPU (interpreter), AOT compiles for sm_80/sm_90, GPU parity.

Tolerances (reference: float64 conv of the same rounded inputs, weights scaled so outputs are O(1)):
- fp32, TF32 off: rtol = atol = 1e-4. fp32 accumulation over K <= 1152 terms errs by ~sqrt(K) * 6e-8
  ~ 2e-6, so 1e-4 catches any indexing or epilogue bug while leaving room for summation order.
- fp16/bf16: at most 2x the error of PyTorch's own conv (+ bias + residual, ReLU) in the same dtype.
  Both accumulate in fp32, so the error is the output rounding; ours rounds once, torch's chain up
  to three times, so 2x is a bound a correct kernel meets and a wrong one (e.g. fp16 accumulation
  or a dropped tap) does not.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")  # Linux-only dependency

from resnet_fast.kernels.triton import conv  # noqa: E402

# Kernels are interpreted when TRITON_INTERPRET=1 was set at `import triton` (see conftest.py).
INTERPRETED = not isinstance(conv._conv_fwd_kernel, triton.runtime.JITFunction)
interpreter_only = pytest.mark.skipif(
    not INTERPRETED, reason="runs on the CPU in the TRITON_INTERPRET=1 child (test_under_interpreter)"
)
not_interpreted = pytest.mark.skipif(INTERPRETED, reason="needs triton without TRITON_INTERPRET")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (cin, cout, kernel, stride, padding, dilation, groups, (H, W)); FLAT_K is picked for cin/groups < 64
# or not a multiple of 32, so both reduction loops are covered.
CASES = {
    "stem-7x7-s2": (3, 24, 7, 2, 3, 1, 1, (9, 9)),
    "3x3-odd-channels": (24, 72, 3, 1, 1, 1, 1, (7, 7)),
    "3x3-channel-blocks": (64, 24, 3, 1, 1, 1, 1, (7, 7)),
    "3x3-s2-4-blocks": (128, 24, 3, 2, 1, 1, 1, (9, 9)),
    "1x1-odd": (72, 24, 1, 1, 0, 1, 1, (7, 7)),
    "1x1-s2-downsample": (64, 72, 1, 2, 0, 1, 1, (9, 9)),
    "resnext-32x4d": (128, 128, 3, 1, 1, 1, 32, (7, 7)),
    "grouped-8-per-group-s2": (64, 64, 3, 2, 1, 1, 8, (8, 8)),
    "grouped-channel-blocks": (256, 64, 3, 1, 1, 1, 2, (7, 7)),
    "depthwise": (24, 24, 3, 1, 1, 1, 24, (7, 7)),
    "2-in-4-out-per-group": (24, 48, 3, 1, 1, 1, 12, (7, 7)),
    "dilation-2": (16, 24, 3, 1, 2, 2, 1, (9, 9)),
    "1x3-asymmetric": (16, 24, (1, 3), (1, 2), (0, 1), 1, 1, (7, 9)),
}


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def make_inputs(case, dtype, bias=True, residual=True, seed=0):
    cin, cout, k, stride, padding, dilation, groups, (h, w) = case
    kh, kw = _pair(k)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, h, w, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    # Kaiming-like scale keeps outputs O(1) for every K, so one absolute tolerance fits all cases.
    fan_in = cin // groups * kh * kw
    weight = (torch.randn(cout, cin // groups, kh, kw, generator=g) / math.sqrt(fan_in)).to(dtype)
    b = torch.randn(cout, generator=g).to(dtype) if bias else None
    conv_args = dict(stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation), groups=groups)
    out_shape = F.conv2d(x.float(), weight.float(), None, **conv_args).shape
    res = None
    if residual:
        res = torch.randn(out_shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    return x, weight, b, res, conv_args


def reference(x, weight, bias, residual, relu, conv_args, dtype=torch.float64):
    """Unfused PyTorch in `dtype` (float64: ground truth; the input dtype: the yardstick)."""
    y = F.conv2d(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), **conv_args)
    if residual is not None:
        y = y + residual.to(dtype)
    return y.relu() if relu else y


def check(out, x, weight, bias, residual, relu, conv_args):
    expected = reference(x, weight, bias, residual, relu, conv_args)
    assert out.shape == expected.shape and out.dtype == x.dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    if x.dtype == torch.float32:
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    else:
        # Error relative to max(|ref|, 1): rounding error is relative, outputs are O(1).
        def error(y):
            return ((y.double() - expected).abs() / (expected.abs() + 1)).max().item()

        ours, torch_err = error(out), error(reference(x, weight, bias, residual, relu, conv_args, x.dtype))
        assert ours <= 2 * torch_err, f"error {ours:.3g} vs PyTorch {x.dtype} {torch_err:.3g}"


@pytest.fixture
def no_tf32():
    # fp32 parity is only tight without TF32; the kernel follows this flag (see test_tf32_follows_torch).
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


# ---------------------------------------------------------------- CPU, TRITON_INTERPRET=1 child


@not_interpreted
def test_under_interpreter(run_under_interpreter):
    run_under_interpreter(__file__)


@interpreter_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_conv_matches_reference(case, dtype, no_tf32, request):
    if dtype == torch.bfloat16:
        request.getfixturevalue("interpreter_bf16")
    x, weight, bias, res, conv_args = make_inputs(case, dtype)
    out = conv.conv_bias_act(x, weight, bias, res, relu=True, **conv_args)
    check(out, x, weight, bias, res, True, conv_args)


@interpreter_only
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", ["3x3-odd-channels", "3x3-channel-blocks"])
def test_epilogue_variants(case, bias, residual, relu, no_tf32):
    x, weight, b, res, conv_args = make_inputs(CASES[case], torch.float32, bias, residual)
    out = conv.conv_bias_act(x, weight, b, res, relu=relu, **conv_args)
    check(out, x, weight, b, res, relu, conv_args)


@interpreter_only
@pytest.mark.parametrize("config", conv.CONV_CONFIGS, ids=lambda c: str(c.kwargs))
@pytest.mark.parametrize("case", ["stem-7x7-s2", "grouped-channel-blocks"])
def test_every_config(case, config, no_tf32):
    x, weight, bias, res, conv_args = make_inputs(CASES[case], torch.float32)
    out = conv.conv_bias_act(x, weight, bias, res, **conv_args, config=config)
    check(out, x, weight, bias, res, True, conv_args)


@interpreter_only
def test_nchw_input_and_packed_weight(no_tf32):
    x, weight, bias, res, conv_args = make_inputs(CASES["grouped-8-per-group-s2"], torch.float32)
    packed = conv.pack_weight(weight, conv_args["groups"])
    out = conv.conv_bias_act(x.contiguous(), weight, bias, res.contiguous(), **conv_args, packed=packed)
    check(out, x, weight, bias, res, True, conv_args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("allow", [True, False])
def test_tf32_follows_torch(monkeypatch, dtype, allow):
    """TF32 only for fp32 and only when torch's conv flag allows it (the interpreter ignores precision)."""
    seen = {}

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.update(meta)

    monkeypatch.setattr(conv, "_conv_fwd_kernel", Recorder())
    monkeypatch.setattr(conv, "_conv_fwd_autotuned", Recorder())
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow)
    x, weight, bias, res, conv_args = make_inputs(CASES["1x1-odd"], dtype)
    conv.conv_bias_act(x, weight, bias, res, **conv_args)
    assert seen["INPUT_PRECISION"] == ("tf32" if allow and dtype == torch.float32 else "ieee")


def test_rejects_bad_shapes():
    x = torch.randn(1, 6, 5, 5)
    with pytest.raises(ValueError):
        conv.conv_bias_act(x, torch.randn(8, 4, 3, 3), None, groups=2)  # Cin/groups = 3, not 4
    with pytest.raises(ValueError):
        conv.conv_bias_act(x, torch.randn(8, 6, 1, 1), None, residual=torch.randn(1, 8, 4, 4))


@interpreter_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_propagate_like_torch(dtype, no_tf32, request):
    """Image 0 with a NaN patch, image 1 with one Inf pixel, image 2 with a NaN in the residual, image 3
    clean: NaN and Inf exactly where PyTorch's conv (+ bias + residual, ReLU) has them, image 3 as in
    the parity tests."""
    if dtype == torch.bfloat16:
        request.getfixturevalue("interpreter_bf16")
    cin, cout, k, stride, padding, dilation, groups, (h, w) = CASES["3x3-channel-blocks"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, cin, h, w, generator=g)
    x[0, :, 2:4, 2:4] = float("nan")
    x[1, 5, 3, 3] = float("inf")
    weight = torch.randn(cout, cin, k, k, generator=g) / math.sqrt(cin * k * k)
    bias = torch.randn(cout, generator=g)
    res = torch.randn(4, cout, h, w, generator=g)
    res[2, 3, 1, 1] = float("nan")
    x, weight, bias, res = (t.to(dtype) for t in (x, weight, bias, res))
    x, res = (t.contiguous(memory_format=torch.channels_last) for t in (x, res))
    conv_args = dict(
        stride=(stride, stride), padding=(padding, padding), dilation=(dilation,) * 2, groups=groups
    )
    out = conv.conv_bias_act(x, weight, bias, res, relu=True, **conv_args)
    expected = reference(x, weight, bias, res, True, conv_args)
    assert torch.equal(out.isnan(), expected.isnan()), out.isnan().nonzero().tolist()
    assert torch.equal(out.isinf(), expected.isinf()), out.isinf().nonzero().tolist()
    assert expected[0].isnan().any() and expected[1].isinf().any() and expected[2].isnan().sum() == 1
    check(out[3:], x[3:], weight, bias, res[3:], True, conv_args)


def _resnet50_convs():
    """(name, weight shape, stride, padding, input shape for batch 1) of torchvision's ResNet-50 at
    224x224, from forward hooks on the meta device: shapes only, no kernel runs."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    convs = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(
                lambda m, inputs, _, name=name: convs.append(
                    (name, m.weight.shape, m.stride, m.padding, inputs[0].shape)
                )
            )
    model(torch.empty(1, 3, 224, 224, device="meta"))
    return convs


@not_interpreted
def test_resnet50_tuning_cost(monkeypatch):
    """What autotuning a fused ResNet-50 eval forward costs at batches 1, 8, 64 and 256 (224x224): tuning
    keys (each times at most 3 configs), and compiles (every timed config, plus one per other epilogue
    variant of a tuned key). The launcher computes the keys, as in a real forward, from meta tensors."""
    named = conv._conv_fwd_kernel.arg_names
    seen = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                nargs = dict(zip(named, args, strict=False))  # constexprs come as keywords
                # triton's Autotuner key: the key arguments, then the dtype of every tensor argument
                key = tuple(nargs[k] for k in conv.TUNING_KEY if k in nargs) + tuple(
                    meta[k] for k in conv.TUNING_KEY if k in meta
                )
                key += tuple(str(a.dtype) for a in args if hasattr(a, "dtype"))
                configs = conv._prune(conv.CONV_CONFIGS, nargs, **meta)
                seen.append((key, tuple(sorted(meta.items())), configs))

            return launch

    monkeypatch.setattr(conv, "_conv_fwd_autotuned", Recorder())
    convs = _resnet50_convs()
    assert len(convs) == 53
    totals = {}
    for dtype in (torch.bfloat16, torch.float32):
        keys, variants = {}, set()
        for batch in (1, 8, 64, 256):
            for name, w_shape, stride, padding, x_shape in convs:
                x = torch.empty((batch, *x_shape[1:]), device="meta", dtype=dtype)
                w = torch.empty(w_shape, device="meta", dtype=dtype)
                n, _, h, wd = x.shape
                oh, ow = (
                    (h + 2 * padding[0] - w_shape[2]) // stride[0] + 1,
                    (wd + 2 * padding[1] - w_shape[3]) // stride[1] + 1,
                )
                res = (
                    torch.empty((n, w_shape[0], oh, ow), device="meta", dtype=dtype)
                    if name.endswith("conv3")
                    else None
                )
                conv.conv_bias_act(
                    x, w, w.new_empty(w_shape[0]), res, "downsample" not in name, stride, padding
                )
            new_keys = {key for key, _, _ in seen} - keys.keys()
            for key, meta, configs in seen:
                assert 1 <= len(configs) <= conv.MAX_CONFIGS
                keys[key] = len(configs)
                variants.add((key, meta))
            print(f"ResNet-50 eval {dtype} batch {batch}: {len(new_keys)} new tuning keys")
            seen.clear()
        timed = sum(n for n in keys.values() if n > 1)  # a single candidate is not timed
        compiles = sum(keys.values()) + len(variants) - len(keys)
        totals[dtype] = (len(keys), timed, compiles)
        print(f"ResNet-50 eval {dtype}, batches 1/8/64/256: {len(keys)} tuning keys, {timed} configs timed, "
              f"{compiles} compiles")  # fmt: skip
    # Before: 6 configs per key and M in the key, ~550 compiles for these four batch sizes.
    for n_keys, timed, compiles in totals.values():
        assert n_keys <= 80 and timed <= 3 * n_keys and compiles <= 200, totals


def test_configs_by_shape_fit_shared_memory():
    """At most MAX_CONFIGS per shape and dtype, each fitting the shared-memory budget (sm_80 and sm_90)."""
    for dtype in DTYPES:
        size = torch.empty((), dtype=dtype).element_size()
        for m in (49, 3136, 12544, 2**16, 2**22):
            for cout_g in (4, 32, 64, 128, 512, 2048):
                configs = conv.configs_for(m, cout_g, dtype)
                assert 1 <= len(configs) <= conv.MAX_CONFIGS
                assert all(conv._fits(c, size) and c in conv.CONV_CONFIGS for c in configs)
    assert conv.m_bucket(49) == 64 and conv.m_bucket(3136) == 4096 and conv.m_bucket(10**7) == 2**16
    assert conv.configs_for(3136, 256, torch.float16) == conv.configs_for(4000, 256, torch.float16)


# ---------------------------------------------------------------- ahead-of-time compiles, no GPU

POINTERS = ("x_ptr", "w_ptr", "bias_ptr", "res_ptr", "out_ptr")
# A 64-channel layer: every pointer, channel count and NHWC stride is a multiple of 16 (M is never
# specialized: do_not_specialize).
DIVISIBLE = {
    False: POINTERS + ("CIN_G", "COUT", "COUT_G", "stride_xn", "stride_xh", "stride_xw"),
    True: POINTERS + ("COUT", "COUT_G"),  # stem-like: 3 input channels
}
# fp32 runs as TF32 (torch's default for convs) or as exact fp32 FMA: different code, both compiled.
PRECISIONS = [
    (torch.float16, "ieee"),
    (torch.bfloat16, "ieee"),
    (torch.float32, "tf32"),
    (torch.float32, "ieee"),
]
AOT_CASES = [
    pytest.param(
        dtype, prec, flat, i, cc, id=f"sm{cc}-{str(dtype)[6:]}-{prec}-{'flat' if flat else 'blocks'}-cfg{i}"
    )
    for cc in (80, 90)
    for dtype, prec in PRECISIONS
    for flat in (False, True)
    for i, cfg in enumerate(conv.CONV_CONFIGS)
    if conv._fits(cfg, torch.empty((), dtype=dtype).element_size())
]


def compile_conv(aot_compile, dtype, precision, flat, config, cc):
    constexprs = dict(
        KH=3,
        KW=3,
        HAS_BIAS=True,
        HAS_RES=True,
        RELU=True,
        FLAT_K=flat,
        INPUT_PRECISION=precision,
        **config.kwargs,
    )
    return aot_compile(
        conv._conv_fwd_kernel,
        pointers={p: dtype for p in POINTERS},
        constexprs=constexprs,
        divisible=DIVISIBLE[flat],
        cc=cc,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


@not_interpreted
@pytest.mark.parametrize("dtype, precision, flat, index, cc", AOT_CASES)
def test_aot_compile(aot_compile, dtype, precision, flat, index, cc):
    compiled = compile_conv(aot_compile, dtype, precision, flat, conv.CONV_CONFIGS[index], cc)
    # The epilogue's ReLU keeps NaN (max.NaN.f32): a NaN-dropping max.f32 would hide corrupted inputs.
    assert "max.NaN.f32" in compiled.asm["ptx"]
    assert not re.findall(r"\bmax(?:\.ftz)?\.f32\b", compiled.asm["ptx"])


@not_interpreted
@pytest.mark.parametrize("flat", [False, True])
def test_offsets_are_64_bit(aot_compile, flat):
    """Pixel offsets of the input and output tiles are i64 in the IR (NHWC 1024x224x224x64 > 2^31)."""
    config = conv.CONV_CONFIGS[2]  # BLOCK_M=128, BLOCK_N=64, BLOCK_K=32: distinct tile shapes
    ttir = compile_conv(aot_compile, torch.float16, "ieee", flat, config, 90).asm["ttir"]
    addptr = re.findall(r"tt\.addptr [^:]*: tensor<(\d+x\d+)x!tt\.ptr<f16>>, tensor<\d+x\d+x(i\d+)>", ttir)
    x_rows = "128x32" if flat else "128x1"  # flat: whole offsets; blocks: row base, then channel
    assert (x_rows, "i64") in addptr, addptr
    out_tile = [bits for shape, bits in addptr if shape == "128x64"]
    assert out_tile and set(out_tile) == {"i64"}, addptr


# ---------------------------------------------------------------- real GPU


GPU_CASES = {
    "stem": (3, 64, 7, 2, 3, 1, 1, (64, 64)),
    "3x3-64": (64, 64, 3, 1, 1, 1, 1, (28, 28)),
    "1x1-256-64": (256, 64, 1, 1, 0, 1, 1, (28, 28)),
    "1x1-s2-downsample": (256, 512, 1, 2, 0, 1, 1, (28, 28)),
    "resnext-32x4d": (128, 128, 3, 1, 1, 1, 32, (28, 28)),
    "3x3-s2-odd": (72, 24, 3, 2, 1, 1, 1, (15, 15)),
}


@pytest.mark.gpu
@needs_gpu
@not_interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_gpu_matches_reference(case, dtype, no_tf32):
    x, weight, bias, res, conv_args = make_inputs(case, dtype)
    x, weight, bias, res = (t.cuda() for t in (x, weight, bias, res))
    out = conv.conv_bias_act(x, weight, bias, res, **conv_args)  # autotuned
    check(out.cpu(), x.cpu(), weight.cpu(), bias.cpu(), res.cpu(), True, conv_args)


@pytest.mark.gpu
@needs_gpu
@not_interpreted
def test_gpu_int64_offsets():
    """A batch whose NHWC input has more than 2^31 elements: the last image must still be right."""
    n = 2**31 // (64 * 224 * 224) + 1
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    x = torch.empty(n, 64, 224, 224, device="cuda", dtype=torch.float16, memory_format=torch.channels_last)
    x[-1].normal_()
    weight = (torch.randn(64, 64, 1, 1, device="cuda") / 8).half()
    out = conv.conv_bias_act(x, weight, None, relu=False)
    expected = F.conv2d(x[-1:].float(), weight.float())
    torch.testing.assert_close(out[-1:].float(), expected, rtol=2e-2, atol=2e-2)
