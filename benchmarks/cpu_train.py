"""CPU training step of ResNet-50 (forward + backward + SGD step): resnet_fast (fused train BN: conv,
then one BN(+add)+ReLU op, forward and backward) against torchvision eager, both models and the input
channels_last, one process.

    python benchmarks/cpu_train.py [--rounds 10] [--batch 8] [--size 224] [--arch resnet50] [--backend auto]

Medians over interleaved rounds (resnet_fast.tools.timing); the speed ratio is torchvision's median over
resnet_fast's. Peak memory: bytes one training step allocates above what is held before it
(timing.MEMORY_METHOD). Writes benchmarks/results/<machine-tag>-cpu_train.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import resnet_fast
from resnet_fast.tools import timing

RESULTS = Path(__file__).resolve().parent / "results"
CL = torch.channels_last


def _step_fn(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--backend", default="auto", help="resnet_fast backend (auto, cpp, torch)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = parser.parse_args(argv)

    cpu = torch.device("cpu")
    backend = timing.set_backend_for(args.backend, cpu)
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, args.arch)().train().to(memory_format=CL)
    # Both models channels_last (weights too), as a user of either would run them on CPU.
    ours = resnet_fast.from_torchvision(theirs).train().to(memory_format=CL)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=CL)
    target = torch.randint(0, 1000, (args.batch,))
    fns = {"resnet_fast": _step_fn(ours, x, target), "torchvision": _step_fn(theirs, x, target)}
    for fn in fns.values():  # warm-up: allocator, oneDNN primitive caches, optimizer state
        fn()
        fn()

    times = timing.interleaved(fns, args.rounds, cpu)
    stats = {name: timing.summarize(t) for name, t in times.items()}
    speedup = stats["torchvision"]["median_ms"] / stats["resnet_fast"]["median_ms"]
    memory = {} if args.no_memory else {name: timing.peak_memory(fn, cpu) for name, fn in fns.items()}

    info = timing.machine_info(cpu)
    result = {
        "benchmark": "cpu_train",
        "config": {
            **vars(args),
            "dtype": "float32",
            "layout": "channels_last",
            "resnet_fast_backend": backend,
        },
        "machine": info,
        "timing": stats,
        "speedup_vs_torchvision": speedup,
        "peak_memory_bytes": memory,
        "memory_method": timing.MEMORY_METHOD["cpu"],
    }
    if memory:
        result["memory_ratio_vs_torchvision"] = memory["resnet_fast"] / memory["torchvision"]

    print(
        f"{args.arch} training step (fwd+bwd+SGD), fp32, batch {args.batch}, {args.size}x{args.size}, channels_last"
    )
    print(f"machine: {timing.describe_machine(info, cpu)}; resnet_fast backend: {backend}")
    for name, s in stats.items():
        mem = f"  peak {memory[name] / 2**20:8.1f} MiB" if memory else ""
        print(
            f"  {name:12s} median {s['median_ms']:8.1f} ms  (q1 {s['q1_ms']:.1f}, q3 {s['q3_ms']:.1f}){mem}"
        )
    print(f"  speed: {speedup:.3f}x torchvision eager channels_last")
    if memory:
        print(f"  peak memory: {result['memory_ratio_vs_torchvision']:.3f}x torchvision")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{timing.machine_tag(info, cpu)}-cpu_train.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
