"""resnet_fast::conv_bias_act and resnet_fast::scale_shift_act: the eval-mode fused ops.

conv_bias_act(x, w, b, residual, relu, stride, padding, dilation, groups)
    act(conv2d(x, w) + b (+ residual)); the output is channels_last. With BN folded into w and b
    (resnet_fast.fold) this is a whole Conv -> BN (-> +identity) (-> ReLU).
scale_shift_act(x, scale, shift, residual, relu)
    act(x * scale[c] + shift[c] (+ residual)) over channel dim 1 (eval BN when the conv is not
    fused); the output keeps x's layout.

Each backend has one entry in the impl tables below. The schemas take plain dense tensors, so
fake tensors and torch.compile(fullgraph=True) work; prepacked weights stay behind the cache of
folded weights (fold.packed_slot), consulted by the backend impls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext, fold
from . import layer_choice
from .backend import backend_for
from .buffers import Buffers, keep_freed_memory
from .fused import _layout

__all__ = ["Runner", "conv_bias_act", "conv_route", "conv_runner", "scale_shift_act"]

_CL = torch.channels_last
# run(x, residual, buffers=None) -> act(conv2d(x, w) + b (+ residual)), everything else bound: see
# conv_runner(). buffers (a Buffers) is where a path that can write into a given tensor takes its output.
Runner = Callable[..., Tensor]


def _channel_view(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


# ---- reference ("torch") implementations: unfused PyTorch in the input dtype ----


def _conv_torch(x, w, b, residual, relu, stride, padding, dilation, groups) -> Tensor:
    out = F.conv2d(x, w, b, stride, padding, dilation, groups)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def _scale_shift_torch(x, scale, shift, residual, relu) -> Tensor:
    out = x * _channel_view(scale, x).to(x.dtype) + _channel_view(shift, x).to(x.dtype)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


# ---- resnet_fast._C ("cpp") ----


# oneDNN picks a weight format per input shape (batch 1 and batch 8 differ); a pack made for another
# shape still runs, but reorders on every call. A few packs per weight cover the usual serving shapes.
_MAX_PACKS_PER_WEIGHT = 4


def _cpp_runner(x, w, b, residual, relu, stride, padding, dilation, groups, inplace=False) -> Runner:
    """oneDNN's fused convolution (prepacked weight), or where our kernels run (float32, groups 1, AVX2),
    whichever layer_choice measured fastest for this shape on this CPU (once; cached on disk): the
    implicit GEMM, or for 3x3 stride-1 layers Winograd F(2x2, 3x3) or F(4x4, 3x3); a close call is
    settled by timing its close paths in the model's first forwards (layer_choice.settle_in_model). With
    `inplace` (CPU) every path writes into the residual; else ours write into a buffer from the run's
    Buffers, oneDNN into a fresh output."""
    C = _ext.load()
    folded = w if isinstance(w, fold.Folded) else None
    slot = folded.packed if folded is not None else fold.packed_slot(w)

    def dense() -> Tensor:  # a Folded's weight is made only where a path reads it dense
        return folded.weight if folded is not None else w

    # A folded (persistent) weight: prepacked for oneDNN once per route, conv geometry and input shape,
    # on first use (not at all when our kernel is chosen from the cache).
    key = ("cpp", C.conv_route(x.device.type, x.dtype), *stride, *padding, *dilation, groups, *x.shape)
    x_shape = list(x.shape)

    def prepack() -> Tensor:
        packed = slot.get(key)
        if packed is None:
            ours = [k for k in slot if k[0] == "cpp"]
            if len(ours) >= _MAX_PACKS_PER_WEIGHT:
                del slot[ours[0]]  # the oldest
            packed = slot[key] = C.prepack_conv_weight(dense(), stride, padding, dilation, groups, x_shape)
        return packed

    weight = _held(prepack) if slot is not None else dense
    run, into_residual = C.conv_bias_act, C.conv_bias_act_into_residual

    def describe(buffers: Buffers | None, **out) -> None:  # this call, for nn.replay's compiled program
        _describe(
            buffers,
            kind="onednn",
            weight=weight(),
            bias=b,
            relu=relu,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            **out,
        )

    def onednn(x: Tensor, residual: Tensor | None, buffers: Buffers | None = None) -> Tensor:
        describe(buffers)
        return run(x, weight(), b, residual, relu, stride, padding, dilation, groups)

    def onednn_in_place(x: Tensor, residual: Tensor, buffers: Buffers | None = None) -> Tensor:
        x, residual = x.contiguous(memory_format=_CL), residual.contiguous(memory_format=_CL)
        describe(buffers, out=residual)
        return into_residual(x, weight(), b, residual, relu, stride, padding, dilation, groups)

    library = onednn_in_place if inplace and residual is not None and x.device.type == "cpu" else onednn
    library.__name__ = "onednn"
    if x.device.type == "cpu":
        keep_freed_memory()  # oneDNN's outputs, and our first forward's, come back from the heap next time
    kernels = _own_kernels(C, slot, x, w, dense, b, relu, stride, padding, dilation, groups, onednn)
    if not kernels:
        return library
    shape = _conv_out_shape(x, w, stride, padding, dilation)
    # Ours are timed as they run in a model's forward: into a warm output buffer, with warm scratch.
    out = torch.empty(shape, dtype=x.dtype, memory_format=_CL)
    space = Buffers()
    sample = [x, residual]  # what the candidates run on
    candidates = {"onednn": lambda: onednn(*sample)}
    for name, (kernel, _) in kernels.items():
        candidates[name] = lambda kernel=kernel: kernel(*sample, out, space)

    choice_key = layer_choice.conv_key(
        tuple(x.shape),
        tuple(w.shape),
        x.dtype,
        stride,
        padding,
        dilation,
        groups,
        residual is not None,
        "cpu",
    )
    # Each sample runs as in a forward: the layer's weights out of cache (ResNet-50's are ~100 MB; else
    # a path with bigger weights, Winograd F(4x4)'s are 4x the conv's, looks faster than it runs there).
    # oneDNN's fresh output comes from memory the heap kept, as in a forward (keep_freed_memory).
    evict = C.evict_from_cache

    def before(path: str) -> None:
        for packed in list(slot.values()):
            evict(packed)

    # The packers say whether every packed value is finite; a NaN or Inf weight runs oneDNN (where torch
    # skips the padding, the GEMM would multiply it by 0; Winograd's transforms spread it over a tile).
    if layer_choice.known_cpu(choice_key, candidates) is None:
        if any(p() is None for _, p in kernels.values()):
            return library  # paths are measured with finite weights only
        # Winograd returns at once on an input with Inf or NaN (which a first call may have): every path is
        # then timed on the input with those made 0. Scanned only here (ResNet-50's inputs at batch 8 took
        # 51 ms of a first call scanned for every layer).
        if any(name.startswith("winograd") for name in kernels) and not all(
            C.all_finite(t) for t in sample if t is not None
        ):
            sample[:] = [
                None if t is None else torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in sample
            ]
    path = layer_choice.choose_cpu(choice_key, candidates, before=before)
    # A close call (another path within CPU_DECISIVE of it alone) is settled in the model's forwards.
    paths = [path, *layer_choice.rivals_cpu(choice_key, path)]

    def plan(name: str) -> Runner:
        if name == "onednn":
            return library
        kernel, packed = kernels[name]

        def ours(x: Tensor, residual: Tensor | None, buffers: Buffers | None = None) -> Tensor:
            # A NaN or Inf weight (packed on a plan's first call, a rival's on its turn): oneDNN on the
            # folded weight, not its prepacked form (freed once ours was chosen).
            if packed() is None:
                return run(x, dense(), b, residual, relu, stride, padding, dilation, groups)
            # The kernels read channels_last (each converts its x); a plan is keyed by shape, not layout.
            if residual is not None:
                residual = residual.contiguous(memory_format=_CL)
            if inplace and residual is not None:
                return kernel(x, residual, residual, buffers)
            return kernel(x, residual, buffers.output(shape, x) if buffers is not None else None, buffers)

        ours.__name__ = name
        return ours

    def keep_packs(names: list[str]) -> None:
        for name in kernels:
            if name not in names:
                slot.pop((name,), None)  # our packed weight, if measured: not needed (a plan holds its own)
        if "onednn" not in names:
            slot.pop(key, None)  # oneDNN's, if measured: only a Winograd plan keeps it (its fallback)

    keep_packs(paths)
    if len(paths) == 1:
        return plan(path)
    return layer_choice.settle_in_model(
        choice_key, {p: plan(p) for p in paths}, on_settled=lambda p: keep_packs([p])
    )


def _own_kernels(
    C, slot, x, w, dense, b, relu, stride, padding, dilation, groups, library
) -> dict[str, tuple[Callable[..., Tensor], Callable[[], Tensor | None]]]:
    """resnet_fast._C's kernels that run this layer, by path name: (kernel(x, residual, out, buffers), its
    packed weight: packed on first use, kept beside the fold; None where a packed value is not finite).
    They take groups 1, output channels in 16-channel panels, a CPU with AVX2 + FMA (AVX-512 used where
    present), and a folded weight: w a fold.Folded (packed from its conv weight and BN scale) or a weight
    it made (dense() gives it). Float32: a 3x3 stride-1 layer
    gets Winograd, F(2x2, 3x3) ("winograd") and F(4x4, 3x3) ("winograd4": fewer multiplications, 2.25x
    the weight bytes), and where it has fewer pixels than output channels also the implicit GEMM,
    which reads the fewest weight bytes and can win where they bound the layer (batch 1 at 7x7 with
    512 channels: 1.81 ms vs Winograd's 2.2-2.3 and oneDNN's 1.97 on the Xeon; on larger inputs
    Winograd won every time, so the GEMM is not timed there; `library` runs where Winograd cannot); a layer
    with few input channels (the stem's 3) gets the GEMM over kernel rows ("gemm_rows"); other shapes get
    the GEMM. Bfloat16 (CPUs with AVX512_BF16): the GEMM where the input channels pair up (an even
    number), the GEMM over kernel rows where they are few (the stem's 3, given a zero fourth); on CPUs with AMX-BF16
    also the convolution on AMX tiles ("amx") where the channels come in multiples of 32; a 3x3 stride-1 layer
    also Winograd F(2x2, 3x3) (transforms in float32, its operands rounded to bfloat16: on the Zen 4 at batch
    8, 1.33-1.50x the GEMM's speed at 14x14 and 7x7, 0.85-1.0x at 56x56 and 28x28)."""
    if (
        slot is None
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.bfloat16)
        or groups != 1
        or w.shape[0] % 16
        or not C.conv_gemm_supported()
    ):
        return {}
    # What the packers read: a fold's conv weight and BN scale (w * scale[o] rounded once to the run dtype,
    # as Folded.weight computes it), else the folded weight.
    if isinstance(w, fold.Folded) and w.source.dtype == w.dtype and w.scale.dtype == torch.float32:
        source, scale = w.source, w.scale
    else:
        source, scale = dense(), None
    bias = None if b is None else b.float().contiguous()  # the kernels add a float32 bias
    gemm = C.conv_gemm_bias_act
    if x.dtype == torch.bfloat16:
        # The GEMM on AVX512_BF16's dot products (channel pairs), float32 sums rounded once.
        if not C.conv_gemm_bf16_supported():
            return {}
        # AMX tiles (where the CPU has them): 32 output channels a block, up to 32 input channels a step.
        amx = C.conv_amx_supported() and w.shape[0] % 32 == 0 and list(dilation) == [1, 1]
        if w.shape[1] < 8 and list(dilation) == [1, 1]:
            rows = _packed(slot, "gemm_rows", lambda: _pack_rows(C, source, scale))
            kernels = {"gemm_rows": (_gemm_rows(C, rows, w, bias, relu, stride, padding), rows)}
            if (
                amx and w.shape[3] * (w.shape[1] + w.shape[3] * w.shape[1] % 2) <= 32
            ):  # a kernel row: one step
                kernels["amx_rows"] = (_gemm_rows(C, rows, w, bias, relu, stride, padding, amx=True), rows)
            return kernels
        if w.shape[1] % 2:
            return {}
        packed = _packed(slot, "gemm", lambda: C.pack_conv_gemm_weight(source, scale))
        kernels = {"gemm": (_gemm(gemm, packed, bias, relu, stride, padding, dilation), packed)}
        if amx and (w.shape[1] % 32 == 0 or w.shape[1] < 32):
            kernels["amx"] = (_amx(C, packed, w.shape[2:], bias, relu, stride, padding), packed)  # the same
        if _winograd_shape(w, stride, dilation):  # F(2x2, 3x3) only: F(4x4)'s coefficients cost bf16 too much
            wino = _packed(slot, "winograd", lambda: C.pack_winograd_weight(source, 2, scale))
            kernels["winograd"] = (_winograd(C, wino, x, w, bias, relu, padding, 2, library), wino)
        return kernels
    if _winograd_shape(w, stride, dilation):
        kernels = {}
        for tile, name in ((2, "winograd"), (4, "winograd4")):
            packed = _packed(slot, name, lambda tile=tile: C.pack_winograd_weight(source, tile, scale))
            kernels[name] = (_winograd(C, packed, x, w, bias, relu, padding, tile, library), packed)
        if x.shape[0] * x.shape[2] * x.shape[3] < w.shape[0]:  # fewer pixels than channels: weight-bound
            packed = _packed(slot, "gemm", lambda: C.pack_conv_gemm_weight(source, scale))
            kernels["gemm"] = (_gemm(gemm, packed, bias, relu, stride, padding, dilation), packed)
        return kernels
    if w.shape[1] < 8 and list(dilation) == [1, 1]:
        rows = _packed(slot, "gemm_rows", lambda: _pack_rows(C, source, scale))
        return {"gemm_rows": (_gemm_rows(C, rows, w, bias, relu, stride, padding), rows)}
    packed = _packed(slot, "gemm", lambda: C.pack_conv_gemm_weight(source, scale))
    return {"gemm": (_gemm(gemm, packed, bias, relu, stride, padding, dilation), packed)}


def _winograd_shape(w, stride, dilation) -> bool:
    """A 3x3 stride-1 layer whose input channels come in eights (the transforms' vector width)."""
    return (
        tuple(w.shape[2:]) == (3, 3)
        and list(stride) == [1, 1]
        and list(dilation) == [1, 1]
        and w.shape[1] % 8 == 0
    )


def _winograd(C, packed, x, w, bias, relu, padding, tile: int, fallback) -> Callable[..., Tensor]:
    """Winograd F(tile x tile, 3x3) (C.conv_winograd_bias_act) on a weight transformed on first use.

    Its transforms mix a 4x4 or 6x6 patch: the kernel returns None, having written nothing (not even an
    in-place residual), for an input with Inf or NaN, which it would spread where torch keeps outputs
    finite; fallback(x, residual) (oneDNN, whose prepacked weight only Winograd plans keep) runs then."""
    size = C.winograd_workspace_size(list(x.shape), w.shape[0], padding, tile)
    winograd = C.conv_winograd_bias_act

    def run_winograd(x: Tensor, residual: Tensor | None, out: Tensor | None, buffers) -> Tensor:
        space = buffers.scratch(size, x.device) if buffers is not None else None
        x = x.contiguous(memory_format=_CL)
        _describe(
            buffers,
            kind="winograd",
            weight=packed(),
            bias=bias,
            relu=relu,
            padding=padding,
            out=out,
            workspace=space,
            fallback=fallback,
        )
        y = winograd(x, packed(), bias, residual, relu, padding, out, space)
        return fallback(x, residual) if y is None else y

    return run_winograd


def _gemm(gemm, packed, bias, relu, stride, padding, dilation) -> Callable[..., Tensor]:
    """The implicit GEMM (C.conv_gemm_bias_act) on a weight packed on first use."""

    def run_gemm(x: Tensor, residual: Tensor | None, out: Tensor | None, buffers) -> Tensor:
        x = x.contiguous(memory_format=_CL)
        _describe(
            buffers,
            kind="gemm",
            weight=packed(),
            bias=bias,
            relu=relu,
            stride=stride,
            padding=padding,
            dilation=dilation,
            out=out,
        )
        return gemm(x, packed(), bias, residual, relu, stride, padding, dilation, out)

    return run_gemm


def _amx(C, packed, kernel, bias, relu, stride, padding) -> Callable[..., Tensor]:
    """The bfloat16 convolution on AMX tiles (C.conv_amx_bias_act). Its tiles read pixels at a fixed
    stride, so a padded layer reads a zero-padded copy of x, and a strided 1x1 layer the pixels it
    reads, copied together (it then runs as one GEMM over the batch; row by row, a 7-pixel output row
    fills 7 of a tile's 16 rows): copies made in one pass into buffers of the run."""
    amx = C.conv_amx_bias_act
    ph, pw = padding
    one_by_one = tuple(kernel) == (1, 1)

    def run_amx(x: Tensor, residual: Tensor | None, out: Tensor | None, buffers) -> Tensor:
        x = x.contiguous(memory_format=_CL)
        n, cin, h, width = x.shape
        step = dict(kind="amx", weight=packed(), bias=bias, relu=relu, stride=stride, padding=[0, 0], out=out)
        if ph or pw:
            shape = [n, cin, h + 2 * ph, width + 2 * pw]
            padded = _buffer(buffers, shape, x)
            C.pad_cl(x, padding, padded)
            x = padded
            step.update(stage="pad", stage_args=padding, staged=padded)
        elif one_by_one and list(stride) != [1, 1]:
            sh, sw = stride
            picked = _buffer(buffers, [n, cin, (h - 1) // sh + 1, (width - 1) // sw + 1], x)
            x = picked.copy_(x[:, :, ::sh, ::sw])
            step.update(stage="pick", stage_args=stride, staged=picked, stride=[1, 1])
            _describe(buffers, **step)
            return amx(x, packed(), bias, residual, relu, [1, 1], [0, 0], out)
        _describe(buffers, **step)
        return amx(x, packed(), bias, residual, relu, stride, [0, 0], out)

    return run_amx


def _describe(buffers: Buffers | None, **step) -> None:
    """While nn.replay captures a forward (buffers.captured a list): this kernel call, as the arguments of
    C.Program.add, with the run's own buffers in it (the step's input and residual are the program's)."""
    if buffers is not None and buffers.captured is not None:
        buffers.captured.append(step)


def _buffer(buffers, shape: list[int], x: Tensor) -> Tensor:
    """A channels_last tensor of this shape in x's dtype: from the run's buffers (kept between forwards)
    when there are some, else fresh."""
    if buffers is not None:
        return buffers.output(shape, x)
    return torch.empty(shape, dtype=x.dtype, memory_format=_CL)


def _gemm_rows(C, packed, w, bias, relu, stride, padding, amx: bool = False) -> Callable[..., Tensor]:
    """The implicit GEMM for a layer with few input channels (the stem: 3), reading each kernel row's KW
    taps as one pixel of KW x Cin channels: in a zero-padded channels_last copy of x, those taps lie next
    to each other, so a strided view of it is a KH x 1 convolution with KW x Cin input channels (7 taps of
    21 instead of 49 taps of 3: the micro-kernel's K loop runs 7 times longer per row pointer). In
    bfloat16 (channel pairs) the copy gets one zero channel more where KW x Cin is odd (the stem: 7 x 4).
    With `amx`, the view runs on AMX tiles (C.conv_amx_bias_act: a kernel row's 28 channels one step)."""
    cout, cin, kh, kw = w.shape
    cin_p = _rows_channels(w)
    gemm, on_amx = C.conv_gemm_bias_act, C.conv_amx_bias_act
    ph, pw = padding

    def run_gemm_rows(x: Tensor, residual: Tensor | None, out: Tensor | None, buffers) -> Tensor:
        n, _, h, width = x.shape
        hp, wp = h + 2 * ph, width + 2 * pw
        shape = [n, cin_p, hp, wp]
        padded = _buffer(buffers, shape, x)
        C.pad_cl(x, padding, padded)  # x zero-padded (and given a zero channel where cin_p > cin), one pass
        view = padded.as_strided((n, kw * cin_p, hp, wp - kw + 1), (hp * wp * cin_p, 1, wp * cin_p, cin_p))
        _describe(
            buffers,
            kind="amx" if amx else "gemm",
            weight=packed(),
            bias=bias,
            relu=relu,
            stride=stride,
            out=out,
            stage="pad",
            stage_args=padding,
            staged=padded,
            view_sizes=list(view.shape),
            view_strides=list(view.stride()),
        )
        if amx:
            return on_amx(view, packed(), bias, residual, relu, stride, [0, 0], out)
        return gemm(view, packed(), bias, residual, relu, stride, [0, 0], [1, 1], out)

    return run_gemm_rows


def _rows_channels(w) -> int:
    """The channels of _gemm_rows's padded input copy: one more where bfloat16 pairs them (KW x Cin odd)."""
    cin, kw = w.shape[1], w.shape[3]
    return cin + (w.dtype == torch.bfloat16 and kw * cin % 2 == 1)


def _pack_rows(C, w: Tensor, scale: Tensor | None) -> Tensor | None:
    """w [Cout, Cin, KH, KW] (times scale[o]) as _gemm_rows's [Cout, KW * Cin_p, KH, 1] weight (channel
    kx * Cin_p + c of the view's pixel), packed."""
    cout, cin, kh, kw = w.shape
    cin_p = _rows_channels(w)
    wp = torch.nn.functional.pad(w, (0, 0, 0, 0, 0, cin_p - cin))
    return C.pack_conv_gemm_weight(wp.permute(0, 3, 1, 2).reshape(cout, kw * cin_p, kh, 1), scale)


def _held(make: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """A function returning make()'s tensor, made on the first call and held from then on."""
    held: list[Tensor] = []

    def get() -> Tensor:
        if not held:
            held.append(make())
        return held[0]

    return get


def _packed(slot: dict, name: str, pack: Callable[[], Tensor | None]) -> Callable[[], Tensor | None]:
    """Our kernel's packed weight (None: not finite), packed on first use and kept in the weight's slot
    under (name,), so plans for other input shapes share it (packing is shape-independent)."""

    def make() -> Tensor | None:
        if (name,) not in slot:
            slot[(name,)] = pack()
        return slot[(name,)]

    return _held(make)


# ---- Triton ("triton"), imported on first use ----


def _triton_runner(x, w, b, residual, relu, stride, padding, dilation, groups, inplace=False) -> Runner:
    """Per conv shape, the Triton conv with its epilogue or cuDNN conv + the Triton epilogue, whichever
    layer_choice measured faster (on first use; cached on disk). Outputs are fresh (`inplace` is an
    allowance, not used here)."""
    from ..kernels.triton import conv

    slot = fold.packed_slot(w)
    packed = None
    if slot is not None:
        key = ("triton", groups)
        packed = slot.get(key)
        if packed is None:
            packed = slot[key] = conv.pack_weight(w, groups)
    shift = b if b is not None else torch.zeros(w.shape[0], dtype=x.dtype, device=x.device)
    ones = torch.ones_like(shift)

    def triton_conv(x: Tensor, residual: Tensor | None, buffers: Buffers | None = None) -> Tensor:
        return conv.conv_bias_act(x, w, b, residual, relu, stride, padding, dilation, groups, packed=packed)

    def cudnn_conv(x: Tensor, residual: Tensor | None, buffers: Buffers | None = None) -> Tensor:
        # cuDNN conv (channels_last in, channels_last out), then the Triton epilogue.
        y = F.conv2d(x, w, None, stride, padding, dilation, groups)
        return _scale_shift_triton(y, ones, shift, residual, relu)

    key = layer_choice.conv_key(
        tuple(x.shape), tuple(w.shape), x.dtype, stride, padding, dilation, groups, residual is not None
    )
    if torch.cuda.is_current_stream_capturing():
        # A choice made during capture is provisional (nothing is measured there): decide per call.
        return lambda x, residual, buffers=None: (
            triton_conv if layer_choice.choose(key, {}) == "triton" else cudnn_conv
        )(x, residual)
    path = layer_choice.choose(
        key, {"triton": lambda: triton_conv(x, residual), "cudnn": lambda: cudnn_conv(x, residual)}
    )
    return triton_conv if path == "triton" else cudnn_conv


def _scale_shift_triton(x, scale, shift, residual, relu) -> Tensor:
    from ..kernels.triton import elementwise

    return elementwise.scale_shift_act(x, scale, shift, residual, relu)


def _per_call_runner(impl: Callable[..., Tensor]) -> Callable[..., Runner]:
    """A runner for a backend that resolves everything on each call."""

    def make(x, w, b, residual, relu, stride, padding, dilation, groups, inplace=False) -> Runner:
        return lambda x, residual, buffers=None: impl(
            x, w, b, residual, relu, stride, padding, dilation, groups
        )

    return make


_CONV_RUNNER = {
    "triton": _triton_runner,
    "cpp": _cpp_runner,
    "torch": _per_call_runner(_conv_torch),
}
_SCALE_SHIFT = {
    "triton": _scale_shift_triton,
    "cpp": lambda x, scale, shift, residual, relu: _ext.load().scale_shift_act(
        x, scale, shift, residual, relu
    ),
    "torch": _scale_shift_torch,
}


# ---- conv_bias_act ----


def _conv_out_shape(x, w, stride, padding, dilation) -> list:
    n, _, h, wd = x.shape
    cout, _, kh, kw = w.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return [n, cout, oh, ow]


def _check_conv(x, w, b, residual, stride, padding, dilation, groups) -> None:
    """Clear errors for every backend (torch's own would differ from _C's and Triton's)."""
    if x.dim() != 4 or len(w.shape) != 4:
        raise ValueError(f"conv_bias_act: expected 4-D x and w, got {tuple(x.shape)} and {tuple(w.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"conv_bias_act: expected a floating-point input, got {x.dtype}")
    for name, t in (("w", w), ("b", b), ("residual", residual)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(
                f"conv_bias_act: {name} is {t.dtype} on {t.device}, the input {x.dtype} on {x.device}"
            )
    for name, v, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(v) != 2 or min(v) < low:
            raise ValueError(f"conv_bias_act: {name} must be 2 values >= {low}, got {list(v)}")
    if groups < 1 or x.shape[1] != w.shape[1] * groups or w.shape[0] % groups:
        raise ValueError(
            f"conv_bias_act: x {tuple(x.shape)}, w {tuple(w.shape)} and groups={groups} do not match"
        )
    out = _conv_out_shape(x, w, stride, padding, dilation)
    if min(out[2:]) < 1:
        raise ValueError(f"conv_bias_act: input {tuple(x.shape)} is smaller than the kernel {tuple(w.shape)}")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"conv_bias_act: b must have shape ({w.shape[0]},), got {tuple(b.shape)}")
    if residual is not None and list(residual.shape) != out:
        raise ValueError(
            f"conv_bias_act: residual shape {tuple(residual.shape)} != output shape {tuple(out)}"
        )


@torch.library.custom_op("resnet_fast::conv_bias_act", mutates_args=())
def conv_bias_act(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    residual: Tensor | None,
    relu: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    """act(conv2d(x, w, b) (+ residual)), channels_last output, on the backend of x's device."""
    run = conv_runner(x, w, b, residual, relu, stride, padding, dilation, groups)
    return run(x, residual).contiguous(memory_format=_CL)


def conv_runner(
    x: Tensor,
    w: Tensor | fold.Folded,
    b: Tensor | None,
    residual: Tensor | None,
    relu: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    inplace: bool = False,
) -> Runner:
    """What conv_bias_act runs for inputs like these, resolved once: arguments checked, backend
    picked, weight prepacked, path chosen. run(x, residual) then costs about one backend call; it
    is valid only for x and residual of the same shape, dtype, device and layout as given here,
    with w and b unchanged (nn.fused's per-layer plans keep it under those conditions).

    w may be a fold.Folded (its bias is b): the cpp backend's kernels pack from its conv weight and BN
    scale, so its folded weight is made only where a path reads it (oneDNN); other backends take it.

    inplace=True allows the run to write its output into the residual and return it (the caller
    guarantees nothing else reads the residual afterwards); a path may still return a fresh tensor."""
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    _check_conv(x, w, b, residual, stride, padding, dilation, groups)
    make = _CONV_RUNNER[backend_for(x.device)]
    if isinstance(w, fold.Folded) and make is not _cpp_runner:
        w = w.weight
    if inplace and residual is not None:
        return make(x, w, b, residual, relu, stride, padding, dilation, groups, inplace=True)
    return make(x, w, b, residual, relu, stride, padding, dilation, groups)


@conv_bias_act.register_fake
def _(x, w, b, residual, relu, stride, padding, dilation, groups) -> Tensor:
    shape = _conv_out_shape(x, w, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_CL)


def _conv_setup(ctx, inputs, output) -> None:
    x, w, b, residual, relu, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, w, output if relu else None)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.has_b, ctx.has_residual = b is not None, residual is not None


def _conv_backward(ctx, grad: Tensor):
    x, w, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    if out is not None:
        grad = torch.where(out <= 0, 0, grad)  # torch's relu backward: NaN passes
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x = grad_w = None
    if need_x or need_w:
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, w, None, stride, padding, dilation, False, [0, 0], groups, [need_x, need_w, False]
        )
    grad_b = grad.sum((0, 2, 3)) if ctx.has_b else None
    grad_residual = grad if ctx.has_residual else None
    return grad_x, grad_w, grad_b, grad_residual, None, None, None, None, None


conv_bias_act.register_autograd(_conv_backward, setup_context=_conv_setup)


# ---- scale_shift_act ----


def _check_scale_shift(x, scale, shift, residual) -> None:
    if x.dim() < 2 or not x.is_floating_point():
        raise ValueError(
            f"scale_shift_act: expected a floating-point [N, C, ...] input, got {x.dtype} {tuple(x.shape)}"
        )
    for name, v in (("scale", scale), ("shift", shift)):
        if v.dim() != 1 or v.numel() != x.shape[1] or not v.is_floating_point() or v.device != x.device:
            raise ValueError(
                f"scale_shift_act: {name} must be a 1-D floating tensor of {x.shape[1]} elements on "
                f"{x.device}, got {v.dtype} {tuple(v.shape)} on {v.device}"
            )
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device
    ):
        raise ValueError(
            f"scale_shift_act: residual {residual.dtype} {tuple(residual.shape)} does not match the input "
            f"{x.dtype} {tuple(x.shape)}"
        )


@torch.library.custom_op("resnet_fast::scale_shift_act", mutates_args=())
def scale_shift_act(x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
    """act(x * scale[c] + shift[c] (+ residual)) over channel dim 1; the output has x's layout."""
    _check_scale_shift(x, scale, shift, residual)
    fmt = _layout(x)
    return _SCALE_SHIFT[backend_for(x.device)](x, scale, shift, residual, relu).contiguous(memory_format=fmt)


@scale_shift_act.register_fake
def _(x, scale, shift, residual, relu) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_layout(x))


def _scale_shift_setup(ctx, inputs, output) -> None:
    x, scale, shift, residual, relu = inputs
    ctx.save_for_backward(x, scale, output if relu else None)
    ctx.has_residual, ctx.shift_dtype = residual is not None, shift.dtype


def _scale_shift_backward(ctx, grad: Tensor):
    x, scale, out = ctx.saved_tensors
    if out is not None:
        grad = torch.where(out <= 0, 0, grad)  # torch's relu backward: NaN passes
    dims = [0, *range(2, x.dim())]
    grad_x = grad * _channel_view(scale, x).to(grad.dtype) if ctx.needs_input_grad[0] else None
    grad_scale = (grad * x).sum(dims).to(scale.dtype) if ctx.needs_input_grad[1] else None
    grad_shift = grad.sum(dims).to(ctx.shift_dtype) if ctx.needs_input_grad[2] else None
    grad_residual = grad if ctx.has_residual else None
    return grad_x, grad_scale, grad_shift, grad_residual, None


scale_shift_act.register_autograd(_scale_shift_backward, setup_context=_scale_shift_setup)


def conv_route(device_type: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """Which convolution route resnet_fast._C takes on `device_type` for `dtype`, and why."""
    module = _ext.load()
    if module is None:
        return f"none (resnet_fast._C unavailable: {_ext.reason()})"
    return module.conv_route(device_type, dtype)
