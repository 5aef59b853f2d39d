"""`resnet-fast bench`: throughput of resnet_fast against torchvision eager (NCHW and channels_last),
torch.compile and, on request, onnxruntime / OpenVINO, all in one process with interleaved rounds.

Contenders (see CONTENDERS): each is built from the same torchvision model (same weights), takes
the same input values and runs the same iteration: a forward under no_grad (--mode infer), or
forward + cross-entropy + backward + SGD step (--mode train).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import timing
from .timing import UsageError

CONTENDERS = {
    "resnet_fast": "resnet_fast eager, NCHW input (converted to the backend's layout inside the model)",
    "torchvision": "torchvision eager, NCHW",
    "torchvision-cl": "torchvision eager, model and input channels_last (input converted before timing)",
    "compile": "torch.compile(torchvision) default mode, dynamic=False; CPU inference with Inductor freezing",
    "compile-max-autotune": "torch.compile(torchvision, mode='max-autotune'), dynamic=False",
    "resnet_fast-compile": "torch.compile(resnet_fast), same settings as 'compile'",
    "resnet_fast-cudagraph": "resnet_fast eager captured once in a CUDA graph (torch.cuda.graph), replayed",
    "onnxruntime": "onnxruntime CPUExecutionProvider on the torchvision model exported to ONNX (float32 only)",
    "openvino": "OpenVINO CPU on the converted torchvision model (inference precision = --dtype)",
}
BASELINES = ("torchvision", "torchvision-cl", "compile", "compile-max-autotune")
PEERS = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino",)}
_COMPILED = ("compile", "compile-max-autotune", "resnet_fast-compile")


def default_contenders(device: torch.device, mode: str = "infer") -> list[str]:
    names = ["resnet_fast", "torchvision", "torchvision-cl", "compile"]
    if device.type == "cuda":
        names.append("compile-max-autotune")
        if mode == "infer":
            names.append("resnet_fast-cudagraph")
    return names


def _missing_modules(peer: str) -> list[str]:
    return [m for m in PEERS[peer] if importlib.util.find_spec(m) is None]


@dataclass
class Setup:
    arch: str
    device: torch.device
    dtype: torch.dtype
    mode: str
    batch_size: int
    image_size: int


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> object:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def _infer_step(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def step() -> object:
        with torch.no_grad():
            return model(x)

    return step


def _torch_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Setup) -> Callable[[], object]:
    return _train_step(model, x, y) if s.mode == "train" else _infer_step(model, x)


def build(name: str, base: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Setup) -> Callable[[], object]:
    """One iteration of contender `name` (a fresh copy of `base`), ready to call."""
    import resnet_fast

    model = copy.deepcopy(base).to(s.device, s.dtype).train(s.mode == "train")
    if name in ("resnet_fast", "resnet_fast-compile", "resnet_fast-cudagraph"):
        model = resnet_fast.from_torchvision(model)
    if name == "resnet_fast-cudagraph":
        return _cuda_graph_step(model, x)
    if name == "torchvision-cl":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if name in _COMPILED:
        mode = "max-autotune" if name == "compile-max-autotune" else None
        model = torch.compile(model, mode=mode, dynamic=False)
    if name in PEERS:
        with warnings.catch_warnings():  # the exporters' deprecation notices about torch.jit.trace
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            return _peer_step(name, model, x, s)
    return _torch_step(model, x, y, s)


def _cuda_graph_step(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """Inference replayed from one CUDA graph: no Python or launch overhead per layer."""
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    # Warm-up outside the capture: per-layer choices are measured and Triton autotunes here.
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = model(static_x)

    def step() -> object:
        graph.replay()
        return static_out

    return step


def _peer_step(name: str, model: nn.Module, x: torch.Tensor, s: Setup) -> Callable[[], object]:
    threads = torch.get_num_threads()
    x_np = x.float().numpy()
    if name == "onnxruntime":
        import io

        import onnxruntime as ort

        buffer = io.BytesIO()
        # The TorchScript exporter needs only the onnx package (the dynamo one also needs onnxscript).
        torch.onnx.export(model.float(), (x.float(),), buffer, dynamo=False, input_names=["x"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        return lambda: session.run(None, {"x": x_np})
    import openvino as ov

    # OpenVINO runs bf16 by default on CPUs with bf16 units: ask for the dtype being compared.
    precision = "bf16" if s.dtype == torch.bfloat16 else "f32"
    converted = ov.convert_model(model.float(), example_input=x.float())
    compiled = ov.compile_model(
        converted, "CPU", {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads}
    )
    return lambda: compiled(x_np)


def check_contenders(names: list[str], device: torch.device, dtype: torch.dtype, mode: str) -> None:
    for name in names:
        if name not in CONTENDERS:
            raise UsageError(f"unknown contender {name!r}; expected some of {', '.join(CONTENDERS)}")
        if name == "resnet_fast-cudagraph" and (device.type != "cuda" or mode != "infer"):
            raise UsageError("contender resnet_fast-cudagraph runs on CUDA in --mode infer only")
        if name in PEERS:
            missing = _missing_modules(name)
            if missing:
                raise UsageError(
                    f"contender {name} needs {', '.join(missing)}: pip install {' '.join(missing)}"
                )
            if device.type != "cpu" or mode != "infer":
                raise UsageError(f"contender {name} is measured on CPU in --mode infer only")
            if name == "onnxruntime" and dtype != torch.float32:
                raise UsageError(
                    "contender onnxruntime runs float32 only (its CPU convolutions have no bf16)"
                )
    if len(set(names)) != len(names) or not names:
        raise UsageError(f"--contenders must name each contender once, got {names}")


def resolve_contenders(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[list[str], list[str]]:
    """The contenders to run and notes about those left out."""
    notes = []
    if args.contenders:
        names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    else:
        names = default_contenders(device, args.mode)
        if args.peers:
            for peer in PEERS:
                missing = _missing_modules(peer)
                if missing:
                    notes.append(f"{peer} left out: not installed (pip install {' '.join(missing)})")
                elif device.type != "cpu" or args.mode != "infer":
                    notes.append(f"{peer} left out: measured on CPU in --mode infer only")
                elif peer == "onnxruntime" and dtype != torch.float32:
                    notes.append("onnxruntime left out: float32 only")
                else:
                    names.append(peer)
    if args.no_compile:
        names = [n for n in names if n not in _COMPILED]
    check_contenders(names, device, dtype, args.mode)
    return names, notes


def run(args: argparse.Namespace) -> dict:
    """Measure every contender for every batch size; returns the result document (also --json)."""
    timing.check_arch(args.arch)
    device, dtype = timing.check_device_dtype(args.device, args.dtype)
    for flag in ("iters", "warmup", "image_size"):
        minimum = {"iters": 1, "warmup": 0, "image_size": 16}[flag]
        if getattr(args, flag) < minimum:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least {minimum}")
    if any(b < 1 for b in args.batch_size):
        raise UsageError("--batch-size values must be positive")
    if args.plot:
        _check_plot()
    backend = timing.set_backend_for(args.backend, device)
    names, notes = resolve_contenders(args, device, dtype)
    import torchvision

    machine = timing.machine_info(device)
    doc = {
        "schema": "resnet_fast.bench/1",
        "machine": machine,
        "settings": {
            "arch": args.arch,
            "device": str(device),
            "dtype": args.dtype,
            "mode": args.mode,
            "batch_sizes": args.batch_size,
            "image_size": args.image_size,
            "iters": args.iters,
            "warmup": args.warmup,
            "backend_requested": args.backend,
            "backend": backend,
            "fused_ops": machine["fused_ops"],
            "contenders": {n: CONTENDERS[n] for n in names},
            "timing": "one process, rounds interleaved (order rotated), median over rounds"
            + (
                "; each contender's turn after 0.2 s idle, each timed call after an untimed one of the same "
                "contender"
                if any(n in PEERS for n in names)
                else ""
            ),
            "warmup_s": "building the contender (export/conversion for peers) + the warm-up iterations, "
            "compilation included",
            "peak_memory": timing.MEMORY_METHOD[device.type],
        },
        "notes": notes,
        "results": [],
    }
    torch.manual_seed(0)
    base = getattr(torchvision.models, args.arch)()
    total = len(args.batch_size) * len(names) * (args.warmup + args.iters)
    bar = _progress(total, f"bench {args.arch}", args.no_progress)
    # Inductor freezing (constant-folded weights, prepacked oneDNN convs) is what makes compiled CPU
    # inference fast; it only applies to inference graphs.
    freezing = device.type == "cpu" and args.mode == "infer"
    try:
        with torch._inductor.config.patch(freezing=freezing):
            for batch in args.batch_size:
                s = Setup(args.arch, device, dtype, args.mode, batch, args.image_size)
                doc["results"] += _measure(names, base, s, args, bar, doc["notes"])
    finally:
        bar.close()
    return doc


def _measure(
    names: list[str], base: nn.Module, s: Setup, args: argparse.Namespace, bar, notes: list[str]
) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(s.batch_size, 3, s.image_size, s.image_size, generator=gen).to(s.device, s.dtype)
    y = torch.randint(0, base.fc.out_features, (s.batch_size,), generator=gen).to(s.device)
    steps, warmup_s = {}, {}
    for name in names:
        bar.set_postfix_str(f"batch {s.batch_size}: warm-up {name}")
        start = time.perf_counter()
        try:
            steps[name] = build(name, base, x, y, s)
            for _ in range(args.warmup):
                timing.timed(steps[name], s.device)
                bar.update()
            if args.warmup:
                timing.settle(steps[name])  # no layer path on trial in the timed calls
        except Exception as error:
            if not args.keep_going:
                raise
            steps.pop(name, None)
            notes.append(f"batch {s.batch_size}: {name} left out, it failed: {type(error).__name__}: {error}")
            continue
        warmup_s[name] = time.perf_counter() - start
    names = list(steps)
    bar.set_postfix_str(f"batch {s.batch_size}: timing")
    # Another library's threads spinning after its call would be charged to the next contender.
    peers = any(name in PEERS for name in names)
    times = timing.interleaved(
        steps, args.iters, s.device, on_call=lambda _: bar.update(), after_itself=peers, settle=0.2 * peers
    )
    rows = []
    for name in names:
        stats = timing.summarize(times[name])
        peak = None if name in PEERS else timing.peak_memory(steps[name], s.device)
        rows.append(
            {
                "batch_size": s.batch_size,
                "contender": name,
                **stats,
                "times_ms": [t * 1e3 for t in times[name]],
                "img_per_s": s.batch_size / (stats["median_ms"] / 1e3),
                "warmup_s": warmup_s[name],
                "peak_memory_bytes": peak,
            }
        )
    for row in rows:
        row["ratios"] = {
            b["contender"]: row["img_per_s"] / b["img_per_s"] for b in rows if b["contender"] in BASELINES
        }
    del steps
    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


class _NoProgress:
    def update(self, n: int = 1) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, desc: str, off: bool):
    """A tqdm bar on stderr (hidden when stderr is not a terminal); nothing where tqdm is missing
    (GPU machines installed with --no-deps)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, desc=desc, unit="it", disable=True if off else None)


