"""resnet_fast.explain / `resnet-fast info --model`: one row per conv with its input shape and path."""

import json
import subprocess

import torch

import resnet_fast
from resnet_fast.tools.explain import _block_tails


def test_explain_lists_every_conv_with_its_input_shape():
    model = resnet_fast.resnet50(num_classes=10)
    rows = resnet_fast.explain(model, (2, 3, 64, 64))
    assert len(rows) == 53
    first = rows[0]
    assert first["layer"] == "conv1" and first["input"] == [2, 3, 64, 64]
    by_name = {r["layer"]: r for r in rows}
    assert by_name["layer4.2.conv3"]["input"] == [2, 512, 2, 2]
    backend = resnet_fast.ops.backend_for(torch.device("cpu"))
    assert all(r["backend"] == backend for r in rows)
    assert model.training  # mode restored


def test_block_tails_are_the_residual_convs():
    tails = _block_tails(resnet_fast.resnet18())
    assert "layer1.0.conv2" in tails and "layer1.0.conv1" not in tails and len(tails) == 8
    assert "layer2.0.conv3" in _block_tails(resnet_fast.resnet50())


def test_info_model_command():
    out = subprocess.run(
        ["resnet-fast", "info", "--json", "--model", "resnet18", "--input-shape", "1", "3", "32", "32"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert len(json.loads(out)["layers"]) == 20
