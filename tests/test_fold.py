"""BN folding (resnet_fast.fold): the math, and a cache that never serves stale weights."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fast
from resnet_fast import fold
from resnet_fast.kernels import reference
from resnet_fast.nn import conv_bn_act


def _pair(cin=8, cout=16, bias=False, affine=True, dtype=torch.float32, groups=1):
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias, groups=groups)
    bn = nn.BatchNorm2d(cout, affine=affine)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.2, 2.0)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
    return conv.to(dtype).eval(), bn.to(dtype).eval()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("groups", [1, 4])
def test_fold_matches_conv_then_bn_in_float64(bias, affine, groups):
    conv, bn = _pair(bias=bias, affine=affine, dtype=torch.float64, groups=groups)
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    w, b = fold.fold_conv_bn(
        conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
    )
    assert w.dtype == b.dtype == torch.float64
    with torch.no_grad():
        expected = bn(conv(x))
        actual = F.conv2d(x, w, b, padding=1, groups=groups)
    # fp64 end to end: only rounding differences of a few ulps remain.
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_fold_math_runs_in_float32_for_16_bit_params():
    conv, bn = _pair(dtype=torch.bfloat16)
    w, b = fold.fold_conv_bn(
        conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
    )
    conv32, bn32 = copy.deepcopy(conv).float(), copy.deepcopy(bn).float()
    w32, b32 = fold.fold_conv_bn(
        conv32.weight, None, bn32.weight, bn32.bias, bn32.running_mean, bn32.running_var, bn32.eps
    )
    # One rounding of the fp32 result, not bf16 arithmetic at every step.
    assert torch.equal(w, w32.bfloat16()) and torch.equal(b, b32.bfloat16())


def test_folded_is_cached_until_a_source_changes():
    conv, bn = _pair()
    first = fold.folded(conv, bn)
    assert fold.folded(conv, bn) is first
    assert fold.packed_slot(first.weight) is first.packed
    with torch.no_grad():
        bn.running_var.mul_(2.0)
    second = fold.folded(conv, bn)
    assert second is not first
    assert fold.folded(conv, bn, torch.float64) is not second  # another run dtype, another fold
    assert fold.packed_slot(torch.zeros(1)) is None


def _check_eval(conv, bn, x, residual=None):
    """The fused eval path (cached fold) against conv -> BN with the current parameters."""
    with torch.no_grad():
        actual = conv_bn_act(x, conv, bn, residual)
        expected = reference.conv_bn_act(x, conv, bn, None if residual is None else residual.clone())
    scale = expected.abs().max()
    tol = 1e-5 if x.dtype == torch.float64 else 1e-4  # fp32: folding reorders the products
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


@pytest.fixture(params=["cpp", "torch"])
def backend(request):
    resnet_fast.set_backend(request.param)
    return request.param


def _x(dtype=torch.float32):
    return torch.randn(2, 8, 10, 10, dtype=dtype).contiguous(memory_format=torch.channels_last)


def test_fresh_after_load_state_dict(backend):
    conv, bn = _pair()
    x = _x()
    _check_eval(conv, bn, x)
    donor_conv, donor_bn = _pair()
    conv.load_state_dict(donor_conv.state_dict())
    bn.load_state_dict(donor_bn.state_dict())
    _check_eval(conv, bn, x)


@pytest.mark.parametrize("foreach", [False, True])
def test_fresh_after_optimizer_step(backend, foreach):
    conv, bn = _pair()
    x = _x()
    _check_eval(conv, bn, x)
    params = [*conv.parameters(), *bn.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9, foreach=foreach)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    _check_eval(conv, bn, x)


def test_fresh_after_dtype_change(backend):
    conv, bn = _pair()
    _check_eval(conv, bn, _x())
    conv.double(), bn.double()
    _check_eval(conv, bn, _x(torch.float64))
    conv.float(), bn.float()
    _check_eval(conv, bn, _x())


def test_fresh_after_train_then_eval(backend):
    conv, bn = _pair()
    x = _x()
    _check_eval(conv, bn, x)
    conv.train(), bn.train()
    with torch.no_grad():
        conv_bn_act(x * 3 + 1, conv, bn)  # updates the running statistics in place
    conv.eval(), bn.eval()
    _check_eval(conv, bn, x)


def test_fresh_after_in_place_edits_eps_and_geometry(backend):
    conv, bn = _pair()
    x = _x()
    _check_eval(
        conv, bn, x, residual=torch.randn(2, 16, 10, 10).contiguous(memory_format=torch.channels_last)
    )
    with torch.no_grad():
        conv.weight.mul_(-1)
        bn.bias.add_(1)
    _check_eval(conv, bn, x)
    bn.eps = 0.5
    _check_eval(conv, bn, x)
    conv.padding, conv.dilation = (
        (2, 2),
        (2, 2),
    )  # the output's shape kept: a plan keyed by shape alone is stale
    _check_eval(conv, bn, x)


def _load_assign(conv, bn):
    donor_conv, donor_bn = _pair()
    conv.load_state_dict(donor_conv.state_dict(), assign=True)
    bn.load_state_dict(donor_bn.state_dict(), assign=True)


def _detach_copy(conv, bn):
    bn.running_mean.detach().copy_(torch.randn(16))  # detach() shares the version counter


def _vector_to_parameters(conv, bn):
    params = [*conv.parameters(), *bn.parameters()]
    vec = torch.nn.utils.parameters_to_vector(params)
    torch.nn.utils.vector_to_parameters(vec * 1.5, params)  # new storage


def _init(conv, bn):
    nn.init.kaiming_normal_(conv.weight)
    nn.init.uniform_(bn.weight)


@pytest.mark.parametrize("write", [_load_assign, _detach_copy, _vector_to_parameters, _init])
def test_fresh_after_common_tools_write(backend, write):
    """The writes the README lists as seen by the cache."""
    conv, bn = _pair()
    x = _x()
    _check_eval(conv, bn, x)
    write(conv, bn)
    conv.eval(), bn.eval()
    _check_eval(conv, bn, x)


def test_fresh_after_averaged_model_updates(backend):
    averaged = torch.optim.swa_utils.AveragedModel(nn.Sequential(*_pair()), use_buffers=True)
    conv, bn = averaged.module
    x = _x()
    _check_eval(conv, bn, x)
    for _ in range(2):  # the first update copies, the next ones average in place
        averaged.update_parameters(nn.Sequential(*_pair()))
        _check_eval(conv, bn, x)


def test_writes_through_data_need_invalidate(backend):
    conv, bn = _pair()
    x = _x()
    _check_eval(conv, bn, x)
    bn.weight.data.mul_(3)  # bypasses the version counter: documented, fixed by invalidate()
    fold.invalidate(conv)
    _check_eval(conv, bn, x)


def test_prepacked_weights_follow_the_fold(backend):
    if backend != "cpp":
        pytest.skip("prepacking is a cpp-backend cache")
    conv, bn = _pair()
    x = _x()
    _check_eval(conv, bn, x)
    entry = fold.folded(conv, bn)
    packed = dict(entry.packed)  # prepacked on the first call (oneDNN's, and ours if layer_choice took it)
    assert packed
    _check_eval(conv, bn, x)
    assert fold.folded(conv, bn) is entry and entry.packed.keys() == packed.keys()
    assert all(entry.packed[k] is v for k, v in packed.items())  # not packed again
    with torch.no_grad():
        conv.weight.add_(0.1)
    _check_eval(conv, bn, x)
    assert fold.folded(conv, bn) is not entry


def test_folded_weight_is_made_on_first_use_from_unchanged_sources():
    """folded() computes the scale and bias; the weight, conv weight x scale, only when read (the CPU
    kernels pack from the two without it), with fold_conv_bn's bits. Read after its conv weight changed in
    place, a fold raises instead of giving a weight that was never the fold's."""
    conv, bn = _pair()
    entry = fold.folded(conv, bn)
    assert entry._weight is None
    weight, bias = fold.fold_conv_bn(
        conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
    )
    assert torch.equal(entry.weight, weight) and torch.equal(entry.bias, bias)
    assert entry.weight is entry.weight and fold.packed_slot(entry.weight) is entry.packed
    assert entry.shape == conv.weight.shape and entry.dtype == torch.float32
    stale = fold.folded(conv, bn, torch.float64)  # another run dtype: another fold, its weight not made
    with torch.no_grad():
        conv.weight.mul_(2)
    with pytest.raises(RuntimeError, match="changed in place"):
        stale.weight  # noqa: B018
    assert torch.equal(fold.folded(conv, bn).weight, weight * 2)  # a new fold


