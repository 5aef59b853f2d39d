"""Training batch norm kernels: per-channel batch statistics and the two backward passes.

x is viewed as [rows = N * inner, C]: NHWC (channels_last) rows are C contiguous values, read along C
(coalesced); contiguous [N, C, *] tensors are walked with strides. Programs own BLOCK_C channels of a
tile of rows and write per-tile partials that torch merges per channel in float64 (tiny tensors).
Statistics: of x - pivot (pivot = the channel's first value, so float32 means stay exact enough when
|mean| >> std); each loaded [BLOCK_R, BLOCK_C] block is reduced in two passes in registers (mean, then
squared deviations) and merged into the program's running (count, mean, M2) with Chan's formula —
never E[x^2] - E[x]^2. No autotuning, no buffer writes: running statistics are updated outside.
The forward apply is elementwise.scale_shift_act. int64 offsets throughout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 64
NUM_WARPS = 4
TARGET_PROGRAMS = 1024  # per reduction: enough to fill an H100 (132 SMs) several times over


@triton.jit
def _offsets(rows, cols, C, INNER, CHANNELS_LAST: tl.constexpr):
    """int64 offsets of elements (rows[:, None], cols[None, :]) of x viewed as [N * INNER, C]."""
    r = rows.to(tl.int64)[:, None]
    c = cols.to(tl.int64)[None, :]
    if CHANNELS_LAST:
        return r * C + c
    n = r // INNER
    return (n * C + c) * INNER + (r - n * INNER)


@triton.jit
def _stats_kernel(
    x_ptr,
    mean_ptr,
    m2_ptr,
    ROWS,
    C,
    INNER,
    TILE_ROWS,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    tile = tl.program_id(1)
    cmask = cols < C
    first = tl.zeros([1], dtype=tl.int32)
    pivot = tl.load(x_ptr + _offsets(first, cols, C, INNER, CHANNELS_LAST), mask=cmask[None, :], other=0.0)
    pivot = pivot.to(tl.float32)
    r0 = tile * TILE_ROWS
    r_end = tl.minimum(ROWS, r0 + TILE_ROWS)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(r0, r_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        rmask = rows < r_end
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + _offsets(rows, cols, C, INNER, CHANNELS_LAST), mask=mask, other=0.0).to(
            tl.float32
        )
        x = tl.where(mask, x - pivot, 0.0)
        n_b = tl.sum(rmask.to(tl.float32), axis=0)  # rows in this block (same for every channel)
        mean_b = tl.sum(x, axis=0) / n_b
        d = tl.where(mask, x - mean_b[None, :], 0.0)
        m2_b = tl.sum(d * d, axis=0)
        total = count + n_b
        delta = mean_b - mean
        mean += delta * (n_b / total)
        m2 += m2_b + delta * delta * (count * n_b / total)
        count = total
    out = tile.to(tl.int64) * C + cols
    tl.store(mean_ptr + out, mean, mask=cmask)
    tl.store(m2_ptr + out, m2, mask=cmask)


@triton.jit
def _masked_grad(dy, x, scale, shift, y, HAS_OUT: tl.constexpr, RELU: tl.constexpr):
    # The ReLU mask: the forward output y > 0 when given (torch's relu backward; the residual path
    # passes it), else the pre-activation recomputed as scale_shift_act writes it, so the compiled
    # arithmetic (and the mask) is the forward's.
    if RELU:
        if HAS_OUT:
            pre = y
        else:
            pre = x * scale + shift
        dy = tl.where(pre > 0.0, dy, 0.0)
    return dy


@triton.jit
def _bwd_reduce_kernel(
    dy_ptr,
    x_ptr,
    out_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    sum_dy_ptr,
    sum_dy_xmu_ptr,
    ROWS,
    C,
    INNER,
    TILE_ROWS,
    HAS_OUT: tl.constexpr,
    RELU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    tile = tl.program_id(1)
    cmask = cols < C
    scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0)[None, :]
    shift = tl.load(shift_ptr + cols, mask=cmask, other=0.0)[None, :]
    mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0)[None, :]
    r0 = tile * TILE_ROWS
    r_end = tl.minimum(ROWS, r0 + TILE_ROWS)
    acc_dy = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_dy_xmu = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(r0, r_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < r_end)[:, None] & cmask[None, :]
        offs = _offsets(rows, cols, C, INNER, CHANNELS_LAST)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32) if HAS_OUT else x
        g = _masked_grad(dy, x, scale, shift, y, HAS_OUT, RELU)
        acc_dy += g
        acc_dy_xmu += tl.where(mask, g * (x - mu), 0.0)
    out = tile.to(tl.int64) * C + cols
    tl.store(sum_dy_ptr + out, tl.sum(acc_dy, axis=0), mask=cmask)
    tl.store(sum_dy_xmu_ptr + out, tl.sum(acc_dy_xmu, axis=0), mask=cmask)


@triton.jit
def _bwd_elemt_kernel(
    dy_ptr,
    x_ptr,
    out_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    ka_ptr,
    kb_ptr,
    kc_ptr,
    dx_ptr,
    dres_ptr,
    ROWS,
    C,
    INNER,
    HAS_OUT: tl.constexpr,
    RELU: tl.constexpr,
    RES_GRAD: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cmask = cols < C
    mask = (rows < ROWS)[:, None] & cmask[None, :]
    offs = _offsets(rows, cols, C, INNER, CHANNELS_LAST)
    scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0)[None, :]
    shift = tl.load(shift_ptr + cols, mask=cmask, other=0.0)[None, :]
    mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0)[None, :]
    ka = tl.load(ka_ptr + cols, mask=cmask, other=0.0)[None, :]
    kb = tl.load(kb_ptr + cols, mask=cmask, other=0.0)[None, :]
    kc = tl.load(kc_ptr + cols, mask=cmask, other=0.0)[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32) if HAS_OUT else x
    g = _masked_grad(dy, x, scale, shift, y, HAS_OUT, RELU)
    dx = ka * g + kb * (x - mu) + kc
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if RES_GRAD:
        tl.store(dres_ptr + offs, g.to(dres_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------ launchers


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class _Geometry:
    """x as [rows, C] (+ INNER for the strided NCHW walk), block sizes and the reduction tiling."""

    def __init__(self, x: torch.Tensor) -> None:
        if not (x.is_contiguous() or _is_channels_last(x)):
            raise ValueError("batchnorm kernels need a contiguous or channels_last input")
        if x.dtype == torch.float64:
            raise TypeError(
                "the Triton batch-norm kernels compute in float32; float64 runs on the cpp/torch backends"
            )
        self.c = x.shape[1]
        self.rows = x.numel() // self.c
        self.inner = self.rows // x.shape[0]
        self.channels_last = _is_channels_last(x)
        self.block_c = min(64, triton.next_power_of_2(self.c))
        self.cblocks = triton.cdiv(self.c, self.block_c)
        want = max(1, TARGET_PROGRAMS // self.cblocks)
        self.tile_rows = triton.cdiv(max(1, triton.cdiv(self.rows, want)), BLOCK_R) * BLOCK_R
        self.tiles = triton.cdiv(self.rows, self.tile_rows)


def _check_f32(*vs: torch.Tensor) -> None:
    for v in vs:
        if v.dtype != torch.float32 or not v.is_contiguous():
            raise TypeError(f"per-channel vectors must be contiguous float32, got {v.dtype}")


def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per channel, float32."""
    g = _Geometry(x)
    part_mean = torch.empty((g.tiles, g.c), device=x.device, dtype=torch.float32)
    part_m2 = torch.empty_like(part_mean)
    _stats_kernel[(g.cblocks, g.tiles)](
        x, part_mean, part_m2, g.rows, g.c, g.inner, g.tile_rows,
        CHANNELS_LAST=g.channels_last, BLOCK_R=BLOCK_R, BLOCK_C=g.block_c, num_warps=NUM_WARPS,
    )  # fmt: skip
    # Chan's merge of the tiles, in float64.
    counts = torch.full((g.tiles, 1), float(g.tile_rows), device=x.device, dtype=torch.float64)
    counts[-1] = g.rows - g.tile_rows * (g.tiles - 1)
    m, q = part_mean.double(), part_m2.double()
    mean = (counts * m).sum(0) / g.rows
    m2 = q.sum(0) + (counts * (m - mean) ** 2).sum(0)
    pivot = x[(0, slice(None)) + (0,) * (x.dim() - 2)].double()  # the kernel's: element (row 0, c)
    return (pivot + mean).float(), (m2 / g.rows).float()


