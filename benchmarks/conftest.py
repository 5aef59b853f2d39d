"""pytest-benchmark suite: `pytest benchmarks --benchmark-only`.

The project's `python -m pytest` collects tests/ only (testpaths); here files named bench_*.py are
collected as test modules, so the suite never runs by accident with the unit tests.
"""

from __future__ import annotations

import pytest
import torch

import resnet_fast
from resnet_fast.tools import timing


def pytest_collect_file(parent, file_path):
    # Files named on the command line are collected by pytest itself already.
    if (
        file_path.name.startswith("bench_")
        and file_path.suffix == ".py"
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_addoption(parser):
    parser.addoption(
        "--bench-compile", action="store_true", help="bench_models: add torch.compile contenders"
    )


def pytest_benchmark_update_machine_info(config, machine_info):
    """The same machine description as `resnet-fast bench --json` (render_tables.py reads it)."""
    machine_info["resnet_fast"] = timing.machine_info(
        torch.device("cuda") if torch.cuda.is_available() else None
    )


@pytest.fixture(autouse=True)
def _reset_backend():
    torch.manual_seed(0)
    yield
    resnet_fast.set_backend(None)
