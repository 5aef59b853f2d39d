"""The `resnet-fast` command line."""

from __future__ import annotations

import argparse
import json
import sys

from . import bench, export, train, train_images, validate


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info, info

    data = info()
    if args.model:
        from .. import models
        from .explain import explain, format_explain

        if args.model not in models.BUILDERS:
            print(f"resnet-fast info: error: unknown model {args.model!r}", file=sys.stderr)
            return 2
        device = args.device
        model = models.BUILDERS[args.model]().to(device)
        data["layers"] = explain(model, tuple(args.input_shape), device)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(format_info(data))
        if args.model:
            print(format_explain(data["layers"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-fast", description="Kernel-fused ResNets for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, devices, and which backends are usable here")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_info.add_argument("--model", help="also list each conv of this model with the path it takes")
    p_info.add_argument("--device", default="cpu", help="device for --model (default cpu)")
    p_info.add_argument(
        "--input-shape", type=int, nargs=4, default=[1, 3, 224, 224], metavar=("N", "C", "H", "W")
    )
    p_info.set_defaults(func=_cmd_info)
    train_images.add_parser(sub)
    train.add_parser(sub)
    bench.add_parser(sub)
    validate.add_parser(sub)
    export.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
