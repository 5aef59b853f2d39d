"""`resnet-fast export`: a resnet_fast model as an ONNX file (onnxruntime, TensorRT) or an AOTInductor
package (.pt2), checked against torchvision on the same weights before it is handed over.

What each route holds:
- ONNX (torch.onnx.export, dynamo=True here; the TorchScript exporter works too): while an ONNX
  export traces the model, resnet_fast runs torchvision's op sequence (nn.fused._exporting), so the
  file holds the standard ops torchvision's export holds: Conv (BN folded into it by the exporter's
  optimizer), Add, Relu, MaxPool, GlobalAveragePool, Flatten, Gemm.
- torch.export.export of an eval model under no_grad / inference_mode: one resnet_fast::conv_bias_act
  per convolution, fed by the BN fold traced as tensor math on the conv and BN parameters and buffers
  (rsqrt, mul, sub, add): the program keeps the model's state_dict, not a frozen copy.
- pt2 (AOTInductor): that program with resnet_fast's ops decomposed into aten ops
  (resnet_fast.ops.decompositions()), so the package runs without Python and without resnet_fast;
  Inductor fuses the convolution epilogues itself.

The check: the artifact's output against torchvision's on the same weights and input, as a
scale-relative error max|ours - ref| / max|ref| (validate.rel_err), bound TOL.
"""

from __future__ import annotations

import argparse
import collections
import copy
import importlib.util
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from . import timing, validate
from .timing import UsageError

# float32, scale-relative. Exporting changes only the order of fp32 roundings (BN folded into the
# conv weights, another runtime's conv algorithms): measured <= 1e-6 on CPU (README "Export"). A
# wrong fold, a missed residual or ReLU costs 1e-2 or more.
TOL = 1e-4
FORMATS = ("onnx", "pt2")


def _example(x: Tensor, dynamic_batch: bool) -> tuple[Tensor, dict | None]:
    """The tracing input and torch.export's dynamic_shapes. torch.export specializes dimensions of
    size 1, so a dynamic batch is traced with a batch of 2."""
    if not dynamic_batch:
        return x, None
    if x.shape[0] < 2:
        x = x.expand(2, *x.shape[1:]).contiguous()
    return x, {"x": {0: torch.export.Dim("batch")}}


def export_onnx(
    model: nn.Module, x: Tensor, path: str | Path, dynamic_batch: bool = False, dynamo: bool = True
) -> None:
    """Write `model` (put in eval mode) as a self-contained ONNX file, input "input", output "logits"."""
    model.eval()
    names = {"input_names": ["input"], "output_names": ["logits"]}
    if dynamo:
        x, shapes = _example(x, dynamic_batch)
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=True,
            dynamic_shapes=shapes,
            external_data=False,
            verbose=False,
            **names,
        )
    else:
        axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
        torch.onnx.export(model, (x,), str(path), dynamo=False, dynamic_axes=axes, opset_version=17, **names)


def run_onnx(path: str | Path, x: Tensor) -> Tensor:
    """The ONNX file's output for x on onnxruntime's CPU provider."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.detach().cpu().numpy()}
    return torch.from_numpy(session.run(None, feed)[0])


def onnx_summary(path: str | Path) -> str:
    """'opset 20, 49 nodes: Conv x20, Relu x17, Add x8, ...'."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    counts = collections.Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in proto.graph.node
    )
    ops = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in counts.most_common())
    return f"opset {opset}, {sum(counts.values())} nodes: {ops}"


def export_program(model: nn.Module, x: Tensor, dynamic_batch: bool = False) -> torch.export.ExportedProgram:
    """torch.export of `model` in eval mode without gradients: the fused ops with the folded weights."""
    x, shapes = _example(x, dynamic_batch)
    with torch.no_grad():
        return torch.export.export(model.eval(), (x,), dynamic_shapes=shapes)


