"""Export of resnet_fast models: ONNX with both exporters (run by onnxruntime), torch.export (fused ops,
folded weights), AOTInductor, torch.jit, and `resnet-fast export`; against torchvision on the same
weights, at small input sizes to keep CI fast.

Bound: TOL (1e-4, scale-relative, float32) as in resnet_fast.tools.export: exporting only reorders fp32
roundings (BN folded into the conv, another runtime's conv algorithms), which costs <= 1e-6 here; a
wrong fold, a missed residual or ReLU costs 1e-2 or more.
"""

from __future__ import annotations

import collections
import copy
import subprocess
import sys

import pytest
import torch
import torchvision
from _utils import randomize_bn

import resnet_fast
from resnet_fast.tools import cli
from resnet_fast.tools import export as export_mod
from resnet_fast.tools.export import TOL
from resnet_fast.tools.validate import rel_err

onnx = pytest.importorskip("onnx", reason="onnx is in the test extra: pip install -e '.[test]'")
pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extra: pip install -e '.[test]'")
pytest.importorskip("onnxscript", reason="onnxscript is in the test extra: pip install -e '.[test]'")

# The standard ops a ResNet's ONNX graph may hold (issue 13), BN folded into Conv. The pooling is
# GlobalAveragePool from the TorchScript exporter, ReduceMean from the dynamo one.
ONNX_OPS = {"Conv", "Relu", "Add", "MaxPool", "GlobalAveragePool", "ReduceMean", "Flatten", "Reshape", "Gemm"}
RESNET_FAST_OPS = ("conv_bias_act", "scale_shift_act", "add_relu", "bn_act_train")


