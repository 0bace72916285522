"""Dynamic activation quantisation to e4m3: one fp32 scale per token per 128-column group.

`quantize_act(x [R, K]) -> (q fp8 [R, K], s fp32 [R, ceil(K/128)])`, with `x ≈ q * s` groupwise and the
scale `amax / 448` (1 for an all-zero group), as `checkpoint.fp8.quantize_fp8_block` does for weights.
`round_e4m3`, `quant_group` and `quant_group_values` are `@triton.jit` helpers the MoE and linear kernels
reuse (in epilogues, and in the small-M linear's prologue).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

FP8_MAX = 448.0
GROUP = 128

# Triton 3.9's interpreter computes a bf16 `tl.dot` on the raw 16-bit patterns (errors of 1e10 on CPU,
# seen 2026-11-24); kernels upcast their dot operands to fp32 when interpreting. Delete once fixed.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def dot(a, b, UPCAST: tl.constexpr):
    """`tl.dot(a, b)` in fp32 accumulation; `UPCAST` (interpreter only, see INTERPRET) computes in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def cast_out(v, DTYPE: tl.constexpr):
    """Cast fp32 `v` to the output dtype, rounding to nearest even.

    Triton 3.9's interpreter truncates fp32 -> bf16 (errors up to 2^-7, biased; seen 2026-11-24), so bf16
    is rounded in the fp32 bits first and the cast is then exact, on CPU and GPU alike.
    """
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # clear the low 16 bits (0xFFFF0000)
        return bits.to(tl.float32, bitcast=True).to(DTYPE)
    else:
        return v.to(DTYPE)


@triton.jit
def round_e4m3(v):
    """Round fp32 `v` (|v| <= 448) to the nearest e4m3 value (ties to even), still as fp32.

    The fp32 -> fp8 cast then is exact. Why not cast directly: Triton 3.9's interpreter drops the carry
    when rounding crosses a power of two (-125.98 -> -64 instead of -128) and misrounds subnormals
    (seen 2026-11-24); rounding here keeps CPU tests and the GPU on one code path.
    """
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    bits = (bits + 0x7FFFF + lsb) & -1048576  # keep 3 mantissa bits: clear the low 20 (0xFFF00000)
    normal = bits.to(tl.float32, bitcast=True)
    # Subnormals are multiples of 2^-9; adding 1.5 * 2^14 (fp32 ulp 2^-9 there) rounds to one. Rounded on
    # |v| and signed after, so a tiny negative value becomes -0 as torch's cast gives (code 0x80, not 0).
    # The sign is put back as a bit, not by negation: compiled, `-x` can lower to `0 - x`, which is +0 for
    # x = +0 (GPU codes 0x00 where torch gives 0x80, H200 2026-12-01); the interpreter kept -0.
    sub = (tl.abs(v) + 24576.0) - 24576.0
    signed = (sub.to(tl.int32, bitcast=True) | (v.to(tl.int32, bitcast=True) & -2147483648)).to(tl.float32,
                                                                                               bitcast=True)
    return tl.where(tl.abs(v) < 0.015625, signed, normal)


@triton.jit
def scale_group(v):
    """fp32 `v` [R, 128] -> (v / scale clamped to the e4m3 range [R, 128], scale [R]), per row."""
    amax = tl.max(tl.abs(v), axis=1)
    # Plain `/`: on the GPU it may differ from torch's IEEE division by an ulp, which flips an e4m3 rounding
    # on ~1 element in 1e5 (H100, 2026-11-24; tests allow exactly that). tl.math.div_rn made the codes
    # differ far more often there, cause not yet found: do not switch to it without a device check.
    s = tl.where(amax > 0, amax / 448.0, 1.0)
    return tl.clamp(v / s[:, None], -448.0, 448.0), s


@triton.jit
def quant_group(v, HW_CVT: tl.constexpr = False):
    """Quantise fp32 `v` [R, 128] per row: returns (q fp8 [R, 128], scale fp32 [R]).

    `HW_CVT` (GPU only) rounds with the hardware's fp32 -> e4m3 conversion (round to nearest even, as
    `round_e4m3`), one instruction per two elements instead of ~15 per element; the interpreter misrounds
    it (see `round_e4m3`), so CPU tests cannot check it. On by default in the 16-token swapped fp8_linear
    tiles on the GPU (~8% faster there, bench/results/fp8_swap_h200/); its codes are checked against the
    reference by a compiled-only test (`quantize_act(..., hw_cvt=True)`).
    """
    q, s = scale_group(v)
    if HW_CVT:
        return q.to(tl.float8e4nv), s
    else:
        return round_e4m3(q).to(tl.float8e4nv), s


