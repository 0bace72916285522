"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter (no GPU in CI).

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection time.
On a machine with CUDA, set QWEN35_TRITON_GPU=1 to run the same tests compiled on the GPU instead.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = os.environ.get("QWEN35_TRITON_GPU") == "1" and torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import triton.language as tl  # noqa: E402


def _patch_interpreter_bf16() -> None:
    """Make the interpreter's bf16 arithmetic match the GPU's.

    Workaround for triton 3.9's interpreter (triton/runtime/interpreter.py), seen 2026-11-24:
    - `cast_impl` truncates fp32 -> bf16 (round toward zero) where GPUs round to nearest even: the bias
      adds up over a dot product and made bf16 results 10x worse than on the device;
    - `create_dot` multiplies the raw uint16 bits of bf16 operands (garbage results).
    Delete this once the interpreter rounds and multiplies bf16 like the hardware.
    """
    from triton.runtime import interpreter as it

    if getattr(it.InterpreterBuilder, "_qwen35_bf16_patched", False):
        return
    cast_impl = it.InterpreterBuilder.cast_impl
    create_dot = it.InterpreterBuilder.create_dot

    def rne_bf16(x: np.ndarray) -> np.ndarray:
        # round-to-nearest-even on the fp32 bit pattern, NaN kept
        b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(np.isnan(x), np.uint16(0x7FC0), r)

    def bf16_to_f32(x: np.ndarray) -> np.ndarray:
        return (x.astype(np.uint32) << 16).view(np.float32)

    def patched_cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return it.TensorHandle(rne_bf16(src.data), dst_type.scalar)
        if src.dtype.scalar.is_fp64() and dst_type.scalar == tl.bfloat16:
            return it.TensorHandle(rne_bf16(src.data.astype(np.float32)), dst_type.scalar)
        return cast_impl(self, src, dst_type)

    def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = it.TensorHandle(bf16_to_f32(a.data), tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = it.TensorHandle(bf16_to_f32(b.data), tl.float32)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    it.InterpreterBuilder.cast_impl = patched_cast
    it.InterpreterBuilder.create_fp_trunc = lambda self, src, dst_type: self.cast_impl(src, dst_type)
    it.InterpreterBuilder.create_dot = patched_dot
    it.InterpreterBuilder._qwen35_bf16_patched = True


if not ON_GPU:
    _patch_interpreter_bf16()


@pytest.fixture
def poison_empty(monkeypatch):
    """Make every torch.empty / empty_like in the test return NaN-filled (or -1 for ints) buffers, so an
    output element a kernel never writes shows up as NaN instead of as stale plausible memory."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(empty_like(*a, **kw)))
