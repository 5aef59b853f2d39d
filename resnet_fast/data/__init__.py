"""Data sets: MNIST (IDX parsing, checksummed download, preloaded DataLoaders)."""

from . import mnist
from .mnist import *  # noqa: F403

__all__ = mnist.__all__
