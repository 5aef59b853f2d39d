"""MNIST: IDX parsing, file lookup, checksummed download, and preloaded DataLoaders.

Files are looked up in torchvision's layout (ROOT/MNIST/raw/) or in a flat folder, gzip-compressed or
not. Everything is preloaded into tensors: MNIST is small (60k + 10k digits of 28x28 bytes), so a
TensorDataset indexed a whole batch at a time is much faster than per-sample Dataset items.

Holdout: where only the 10,000 test digits are at hand (as on the CI machines), `holdout=N` trains on
the first 10000-N test digits and evaluates on the last N. It is never chosen silently: without the
training files and without `holdout`, loading raises and says so.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import tempfile
import zlib
from pathlib import Path
from typing import Literal
from urllib.request import Request, urlopen

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    Sampler,
    SequentialSampler,
    TensorDataset,
)

__all__ = [
    "FILES",
    "MD5",
    "MEAN",
    "MIRRORS",
    "STD",
    "download_mnist",
    "find_mnist_files",
    "load_mnist",
    "md5sum",
    "mnist_loaders",
    "mnist_train_test",
    "read_idx",
    "to_float",
]

Split = Literal["train", "test"]
PathLike = str | os.PathLike[str]

# (images, labels) file names without the .gz suffix.
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# md5 of the published .gz files (the same ones torchvision checks).
MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# The mirrors torchvision uses, in its order.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# Mean and std of the MNIST training pixels scaled to [0, 1] (the usual constants).
MEAN = 0.1307
STD = 0.3081

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UINT8 = 0x08


# --------------------------------------------------------------------------------------------- IDX files


def read_idx(path: PathLike, ndim: int | None = None) -> torch.Tensor:
    """Read an IDX file (gzip-compressed or raw) into a uint8 tensor of its declared shape.

    `ndim`, when given, is the number of dimensions the file must declare (3 for images, magic
    0x00000803; 1 for labels, magic 0x00000801). Raises ValueError naming the file on a bad magic
    number, an unsupported element type, or a payload that is shorter or longer than the dims say.
    """
    path = Path(path)
    data = path.read_bytes()
    # Detect compression by content, not by name: files get renamed and extracted.
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:
            raise ValueError(f"{path}: corrupted gzip stream ({e})") from e

    if len(data) < 4:
        raise ValueError(f"{path}: truncated: {len(data)} bytes, shorter than the 4-byte IDX magic number")
    magic = int.from_bytes(data[:4], "big")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{path}: bad magic number 0x{magic:08x}: not an IDX file (must start with 2 zero bytes)"
        )
    if data[2] != _IDX_UINT8:
        raise ValueError(
            f"{path}: unsupported IDX dtype 0x{data[2]:02x} (magic 0x{magic:08x}); only uint8 (0x08)"
        )
    if ndim is not None and data[3] != ndim:
        raise ValueError(
            f"{path}: bad magic number 0x{magic:08x}: expected 0x{0x800 | ndim:08x} ({ndim}-d), "
            f"the file declares {data[3]} dimensions"
        )

    header = 4 + 4 * data[3]
    if len(data) < header:
        raise ValueError(f"{path}: truncated header: expected {header} bytes got {len(data)}")
    dims = tuple(int.from_bytes(data[i : i + 4], "big") for i in range(4, header, 4))
    expected, got = math.prod(dims), len(data) - header
    if got < expected:
        raise ValueError(f"{path}: truncated: expected {expected} bytes got {got} (the data of dims {dims})")
    if got > expected:
        raise ValueError(
            f"{path}: {got - expected} trailing bytes after the {expected} bytes that dims {dims} need"
        )

    # bytearray makes the buffer writable, so torch does not warn and owns its memory.
    array = np.frombuffer(bytearray(data[header:]), dtype=np.uint8).reshape(dims)
    return torch.from_numpy(array)


def md5sum(path: PathLike) -> str:
    """Hex md5 of a file."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------- finding the files


def _search_dirs(root: Path) -> list[Path]:
    # torchvision's layout first, then ROOT pointing at .../MNIST, then a flat folder.
    return [root / "MNIST" / "raw", root / "raw", root]


