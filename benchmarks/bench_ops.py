"""Per fused op: the unfused reference against each backend usable here, on ResNet-50 shapes.

Which ops: those resnet_fast.ops has (add_relu today; conv_bias_act and scale_shift_act as they
land). Which backends: ops.status() says, per device. Each backend is checked against the reference
before it is timed: a fast wrong kernel is not a result.

    pytest benchmarks/bench_ops.py --benchmark-only --benchmark-json benchmarks/results/<machine>/ops.json
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from resnet_fast import ops
from resnet_fast.kernels import reference
from resnet_fast.tools import timing

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {"cpu": torch.float32, "cuda": torch.float16}
BATCH = {"cpu": 8, "cuda": 32}
CL = torch.channels_last


def _backends(device: str) -> list[str]:
    """'reference' (kernels.reference called directly) and every backend usable on `device`."""
    return ["reference"] + [b for b in ops.BACKENDS if not ops.backend.problem(b, device)]


def _add_relu_case(device: str, shape: tuple):
    dtype = DTYPES[device]
    n, c, h, w = BATCH[device], *shape
    a, b = (torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=CL) for _ in "ab")
    return (lambda: ops.add_relu(a, b)), (lambda: reference.add_relu(a, b))


def _scale_shift_case(device: str, shape: tuple):
    dtype = DTYPES[device]
    n, c, h, w = BATCH[device], *shape
    x = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=CL)
    res = torch.randn_like(x)
    scale, shift = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)

    def ref():
        return torch.relu(x * scale.view(1, -1, 1, 1).to(dtype) + shift.view(1, -1, 1, 1).to(dtype) + res)

    return (lambda: ops.scale_shift_act(x, scale, shift, res, True)), ref


def _conv_case(device: str, shape: tuple):
    """A ResNet-50 Conv -> BN (eval) (-> +identity) -> ReLU, BN folded as the model does."""
    dtype = DTYPES[device]
    cin, cout, k, stride, hw, residual = shape
    conv = torch.nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
    bn = torch.nn.BatchNorm2d(cout).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 1.5)
        bn.running_mean.normal_(0, 0.1)
    conv, bn = conv.to(device, dtype).to(memory_format=CL), bn.to(device)
    from resnet_fast import fold

    folded = fold.folded(conv, bn, dtype)
    x = torch.randn(BATCH[device], cin, hw, hw, device=device, dtype=dtype).contiguous(memory_format=CL)
    out_hw = (hw + stride - 1) // stride
    res = torch.randn(BATCH[device], cout, out_hw, out_hw, device=device, dtype=dtype).contiguous(
        memory_format=CL
    )
    res = res if residual else None
    geometry = ([stride] * 2, [k // 2] * 2, [1, 1], 1)

    def fused():
        return ops.conv_bias_act(x, folded.weight, folded.bias, res, True, *geometry)

    def ref():
        out = F.conv2d(x, folded.weight, folded.bias, stride, k // 2)
        return torch.relu(out if res is None else out + res)

    return fused, ref


# (op, case builder, shapes): (C, H, W) for elementwise ops; (Cin, Cout, k, stride, HW, residual) for conv.
CASES = [
    ("add_relu", _add_relu_case, [(256, 56, 56), (2048, 7, 7)]),
    ("scale_shift_act", _scale_shift_case, [(256, 56, 56)]),
    (
        "conv_bias_act",
        _conv_case,
        [
            (64, 64, 3, 1, 56, False),
            (64, 256, 1, 1, 56, True),
            (256, 128, 3, 2, 56, False),
            (512, 512, 3, 1, 7, False),
        ],
    ),
]
PARAMS = [
    pytest.param(op, build, shape, device, backend, id=f"{op}-{'x'.join(map(str, shape))}-{device}-{backend}")
    for op, build, shapes in CASES
    if hasattr(ops, op)
    for shape in shapes
    for device in DEVICES
    for backend in _backends(device)
]


@pytest.mark.parametrize(("op", "build", "shape", "device", "backend"), PARAMS)
def test_op(benchmark, op, build, shape, device, backend):
    dev = torch.device(device)
    fused, ref = build(device, shape)
    benchmark.group = f"{op} {shape} {device} {DTYPES[device]}"
    benchmark.extra_info.update(
        op=op, shape=list(shape), device=device, backend=backend, dtype=str(DTYPES[device])
    )
    if backend == "reference":
        fn = ref
    else:
        resnet_fast.set_backend(backend)
        fn = fused
        with torch.no_grad():
            expected, got = ref(), fn()
        tol = 1e-4 if DTYPES[device] == torch.float32 else 1e-2
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)

    def call():
        with torch.no_grad():
            fn()
        timing.sync(dev)

    benchmark(call)