def test_copies_and_pickles_of_a_model_with_cached_folds(backend):
    model = resnet_fast.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        clone = copy.deepcopy(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_folded_needs_running_stats():
    conv = nn.Conv2d(3, 4, 1)
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        fold.folded(conv, bn)


def test_eval_plan_is_resolved_once_per_input_shape(monkeypatch):
    """nn.fused keeps each layer's resolved backend call (ops.conv_runner) with its fold: made once per
    input shape and epilogue, dropped with the fold when a source changes (fused backends only)."""
    resnet_fast.set_backend("cpp")
    made = []
    real = resnet_fast.ops.conv_runner
    monkeypatch.setattr(
        resnet_fast.ops, "conv_runner", lambda *a, **kw: made.append(a[0].shape) or real(*a, **kw)
    )
    conv, bn = _pair()
    x = _x()
    for _ in range(3):
        _check_eval(conv, bn, x)
    assert len(made) == 1 and len(fold.folded(conv, bn).runners) == 1
    _check_eval(conv, bn, x[:1].contiguous(memory_format=torch.channels_last))  # another shape
    _check_eval(conv, bn, x, residual=torch.randn(2, 16, 10, 10))  # another epilogue
    _check_eval(conv, bn, x)
    assert len(made) == 3
    with torch.no_grad():
        bn.running_mean.add_(1)  # a new fold: its plans start empty
    _check_eval(conv, bn, x)
    assert len(made) == 4 and len(fold.folded(conv, bn).runners) == 1


def test_inference_tensors_are_folded_afresh_never_cached():
    """Parameters made under torch.inference_mode have no version counter: no cache key, a new fold
    on every call (so an in-place edit made later is still seen)."""
    with torch.inference_mode():
        conv, bn = _pair()
        with pytest.warns(UserWarning, match="inference tensors .* cannot be cached"):
            first = fold.folded(conv, bn)
        assert fold.folded(conv, bn) is not first
        conv.weight.mul_(2)
        torch.testing.assert_close(fold.folded(conv, bn).weight, first.weight * 2)


def test_sources_outside_the_registries():
    """fold reads parameters from the modules' registries for speed; a weight held as a plain
    attribute instead (old-style weight_norm deletes the parameter) is still read, and followed."""
    conv, bn = _pair()
    weight = conv.weight.detach().clone()
    del conv.weight
    conv.weight = weight  # a plain tensor attribute now
    expected = fold.fold_conv_bn(weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    torch.testing.assert_close(fold.folded(conv, bn).weight, expected[0], rtol=0, atol=0)
    weight.mul_(2)
    torch.testing.assert_close(fold.folded(conv, bn).weight, expected[0] * 2)
