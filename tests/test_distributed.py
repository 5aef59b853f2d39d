"""Multi-process training: DistributedDataParallel with the fused BN, and convert_sync_batchnorm.

Two CPU processes (gloo). Each rank gets half of a batch; with SyncBatchNorm the statistics are those
of the whole batch, so logits, gradients (DDP averages the ranks' gradients of their mean losses =
the gradient of the full batch's mean loss) and running statistics must equal torchvision's
single-process run on the whole batch (what torch.nn.SyncBatchNorm computes; torch's own class
refuses CPU tensors). Without SyncBN each rank normalizes its own half. float64 throughout, so the
comparison is exact up to summation order (rtol 1e-9, atol 1e-9 * the tensor's largest magnitude) and
free of float32 ReLU-mask noise (see tests/models/test_train_parity.py).
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
RTOL = 1e-9


def _close(actual, expected, what):
    actual, expected = actual.detach(), expected.detach()
    scale = expected.abs().max().clamp_min(1e-30).item()
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale, msg=lambda m: f"{what}: {m}")


def _models(arch="resnet18"):
    import torchvision
    from _utils import randomize_bn

    import resnet_fast

    torch.manual_seed(0)
    theirs = randomize_bn(getattr(torchvision.models, arch)(num_classes=10)).double().train()
    ours = getattr(resnet_fast, arch)(num_classes=10).double()
    ours.load_state_dict(theirs.state_dict())
    return ours.train(), theirs


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4 * WORLD, 3, 32, 32, generator=g, dtype=torch.float64)
    return x.contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (4 * WORLD,), generator=g)


def _check_step(rank, ours, references, x, target, what):
    """One DDP step on this rank's half vs the references' (logits of this half, grads, buffers)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(ours)
    half = slice(rank * 4, rank * 4 + 4)
    out = ddp(x[half])
    F.cross_entropy(out, target[half]).backward()
    ref_out, ref_model = references
    _close(out, ref_out[half], f"{what}: logits")
    ref_params = dict(ref_model.named_parameters())
    for name, p in ours.named_parameters():
        _close(p.grad, ref_params[name].grad, f"{what}: grad of {name}")
    return ref_model


def _worker(rank: int, init_file: str, errors: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    try:
        import resnet_fast

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        x, target = _data()
        backends = ["torch"] + (
            [] if resnet_fast.ops.backend_for(torch.device("cpu")) == "torch" else ["auto"]
        )
        for backend in backends:
            resnet_fast.set_backend(backend)

            # SyncBN: the whole batch's statistics on each rank.
            ours, theirs = _models()
            ours = resnet_fast.convert_sync_batchnorm(ours)
            assert isinstance(ours.layer1[0].bn1, resnet_fast.nn.SyncBatchNorm)
            ref_out = theirs(x)
            F.cross_entropy(ref_out, target).backward()
            _check_step(rank, ours, (ref_out, theirs), x, target, f"SyncBN/{backend}")
            their_buffers = dict(theirs.named_buffers())
            for name, b in ours.named_buffers():
                if b.is_floating_point():
                    _close(b, their_buffers[name], f"SyncBN/{backend}: buffer {name}")
                else:
                    assert torch.equal(b, their_buffers[name]), name

            # Plain fused BN under DDP: each rank normalizes its own half.
            ours, theirs = _models()
            outs = [theirs(x[r * 4 : r * 4 + 4]) for r in range(WORLD)]
            loss = sum(F.cross_entropy(o, target[r * 4 : r * 4 + 4]) for r, o in enumerate(outs)) / WORLD
            loss.backward()
            _check_step(rank, ours, (torch.cat(outs), theirs), x, target, f"DDP/{backend}")
        dist.destroy_process_group()
    except Exception:
        Path(errors, f"rank{rank}.txt").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_sync_batchnorm_two_processes(tmp_path):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    try:
        mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    except Exception as error:
        reports = "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.txt")))
        raise AssertionError(f"a rank failed:\n{reports or error}") from None


def test_convert_sync_batchnorm_keeps_state():
    import torchvision

    import resnet_fast

    model = torchvision.models.resnet18()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = resnet_fast.convert_sync_batchnorm(model)
    assert converted.state_dict().keys() == state.keys()
    for k, v in converted.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not any(type(m) is torch.nn.BatchNorm2d for m in converted.modules())
    # Not distributed: a SyncBatchNorm is a BatchNorm2d.
    bn = converted.bn1
    x = torch.randn(2, 64, 5, 5)
    ref = torch.nn.BatchNorm2d(64)
    ref.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn(x), ref(x))
