"""Per-layer Triton-vs-cuDNN choice: the decision logic and its disk cache, with a fake timer (no GPU)."""

import torch

from resnet_fast.ops import layer_choice


def _fake_timer(ms: dict[str, float]):
    def timer(fn, rounds):
        return ms[fn()]

    return timer


def test_measure_picks_the_faster_path_and_ties_go_to_cudnn():
    run = {"triton": lambda: "triton", "cudnn": lambda: "cudnn"}
    assert layer_choice.measure(run, _fake_timer({"triton": 1.0, "cudnn": 2.0})).path == "triton"
    assert layer_choice.measure(run, _fake_timer({"triton": 3.0, "cudnn": 2.0})).path == "cudnn"
    assert layer_choice.measure(run, _fake_timer({"triton": 2.0, "cudnn": 2.0})).path == "cudnn"


def test_choice_is_cached_on_disk_and_reused(tmp_path, monkeypatch):
    path = tmp_path / "choices.json"
    cache = layer_choice.ChoiceCache(path)
    timed = []

    def measure(run, timer=None):
        timed.append(1)
        return layer_choice.Choice("triton", 1.0, 2.0)

    monkeypatch.setattr(layer_choice, "measure", measure)
    key = layer_choice.conv_key(
        (8, 64, 56, 56), (64, 64, 3, 3), torch.float16, [1, 1], [1, 1], [1, 1], 1, True
    )
    assert layer_choice.choose(key, {}, cache) == "triton"
    assert layer_choice.choose(key, {}, cache) == "triton"
    assert len(timed) == 1  # measured once
    # A new process reads the file instead of measuring again.
    assert layer_choice.ChoiceCache(path).get(key) == layer_choice.Choice("triton", 1.0, 2.0)


def test_key_separates_what_changes_speed():
    base = dict(
        x_shape=(8, 64, 56, 56),
        w_shape=(64, 64, 3, 3),
        dtype=torch.float16,
        stride=[1, 1],
        padding=[1, 1],
        dilation=[1, 1],
        groups=1,
        has_residual=False,
    )
    keys = {layer_choice.conv_key(**base)}
    for change in (
        dict(x_shape=(16, 64, 56, 56)),
        dict(dtype=torch.bfloat16),
        dict(stride=[2, 2]),
        dict(groups=2),
    ):
        keys.add(layer_choice.conv_key(**{**base, **change}))
    assert len(keys) == 5


def test_unreadable_cache_file_means_measure_again(tmp_path):
    path = tmp_path / "choices.json"
    path.write_text("not json")
    assert layer_choice.ChoiceCache(path).get("anything") is None
