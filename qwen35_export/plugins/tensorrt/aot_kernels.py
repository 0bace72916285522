"""Triton kernels for TensorRT's ahead-of-time (AOT) plug-in path, compiled to PTX by `triton.compile`.

A QDP AOT implementation launches exactly one kernel whose parameters are, in order: the plug-in's input
pointers, its extra scalar arguments, its output pointers. Our kernels (kernels/*) have their own parameter
order, so each plug-in gets a thin `@triton.jit` adapter in that order which calls the real kernel body
(Triton inlines it): the math is the kernels' own, not a copy.

- CausalConv1d: the prefill kernel (exact for every T, decode included), final state written in place of
  the initial one (the kernel reads the state only in the tile that writes it, before writing).
- GatedDeltaRule: the fused recurrent kernel for prefill and decode alike. The chunked prefill is three
  kernels and a QDP AOT plug-in launches one; the recurrent kernel is exact for every T (slower for long
  prompts). The state is updated in place: each program reads its [K, BV] tile of h0 first, writes it last.
- MoE / MoEFP8: no adapter. Our MoE is four kernels (align, gate-up and down grouped GEMMs, combine), so it
  has no single-kernel AOT form yet; the plug-in uses the JIT implementation (plugins.py).

Launch geometry lives here too (`*_launch`), written over dims that may be ints or TensorRT shape
expressions, so the AOT implementation and the CPU tests compute it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import triton
import triton.language as tl

from ...kernels.causal_conv1d.conv import causal_conv1d_fwd_kernel
from ...kernels.gated_delta_rule.recurrent import fused_recurrent_gdn_kernel, recurrent_blocks

# torch / TensorRT dtype names -> Triton pointer element types
TRITON_PTR = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "int64": "*i64"}
CONV_BT, CONV_BC = 64, 128  # tiles of kernels/causal_conv1d causal_conv1d_fwd


@triton.jit
def causal_conv1d_aot(x, w, s0, lengths, T, C, y, st,
                      W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """inputs (x, weight, conv_state, lengths), extras (T, C), outputs (y, final_state aliasing conv_state)."""
    # unused pointer parameters (cu_seqlens, state indices) get `lengths`: their flags are off
    causal_conv1d_fwd_kernel(x, w, s0, y, st, lengths, lengths, lengths, lengths, T, C,
                             W, WP, BT, BC, False, True, False, True, True)


@triton.jit
def gated_delta_rule_aot(q, k, v, g, beta, h0, T, o, ht,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, SCALE: tl.constexpr):
    """inputs (q, k, v, g, beta, h0), extras (T,), outputs (o, ht aliasing h0)."""
    # unused pointer parameters (state indices, per-step states) get h0 / o: their flags are off
    fused_recurrent_gdn_kernel(q, k, v, g, beta, o, h0, ht, h0, ht, o, SCALE, T,
                               H, HV, K, V, BK, BV, True, False, True, False)


@dataclass(frozen=True)
class AotKernel:
    """What `triton.compile` needs for one specialisation, and how to launch it."""

    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    n_inputs: int
    n_extras: int
    n_outputs: int


def causal_conv1d_kernel(x_dtype: str, state_dtype: str, W: int) -> AotKernel:
    sig = {"x": TRITON_PTR[x_dtype], "w": TRITON_PTR[x_dtype], "s0": TRITON_PTR[state_dtype], "lengths": "*i64",
           "T": "i32", "C": "i32", "y": TRITON_PTR[x_dtype], "st": TRITON_PTR[state_dtype]}
    const = {"W": W, "WP": triton.next_power_of_2(W - 1), "BT": CONV_BT, "BC": CONV_BC}
    sig.update({k: "constexpr" for k in const})
    return AotKernel(causal_conv1d_aot, sig, const, 4, 4, 2, 2)


def causal_conv1d_launch(B, T, C) -> tuple[tuple, tuple]:
    """(grid, extra args) for x [B, T, C]; dims may be ints or shape expressions."""
    return ((T + CONV_BT - 1) // CONV_BT, (C + CONV_BC - 1) // CONV_BC, B), (T, C)


def gated_delta_rule_kernel(act_dtype: str, H: int, HV: int, K: int, V: int) -> AotKernel:
    # Specialised for small batches (decode): the batch is dynamic at build time, and decode is where the
    # engine spends its steps.
    BV, nw = recurrent_blocks(1, HV, V)
    sig = {n: TRITON_PTR[act_dtype] for n in ("q", "k", "v")}
    sig.update({"g": "*fp32", "beta": "*fp32", "h0": "*fp32", "T": "i32", "o": TRITON_PTR[act_dtype], "ht": "*fp32"})
    const = {"H": H, "HV": HV, "K": K, "V": V, "BK": triton.next_power_of_2(K), "BV": BV, "SCALE": K ** -0.5}
    sig.update({k: "constexpr" for k in const})
    return AotKernel(gated_delta_rule_aot, sig, const, nw, 6, 1, 2)


def gated_delta_rule_launch(B, T, HV: int, V: int, BV: int) -> tuple[tuple, tuple]:
    return ((V + BV - 1) // BV, B * HV), (T,)


def compile_ptx(kernel: AotKernel, arch: int = 90):
    """`triton.compile` for sm_`arch` (works without a GPU: Triton ships ptxas). Returns the compiled
    kernel; `.asm["ptx"]`, `.metadata.name`, `.metadata.shared` are what TensorRT takes."""
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=kernel.fn, signature=kernel.signature, constexprs=kernel.constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": kernel.num_warps})
    # TensorRT passes only (inputs, extras, outputs); Triton appends scratch pointers that must stay unused.
    if compiled.metadata.global_scratch_size or getattr(compiled.metadata, "profile_scratch_size", 0):
        raise RuntimeError(f"{compiled.metadata.name}: needs Triton scratch memory, which a TensorRT AOT "
                           "plug-in cannot provide")
    return compiled
