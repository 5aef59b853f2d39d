"""Per-layer path choice (Triton vs cuDNN on CUDA, oneDNN vs our GEMM and Winograd kernels on CPU): the decision logic and
its disk cache, with a fake timer (no GPU)."""

import pytest
import torch

from resnet_fast import _ext
from resnet_fast.ops import layer_choice


def _fake_timer(ms: dict[str, float]):
    def timer(fn):
        return ms[fn()]

    return timer


@pytest.fixture(autouse=True)
def _fresh_process(monkeypatch):
    """Each test starts as a new process would: no path ran yet, not capturing."""
    monkeypatch.setattr(layer_choice, "_RAN", set())
    monkeypatch.setattr(layer_choice, "_capturing", lambda: False)


def test_measure_picks_the_faster_path_and_ties_go_to_cudnn():
    run = {"triton": lambda: "triton", "cudnn": lambda: "cudnn"}
    assert layer_choice.measure(run, _fake_timer({"triton": 1.0, "cudnn": 2.0})).path == "triton"
    assert layer_choice.measure(run, _fake_timer({"triton": 3.0, "cudnn": 2.0})).path == "cudnn"
    assert layer_choice.measure(run, _fake_timer({"triton": 2.0, "cudnn": 2.0})).path == "cudnn"


def test_choice_is_cached_on_disk_and_reused(tmp_path, monkeypatch):
    path = tmp_path / "choices.json"
    cache = layer_choice.ChoiceCache(path)
    timed = []

    def measure(run, timer=None):  # noqa: ARG001
        timed.append(1)
        return layer_choice.Choice("triton", {"triton": 1.0, "cudnn": 2.0})

    monkeypatch.setattr(layer_choice, "measure", measure)
    key = layer_choice.conv_key(
        (8, 64, 56, 56), (64, 64, 3, 3), torch.float16, [1, 1], [1, 1], [1, 1], 1, True
    )
    assert layer_choice.choose(key, {}, cache) == "triton"
    assert layer_choice.choose(key, {}, cache) == "triton"
    assert len(timed) == 1  # measured once
    # A new process reads the file instead of measuring again.
    assert layer_choice.ChoiceCache(path).get(key) == layer_choice.Choice(
        "triton", {"triton": 1.0, "cudnn": 2.0}
    )


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
        dict(x_shape=(8, 64, 28, 28)),
        dict(dtype=torch.bfloat16),
        dict(stride=[2, 2]),
        dict(groups=2),
    ):
        keys.add(layer_choice.conv_key(**{**base, **change}))
    assert len(keys) == 6
    # Batch sizes in one power-of-two bucket share a key (and a measurement).
    assert layer_choice.conv_key(**{**base, "x_shape": (5, 64, 56, 56)}) == layer_choice.conv_key(**base)
    assert layer_choice.conv_key(**{**base, "x_shape": (9, 64, 56, 56)}) != layer_choice.conv_key(**base)
    assert [layer_choice.batch_bucket(n) for n in (1, 2, 3, 8, 9, 256)] == [1, 2, 4, 8, 16, 256]


def test_unreadable_cache_file_means_measure_again(tmp_path):
    path = tmp_path / "choices.json"
    path.write_text("not json")
    assert layer_choice.ChoiceCache(path).get("anything") is None


class _FakeEvent:
    """torch.cuda.Event stand-in: its time is the number of fn() calls made so far (fake ms)."""

    calls = 0

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = _FakeEvent.calls

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return float(end.t - self.t)


