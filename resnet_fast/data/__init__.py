"""Data sets: MNIST (IDX parsing, checksummed download, preloaded DataLoaders)."""

from .mnist import (
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
