"""Where the CPU time goes, layer by layer: each resnet_fast conv timed inside real forwards beside
onnxruntime's per-node profile of the same ResNet-50 (SessionOptions.enable_profiling). Issue 12 asks
for this table wherever a CPU target is missed.

    python benchmarks/cpu_layers.py [--batch 8] [--size 224] [--rounds 5] [--json PATH]

Each round runs, one after the other: onnxruntime's profiled run of the exported torchvision model
(intra-op threads = torch's; its wall time and per-node times), our forward twice (the second one's
wall time: onnxruntime's threads spin on after its run and slow whatever comes next), and our
forward on a second copy whose conv plans (ops.conv_runner, whichever path layer_choice picked:
oneDNN, the GEMM or Winograd) are wrapped in perf_counter pairs. Medians over `rounds` after two warm-ups;
our forward's wall time minus its layers' sum is what runs outside the convolutions. Both models
have cpu_infer.py's weights. This machine's speed drifts by 10-20% over minutes, hence the
interleaving; single per-layer figures still vary by about that much between runs. onnxruntime names
a fused node by its output: `.../relu/Relu` is a block's conv1, `relu_1` its conv2, `conv3/Conv` the
conv3 with the residual add and ReLU fused, `/relu/Relu` at the top the stem.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from resnet_fast import fold
from resnet_fast.tools import timing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_infer import _models  # noqa: E402  (the same weights and BN statistics as cpu_infer.py)


def _timed_plans(model: torch.nn.Module, samples: dict, paths: dict) -> list:
    """Wrap every conv plan of `model` (made by a previous call) to append its ms to samples[layer]."""
    wrapped = []
    for name, module in model.named_modules():
        cache = module.__dict__.get(fold._ATTR)  # the conv's fold, holding its plans
        if cache is None:
            continue
        for key, run in list(cache.entry.runners.items()):
            paths[name] = getattr(
                run, "__name__", "?"
            )  # "onednn", "gemm", "gemm_rows", "winograd" or "winograd4" (cpp backend)

            def timed(x, residual, buffers=None, run=run, name=name):
                start = time.perf_counter()
                out = run(x, residual, buffers)
                samples[name].append((time.perf_counter() - start) * 1e3)
                return out

            wrapped.append((cache.entry, key, run))
            cache.entry.runners[key] = timed
    return wrapped


def _ort_session(x: torch.Tensor, profile_dir: str):
    import onnxruntime as ort

    _, theirs = _models(torch.float32)
    buffer = io.BytesIO()
    torch.onnx.export(theirs, (x,), buffer, dynamo=False, input_names=["x"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(profile_dir) / "ort")
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def _ort_nodes(events: list, rounds: int) -> dict[str, dict]:
    """{node name: {"op", "ms"}}: per node the median of its last `rounds` kernel times."""
    per_node: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            per_node[name].append(e["dur"] / 1e3)
            ops[name] = e.get("args", {}).get("op_name", "?")
    return {n: {"op": ops[n], "ms": statistics.median(d[-rounds:])} for n, d in per_node.items()}


def _measure(x: torch.Tensor, rounds: int) -> tuple[list[dict], dict[str, dict], dict[str, float]]:
    """Rounds run onnxruntime's profiled run, our forward twice, then our forward with timed layers."""
    ours, _ = _models(torch.float32)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    feed = {"x": x.numpy()}
    walls: dict[str, list[float]] = {"ours": [], "onnxruntime": []}
    samples: dict[str, list[float]] = defaultdict(list)
    paths: dict[str, str] = {}

    def wall(name, fn):
        start = time.perf_counter()
        fn()
        walls[name].append((time.perf_counter() - start) * 1e3)

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        session = _ort_session(x, tmp)
        for _ in range(2):  # warm-ups: plans made, paths chosen, sessions primed
            ours(x_cl)
            session.run(None, feed)
        timing.settle(lambda: ours(x_cl))  # close calls settled (the timed copy then reads them)
        timed_model = _models(torch.float32)[0]
        timed_model(x_cl)
        timed_model(x_cl)
        wrapped = _timed_plans(timed_model, samples, paths)
        for _ in range(rounds):
            wall("onnxruntime", lambda: session.run(None, feed))
            ours(x_cl)  # untimed: onnxruntime's threads spin on after its run and would slow it
            wall("ours", lambda: ours(x_cl))
            timed_model(x_cl)
        for entry, key, run in wrapped:
            entry.runners[key] = run
        events = json.loads(Path(session.end_profiling()).read_text())
    rows = [{"layer": n, "ours_ms": statistics.median(v), "path": paths[n]} for n, v in samples.items()]
    return rows, _ort_nodes(events, rounds), {k: statistics.median(v) for k, v in walls.items()}


def _ort_name(layer: str) -> str:
    """onnxruntime's node for our conv layer (see the module docstring)."""
    if layer == "conv1":
        return "/relu/Relu_output_0_nchwc"
    stage, block, conv = layer.split(".")[:3]
    base = f"/{stage}/{stage}.{block}"
    if conv == "downsample":
        return base + "/downsample/downsample.0/Conv_output_0_nchwc"
    return (
        base
        + {"conv1": "/relu/Relu", "conv2": "/relu_1/Relu", "conv3": "/conv3/Conv"}[conv]
        + "_output_0_nchwc"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    rows, nodes, walls = _measure(x, args.rounds)
    our_forward, ort_run = walls["ours"], walls["onnxruntime"]
    for r in rows:
        node = nodes.pop(_ort_name(r["layer"]), None)
        r["ort_ms"] = node["ms"] if node else None
    ours_convs = sum(r["ours_ms"] for r in rows)
    ort_convs = sum(r["ort_ms"] or 0.0 for r in rows)
    ort_other = sum(v["ms"] for v in nodes.values())
    print(
        f"ResNet-50 {args.batch}x3x{args.size}x{args.size} fp32, {torch.get_num_threads()} threads, {args.rounds} rounds"
    )
    print(f"{'layer':24s} {'ours ms':>8s} {'ort ms':>8s} {'ort/ours':>8s}  our path")
    for r in rows:
        ort = r["ort_ms"]
        cells = f"{ort:8.2f} {ort / r['ours_ms']:8.2f}" if ort else f"{'-':>8s} {'-':>8s}"
        print(f"{r['layer']:24s} {r['ours_ms']:8.2f} {cells}  {r['path']}")
    print(f"{'all convolutions':24s} {ours_convs:8.1f} {ort_convs:8.1f} {ort_convs / ours_convs:8.2f}")
    print(f"{'whole forward':24s} {our_forward:8.1f} {ort_run:8.1f} {ort_run / our_forward:8.2f}")
    print(
        f"outside the convolutions: ours {our_forward - ours_convs:.1f} ms; onnxruntime's other nodes "
        + ", ".join(f"{n} ({v['op']}) {v['ms']:.1f} ms" for n, v in nodes.items())
    )
    result = {
        "machine": timing.machine_info(torch.device("cpu")),
        "batch": args.batch,
        "size": args.size,
        "rounds": args.rounds,
        "layers": rows,
        "ort_other_nodes": nodes,
        "ms": {
            "ours_forward": our_forward,
            "ours_convs": ours_convs,
            "ort_run": ort_run,
            "ort_convs": ort_convs,
            "ort_other": ort_other,
        },
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
