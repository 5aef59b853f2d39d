"""Backend selection: one place, clear errors."""

import subprocess
import sys

import pytest
import torch

import resnet_fast
from resnet_fast import ops


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'cuddn'"):
        resnet_fast.set_backend("cuddn")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_unusable_backend_is_a_clear_error():
    with pytest.raises(resnet_fast.BackendUnavailable, match="triton"):
        resnet_fast.set_backend("triton")


def test_torch_backend_is_always_usable():
    resnet_fast.set_backend("torch")
    assert ops.backend_for(torch.device("cpu")) == "torch"
    assert resnet_fast.get_backend() == "torch"


def test_env_var_selects_the_backend(monkeypatch):
    monkeypatch.setenv("RESNET_FAST_BACKEND", "torch")
    assert ops.backend_for(torch.device("cpu")) == "torch"
    monkeypatch.setenv("RESNET_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        ops.get_backend()


def test_forcing_a_backend_that_cannot_run_on_the_device_raises():
    if not ops.backend.problem("triton", "cpu"):
        pytest.skip("triton runs on CPU here")
    ops.backend._override = "triton"  # as if set on a GPU machine, then used with CPU tensors
    with pytest.raises(resnet_fast.BackendUnavailable, match="cannot run on cpu"):
        resnet_fast.resnet18()(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("command", [["resnet-fast", "info"], [sys.executable, "-m", "resnet_fast", "info"]])
def test_info_command(command):
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "torch:" in out and "backends:" in out and "extension resnet_fast._C:" in out


def test_info_json():
    import json

    out = subprocess.run(["resnet-fast", "info", "--json"], capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert set(data["backends"]) == {"triton", "cpp", "torch"}
