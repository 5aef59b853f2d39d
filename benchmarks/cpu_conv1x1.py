"""The 1x1 GEMM kernel (resnet_fast._C.conv1x1_bias_act) against oneDNN's fused convolution, on CPU:
each ResNet-50 1x1 shape alone, then the whole model with the per-layer choice (the residual added in
place where the model allows it, or not) against every layer on oneDNN, in one process, interleaved
rounds, medians.

    python benchmarks/cpu_conv1x1.py [--batch 8] [--rounds 11] [--model-rounds 9] [--json PATH]

Alone: oneDNN is called as the cpp route calls it (mkldnn::_convolution_pointwise with a prepacked
weight, the residual through its binary post-op) but without our NaN scans; the GEMM with its packed
weight. Model: three copies of cpu_infer.py's ResNet-50: plans made with layer_choice as usual
(choices measured now if not cached), the same with every output fresh, and every layer on oneDNN.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from resnet_fast import _ext, _timing
from resnet_fast.ops import layer_choice

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_infer import _models  # noqa: E402  (the same weights and BN statistics as cpu_infer.py)

CL = torch.channels_last
# (H=W of the input, cin, cout, stride, residual): every distinct 1x1 layer of ResNet-50 at 224x224.
SHAPES = [
    (56, 64, 64, 1, False),
    (56, 64, 256, 1, False),
    (56, 64, 256, 1, True),
    (56, 256, 64, 1, False),
    (56, 256, 128, 1, False),
    (56, 256, 512, 2, False),
    (28, 128, 512, 1, True),
    (28, 512, 128, 1, False),
    (28, 512, 256, 1, False),
    (28, 512, 1024, 2, False),
    (14, 256, 1024, 1, True),
    (14, 1024, 256, 1, False),
    (14, 1024, 512, 1, False),
    (14, 1024, 2048, 2, False),
    (7, 512, 2048, 1, True),
    (7, 2048, 512, 1, False),
]


def _one_shape(batch: int, rounds: int, hw: int, cin: int, cout: int, s: int, has_res: bool) -> dict:
    C, M = _ext.load(), torch.ops.mkldnn
    x = torch.randn(batch, cin, hw, hw).contiguous(memory_format=CL)
    w = torch.randn(cout, cin, 1, 1) / cin**0.5
    b = torch.randn(cout)
    oh = (hw - 1) // s + 1
    res = torch.randn(batch, cout, oh, oh).contiguous(memory_format=CL) if has_res else None
    geometry = ([0, 0], [s, s], [1, 1], 1)
    prepacked = M._reorder_convolution_weight(w, *geometry, list(x.shape))
    packed = C.pack_conv1x1_weight(w)

    def onednn():
        if res is None:
            return M._convolution_pointwise(x, prepacked, b, *geometry, "relu", [None], "")
        return M._convolution_pointwise.binary(
            x, res, prepacked, b, *geometry, "add", None, "relu", [None], ""
        )

    def gemm():
        return C.conv1x1_bias_act(x, packed, b, res, True, s)

    torch.testing.assert_close(gemm(), onednn(), rtol=1e-4, atol=1e-4)
    times = _timing.interleaved({"onednn": onednn, "gemm1x1": gemm}, rounds, torch.device("cpu"))
    ms = {k: _timing.summarize(v)["median_ms"] for k, v in times.items()}
    print(
        f"  {hw:3d}x{hw:<3d} {cin:5d}->{cout:<5d} s{s} res{int(has_res)}: oneDNN {ms['onednn']:7.2f} ms, "
        f"GEMM {ms['gemm1x1']:7.2f} ms -> {ms['gemm1x1'] / ms['onednn']:.2f}x oneDNN's time"
    )
    return {
        "shape": [batch, cin, hw, hw, cout, s, has_res],
        **ms,
        "gemm_x_onednn": ms["gemm1x1"] / ms["onednn"],
    }


def _model(batch: int, rounds: int) -> dict:
    chosen, _ = _models(torch.float32)
    out_of_place = copy.deepcopy(chosen)
    out_of_place._activations_private = lambda: False  # every residual add into a fresh output
    onednn_only = copy.deepcopy(out_of_place)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=CL)
    with torch.no_grad():
        chosen(x)  # plans with the measured choices, residuals added in place on the GEMM
        out_of_place(x)
        real = layer_choice.choose_cpu
        layer_choice.choose_cpu = lambda key, run, cache=None: "onednn"
        try:
            onednn_only(x)  # plans with oneDNN everywhere, as before the GEMM existed
        finally:
            layer_choice.choose_cpu = real
        runs = {
            "choice, residual in place": lambda: chosen(x),
            "choice, fresh outputs": lambda: out_of_place(x),
            "oneDNN only": lambda: onednn_only(x),
        }
        times = _timing.interleaved(runs, rounds, torch.device("cpu"))
    ms = {k: _timing.summarize(v)["median_ms"] for k, v in times.items()}
    base = ms["oneDNN only"]
    print(
        f"  ResNet-50 batch {batch}: " + ", ".join(f"{k} {v:.1f} ms ({v / base:.2f}x)" for k, v in ms.items())
    )
    return ms


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
    if C is None or not C.conv1x1_supported():
        sys.exit(
            "the 1x1 GEMM kernel does not run here (needs resnet_fast._C on an x86-64 CPU with AVX2 + FMA)"
        )
    print(f"1x1 layers of ResNet-50 alone, batch {args.batch}, {torch.get_num_threads()} threads:")
    alone = [_one_shape(args.batch, args.rounds, *shape) for shape in SHAPES]
    print("whole model (interleaved):")
    model = {f"batch {b}": _model(b, args.model_rounds) for b in (args.batch, 1)}
    result = {"machine": _timing.machine_info(torch.device("cpu")), "alone": alone, "model_ms": model}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
