"""Verdicts and figures of one benchmarks/gpu_check.sh run: reads its work folder (steps.tsv, run.tsv and
each step's JSON, log and junit XML), writes summary.json and summary.txt there; exit status 0 only
when every counted step passes.

    python benchmarks/gpu_check_summary.py WORK_DIR

A step's verdict is pass, fail, timeout or skipped. It fails when its command failed, when the result it
should have written is missing or incomplete, or when its content says the check did not hold: the
extension built without its CUDA sources, Triton unusable, a model run on the unfused `torch` backend,
numerics past tolerance, a bench contender left out, gpu tests skipped for lack of a GPU. Steps that
only prepare (the compile warm-up) or that run only if time remains (max-autotune) do not count.
Imports no torch, so it runs in a second even where the install broke.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

NO_GPU_SKIP = "needs a CUDA GPU"  # tests/conftest.py's skip reason


def _read_tsv(path: Path) -> list[list[str]]:
    if not path.is_file():
        return []
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(line.strip()[:300] for line in text[-lines:])


def _command(*args: str) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.machine()


def machine(work: Path, run: dict) -> dict:
    """The machine and every version that matters, from what the steps saw and a few cheap commands."""
    info = _json(work / "info.json") or {}
    bench_machine = next(
        (doc["machine"] for p in sorted(work.glob("*.json")) if (doc := _json(p)) and "machine" in doc), {}
    )
    versions = {}
    for package in ("torch", "torchvision", "triton", "resnet_fast", "numpy", "pytest"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    nvcc = _command("nvcc", "--version")
    smi = _command("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader")
    return {
        "python": platform.python_version(),
        "python_path": run.get("python"),
        "platform": platform.platform(),
        "cpu": bench_machine.get("cpu") or _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "gpu": bench_machine.get("gpu"),
        "gpu_memory_gib": bench_machine.get("gpu_memory_gib"),
        "nvidia_smi": smi,
        "cuda_torch": info.get("cuda (torch built with)") or bench_machine.get("cuda"),
        "cudnn": info.get("cudnn") or bench_machine.get("cudnn"),
        "nvcc": re.search(r"release (\S+),", nvcc).group(1) if nvcc and "release" in nvcc else None,
        "tf32_conv": bench_machine.get("tf32_conv"),
        "tf32_matmul": bench_machine.get("tf32_matmul"),
        "versions": versions,
        "resnet_fast_info": info or None,
    }


# --- verdicts per kind of step ----------------------------------------------------------------------


def check_info(work: Path, device: str) -> tuple[list[str], dict]:
    info = _json(work / "info.json")
    if info is None:
        return ["info.json missing or not JSON"], {}
    ext, backends, auto = info["extension"], info["backends"], info["auto choice"]
    problems = []
    if not ext["usable"]:
        problems.append(f"extension not usable: {ext['why not']}")
    if device == "cuda":
        if not ext["cuda"]:
            problems.append("extension built without its CUDA sources")
        for name in ("triton", "cpp"):
            if backends[name]["cuda"]:
                problems.append(f"{name} backend not usable on cuda: {backends[name]['cuda']}")
    wanted = "triton" if device == "cuda" else "cpp"
    if auto[device] != wanted:
        problems.append(f"auto backend on {device} is {auto[device]}, expected {wanted}")
    figures = {"extension": ext, "backends": backends, "auto_choice": auto}
    return problems, figures


def check_validate(work: Path, name: str) -> tuple[list[str], dict]:
    report = _json(work / f"{name}.json")
    if report is None:
        return [f"{name}.json missing"], {}
    e, b = report["errors"], report["bounds"]
    figures = {
        "ok": report["ok"],
        "backend": report["backend"],
        "logits_rel_err": e["logits"],
        "logits_bound": b["logits"],
        "logits_max_abs": e["logits_max_abs"],
        "top1_agreement": e["top1_agreement"],
        "grads_rel_err": e.get("grads"),
        "grads_bound": b.get("grads"),
        "bn_stats_rel_err": e.get("bn_stats"),
        "bn_stats_bound": b.get("bn_stats"),
        "first_diverging_block": report["first_diverging_block"],
        "failed": report["failed"],
        "batch_size": report["batch_size"],
        "image_size": report["image_size"],
    }
    problems = []
    if report["backend"] == "torch":
        problems.append("ran on the unfused torch backend")
    if not report["ok"]:
        what = report["failed"] + [f"block {report['first_diverging_block']}"] * bool(
            report["first_diverging_block"]
        )
        problems.append(f"past tolerance: {', '.join(what)}")
    return problems, figures


def check_bench(work: Path, name: str) -> tuple[list[str], dict]:
    doc = _json(work / f"{name}.json")
    if doc is None:
        return [f"{name}.json missing"], {}
    st = doc["settings"]
    problems = [f"note: {n}" for n in doc["notes"] if "left out" in n]
    for batch in st["batch_sizes"]:
        seen = {r["contender"] for r in doc["results"] if r["batch_size"] == batch}
        missing = [c for c in st["contenders"] if c not in seen]
        if missing:
            problems.append(f"batch {batch}: no figures for {', '.join(missing)}")
    if st["backend"] == "torch" and any(c.startswith("resnet_fast") for c in st["contenders"]):
        problems.append("resnet_fast ran on the unfused torch backend")
    rows = [
        {
            "dtype": st["dtype"],
            "batch_size": r["batch_size"],
            "contender": r["contender"],
            "img_per_s": r["img_per_s"],
            "median_ms": r["median_ms"],
            "q1_ms": r["q1_ms"],
            "q3_ms": r["q3_ms"],
            "peak_memory_mib": None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20,
            "warmup_s": r["warmup_s"],
            "ratios_same_process": r["ratios"],
            "step": name,
        }
        for r in doc["results"]
    ]
    return problems, {
        "backend": st["backend"],
        "iters": st["iters"],
        "image_size": st["image_size"],
        "rows": rows,
    }


def check_train(work: Path, name: str) -> tuple[list[str], dict]:
    doc = _json(work / f"{name}.json")
    if doc is None:
        return [f"{name}.json missing"], {}
    cfg = doc["config"]
    figures = {
        "dtype": cfg["dtype"],
        "batch_size": cfg["batch"],
        "image_size": cfg["size"],
        "backend": cfg["resnet_fast_backend"],
        "median_ms": {n: s["median_ms"] for n, s in doc["timing"].items()},
        "img_per_s": doc["img_per_s"],
        "peak_memory_gib": {n: b / 2**30 for n, b in doc["peak_memory_bytes"].items()},
        "speedup_vs_torchvision_cl": doc["speedup_vs_torchvision_cl"],
        "memory_ratio_vs_torchvision_cl": doc["memory_ratio_vs_torchvision_cl"],
        "first_step_loss_rel_diff": doc["first_step_loss_rel_diff"],
        "targets_met": doc["targets_met"],
    }
    problems = (
        ["resnet_fast ran on the unfused torch backend"] if cfg["resnet_fast_backend"] == "torch" else []
    )
    return problems, figures


def check_pytest(work: Path, device: str) -> tuple[list[str], dict]:
    path = work / "pytest-gpu.xml"
    try:
        suites = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return [f"no junit XML ({_tail(work / 'pytest-gpu.log')})"], {}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    no_gpu, other_skips, failed = 0, {}, []
    for case in suites.iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        for child in case:
            if child.tag == "skipped":
                reason = child.get("message", "")
                if NO_GPU_SKIP in reason:
                    no_gpu += 1
                else:
                    other_skips[reason] = other_skips.get(reason, 0) + 1
            elif child.tag in ("failure", "error"):
                failed.append(f"{test}: {child.get('message', '')[:200]}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    figures = {
        **counts,
        "passed": passed,
        "skipped_no_gpu": no_gpu,
        "other_skips": other_skips,
        "failed": failed,
    }
    problems = []
    if counts["tests"] == 0:
        problems.append("no gpu test ran")
    if failed:
        problems.append(f"{len(failed)} failed or errored: {'; '.join(failed[:3])}")
    if device == "cuda" and no_gpu:
        problems.append(f"{no_gpu} skipped for lack of a GPU")
    if device != "cuda" and passed:
        problems.append(f"{passed} gpu tests passed without a GPU: their gpu mark is not honoured")
    return problems, figures


def verdict_for(work: Path, device: str, name: str, status: str, rc: str, note: str) -> dict:
    # The warm-up only prepares a cache; max-autotune runs only if time remains.
    counts = not name.startswith(("compile-warmup", "max-autotune"))
    if status == "skipped":
        # An install skipped on purpose (dry run, SKIP_INSTALL=1) does not count; one without time does.
        counts = counts and not (name == "install" and note != "no time left")
        return {"name": name, "counts": counts, "verdict": "skipped", "why": note}
    problems, figures = [], {}
    try:
        if name == "info":
            problems, figures = check_info(work, device)
        elif name.startswith("validate-"):
            problems, figures = check_validate(work, name)
        elif name.startswith(("infer-", "compile-", "max-autotune-")) and not name.startswith(
            "compile-warmup"
        ):
            problems, figures = check_bench(work, name)
        elif name.startswith("train-"):
            problems, figures = check_train(work, name)
        elif name == "pytest-gpu":
            problems, figures = check_pytest(work, device)
    except (KeyError, TypeError, ValueError) as error:  # a result file of an unexpected shape
        problems = [f"unreadable result: {type(error).__name__}: {error}"]
    if status != "ok" and not (name == "pytest-gpu" and status == "fail" and figures):
        # pytest exits 1 when a test fails: its XML says which; other steps' logs say why.
        problems.insert(0, f"exit status {rc}: {_tail(work / f'{name}.log')}")
    verdict = "timeout" if status == "timeout" else ("fail" if problems else "pass")
    return {
        "name": name,
        "counts": counts,
        "verdict": verdict,
        "why": "; ".join(problems),
        "figures": figures,
    }


# --- the report -------------------------------------------------------------------------------------


def inference_table(steps: list[dict]) -> list[dict]:
    """Every inference row, with resnet_fast's ratios to torchvision-cl (same process) and to torch.compile
    default (measured in the compile step of the same dtype, a separate process: same machine, minutes apart)."""
    rows = [r for s in steps for r in (s.get("figures") or {}).get("rows", [])]
    best = {}
    for r in rows:
        if r["contender"] in ("compile", "compile-max-autotune"):
            best[(r["dtype"], r["batch_size"], r["contender"])] = r["img_per_s"]
    for r in rows:
        if r["contender"].startswith("resnet_fast"):
            for peer in ("compile", "compile-max-autotune"):
                other = best.get((r["dtype"], r["batch_size"], peer))
                r[f"x_{peer}"] = None if other is None else r["img_per_s"] / other
            r["x_torchvision-cl"] = r["ratios_same_process"].get("torchvision-cl")
    return rows


def _fmt(value, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def render_text(summary: dict) -> str:
    m, run = summary["machine"], summary["run"]
    v = m["versions"]
    where = m["gpu"] or m["nvidia_smi"] or f"{m['cpu']} (no GPU: dry run)"
    lines = [
        f"gpu_check {'PASS' if summary['ok'] else 'FAIL'}: {summary['counted_pass']} of {summary['counted']} "
        f"counted steps pass; {run['elapsed_s']} s of a {run['budget_s']} s budget"
        f"{' (DEVICE=cpu QUICK=1 dry run)' if run['device'] != 'cuda' else ''}",
        f"machine: {where}; nvidia-smi: {m['nvidia_smi']}; host {m['cpu']}, {m['cpu_cores']} cores",
        f"versions: python {m['python']}, torch {v['torch']} (CUDA {m['cuda_torch']}, cuDNN {m['cudnn']}), "
        f"torchvision {v['torchvision']}, triton {v['triton']}, nvcc {m['nvcc']}, resnet_fast {v['resnet_fast']}",
        "",
        f"{'step':28s} {'verdict':8s} {'time s':>6s} {'limit':>5s}  why",
    ]
    for s in summary["steps"]:
        mark = "" if s["counts"] else " (not counted)"
        lines.append(
            f"{s['name']:28s} {s['verdict']:8s} {s['seconds']:>6} {s['limit_s']:>5}  {s['why']}{mark}"[:400]
        )
    val = [s for s in summary["steps"] if s["name"].startswith("validate-") and s.get("figures")]
    if val:
        lines += ["", "validate vs torchvision (relative error / bound):"]
        for s in val:
            f = s["figures"]
            grads = (
                ""
                if f["grads_rel_err"] is None
                else f", grads {_fmt(f['grads_rel_err'])} / {_fmt(f['grads_bound'])}"
            )
            lines.append(
                f"  {s['name'][9:]:18s} [{f['backend']}] logits {_fmt(f['logits_rel_err'])} / {_fmt(f['logits_bound'])}"
                f", top-1 {f['top1_agreement']:.0%}{grads}, first block past: {f['first_diverging_block']}"
            )
    rows = summary["figures"]["inference"]
    if rows:
        lines += ["", "inference img/s (x torchvision-cl same process; x compile from the compile step):"]
        for r in rows:
            extra = ""
            if r["contender"].startswith("resnet_fast"):
                extra = (
                    f"  x tv-cl {_fmt(r['x_torchvision-cl'], '.2f')}  x compile {_fmt(r['x_compile'], '.2f')}"
                )
            lines.append(
                f"  {r['dtype']:9s} b{r['batch_size']:<4} {r['contender']:22s} {r['img_per_s']:10.1f} img/s"
                f"  {r['median_ms']:8.2f} ms  peak {_fmt(r['peak_memory_mib'], '.0f')} MiB{extra}"
            )
    train = summary["figures"]["train"]
    if train:
        lines += [
            "",
            f"training AMP {train['dtype']} batch {train['batch_size']} [{train['backend']}]: "
            f"{_fmt(train['speedup_vs_torchvision_cl'], '.3f')}x torchvision-cl speed, "
            f"{_fmt(train['memory_ratio_vs_torchvision_cl'], '.3f')}x its peak memory; "
            + ", ".join(f"{n} {ms:.1f} ms" for n, ms in train["median_ms"].items()),
        ]
    tests = summary["figures"]["tests"]
    if tests:
        lines += [
            "",
            f"gpu tests: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped ({tests['skipped_no_gpu']} for lack of a GPU)",
        ]
        lines += [f"  {f}" for f in tests["failed"][:20]]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    work = Path(argv[0])
    run = {k: v for k, v, *_ in _read_tsv(work / "run.tsv")}
    device = run.get("device", "cuda")
    steps = []
    for name, status, rc, seconds, limit, note in _read_tsv(work / "steps.tsv"):
        row = verdict_for(work, device, name, status, rc, note)
        steps.append({**row, "status": status, "rc": rc, "seconds": int(seconds), "limit_s": int(limit)})
    counted = [s for s in steps if s["counts"]]
    figure = lambda prefix: next((s.get("figures") for s in steps if s["name"].startswith(prefix)), None)  # noqa: E731
    summary = {
        "schema": "resnet_fast.gpu_check/1",
        "ok": bool(counted) and all(s["verdict"] == "pass" for s in counted),
        "counted": len(counted),
        "counted_pass": sum(s["verdict"] == "pass" for s in counted),
        "run": {
            "device": device,
            "quick": run.get("quick") == "1",
            "budget_s": int(run.get("budget_s", 0)),
            "elapsed_s": int(run.get("elapsed_s", 0)),
            "arch": run.get("arch"),
            "python": run.get("python"),
        },
        "machine": machine(work, run),
        "steps": steps,
        "figures": {
            "info": figure("info"),
            "validate": {s["name"]: s.get("figures") for s in steps if s["name"].startswith("validate-")},
            "inference": inference_table(steps),
            "train": figure("train-"),
            "tests": figure("pytest-gpu"),
        },
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (work / "summary.txt").write_text(render_text(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
