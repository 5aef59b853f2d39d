"""NHWC elementwise kernels: residual add + ReLU, per-channel scale-shift (+ residual) (+ ReLU).

Flat 1-D grids over the tensor's memory with int64 offsets; math in fp32, stored in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common

BLOCK_SIZE = 1024
NUM_WARPS = 4


@triton.jit
def _add_relu_kernel(a_ptr, b_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    # int64: activations pass 2^31 elements (1024x64x224x224).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    a = tl.load(a_ptr + offs, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    out = common.relu(a + b)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_shift_act_kernel(
    x_ptr,
    scale_ptr,
    shift_ptr,
    res_ptr,
    out_ptr,
    n_elements,
    C,
    INNER,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    local = tl.arange(0, BLOCK)
    offs = start + local
    mask = offs < n_elements
    # Channel index: the 64-bit divisions happen once per program on scalars; the per-element
    # part stays in int32 (local < BLOCK, remainders < C or INNER).
    if CHANNELS_LAST:
        c = ((start % C).to(tl.int32) + local) % C
    else:
        q = start // INNER
        r = (start % INNER).to(tl.int32) + local
        c = ((q % C).to(tl.int32) + r // INNER) % C
    scale = tl.load(scale_ptr + c, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + c, mask=mask, other=0.0).to(tl.float32)
    # An explicit FMA: the batch-norm backward recomputes this value for its ReLU mask and must get
    # the same bits whatever the compiler would contract (batchnorm._pre_activation).
    y = tl.fma(tl.load(x_ptr + offs, mask=mask).to(tl.float32), scale, shift)
    if HAS_RES:
        y += tl.load(res_ptr + offs, mask=mask).to(tl.float32)
    if RELU:
        y = common.relu(y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t with ref's strides, so both can be walked with the same flat offsets."""
    return t if t.stride() == ref.stride() else torch.empty_like(ref).copy_(t)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x as-is when it is contiguous or channels_last, else a channels_last (4-D) or contiguous copy."""
    if x.is_contiguous() or _is_channels_last(x):
        return x
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.contiguous_format)


def add_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """relu(a + b) in a's layout (contiguous or channels_last)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(
            f"add_relu needs equal shapes and dtypes, got {a.shape}/{a.dtype} and {b.shape}/{b.dtype}"
        )
    a = _dense(a)
    b = _like(b, a)
    out = torch.empty_like(a)
    n = a.numel()
    if n:
        with common.on_device(a):
            _add_relu_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
                a, b, out, n, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS
            )
    return out


def scale_shift_act(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """act(x * scale[c] + shift[c] (+ residual)) over channel dim 1; output keeps x's layout."""
    if x.dim() < 2:
        raise ValueError("scale_shift_act needs a channel dimension (dim 1)")
    c = x.shape[1]
    if scale.numel() != c or shift.numel() != c:
        raise ValueError(f"scale/shift need {c} elements, got {scale.numel()} and {shift.numel()}")
    x = _dense(x)
    channels_last = _is_channels_last(x)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != input shape {tuple(x.shape)}")
        residual = _like(residual, x)
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        inner = n // (x.shape[0] * c)  # elements per channel per sample in contiguous layout
        with common.on_device(x):
            _scale_shift_act_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
                x,
                scale.contiguous(),
                shift.contiguous(),
                residual if residual is not None else x,  # dummy, never read
                out,
                n,
                c,
                inner,
                HAS_RES=residual is not None,
                RELU=relu,
                CHANNELS_LAST=channels_last,
                BLOCK=BLOCK_SIZE,
                num_warps=NUM_WARPS,
            )
    return out
