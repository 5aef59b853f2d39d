"""`resnet-fast train`: pytorch/examples' ImageNet trainer on resnet_fast models, one process or torchrun.

    resnet-fast train --data DIR --arch resnet50                      # one process
    torchrun --nproc-per-node 8 -m resnet_fast train --data DIR ...   # DistributedDataParallel

DIR holds `train/<class>/*` and `val/<class>/*` images (torchvision's ImageFolder). The scaling is
torch.distributed's: under torchrun (its RANK/WORLD_SIZE/LOCAL_RANK variables) each process joins the
group (NCCL on CUDA, gloo on CPU), trains a DistributedDataParallel replica on its shard of every
batch and evaluates its shard of the validation set; metrics are summed over the processes, and only
rank 0 logs and writes checkpoints.

One run gives the same result with any number of processes (up to float rounding): `--batch-size`
is the global batch, split evenly over the processes; the shuffle is DistributedSampler's (seeded by
seed + epoch, so every world size sees the same global batches); each sample's augmentation is seeded
by (seed, epoch, index) (data.imagefolder.SeededTransform); with `--sync-bn` BatchNorm normalises over
the global batch. The same property makes a resume exact without replaying any random stream.

`--dataset mnist` runs the MNIST experiment instead (`resnet-fast train-mnist`, resnet_fast.tools.train).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from ..ops import BackendUnavailable
from .train import ARCHS, _check_resume, _make_optimizer, _positive, _progress, _save, lr_factor

__all__ = ["TrainConfig", "add_parser", "train_images"]

SCHEDULES = ("constant", "cosine", "step")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# ImageNet's channel statistics; 1-channel images use their means (what timm does for grayscale).
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Settings that must match for a resume to continue the same run (the world size need not).
_RESUME_KEYS = (
    "arch", "epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "schedule", "step_size",
    "gamma", "warmup_epochs", "label_smoothing", "image_size", "in_channels", "min_crop_scale", "crop_pct",
    "amp", "dtype", "seed", "num_classes", "train_size",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Settings of one `resnet-fast train` run; the defaults are pytorch/examples' ImageNet trainer's."""

    data: str
    arch: str = "resnet18"
    epochs: int = 90
    batch_size: int = 256  # global: split over the processes
    lr: float = 0.1
    optimizer: str = "sgd"  # sgd (with momentum), adam, adamw
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"  # constant, cosine (to 0 at the end), step (x gamma every step_size epochs)
    step_size: int = 30
    gamma: float = 0.1
    warmup_epochs: int = 0  # linear warm-up, per step, before the schedule
    label_smoothing: float = 0.0
    image_size: int = 224
    in_channels: int = 3  # 1: images read as grayscale
    min_crop_scale: float = 0.08  # RandomResizedCrop's smallest area fraction
    crop_pct: float = 0.875  # validation: resize to image_size / crop_pct, center-crop image_size
    workers: int = 4
    amp: str | None = None  # None, 'bf16' or 'fp16' (with a GradScaler)
    channels_last: bool = True
    dtype: str = "float32"  # parameters and batches; float64 makes runs comparable exactly (tests)
    sync_bn: bool = False
    seed: int = 0
    device: str | None = None  # default: cuda (this process's LOCAL_RANK) if available, else cpu
    backend: str | None = None  # resnet_fast.set_backend for the run
    checkpoint: str | None = None
    resume: bool = False
    evaluate: bool = False  # only evaluate the --checkpoint's model on val/
    progress: bool = True


# ------------------------------------------------------------------------------------------ processes


@dataclass
class _Process:
    """This process's place in the run: rank 0 of 1 without torchrun."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, line: str) -> None:
        if self.main:
            print(line, file=sys.stderr, flush=True)

    def sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: list[float], op: Any) -> list[float]:
        if self.world == 1:
            return values
        # On the process's device: NCCL reduces CUDA tensors only, gloo CPU ones.
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op)
        return t.tolist()


def _start_process(device: str | None) -> _Process:
    """Join torchrun's process group when launched by it with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {dev} requested but CUDA is not available here")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")  # env:// from torchrun
    return _Process(rank, world, dev)


