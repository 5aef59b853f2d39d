"""Which path each conv of a model takes on the active backend, and the times layer_choice measured
(Triton vs cuDNN on CUDA, oneDNN vs our GEMM or Winograd kernel on CPU)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import backend, conv_route, layer_choice


def explain(
    model: nn.Module, input_shape: tuple[int, ...], device: str | torch.device | None = None
) -> list[dict]:
    """One row per Conv2d of `model` in eval mode for an input of `input_shape` (N, C, H, W).

    Runs the model once on zeros (which measures and caches each conv shape's choice where a layer
    has candidates), then reports per layer: input shape, backend, path and, where measured, each
    candidate's time in ms.
    """
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    shapes: dict[str, tuple[int, ...]] = {}
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}

    def recorder(name):
        def hook(module, args):
            shapes[name] = tuple(args[0].shape)

        return hook

    x = torch.zeros(input_shape, device=device, dtype=param.dtype)
    was_training, previous = model.training, backend._override
    model.eval()
    try:
        # Shapes from an unfused run (hooks make every conv run unfused), then the fused run.
        backend._override = "torch"
        handles = [m.register_forward_pre_hook(recorder(n)) for n, m in convs.items()]
        with torch.no_grad():
            model(x)
        for h in handles:
            h.remove()
        backend._override = previous
        with torch.no_grad():
            model(x.contiguous(memory_format=torch.channels_last))
    finally:
        backend._override = previous
        model.train(was_training)

    name_of_backend = backend.backend_for(device)
    tails = _block_tails(model)
    rows = []
    for name, conv in convs.items():
        row = {
            "layer": name,
            "input": list(shapes.get(name, ())),
            "weight": list(conv.weight.shape),
            "stride": list(conv.stride),
            "backend": name_of_backend,
            "path": "unfused PyTorch",
            "ms": None,  # per candidate path, where layer_choice measured them
            "in_model_ms": None,  # per close path, where a close call was settled in a model's forwards
        }
        # Layers with measured candidates: Triton's (CUDA) and the cpp backend's on CPU.
        measured = name_of_backend == "triton" or (name_of_backend == "cpp" and device.type == "cpu")
        key = None
        if measured and name in shapes:  # the key layer_choice keeps this layer's choice under
            key = layer_choice.conv_key(
                shapes[name],
                tuple(conv.weight.shape),
                param.dtype,
                list(conv.stride),
                list(conv.padding),
                list(conv.dilation),
                conv.groups,
                name in tails,
                device.type,
            )
        if name_of_backend == "cpp":
            row["path"] = conv_route(device.type, param.dtype)
            choice = layer_choice.CPU_CACHE.get(key) if key else None
            if choice is not None:
                row["ms"], row["in_model_ms"] = choice.ms, choice.in_model
                if choice.path in _OWN_PATHS:
                    row["path"] = f"{choice.path} (resnet_fast._C: {_OWN_PATHS[choice.path]}, fused epilogue)"
        elif name_of_backend == "triton" and key:
            choice = layer_choice.CACHE.get(key)
            if choice is not None:
                row.update(path=choice.path, ms=choice.ms)
            else:
                row["path"] = "not measured (run unfused or captured)"
        rows.append(row)
    return rows


# What each of resnet_fast._C's CPU paths is (ops.conv._own_kernels).
_OWN_PATHS = {
    "gemm": "implicit GEMM",
    "gemm_rows": "implicit GEMM over kernel rows",
    "amx": "implicit GEMM on AMX tiles",
    "amx_rows": "implicit GEMM over kernel rows on AMX tiles",
    "winograd": "Winograd F(2x2, 3x3)",
    "winograd4": "Winograd F(4x4, 3x3)",
}


def _block_tails(model: nn.Module) -> set[str]:
    """Names of the convs whose epilogue adds the residual: the last conv of each block."""
    from ..models.resnet import BasicBlock, Bottleneck

    tails = set()
    for name, m in model.named_modules():
        if isinstance(m, BasicBlock):
            tails.add(f"{name}.conv2")
        elif isinstance(m, Bottleneck):
            tails.add(f"{name}.conv3")
    return tails


def format_explain(rows: list[dict]) -> str:
    lines = [f"{'layer':28s} {'input':22s} {'weight':18s} {'backend':7s} path"]
    for r in rows:
        times = ""
        if r["ms"]:
            times = "  (" + ", ".join(f"{path} {ms:.3f} ms" for path, ms in r["ms"].items()) + ")"
            if r.get("in_model_ms"):
                times += (
                    " in the model ("
                    + ", ".join(f"{p} {ms:.3f} ms" for p, ms in r["in_model_ms"].items())
                    + ")"
                )
        lines.append(
            f"{r['layer']:28s} {str(r['input']):22s} {str(r['weight']):18s} {r['backend']:7s} {r['path']}{times}"
        )
    return "\n".join(lines)