@triton.jit
def act_group(x_ptrs, xs_ptrs, mask, row_ok, QX: tl.constexpr, HW_CVT: tl.constexpr):
    """One [rows, 128] activation group of a w8a8 kernel as (e4m3 codes, per-row scales): quantised here from
    the unquantised activation at `x_ptrs` (QX; masked-off rows quantise from zeros: codes 0, scale 1), or
    `quantize_act`'s codes at `x_ptrs` and its scales at `xs_ptrs` loaded."""
    if QX:
        q, s = quant_group(tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32), HW_CVT)
    else:
        q = tl.load(x_ptrs, mask=mask, other=0.0)
        s = tl.load(xs_ptrs, mask=row_ok, other=0.0)
    return q, s


@triton.jit
def quant_group_values(v, HW_CVT: tl.constexpr = False):
    """`quant_group` with q as e4m3 values held exactly in fp32, for kernels that multiply q in fp32."""
    q, s = scale_group(v)
    if HW_CVT:
        return q.to(tl.float8e4nv).to(tl.float32), s
    else:
        return round_e4m3(q), s


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, R, R_OUT, K, stride_x, stride_q, stride_s, stride_sg,
                      BLOCK_R: tl.constexpr, GROUP_K: tl.constexpr, HW_CVT: tl.constexpr = False):
    """Rows < R from x; rows R..R_OUT (padding) quantised from zeros."""
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = g * GROUP_K + tl.arange(0, GROUP_K)
    k_ok = offs_k[None, :] < K
    out_ok = offs_r < R_OUT
    x = tl.load(x_ptr + offs_r[:, None].to(tl.int64) * stride_x + offs_k[None, :],
                mask=(offs_r < R)[:, None] & k_ok, other=0.0)
    q, s = quant_group(x.to(tl.float32), HW_CVT)
    tl.store(q_ptr + offs_r[:, None].to(tl.int64) * stride_q + offs_k[None, :], q, mask=out_ok[:, None] & k_ok)
    tl.store(s_ptr + offs_r.to(tl.int64) * stride_s + g * stride_sg, s, mask=out_ok)


def quantize_act(x: Tensor, hw_cvt: bool = False, pad_rows: int = 1, scales_by_column: bool = False
                 ) -> tuple[Tensor, Tensor]:
    """Quantise `x` [R, K] per row per 128 columns -> (q fp8 [R', K], s fp32 [R', ceil(K/128)]); `hw_cvt`:
    round with the hardware cast (GPU only, see `quant_group`).

    `pad_rows`: R' = R rounded up to a multiple of it, the extra rows quantised from zeros (q 0, scale 1);
    `scales_by_column`: s is stored column-major (stride (1, R')), the layout cuBLASLt's block-scaled GEMM
    reads its per-row activation scales in (`fp8_linear`'s SCALED_MM path)."""
    R, K = x.shape
    if x.stride(-1) != 1:  # the kernel takes a row stride: strided rows need no copy
        x = x.contiguous()
    # R + (-R) % p, not ceil(R / p) * p: with a symbolic R the slice back to R rows (`scaled_mm`) then needs
    # R <= R' only, which the shape env proves from Mod >= 0; the ceil form put a guard on R into every
    # prefill graph (true for every R, but a guard on the batch all the same)
    Rp = R if pad_rows == 1 else R + (-R) % pad_rows
    G = triton.cdiv(K, GROUP)
    q = torch.empty(Rp, K, dtype=torch.float8_e4m3fn, device=x.device)
    if scales_by_column:
        s = torch.empty(G, Rp, dtype=torch.float32, device=x.device).t()  # [R', G], stride (1, R')
    else:
        s = torch.empty(Rp, G, dtype=torch.float32, device=x.device)
    if Rp == 0:
        return q, s
    block_r = 16
    grid = (triton.cdiv(Rp, block_r), G)
    # rows R..R' are read as zeros (the load's mask is on R), so they quantise to q = 0 with scale 1
    wrap_triton(_act_quant_kernel)[grid](x, q, s, R, Rp, K, x.stride(0), q.stride(0), s.stride(0), s.stride(1),
                                         BLOCK_R=block_r, GROUP_K=GROUP, HW_CVT=hw_cvt, num_warps=4)
    return q, s