def backward_reduce(dy, x, scale, shift, output, mean, relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum dy', sum dy' * (x - mean)) per channel, float32; dy' = dy masked by the forward's ReLU
    (output > 0, or the recomputed x*scale + shift > 0 when output is None)."""
    g = _Geometry(x)
    _check_f32(scale, shift, mean)
    parts = torch.empty((2, g.tiles, g.c), device=x.device, dtype=torch.float32)
    _bwd_reduce_kernel[(g.cblocks, g.tiles)](
        dy, x, output if output is not None else x, scale, shift, mean, parts[0], parts[1],
        g.rows, g.c, g.inner, g.tile_rows,
        HAS_OUT=output is not None, RELU=relu, CHANNELS_LAST=g.channels_last,
        BLOCK_R=BLOCK_R, BLOCK_C=g.block_c, num_warps=NUM_WARPS,
    )  # fmt: skip
    sums = parts.double().sum(1).float()
    return sums[0], sums[1]


def backward_elemt(dy, x, scale, shift, output, mean, ka, kb, kc, relu: bool, residual_grad: bool):
    """(dx = ka*dy' + kb*(x - mean) + kc, dy' or None), in x's dtype and layout."""
    g = _Geometry(x)
    _check_f32(scale, shift, mean, ka, kb, kc)
    dx = torch.empty_like(x)
    dres = torch.empty_like(x) if residual_grad else None
    _bwd_elemt_kernel[(g.cblocks, triton.cdiv(g.rows, BLOCK_R))](
        dy, x, output if output is not None else x, scale, shift, mean, ka, kb, kc,
        dx, dres if dres is not None else dx, g.rows, g.c, g.inner,
        HAS_OUT=output is not None, RELU=relu, RES_GRAD=residual_grad, CHANNELS_LAST=g.channels_last,
        BLOCK_R=BLOCK_R, BLOCK_C=g.block_c, num_warps=NUM_WARPS,
    )  # fmt: skip
    return dx, dres
