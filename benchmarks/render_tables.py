"""Render the README's performance tables from the JSON files in benchmarks/results/.

Reads both kinds of result file: `resnet-fast bench --json` (schema resnet_fast.bench/1) and
pytest-benchmark's --benchmark-json of this folder's suite. Prints Markdown; with --readme, replaces
the text between the markers below in that file instead.

    python benchmarks/render_tables.py                       # every file under benchmarks/results/
    python benchmarks/render_tables.py FILE.json --readme README.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
START, END = "<!-- bench-tables:start -->", "<!-- bench-tables:end -->"
BASELINES = ("torchvision", "torchvision-cl", "compile", "compile-max-autotune")


def _machine(m: dict, device: str) -> str:
    if device.startswith("cuda"):
        return f"{m.get('gpu') or ', '.join(m.get('gpus', []))}, CUDA {m.get('cuda')}"
    return f"{m['cpu']}, {m['cpu_cores']} cores"


def _versions(m: dict) -> str:
    return f"torch {m['torch']}, torchvision {m['torchvision']}, resnet_fast {m['resnet_fast']}"


def render_bench(doc: dict, name: str) -> str:
    """A `resnet-fast bench` result: one table, rows per batch size and contender."""
    st, m = doc["settings"], doc["machine"]
    baselines = [b for b in BASELINES if b in st["contenders"]]
    lines = [
        f"**{st['arch']}, {st['mode']}, {st['dtype']}, {st['image_size']}x{st['image_size']}** on "
        f"{_machine(m, st['device'])} ({_versions(m)}; resnet_fast backend `{st['backend']}`, fused ops: "
        f"{', '.join(st['fused_ops']) or 'none'}; median of {st['iters']} interleaved rounds; {m['date'][:10]}; "
        f"`{name}`)",
        "",
        "| batch | contender | ms / batch | img/s | "
        + " | ".join(f"x {b}" for b in baselines)
        + " | peak MiB | warm-up s |",
        "| ---: | --- | ---: | ---: | " + " | ".join("---:" for _ in baselines) + " | ---: | ---: |",
    ]
    for r in doc["results"]:
        peak = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        ratios = " | ".join(f"{r['ratios'][b]:.2f}" for b in baselines)
        name_cell = f"**{r['contender']}**" if r["contender"] == "resnet_fast" else r["contender"]
        lines.append(
            f"| {r['batch_size']} | {name_cell} | {r['median_ms']:.1f} | {r['img_per_s']:.1f} | {ratios} | "
            f"{peak} | {r['warmup_s']:.1f} |"
        )
    return "\n".join(lines)


def render_pytest_benchmark(doc: dict, name: str) -> str:
    """A pytest-benchmark result of this suite: per group, median and speed-up over its baseline
    (the 'reference' backend for ops, torchvision eager for models)."""
    m = doc["machine_info"].get("resnet_fast", {})
    groups: dict[str, list[dict]] = {}
    for b in doc["benchmarks"]:
        groups.setdefault(b["group"] or b["name"], []).append(b)
    where = f"{m.get('cpu')}, {m.get('cpu_cores')} cores; GPUs: {', '.join(m.get('gpus', [])) or 'none'}"
    lines = [
        f"pytest-benchmark `{name}` on {where} ({_versions(m) if m else 'versions unknown'}); "
        "speed-up = baseline median / median",
        "",
        "| case | variant | median ms | speed-up |",
        "| --- | --- | ---: | ---: |",
    ]
    for group, rows in groups.items():
        variant = {id(r): r["extra_info"].get("backend") or r["extra_info"].get("contender") for r in rows}
        base = next((r for r in rows if variant[id(r)] in ("reference", "torchvision")), rows[0])
        for r in rows:
            speedup = base["stats"]["median"] / r["stats"]["median"]
            lines.append(f"| {group} | {variant[id(r)]} | {r['stats']['median'] * 1e3:.2f} | {speedup:.2f} |")
    return "\n".join(lines)


def render(paths: list[Path]) -> str:
    parts = []
    for path in paths:
        doc = json.loads(path.read_text())
        name = path.relative_to(RESULTS).as_posix() if path.is_relative_to(RESULTS) else path.name
        if doc.get("schema") == "resnet_fast.bench/1":
            parts.append(render_bench(doc, name))
        elif "benchmarks" in doc and "machine_info" in doc:
            parts.append(render_pytest_benchmark(doc, name))
        elif "ok" in doc and "errors" in doc:
            continue  # a `resnet-fast validate --json` report (gpu_check.sh writes those too)
        else:
            print(f"skipping {path}: not a result file this script knows", file=sys.stderr)
    return "\n\n".join(parts)


def replace_between_markers(text: str, tables: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"markers {START} ... {END} not found")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{tables}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="result JSON files (default: all under results/)")
    parser.add_argument("--readme", type=Path, help="replace the tables between the markers in this file")
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.files] or sorted(RESULTS.rglob("*.json"))
    if not paths:
        raise SystemExit(f"no result files under {RESULTS}")
    tables = render(paths)
    if args.readme:
        args.readme.write_text(replace_between_markers(args.readme.read_text(), tables))
        print(f"updated {args.readme}")
    else:
        print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
