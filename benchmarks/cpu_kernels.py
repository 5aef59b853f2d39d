"""Our CPU convolution kernels (resnet_fast._C: the implicit GEMM, Winograd F(2x2, 3x3) and F(4x4, 3x3)
for 3x3 stride-1 layers) against oneDNN's fused convolution: each ResNet-50 conv shape alone, then the whole
model with the per-layer choice (outputs into buffers kept between forwards and residuals added in
place where the model allows it, or every output fresh) against every layer on oneDNN, in one
process, interleaved rounds, medians.

    python benchmarks/cpu_kernels.py [--batch 8] [--rounds 11] [--model-rounds 9] [--json PATH]

Alone: oneDNN is called as the cpp route calls it (mkldnn::_convolution_pointwise with a prepacked
weight, the residual through its binary post-op, a fresh output) but without our NaN scans; ours with
their packed weight, writing into a warm output buffer (as in the model's forward). Model: three
copies of cpu_infer.py's ResNet-50: plans made with layer_choice as usual (choices measured now if not
cached), the same with every output fresh, and every layer on oneDNN; with the minor page faults of
one warm forward each and the memory the kept buffers hold.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
from pathlib import Path

import torch
import torchvision

from resnet_fast import _ext
from resnet_fast.nn import fused
from resnet_fast.ops import layer_choice
from resnet_fast.tools import timing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_infer import _models  # noqa: E402  (the same weights and BN statistics as cpu_infer.py)

CL = torch.channels_last


def _resnet50_convs(batch: int) -> list[tuple]:
    """ResNet-50's distinct conv shapes: (x shape, weight shape, stride, padding, has residual)."""
    model = torchvision.models.resnet50().eval()
    last = {
        id(block.conv3)
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
        for block in stage
    }
    shapes: list[tuple] = []

    def record(conv, args, out):
        shape = (
            tuple(args[0].shape),
            tuple(conv.weight.shape),
            conv.stride[0],
            conv.padding[0],
            id(conv) in last,
        )
        if shape not in shapes:
            shapes.append(shape)

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(record)
    with torch.no_grad():
        model(torch.randn(batch, 3, 224, 224))
    return shapes


def _one_shape(rounds: int, x_shape, w_shape, s: int, p: int, has_res: bool) -> dict:
    C, M = _ext.load(), torch.ops.mkldnn
    x = torch.randn(x_shape).contiguous(memory_format=CL)
    w = torch.randn(w_shape) / (w_shape[1] * w_shape[2] * w_shape[3]) ** 0.5
    b = torch.randn(w_shape[0])
    oh = (x_shape[2] + 2 * p - w_shape[2]) // s + 1
    out_shape = (x_shape[0], w_shape[0], oh, oh)
    res = torch.randn(out_shape).contiguous(memory_format=CL) if has_res else None
    out = torch.empty(out_shape).contiguous(memory_format=CL)
    geometry = ([p, p], [s, s], [1, 1], 1)
    prepacked = M._reorder_convolution_weight(w, *geometry, list(x.shape))

    def onednn():
        if res is None:
            return M._convolution_pointwise(x, prepacked, b, *geometry, "relu", [None], "")
        return M._convolution_pointwise.binary(
            x, res, prepacked, b, *geometry, "add", None, "relu", [None], ""
        )

    ours: dict = {}
    if w_shape[2:] == (3, 3) and s == 1:
        for tile, kernel in ((2, "winograd"), (4, "winograd4")):
            packed = C.pack_winograd_weight(w, tile)
            space = torch.empty(C.winograd_workspace_size(list(x.shape), w_shape[0], [p, p], tile))
            ours[kernel] = lambda packed=packed, space=space: C.conv_winograd_bias_act(
                x, packed, b, res, True, [p, p], out, space
            )
    else:
        packed = C.pack_conv_gemm_weight(w)
        ours["gemm"] = lambda: C.conv_gemm_bias_act(x, packed, b, res, True, [s, s], [p, p], [1, 1], out)

    expected = onednn()
    for run in ours.values():
        torch.testing.assert_close(run(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    times = timing.interleaved({"onednn": onednn, **ours}, rounds, torch.device("cpu"))
    ms = {k: timing.summarize(v)["median_ms"] for k, v in times.items()}
    kernel = min(ours, key=ms.__getitem__)  # our fastest
    print(
        f"  x{list(x_shape)} w{list(w_shape)} s{s} res{int(has_res)}: oneDNN {ms['onednn']:7.2f} ms, "
        + ", ".join(f"{k} {ms[k]:7.2f} ms" for k in ours)
        + f" -> {ms[kernel] / ms['onednn']:.2f}x oneDNN's time"
    )
    return {
        "x": list(x_shape),
        "w": list(w_shape),
        "stride": s,
        "padding": p,
        "residual": has_res,
        "kernel": kernel,
        **ms,
        "ours_x_onednn": ms[kernel] / ms["onednn"],
    }


def _model(batch: int, rounds: int) -> dict:
    chosen, _ = _models(torch.float32)
    fresh = copy.deepcopy(chosen)
    fresh._private_modules = lambda: None  # every output fresh, no residual added in place
    onednn_only = copy.deepcopy(fresh)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=CL)
    with torch.no_grad():
        chosen(x)  # plans with the measured choices
        fresh(x)
        real = layer_choice.choose_cpu
        layer_choice.choose_cpu = lambda key, run, cache=None, before=None: "onednn"
        try:
            onednn_only(x)  # plans with oneDNN everywhere, as before our kernels existed
        finally:
            layer_choice.choose_cpu = real
        runs = {
            "choice, kept buffers": lambda: chosen(x),
            "choice, fresh outputs": lambda: fresh(x),
            "oneDNN only": lambda: onednn_only(x),
        }
        times = timing.interleaved(runs, rounds, torch.device("cpu"))
        faults = {}
        for name, run in runs.items():  # minor page faults of one warm forward
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            run()
            faults[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    ms = {k: timing.summarize(v)["median_ms"] for k, v in times.items()}
    base = ms["oneDNN only"]
    print(
        f"  ResNet-50 batch {batch}: " + ", ".join(f"{k} {v:.1f} ms ({v / base:.2f}x)" for k, v in ms.items())
    )
    print("    minor page faults per warm forward: " + ", ".join(f"{k} {v}" for k, v in faults.items()))
    held = sum(b.nbytes() for b in fused._IDLE_BUFFERS.get(chosen, []))
    print(f"    buffers kept: {held / 2**20:.1f} MiB")
    return {"ms": ms, "minor_faults": faults, "buffers_mib": held / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--model-rounds", type=int, default=9)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    C = _ext.load()
    if C is None or not C.conv_gemm_supported():
        sys.exit(
            "our CPU kernels do not run here (they need resnet_fast._C on an x86-64 CPU with AVX2 + FMA)"
        )
    print(f"ResNet-50's conv shapes alone, batch {args.batch}, {torch.get_num_threads()} threads:")
    alone = [_one_shape(args.rounds, *shape) for shape in _resnet50_convs(args.batch)]
    print("whole model (interleaved):")
    model = {f"batch {b}": _model(b, args.model_rounds) for b in (args.batch, 1)}
    result = {"machine": timing.machine_info(torch.device("cpu")), "alone": alone, "model_ms": model}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