def format_table(doc: dict) -> str:
    """The human-readable report printed on stdout."""
    st, m = doc["settings"], doc["machine"]
    device = torch.device(st["device"])
    lines = [
        f"{st['arch']}  --mode {st['mode']}  {st['dtype']}  image {st['image_size']}  "
        f"resnet_fast backend: {st['backend']} (fused ops: {', '.join(st['fused_ops']) or 'none'})",
        f"machine: {timing.describe_machine(m, device)}; torch {m['torch']}",
        f"median of {st['iters']} interleaved rounds after {st['warmup']} warm-up iterations",
    ]
    baselines = [b for b in BASELINES if b in st["contenders"]]
    header = ["contender", "ms/batch", "img/s", *[f"x {b}" for b in baselines], "peak MiB", "warm-up s"]
    for batch in st["batch_sizes"]:
        table = [header]
        for r in (r for r in doc["results"] if r["batch_size"] == batch):
            peak = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.1f}"
            table.append(
                [
                    r["contender"],
                    f"{r['median_ms']:.2f}",
                    f"{r['img_per_s']:.2f}",
                    *[f"{r['ratios'][b]:.2f}" if b in r["ratios"] else "n/a" for b in baselines],
                    peak,
                    f"{r['warmup_s']:.1f}",
                ]
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines.append(f"\nbatch {batch}  (x B = img/s relative to contender B)")
        for row in table:
            lines.append(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )
    lines += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(lines)


def _check_plot() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(
            "--plot needs matplotlib: pip install 'resnet_fast[plot]' (or pip install matplotlib)"
        )


def plot(doc: dict, path: str) -> None:
    """img/s against batch size, one line per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = doc["settings"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in st["contenders"]:
        rows = [r for r in doc["results"] if r["contender"] == name]
        ax.plot([r["batch_size"] for r in rows], [r["img_per_s"] for r in rows], marker="o", label=name)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(st["batch_sizes"], [str(b) for b in st["batch_sizes"]])
    ax.set_ylim(bottom=0)
    where = doc["machine"].get("gpu") or doc["machine"]["cpu"]
    ax.set_title(f"{st['arch']} {st['mode']} {st['dtype']} {st['image_size']}px on {where}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="throughput of resnet_fast vs torchvision eager, torch.compile (and peers)",
        description=__doc__.split("\n\n")[0],
    )
    timing.add_model_args(p)
    p.add_argument(
        "--batch-size", type=int, nargs="+", default=[8], help="one or more batch sizes (default 8)"
    )
    p.add_argument("--image-size", type=int, default=224, help="input height and width (default 224)")
    p.add_argument(
        "--mode",
        choices=("infer", "train"),
        default="infer",
        help="infer: forward under no_grad; train: forward + loss + backward + SGD step (default infer)",
    )
    p.add_argument("--iters", type=int, default=5, help="timed rounds per batch size (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up iterations per contender (default 2)")
    p.add_argument("--contenders", help=f"comma-separated, from: {', '.join(CONTENDERS)}")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contenders")
    p.add_argument(
        "--peers", action="store_true", help="add onnxruntime and OpenVINO where installed (CPU, infer)"
    )
    p.add_argument("--json", metavar="PATH", help="write the results, settings and machine as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of img/s vs batch size (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="a contender that fails to build or warm up is left out (with a note) instead of ending the run",
    )
    p.set_defaults(func=main)


def build_parser_args(**overrides: object) -> argparse.Namespace:
    """The bench arguments with their command-line defaults, for scripts (benchmarks/gpu_infer.py)."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--no-progress"])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"unknown bench argument {key!r}")
        setattr(args, key, value)
    return args


def main(args: argparse.Namespace) -> int:
    try:
        doc = run(args)
    except UsageError as error:
        print(f"resnet-fast bench: error: {error}", file=sys.stderr)
        return 2
    print(format_table(doc))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(doc, args.plot)
        print(f"wrote {args.plot}")
    return 0
