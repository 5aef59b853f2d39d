"""`resnet-fast validate`: resnet_fast's numerics against torchvision's for one arch / dtype / device /
backend / mode, with a one-line verdict and a non-zero exit status past tolerance.

Errors are scale-relative: max|ours - ref| / max|ref| over a tensor (an element-wise relative error
explodes on logits near zero and says nothing); the worst BN running-statistics tensor counts.
Gradients (--mode train) count as one vector: ||g_ours - g_ref|| / ||g_ref|| over all parameters
(per tensor, parameters whose gradient is tiny would dominate with pure rounding noise).

How the reference and the tolerance are chosen:
- float32 (CPU, or CUDA with TF32 off): the reference is torchvision in the layout resnet_fast runs
  (channels_last when a fused backend is active, as tests/_utils.like_fused does), so both sides use
  the same convolution algorithms and only fusion reorders arithmetic. FP32_TOL below; in --mode
  train the bound is also at least twice the difference between torchvision in its two layouts
  (NCHW and channels_last): batch statistics make training numerics far noisier than inference.
- float16 / bfloat16, and float32 with TF32 convolutions on (PyTorch's default on CUDA): the reference
  is torchvision in exact float32 (TF32 off). resnet_fast passes when its error is no worse than twice
  torchvision's own error in the same dtype and flags against that reference: low precision must not
  cost more than plain PyTorch pays for it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from . import timing
from .timing import UsageError

# float32 tolerances (scale-relative) per mode. What differs between resnet_fast and torchvision in
# the same layout is fusion (BN folded into conv weights, one epilogue, Welford batch statistics),
# which reorders fp32 roundings the way a different conv algorithm does. Measured for such a change
# (torchvision NCHW vs channels_last, randomized BN, batch 8, 224x224, CPU): eval logits <= 1e-6 and
# blocks <= 4e-6; train logits 6e-5, blocks 3e-4, running stats 4e-5, gradients 4e-2 (norm-wise;
# batch statistics amplify rounding). The bounds leave >= 5x headroom over that, while real bugs (a
# wrong residual, stale BN statistics, a missed ReLU or ReLU mask, a bad tile edge) cost 1e-2 on the
# forward and O(1) on the gradients.
FP32_TOL = {
    "eval": {"logits": 1e-4, "blocks": 1e-4},
    "train": {"logits": 1e-3, "blocks": 2e-3, "bn_stats": 1e-3, "grads": 0.2},
}
# The lower-precision rule: error <= LOWP_FACTOR * torchvision's own error (see the module docstring),
# never below one rounding of the dtype so that a zero torchvision error does not demand exactness.
LOWP_FACTOR = 2.0


def rel_err(ours: Tensor, ref: Tensor) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def max_abs(ours: Tensor, ref: Tensor) -> float:
    return (ours.detach().double() - ref.detach().double()).abs().max().item()


@dataclass
class Run:
    """What one model produced on the batch."""

    logits: Tensor
    blocks: dict[str, Tensor] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)
    bn_stats: dict[str, Tensor] = field(default_factory=dict)


def block_names(model: nn.Module) -> list[str]:
    """The stem's output (maxpool) then every residual block, in order: layer1.0, layer1.1, ..."""
    names = ["maxpool"]
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        names += [f"{layer}.{i}" for i in range(len(getattr(model, layer)))]
    return names


def run_model(model: nn.Module, x: Tensor, y: Tensor, mode: str, per_layer: bool) -> Run:
    blocks: dict[str, Tensor] = {}
    handles = []
    if per_layer:
        for name in block_names(model):

            def hook(_module, _inputs, output, name=name):
                blocks[name] = output.detach().float()

            handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        if mode == "eval":
            with torch.no_grad():
                return Run(model(x).float(), blocks)
        model.zero_grad(set_to_none=True)
        logits = model(x)
        nn.functional.cross_entropy(logits.float(), y).backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        stats = {
            n: b.float() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))
        }
        return Run(logits.detach().float(), blocks, grads, stats)
    finally:
        for h in handles:
            h.remove()


def compare(ours: Run, ref: Run) -> dict:
    """Errors of `ours` against `ref`, per quantity (block errors keyed by block)."""
    out = {
        "logits_max_abs": max_abs(ours.logits, ref.logits),
        "logits": rel_err(ours.logits, ref.logits),
        "top1_agreement": (ours.logits.argmax(1) == ref.logits.argmax(1)).float().mean().item(),
        "blocks": {n: rel_err(ours.blocks[n], ref.blocks[n]) for n in ref.blocks},
    }
    if ref.grads:
        if ours.grads.keys() != ref.grads.keys():
            raise AssertionError(
                f"gradients differ in which parameters get one: {ours.grads.keys() ^ ref.grads.keys()}"
            )
        diff = sum(((ours.grads[n].double() - ref.grads[n].double()) ** 2).sum() for n in ref.grads)
        norm = sum((ref.grads[n].double() ** 2).sum() for n in ref.grads)
        out["grads"] = (diff / norm).sqrt().item() if norm > 0 else diff.sqrt().item()
        out["bn_stats"] = max(rel_err(ours.bn_stats[n], ref.bn_stats[n]) for n in ref.bn_stats)
    return out