def test_timer_runs_many_launches_per_event_pair(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    _FakeEvent.calls = 0

    def fn():
        _FakeEvent.calls += 1

    assert layer_choice.cuda_timer(fn) == 1.0  # per call
    assert _FakeEvent.calls == layer_choice.LAUNCHES >= 10


def test_measure_interleaves_rounds_and_takes_medians():
    order, ms = [], {"triton": iter([9.0, 1.0, 1.0, 1.0, 9.0]), "cudnn": iter([2.0] * 5)}

    def timer(fn):
        name = fn()
        order.append(name)
        return next(ms[name])

    choice = layer_choice.measure({"triton": lambda: "triton", "cudnn": lambda: "cudnn"}, timer)
    assert order == ["triton", "cudnn"] * layer_choice.ROUNDS  # interleaved, one warm-up call each before
    assert choice == layer_choice.Choice(
        "triton", {"triton": 1.0, "cudnn": 2.0}
    )  # medians: two outliers of 9 do not decide


def test_capture_neither_measures_nor_caches_and_needs_a_warm_path(tmp_path, monkeypatch):
    cache = layer_choice.ChoiceCache(tmp_path / "choices.json")
    cache.put("known", layer_choice.Choice("triton", {"triton": 1.0, "cudnn": 2.0}))  # as if read from disk
    measured = []
    monkeypatch.setattr(layer_choice, "measure", lambda run, timer=None: measured.append(1))
    monkeypatch.setattr(layer_choice, "_capturing", lambda: True)
    # Unknown key: cuDNN, nothing measured or cached.
    assert layer_choice.choose("unknown", {}, cache) == "cudnn"
    assert cache.get("unknown") is None and not measured
    # Known "triton" from disk, but not run in this process yet (its autotuner is untuned): cuDNN.
    assert layer_choice.choose("known", {}, cache) == "cudnn"
    # Once it ran outside capture, the capture replays the choice.
    monkeypatch.setattr(layer_choice, "_capturing", lambda: False)
    assert layer_choice.choose("known", {}, cache) == "triton"
    monkeypatch.setattr(layer_choice, "_capturing", lambda: True)
    assert layer_choice.choose("known", {}, cache) == "triton"
    assert not measured


def test_cpu_choice_measures_once_with_ties_to_onednn(tmp_path, monkeypatch):
    cache = layer_choice.ChoiceCache(tmp_path / "cpu.json", device_type="cpu")
    calls = {"onednn": 0, "gemm": 0}
    # Within CPU_DECISIVE of each other: not decisive, every round runs.
    monkeypatch.setattr(
        layer_choice, "cpu_timer", _fake_timer({"onednn": 1.0, "gemm": 1.1, "winograd": 0.95})
    )

    def path(name):
        def run():
            calls[name] += 1
            return name

        return run

    run = {"onednn": path("onednn"), "gemm": path("gemm")}
    key = layer_choice.conv_key(
        (8, 64, 56, 56), (256, 64, 1, 1), torch.float32, [1, 1], [0, 0], [1, 1], 1, False, "cpu"
    )
    chosen = layer_choice.choose_cpu(key, run, cache)
    per_path = 1 + layer_choice.CPU_ROUNDS * layer_choice.CPU_CALLS  # a warm-up call, then the samples
    assert calls == {"onednn": per_path, "gemm": per_path}
    assert layer_choice.choose_cpu(key, run, cache) == chosen  # cached: not measured again
    assert calls["onednn"] == per_path
    assert (
        layer_choice.ChoiceCache(tmp_path / "cpu.json", device_type="cpu").get(key).path == chosen
    )  # on disk
    # Equal medians go to the library kernel; one candidate is taken unmeasured.
    tie = layer_choice.measure(
        {"gemm": lambda: "gemm", "onednn": lambda: "onednn"},
        _fake_timer({"gemm": 2.0, "onednn": 2.0}),
        "onednn",
    )
    assert tie.path == "onednn"
    assert layer_choice.choose_cpu("other", {"onednn": lambda: 1 / 0}, cache) == "onednn"
    # A choice made among other candidates (an older version's) is measured again.
    run["winograd"] = path("winograd")
    calls["winograd"] = 0
    layer_choice.choose_cpu(key, run, cache)
    assert calls["winograd"] == per_path and set(cache.get(key).ms) == {"onednn", "gemm", "winograd"}


def test_cpu_choice_stops_early_when_one_path_is_decisively_faster():
    samples = {"onednn": [], "gemm": []}

    def timer(fn):
        name = fn()
        samples[name].append(1)
        return {"onednn": 2.0, "gemm": 1.0}[name]

    run = {"onednn": lambda: "onednn", "gemm": lambda: "gemm"}
    choice = layer_choice.measure(run, timer, "onednn", 3, decisive=1.3)
    assert choice.path == "gemm" and samples == {"onednn": [1], "gemm": [1]}  # one round only
    close = lambda fn: {"onednn": 1.2, "gemm": 1.0}[fn()]  # noqa: E731
    assert layer_choice.measure(run, close, "onednn", 3, decisive=1.3).path == "gemm"
    samples = {"onednn": [], "gemm": []}
    layer_choice.measure(run, lambda fn: (samples[fn()].append(1), 1.0)[1], "onednn", 3, decisive=1.3)
    assert samples == {"onednn": [1] * 3, "gemm": [1] * 3}  # not decisive: all rounds


def test_cpu_key_and_file_name_the_machine():
    key = layer_choice.conv_key(
        (8, 64, 56, 56), (64, 64, 1, 1), torch.float32, [1, 1], [0, 0], [1, 1], 1, False, "cpu"
    )
    assert f"threads{torch.get_num_threads()}" in key and "tf32" not in key
    name = layer_choice.cache_file("cpu").name
    assert name.startswith("layer_choice-cpu") and f"torch{torch.__version__.split('+')[0]}" in name
    assert name.endswith(f"-k{layer_choice.KERNELS_REVISION}.json")  # our kernels' revision
    assert "family" in layer_choice.cpu_name()  # generations of one model name are told apart


def test_before_runs_untimed_ahead_of_each_sample():
    """measure(before=...) calls before(path) ahead of every timed sample, outside the timer."""
    events = []

    def timer(fn):
        events.append(("sample", fn()))
        return 1.0

    run = {"onednn": lambda: "onednn", "gemm": lambda: "gemm"}
    layer_choice.measure(run, timer, "onednn", rounds=2, before=lambda path: events.append(("before", path)))
    assert events == [("before", "onednn"), ("sample", "onednn"), ("before", "gemm"), ("sample", "gemm")] * 2


@pytest.mark.skipif(_ext.load() is None, reason="needs resnet_fast._C (the extension is not built)")
def test_cache_eviction_keeps_values():
    """What the CPU layer choice runs before each sample: a weight flushed from cache (its values
    untouched; an opaque oneDNN tensor or an empty one is passed over)."""
    t = torch.randn(1000, 37)
    copy = t.clone()
    _ext.load().evict_from_cache(t)
    _ext.load().evict_from_cache(torch.empty(0))
    assert torch.equal(t, copy)


def test_a_close_call_is_settled_by_timing_its_paths_in_the_model(tmp_path, monkeypatch):
    """A CPU choice with a rival within CPU_DECISIVE alone runs its close paths in turn in the model,
    each timed CPU_SETTLE_CALLS times after an untimed call; the faster there (here the rival) runs from
    then on and the cache records it with the in-model medians (a fake clock)."""
    monkeypatch.setattr(layer_choice, "SETTLE_IN_MODEL", True)
    cache = layer_choice.ChoiceCache(tmp_path / "cpu.json", device_type="cpu")
    alone = {"onednn": 2.0, "winograd": 1.0, "gemm": 1.1}
    cache.put("k", layer_choice.Choice("winograd", alone))
    assert layer_choice.rivals_cpu("k", "winograd", cache) == ["gemm"]  # oneDNN is decisively slower
    in_model = {"winograd": 5.0, "gemm": 3.0}
    now = [0.0]

    def path(name):
        def run(x):
            now[0] += in_model[name] / 1e3
            return name + x

        return run

    settled = []
    trial = layer_choice.settle_in_model(
        "t", {"winograd": path("winograd"), "gemm": path("gemm")}, cache, None, lambda: now[0]
    )
    assert layer_choice.runs_unsettled(lambda: trial("!")) is True  # benchmarks warm up on
    run = layer_choice.settle_in_model(
        "k", {"winograd": path("winograd"), "gemm": path("gemm")}, cache, settled.append, lambda: now[0]
    )
    assert run.__name__ == "winograd"
    n = 2 * (1 + layer_choice.CPU_SETTLE_CALLS)
    assert [run("!") for _ in range(n - 1)] == ["winograd!", "gemm!"] * (n // 2 - 1) + ["winograd!"]
    assert layer_choice.runs_unsettled(lambda: "nothing") is False
    assert layer_choice.runs_unsettled(lambda: run("!")) is False  # the last timed call: settled
    assert settled == ["gemm"] and run.__name__ == "gemm"
    assert [run("!") for _ in range(3)] == ["gemm!"] * 3
    on_disk = layer_choice.ChoiceCache(tmp_path / "cpu.json", device_type="cpu").get("k")
    assert on_disk == layer_choice.Choice("gemm", alone, pytest.approx(in_model))
    assert layer_choice.rivals_cpu("k", "gemm", cache) == []  # settled: the next process runs the GEMM
    # Off: close calls keep the path measured alone.
    monkeypatch.setattr(layer_choice, "SETTLE_IN_MODEL", False)
    cache.put("k2", layer_choice.Choice("winograd", alone))
    assert layer_choice.rivals_cpu("k2", "winograd", cache) == []
