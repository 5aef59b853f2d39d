"""`resnet-fast bench` and `resnet-fast validate` on small shapes (resnet18, 32..64 px, no compile),
their JSON, their errors on bad input, and validate failing on wrong numerics."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision

import resnet_fast
from resnet_fast.tools import bench, cli, timing
from resnet_fast.tools import validate as validate_mod

REPO = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()
SMALL_BENCH = [
    "bench",
    "--arch",
    "resnet18",
    "--image-size",
    "32",
    "--iters",
    "2",
    "--warmup",
    "1",
    "--no-progress",
]
SMALL_VALIDATE = ["validate", "--arch", "resnet18", "--image-size", "64", "--batch-size", "4"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --- bench ----------------------------------------------------------------------------------------


def test_bench_json_and_table(tmp_path, capsys):
    path = tmp_path / "r.json"
    rc, out, _ = run_cli(capsys, *SMALL_BENCH, "--batch-size", "2", "3", "--no-compile", "--json", str(path))
    assert rc == 0
    doc = json.loads(path.read_text())
    names = ["resnet_fast", "torchvision", "torchvision-cl"]
    st = doc["settings"]
    assert doc["schema"] == "resnet_fast.bench/1"
    assert (st["arch"], st["mode"], st["dtype"], st["device"]) == ("resnet18", "infer", "float32", "cpu")
    assert st["batch_sizes"] == [2, 3] and st["iters"] == 2 and list(st["contenders"]) == names
    assert st["backend"] == resnet_fast.ops.backend_for(torch.device("cpu"))
    assert doc["machine"]["cpu_cores"] == os.cpu_count() and doc["machine"]["torch"] == torch.__version__
    assert doc["machine"]["cpu"] and "backends" in doc["machine"]
    assert [(r["batch_size"], r["contender"]) for r in doc["results"]] == [
        (b, n) for b in (2, 3) for n in names
    ]
    for r in doc["results"]:
        assert len(r["times_ms"]) == 2 and all(t > 0 for t in r["times_ms"])
        assert r["median_ms"] == pytest.approx(statistics.median(r["times_ms"]))
        assert r["img_per_s"] == pytest.approx(r["batch_size"] * 1e3 / r["median_ms"])
        assert r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
        assert r["warmup_s"] > 0 and isinstance(r["peak_memory_bytes"], int) and r["peak_memory_bytes"] > 0
        same_batch = {b["contender"]: b for b in doc["results"] if b["batch_size"] == r["batch_size"]}
        assert set(r["ratios"]) == {"torchvision", "torchvision-cl"}
        for base, ratio in r["ratios"].items():
            assert ratio == pytest.approx(r["img_per_s"] / same_batch[base]["img_per_s"])
    assert "batch 2" in out and "batch 3" in out and "x torchvision-cl" in out
    for name in names:
        assert f"\n{name} " in out
    assert f"wrote {path}" in out


def test_bench_train_step_updates_the_model():
    """--mode train times forward + loss + backward + SGD step: the loss on a fixed batch changes."""
    setup = bench.Setup("resnet18", torch.device("cpu"), torch.float32, "train", 2, 32)
    base = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    for name in ("resnet_fast", "torchvision"):
        step = bench.build(name, base, x, y, setup)
        first, second = step().item(), step().item()
        assert first != second, name


def test_bench_train_mode_cli(tmp_path, capsys):
    path = tmp_path / "t.json"
    argv = [*SMALL_BENCH, "--batch-size", "2", "--mode", "train", "--contenders", "resnet_fast,torchvision"]
    rc, out, _ = run_cli(capsys, *argv, "--json", str(path))
    assert rc == 0
    doc = json.loads(path.read_text())
    assert doc["settings"]["mode"] == "train"
    assert [r["contender"] for r in doc["results"]] == ["resnet_fast", "torchvision"]
    assert all(r["peak_memory_bytes"] > 0 for r in doc["results"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--arch", "resnet19"], "unknown arch 'resnet19'"),
        (["--dtype", "float16"], "float16 is not supported on CPU"),
        (["--dtype", "half"], "unknown dtype 'half'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--device", "meta"], "unsupported device 'meta'"),
        (["--contenders", "resnet_fast,tensorflow"], "unknown contender 'tensorflow'"),
        (["--backend", "triton"], "--backend triton"),
        (["--backend", "fastest"], "unknown backend 'fastest'"),
        (["--iters", "0"], "--iters must be at least 1"),
        (["--batch-size", "0"], "--batch-size values must be positive"),
        (["--contenders", "onnxruntime", "--mode", "train"], "onnxruntime"),
    ],
)
def test_bench_bad_arguments(capsys, extra, message):
    rc, out, err = run_cli(capsys, *SMALL_BENCH, "--no-compile", *extra)
    assert rc == 2
    assert message in err and err.startswith("resnet-fast bench: error:")
    assert out == ""


@pytest.mark.skipif(HAS_CUDA, reason="checks the message given when there is no GPU")
@pytest.mark.parametrize("command", [SMALL_BENCH, SMALL_VALIDATE])
def test_cuda_without_gpu(capsys, command):
    rc, _, err = run_cli(capsys, *command, "--device", "cuda")
    assert rc == 2 and "no CUDA GPU is available" in err


def test_bench_plot_needs_matplotlib(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )
    rc, out, err = run_cli(capsys, *SMALL_BENCH, "--plot", str(tmp_path / "p.png"))
    assert rc == 2 and "pip install 'resnet_fast[plot]'" in err and out == ""


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib (the [plot] extra) absent"
)
def test_bench_plot(capsys, tmp_path):
    path = tmp_path / "p.png"
    rc, _, _ = run_cli(
        capsys, *SMALL_BENCH, "--batch-size", "1", "2", "--contenders", "torchvision", "--plot", str(path)
    )
    assert rc == 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_peers_left_out_with_a_note(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench, "_missing_modules", lambda peer: [peer])
    path = tmp_path / "r.json"
    rc, out, _ = run_cli(
        capsys, *SMALL_BENCH, "--batch-size", "1", "--no-compile", "--peers", "--json", str(path)
    )
    assert rc == 0
    notes = json.loads(path.read_text())["notes"]
    assert notes == [f"{p} left out: not installed (pip install {p})" for p in bench.PEERS]
    assert "note: onnxruntime left out" in out


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnxruntime", "onnx", "openvino")),
    reason="the optional peers onnxruntime, onnx and openvino are not installed",
)
def test_bench_peers(capsys, tmp_path):
    path = tmp_path / "r.json"
    argv = [*SMALL_BENCH, "--batch-size", "1", "--contenders", "torchvision,onnxruntime,openvino"]
    rc, _, _ = run_cli(capsys, *argv, "--json", str(path))
    assert rc == 0
    doc = json.loads(path.read_text())
    rows = {r["contender"]: r for r in doc["results"]}
    assert rows["onnxruntime"]["peak_memory_bytes"] is None and rows["openvino"]["img_per_s"] > 0
    assert (
        "after 0.2 s idle, each timed call after an untimed one of the same contender"
        in (doc["settings"]["timing"])
    )


def test_interleaved_timing_after_itself():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    times = timing.interleaved(fns, 2, torch.device("cpu"), after_itself=True)
    assert calls == ["a", "a", "b", "b", "b", "b", "a", "a"]  # order rotated, each call twice in a row
    assert [len(t) for t in times.values()] == [2, 2]
    calls.clear()
    timing.interleaved(fns, 2, torch.device("cpu"))
    assert calls == ["a", "b", "b", "a"]


def test_interleaved_timing_settles_before_each_turn(monkeypatch):
    calls = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: calls.append(("idle", s)))
    fns = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    timing.interleaved(fns, 1, torch.device("cpu"), after_itself=True, settle=0.2)
    assert calls == [("idle", 0.2), "a", "a", ("idle", 0.2), "b", "b"]


# --- validate -------------------------------------------------------------------------------------


def test_validate_passes_fp32_eval_per_layer(capsys, tmp_path):
    path = tmp_path / "v.json"
    rc, out, _ = run_cli(capsys, *SMALL_VALIDATE, "--per-layer", "--json", str(path))
    assert rc == 0, out
    report = json.loads(path.read_text())
    assert report["ok"] and report["first_diverging_block"] is None
    assert report["errors"]["logits"] <= validate_mod.FP32_TOL["eval"]["logits"]
    assert report["errors"]["top1_agreement"] == 1.0
    assert list(report["errors"]["blocks"]) == ["maxpool"] + [
        f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)
    ]
    assert out.strip().splitlines()[-1].startswith("PASS: resnet_fast resnet18 eval float32 cpu")


def test_validate_bf16_train_uses_the_relative_rule(capsys, tmp_path):
    path = tmp_path / "v.json"
    rc, out, _ = run_cli(
        capsys, *SMALL_VALIDATE, "--dtype", "bfloat16", "--mode", "train", "--json", str(path)
    )
    report = json.loads(path.read_text())
    assert rc == 0, out
    tv = report["torchvision_errors"]
    assert tv["logits"] > 0 and "2x torchvision's own bfloat16 error" in report["rule"]
    for key in ("logits", "grads", "bn_stats"):
        assert report["bounds"][key] == pytest.approx(max(2 * tv[key], torch.finfo(torch.bfloat16).eps))
        assert report["errors"][key] <= report["bounds"][key]


def _perturbing(monkeypatch, target: str, delta: float) -> None:
    """Make validate's resnet_fast model wrong in one place (as a broken kernel would be)."""
    original = resnet_fast.from_torchvision

    def broken(model):
        ours = original(model)
        with torch.no_grad():
            ours.get_parameter(target).add_(delta)
        return ours

    monkeypatch.setattr(resnet_fast, "from_torchvision", broken)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_validate_fails_on_wrong_numerics(monkeypatch, capsys, tmp_path, mode):
    # A BN shift: train-mode BN would normalize a scaled conv weight away.
    _perturbing(monkeypatch, "layer3.0.bn2.bias", 0.05)
    path = tmp_path / "v.json"
    rc, out, _ = run_cli(capsys, *SMALL_VALIDATE, "--mode", mode, "--per-layer", "--json", str(path))
    report = json.loads(path.read_text())
    assert rc == 1
    assert report["first_diverging_block"] == "layer3.0"
    assert "logits" in report["failed"]
    for block in ("maxpool", "layer1.0", "layer2.1"):  # before the broken layer: within tolerance
        assert report["errors"]["blocks"][block] <= report["block_bounds"][block]
    assert "<-- first past tolerance" in out and out.strip().splitlines()[-1].startswith("FAIL:")


