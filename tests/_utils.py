"""Helpers shared by the tests (tests/ is on sys.path through conftest.py)."""

import torch


def randomize_bn(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random BN affine parameters and running stats, so eval mode is not an identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(0, 100, (1,), generator=gen)))
    return model


def like_fused(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.nn.Module, torch.Tensor]:
    """A torchvision model and input in the layout resnet_fast runs (NHWC when a fused backend is
    active), so both sides pick the same conv algorithms and fp32 results agree to 1e-5."""
    import resnet_fast

    if resnet_fast.ops.backend_for(x.device) == "torch":
        return model, x
    return model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)


def record_conv_calls(monkeypatch, backend: str, record, impl=None) -> None:
    """Call record(x, w, b, residual, relu) on every conv the `backend` runs (ops.conv_runner's runners,
    which the eval plans keep, so patch before the model's first forward); `impl` replaces the backend's
    per-call function when given."""
    from resnet_fast.ops import conv as conv_ops

    make = conv_ops._per_call_runner(impl) if impl is not None else conv_ops._CONV_RUNNER[backend]

    def counting(x, w, b, residual, relu, *conv, **options):
        run = make(x, w, b, residual, relu, *conv, **options)

        def counted(x, residual, buffers=None):
            record(x, w, b, residual, relu)
            return run(x, residual, buffers)

        return counted

    monkeypatch.setitem(conv_ops._CONV_RUNNER, backend, counting)


def torchvision_pair(arch: str = "resnet50", num_classes: int = 10):
    """(resnet_fast model, the torchvision model it was converted from), eval, with BN running statistics
    that are not the identity; seeded, so two calls give the same weights."""
    import torchvision

    import resnet_fast

    torch.manual_seed(0)
    theirs = getattr(torchvision.models, arch)(num_classes=num_classes).eval()
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return resnet_fast.from_torchvision(theirs).eval(), theirs