def _check_split(split: str) -> None:
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")


def find_mnist_files(root: PathLike, split: Split = "train") -> tuple[Path, Path]:
    """Paths of (images, labels) for `split` under `root`.

    Searches ROOT/MNIST/raw (torchvision's layout), ROOT/raw, then ROOT itself; both files must be in
    the same folder. In each folder the .gz file is preferred (it can be checked against the published
    md5), then the uncompressed one. Raises FileNotFoundError naming the files and the folders searched.
    """
    _check_split(split)
    root = Path(root)
    dirs = _search_dirs(root)
    for folder in dirs:
        found = []
        for name in FILES[split]:
            candidates = [folder / f"{name}.gz", folder / name]
            found.append(next((p for p in candidates if p.is_file()), None))
        if all(found):
            return found[0], found[1]

    images, labels = FILES[split]
    where = ", ".join(str(d) for d in dirs)
    missing_root = "" if root.is_dir() else f" ({root} does not exist)"
    raise FileNotFoundError(
        f"MNIST {split} files not found: need {images}[.gz] and {labels}[.gz] together in one of: "
        f"{where}{missing_root}. Get them with load_mnist(root, split={split!r}, download=True) or "
        f"resnet_fast.data.download_mnist(root, {split!r}) (saves to {dirs[0]}), or copy the .gz files "
        f"from {MIRRORS[0]} into one of those folders."
    )


# ---------------------------------------------------------------------------------------------- download


def _fetch(name: str) -> tuple[str, bytes]:
    """(url, bytes) of `name` from the first mirror that answers; ConnectionError if none does."""
    errors = []
    for mirror in MIRRORS:
        url = mirror + name
        try:
            # Some servers refuse urllib's default User-Agent; torchvision sends its own too.
            with urlopen(Request(url, headers={"User-Agent": "resnet_fast"}), timeout=60) as response:
                return url, response.read()
        except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts, resets
            errors.append(f"{url}: {e}")
    raise ConnectionError(f"could not download {name}: " + "; ".join(errors))


