"""Triton kernels for TensorRT's ahead-of-time (AOT) plug-in path, compiled to PTX by `triton.compile`.

A QDP AOT implementation launches exactly one kernel whose parameters are, in order: the plug-in's input
pointers, its extra scalar arguments, its output pointers. Our kernels (kernels/*) have their own parameter
order, so each plug-in gets a thin `@triton.jit` adapter in that order which calls the real kernel body
(Triton inlines it): the math is the kernels' own, not a copy. Calls pass every argument by keyword, so
a kernel that gains a parameter fails loudly here (tests/plugins) rather than shifting arguments.

- CausalConv1d: the prefill kernel (exact for every T, decode included), final state written in place of
  the initial one (the kernel reads the state only in the tile that writes it, before writing).
- GatedDeltaRule: the fused recurrent kernel for prefill and decode alike. The chunked prefill is three
  kernels and a QDP AOT plug-in launches one; the recurrent kernel is exact for every T (slower for long
  prompts). The state is updated in place: each program reads its [K, BV] tile of h0 first, writes it last.
- MoE / MoEFP8: our MoE is four kernels (align, gate-up and down grouped GEMMs, combine), which one AOT
  plug-in cannot launch. For TensorRT the node is split in two plug-ins (onnx_prep.py), each one kernel
  written here: MoEGateUp (h = silu(x Wg^T) * (x Wu^T) per token and slot, fp32) and MoEDown (the
  weighted sum over slots of h Wd^T). No expert grouping: every (token, slot) reads its expert's rows, so
  decode reads each chosen expert once and prefill re-reads experts per token (correct, not fast; the
  grouped GEMMs need the align kernel first). FP8 weights are dequantised tile by tile with their
  128x128 block scales.

Launch geometry lives here too (`*_launch`), written over dims that may be ints or TensorRT shape
expressions, so the AOT implementation and the CPU tests compute it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import triton
import triton.language as tl

from ...kernels.causal_conv1d.conv import prefill_program
from ...kernels.gated_delta_rule.recurrent import fused_recurrent_gdn_kernel, recurrent_blocks

# torch / TensorRT dtype names -> Triton pointer element types
TRITON_PTR = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "int64": "*i64"}
CONV_BT, CONV_BC = 64, 128  # one [BT, BC] tile per program (kernels/causal_conv1d prefill_program, NT = 1)


@triton.jit
def causal_conv1d_aot(x, w, s0, lengths, T, C, y, st,
                      W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """inputs (x, weight, conv_state, lengths), extras (T, C), outputs (y, final_state aliasing conv_state)."""
    # grid (time tile, channel tile, row) on contiguous x [B, T, C]; unused pointer parameters (cu_seqlens,
    # state indices) get `lengths`: their flags are off
    prefill_program(x, w, s0, y, st, lengths, lengths, lengths, lengths, T, C, T * C, C,
                    tl.program_id(1), tl.program_id(0), tl.program_id(2), W, WP, BT, BC, 1, False, False, True,
                    False, True, True)


@triton.jit
def gated_delta_rule_aot(q, k, v, g, beta, h0, T, o, ht,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, SCALE: tl.constexpr):
    """inputs (q, k, v, g, beta, h0), extras (T,), outputs (o, ht aliasing h0)."""
    # unused pointer parameters (gate inputs, state indices, per-step states) get h0 / o: their flags are off
    fused_recurrent_gdn_kernel(q=q, k=k, v=v, g=g, beta=beta, A_log=h0, dt_bias=h0, o=o, h0=h0, ht=ht, h0_idx=h0,
                               ht_idx=ht, hs=o, scale=SCALE, T=T, SQ=H * K, SK=H * K, SV=HV * V, H=H, HV=HV, K=K,
                               V=V, BK=BK, BV=BV, USE_H0=True, USE_IDX=False, STORE_HT=True, STORE_STEPS=False,
                               USE_GATE=False)  # the plug-in's q, k, v are contiguous


@triton.jit
def _moe_gate_up(x, ids, w, ws, H, I, h, TOPK: tl.constexpr, FP8: tl.constexpr, BI: tl.constexpr,
                 BH: tl.constexpr):
    """x [N,H], ids [N,k], w_gate_up [E,2I,H] (+ scales [E,2I/128,ceil(H/128)] when FP8) -> h [N,k,I] fp32.
    One program per (token*slot, I block)."""
    ns = tl.program_id(0).to(tl.int64)  # token * TOPK + slot
    rows = tl.program_id(1) * BI + tl.arange(0, BI)
    mi = rows < I
    e = tl.load(ids + ns).to(tl.int64)
    n = ns // TOPK
    HB = (H + 127) // 128
    acc_g = tl.zeros([BI], dtype=tl.float32)
    acc_u = tl.zeros([BI], dtype=tl.float32)
    for h0 in range(0, H, BH):
        cols = h0 + tl.arange(0, BH)
        mh = cols < H
        m = mi[:, None] & mh[None, :]
        xv = tl.load(x + n * H + cols, mask=mh, other=0.).to(tl.float32)
        wg = tl.load(w + (e * 2 * I + rows[:, None]) * H + cols[None, :], mask=m, other=0.).to(tl.float32)
        wu = tl.load(w + (e * 2 * I + I + rows[:, None]) * H + cols[None, :], mask=m, other=0.).to(tl.float32)
        if FP8:
            sb = e * (2 * I // 128) * HB + cols[None, :] // 128
            wg = wg * tl.load(ws + sb + (rows[:, None] // 128) * HB, mask=m, other=0.)
            wu = wu * tl.load(ws + sb + ((I + rows[:, None]) // 128) * HB, mask=m, other=0.)
        acc_g += tl.sum(wg * xv[None, :], axis=1)
        acc_u += tl.sum(wu * xv[None, :], axis=1)
    tl.store(h + ns * I + rows, acc_g * tl.sigmoid(acc_g) * acc_u, mask=mi)


@triton.jit
def _moe_down(h, weights, ids, w, ws, H, I, y, TOPK: tl.constexpr, FP8: tl.constexpr, BI: tl.constexpr,
              BH: tl.constexpr):
    """h [N,k,I] fp32, weights [N,k], ids [N,k], w_down [E,H,I] (+ scales [E,ceil(H/128),I/128] when FP8)
    -> y [N,H]. One program per (token, H block); slots summed in order, fp32."""
    n = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BH + tl.arange(0, BH)
    mh = rows < H
    IB = (I + 127) // 128
    acc = tl.zeros([BH], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        e = tl.load(ids + n * TOPK + j).to(tl.int64)
        wt = tl.load(weights + n * TOPK + j).to(tl.float32)
        part = tl.zeros([BH], dtype=tl.float32)
        for i0 in range(0, I, BI):
            ic = i0 + tl.arange(0, BI)
            mi = ic < I
            m = mh[:, None] & mi[None, :]
            hv = tl.load(h + (n * TOPK + j) * I + ic, mask=mi, other=0.)
            wd = tl.load(w + (e * H + rows[:, None]) * I + ic[None, :], mask=m, other=0.).to(tl.float32)
            if FP8:
                wd = wd * tl.load(ws + (e * ((H + 127) // 128) + rows[:, None] // 128) * IB + ic[None, :] // 128,
                                  mask=m, other=0.)
            part += tl.sum(wd * hv[None, :], axis=1)
        acc += part * wt
    tl.store(y + n * H + rows, acc.to(y.dtype.element_ty), mask=mh)


# AOT entry points: (inputs..., extras N H I, output); the BF16 ones pass w as the unused scale pointer.
@triton.jit
def moe_gate_up_aot(x, ids, w, N, H, I, h, TOPK: tl.constexpr, BI: tl.constexpr, BH: tl.constexpr):
    _moe_gate_up(x, ids, w, w, H, I, h, TOPK, False, BI, BH)


@triton.jit
def moe_gate_up_fp8_aot(x, ids, w, ws, N, H, I, h, TOPK: tl.constexpr, BI: tl.constexpr, BH: tl.constexpr):
    _moe_gate_up(x, ids, w, ws, H, I, h, TOPK, True, BI, BH)


@triton.jit
def moe_down_aot(h, weights, ids, w, N, H, I, y, TOPK: tl.constexpr, BI: tl.constexpr, BH: tl.constexpr):
    _moe_down(h, weights, ids, w, w, H, I, y, TOPK, False, BI, BH)


@triton.jit
def moe_down_fp8_aot(h, weights, ids, w, ws, N, H, I, y, TOPK: tl.constexpr, BI: tl.constexpr, BH: tl.constexpr):
    _moe_down(h, weights, ids, w, ws, H, I, y, TOPK, True, BI, BH)


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


MOE_BI, MOE_BH = 32, 128  # MoE adapter tiles (I rows x H columns of a weight tile)


def _moe_kernel(fn_bf16, fn_fp8, first: dict[str, str], act_dtype: str, weight_dtype: str, out: dict[str, str],
                top_k: int) -> AotKernel:
    fp8 = weight_dtype == "float8_e4m3fn"
    sig = dict(first)
    sig["w"] = "*fp8e4nv" if fp8 else TRITON_PTR[weight_dtype]
    if fp8:
        sig["ws"] = "*fp32"
    sig.update({"N": "i32", "H": "i32", "I": "i32", **out})
    const = {"TOPK": top_k, "BI": MOE_BI, "BH": MOE_BH}
    sig.update({k: "constexpr" for k in const})
    n_in = len(first) + 1 + fp8
    return AotKernel(fn_fp8 if fp8 else fn_bf16, sig, const, 4, n_in, 3, 1)


def moe_gate_up_kernel(act_dtype: str, weight_dtype: str, top_k: int) -> AotKernel:
    """weight_dtype "float8_e4m3fn" selects the block-scaled kernel (one more input: the scales)."""
    return _moe_kernel(moe_gate_up_aot, moe_gate_up_fp8_aot, {"x": TRITON_PTR[act_dtype], "ids": "*i64"},
                       act_dtype, weight_dtype, {"h": "*fp32"}, top_k)


def moe_gate_up_launch(N, top_k: int, H, I) -> tuple[tuple, tuple]:
    return (N * top_k, (I + MOE_BI - 1) // MOE_BI), (N, H, I)


def moe_down_kernel(act_dtype: str, weight_dtype: str, top_k: int) -> AotKernel:
    return _moe_kernel(moe_down_aot, moe_down_fp8_aot,
                       {"h": "*fp32", "weights": TRITON_PTR[act_dtype], "ids": "*i64"},
                       act_dtype, weight_dtype, {"y": TRITON_PTR[act_dtype]}, top_k)


def moe_down_launch(N, H, I) -> tuple[tuple, tuple]:
    return (N, (H + MOE_BH - 1) // MOE_BH), (N, H, I)


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
