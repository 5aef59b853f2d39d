"""A model's private forward recorded and replayed (resnet_fast.nn.replay): the replay gives the
normal forward's numbers exactly, and every change the normal forward would notice makes it record
again instead: a parameter or buffer changed in place or replaced, a module replaced, train mode,
hooks, another input shape, dropped folds. Outputs are compared with torchvision's (fp32: 1e-4 of the
output's magnitude, as the other parity tests) and replays with recorded forwards bit for bit."""

import pytest
import torch
from _utils import torchvision_pair

import resnet_fast
from resnet_fast import _ext, fold
from resnet_fast.nn import replay
from resnet_fast.ops import layer_choice

pytestmark = pytest.mark.skipif(
    _ext.load() is None, reason="the cpp backend needs the resnet_fast._C extension (not built here)"
)


@pytest.fixture(autouse=True)
def _cpp():
    resnet_fast.set_backend("cpp")
    yield
    resnet_fast.set_backend(None)


def _matches(out, expected):
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def _programs(model):
    return replay._PROGRAMS.get(model, {})


@pytest.mark.parametrize("arch", ["resnet50", "resnet18"])
def test_replay_gives_the_recorded_numbers(arch):
    ours, theirs = torchvision_pair(arch)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        recorded = ours(x)
        (program,) = _programs(ours).values()
        replayed = ours(x)
        assert list(_programs(ours).values()) == [program]  # replayed, not recorded again
        again = ours(x)
        _matches(recorded, theirs(x))
    torch.testing.assert_close(replayed, recorded, rtol=0, atol=0)
    torch.testing.assert_close(again, recorded, rtol=0, atol=0)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in ours.modules())
    assert len(program.runs) == convs + 1  # every conv and the max pool


def _changes():
    """(description, change(ours, theirs)) applied alike to both models between forwards."""

    def weight_in_place(ours, theirs):
        for m in (ours, theirs):
            m.layer2[1].conv2.weight.mul_(-1.5)

    def running_var_in_place(ours, theirs):
        for m in (ours, theirs):
            m.layer3[0].bn1.running_var.mul_(3)

    def parameter_replaced(ours, theirs):
        w = torch.randn_like(ours.layer1[0].conv1.weight)
        ours.layer1[0].conv1.weight = torch.nn.Parameter(w.clone())
        theirs.layer1[0].conv1.weight = torch.nn.Parameter(w.clone())

    def module_replaced(ours, theirs):
        conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
        ours.layer1[1].conv2 = conv
        theirs.layer1[1].conv2 = conv

    def block_replaced(ours, theirs):
        ours.layer4[1] = resnet_fast.from_torchvision(theirs).layer4[2]  # a copy of another block
        theirs.layer4[1] = theirs.layer4[2]

    def eps_changed(ours, theirs):
        for m in (ours, theirs):
            m.layer2[0].bn2.eps = 0.5

    def data_replaced(ours, theirs):  # new memory through .data: no version bump, a new data_ptr
        mean = torch.randn_like(ours.layer3[1].bn2.running_mean)
        for m in (ours, theirs):
            m.layer3[1].bn2.running_mean.data = mean.clone()

    def data_replaced_by_an_inference_tensor(ours, theirs):  # no version counter to compare
        with torch.inference_mode():
            var = torch.rand_like(ours.layer2[2].bn1.running_var) + 0.5
        for m in (ours, theirs):
            m.layer2[2].bn1.running_var.data = var

    def data_written_and_invalidated(ours, theirs):
        for m in (ours, theirs):
            m.conv1.weight.data.mul_(0.5)  # bypasses the version counter: fold.invalidate() is the rule
        fold.invalidate(ours)

    def conv_geometry_changed(ours, theirs):  # the output's shape kept: only the plan would notice
        for m in (ours, theirs):
            m.layer1[0].conv2.padding, m.layer1[0].conv2.dilation = (2, 2), (2, 2)

    def pool_changed(ours, theirs):  # every later layer's input shape changes
        for m in (ours, theirs):
            m.maxpool.stride, m.maxpool.padding = 1, 0

    return [
        weight_in_place,
        running_var_in_place,
        parameter_replaced,
        module_replaced,
        block_replaced,
        eps_changed,
        data_replaced,
        data_replaced_by_an_inference_tensor,
        data_written_and_invalidated,
        conv_geometry_changed,
        pool_changed,
    ]


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_a_change_between_forwards_is_never_replayed_stale(change):
    ours, theirs = torchvision_pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours(x)
        ours(x)  # replayed
        change(ours, theirs)
        (program,) = _programs(ours).values()
        assert replay._guards_hold(program.guards) == _ext.load().guards_hold(program.guards)
        _matches(ours(x), theirs(x))  # recorded again
        _matches(ours(x), theirs(x))  # and that recording replayed
    assert len(_programs(ours)) == 1


@pytest.mark.parametrize("evaluate", ["python", "cpp"])
def test_guards(evaluate):
    """Each kind of guard, holding and not, alike in Python and in the extension."""
    holds = replay._guards_hold if evaluate == "python" else _ext.load().guards_hold
    conv = torch.nn.Conv2d(3, 8, 3)
    seq = torch.nn.Sequential(conv, torch.nn.ReLU())
    assert holds([])
    assert holds([("attr", conv, "stride", conv.stride), ("type", conv, None, torch.nn.Conv2d)])
    assert holds([("item", conv._parameters, "weight", conv.weight), ("item", {}, "absent", None)])
    assert holds([("values", seq, "_modules", tuple(seq)), ("values", conv, "_forward_hooks", ())])
    assert not holds([("attr", conv, "stride", (1, 1))])  # equal, not the same object
    assert not holds([("attr", conv, "no_such_attribute", None)])
    assert not holds([("type", conv, None, torch.nn.Module)])
    assert not holds([("item", conv._parameters, "weight", conv.bias)])
    assert not holds([("values", seq, "_modules", tuple(seq)[::-1])])  # the same modules, another order
    assert not holds([("values", seq, "_modules", tuple(seq)[:1])])
    conv.register_forward_hook(lambda *args: None)
    assert not holds([("values", conv, "_forward_hooks", ())])


