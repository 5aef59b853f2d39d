"""Host overhead of eager inference: where kernels cost almost nothing, what is left is the
Python/dispatch time per layer. A fused model must not be slower than torchvision there, or it
is CPU-bound on a GPU (issue 11: at most 0.9x torchvision channels_last's time).

    python benchmarks/host_overhead.py [--rounds 30] [--threads 1] [--json PATH]

Measures, in one process, interleaved rounds, medians (resnet_fast.tools.timing):
  model: ResNet-50 eval forward on a 1x3x32x32 input, resnet_fast (auto backend) vs torchvision
         channels_last, under torch.no_grad();
  layer: one 3x3 64->64 Conv->BN->ReLU on 1x64x8x8: resnet_fast.nn.conv_bn_act vs eager conv, bn, relu.
"""

from __future__ import annotations

import argparse
import json

import torch
import torchvision

import resnet_fast
from resnet_fast.nn import conv_bn_act
from resnet_fast.tools import timing

CL = torch.channels_last


def _measure(fns: dict, rounds: int, inner: int) -> dict[str, float]:
    """Median ms per call over interleaved rounds of `inner` calls each."""

    def repeat(fn):
        return lambda: [fn() for _ in range(inner)]

    cpu = torch.device("cpu")
    loops = {name: repeat(fn) for name, fn in fns.items()}
    for fn in loops.values():
        fn()  # warm-up: folds, prepacks, plans, oneDNN primitives
    times = timing.interleaved(loops, rounds, cpu)
    return {name: timing.summarize(t)["median_ms"] / inner for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    theirs = torchvision.models.resnet50().eval()
    ours = resnet_fast.from_torchvision(theirs).eval()
    theirs = theirs.to(memory_format=CL)
    x = torch.randn(1, 3, 32, 32)
    x_cl = x.contiguous(memory_format=CL)

    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).eval()
    bn = torch.nn.BatchNorm2d(64).eval()
    y = torch.randn(1, 64, 8, 8).contiguous(memory_format=CL)

    with torch.no_grad():
        model = _measure(
            {"resnet_fast": lambda: ours(x), "torchvision-cl": lambda: theirs(x_cl)}, args.rounds, 3
        )
        layer = _measure(
            {"resnet_fast": lambda: conv_bn_act(y, conv, bn), "eager": lambda: torch.relu(bn(conv(y)))},
            args.rounds,
            200,
        )
    result = {
        "machine": timing.machine_info(torch.device("cpu")),
        "threads": args.threads,
        "backend": resnet_fast.ops.backend_for(x.device),
        "model_ms": model,
        "model_ratio": model["resnet_fast"] / model["torchvision-cl"],
        "layer_us": {k: v * 1e3 for k, v in layer.items()},
        "layer_ratio": layer["resnet_fast"] / layer["eager"],
    }
    print(
        f"ResNet-50 1x3x32x32, {args.threads} thread(s), backend {result['backend']}: resnet_fast "
        f"{model['resnet_fast']:.2f} ms, torchvision channels_last {model['torchvision-cl']:.2f} ms "
        f"-> {result['model_ratio']:.2f}x its time"
    )
    print(
        f"one 3x3 Conv->BN->ReLU (1x64x8x8): resnet_fast {result['layer_us']['resnet_fast']:.1f} us, "
        f"eager {result['layer_us']['eager']:.1f} us -> {result['layer_ratio']:.2f}x"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
