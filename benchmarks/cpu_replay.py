"""A model's replay (resnet_fast.nn.replay) compiled into one C++ call against the same replay in Python,
ResNet-50 at batch 1 and 8 (224x224, float32, eval), in one process.

    python benchmarks/cpu_replay.py [--rounds 30] [--json PATH]

Two copies of cpu_infer.py's model (the same weights), one replayed in Python (replay.COMPILE off around
its calls), one compiled; interleaved rounds (resnet_fast.tools.timing), each timed call right after an
untimed one of the same copy; medians. The difference is the Python between the kernels: plan closures,
buffer lookups and argument conversion per layer.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from resnet_fast.nn import replay
from resnet_fast.tools import timing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_infer import _models  # noqa: E402  (the same weights and BN statistics as cpu_infer.py)


def _python_replay(model: torch.nn.Module, x: torch.Tensor):
    def call():
        replay.COMPILE = False
        try:
            return model(x)
        finally:
            replay.COMPILE = True

    return call


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    compiled, _ = _models(torch.float32)
    python = copy.deepcopy(compiled)
    cpu = torch.device("cpu")
    result = {"machine": timing.machine_info(cpu), "rounds": args.rounds}
    with torch.no_grad():
        for batch in (1, 8):
            x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
            fns = {"compiled": lambda x=x: compiled(x), "python": _python_replay(python, x)}
            for fn in fns.values():
                for _ in range(3):  # recorded, captured, replayed
                    fn()
            times = timing.interleaved(fns, args.rounds, cpu, after_itself=True)
            ms = {name: timing.summarize(t)["median_ms"] for name, t in times.items()}
            result[f"batch{batch}"] = {**ms, "compiled_faster_by": ms["python"] / ms["compiled"]}
            print(
                f"batch {batch}: compiled {ms['compiled']:.2f} ms, in Python {ms['python']:.2f} ms "
                f"({ms['python'] / ms['compiled']:.3f}x)"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
