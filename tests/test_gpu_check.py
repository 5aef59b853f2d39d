"""benchmarks/gpu_check.sh, the one command a lent GPU machine runs: its dry run on this CPU writes the
same files as on a GPU, within time, and its summary's verdicts catch what a GPU run must not pass."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check_summary  # noqa: E402

# The GPU run's steps, with one dtype (bfloat16) where the GPU runs bfloat16 and float16.
DRY_RUN_STEPS = [
    "install",
    "info",
    "validate-bfloat16-eval",
    "validate-bfloat16-train",
    "compile-warmup-bfloat16",
    "infer-bfloat16",
    "train-bfloat16",
    "compile-bfloat16",
    "pytest-gpu",
    "max-autotune-bfloat16",
]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "PYTHON": sys.executable}
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=400
    )
    return proc, out, time.monotonic() - start


def test_dry_run_writes_the_file_set_with_every_verdict(dry_run):
    proc, out, wall_s = dry_run
    report = f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    # At most 8 files come back from the GPU machine: these three, nothing else.
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "summary.json", "summary.txt"], report
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    # Background steps finish in any order: compare as sets.
    assert sorted(steps) == sorted(DRY_RUN_STEPS), report
    assert all(s["verdict"] in ("pass", "fail", "timeout", "skipped") for s in steps.values())
    failed = {n: s["why"] for n, s in steps.items() if s["counts"] and s["verdict"] != "pass"}
    assert not failed and summary["ok"] and proc.returncode == 0, f"{failed}\n{report}"
    assert steps["install"]["verdict"] == "skipped" and not steps["install"]["counts"]
    tests = summary["figures"]["tests"]
    assert tests["tests"] > 0 and tests["skipped_no_gpu"] == tests["tests"], tests
    contenders = {r["contender"] for r in summary["figures"]["inference"]}
    assert {"resnet_fast", "torchvision-cl", "compile"} <= contenders, contenders
    assert summary["figures"]["train"]["backend"] == "cpp"
    assert (
        summary["machine"]["versions"]["torch"]
        and summary["run"]["elapsed_s"] <= summary["run"]["budget_s"] + 15
    )
    assert wall_s < 180, f"dry run took {wall_s:.0f} s (limit 180 s)"
    with tarfile.open(out / "results.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    expected = {f"{n}.log" for n, s in steps.items() if s["verdict"] != "skipped"}
    expected |= {"info.json", "validate-bfloat16-train.json", "infer-bfloat16.json", "train-bfloat16.json"}
    expected |= {"compile-bfloat16.json", "pytest-gpu.xml", "steps.tsv", "summary.json", "summary.txt"}
    assert expected <= names, expected - names


def test_dry_run_needs_out_dir():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "usage: bash benchmarks/gpu_check.sh OUT_DIR" in proc.stderr


def test_gpu_step_limits_fit_the_budget():
    """On the GPU the fixed step limits leave the gpu tests a share and the whole run under 8 minutes:
    BUDGET_S plus the 10 s kill grace of one step plus packing the results."""
    text = SCRIPT.read_text()
    cuda = text[text.index('if [ "$DEVICE" = cuda ]; then') :]
    limits = {k: int(v) for k, v in re.findall(r"\b(L_[A-Z]+)=(\d+)", cuda.split("else", 1)[0])}
    budget = int(re.search(r"BUDGET_S=\$\{BUDGET_S:-(\d+)\}", cuda).group(1))
    dtypes = 2  # bf16 and fp16: one inference and one compile step each
    fixed = limits["L_INSTALL"] + limits["L_INFO"] + limits["L_VALIDATE"] + limits["L_TRAIN"]
    fixed += dtypes * (limits["L_INFER"] + limits["L_COMPILE"])
    assert fixed <= budget and budget + 10 + 10 <= 480, (fixed, budget)


# --- verdicts: what a GPU run must not pass ------------------------------------------------------------


def _work(tmp_path: Path, steps: list[str], device: str = "cuda") -> Path:
    (tmp_path / "run.tsv").write_text(f"device\t{device}\nquick\t0\nbudget_s\t460\nelapsed_s\t400\n")
    (tmp_path / "steps.tsv").write_text("".join(f"{s}\n" for s in steps))
    return tmp_path


def _summary(work: Path) -> tuple[int, dict]:
    rc = gpu_check_summary.main([str(work)])
    summary = json.loads((work / "summary.json").read_text())
    return rc, {s["name"]: s for s in summary["steps"]}


def _info(cuda_sources: bool, triton_why: str = "") -> dict:
    return {
        "extension": {"usable": True, "cuda": cuda_sources, "why not": ""},
        "backends": {"triton": {"cuda": triton_why, "cpu": "x"}, "cpp": {"cuda": "", "cpu": ""}},
        "auto choice": {"cuda": "cpp" if triton_why else "triton", "cpu": "cpp"},
    }


@pytest.mark.parametrize(
    "info, passes",
    [(_info(True), True), (_info(False), False), (_info(True, "triton is not importable"), False)],
)
def test_info_fails_without_cuda_sources_or_triton(tmp_path, info, passes):
    (tmp_path / "info.json").write_text(json.dumps(info))
    rc, steps = _summary(_work(tmp_path, ["info\tok\t0\t5\t20\t"]))
    assert (steps["info"]["verdict"] == "pass") is passes and (rc == 0) is passes


@pytest.mark.parametrize(
    "backend, ok, passes", [("triton", True, True), ("torch", True, False), ("triton", False, False)]
)
def test_validate_fails_on_the_torch_backend_or_past_tolerance(tmp_path, backend, ok, passes):
    report = {
        "ok": ok,
        "backend": backend,
        "errors": {"logits": 1e-3, "logits_max_abs": 1e-3, "top1_agreement": 1.0},
        "bounds": {"logits": 2e-3},
        "failed": [] if ok else ["logits"],
        "first_diverging_block": None,
        "batch_size": 16,
        "image_size": 224,
    }
    (tmp_path / "validate-bfloat16-eval.json").write_text(json.dumps(report))
    rc, steps = _summary(
        _work(tmp_path, [f"validate-bfloat16-eval\t{'ok' if ok else 'fail'}\t{0 if ok else 1}\t9\t100\t"])
    )
    assert (steps["validate-bfloat16-eval"]["verdict"] == "pass") is passes


def _junit(path: Path, skip_message: str | None, failure: bool = False) -> None:
    case = '<testcase classname="tests.ops.test_conv_cuda" name="test_x"{}</testcase>'
    inner = ">"
    if skip_message:
        inner = f'><skipped type="pytest.skip" message="{skip_message}"/>'
    elif failure:
        inner = '><failure message="AssertionError: boom"/>'
    counts = f'tests="1" failures="{int(failure)}" errors="0" skipped="{int(bool(skip_message))}"'
    path.write_text(
        f'<testsuites><testsuite name="pytest" {counts}>{case.format(inner)}</testsuite></testsuites>'
    )


@pytest.mark.parametrize(
    "device, skip, failure, passes",
    [
        ("cuda", None, False, True),
        ("cuda", "needs a CUDA GPU; none is present on this machine", False, False),
        ("cuda", None, True, False),
        ("cpu", "needs a CUDA GPU; none is present on this machine", False, True),
        ("cpu", None, False, False),  # a gpu test that runs without a GPU: its mark is lost
    ],
)
def test_pytest_verdict_counts_skips_for_lack_of_a_gpu(tmp_path, device, skip, failure, passes):
    _junit(tmp_path / "pytest-gpu.xml", skip, failure)
    status = "fail\t1" if failure else "ok\t0"
    rc, steps = _summary(_work(tmp_path, [f"pytest-gpu\t{status}\t30\t100\t"], device))
    assert (steps["pytest-gpu"]["verdict"] == "pass") is passes, steps["pytest-gpu"]


def test_step_without_time_fails_the_run_but_max_autotune_does_not(tmp_path):
    work = _work(tmp_path, ["max-autotune-bfloat16\tskipped\t\t0\t0\tonly 5s left"])
    rc, steps = _summary(work)
    assert rc == 1  # nothing counted passed: no evidence is not a pass
    work = _work(
        tmp_path, ["info\tskipped\t\t0\t0\tno time left", "max-autotune-bfloat16\tskipped\t\t0\t0\tx"]
    )
    rc, steps = _summary(work)
    assert rc == 1 and steps["info"]["counts"] and not steps["max-autotune-bfloat16"]["counts"]
