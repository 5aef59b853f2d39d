"""Image-folder data sets (`DIR/train/<class>/*`, `DIR/val/<class>/*`) with checks that name the file.

torchvision's ImageFolder does the listing; this module adds what a training run needs from it:
- both splits share the train split's class -> index map (torchvision maps each folder on its own, so a
  class missing from `val/` would silently shift every label after it);
- a missing split, a split without class folders, an empty class folder, or class folders that differ
  between the splits raise ImageFolderError naming the folder, before any training;
- an unreadable image raises ImageFolderError naming the file when it is loaded (checking every file up
  front would read the whole data set once more);
- `SeededTransform`: the random augmentation of sample i in epoch e is drawn from a generator seeded by
  (seed, e, i), so it does not depend on the number of processes, of loader workers, or on a resume.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

__all__ = ["IMG_EXTENSIONS", "ImageFolderError", "SeededTransform", "image_folders", "load_image"]

PathLike = str | os.PathLike[str]


class ImageFolderError(ValueError):
    """A data folder that cannot be trained on; the message names the file or folder."""


def load_image(path: str, mode: str = "RGB") -> Image.Image:
    """The image at `path` converted to PIL `mode` ('RGB' or 'L'); ImageFolderError naming it if unreadable."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)  # convert() decodes the whole file: truncation shows up here
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise ImageFolderError(f"{path}: not a readable image ({e})") from e


def _class_folders(split: Path) -> list[str]:
    if not split.is_dir():
        raise ImageFolderError(
            f"{split}: no such folder (expected DIR/train/<class>/* and DIR/val/<class>/*)"
        )
    classes = sorted(entry.name for entry in os.scandir(split) if entry.is_dir())
    if not classes:
        raise ImageFolderError(f"{split}: no class folders in it (expected {split}/<class>/<image files>)")
    for name in classes:
        folder = split / name
        if not any(_is_image(f) for _, _, files in os.walk(folder, followlinks=True) for f in files):
            raise ImageFolderError(
                f"{folder}: empty class folder (no {', '.join(IMG_EXTENSIONS)} files); "
                "remove it or add its images"
            )
    return classes


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


class _Folder(ImageFolder):
    """ImageFolder with a given class list (the train split's), so labels mean the same in both splits."""

    def __init__(self, root: Path, classes: list[str], mode: str) -> None:
        self._given_classes = classes
        super().__init__(str(root), loader=partial(load_image, mode=mode))

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._given_classes, {name: i for i, name in enumerate(self._given_classes)}


def image_folders(root: PathLike, in_channels: int = 3) -> tuple[ImageFolder, ImageFolder]:
    """(train, val) ImageFolder data sets of PIL images (no transform) under ROOT/train and ROOT/val.

    Images are converted to RGB (`in_channels=3`) or grayscale 'L' (`in_channels=1`). Raises
    ImageFolderError naming the folder for a missing split, no or empty class folders, or class folders
    that differ between the two splits.
    """
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels}")
    root = Path(root)
    train_classes = _class_folders(root / "train")
    val_classes = _class_folders(root / "val")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise ImageFolderError(
            f"{root}: train/ and val/ must hold the same class folders; only in train/: {only_train}, "
            f"only in val/: {only_val}"
        )
    mode = "L" if in_channels == 1 else "RGB"
    return _Folder(root / "train", train_classes, mode), _Folder(root / "val", train_classes, mode)


class SeededTransform(Dataset):
    """`dataset[i]` with `transform` applied under torch's RNG seeded by (seed, epoch, i).

    torchvision's random transforms draw from torch's global generator. Seeding it per sample makes
    an augmented sample a function of (seed, epoch, index) only: the same in a 1-process and an
    N-process run, with any number of loader workers, and after a resume. The caller's RNG state is
    restored afterwards. Call `set_epoch` before each epoch's loader iterator is created (workers get a
    copy of the data set then, so they must not be persistent).
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any], seed: int = 0) -> None:
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            # hash() of a tuple of ints is the same in every process (PYTHONHASHSEED only salts str/bytes).
            torch.manual_seed(hash((self.seed, self.epoch, index)) & (2**63 - 1))
            return self.transform(image), target
