"""CPU inference of ResNet-50: resnet_fast (cpp backend: folded BN, oneDNN fused conv + post-ops,
prepacked weights) against torchvision eager channels_last and torch.compile with
torch._inductor.config.freezing = True (channels_last), all in one process.

    python benchmarks/cpu_infer.py [--rounds 15] [--batch 8] [--size 224] [--skip-bf16] [--skip-batch1] [--peers]
                                   [--first-calls 3] [--json PATH]

--peers adds onnxruntime (CPUExecutionProvider, intra-op threads = torch's) and OpenVINO (CPU,
INFERENCE_PRECISION_HINT set to the dtype compared: it runs bf16 by itself on AVX512_BF16 CPUs)
on the same torchvision weights (`pip install -e ".[peers]"`); the same builders as `resnet-fast bench --peers`.

Every measurement is the median over interleaved rounds (resnet_fast.tools.timing), each contender's turn
after 0.2 s idle and each timed call right after an untimed one of the same contender (onnxruntime's
spinning threads would otherwise slow whatever runs next); ratios are the baseline's median over resnet_fast's. First-call ("warm-up")
times are measured on fresh models, after a garbage collection: ours folds and prepacks every layer on its first call (with
an empty layer-choice cache, every distinct conv shape timed then; with the choices cached; at batch N and at batch 1;
each in a new process, the median of --first-calls of them, every sample in the JSON), compile+freezing compiles on its own.
Writes benchmarks/results/<machine-tag>-cpu_infer.json.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torchvision

import resnet_fast
from resnet_fast.ops import conv_route, layer_choice
from resnet_fast.tools import timing

RESULTS = Path(__file__).resolve().parent / "results"
CL = torch.channels_last
SETTLE_S = 0.2  # idle before each contender's turn: other engines' worker threads stop spinning


def _models(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(resnet_fast, torchvision channels_last) ResNet-50 with the same random weights and BN stats."""
    torch.manual_seed(0)
    theirs = torchvision.models.resnet50().eval()
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ours = resnet_fast.from_torchvision(theirs).eval().to(dtype)
    return ours, theirs.to(dtype).to(memory_format=CL)


def _first_call(fn) -> float:
    # Collected first, as timeit does: the garbage left by imports and model building would otherwise
    # be collected inside whichever call is timed next (a full collection of this process's ~340,000
    # objects took 0.16-0.19 s on the Zen 4, whatever triggers it).
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _first_call_elsewhere(batch: int, size: int, choices: Path) -> float:
    """Seconds of resnet_fast's first call on a fresh model in a new process (this script with
    --first-call-child), its layer choices read from and written to `choices`."""
    command = [sys.executable, __file__, "--first-call-child", str(choices), "--batch", str(batch)]
    done = subprocess.run([*command, "--size", str(size)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"first call in a new process failed:\n{done.stderr}")
    return float(done.stdout.split()[-1])


def _first_call_child(args: argparse.Namespace) -> None:
    layer_choice.CPU_CACHE = layer_choice.ChoiceCache(Path(args.first_call_child), device_type="cpu")
    ours = _models(torch.float32)[0]
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=CL)
    with torch.no_grad():
        print(_first_call(lambda: ours(x)))


def _compiled(model: torch.nn.Module) -> torch.nn.Module:
    with torch._inductor.config.patch(freezing=True):
        return torch.compile(model, dynamic=False)


def _run(label: str, fns: dict, rounds: int) -> dict:
    cpu = torch.device("cpu")
    for fn in fns.values():  # settle allocators and caches before timing
        fn()
    timing.settle(fns["resnet_fast"])  # close calls settled in its forwards first (no path on trial timed)
    times = timing.interleaved(fns, rounds, cpu, after_itself=True, settle=SETTLE_S)
    stats = {name: timing.summarize(t) for name, t in times.items()}
    ours = stats["resnet_fast"]["median_ms"]
    print(f"\n{label}")
    print(f"  {'contender':28s} {'median ms':>10s} {'q1':>8s} {'q3':>8s} {'ours faster by':>15s}")
    for name, s in stats.items():
        ratio = s["median_ms"] / ours
        s["speedup_of_resnet_fast"] = ratio
        print(f"  {name:28s} {s['median_ms']:10.1f} {s['q1_ms']:8.1f} {s['q3_ms']:8.1f} {ratio:14.2f}x")
    return stats


