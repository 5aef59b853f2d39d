"""resnet_fast._C.max_pool_cl (a ResNet's max pool inside its forward on the cpp backend, written into a
kept buffer) against torch's max_pool2d: the same values exactly (a max rounds nothing), NaN where torch
has NaN, every floating dtype, the AVX2 path (float32 and bfloat16, channels a multiple of 8) and the
portable one."""

import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from resnet_fast import _ext
from resnet_fast.nn import fused

_C = _ext.load()
pytestmark = pytest.mark.skipif(_C is None, reason="needs resnet_fast._C (the cpp backend's extension)")
CL = torch.channels_last


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape, kernel, stride, padding",
    [
        ((2, 64, 17, 17), 3, 2, 1),
        ((1, 13, 9, 8), 3, 2, 1),
        ((2, 16, 8, 8), 2, 2, 0),
        ((1, 24, 7, 9), 3, 1, 1),
    ],
)
def test_matches_torch_with_nan_and_inf(dtype, shape, kernel, stride, padding):
    x = torch.randn(shape).to(dtype).contiguous(memory_format=CL)
    x[0, 3, 4, 4] = float("nan")
    x[0, 5, 1, 1] = float("inf")
    x[-1, 7, 2, 3] = float("-inf")
    expected = F.max_pool2d(x, kernel, stride, padding)
    out = _C.max_pool_cl(x, [kernel] * 2, [stride] * 2, [padding] * 2)
    assert out.is_contiguous(memory_format=CL) and out.dtype == dtype
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())


def test_writes_into_out_and_checks_it():
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=CL)
    out = torch.empty(2, 16, 5, 5).contiguous(memory_format=CL)
    assert _C.max_pool_cl(x, [3, 3], [2, 2], [1, 1], out).data_ptr() == out.data_ptr()
    assert torch.equal(out, F.max_pool2d(x, 3, 2, 1))
    with pytest.raises(RuntimeError, match="out must be"):
        _C.max_pool_cl(x, [3, 3], [2, 2], [1, 1], torch.empty(2, 16, 4, 4).contiguous(memory_format=CL))
    with pytest.raises(RuntimeError, match="channels_last"):
        _C.max_pool_cl(x.contiguous(), [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="padding"):
        _C.max_pool_cl(x, [3, 3], [2, 2], [2, 2])


def test_model_pools_into_a_kept_buffer(monkeypatch):
    """Inside the model's forward the max pool runs this kernel into a kept buffer: the same memory on
    every warm forward, one the Buffers hold; the same numbers as torch's pool."""
    resnet_fast.set_backend("cpp")
    outs = []
    kernel = _C.max_pool_cl

    def recording(x, kernel_size, stride, padding, out=None):
        outs.append(None if out is None else out.data_ptr())  # holding `out` would keep it from reuse
        return kernel(x, kernel_size, stride, padding, out)

    monkeypatch.setattr(_C, "max_pool_cl", recording)
    model = resnet_fast.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        first, again = model(x), model(x)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert len(outs) == 2 and outs[0] is not None and outs[0] == outs[1]
    held = [
        t for pool in fused._IDLE_BUFFERS[model][0]._pool.values() for views in pool for t in views.values()
    ]
    assert any(t.data_ptr() == outs[0] for t in held)
