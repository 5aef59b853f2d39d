import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; none is present on this machine")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine"))


@pytest.fixture(autouse=True, scope="session")
def _private_choice_caches(tmp_path_factory):
    """Per-layer path choices measured during the tests go to a temporary folder, not ~/.cache (the
    environment variable for the CLI and torchrun processes the tests start)."""
    from resnet_fast.ops import layer_choice

    root = tmp_path_factory.mktemp("layer_choice")
    os.environ["RESNET_FAST_CACHE"] = str(root)
    # Close calls stay with the path measured alone: tests compare one call's output with another's
    # bit for bit (a replay with its recording), which a close call settled between them would change.
    # The settling tests (tests/ops/test_layer_choice.py, test_conv_gemm.py) turn it on.
    layer_choice.SETTLE_IN_MODEL = False
    os.environ["RESNET_FAST_SETTLE"] = "0"
    layer_choice.CACHE = layer_choice.ChoiceCache(root / "cuda.json")
    layer_choice.CPU_CACHE = layer_choice.ChoiceCache(root / "cpu.json", device_type="cpu")


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Each test starts from the same seed and the default backend choice."""
    import resnet_fast

    torch.manual_seed(0)
    previous = os.environ.get("RESNET_FAST_BACKEND")
    yield
    resnet_fast.set_backend(None)
    if previous is None:
        os.environ.pop("RESNET_FAST_BACKEND", None)
    else:
        os.environ["RESNET_FAST_BACKEND"] = previous