def tf32_active(device: torch.device) -> bool:
    return device.type == "cuda" and bool(
        torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    )


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for convolutions and matmuls (the exact float32 reference)."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Random BN affine parameters and running statistics, so eval mode is not an identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return model


def torchvision_model(arch: str, weights: str | None, seed: int) -> nn.Module:
    """torchvision's `arch` with --weights (a torchvision weight name or a state_dict file), else random
    init with randomized BN statistics."""
    import torchvision

    from ..models.resnet import _load_weights

    torch.manual_seed(seed)
    if weights is None:
        return randomize_bn(torchvision.models.get_model(arch), seed)
    path = Path(weights)
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UsageError(f"--weights {weights}: not a loadable state_dict file ({error})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or "fc.weight" not in state:
            raise UsageError(f"--weights {weights}: expected a ResNet state_dict (with fc.weight)")
        model = torchvision.models.get_model(arch, num_classes=state["fc.weight"].shape[0])
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise UsageError(f"--weights {weights} does not fit {arch}: {error}") from None
        return model
    enum = torchvision.models.get_model_weights(arch)
    name = weights.split(".")[-1]
    if name not in enum.__members__:
        raise UsageError(
            f"--weights {weights}: neither a file nor a {enum.__name__} name ({', '.join(enum.__members__)})"
        )
    model = torchvision.models.get_model(arch, num_classes=len(enum[name].meta["categories"]))
    try:
        _load_weights(model, enum[name], progress=False)
    except RuntimeError as error:
        raise UsageError(str(error)) from None
    return model


def _in_layout(model: nn.Module, x: Tensor) -> tuple[nn.Module, Tensor]:
    """torchvision in the layout resnet_fast runs (see tests/_utils.like_fused)."""
    from ..ops import backend_for

    if backend_for(x.device) == "torch":
        return model, x
    return model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)


def _other_layout(model: nn.Module, x: Tensor, x_ref: Tensor) -> tuple[nn.Module, Tensor]:
    """torchvision in the layout the reference does not use (x is NCHW)."""
    if x_ref.is_contiguous():
        return model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return model, x


def validate(args: argparse.Namespace) -> dict:
    """Compare resnet_fast with torchvision; returns the report (also --json)."""
    import resnet_fast

    timing.check_arch(args.arch)
    device, dtype = timing.check_device_dtype(args.device, args.dtype)
    if args.batch_size < 1 or args.image_size < 16:
        raise UsageError("--batch-size must be positive and --image-size at least 16")
    backend = timing.set_backend_for(args.backend, device)
    tv = torchvision_model(args.arch, args.weights, args.seed).to(device).train(args.mode == "train")
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(device)
    y = torch.randint(0, tv.fc.out_features, (args.batch_size,), generator=gen).to(device)
    per_layer = args.per_layer

    ours_model = resnet_fast.from_torchvision(copy.deepcopy(tv)).to(dtype=dtype)
    ours = run_model(ours_model, x.to(dtype), y, args.mode, per_layer)
    ref_model, x_ref = _in_layout(copy.deepcopy(tv), x)
    with exact_fp32():
        ref = run_model(ref_model, x_ref, y, args.mode, per_layer)
    errors = compare(ours, ref)

    if dtype != torch.float32 or tf32_active(device):
        # Torchvision's own error in this dtype and these TF32 flags, same layout as resnet_fast.
        alt_model, x_alt = _in_layout(copy.deepcopy(tv).to(dtype=dtype), x.to(dtype))
        floor = torch.finfo(dtype).eps if dtype != torch.float32 else 2.0**-10  # TF32: 10-bit mantissa
        fixed: dict[str, float] = {}
        alt_name = f"torchvision's own {args.dtype} error"
        rule = f"error <= {LOWP_FACTOR:g}x torchvision's own {args.dtype} error vs an exact float32 reference"
    elif args.mode == "train":
        # Torchvision in the other layout: how far two correct fp32 implementations drift apart.
        alt_model, x_alt = _other_layout(copy.deepcopy(tv), x, x_ref)
        floor, fixed = 0.0, FP32_TOL["train"]
        alt_name = "torchvision's drift between layouts"
        rule = (
            f"float32 vs torchvision in the same layout; bound: FP32_TOL or {LOWP_FACTOR:g}x the drift "
            "between torchvision's NCHW and channels_last runs, the larger"
        )
    else:
        alt_model, alt_name = None, ""
        floor, fixed = 0.0, FP32_TOL["eval"]
        rule = "float32 vs torchvision in the same layout (FP32_TOL)"
    alt_errors = None
    if alt_model is not None:
        with exact_fp32() if dtype == torch.float32 and not tf32_active(device) else contextlib.nullcontext():
            alt_errors = compare(run_model(alt_model, x_alt, y, args.mode, per_layer), ref)

    def bound(key: str, block: str | None = None) -> float:
        alt = 0.0 if alt_errors is None else (alt_errors["blocks"][block] if block else alt_errors[key])
        return max(fixed.get(key, 0.0), LOWP_FACTOR * alt, floor)

    bounds = {k: bound(k) for k in ("logits", "grads", "bn_stats") if k in errors}
    block_bounds = {n: bound("blocks", n) for n in errors["blocks"]}

    failed = [k for k, bound in bounds.items() if not errors[k] <= bound]  # `not <=` also catches NaN
    first_block = next((n for n, e in errors["blocks"].items() if not e <= block_bounds[n]), None)
    ok = not failed and first_block is None
    return {
        "ok": ok,
        "arch": args.arch,
        "mode": args.mode,
        "dtype": args.dtype,
        "device": str(device),
        "backend": backend,
        "fused_ops": timing.fused_ops(),
        "weights": args.weights or "random init, randomized BN statistics",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "rule": rule,
        "errors": errors,
        "bounds": bounds,
        "block_bounds": block_bounds,
        "torchvision_errors": alt_errors,
        "torchvision_errors_are": alt_name,
        "failed": failed,
        "first_diverging_block": first_block,
    }


