"""GPU training step of ResNet-50 with AMP bf16 (forward + backward + SGD step): resnet_fast (fused train
BN on the Triton backend, or --backend cpp for the CUDA C++ kernels) against torchvision eager, both
channels_last, one process.

    python benchmarks/gpu_train.py [--rounds 20] [--batch 256] [--size 224] [--backend auto] [--dtype bfloat16]
                                   [--out PATH] [--device cuda]

--device cpu (AMP bf16 on the CPU) only smoke-tests the script (benchmarks/gpu_check.sh's dry run).

Targets (issue #5): >= 1.2x torchvision eager, peak memory <= 0.75x. Medians over interleaved rounds
(resnet_fast.tools.timing); peak memory = torch.cuda.max_memory_allocated during one step above what is
allocated before it. Before timing it checks the fused step's loss against torchvision's on the same
weights (bf16 noise level). Writes --out (default benchmarks/results/<gpu-tag>-gpu_train.json).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import resnet_fast
from resnet_fast.tools import timing

RESULTS = Path(__file__).resolve().parent / "results"
CL = torch.channels_last


def _step_fn(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, dtype: torch.dtype):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="steps per model before timing (default 3)")
    parser.add_argument("--backend", default="auto", help="resnet_fast backend (auto, triton, cpp, torch)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--device", default="cuda", help="cuda (cpu only smoke-tests this script)")
    parser.add_argument(
        "--out", type=Path, help="result JSON (default benchmarks/results/<gpu-tag>-gpu_train.json)"
    )
    args = parser.parse_args(argv)

    try:
        dev, dtype = timing.check_device_dtype(args.device, args.dtype)
        backend = timing.set_backend_for(args.backend, dev)
    except timing.UsageError as error:
        raise SystemExit(f"gpu_train.py: error: {error}") from None
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, args.arch)().train().to(dev, memory_format=CL)
    ours = resnet_fast.from_torchvision(copy.deepcopy(theirs)).train()
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev).contiguous(memory_format=CL)
    target = torch.randint(0, 1000, (args.batch,), device=dev)
    fns = {
        "resnet_fast": _step_fn(ours, x, target, dtype),
        "torchvision-cl": _step_fn(theirs, x, target, dtype),
    }

    # Same weights, same data: the first steps' losses agree to bf16/fp16 noise.
    losses = {name: fn().float().item() for name, fn in fns.items()}
    rel = abs(losses["resnet_fast"] - losses["torchvision-cl"]) / abs(losses["torchvision-cl"])
    if rel > 2e-2:
        raise SystemExit(
            f"fused loss {losses['resnet_fast']:.5f} vs torchvision {losses['torchvision-cl']:.5f}"
        )
    for fn in fns.values():  # warm-up: cuDNN autotuning, Triton compiles, allocator
        for _ in range(args.warmup):
            fn()

    times = timing.interleaved(fns, args.rounds, dev)
    stats = {name: timing.summarize(t) for name, t in times.items()}
    memory = {name: timing.peak_memory(fn, dev) for name, fn in fns.items()}
    speedup = stats["torchvision-cl"]["median_ms"] / stats["resnet_fast"]["median_ms"]
    mem_ratio = memory["resnet_fast"] / memory["torchvision-cl"]

    info = timing.machine_info(dev)
    result = {
        "benchmark": "gpu_train",
        "config": {
            **vars(args),
            "out": str(args.out),
            "layout": "channels_last",
            "resnet_fast_backend": backend,
        },
        "machine": info,
        "first_step_loss": losses,
        "first_step_loss_rel_diff": rel,
        "timing": stats,
        "img_per_s": {name: args.batch / (st["median_ms"] / 1e3) for name, st in stats.items()},
        "speedup_vs_torchvision_cl": speedup,
        "peak_memory_bytes": memory,
        "memory_ratio_vs_torchvision_cl": mem_ratio,
        "memory_method": timing.MEMORY_METHOD[dev.type],
        "targets_met": {"speed>=1.2x": speedup >= 1.2, "memory<=0.75x": mem_ratio <= 0.75},
    }
    print(
        f"{args.arch} training step, AMP {args.dtype}, batch {args.batch}, {args.size}x{args.size}, channels_last"
    )
    print(f"machine: {timing.describe_machine(info, dev)}; resnet_fast backend: {backend}")
    for name, s in stats.items():
        print(
            f"  {name:12s} median {s['median_ms']:8.2f} ms  (q1 {s['q1_ms']:.2f}, q3 {s['q3_ms']:.2f})"
            f"  peak {memory[name] / 2**30:6.2f} GiB"
        )
    print(f"  speed: {speedup:.3f}x torchvision eager channels_last (target >= 1.2x)")
    print(f"  peak memory: {mem_ratio:.3f}x torchvision channels_last (target <= 0.75x)")
    out = args.out or RESULTS / f"{timing.machine_tag(info, dev)}-gpu_train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