def _peers(theirs: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace) -> dict:
    """onnxruntime and OpenVINO steps on `theirs`, for --peers (what is not installed is said and left out)."""
    if not args.peers:
        return {}
    from resnet_fast.tools import bench

    steps = {}
    for name, modules in bench.PEERS.items():
        if name == "onnxruntime" and x.dtype != torch.float32:
            continue  # its CPU convolutions have no bf16
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            print(f"  {name} left out: {', '.join(missing)} not installed (pip install -e '.[peers]')")
            continue
        setup = SimpleNamespace(dtype=x.dtype)
        label = "openvino f32" if name == "openvino" and x.dtype == torch.float32 else name
        label = "openvino bf16" if name == "openvino" and x.dtype == torch.bfloat16 else label
        steps[label] = bench._peer_step(name, copy.deepcopy(theirs).float(), x, setup)
    return steps


def _nonfinite_check_cost(model: torch.nn.Module, x: torch.Tensor, rounds: int) -> dict:
    """What keeping NaN costs on the cpp route: each conv with a ReLU scans its input and residual for
    Inf/NaN (resnet_fast._C.all_finite) before trusting oneDNN's ReLU post-op (layers on our kernels
    keep NaN themselves and scan nothing). Collect those tensors from one forward, then time the scans
    against the forward, interleaved."""
    from resnet_fast import _ext
    from resnet_fast.ops import conv as conv_ops

    scanned: list[torch.Tensor] = []
    make = conv_ops._CONV_RUNNER["cpp"]

    def recording(x, w, b, residual, relu, *geometry, **options):
        run = make(x, w, b, residual, relu, *geometry, **options)

        def recorded(x, residual, buffers=None):
            if relu and run.__name__ == "onednn":
                scanned.extend(t for t in (x, residual) if t is not None)
            return run(x, residual, buffers)

        return recorded

    fresh = copy.deepcopy(model)  # plans are made on first use: a copy makes them with the recorder
    conv_ops._CONV_RUNNER["cpp"] = recording
    try:
        fresh(x)
    finally:
        conv_ops._CONV_RUNNER["cpp"] = make
    all_finite = _ext.load().all_finite
    times = timing.interleaved(
        {"forward": lambda: model(x), "scans": lambda: [all_finite(t) for t in scanned]},
        rounds,
        torch.device("cpu"),
    )
    forward, scans = (timing.summarize(times[k])["median_ms"] for k in ("forward", "scans"))
    print(
        f"NaN-keeping check: {len(scanned)} scans take {scans:.2f} ms per forward of {forward:.1f} ms "
        f"({100 * scans / forward:.1f}% of it)"
    )
    return {"scans": len(scanned), "scan_ms": scans, "forward_ms": forward, "fraction": scans / forward}


def _fp32(x: torch.Tensor, args: argparse.Namespace, result: dict) -> None:
    """First calls on fresh models, then steady state at batch N and batch 1."""
    with tempfile.TemporaryDirectory() as folder:
        # Each first call in a new process, as a user's is: in this one, later models' first calls ran up
        # to 2x slower than the first's (0.83 vs 0.44 s at batch 8 on the Zen 4, the packs' fresh memory
        # slowest). Each empty-cache sample writes its own choice file (batch N, then batch 1: other
        # shapes, timed then); the cached ones read the first sample's, as the next process would (not
        # ~/.cache, which may hold other shapes only, or nothing after KERNELS_REVISION changed).
        samples: dict[str, list[float]] = {
            "resnet_fast": [],
            "resnet_fast_empty_cache": [],
            "resnet_fast batch 1": [],
            "resnet_fast_empty_cache batch 1": [],
        }
        for i in range(args.first_calls):
            choices = Path(folder) / f"choices{i}.json"
            samples["resnet_fast_empty_cache"].append(_first_call_elsewhere(args.batch, args.size, choices))
            samples["resnet_fast_empty_cache batch 1"].append(_first_call_elsewhere(1, args.size, choices))
        choices = Path(folder) / "choices0.json"
        for _ in range(args.first_calls):
            samples["resnet_fast"].append(_first_call_elsewhere(args.batch, args.size, choices))
            samples["resnet_fast batch 1"].append(_first_call_elsewhere(1, args.size, choices))
        # The steady state below: plans made here, settling close calls into the first sample's file.
        saved = layer_choice.CPU_CACHE
        try:
            layer_choice.CPU_CACHE = layer_choice.ChoiceCache(choices, device_type="cpu")
            ours, theirs = _models(torch.float32)
            x1 = x[:1].contiguous(memory_format=CL)
            ours(x)
            ours(x1)
        finally:
            layer_choice.CPU_CACHE = saved
        compiled = _compiled(theirs)
        warm = {name: statistics.median(v) for name, v in samples.items()}
        warm["compile+freezing"] = _first_call(lambda: compiled(x))
        print(
            f"first call (s): resnet_fast {warm['resnet_fast']:.2f} (fold + prepack, layer choices from the cache), "
            f"{warm['resnet_fast_empty_cache']:.2f} with an empty cache (every layer choice timed); at batch 1 "
            f"{warm['resnet_fast batch 1']:.2f} and {warm['resnet_fast_empty_cache batch 1']:.2f}; "
            f"compile+freezing {warm['compile+freezing']:.1f} (compilation)"
        )
        result["first_call_s"] = warm
        result["first_call_samples_s"] = samples
        diff = (ours(x) - theirs(x)).abs().max() / theirs(x).abs().max()
        print(f"max |ours - torchvision| / max |torchvision| = {diff:.2e}")
        result["fp32_rel_diff_vs_torchvision"] = float(diff)
        result["nonfinite_check"] = _nonfinite_check_cost(ours, x, args.rounds)
        result["runs"]["fp32"] = _run(
            f"fp32, batch {args.batch}, {args.size}x{args.size}",
            {
                "resnet_fast": lambda: ours(x),
                "eager channels_last": lambda: theirs(x),
                "compile+freezing": lambda: compiled(x),
                **_peers(theirs, x, args),
            },
            args.rounds,
        )
        if args.skip_batch1:
            return
        compiled1 = _compiled(theirs)
        compiled1(x1)
        result["runs"]["fp32_batch1"] = _run(
            f"fp32, batch 1 latency, {args.size}x{args.size}",
            {
                "resnet_fast": lambda: ours(x1),
                "eager channels_last": lambda: theirs(x1),
                "compile+freezing": lambda: compiled1(x1),
                **_peers(theirs, x1, args),
            },
            args.rounds * 3,
        )