def pair(arch: str, seed: int = 1) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(torchvision, resnet_fast) eval models with the same random weights and randomized BN."""
    torch.manual_seed(seed)
    tv = randomize_bn(torchvision.models.get_model(arch), seed).eval()
    return tv, resnet_fast.from_torchvision(copy.deepcopy(tv)).eval()


def n_convs(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def image(batch: int = 1, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def call_targets(program: torch.export.ExportedProgram) -> collections.Counter:
    return collections.Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")


def fused_targets(targets: collections.Counter) -> dict[str, int]:
    return {t: n for t, n in targets.items() if t.startswith("resnet_fast.")}


# --- ONNX -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,dynamo",
    [
        ("resnet18", True),
        ("resnet50", True),
        ("resnext50_32x4d", True),
        ("resnet18", False),
        ("resnext50_32x4d", False),
    ],
)
def test_onnx_export_standard_ops_and_numbers(tmp_path, arch, dynamo):
    """The user's plain call (no no_grad, nothing extra) gives standard ops only, BN folded into the
    convs, and onnxruntime matches torchvision."""
    tv, model = pair(arch)
    x, path = image(), tmp_path / "m.onnx"
    export_mod.export_onnx(model, x, path, dynamo=dynamo)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert set(ops) <= ONNX_OPS, ops
    assert ops["Conv"] == n_convs(tv)
    with torch.no_grad():
        assert rel_err(export_mod.run_onnx(path, x), tv(x)) <= TOL


@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_dynamic_batch(tmp_path, dynamo):
    tv, model = pair("resnet18")
    path = tmp_path / "m.onnx"
    export_mod.export_onnx(model, image(1), path, dynamic_batch=True, dynamo=dynamo)
    batch_dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    for batch in (1, 3):
        x = image(batch)
        with torch.no_grad():
            assert rel_err(export_mod.run_onnx(path, x), tv(x)) <= TOL


def test_onnx_export_leaves_the_model_fused_afterwards(tmp_path):
    """The export-time route lasts only while exporting: the next forward runs the fused ops again."""
    _, model = pair("resnet18")
    export_mod.export_onnx(model, image(), tmp_path / "m.onnx")
    with torch.no_grad():
        program = torch.export.export(model, (image(),))
    assert fused_targets(call_targets(program))


# --- torch.export / AOTInductor ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_torch_export_has_fused_ops_with_folded_weights(mode):
    """Under no_grad / inference_mode every conv is one resnet_fast::conv_bias_act (BN folded into its
    weight and bias in the graph, residual and ReLU in its epilogue); no aten conv or BN is left."""
    tv, model = pair("resnet18")
    x = image()
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        program = torch.export.export(model, (x,))
    targets = call_targets(program)
    assert fused_targets(targets) == {"resnet_fast.conv_bias_act.default": n_convs(tv)}
    assert not [t for t in targets if "conv" in t and t.startswith("aten.") or "batch_norm" in t]
    assert "aten.rsqrt.default" in targets  # the BN fold
    with torch.no_grad():
        assert rel_err(program.module()(x), tv(x)) <= TOL


def test_torch_export_with_gradients_is_unfolded():
    """With gradients enabled the program stays differentiable: aten conv + BN, add_relu per residual."""
    tv, model = pair("resnet18")
    x = image()
    targets = call_targets(torch.export.export(model, (x,)))
    assert fused_targets(targets) == {"resnet_fast.add_relu.default": 8}
    assert targets["aten.conv2d.default"] == targets["aten.batch_norm.default"] == n_convs(tv)


@pytest.mark.parametrize("grad", [False, True])
def test_decompositions_leave_aten_ops_only(grad):
    """ops.decompositions() turns an exported program into plain aten (what AOTInductor compiles)."""
    tv, model = pair("resnet18")
    x = image()
    with torch.set_grad_enabled(grad):
        program = torch.export.export(model, (x,))
    program = program.run_decompositions(resnet_fast.ops.decompositions())
    assert not fused_targets(call_targets(program))
    with torch.no_grad():
        assert rel_err(program.module()(x), tv(x)) <= TOL


# --- torch.jit --------------------------------------------------------------------------------------


def test_jit_trace_works():
    tv, model = pair("resnet18")
    x = image()
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        assert rel_err(traced(image(2)), tv(image(2))) <= TOL


def test_jit_script_names_the_supported_ways():
    _, model = pair("resnet18")
    with pytest.raises(RuntimeError, match=r"torch.jit.script does not support") as info:
        torch.jit.script(model)
    for way in ("torch.export.export", "torch.onnx.export", "torch.jit.trace", "to_torchvision()"):
        assert way in str(info.value)
    torch.jit.script(model.to_torchvision())  # the way out it names works


# --- resnet-fast export -----------------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_onnx(tmp_path, capsys):
    path = tmp_path / "r18.onnx"
    rc, out, _ = run_cli(
        capsys, "export", "--arch", "resnet18", "--format", "onnx", "--output", str(path),
        "--image-size", "64", "--dynamic-batch",
    )  # fmt: skip
    assert rc == 0, out
    assert path.is_file() and f"{path.stat().st_size} bytes" in out
    assert "PASS: onnxruntime (CPU) vs torchvision (resnet18, batch 1 and 2): relative error" in out
    assert "Conv x20" in out


def test_cli_pt2_aotinductor(tmp_path, capsys):
    """AOTInductor compiles the exported program (resnet_fast's ops decomposed) and the package runs."""
    path = tmp_path / "r18.pt2"
    rc, out, _ = run_cli(
        capsys, "export", "--arch", "resnet18", "--format", "pt2", "--output", str(path), "--image-size", "32",
        "--dynamic-batch",
    )  # fmt: skip
    assert rc == 0, out
    assert path.is_file() and "PASS: the loaded package vs torchvision (resnet18, batch 1 and 2)" in out
    # The package needs torch only: a fresh process that never imports resnet_fast runs it.
    script = (
        "import sys, torch; f = torch._inductor.aoti_load_package(sys.argv[1]); "
        "print(tuple(f(torch.randn(2, 3, 32, 32)).shape), 'resnet_fast' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, cwd=path.parent
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "(2, 1000) False"


def test_cli_fails_past_tolerance(tmp_path, capsys, monkeypatch):
    """A wrong artifact (its output shifted) fails the check: exit status 1."""
    run = export_mod.run_onnx
    monkeypatch.setattr(export_mod, "run_onnx", lambda path, x: run(path, x) + 0.05)
    rc, out, _ = run_cli(
        capsys, "export", "--arch", "resnet18", "--format", "onnx", "--output", str(tmp_path / "m.onnx"),
        "--image-size", "32",
    )  # fmt: skip
    assert rc == 1 and "FAIL: onnxruntime (CPU) vs torchvision" in out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--arch", "resnet7"], "unknown arch 'resnet7'"),
        (["--arch", "resnet18", "--batch-size", "0"], "--batch-size must be positive"),
        (["--arch", "resnet18", "--image-size", "8"], "--image-size at least 16"),
        (["--arch", "resnet18", "--weights", "NOPE"], "neither a file nor a ResNet18_Weights name"),
        (["--arch", "resnet18", "--format", "pt2"], "name must end in .pt2"),
    ],
)
def test_cli_bad_arguments_exit_2(tmp_path, capsys, extra, message):
    rc, _, err = run_cli(capsys, "export", "--format", "onnx", "--output", str(tmp_path / "m.onnx"), *extra)
    assert rc == 2 and message in err


def test_cli_bad_format_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["export", "--arch", "resnet18", "--format", "tflite", "--output", str(tmp_path / "m")])
    assert info.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
