"""Implicit-GEMM NHWC convolution with a fused bias (+ residual) (+ ReLU) epilogue.

GEMM view: rows M = N*OH*OW output pixels, columns = output channels of one group,
reduction K = KH*KW*Cin/groups taken as (kh, kw, ci) so that a K block of one tap reads
contiguous channels of channels_last input. One launch covers all groups (grid axis 2).
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl
import triton.testing

from . import common

# The pool of tile shapes; _candidates picks at most three of them per conv shape and dtype, so one
# tuning key costs at most three compiles and three short timings.
_BIG = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3)
_BIG_K64 = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3)  # 16-bit
_TALL = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4)
_WIDE = triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4)
_SQUARE = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3)
_THIN = triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=4)
CONV_CONFIGS = [_BIG, _BIG_K64, _TALL, _WIDE, _SQUARE, _THIN]
MAX_CONFIGS = 3

# Pipelined operand buffers must fit the smallest target (sm_80: 164 KiB; sm_90: 228 KiB) with room
# for the epilogue, so one config set serves both.
_SMEM_BUDGET = 128 * 1024

# M (= N*OH*OW) in the tuning key is rounded up to a power of two, so batch sizes in one octave share a
# tuning; past 2^16 rows (>= 512 tiles of 128, several waves on 108..132 SMs) the ranking of tile
# shapes no longer depends on M, so larger batches share the last bucket.
_M_BUCKET_MAX = 2**16


def m_bucket(m: int) -> int:
    """The tuning key's stand-in for M: next power of two, at least 16, at most _M_BUCKET_MAX."""
    return min(max(16, triton.next_power_of_2(m)), _M_BUCKET_MAX)


