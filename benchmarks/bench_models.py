"""Whole models: resnet_fast against torchvision eager (NCHW, channels_last), and torch.compile with
--bench-compile; the contenders are built by resnet_fast.bench (the `resnet-fast bench` CLI), so both
measure the same thing. The CLI interleaves contenders in one process; pytest-benchmark runs them one
after the other, so prefer the CLI's figures for ratios on a busy machine.

    pytest benchmarks/bench_models.py --benchmark-only --benchmark-json benchmarks/results/<machine>/models.json
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from resnet_fast.tools import bench, timing

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ARCHS = ["resnet18", "resnet50"]
BATCH = {"cpu": 8, "cuda": 64}
CONTENDERS = ["resnet_fast", "torchvision", "torchvision-cl", "compile"]


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_model_infer(benchmark, request, arch, device, contender):
    if contender == "compile" and not request.config.getoption("--bench-compile"):
        pytest.skip("torch.compile takes minutes here: pass --bench-compile")
    dev = torch.device(device)
    dtype = torch.float32 if device == "cpu" else torch.float16
    setup = bench.Setup(arch, dev, dtype, "infer", BATCH[device], 224)
    torch.manual_seed(0)
    base = torchvision.models.get_model(arch)
    x = torch.randn(setup.batch_size, 3, 224, 224).to(dev, dtype)
    y = torch.zeros(setup.batch_size, dtype=torch.long, device=dev)
    with torch._inductor.config.patch(freezing=device == "cpu"):
        step = bench.build(contender, base, x, y, setup)
        benchmark.group = f"{arch} infer {device} {dtype} batch {setup.batch_size}"
        benchmark.extra_info.update(
            arch=arch, device=device, contender=contender, batch_size=setup.batch_size
        )

        def call():
            step()
            timing.sync(dev)

        rounds = 5 if device == "cpu" else 20
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=2, iterations=1)
