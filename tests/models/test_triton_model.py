"""The eval model on CUDA runs every conv through resnet_fast::conv_bias_act on the Triton backend.

The dispatch test runs anywhere (backend selection forced to 'triton', the Triton conv replaced
by a recorder running the reference); the `gpu` tests check whole-model numerics on real hardware.
Tolerances: fp32 with TF32 off, 1e-4 of the logits' magnitude (BN folding reorders fp32 rounding);
fp16/bf16 against an fp32 torchvision reference, no worse than 2x torchvision's own error in that
dtype (plus 1e-3 of the magnitude, so an exact torchvision run does not make the bound zero).
"""

import pytest
import torch
import torchvision
from _utils import randomize_bn, record_conv_calls

import resnet_fast
from resnet_fast import ops
from resnet_fast.ops import conv as conv_ops

CL = torch.channels_last


def test_eval_model_dispatches_every_conv_to_the_triton_op(monkeypatch):
    calls = []

    def forced(device):
        return "triton"

    for module in (ops, ops.backend, conv_ops, ops.fused):
        monkeypatch.setattr(module, "backend_for", forced)
    record_conv_calls(
        monkeypatch,
        "triton",
        lambda x, w, b, residual, relu: calls.append((tuple(w.shape), residual is not None, relu)),
        impl=conv_ops._conv_torch,
    )

    theirs = randomize_bn(torchvision.models.resnet50(num_classes=10)).eval()
    ours = resnet_fast.resnet50(num_classes=10).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = ours(x)
        expected = theirs.to(memory_format=CL)(x.contiguous(memory_format=CL))
    assert len(calls) == 53  # stem + 16 blocks x 3 + 4 downsample convs: one fused op each
    assert sum(residual for _, residual, _ in calls) == 16  # every block tail adds the identity
    assert sum(not relu for _, _, relu in calls) == 4  # only the downsample convs skip ReLU
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


def _models(dtype):
    theirs = randomize_bn(torchvision.models.resnet50(num_classes=10)).eval()
    ours = resnet_fast.resnet50(num_classes=10).eval()
    ours.load_state_dict(theirs.state_dict())
    return ours.cuda().to(dtype), theirs.cuda()


@pytest.fixture
def triton_backend():
    if ops.backend.problem("triton", "cuda"):
        pytest.skip(f"triton backend unusable: {ops.backend.problem('triton', 'cuda')}")
    resnet_fast.set_backend("triton")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = tf32


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_eval_resnet50_triton_matches_torchvision(triton_backend, dtype):
    ours, theirs = _models(dtype)
    x = torch.randn(4, 3, 96, 96, device="cuda")
    with torch.no_grad():
        reference = theirs.to(memory_format=CL)(x.contiguous(memory_format=CL))
        out = ours(x.to(dtype))
        if dtype == torch.float32:
            torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4 * reference.abs().max())
            return
        torchvision_error = _rel(theirs.to(dtype)(x.to(dtype).contiguous(memory_format=CL)), reference)
    assert _rel(out, reference) <= 2 * torchvision_error + 1e-3


@pytest.mark.gpu
def test_eval_resnet50_triton_compiles_without_graph_breaks(triton_backend):
    ours, _ = _models(torch.float16)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        eager = ours(x)
        compiled = torch.compile(ours, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2 * eager.abs().max())


@pytest.mark.gpu
def test_eval_resnet50_triton_in_a_cuda_graph(triton_backend):
    ours, _ = _models(torch.float16)
    static_x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        eager = ours(static_x)  # measures per-layer choices and autotunes before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = ours(static_x)
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        expected = ours(static_x)
    assert not torch.equal(eager, expected)
    torch.testing.assert_close(static_out, expected, rtol=0, atol=0)