def test_validate_fails_on_wrong_bf16_numerics(monkeypatch, capsys):
    _perturbing(monkeypatch, "layer4.1.bn2.bias", 0.5)
    rc, out, _ = run_cli(capsys, *SMALL_VALIDATE, "--dtype", "bfloat16")
    assert rc == 1 and out.strip().splitlines()[-1].startswith("FAIL:")


def test_validate_weights_file(capsys, tmp_path):
    model = torchvision.models.resnet18(num_classes=10)
    validate_mod.randomize_bn(model, seed=3)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    loaded = validate_mod.torchvision_model("resnet18", str(path), seed=0)
    assert loaded.fc.out_features == 10
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
    rc, out, _ = run_cli(capsys, *SMALL_VALIDATE, "--weights", str(path))
    assert rc == 0 and f"weights: {path}" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--arch", "vgg16"], "unknown arch 'vgg16'"),
        (["--weights", "IMAGENET2K_V9"], "neither a file nor a ResNet18_Weights name"),
        (["--dtype", "float16"], "float16 is not supported on CPU"),
        (["--backend", "triton"], "--backend triton"),
    ],
)
def test_validate_bad_arguments(capsys, extra, message):
    rc, out, err = run_cli(capsys, *SMALL_VALIDATE, *extra)
    assert rc == 2 and message in err and err.startswith("resnet-fast validate: error:") and out == ""


def test_validate_weights_file_of_another_arch(capsys, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    rc, _, err = run_cli(capsys, *SMALL_VALIDATE, "--weights", str(path))
    assert rc == 2 and "does not fit resnet18" in err


# --- the GPU check script -------------------------------------------------------------------------


def test_gpu_check_script_parses():
    script = REPO / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK)


def test_cuda_graph_contender_is_refused_off_gpu():
    from resnet_fast.tools import bench
    from resnet_fast.tools.timing import UsageError

    with pytest.raises(UsageError, match="resnet_fast-cudagraph runs on CUDA"):
        bench.check_contenders(["resnet_fast-cudagraph"], torch.device("cpu"), torch.float32, "infer")
    assert "resnet_fast-cudagraph" not in bench.default_contenders(torch.device("cpu"))
    assert bench.build_parser_args(batch_size=[1, 2]).batch_size == [1, 2]