def export_pt2(model: nn.Module, x: Tensor, path: str | Path, dynamic_batch: bool = False) -> None:
    """Compile `model` with AOTInductor into a package that needs neither Python nor resnet_fast."""
    from ..ops import decompositions

    program = export_program(model, x, dynamic_batch).run_decompositions(decompositions())
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def run_pt2(path: str | Path, x: Tensor) -> Tensor:
    """The AOTInductor package's output for x."""
    with torch.no_grad():
        return torch._inductor.aoti_load_package(str(path))(x)


def export(args: argparse.Namespace) -> dict:
    """Write the artifact and check it; returns the report."""
    import resnet_fast

    timing.check_arch(args.arch)
    device, _ = timing.check_device_dtype(args.device, "float32")
    if args.format == "onnx" and device.type != "cpu":
        raise UsageError("--format onnx exports and checks on the CPU; drop --device")
    if args.batch_size < 1 or args.image_size < 16:
        raise UsageError("--batch-size must be positive and --image-size at least 16")
    output = Path(args.output)
    if not output.parent.is_dir():
        raise UsageError(f"--output {args.output}: no directory {output.parent}")
    if args.format == "pt2" and output.suffix != ".pt2":
        raise UsageError(f"--output {args.output}: an AOTInductor package's name must end in .pt2")
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if args.format == "onnx" and missing:
        raise UsageError(f"--format onnx needs {', '.join(missing)}: pip install 'resnet_fast[export]'")

    tv = validate.torchvision_model(args.arch, args.weights, seed=0).eval().to(device)
    model = resnet_fast.from_torchvision(copy.deepcopy(tv)).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(device)
    # A dynamic batch is also checked at another size than the one traced.
    batches = [x, torch.cat([x, x])] if args.dynamic_batch else [x]

    with validate.exact_fp32():  # TF32 off on CUDA: the reference and the artifact in exact fp32
        if args.format == "onnx":
            export_onnx(model, x, output, args.dynamic_batch)
            outputs = [run_onnx(output, b) for b in batches]
            what = f"ONNX {onnx_summary(output)}"
            runner = "onnxruntime (CPU)"
        else:
            export_pt2(model, x, output, args.dynamic_batch)
            outputs = [run_pt2(output, b) for b in batches]
            what = f"AOTInductor package for {device.type}"
            runner = "the loaded package"
        with torch.no_grad():
            error = max(
                validate.rel_err(out.cpu(), tv(b).cpu()) for out, b in zip(outputs, batches, strict=True)
            )
    return {
        "ok": error <= TOL,
        "arch": args.arch,
        "output": str(output),
        "bytes": output.stat().st_size,
        "what": what,
        "runner": runner,
        "batches": [b.shape[0] for b in batches],
        "error": error,
    }


def format_report(r: dict) -> str:
    verdict = "PASS" if r["ok"] else "FAIL"
    batches = " and ".join(map(str, r["batches"]))
    return (
        f"wrote {r['output']} ({r['bytes'] / 2**20:.1f} MiB, {r['bytes']} bytes): {r['what']}\n"
        f"{verdict}: {r['runner']} vs torchvision ({r['arch']}, batch {batches}): "
        f"relative error {r['error']:.3g} (bound {TOL:g})"
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write an ONNX file or an AOTInductor package, checked against torchvision",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--arch", required=True, help="a resnet_fast / torchvision builder name")
    p.add_argument(
        "--weights",
        help="a torchvision weight name (IMAGENET1K_V2) or a state_dict file; default: random init "
        "with randomized BN statistics",
    )
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx or pt2 (AOTInductor package)")
    p.add_argument("--output", required=True, help="the file to write")
    p.add_argument("--batch-size", type=int, default=1, help="batch of the example input (default 1)")
    p.add_argument("--dynamic-batch", action="store_true", help="a batch axis of any size")
    p.add_argument("--image-size", type=int, default=224, help="input height and width (default 224)")
    p.add_argument("--device", default="cpu", help="pt2: cpu or cuda[:N] (default cpu); onnx: cpu")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        report = export(args)
    except UsageError as error:
        print(f"resnet-fast export: error: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report["ok"] else 1
