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
        _matches(ours(x), theirs(x))  # recorded again
        _matches(ours(x), theirs(x))  # and that recording replayed
    assert len(_programs(ours)) == 1


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
    assert 0 < fused.release_buffers(ours) <= held