def download_mnist(root: PathLike, split: Split = "train") -> tuple[Path, Path]:
    """Download the (images, labels) .gz files of `split` into ROOT/MNIST/raw/ and return their paths.

    Files already there with the right md5 are kept. Each download is checked against the published
    md5 before it is written (to a temporary file, then renamed), so a bad download never lands under
    the real name. Raises ValueError on an md5 mismatch and ConnectionError when no mirror answers.
    """
    _check_split(split)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in FILES[split]:
        gz = f"{name}.gz"
        target = raw / gz
        paths.append(target)
        if target.is_file() and md5sum(target) == MD5[gz]:
            continue
        url, data = _fetch(gz)
        got = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if got != MD5[gz]:
            raise ValueError(f"md5 mismatch for {url}: expected {MD5[gz]} got {got}; nothing was saved")
        # Temporary name in the same folder, so the rename is atomic.
        fd, tmp = tempfile.mkstemp(dir=raw, prefix=f".{gz}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return paths[0], paths[1]


# ------------------------------------------------------------------------------------------------ loading


def load_mnist(
    root: PathLike, split: Split = "test", download: bool = False, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of `split`.

    Labels come back as int64, what cross_entropy and indexing want. With `download=True` missing files
    are fetched into ROOT/MNIST/raw/. With `verify=True` (the default; md5 of 11 MB costs ~20 ms) a
    file named like a published .gz must match its md5, which catches corrupted or substituted
    downloads; uncompressed files have no published md5 and rely on read_idx's structural checks.
    Raises FileNotFoundError (saying how to get the files) when they are missing and cannot be downloaded.
    """
    try:
        images_path, labels_path = find_mnist_files(root, split)
    except FileNotFoundError as missing:
        if not download:
            raise
        try:
            download_mnist(root, split)
        except ConnectionError as e:
            raise FileNotFoundError(f"{missing} Downloading them failed too: {e}") from e
        images_path, labels_path = find_mnist_files(root, split)

    if verify:
        for path in (images_path, labels_path):
            if path.name in MD5 and (got := md5sum(path)) != MD5[path.name]:
                raise ValueError(
                    f"{path}: md5 mismatch: expected {MD5[path.name]} got {got}; the file is corrupted or not "
                    "the published MNIST file (download it again, or pass verify=False to skip this check)"
                )

    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: images are {tuple(images.shape[1:])}, expected 28x28")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if len(labels) and int(labels.max()) > 9:
        raise ValueError(f"{labels_path}: label {int(labels.max())} out of range 0..9")
    return images, labels.long()


def _first(
    x: torch.Tensor, y: torch.Tensor, limit: int | None, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if limit is None:
        return x, y
    if not 1 <= limit <= len(x):
        raise ValueError(f"{what} must be in 1..{len(x)} (the digits available), got {limit}")
    return x[:limit], y[:limit]


def mnist_train_test(
    root: PathLike,
    holdout: int | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    download: bool = False,
    verify: bool = True,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train images, labels), (test images, labels)), images uint8 [N, 28, 28], labels int64.

    - `holdout=N`: split the official test set, train on its first 10000-N digits and evaluate on its
      last N. The training files are not used even where present, so a holdout run means the same
      thing on every machine.
    - `holdout=None`: train on the training files, evaluate on the test files. Raises
      FileNotFoundError telling to pass `holdout` where the training files are missing.
    `limit_train` / `limit_test` then keep the first K digits of each part.
    """
    if holdout is None:
        try:
            train = load_mnist(root, "train", download=download, verify=verify)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{e}\nWithout the training files pass holdout=N to train on the first 10000-N test digits "
                "and evaluate on the last N (e.g. holdout=2000)."
            ) from e
        test = load_mnist(root, "test", download=download, verify=verify)
    else:
        images, labels = load_mnist(root, "test", download=download, verify=verify)
        if not 1 <= holdout < len(images):
            raise ValueError(
                f"holdout must be in 1..{len(images) - 1} (the test set has {len(images)}), got {holdout}"
            )
        cut = len(images) - holdout
        train, test = (images[:cut], labels[:cut]), (images[cut:], labels[cut:])
    return _first(*train, limit_train, "limit_train"), _first(*test, limit_test, "limit_test")


def to_float(images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [0, 1], then (x - MEAN) / STD if `normalize`."""
    x = images.unsqueeze(1).float().div_(255)
    return x.sub_(MEAN).div_(STD) if normalize else x


def _loader(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, sampler: Sampler[int], drop_last: bool
) -> DataLoader:
    # The sampler yields whole batches of indices and TensorDataset gathers them with one fancy-index:
    # no per-sample __getitem__ and no collate, which dominate the cost of small images otherwise.
    batches = BatchSampler(sampler, batch_size, drop_last=drop_last)
    return DataLoader(TensorDataset(x, y), sampler=batches, batch_size=None)


def mnist_loaders(
    root: PathLike,
    batch_size: int = 128,
    holdout: int | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    normalize: bool = True,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    test_batch_size: int | None = None,
    drop_last: bool = False,
    download: bool = False,
    verify: bool = True,
) -> tuple[DataLoader, DataLoader]:
    """(train, test) DataLoaders of (float32 images [B, 1, 28, 28], int64 labels [B]) preloaded on `device`.

    The data and the holdout / limit semantics are those of `mnist_train_test`. The train loader
    shuffles with a generator seeded by `seed` (the same seed gives the same order, epoch by epoch);
    the test loader keeps file order. `drop_last` applies to the train loader (BatchNorm in training
    mode fails on a final batch of one). `test_batch_size` defaults to `batch_size`.
    """
    (x_train, y_train), (x_test, y_test) = mnist_train_test(
        root, holdout, limit_train, limit_test, download=download, verify=verify
    )
    device = torch.device(device)
    x_train, x_test = to_float(x_train, normalize).to(device), to_float(x_test, normalize).to(device)
    y_train, y_test = y_train.to(device), y_test.to(device)

    generator = torch.Generator().manual_seed(seed)
    train = _loader(
        x_train, y_train, batch_size, RandomSampler(range(len(x_train)), generator=generator), drop_last
    )
    test = _loader(
        x_test, y_test, test_batch_size or batch_size, SequentialSampler(range(len(x_test))), False
    )
    return train, test
