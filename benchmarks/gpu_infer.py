"""ResNet-50 inference throughput on one GPU: resnet_fast (eager and CUDA graph) against torchvision
eager (NCHW, channels_last) and torch.compile (default, max-autotune), batch 1/32/256, fp16/bf16/fp32.

All contenders of one dtype run in one process through `resnet-fast bench`'s harness (interleaved
rounds, medians, peak memory). Writes one JSON per dtype, tagged with the GPU name, and prints the
issue's targets (batch 256 fp16: >= 1.3x torchvision channels_last, >= 1.0x max-autotune).

    python benchmarks/gpu_infer.py [--out benchmarks/results] [--batch-size 1 32 256] [--iters 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from resnet_fast.tools import bench, timing

TARGETS = {("float16", 256): {"torchvision-cl": 1.3, "compile-max-autotune": 1.0}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("RESNET_FAST_RESULTS", "benchmarks/results"))
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--dtype", nargs="+", default=["float16", "bfloat16", "float32"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contenders")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_infer.py: no CUDA GPU on this machine", file=sys.stderr)
        return 2
    tag = timing.machine_tag(timing.machine_info(torch.device("cuda")), torch.device("cuda"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for dtype in args.dtype:
        bench_args = bench.build_parser_args(
            device="cuda",
            dtype=dtype,
            batch_size=args.batch_size,
            iters=args.iters,
            warmup=args.warmup,
            no_compile=args.no_compile,
        )
        doc = bench.run(bench_args)
        print(bench.format_table(doc))
        path = out / f"{tag}-resnet50-infer-{dtype}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}")
        for row in doc["results"]:
            goals = TARGETS.get((dtype, row["batch_size"]), {})
            if row["contender"] not in ("resnet_fast", "resnet_fast-cudagraph"):
                continue
            for baseline, floor in goals.items():
                ratio = row["ratios"].get(baseline)
                shown = "n/a" if ratio is None else f"{ratio:.2f}x, {'met' if ratio >= floor else 'MISSED'}"
                print(
                    f"target {row['contender']} vs {baseline} >= {floor}x at batch {row['batch_size']} {dtype}: {shown}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