def test_train_mode_hooks_and_shapes():
    ours, theirs = torchvision_pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours(x)
        ours(x)
        ours.layer2[0].bn2.train()  # batch statistics for one BN: not recordable, not replayed
        theirs.layer2[0].bn2.train()
        _matches(ours(x), theirs(x))
        _matches(ours(x), theirs(x))
        ours.train(False)
        theirs.train(False)
        seen = []
        handle = ours.layer3[1].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
        _matches(ours(x), theirs(x))  # hooked: activations not private, the modules run
        assert len(seen) == 1
        handle.remove()
        _matches(ours(x), theirs(x))
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(m))
        try:
            _matches(ours(x), theirs(x))  # a global hook: every module runs, seen by it
        finally:
            handle.remove()
        assert any(m is ours.layer3[1] for m in seen)
        _matches(ours(x), theirs(x))
        x1 = torch.randn(1, 3, 32, 32)  # another input shape: its own program
        _matches(ours(x1), theirs(x1))
        _matches(ours(x1), theirs(x1))
    assert len(_programs(ours)) == 2


def test_replay_keeps_buffers_reusable():
    """Values dropped after their last use (no later than the recorded forward drops them): replays
    need no more kept buffers than the recorded forward."""
    from resnet_fast.nn import fused

    ours, _ = torchvision_pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours(x)
        held = fused.release_buffers(ours)  # what a recorded forward keeps
        ours(x)  # replayed into fresh buffers
        for _ in range(3):
            ours(x)  # replays
        ours.layer2[0].conv1.weight.mul_(2)  # recorded again (beside the stale compiled replay), replayed
        for _ in range(4):
            ours(x)
    assert 0 < fused.release_buffers(ours) <= held


# The paths a compiled replay is checked on: per path, the candidates taken where a layer has them (the
# first one it has; oneDNN where none). AMX runs bfloat16.
_PATHS = {
    "winograd": ("winograd", "gemm", "gemm_rows"),
    "winograd4": ("winograd4", "gemm", "gemm_rows"),
    "onednn": (),
    "amx": ("amx", "amx_rows"),
}


@pytest.mark.parametrize("path", list(_PATHS))
def test_compiled_replay_gives_the_recorded_numbers(monkeypatch, path):
    """A replay is captured (its kernel calls described) and compiled into one C.Program on the memory its
    Buffers gave them: from the third call on, every step is a kernel call in C++ (no plan in Python), with
    the recorded forward's numbers bit for bit on every path. A batch with NaN pixels meeting the program
    gives NaN logits for that image only (Winograd's layers fall back to oneDNN inside it); the clean batch
    after it is unchanged."""
    C = _ext.load()
    dtype = torch.bfloat16 if path == "amx" else torch.float32
    if path == "amx" and not C.conv_amx_supported():
        pytest.skip("this CPU has no AMX-BF16 (or the OS does not let this process use it)")
    if path != "onednn" and not C.conv_gemm_supported():
        pytest.skip("this CPU has no AVX2 + FMA: resnet_fast's own CPU kernels do not run here")
    taken = []

    def choose(key, runs, cache=None, before=None):
        taken.append(next((p for p in _PATHS[path] if p in runs), "onednn"))
        return taken[-1]

    monkeypatch.setattr(layer_choice, "choose_cpu", choose)
    from resnet_fast.nn import fused

    ours, _ = torchvision_pair()
    ours = ours.to(dtype)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    with torch.no_grad():
        recorded = ours(x)
        captured = ours(x)
        (buffers,) = fused._IDLE_BUFFERS[ours]
        program, compiled, settling = buffers.compiled
        assert program is next(iter(_programs(ours).values())) and not settling
        assert "python" not in compiled.kinds() and len(compiled) == len(program.runs)
        assert path == "onednn" or path in taken
        replayed = [ours(x) for _ in range(2)]
        bad = x.clone()
        bad[0, :, 10:20, 10:20] = float("nan")
        out = ours(bad)
        after = ours(x)
    assert buffers.compiled[1] is compiled  # the same program ran every replay
    for y in (captured, *replayed, after):
        torch.testing.assert_close(y, recorded, rtol=0, atol=0)
    assert out[0].isnan().all() and out[1].isfinite().all()
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # image 1 through oneDNN where Winograd refused the batch
    torch.testing.assert_close(out[1], recorded[1], rtol=tol, atol=tol * recorded[1].abs().max().item())


def test_a_model_dies_with_its_programs():
    """Programs, their guards and compiled replays are kept per model, weakly: nothing in them holds the
    model, so a dropped model is freed with them (ResNet-50's packed weights are ~100 MB)."""
    import gc
    import weakref

    ours, _ = torchvision_pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for _ in range(3):  # recorded, captured, compiled
            ours(x)
    assert _programs(ours)
    dead = weakref.ref(ours)
    del ours
    gc.collect()
    assert dead() is None