def format_report(r: dict) -> str:
    e, b = r["errors"], r["bounds"]
    lines = [
        f"{r['arch']} --mode {r['mode']} {r['dtype']} on {r['device']}, resnet_fast backend {r['backend']} "
        f"(fused ops: {', '.join(r['fused_ops']) or 'none'}); weights: {r['weights']}",
        f"rule: {r['rule']}",
        f"logits: max abs {e['logits_max_abs']:.3g}, relative {e['logits']:.3g} (bound {b['logits']:.3g}); "
        f"top-1 agreement {e['top1_agreement']:.0%} of {r['batch_size']}",
    ]
    if r["torchvision_errors"]:
        t = r["torchvision_errors"]
        lines.append(
            f"{r['torchvision_errors_are']}: logits relative {t['logits']:.3g}, top-1 {t['top1_agreement']:.0%}"
            + (f", gradients {t['grads']:.3g}" if "grads" in t else "")
        )
    if "grads" in e:
        lines.append(f"gradients: norm-wise relative {e['grads']:.3g} (bound {b['grads']:.3g})")
        lines.append(f"BN running stats: worst relative {e['bn_stats']:.3g} (bound {b['bn_stats']:.3g})")
    if e["blocks"]:
        lines.append("per block (relative error / bound):")
        for name, err in e["blocks"].items():
            mark = "  <-- first past tolerance" if name == r["first_diverging_block"] else ""
            lines.append(f"  {name:10s} {err:.3g} / {r['block_bounds'][name]:.3g}{mark}")
    what = r["failed"] + ([f"block {r['first_diverging_block']}"] if r["first_diverging_block"] else [])
    head = f"{r['arch']} {r['mode']} {r['dtype']} {r['device']} [{r['backend']}]"
    summary = f"logits relative error {e['logits']:.2g} (bound {b['logits']:.2g})"
    if r["ok"]:
        lines.append(f"PASS: resnet_fast {head} matches torchvision; {summary}")
    else:
        lines.append(f"FAIL: resnet_fast {head}: {', '.join(what)} past tolerance; {summary}")
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "validate",
        help="numerics of resnet_fast vs torchvision (exit status 1 past tolerance)",
        description=__doc__.split("\n\n")[0],
    )
    timing.add_model_args(p)
    p.add_argument(
        "--mode",
        choices=("eval", "train"),
        default="eval",
        help="eval: running BN statistics; train: batch statistics, also gradients and running stats",
    )
    p.add_argument(
        "--weights",
        help="a torchvision weight name (IMAGENET1K_V2, ResNet50_Weights.DEFAULT) or a "
        "state_dict file; default: random init with randomized BN statistics",
    )
    p.add_argument("--batch-size", type=int, default=8, help="default 8")
    p.add_argument("--image-size", type=int, default=224, help="default 224")
    p.add_argument(
        "--per-layer",
        action="store_true",
        help="also the error after each block; names the first past tolerance",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="weights, BN statistics, input and targets (default 0)"
    )
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        report = validate(args)
    except UsageError as error:
        print(f"resnet-fast validate: error: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1
