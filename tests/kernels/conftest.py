"""Shared helpers for the Triton kernel tests: interpreter child process and ahead-of-time compiles.

Why a child process for the interpreter: TRITON_INTERPRET is read when `@triton.jit` decorates a
function, including triton's own library functions (tl.cdiv, ...) decorated at `import triton`.
So a process is either interpreted from its first `import triton` or not at all: flipping the
variable later, or importing a second copy of a kernel module under it, gives kernels that call
non-interpreted library functions and fail. An interpreted process, in turn, cannot compile
(ASTSource needs real JITFunctions). Hence: the normal test process compiles ahead of time and
runs each test file once more in a child with TRITON_INTERPRET=1, where the parity tests run
and the compile tests skip themselves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

# Shared memory per block (opt-in maximum) of the chips we ship for.
SMEM_LIMIT = {80: 167936, 90: 233472}
_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64"}


def _interpreter_scalars_index_as_triton_3_8() -> None:
    """Under the interpreter a scalar kernel argument is a one-element array; triton 3.6 turns it into
    a Python int (range(0, K, BLOCK), ...) with int(array), which numpy 2 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"). Triton 3.8 squeezes first: do the same on older ones."""
    try:
        from triton.runtime import interpreter

        original = interpreter._patch_lang_tensor
    except (ImportError, AttributeError):
        return

    def patch_lang_tensor(tensor, *scope):
        original(tensor, *scope)
        index = lambda self: int(self.handle.data.squeeze())  # noqa: E731
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_scalars_index_as_triton_3_8()


@pytest.fixture(scope="session")
def run_under_interpreter():
    """Run one test file with pytest in a child process where TRITON_INTERPRET=1; fail with its output."""

    def run(test_file: str, timeout: float = 300) -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"

    return run


@pytest.fixture(scope="session")
def aot_compile():
    """Compile a @triton.jit kernel for sm_<cc> without a GPU; check it fits the chip's shared memory.

    `pointers` maps pointer arguments to their torch dtype; `floats` names fp32 scalars; other
    non-constexpr arguments are i32. `divisible` names the arguments a real launch sees as multiples of
    16 (aligned pointers, channel counts): the JIT specializes on that, and it decides vector width and
    cp.async pipelining. `options` go to the compiler (enable_fp_fusion=False, as the launch passes it).
    """

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_(
        fn, pointers: dict, constexprs: dict, divisible, cc: int, num_warps: int, num_stages: int,
        floats=(), **options,
    ):  # fmt: skip
        sig = {a: "i32" for a in fn.arg_names}
        sig.update({k: "fp32" for k in floats})
        sig.update({k: "*" + _TRITON_TYPE[dt] for k, dt in pointers.items()})
        sig.update({k: "constexpr" for k in constexprs})
        assert set(sig) == set(fn.arg_names), "signature out of date with the kernel"
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
        options = {"num_warps": num_warps, "num_stages": num_stages, **options}
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
        assert "ptx" in compiled.asm and "cubin" in compiled.asm
        assert compiled.metadata.shared <= SMEM_LIMIT[cc], (
            f"{compiled.metadata.shared} B shared memory on sm_{cc}"
        )
        return compiled

    return compile_


@pytest.fixture
def interpreter_bf16(monkeypatch):
    """Make the interpreter do bfloat16 the way the GPU does; it "does not support it yet" (triton#11584).

    It keeps bf16 as raw uint16 bits: tl.dot multiplies the bits, and fp32 -> bf16 casts truncate.
    Widening dot operands to fp32 is exact (as bf16 MMA with fp32 accumulation) and casts round to
    nearest even (as cvt.rn.bf16.f32), so the kernels' own bf16 handling is what the tests see.
    """
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

        create_dot, cast_impl = InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl
    except (ImportError, AttributeError):
        pytest.skip("this triton's interpreter cannot be taught bfloat16")

    def widen(t):
        if t.dtype.scalar != tl.bfloat16:
            return t
        return TensorHandle((t.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def bf16_create_dot(self, a, b, *args, **kwargs):
        return create_dot(self, widen(a), widen(b), *args, **kwargs)

    def bf16_cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast_impl(self, src, dst_type)
        bits = src.data.astype(np.float32).view(np.uint32).astype(np.uint64)
        return TensorHandle(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16), tl.bfloat16)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", bf16_create_dot)
    monkeypatch.setattr(InterpreterBuilder, "cast_impl", bf16_cast_impl)