def _fits(config: triton.Config, element_size: int) -> bool:
    kw = config.kwargs
    return (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * element_size * config.num_stages <= _SMEM_BUDGET


def _candidates(m_bucket_: int, cout_g: int, element_size: int) -> list[triton.Config]:
    """At most MAX_CONFIGS configs worth timing for this shape, best guess first, all fitting shared memory.

    Few output channels per group (grouped convs, 4..32): thin N tiles. Few rows (late layers at small
    batch): 64-row tiles, so there are enough programs for the SMs. Otherwise big square tiles. Tiny
    GEMMs (M <= 1024) get the first guess alone, untimed: their run time is mostly launch and one wave.
    """
    if cout_g <= 32:
        order = [_THIN, _SQUARE, _TALL]
    elif m_bucket_ <= 8192:
        order = [_SQUARE, _WIDE, _TALL] if cout_g >= 128 else [_SQUARE, _TALL, _THIN]
    elif cout_g <= 64:
        order = [_TALL, _SQUARE, _BIG]
    else:
        order = [_BIG_K64, _BIG, _TALL, _WIDE]
    fitting = [c for c in order if _fits(c, element_size)]
    return fitting[:1] if m_bucket_ <= 1024 else fitting[:MAX_CONFIGS]


def configs_for(m: int, cout_g: int, dtype: torch.dtype) -> list[triton.Config]:
    """The configs the autotuner times for a conv with M rows and cout_g output channels per group."""
    return _candidates(m_bucket(m), cout_g, torch.empty((), dtype=dtype).element_size())


def _prune(configs, named_args, **kwargs):
    # Autotuner hook: the arguments of one key give the same candidates (they depend on key values only).
    return _candidates(named_args["M_BUCKET"], named_args["COUT_G"], named_args["x_ptr"].element_size())


def _bench(kernel_call, quantiles):
    # A short budget per config (triton's default is 25 ms warm-up + 100 ms): the ranking of tile
    # shapes is clear within a few dozen runs, and compile time dominates the cost of a key anyway.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


# M is not specialized: with it bucketed in the tuning key, a new batch size reuses the compiled binary
# (its mask `rm < M` gains nothing from knowing that M is a multiple of 16).
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _conv_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    M,
    M_BUCKET,  # the autotuner's key for M (m_bucket), unused by the kernel
    H,
    W,
    OH,
    OW,
    CIN_G,
    COUT,
    COUT_G,
    stride_xn,
    stride_xh,
    stride_xw,
    STRIDE_H,
    STRIDE_W,
    PAD_H,
    PAD_W,
    DIL_H,
    DIL_W,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    FLAT_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixel (n, oh, ow)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel inside group g
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < COUT_G
    co = g * COUT_G + rn

    ow = rm % OW
    oh = (rm // OW) % OH
    n = rm // (OW * OH)
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    # int64: n * stride_xn passes 2^31 on big batches; offsets inside one image stay int32.
    x_row = n.to(tl.int64) * stride_xn + g * CIN_G

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # Few channels per group (stem, depthwise-like): a K block spans several taps, so
        # decode (kh, kw, ci) per element instead of wasting most of a channel block.
        K_G = KH * KW * CIN_G
        for k0 in range(0, K_G, BLOCK_K):
            k = k0 + rk
            ci = k % CIN_G
            tap = k // CIN_G
            ih = ih0[:, None] + (tap // KW)[None, :] * DIL_H
            iw = iw0[:, None] + (tap % KW)[None, :] * DIL_W
            a_mask = m_mask[:, None] & (k < K_G)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_off = x_row[:, None] + (ih * stride_xh + iw * stride_xw + ci[None, :])
            a = tl.load(x_ptr + a_off, mask=a_mask, other=0.0)
            b_mask = (k < K_G)[:, None] & n_mask[None, :]
            b = tl.load(w_ptr + k[:, None] * COUT + co[None, :], mask=b_mask, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        # One flat loop over (tap, channel block) so the whole reduction is software-pipelined.
        c_blocks = tl.cdiv(CIN_G, BLOCK_K)
        for it in range(0, KH * KW * c_blocks):
            tap = it // c_blocks
            c = (it % c_blocks) * BLOCK_K + rk
            ih = ih0 + (tap // KW) * DIL_H
            iw = iw0 + (tap % KW) * DIL_W
            row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_off = x_row + (ih * stride_xh + iw * stride_xw)
            a_mask = row_ok[:, None] & (c < CIN_G)[None, :]
            a = tl.load(x_ptr + a_off[:, None] + c[None, :], mask=a_mask, other=0.0)
            k = tap * CIN_G + c
            b_mask = (c < CIN_G)[:, None] & n_mask[None, :]
            b = tl.load(w_ptr + k[:, None] * COUT + co[None, :], mask=b_mask, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    # Output and residual are dense NHWC: row rm starts at rm * COUT.
    out_off = rm.to(tl.int64)[:, None] * COUT + co[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + out_off, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        acc = common.relu(acc)
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# Tuning results go to disk where this triton can do it (cache_results is absent in old releases).
_CACHE_KW = (
    {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
)

# TRITON_INTERPRET=1 at import makes @triton.jit return an interpreter object instead of a JITFunction.
_INTERPRET = not isinstance(_conv_fwd_kernel, triton.runtime.JITFunction)

TUNING_KEY = [
    "M_BUCKET",
    "H",
    "W",
    "CIN_G",
    "COUT",
    "COUT_G",
    "STRIDE_H",
    "STRIDE_W",
    "KH",
    "KW",
    "INPUT_PRECISION",
]
_conv_fwd_autotuned = triton.autotune(
    configs=CONV_CONFIGS,
    key=TUNING_KEY,
    prune_configs_by={"early_config_prune": _prune},
    do_bench=_bench,
    **_CACHE_KW,
)(_conv_fwd_kernel)


def pack_weight(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """[Cout, Cin/groups, KH, KW] -> GEMM operand [KH*KW*Cin/groups, Cout], rows ordered (kh, kw, ci).

    Group g owns columns g*Cout/groups ... (g+1)*Cout/groups, so one layout serves every groups
    value. Cache the result; conv_bias_act(..., packed=...) skips the repack.
    """
    cout, cin_g, kh, kw = weight.shape
    if cout % groups:
        raise ValueError(f"out channels {cout} not divisible by groups {groups}")
    return weight.permute(2, 3, 1, 0).reshape(kh * kw * cin_g, cout).contiguous()


def allow_tf32() -> bool:
    """Whether torch's own fp32 conv may use TF32: the cuDNN conv flag (not the matmul one; its default is
    on), so the Triton and cuDNN paths of a layer compute alike and TF32 is never on behind the user's back."""
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # torch >= 2.9 when the new API set cuDNN conv and RNN apart: read the conv's own
        return torch.backends.cudnn.conv.fp32_precision == "tf32"


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    groups: int = 1,
    *,
    packed: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """act(conv2d(x, weight) + bias (+ residual)), channels_last in and out, fp32 accumulation.

    `packed` is pack_weight(weight, groups) in x.dtype, cached by the caller. `config` forces one
    of CONV_CONFIGS instead of autotuning (tests; the interpreter takes the shape's first candidate).
    """
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    x = x.contiguous(memory_format=torch.channels_last)
    n, cin, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    if cin != cin_g * groups or cout % groups:
        raise ValueError(
            f"conv shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}, groups {groups}"
        )
    if packed is None:
        packed = pack_weight(weight.to(x.dtype), groups)
    if packed.shape != (kh * kw * cin_g, cout) or packed.dtype != x.dtype or not packed.is_contiguous():
        raise ValueError("packed must be pack_weight(weight, groups) in the input dtype")
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = torch.empty((n, cout, oh, ow), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    m = n * oh * ow
    if m >= 2**31:
        raise ValueError("more than 2^31 output pixels")
    if residual is not None:
        if residual.shape != out.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != output shape {tuple(out.shape)}")
        if residual.stride() != out.stride():
            residual = torch.empty_like(out).copy_(residual)
    if m == 0 or cout == 0:
        return out

    cout_g = cout // groups
    tf32 = x.dtype == torch.float32 and allow_tf32()
    args = (
        x,
        packed,
        bias if bias is not None else out,  # dummy pointers, never read (HAS_BIAS/HAS_RES)
        residual if residual is not None else out,
        out,
        m,
        m_bucket(m),
        h,
        w,
        oh,
        ow,
        cin_g,
        cout,
        cout_g,
        x.stride(0),
        x.stride(2),
        x.stride(3),
        sh,
        sw,
        ph,
        pw,
        dh,
        dw,
    )
    meta = dict(
        KH=kh,
        KW=kw,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        RELU=relu,
        # Channel blocks would be mostly padding: stem (3), small groups (4..48 per group), odd counts.
        FLAT_K=cin_g < 64 or cin_g % 32 != 0,
        INPUT_PRECISION="tf32" if tf32 else "ieee",
    )

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cout_g, meta["BLOCK_N"]), groups)

    if config is None and _INTERPRET:
        config = configs_for(m, cout_g, x.dtype)[0]
    with common.on_device(x):
        if config is None:
            _conv_fwd_autotuned[grid](*args, **meta)
        else:
            _conv_fwd_kernel[grid](
                *args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
            )
    return out