def _bf16(x: torch.Tensor, args: argparse.Namespace, result: dict) -> None:
    ours, theirs = _models(torch.bfloat16)
    reference = _models(torch.float32)[1](x).double()
    x = x.to(torch.bfloat16)
    compiled = _compiled(theirs)
    result["first_call_s"]["compile+freezing bf16"] = _first_call(lambda: compiled(x))
    result["first_call_s"]["resnet_fast bf16"] = _first_call(lambda: ours(x))
    # Against the float32 model: ours (bf16 GEMM, Winograd where chosen) beside torchvision's own bf16.
    diff = {
        name: float((model(x).double() - reference).abs().max() / reference.abs().max())
        for name, model in (("resnet_fast", ours), ("torchvision bf16", theirs))
    }
    print(
        f"bf16: max |ours - fp32| / max |fp32| = {diff['resnet_fast']:.2e} "
        f"(torchvision bf16: {diff['torchvision bf16']:.2e})"
    )
    result["bf16_rel_diff_vs_fp32"] = diff
    result["runs"]["bf16"] = _run(
        f"bf16, batch {args.batch}, {args.size}x{args.size}",
        {
            "resnet_fast": lambda: ours(x),
            "eager channels_last": lambda: theirs(x),
            "compile+freezing": lambda: compiled(x),
            **_peers(theirs, x, args),
        },
        args.rounds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--skip-batch1", action="store_true")
    parser.add_argument(
        "--first-calls", type=int, default=3, help="new processes per first-call figure (median)"
    )
    parser.add_argument(
        "--first-call-child", default=None, help=argparse.SUPPRESS
    )  # see _first_call_elsewhere
    parser.add_argument("--peers", action="store_true", help="add onnxruntime and OpenVINO (where installed)")
    parser.add_argument(
        "--json", default=None, help="where to write the results (default: results/<machine>-cpu_infer.json)"
    )
    args = parser.parse_args()

    resnet_fast.set_backend("cpp")
    if args.first_call_child:
        _first_call_child(args)
        return
    info = timing.machine_info(torch.device("cpu"))
    info["cpp_conv_route"] = {"float32": conv_route("cpu"), "bfloat16": conv_route("cpu", torch.bfloat16)}
    print(timing.describe_machine(info, torch.device("cpu")))
    print(f"cpp conv route: {info['cpp_conv_route']['float32']}")
    result: dict = {"machine": info, "model": "resnet50", "size": args.size, "batch": args.batch, "runs": {}}
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=CL)

    with torch.no_grad():
        _fp32(x, args, result)
        if not args.skip_bf16:
            _bf16(x, args, result)

    RESULTS.mkdir(exist_ok=True)
    path = (
        Path(args.json)
        if args.json
        else RESULTS / f"{timing.machine_tag(info, torch.device('cpu'))}-cpu_infer.json"
    )
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
