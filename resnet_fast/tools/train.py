"""Training loop and the `resnet-fast train-mnist` command (the tutorial's MNIST experiment).

`fit()` trains any classifier on preloaded tensors and evaluates it after each epoch; `train_mnist()`
builds `resnet_fast.<arch>(in_channels=1, num_classes=10)` and the MNIST tensors and calls `fit()`.
The model is called normally, so it runs whatever the active backend does (reference, fused).

Batches come from one permutation of the whole training tensor per epoch, then contiguous slices:
one gather per epoch instead of one per batch (torch's multithreaded fancy-indexing of a 128-image
batch costs ~8 ms on 2 cores, the whole 8,000-image permutation ~20 ms), and no thread settings touched.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import BackendUnavailable

__all__ = ["ARCHS", "add_parser", "batches", "evaluate", "fit", "lr_factor", "shift_augment", "train_mnist"]

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
OPTIMIZERS = ("adam", "adamw", "sgd")
# Settings that must match for a resume to continue the same run.
_RESUME_KEYS = ("arch", "optimizer", "lr", "schedule", "batch_size", "seed", "augment", "train_size")
SCHEDULES = ("constant", "cosine", "step")


def batches(
    x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator | None = None, train: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """(x, y) batches in an order drawn from `generator` (file order when None).

    With `train`, a final batch of one sample is dropped: BatchNorm in training mode cannot normalise it.
    """
    if generator is not None:
        order = torch.randperm(len(x), generator=generator).to(x.device)
        x, y = x[order], y[order]
    for i in range(_num_batches(len(x), batch_size, train)):
        yield x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size]


def _num_batches(n: int, batch_size: int, train: bool) -> int:
    full, rest = divmod(n, batch_size)
    return full + (rest > 1 or (rest == 1 and (full == 0 or not train)))


def shift_augment(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image by a random whole number of pixels in [-max_shift, max_shift] on each axis.

    The uncovered border takes the image's minimum value (the background of normalised MNIST).
    """
    n, _, h, w = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (2, n), generator=generator).to(x.device)
    padded = F.pad(x, (max_shift,) * 4, value=float(x.min()))
    rows = (torch.arange(h, device=x.device) + max_shift - shifts[0, :, None])[:, None, :, None]
    cols = (torch.arange(w, device=x.device) + max_shift - shifts[1, :, None])[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    return padded[batch, torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]


def _autocast(device: torch.device, amp: bool):
    # bfloat16 needs no loss scaling; CPUs and Ampere+ GPUs run it.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500, amp: bool = False
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of `model` in eval mode on (x, y). Leaves the model in eval mode."""
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for xb, yb in batches(x, y, batch_size):
        with _autocast(x.device, amp):
            logits = model(xb)
        loss += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    return loss.item() / len(x), correct.item() / len(x)


def _make_optimizer(
    name: str, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def lr_factor(
    step: int, total: int, schedule: str, *, warmup: int = 0, step_every: int = 0, gamma: float = 0.1
) -> float:
    """Factor of the base lr at optimizer step `step` (0-based) of `total`.

    A linear warm-up over the first `warmup` steps, then 'constant', 'cosine' (decay to 0 at `total`)
    or 'step' (times `gamma` every `step_every` steps). A function of the step alone: nothing to save.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if schedule == "step" and step_every < 1:
        raise ValueError(f"the step schedule needs step_every >= 1 steps, got {step_every}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    if schedule == "step":
        return gamma ** (step // step_every)
    return 1.0


def _check_resume(path: Path, saved: dict[str, Any], now: dict[str, Any], keys: tuple[str, ...]) -> None:
    """ValueError unless the checkpoint's settings `saved` equal this run's `now` on `keys`."""
    differ = {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}
    if differ:
        raise ValueError(
            f"{path} was saved by a different run; (checkpoint, now) differ in: {differ}. "
            "Resume with the same settings, or start a new checkpoint."
        )


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"shuffle": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(generator: torch.Generator, state: dict[str, Any]) -> None:
    generator.set_state(state["shuffle"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(path: Path, checkpoint: dict[str, Any]) -> None:
    # Write then rename, so an interrupted save never leaves a truncated checkpoint under the real name.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def fit(
    model: nn.Module,
    train_data: tuple[Tensor, Tensor],
    test_data: tuple[Tensor, Tensor],
    *,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-4,
    optimizer: str = "adam",
    schedule: str = "constant",
    amp: bool = False,
    seed: int = 0,
    augment: int = 0,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train `model` on `train_data` = (images, labels) and evaluate on `test_data` after every epoch.

    Both are tensors on the model's device (images float [N, C, H, W], labels int64 [N]). Cross-entropy,
    `optimizer` 'adam', 'adamw' or 'sgd' (momentum 0.9) at `lr`, constant or, with `schedule='cosine'`,
    decayed per step to 0 at the end of `epochs` (a run to resume then needs the same `epochs`);
    `augment=K` shifts each training image by up to K pixels. `seed` seeds the shuffling (and
    augmentation) generator. `amp` runs forward passes under bfloat16 autocast.

    With `checkpoint`, model, optimizer, epoch and RNG state are saved there after each epoch; with
    `resume`, training continues from that file up to `epochs` in total, drawing the same batches it
    would have drawn without the interruption. `meta` (e.g. {'arch': ...}) is stored in the checkpoint
    and the summary. Returns the summary: test accuracy and loss, per-epoch history, time, images/s.
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    config = _fit_config(
        train_data, test_data, epochs, batch_size, lr, optimizer, schedule, seed, augment, meta
    )
    opt = _make_optimizer(optimizer, model.parameters(), lr)
    generator = torch.Generator().manual_seed(seed)
    path = Path(checkpoint) if checkpoint is not None else None
    start_epoch, history = 0, []
    if resume:
        start_epoch, history = _fit_resume(path, config, model, opt, generator, train_data[0].device)
        log(f"resumed from {path} after epoch {start_epoch}")

    trained, train_time = 0, 0.0
    for epoch in range(start_epoch, epochs):
        record, seen, seconds = _fit_epoch(
            model, opt, train_data, generator, epoch, epochs, config, amp, progress
        )
        trained, train_time = trained + seen, train_time + seconds
        record["test_loss"], record["test_accuracy"] = evaluate(model, *test_data, amp=amp)
        history.append(record)
        log(
            f"epoch {epoch + 1}/{epochs}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}, "
            f"test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}"
        )
        if path is not None:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1}
            _save(path, {**state, "rng": _rng_state(generator), "config": config, "history": history})

    if history:  # the last epoch's evaluation (this run's, or the checkpoint's when nothing was left to run)
        test_loss, test_acc = history[-1]["test_loss"], history[-1]["test_accuracy"]
    else:
        test_loss, test_acc = evaluate(model, *test_data, amp=amp)
    return {
        **config,
        "epochs": epochs,
        "epochs_run": epochs - start_epoch,
        "amp": amp,
        "device": str(train_data[0].device),
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "train_loss": history[-1]["train_loss"] if history else None,
        "time_s": train_time,
        "images_per_s": trained / train_time if train_time else None,
        "history": history,
    }


def _fit_config(train_data, test_data, epochs, batch_size, lr, optimizer, schedule, seed, augment, meta):
    """The run's settings (checked), as stored in the checkpoint and the summary."""
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 0, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    if augment < 0:
        raise ValueError(f"augment must be >= 0 pixels, got {augment}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    lr_factor(0, 1, schedule)  # validates the name before any work ('step' is refused: no step size here)
    config = {
        **(meta or {}),
        "optimizer": optimizer,
        "lr": lr,
        "schedule": schedule,
        "batch_size": batch_size,
        "seed": seed,
        "augment": augment,
        "train_size": len(train_data[0]),
        "test_size": len(test_data[0]),
    }
    if schedule != "constant":
        config["epochs"] = epochs  # the decay depends on the total
    return config


def _fit_resume(path, config, model, opt, generator, device) -> tuple[int, list[dict[str, float]]]:
    """Load the checkpoint at `path` into model, optimizer and generator; (epochs done, history)."""
    if path is None:
        raise ValueError("resume needs a checkpoint path")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    state = torch.load(path, map_location=device, weights_only=False)
    _check_resume(path, state["config"], config, (*_RESUME_KEYS, "epochs"))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    _set_rng_state(generator, state["rng"])
    return state["epoch"], state["history"]


def _fit_epoch(
    model, opt, train_data, generator, epoch, epochs, config, amp, progress
) -> tuple[dict, int, float]:
    """Epoch `epoch` of `epochs`: (its history record, images trained, seconds)."""
    x_train, y_train = train_data
    device, batch_size, lr = x_train.device, config["batch_size"], config["lr"]
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    steps = _num_batches(len(x_train), batch_size, train=True)
    bar = _progress(steps, f"epoch {epoch + 1}/{epochs}", progress)
    started = time.perf_counter()
    for step, (xb, yb) in enumerate(batches(x_train, y_train, batch_size, generator, train=True)):
        if config["augment"]:
            xb = shift_augment(xb, config["augment"], generator)
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(epoch * steps + step, epochs * steps, config["schedule"])
        with _autocast(device, amp):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * len(yb)
        correct += (logits.argmax(1) == yb).sum()
        seen += len(yb)
        if bar is not None:
            # .item() syncs a GPU: there, refresh the running figures every 10 steps only.
            if device.type == "cpu" or bar.n % 10 == 0 or seen == len(x_train):
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
            bar.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    if bar is not None:
        bar.close()
    train_loss = loss_sum.item() / seen
    if not math.isfinite(train_loss):
        raise FloatingPointError(f"training loss is {train_loss} in epoch {epoch + 1}; lower the lr")
    record = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": correct.item() / seen}
    return record, seen, seconds


def _progress(steps: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=steps, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True)


def train_mnist(
    arch: str = "resnet34",
    data: str | os.PathLike[str] = "data",
    *,
    holdout: int | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    download: bool = False,
    device: str | torch.device = "cpu",
    backend: str | None = None,
    seed: int = 0,
    **fit_kwargs: Any,
) -> dict[str, Any]:
    """Train `resnet_fast.<arch>(in_channels=1, num_classes=10)` on MNIST; returns fit()'s summary.

    The data and the holdout / limit semantics are those of resnet_fast.data.mnist_train_test.
    `backend` (auto|triton|cpp|torch) is set with resnet_fast.set_backend for the run and restored after.
    `seed` seeds the weight initialisation (torch.manual_seed) and the batch order.
    """
    import resnet_fast
    from resnet_fast.data import mnist_train_test, to_float
    from resnet_fast.ops import backend_for

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available here")
    (x_train, y_train), (x_test, y_test) = mnist_train_test(data, holdout, limit_train, limit_test, download)
    train_data = (to_float(x_train).to(device), y_train.to(device))
    test_data = (to_float(x_test).to(device), y_test.to(device))

    previous = resnet_fast.get_backend()
    resnet_fast.set_backend(backend)
    try:
        torch.manual_seed(seed)
        model = resnet_fast.BUILDERS[arch](in_channels=1, num_classes=10).to(device)
        used = backend_for(device)
        summary = fit(model, train_data, test_data, seed=seed, meta={"arch": arch}, **fit_kwargs)
    finally:
        resnet_fast.set_backend(previous)
    return {"arch": arch, "backend": used, **summary, "holdout": holdout, "data": str(data)}


# ------------------------------------------------------------------------------------------ command line


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _cmd_train_mnist(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(f"resnet-fast train-mnist: error: {message}", file=sys.stderr)
        return 2

    if args.resume and args.checkpoint is None:
        return fail("--resume needs --checkpoint PATH")
    if args.resume and not Path(args.checkpoint).is_file():
        return fail(f"--resume: no checkpoint at {args.checkpoint}")
    if not args.download and not Path(args.data).is_dir():
        return fail(f"--data {args.data}: no such folder (pass --download to fetch MNIST into it)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        summary = train_mnist(
            args.arch,
            args.data,
            holdout=args.holdout,
            limit_train=args.limit_train,
            limit_test=args.limit_test,
            download=args.download,
            device=device,
            backend=args.backend,
            seed=args.seed,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            optimizer=args.optimizer,
            schedule=args.schedule,
            amp=args.amp,
            augment=args.augment,
            checkpoint=args.checkpoint,
            resume=args.resume,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as e:
        # Bad data folder, holdout/limits out of range, mismatched checkpoint, unusable device.
        return fail(str(e))
    except BackendUnavailable as e:
        return fail(str(e))
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `train-mnist` on the `resnet-fast` sub-command parsers."""
    p = subparsers.add_parser(
        "train-mnist",
        help="train a ResNet on MNIST and report test accuracy",
        description="Train resnet_fast.<arch>(in_channels=1, num_classes=10) on MNIST (the tutorial's "
        "experiment: Adam, lr 1e-4, batch 128, 20 epochs). Progress goes to stderr, the JSON summary "
        "to stdout.",
    )
    p.add_argument("--arch", choices=ARCHS, default="resnet34", help="architecture (default resnet34)")
    p.add_argument("--data", required=True, help="MNIST folder (torchvision layout or flat .gz/raw files)")
    p.add_argument("--download", action="store_true", help="download missing MNIST files into --data")
    p.add_argument("--epochs", type=_positive(int), default=20, help="total epochs (default 20)")
    p.add_argument("--batch-size", type=_positive(int), default=128, help="default 128")
    p.add_argument("--lr", type=_positive(float), default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument(
        "--optimizer", choices=OPTIMIZERS, default="adam", help="adam, adamw, or sgd with momentum 0.9"
    )
    p.add_argument(
        "--schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="lr: constant, or cosine decay to 0",
    )
    p.add_argument("--augment", type=int, default=0, metavar="K", help="random shifts of up to K pixels")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument(
        "--backend", choices=("auto", "triton", "cpp", "torch"), default=None, help="default: auto"
    )
    p.add_argument("--seed", type=int, default=0, help="weight init and batch order (default 0)")
    p.add_argument(
        "--limit-train", type=_positive(int), default=None, metavar="K", help="first K train digits"
    )
    p.add_argument("--limit-test", type=_positive(int), default=None, metavar="K", help="first K test digits")
    p.add_argument(
        "--holdout",
        type=int,
        default=None,
        metavar="N",
        help="no training files: train on the first 10000-N test digits, evaluate on the last N",
    )
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="save after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the summary here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train_mnist)
    return p