# ------------------------------------------------------------------------------------------------ data


def _transforms(config: TrainConfig) -> tuple[Any, Any]:
    from torchvision import transforms as T

    mean, std = (MEAN, STD) if config.in_channels == 3 else ((sum(MEAN) / 3,), (sum(STD) / 3,))
    size = config.image_size
    train = T.Compose(
        [
            T.RandomResizedCrop(size, scale=(config.min_crop_scale, 1.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    val = T.Compose(
        [
            T.Resize(round(size / config.crop_pct)),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    return train, val


def _loaders(config: TrainConfig, proc: _Process) -> tuple[DataLoader, DataLoader, list[str]]:
    """(train, val) loaders of this process's shard, and the class names."""
    from ..data.imagefolder import SeededTransform, image_folders

    train_set, val_set = image_folders(config.data, config.in_channels)
    train_tf, val_tf = _transforms(config)
    per_process = config.batch_size // proc.world
    if len(train_set) < config.batch_size:
        raise ValueError(
            f"{config.data}/train has {len(train_set)} images, fewer than one batch ({config.batch_size})"
        )
    kwargs = dict(num_workers=config.workers, pin_memory=proc.device.type == "cuda")
    train = DataLoader(
        SeededTransform(train_set, train_tf, config.seed),
        batch_size=per_process,
        # Shuffled by seed + epoch, the same permutation in every process; rank r takes every world-th index,
        # so the processes' batches k together are the 1-process batch k.
        sampler=DistributedSampler(train_set, proc.world, proc.rank, shuffle=True, seed=config.seed),
        drop_last=True,  # a full global batch every step (and never a batch of one for BatchNorm)
        **kwargs,
    )
    # Validation: every world-th image, no padding, so the summed counts cover each image once.
    val_shard = Subset(SeededTransform(val_set, val_tf), range(proc.rank, len(val_set), proc.world))
    val = DataLoader(val_shard, batch_size=per_process, shuffle=False, **kwargs)
    return train, val, train_set.classes


def _to_device(
    images: Tensor, target: Tensor, config: TrainConfig, device: torch.device
) -> tuple[Tensor, Tensor]:
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    images = images.to(device, getattr(torch, config.dtype), non_blocking=True, memory_format=fmt)
    return images, target.to(device, non_blocking=True)


# ------------------------------------------------------------------------------------------- the steps


def _build(config: TrainConfig, num_classes: int, steps_per_epoch: int, proc: _Process):
    """(model, optimizer, lr scheduler, grad scaler), all ranks starting from the same weights."""
    import resnet_fast

    torch.manual_seed(config.seed)
    model: nn.Module = resnet_fast.BUILDERS[config.arch](
        num_classes=num_classes, in_channels=config.in_channels
    )
    if config.sync_bn:
        model = resnet_fast.convert_sync_batchnorm(model)  # a plain BatchNorm2d when not distributed
    model = model.to(proc.device, getattr(torch, config.dtype))
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = _make_optimizer(
        config.optimizer,
        model.parameters(),
        config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    factor = partial(
        lr_factor,
        total=config.epochs * steps_per_epoch,
        schedule=config.schedule,
        warmup=config.warmup_epochs * steps_per_epoch,
        step_every=config.step_size * steps_per_epoch,
        gamma=config.gamma,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)  # stepped per optimizer step
    scaler = torch.amp.GradScaler(proc.device.type, enabled=config.amp == "fp16")
    return model, opt, scheduler, scaler


def _autocast(config: TrainConfig, device: torch.device):
    dtype = AMP_DTYPES.get(config.amp or "bf16")
    return torch.autocast(device.type, dtype=dtype, enabled=config.amp is not None)


def _full(output: Tensor) -> Tensor:
    """Autocast's half-precision logits in float32 for the loss; float32/float64 ones as they are."""
    return output.float() if output.dtype in (torch.float16, torch.bfloat16) else output


def _train_epoch(model, loader, opt, scheduler, scaler, criterion, config, proc, epoch) -> dict[str, float]:
    """One epoch; loss and top-1 summed over the processes, times the slowest process's."""
    model.train()
    loader.dataset.set_epoch(epoch)
    loader.sampler.set_epoch(epoch)
    loss_sum = torch.zeros((), device=proc.device, dtype=torch.float64)
    correct = torch.zeros((), device=proc.device, dtype=torch.long)
    seen, data_time, compute_time = 0, 0.0, 0.0
    bar = _progress(len(loader), f"epoch {epoch + 1}/{config.epochs}", config.progress and proc.main)
    started = end = time.perf_counter()
    for images, target in loader:
        ready = time.perf_counter()
        data_time += ready - end  # waiting for the loader
        images, target = _to_device(images, target, config, proc.device)
        with _autocast(config, proc.device):
            output = model(images)
        loss = criterion(_full(output), target)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach() * len(target)
        correct += (output.argmax(1) == target).sum()
        seen += len(target)
        if proc.device.type == "cuda":
            torch.cuda.synchronize(proc.device)  # so compute time is the step's, not its launch's
        end = time.perf_counter()
        compute_time += end - ready
        if bar is not None:
            if proc.device.type == "cpu" or bar.n % 10 == 0:  # .item() syncs a GPU
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
            bar.update()
    wall = time.perf_counter() - started
    if bar is not None:
        bar.close()
    loss_total, correct_total, images = proc.sum([loss_sum.item(), correct.item(), seen])
    wall, data_time, compute_time = proc.max([wall, data_time, compute_time])
    train_loss = loss_total / images
    if not math.isfinite(train_loss):
        raise FloatingPointError(f"training loss is {train_loss} in epoch {epoch + 1}; lower the lr")
    return {
        "train_loss": train_loss,
        "train_top1": correct_total / images,
        "images": images,
        "time_s": wall,
        "data_time_s": data_time,
        "compute_time_s": compute_time,
    }


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader, config: TrainConfig, proc: _Process, num_classes: int):
    """Loss, top-1 and top-5 on the whole validation set (each process evaluates its shard)."""
    if proc.world > 1:
        # Without SyncBN each replica's running statistics drift apart: evaluate (and save) rank 0's.
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, device=proc.device, dtype=torch.float64)  # loss, top-1, top-k, images
    for images, target in loader:
        images, target = _to_device(images, target, config, proc.device)
        with _autocast(config, proc.device):
            output = _full(model(images))
        topk = output.topk(k, 1).indices == target[:, None]
        sums += torch.stack(
            [
                F.cross_entropy(output, target, reduction="sum").double(),
                topk[:, 0].sum().double(),
                topk.any(1).sum().double(),
                torch.tensor(len(target), device=proc.device, dtype=torch.float64),
            ]
        )
    loss, top1, top5, n = proc.sum(sums.tolist())
    return {"val_loss": loss / n, "val_top1": top1 / n, "val_top5": top5 / n}


def _checkpoint_state(model, opt, scheduler, scaler, epoch, settings, history, classes) -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "model": model.state_dict(),  # torchvision's keys (the model is saved unwrapped)
        "optimizer": opt.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "rng": rng,  # the sampler and the augmentation need none: they are seeded by seed + epoch
        "config": settings,
        "classes": classes,
        "history": history,
    }


def _resume_config(config: TrainConfig, num_classes: int, train_size: int) -> dict[str, Any]:
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k in _RESUME_KEYS}
    return {**settings, "num_classes": num_classes, "train_size": train_size}


def _load(path: Path, device: torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=device, weights_only=False)


def _restore(state, model, opt, scheduler, scaler) -> None:
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])


# --------------------------------------------------------------------------------------------- the run


def train_images(config: TrainConfig) -> dict[str, Any]:
    """Train (or with `config.evaluate`, evaluate) on config.data; returns the summary (the same on every rank).

    Launched by torchrun, joins its process group and trains with DistributedDataParallel.
    """
    import resnet_fast
    from resnet_fast.ops import backend_for

    _check(config)
    started = time.perf_counter()
    proc = _start_process(config.device)
    previous = resnet_fast.get_backend()
    resnet_fast.set_backend(config.backend)
    try:
        train_loader, val_loader, classes = _loaders(config, proc)
        steps = len(train_loader)
        model, opt, scheduler, scaler = _build(config, len(classes), steps, proc)
        path = Path(config.checkpoint) if config.checkpoint else None
        settings = _resume_config(config, len(classes), len(train_loader.dataset))
        start_epoch, history = 0, []
        if config.evaluate:
            state = _load(path, proc.device)
            model.load_state_dict(state.get("model", state))  # a checkpoint or a bare state_dict
            start_epoch = config.epochs  # nothing to train
        elif config.resume:
            state = _load(path, proc.device)
            _check_resume(path, state["config"], settings, _RESUME_KEYS)
            _restore(state, model, opt, scheduler, scaler)
            start_epoch, history = state["epoch"], state["history"]
            proc.log(f"resumed from {path} after epoch {start_epoch}")

        ddp = model
        if proc.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ddp = DDP(model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None)
        criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        for epoch in range(start_epoch, config.epochs):
            stats = _train_epoch(ddp, train_loader, opt, scheduler, scaler, criterion, config, proc, epoch)
            metrics = _evaluate(model, val_loader, config, proc, len(classes))
            history.append(_epoch_record(epoch, stats, metrics, opt))
            proc.log(_epoch_line(history[-1], config.epochs))
            if path is not None and proc.main:
                _save(
                    path,
                    _checkpoint_state(model, opt, scheduler, scaler, epoch + 1, settings, history, classes),
                )
        final = (
            _evaluate(model, val_loader, config, proc, len(classes)) if config.evaluate or not history else {}
        )
        used = backend_for(proc.device)
    finally:
        resnet_fast.set_backend(previous)
    return _summary(
        config, proc, classes, settings, start_epoch, history, final, used, time.perf_counter() - started
    )


def _check(config: TrainConfig) -> None:
    if config.arch not in ARCHS:
        raise ValueError(f"unknown arch {config.arch!r}; expected one of {', '.join(ARCHS)}")
    if config.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {config.schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if config.dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {config.dtype!r}")
    if config.amp not in (None, *AMP_DTYPES):
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {config.amp!r}")
    if (config.resume or config.evaluate) and not config.checkpoint:
        raise ValueError("--resume and --evaluate need --checkpoint PATH")
    if not 0 < config.min_crop_scale <= 1 or not 0 < config.crop_pct <= 1:
        raise ValueError("--min-crop-scale and --crop-pct must be in (0, 1]")
    if not 0 <= config.label_smoothing < 1:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.batch_size % world:
        raise ValueError(
            f"--batch-size {config.batch_size} (global) must be a multiple of the {world} processes"
        )


def _epoch_record(epoch: int, stats: dict[str, float], metrics: dict[str, float], opt) -> dict[str, Any]:
    return {
        "epoch": epoch + 1,
        "lr": opt.param_groups[0]["lr"],
        "train_loss": stats["train_loss"],
        "train_top1": stats["train_top1"],
        **metrics,
        "time_s": stats["time_s"],
        "data_time_s": stats["data_time_s"],
        "compute_time_s": stats["compute_time_s"],
        "images": stats["images"],
    }


def _epoch_line(h: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {h['epoch']}/{epochs}: train loss {h['train_loss']:.4f} top-1 {h['train_top1']:.4f}, "
        f"val loss {h['val_loss']:.4f} top-1 {h['val_top1']:.4f} top-5 {h['val_top5']:.4f}, "
        f"{h['images'] / h['time_s']:.0f} img/s"
    )


def _summary(config, proc, classes, settings, start_epoch, history, final, backend, wall) -> dict[str, Any]:
    run = history[start_epoch:]  # this run's epochs, not the resumed ones
    images = sum(h["images"] for h in run)
    train_time = sum(h["time_s"] for h in run)
    compute_time = sum(h["compute_time_s"] for h in run)
    last = final or {k: history[-1][k] for k in ("val_loss", "val_top1", "val_top5")}
    return {
        **dataclasses.asdict(config),
        "dataset": "imagefolder",
        "num_classes": len(classes),
        "train_size": settings["train_size"],
        "world_size": proc.world,
        "device": str(proc.device),
        "backend": backend,
        **last,
        "train_loss": history[-1]["train_loss"] if history else None,
        "epochs_run": len(run),
        "time_s": wall,
        "train_time_s": train_time,
        "data_time_s": sum(h["data_time_s"] for h in run),
        "compute_time_s": compute_time,
        "images_per_s": images / train_time if train_time else None,
        "compute_images_per_s": images / compute_time if compute_time else None,
        "history": history,
    }


# ------------------------------------------------------------------------------------------ command line

# Settings whose default depends on --dataset: pytorch/examples' ImageNet trainer, or the MNIST tutorial's
# (train-mnist's). The parser leaves them None so the command can tell given from default.
_DEFAULTS = {
    "imagefolder": {"arch": "resnet18", "epochs": 90, "batch_size": 256, "lr": 0.1, "optimizer": "sgd", "schedule": "step"},
    "mnist": {"arch": "resnet34", "epochs": 20, "batch_size": 128, "lr": 1e-4, "optimizer": "adam", "schedule": "constant",
              "augment": 0},
}  # fmt: skip
# Options of one data set only (their parser defaults are None or False).
_MNIST_ONLY = ("holdout", "limit_train", "limit_test", "download", "augment")
_IMAGEFOLDER_ONLY = (
    "momentum", "weight_decay", "step_size", "gamma", "warmup_epochs", "label_smoothing", "image_size",
    "in_channels", "min_crop_scale", "crop_pct", "workers", "sync_bn", "evaluate", "channels_last", "dtype",
)  # fmt: skip


def _error_line(error: Exception) -> str:
    # An error raised in a DataLoader worker comes back as "Caught X in DataLoader worker process N.
    # Original Traceback ...": its last line is the original "module.X: message".
    line = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
    name = f"{type(error).__module__}.{type(error).__name__}: "
    return line.removeprefix(name)


def _cmd_train(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(f"resnet-fast train: error: {message}", file=sys.stderr)
        return 2

    other = "mnist" if args.dataset == "imagefolder" else "imagefolder"
    misplaced = [
        n
        for n in (_MNIST_ONLY if other == "mnist" else _IMAGEFOLDER_ONLY)
        if getattr(args, n) not in (None, False)
    ]
    if misplaced:
        names = ", ".join("--" + n.replace("_", "-") for n in misplaced)
        return fail(f"{names}: only for --dataset {other}")
    for name, value in _DEFAULTS[args.dataset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.dataset == "mnist":
        from .train import _cmd_train_mnist

        if args.schedule == "step" or args.amp == "fp16":
            return fail("--dataset mnist takes --schedule constant|cosine and --amp bf16")
        args.amp = args.amp is not None
        return _cmd_train_mnist(args)

    config = TrainConfig(
        **{
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name, None) is not None
        }
    )
    config.progress = not args.no_progress
    try:
        summary = train_images(config)
    except (FileNotFoundError, ValueError) as e:
        # Data folder problems (ImageFolderError names the file), mismatched checkpoint, bad settings.
        return fail(_error_line(e))
    except BackendUnavailable as e:
        return fail(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        text = json.dumps(summary, indent=2)
        print(text)
        if args.json:
            Path(args.json).write_text(text + "\n")
    return 0


def _fraction(text: str) -> float:
    value = _positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `train` on the `resnet-fast` sub-command parsers."""
    d = TrainConfig.__dataclass_fields__
    p = subparsers.add_parser(
        "train",
        help="train a ResNet on an image folder (or MNIST), one process or under torchrun",
        description="Train resnet_fast.<arch> on DIR/train/<class>/* and evaluate on DIR/val/<class>/* after "
        "every epoch (pytorch/examples' ImageNet trainer and its defaults). Under `torchrun --nproc-per-node N "
        "-m resnet_fast train ...` it trains with DistributedDataParallel; --batch-size is the global batch. "
        "--dataset mnist runs `resnet-fast train-mnist` (same options and defaults). Progress goes to stderr, "
        "the JSON summary to stdout.",
    )
    p.add_argument("--dataset", choices=("imagefolder", "mnist"), default="imagefolder")
    p.add_argument(
        "--data", required=True, metavar="DIR", help="DIR/train and DIR/val class folders (mnist: IDX files)"
    )
    p.add_argument("--arch", choices=ARCHS, default=None, help="default resnet18 (mnist: resnet34)")
    p.add_argument("--epochs", type=_positive(int), default=None, help="total epochs (default 90; mnist 20)")
    p.add_argument(
        "--batch-size", type=_positive(int), default=None, help="global batch (default 256; mnist 128)"
    )
    p.add_argument(
        "--lr", type=_positive(float), default=None, help="base learning rate (default 0.1; mnist 1e-4)"
    )
    p.add_argument(
        "--optimizer", choices=("sgd", "adam", "adamw"), default=None, help="default sgd (mnist: adam)"
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=None,
        help="lr schedule per step (default step; mnist constant)",
    )
    g = p.add_argument_group("image folder")
    g.add_argument(
        "--momentum", type=float, default=None, help=f"SGD momentum (default {d['momentum'].default})"
    )
    g.add_argument("--weight-decay", type=float, default=None, help=f"default {d['weight_decay'].default}")
    g.add_argument(
        "--step-size",
        type=_positive(int),
        default=None,
        metavar="EPOCHS",
        help="step schedule: every 30 epochs",
    )
    g.add_argument(
        "--gamma", type=_positive(float), default=None, help="step schedule: lr factor (default 0.1)"
    )
    g.add_argument("--warmup-epochs", type=int, default=None, help="linear lr warm-up, per step (default 0)")
    g.add_argument("--label-smoothing", type=float, default=None, help="default 0")
    g.add_argument(
        "--image-size", type=_positive(int), default=None, help="training and validation crop (default 224)"
    )
    g.add_argument(
        "--in-channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="1 reads images as grayscale (default 3, RGB)",
    )
    g.add_argument(
        "--min-crop-scale",
        type=_fraction,
        default=None,
        help="RandomResizedCrop's smallest area (default 0.08)",
    )
    g.add_argument(
        "--crop-pct",
        type=_fraction,
        default=None,
        help="validation: resize to size/crop-pct, center crop (default 0.875)",
    )
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers per process (default 4)")
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC batches (default on)",
    )
    g.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=None,
        help="parameters and batches (default float32)",
    )
    g.add_argument(
        "--sync-bn",
        action="store_true",
        help="BatchNorm over the global batch (resnet_fast.convert_sync_batchnorm)",
    )
    g.add_argument(
        "--evaluate",
        action="store_true",
        help="only evaluate the --checkpoint's model (or a state_dict file) on val/",
    )
    m = p.add_argument_group("mnist")
    m.add_argument(
        "--holdout",
        type=int,
        default=None,
        metavar="N",
        help="train on the first 10000-N test digits, evaluate on the last N",
    )
    m.add_argument(
        "--limit-train", type=_positive(int), default=None, metavar="K", help="first K train digits"
    )
    m.add_argument("--limit-test", type=_positive(int), default=None, metavar="K", help="first K test digits")
    m.add_argument("--download", action="store_true", help="download missing MNIST files into --data")
    m.add_argument("--augment", type=int, default=None, metavar="K", help="random shifts of up to K pixels")
    p.add_argument(
        "--amp",
        nargs="?",
        const="bf16",
        choices=tuple(AMP_DTYPES),
        default=None,
        help="autocast: bf16 (no value), or fp16 with a GradScaler",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available)")
    p.add_argument(
        "--backend", choices=("auto", "triton", "cpp", "torch"), default=None, help="default: auto"
    )
    p.add_argument("--seed", type=int, default=0, help="weights, shuffle and augmentation (default 0)")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="saved after every epoch (rank 0)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the summary here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
    return p
