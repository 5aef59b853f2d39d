"""MNIST data layer: IDX parsing, file lookup, checksums, download (no network), splits and loaders.

Uses the official t10k files from ../shared/data/mnist beside the repository (or $RESNET_FAST_MNIST_DIR);
the tests that need them are skipped with a reason where they are absent.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from resnet_fast.data import (
    FILES,
    MD5,
    MEAN,
    MIRRORS,
    STD,
    download_mnist,
    find_mnist_files,
    load_mnist,
    md5sum,
    mnist_loaders,
    mnist_train_test,
    read_idx,
    to_float,
)
from resnet_fast.data import mnist as mnist_module

REPO = Path(__file__).resolve().parents[2]
TEST_GZ = [f"{name}.gz" for name in FILES["test"]]


def _real_dir() -> Path:
    env = os.environ.get("RESNET_FAST_MNIST_DIR")
    return Path(env) if env else (REPO / ".." / "shared" / "data" / "mnist").resolve()


@pytest.fixture(scope="module")
def real_dir() -> Path:
    folder = _real_dir()
    if not all((folder / name).is_file() for name in TEST_GZ):
        pytest.skip(
            f"official MNIST t10k .gz files not in {folder} (set $RESNET_FAST_MNIST_DIR to their folder)"
        )
    return folder


@pytest.fixture(scope="module")
def real(real_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return load_mnist(real_dir, "test")


def write_idx(path: Path, array: np.ndarray, compress: bool = False, extra: bytes = b"") -> Path:
    """Write a uint8 array as IDX (optionally gzip); `extra` is appended to the raw bytes."""
    data = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data += array.astype(np.uint8).tobytes() + extra
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def copy_test_files(real_dir: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in TEST_GZ:
        shutil.copyfile(real_dir / name, dest / name)
    return dest


def fake_mnist(folder: Path, split: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Small synthetic raw IDX files for `split` in `folder`."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / FILES[split][0], images)
    write_idx(folder / FILES[split][1], labels)
    return images, labels


# ----------------------------------------------------------------------------------------------- read_idx


def test_real_files_parse(real_dir: Path) -> None:
    images = read_idx(real_dir / TEST_GZ[0], ndim=3)
    labels = read_idx(real_dir / TEST_GZ[1], ndim=1)
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.uint8
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    counts = torch.bincount(labels.long(), minlength=10)
    # The official t10k histogram: every class 892..1135 digits.
    assert counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # Real digits: dark background, some fully-inked pixels.
    assert int(images[:, 0, 0].max()) == 0 and int(images.max()) == 255


def test_magic_numbers_of_real_files(real_dir: Path) -> None:
    assert gzip.open(real_dir / TEST_GZ[0]).read(4) == bytes.fromhex("00000803")
    assert gzip.open(real_dir / TEST_GZ[1]).read(4) == bytes.fromhex("00000801")
    with pytest.raises(ValueError, match=r"bad magic number 0x00000801: expected 0x00000803"):
        read_idx(real_dir / TEST_GZ[1], ndim=3)


def test_raw_equals_gzip_detected_by_content(real_dir: Path, tmp_path: Path) -> None:
    gz = real_dir / TEST_GZ[0]
    raw = tmp_path / "images.gz"  # uncompressed despite the name: detection is by magic bytes
    raw.write_bytes(gzip.decompress(gz.read_bytes()))
    assert torch.equal(read_idx(raw), read_idx(gz))


def test_small_roundtrip_and_generic_ndim(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    for compress in (False, True):
        path = write_idx(tmp_path / f"x{compress}", array, compress=compress)
        assert torch.equal(read_idx(path), torch.from_numpy(array))
    assert read_idx(write_idx(tmp_path / "empty", np.zeros((0, 28, 28), np.uint8))).shape == (0, 28, 28)


@pytest.mark.parametrize("compress", [False, True])
def test_corrupted_files_raise_clear_errors(tmp_path: Path, compress: bool) -> None:
    good = write_idx(tmp_path / "good", np.ones((3, 4), np.uint8)).read_bytes()

    def bad(name: str, data: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(gzip.compress(data) if compress else data)
        return path

    cases = {
        "magic": (b"\x01" + good[1:], r"bad magic number 0x01000802"),
        "dtype": (good[:2] + b"\x0d" + good[3:], r"unsupported IDX dtype 0x0d"),
        "truncated": (good[:-1], r"truncated: expected 12 bytes got 11"),
        "header": (good[:9], r"truncated header: expected 12 bytes got 9"),
        "tiny": (good[:2], r"truncated"),
        "trailing": (good + b"\x00\x00", r"2 trailing bytes"),
    }
    for name, (data, message) in cases.items():
        path = bad(name, data)
        with pytest.raises(ValueError, match=message) as info:
            read_idx(path)
        assert str(path) in str(info.value)


def test_truncated_gzip_stream(real_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.gz"
    path.write_bytes((real_dir / TEST_GZ[1]).read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupted gzip stream") as info:
        read_idx(path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------------------- finding files


def test_torchvision_layout_and_flat_folder_agree(real_dir: Path, real, tmp_path: Path) -> None:
    copy_test_files(real_dir, tmp_path / "tv" / "MNIST" / "raw")
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in TEST_GZ:  # the flat folder holds uncompressed files
        (flat / name.removesuffix(".gz")).write_bytes(gzip.decompress((real_dir / name).read_bytes()))

    assert find_mnist_files(tmp_path / "tv", "test") == tuple(tmp_path / "tv/MNIST/raw" / n for n in TEST_GZ)
    assert find_mnist_files(flat, "test") == tuple(flat / n for n in FILES["test"])
    for root in (tmp_path / "tv", tmp_path / "tv" / "MNIST", flat):
        images, labels = load_mnist(root, "test")
        assert torch.equal(images, real[0]) and torch.equal(labels, real[1])


def test_missing_files_name_files_and_folders(tmp_path: Path) -> None:
    # Only the images: a half pair does not count.
    write_idx(tmp_path / FILES["test"][0], np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path, "test")
    message = str(info.value)
    for text in (*FILES["test"], str(tmp_path / "MNIST" / "raw"), str(tmp_path), "download=True"):
        assert text in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_mnist_files(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="split"):
        find_mnist_files(tmp_path, "val")  # type: ignore[arg-type]


def test_load_checks_shapes_and_counts(tmp_path: Path) -> None:
    write_idx(tmp_path / FILES["test"][0], np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / FILES["test"][1], np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="3 images but .* 2 labels"):
        load_mnist(tmp_path, "test")
    write_idx(tmp_path / FILES["test"][1], np.array([0, 1, 10], np.uint8))
    with pytest.raises(ValueError, match="label 10 out of range"):
        load_mnist(tmp_path, "test")


# ---------------------------------------------------------------------------------------------- checksums


def test_md5_verification(real_dir: Path, tmp_path: Path) -> None:
    for name in TEST_GZ:
        assert md5sum(real_dir / name) == MD5[name]
    # Same digits, recompressed: a valid file that is not the published one.
    folder = copy_test_files(real_dir, tmp_path)
    labels = folder / TEST_GZ[1]
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes()), mtime=0))
    with pytest.raises(ValueError, match=r"md5 mismatch: expected ec29112dd5afa0611ce80d1b7f02629c") as info:
        load_mnist(folder, "test")
    assert str(labels) in str(info.value)
    assert load_mnist(folder, "test", verify=False)[1].shape == (10000,)


class FakeNet:
    """Stands in for urlopen: serves `files` (name -> bytes) from the mirrors in `up`, records URLs."""

    def __init__(self, files: dict[str, bytes], up: tuple[str, ...] = MIRRORS) -> None:
        self.files, self.up, self.urls = files, up, []

    def __call__(self, request, timeout=None):
        url = request.full_url
        self.urls.append(url)
        mirror, name = url.rsplit("/", 1)
        if mirror + "/" not in self.up:
            raise urllib.error.URLError("no network")
        return io.BytesIO(self.files[name])


def test_download_saves_verified_files(real_dir: Path, real, tmp_path: Path, monkeypatch) -> None:
    # The first mirror is down: the second one serves.
    net = FakeNet({n: (real_dir / n).read_bytes() for n in TEST_GZ}, up=MIRRORS[1:])
    monkeypatch.setattr(mnist_module, "urlopen", net)
    paths = download_mnist(tmp_path, "test")
    raw = tmp_path / "MNIST" / "raw"
    assert paths == tuple(raw / n for n in TEST_GZ)
    assert sorted(p.name for p in raw.iterdir()) == sorted(TEST_GZ)  # no temporary files left
    assert all(md5sum(p) == MD5[p.name] for p in paths)
    assert net.urls == [m + n for n in TEST_GZ for m in MIRRORS]
    # Present and correct: nothing is fetched again.
    download_mnist(tmp_path, "test")
    assert len(net.urls) == 4
    assert torch.equal(load_mnist(tmp_path, "test")[0], real[0])


def test_download_rejects_wrong_bytes(real_dir: Path, tmp_path: Path, monkeypatch) -> None:
    tampered = bytearray((real_dir / TEST_GZ[0]).read_bytes())
    tampered[-100] ^= 0xFF
    monkeypatch.setattr(mnist_module, "urlopen", FakeNet({TEST_GZ[0]: bytes(tampered)}))
    with pytest.raises(ValueError, match=r"md5 mismatch for https://.*t10k-images-idx3-ubyte.gz"):
        download_mnist(tmp_path, "test")
    assert list((tmp_path / "MNIST" / "raw").iterdir()) == []


def test_load_without_network_says_how_to_get_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(mnist_module, "urlopen", FakeNet({}, up=()))
    with pytest.raises(
        FileNotFoundError, match=r"t10k-images-idx3-ubyte.*Downloading them failed too.*no network"
    ):
        load_mnist(tmp_path, "test", download=True)
    with pytest.raises(FileNotFoundError, match=r"holdout=N"):
        mnist_loaders(tmp_path, download=True)


def test_load_downloads_when_missing(real_dir: Path, real, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(mnist_module, "urlopen", FakeNet({n: (real_dir / n).read_bytes() for n in TEST_GZ}))
    assert torch.equal(load_mnist(tmp_path, "test", download=True)[1], real[1])


# ----------------------------------------------------------------------------------- splits and loaders


def test_holdout_split(real_dir: Path, real) -> None:
    (x_train, y_train), (x_test, y_test) = mnist_train_test(real_dir, holdout=2000)
    assert len(x_train) == len(y_train) == 8000 and len(x_test) == len(y_test) == 2000
    # First 8000 / last 2000, in order: disjoint index ranges covering the test set exactly.
    assert torch.equal(torch.cat([x_train, x_test]), real[0]) and torch.equal(
        torch.cat([y_train, y_test]), real[1]
    )
    train_rows = {bytes(row) for row in x_train.flatten(1).numpy()}
    assert not any(bytes(row) in train_rows for row in x_test.flatten(1).numpy())

    (x_train, _), (x_test, _) = mnist_train_test(real_dir, holdout=2000, limit_train=300, limit_test=50)
    assert torch.equal(x_train, real[0][:300]) and torch.equal(x_test, real[0][8000:8050])
    for bad in ({"holdout": 0}, {"holdout": 10000}, {"holdout": 2000, "limit_train": 8001}):
        with pytest.raises(ValueError):
            mnist_train_test(real_dir, **bad)


def test_without_train_files_holdout_is_required(real_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"(?s)train-images-idx3-ubyte.*pass holdout=N"):
        mnist_train_test(real_dir)


def test_train_files_used_when_present(real_dir: Path, real, tmp_path: Path) -> None:
    copy_test_files(real_dir, tmp_path)
    images, labels = fake_mnist(tmp_path, "train", 20, seed=0)
    (x_train, y_train), (x_test, _) = mnist_train_test(tmp_path)
    assert torch.equal(x_train, torch.from_numpy(images)) and y_train.tolist() == labels.tolist()
    assert torch.equal(x_test, real[0])
    # holdout means the same everywhere: it splits the test set even where train files exist.
    (x_train, _), (x_test, _) = mnist_train_test(tmp_path, holdout=100)
    assert torch.equal(x_train, real[0][:9900]) and torch.equal(x_test, real[0][9900:])


def test_loaders_normalise_and_shuffle(real_dir: Path, real) -> None:
    train, test = mnist_loaders(real_dir, 64, holdout=2000, limit_train=1000, limit_test=300, seed=1)
    assert len(train) == 16 and len(test) == 5
    x, y = next(iter(test))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (real[0][8000:8064].float() / 255 - MEAN) / STD
    torch.testing.assert_close(x[:, 0], expected)
    assert torch.equal(y, real[1][8000:8064])
    assert torch.cat([b[0] for b in test]).shape == (300, 1, 28, 28)
    # MNIST's constants make all 10,000 test digits roughly zero-mean, unit-std.
    full = to_float(real[0])
    assert abs(float(full.mean())) < 0.02 and abs(float(full.std()) - 1) < 0.02

    # Train: shuffled, every digit once per epoch, reproducible from the seed, reshuffled each epoch.
    def epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*loader, strict=True)
        return torch.cat(xs), torch.cat(ys)

    x1, y1 = epoch(train)
    expected = to_float(real[0][:1000])
    assert not torch.equal(y1, real[1][:1000])
    assert sorted(y1.tolist()) == sorted(real[1][:1000].tolist())
    assert torch.equal(x1.sum((1, 2, 3)).sort().values, expected.sum((1, 2, 3)).sort().values)
    x2, _ = epoch(train)
    assert not torch.equal(x1, x2)

    same, _ = mnist_loaders(real_dir, 64, 2000, 1000, 300, seed=1)
    other, _ = mnist_loaders(real_dir, 64, 2000, 1000, 300, seed=2)
    assert torch.equal(epoch(same)[0], x1) and torch.equal(epoch(same)[0], x2)
    assert not torch.equal(epoch(other)[0], x1)


def test_loader_options(real_dir: Path, real) -> None:
    train, test = mnist_loaders(
        real_dir, 100, holdout=500, limit_train=250, normalize=False, test_batch_size=500, drop_last=True
    )
    assert [len(b[0]) for b in train] == [100, 100]
    ((x, _),) = list(test)
    assert x.shape == (500, 1, 28, 28) and float(x.min()) == 0 and float(x.max()) == 1
    torch.testing.assert_close(x, to_float(real[0][9500:], normalize=False))
