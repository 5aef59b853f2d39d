"""Training batch norm kernels: batch statistics (+ running-statistics update) and the backward.

x is viewed as [rows = N * inner, C]: NHWC (channels_last) rows are C contiguous values, read along C
(coalesced); contiguous [N, C, *] tensors are walked with strides. Launches per call (the training step
of a ResNet-50 has 53 BNs, so each launch counts):
  batch_stats: _stats_kernel (per-tile partials) + _stats_finalize_kernel (mean, var, invstd, scale,
               shift and the running statistics, all per channel) = 2; the apply pass is
               elementwise.scale_shift_act.
  backward:    _bwd_reduce_kernel (per-tile partial sums) + _bwd_finalize_kernel (sums, gradient
               coefficients, dweight, dbias) + _bwd_elemt_kernel (dx, the residual's gradient) = 3.
Statistics: of x - pivot (pivot = the channel's first value, so float32 means stay exact enough when
|mean| >> std); each loaded [BLOCK_R, BLOCK_C] block is reduced in two passes in registers (mean, then
squared deviations) and merged into the program's running (count, mean, M2) with Chan's formula, and
the finalize kernels merge the tiles in float64 — never E[x^2] - E[x]^2. NaN and Inf propagate as in
torch. No autotuning (the finalize kernel writes buffers). int64 offsets throughout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common

BLOCK_R = 64
BLOCK_T = 64  # tiles merged per step by the finalize kernels
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
    tile = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
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
def _tile_counts(t, TILES, TILE_ROWS, ROWS):
    """Rows in tiles t (float64): TILE_ROWS each, the rest in the last one, 0 past the end."""
    n = tl.where(t == TILES - 1, ROWS - TILE_ROWS * (TILES - 1), TILE_ROWS).to(tl.float64)
    return tl.where(t < TILES, n, 0.0)


@triton.jit
def _stats_finalize_kernel(
    x_ptr,
    part_mean_ptr,
    part_m2_ptr,
    w_ptr,
    b_ptr,
    run_mean_ptr,
    run_var_ptr,
    nbt_ptr,
    mean_ptr,
    var_ptr,
    invstd_ptr,
    scale_ptr,
    shift_ptr,
    ROWS,
    C,
    INNER,
    TILES,
    TILE_ROWS,
    eps,
    momentum,
    unbias,
    CHANNELS_LAST: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RUNNING: tl.constexpr,
    CUMULATIVE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Launched with enable_fp_fusion=False: scale and shift must be bit for bit what ops.batchnorm.
    # scale_shift computes from (weight, bias, mean, invstd) (nn/recompute.py rebuilds outputs with it).
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    # Chan's merge of the tiles in float64: mean = sum n_t m_t / N; M2 = sum M2_t + sum n_t (m_t - mean)^2.
    acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    for t0 in range(0, TILES, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < TILES)[:, None] & cmask[None, :]
        m = tl.load(part_mean_ptr + t.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(_tile_counts(t, TILES, TILE_ROWS, ROWS)[:, None] * m.to(tl.float64), axis=0)
    mean = acc / ROWS
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for t0 in range(0, TILES, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < TILES)[:, None] & cmask[None, :]
        offs = t.to(tl.int64)[:, None] * C + cols[None, :]
        d = tl.load(part_mean_ptr + offs, mask=mask, other=0.0).to(tl.float64) - mean[None, :]
        q = tl.load(part_m2_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        m2 += tl.sum(
            tl.where(mask, q + _tile_counts(t, TILES, TILE_ROWS, ROWS)[:, None] * d * d, 0.0), axis=0
        )
    first = tl.zeros([1], dtype=tl.int32)
    pivot = tl.load(x_ptr + _offsets(first, cols, C, INNER, CHANNELS_LAST), mask=cmask[None, :], other=0.0)
    mean = tl.reshape(pivot, [BLOCK_C]).to(tl.float64) + mean
    mean32 = mean.to(tl.float32)
    var32 = (m2 / ROWS).to(tl.float32)
    invstd = tl.math.rsqrt(var32 + eps)
    scale = invstd
    if HAS_W:
        scale = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) * invstd
    if HAS_B:
        shift = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32) - mean32 * scale
    else:
        shift = -mean32 * scale
    tl.store(mean_ptr + cols, mean32, mask=cmask)
    tl.store(var_ptr + cols, var32, mask=cmask)
    tl.store(invstd_ptr + cols, invstd, mask=cmask)
    tl.store(scale_ptr + cols, scale, mask=cmask)
    tl.store(shift_ptr + cols, shift, mask=cmask)
    if RUNNING:
        # nn.BatchNorm2d's update; num_batches_tracked was already incremented for this step.
        if CUMULATIVE:
            factor = 1.0 / tl.load(nbt_ptr).to(tl.float32)
        else:
            factor = momentum
        rm = tl.load(run_mean_ptr + cols, mask=cmask, other=0.0)
        rv = tl.load(run_var_ptr + cols, mask=cmask, other=0.0)
        new_rm = rm.to(tl.float32) * (1 - factor) + mean32 * factor
        new_rv = rv.to(tl.float32) * (1 - factor) + (var32 * unbias) * factor
        tl.store(run_mean_ptr + cols, new_rm.to(rm.dtype), mask=cmask)
        tl.store(run_var_ptr + cols, new_rv.to(rv.dtype), mask=cmask)


@triton.jit
def _masked_grad(dy, x, scale, shift, y, HAS_OUT: tl.constexpr, RELU: tl.constexpr):
    # The ReLU mask as torch's relu backward applies it, from the forward output y when given (the
    # residual path passes it), else from the pre-activation recomputed with the forward's own FMA
    # (elementwise.scale_shift_act): 0 where it is <= 0, dy elsewhere, NaN included.
    if RELU:
        if HAS_OUT:
            pre = y
        else:
            pre = tl.fma(x, scale, shift)
        dy = tl.where(pre <= 0.0, 0.0, dy)
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
    tile = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
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
        acc_dy += tl.where(mask, g, 0.0)
        acc_dy_xmu += tl.where(mask, g * (x - mu), 0.0)
    out = tile.to(tl.int64) * C + cols
    tl.store(sum_dy_ptr + out, tl.sum(acc_dy, axis=0), mask=cmask)
    tl.store(sum_dy_xmu_ptr + out, tl.sum(acc_dy_xmu, axis=0), mask=cmask)


@triton.jit
def _bwd_finalize_kernel(
    part_dy_ptr,
    part_dy_xmu_ptr,
    scale_ptr,
    invstd_ptr,
    sums_ptr,
    coef_ptr,
    dweight_ptr,
    dbias_ptr,
    C,
    TILES,
    count,
    COEFFICIENTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    a = tl.zeros([BLOCK_C], dtype=tl.float64)
    b = tl.zeros([BLOCK_C], dtype=tl.float64)
    for t0 in range(0, TILES, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < TILES)[:, None] & cmask[None, :]
        offs = t.to(tl.int64)[:, None] * C + cols[None, :]
        a += tl.sum(tl.load(part_dy_ptr + offs, mask=mask, other=0.0).to(tl.float64), axis=0)
        b += tl.sum(tl.load(part_dy_xmu_ptr + offs, mask=mask, other=0.0).to(tl.float64), axis=0)
    sum_dy = a.to(tl.float32)
    sum_dy_xmu = b.to(tl.float32)
    # sums_ptr: [2, C] = sum dy', sum dy' * (x - mean).
    tl.store(sums_ptr + cols, sum_dy, mask=cmask)
    tl.store(sums_ptr + C + cols, sum_dy_xmu, mask=cmask)
    if COEFFICIENTS:
        # ops.batchnorm.grad_coefficients: dx = scale * dy' + kb * (x - mean) + kc.
        scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
        invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
        tl.store(coef_ptr + cols, -scale * invstd * invstd * sum_dy_xmu / count, mask=cmask)
        tl.store(coef_ptr + C + cols, -scale * sum_dy / count, mask=cmask)
        tl.store(dweight_ptr + cols, sum_dy_xmu * invstd, mask=cmask)
        tl.store(dbias_ptr + cols, sum_dy, mask=cmask)


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
    # Row blocks on grid axis 0 (up to 2^31 - 1 programs): axis 1 stops at 65535, N*H*W / 64 does not.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
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


class Geometry:
    """x as [rows, C] (+ INNER for the strided NCHW walk), block sizes, the reduction tiling and the grids."""

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

    @property
    def reduce_grid(self) -> tuple[int, int]:
        """(tiles, channel blocks): the two reductions (tiles <= TARGET_PROGRAMS)."""
        return (self.tiles, self.cblocks)

    @property
    def finalize_grid(self) -> tuple[int]:
        return (self.cblocks,)

    @property
    def elemt_grid(self) -> tuple[int, int]:
        """(row blocks, channel blocks): the elementwise backward; row blocks on axis 0, whose limit is 2^31 - 1."""
        return (triton.cdiv(self.rows, BLOCK_R), self.cblocks)


def _check_f32(*vs: torch.Tensor) -> None:
    for v in vs:
        if v.dtype != torch.float32 or not v.is_contiguous():
            raise TypeError(f"per-channel vectors must be contiguous float32, got {v.dtype}")


def batch_stats(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    momentum: float | None = 0.1,
    num_batches_tracked: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased var, invstd, scale, shift) per channel in float32, two launches; with running_mean and
    running_var, also nn.BatchNorm2d's update of them in place (momentum None: the cumulative average over
    num_batches_tracked, which the caller has already incremented)."""
    g = Geometry(x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var go together")
    running = running_mean is not None
    if running and momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    parts = torch.empty((2, g.tiles, g.c), device=x.device, dtype=torch.float32)
    mean, var, invstd, scale, shift = (
        torch.empty(g.c, device=x.device, dtype=torch.float32) for _ in range(5)
    )
    with common.on_device(x):
        _stats_kernel[g.reduce_grid](
            x, parts[0], parts[1], g.rows, g.c, g.inner, g.tile_rows,
            CHANNELS_LAST=g.channels_last, BLOCK_R=BLOCK_R, BLOCK_C=g.block_c, num_warps=NUM_WARPS,
        )  # fmt: skip
        _stats_finalize_kernel[g.finalize_grid](
            x, parts[0], parts[1],
            weight if weight is not None else mean, bias if bias is not None else mean,  # dummies: never read
            running_mean if running else mean, running_var if running else mean,
            num_batches_tracked if num_batches_tracked is not None else mean,
            mean, var, invstd, scale, shift,
            g.rows, g.c, g.inner, g.tiles, g.tile_rows, float(eps),
            float(momentum) if momentum is not None else 0.0, g.rows / max(g.rows - 1, 1),
            CHANNELS_LAST=g.channels_last, HAS_W=weight is not None, HAS_B=bias is not None,
            RUNNING=running, CUMULATIVE=momentum is None, BLOCK_T=BLOCK_T, BLOCK_C=g.block_c,
            num_warps=NUM_WARPS, enable_fp_fusion=False,
        )  # fmt: skip
    return mean, var, invstd, scale, shift


def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per channel, float32."""
    mean, var, *_ = batch_stats(x, None, None, 0.0)
    return mean, var


def _reduce(dy, x, scale, shift, output, mean, invstd, relu: bool, coefficients: bool):
    """The reduction and finalize launches: [2, C] sums, and with coefficients [2, C] (kb, kc), dweight
    and dbias (separate tensors: op outputs must not alias each other)."""
    g = Geometry(x)
    _check_f32(scale, shift, mean, *([invstd] if coefficients else []))
    parts = torch.empty((2, g.tiles, g.c), device=x.device, dtype=torch.float32)
    sums = torch.empty((2, g.c), device=x.device, dtype=torch.float32)
    coef, dweight, dbias = (
        (
            torch.empty((2, g.c), device=x.device, dtype=torch.float32),
            torch.empty_like(mean),
            torch.empty_like(mean),
        )
        if coefficients
        else (sums, sums, sums)  # dummies, never written
    )
    with common.on_device(x):
        _bwd_reduce_kernel[g.reduce_grid](
            dy, x, output if output is not None else x, scale, shift, mean, parts[0], parts[1],
            g.rows, g.c, g.inner, g.tile_rows,
            HAS_OUT=output is not None, RELU=relu, CHANNELS_LAST=g.channels_last,
            BLOCK_R=BLOCK_R, BLOCK_C=g.block_c, num_warps=NUM_WARPS,
        )  # fmt: skip
        _bwd_finalize_kernel[g.finalize_grid](
            parts[0], parts[1], scale, invstd if coefficients else scale, sums, coef, dweight, dbias,
            g.c, g.tiles, float(g.rows),
            COEFFICIENTS=coefficients, BLOCK_T=BLOCK_T, BLOCK_C=g.block_c, num_warps=NUM_WARPS,
        )  # fmt: skip
    return sums, coef, dweight, dbias


def backward_reduce(dy, x, scale, shift, output, mean, relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum dy', sum dy' * (x - mean)) per channel, float32; dy' = dy masked by the forward's ReLU
    (output, or the recomputed x*scale + shift, <= 0 gives 0)."""
    sums, *_ = _reduce(dy, x, scale, shift, output, mean, None, relu, coefficients=False)
    return sums[0], sums[1]


def backward_elemt(dy, x, scale, shift, output, mean, ka, kb, kc, relu: bool, residual_grad: bool):
    """(dx = ka*dy' + kb*(x - mean) + kc, dy' or None), in x's dtype and layout."""
    g = Geometry(x)
    _check_f32(scale, shift, mean, ka, kb, kc)
    dx = torch.empty_like(x)
    dres = torch.empty_like(x) if residual_grad else None
    with common.on_device(x):
        _bwd_elemt_kernel[g.elemt_grid](
            dy, x, output if output is not None else x, scale, shift, mean, ka, kb, kc,
            dx, dres if dres is not None else dx, g.rows, g.c, g.inner,
            HAS_OUT=output is not None, RELU=relu, RES_GRAD=residual_grad, CHANNELS_LAST=g.channels_last,
            BLOCK_R=BLOCK_R, BLOCK_C=g.block_c, num_warps=NUM_WARPS,
        )  # fmt: skip
    return dx, dres


def backward(dy, x, scale, shift, output, mean, invstd, relu: bool, residual_grad: bool):
    """(dx, dy' or None, dweight, dbias) of y = act(x * scale + shift (+ residual)) with batch statistics,
    dweight and dbias in float32: three launches."""
    _, coef, dweight, dbias = _reduce(dy, x, scale, shift, output, mean, invstd, relu, coefficients=True)
    dx, dres = backward_elemt(dy, x, scale, shift, output, mean, scale, coef[0], coef[1], relu, residual_grad)
    return dx, dres, dweight, dbias
