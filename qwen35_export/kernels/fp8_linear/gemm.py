"""Dense block-scaled FP8 GEMM: `y = x @ dequant(w, w_scale).T`, `x` quantised per token per 128 on the w8a8
paths and used as given on the weight-only one.

`w` [N, K] e4m3 with 128x128 block scales [ceil(N/128), ceil(K/128)] (the checkpoint's `weight_scale_inv`,
used exactly); `x` is quantised to e4m3 with scales [R, ceil(K/128)] (quant.py). Each 128-column K step
multiplies the e4m3 operands into an fp32 partial sum and applies both scales to it. Four paths:
- swapped operands (decode, the default up to SWAP_MAX_R rows and, for narrow GEMVs, SWAP_PREQUANT_MAX_R):
  `_swap_w8a8_gemm_kernel` puts the e4m3 weight tile on the MMA's wide side and the tokens on its narrow one,
  so the weights reach the fp8 tensor cores as loaded; x quantised in its registers or by `quantize_act`;
- two kernels (any R): `quantize_act` writes q and its scales, `_w8a8_gemm_kernel` runs `tl.dot` on fp8
  operands (fp8 tensor cores on sm_90), optionally split over K (then a third, fixed-order sum kernel);
- fused (decode, R <= FUSED_MAX_R): `_fused_w8a8_gemm_kernel` quantises its rows of x in registers at each
  K step (same rounding and scale formula as quant.py) and multiplies at once: one launch, no q round trip.
  There, each program streams BLOCK_N weight rows over K; split-K works as on the two-kernel path.
- weight-only (decode, selectable by config; the default before the swapped path): `_wo_gemm_kernel`
  multiplies x unquantised (the op contract) by the e4m3 weight tile converted in registers and scaled per
  block: one launch (two with split-K), no activation quantisation, closer to the reference.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.library import wrap_triton

from ...checkpoint.fp8 import dequantize_fp8_block
from .quant import GROUP, INTERPRET, act_group, cast_out, dot, quant_group, quant_group_values, quantize_act


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), GROUP_M row tiles at a time so a weight tile is reused from L2."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _w8a8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, steps_per_split,
                      stride_am, stride_asm, stride_bn, stride_bsn, stride_cm, stride_cs,
                      UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Program (tile, K split) -> the sum over its split's K steps, at `c_ptr + split * stride_cs` (fp32
    partials when K is split, else the output itself: one split of every step, stride 0)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    kb0 = pid_k * steps_per_split
    kb1 = tl.minimum(kb0 + steps_per_split, tl.cdiv(K, BLOCK_K))

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] + kb0 * BLOCK_K
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] + kb0 * BLOCK_K  # [BK, BN]
    as_ptrs = as_ptr + offs_m * stride_asm
    bs_ptrs = bs_ptr + (offs_n // 128) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb0, kb1):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        kg = (kb * BLOCK_K) // 128
        sa = tl.load(as_ptrs + kg, mask=m_ok, other=0.0)
        sb = tl.load(bs_ptrs + kg, mask=n_ok, other=0.0)
        acc += dot(a, b, UPCAST) * (sa[:, None] * sb[None, :])
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = c_ptr + pid_k.to(tl.int64) * stride_cs + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, cast_out(acc, c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _row_col_split(N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Decode-path program ids: axis 0 -> (row tile, column tile) with columns fastest (the row tiles of a
    column tile run together and share its weight reads from L2), axis 1 -> K split.
    Returns (tile row indices, row tile, its rows, its columns, K split)."""
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    rows = tl.arange(0, BLOCK_M)
    offs_n = (tl.program_id(0) % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, pid_m, pid_m * BLOCK_M + rows, offs_n, tl.program_id(1)


@triton.jit
def _fused_w8a8_gemm_kernel(x_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, steps_per_split,
                            stride_xm, stride_bn, stride_bsn, stride_cm, stride_cs,
                            UPCAST: tl.constexpr, DOT: tl.constexpr, HW_CVT: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (row tile, column tile, K split) -> its fp32 sum over the split's 128-column groups, at
    `c_ptr + split * stride_cs` in c's dtype (the output itself when there is one split)."""
    rows, pid_m, offs_m, offs_n, pid_k = _row_col_split(N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, 128)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # [BM, 128]
    b_rows = b_ptr + offs_n.to(tl.int64) * stride_bn
    bs_ptrs = bs_ptr + (offs_n // 128) * stride_bsn
    kb0 = pid_k * steps_per_split
    kb1 = tl.minimum(kb0 + steps_per_split, tl.cdiv(K, 128))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb0, kb1):
        k = kb * 128
        k_ok = offs_k < K - k
        sb = tl.load(bs_ptrs + kb, mask=n_ok, other=0.0)
        if DOT:
            # Tensor cores; the whole [BM, 128] tile is quantised, absent rows included (zeros, scale 1).
            xv = tl.load(x_rows + k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            q, sa = quant_group(xv.to(tl.float32), HW_CVT)
            b = tl.load(b_rows[None, :] + (k + offs_k)[:, None], mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0)  # [128, BN]
            acc += dot(q, b, UPCAST) * (sa[:, None] * sb[None, :])
        else:
            # fp32 multiply-add per row (e4m3 x e4m3 products are exact in fp32), rows past M skipped at
            # run time: a graph sized for up to BLOCK_M tokens pays for the tokens it has, not BLOCK_M.
            b = tl.load(b_rows[:, None] + (k + offs_k)[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)  # [BN, 128], K contiguous
            for r in tl.static_range(BLOCK_M):
                row = pid_m * BLOCK_M + r
                # loaded outside the `if` so the pipeliner can prefetch it (a masked row moves no bytes)
                k_end = tl.where(row < M, K - k, 0)
                xv = tl.load(x_ptr + row.to(tl.int64) * stride_xm + k + offs_k[None, :],
                             mask=offs_k[None, :] < k_end, other=0.0)  # [1, 128]
                if row < M:
                    q, sa = quant_group_values(xv.to(tl.float32), HW_CVT)
                    part = tl.sum(b * q, axis=1)  # [BN]
                    acc += tl.where(rows[:, None] == r, part[None, :] * (sa[:, None] * sb[None, :]), 0.0)
    c_ptrs = c_ptr + pid_k.to(tl.int64) * stride_cs + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, cast_out(acc, c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _wo_dot(x, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """x [BM, BK] @ b [BK, BN] (e4m3) in fp32 accumulation, b converted to x's dtype (exact: every e4m3 value
    is a bf16 / fp16 / fp32 value). `IEEE`: fp32 x multiplies in full fp32 (tl.dot's default there is tf32)."""
    if UPCAST:
        return tl.dot(x.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(x, b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(x, b.to(x.dtype))


@triton.jit
def _wo_gemm_kernel(x_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, steps_per_split,
                    stride_xm, stride_bn, stride_bsn, stride_cm, stride_cs,
                    DOT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weight-only path: program (row tile, column tile, K split) -> x (unquantised, the op contract) times
    the e4m3 weight tile converted in registers, each BLOCK_K step's partial scaled by its weight block's
    scale; the sum over the split's steps in fp32, stored at `c_ptr + split * stride_cs` in c's dtype (the
    output itself when there is one split). `DOT`: tensor cores on [BLOCK_M, BLOCK_K] x tiles; else fp32
    multiply-adds per row, rows past M skipped at run time."""
    rows, pid_m, offs_m, offs_n, pid_k = _row_col_split(N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    b_rows = b_ptr + offs_n.to(tl.int64) * stride_bn
    bs_ptrs = bs_ptr + (offs_n // 128) * stride_bsn
    kb0 = pid_k * steps_per_split
    kb1 = tl.minimum(kb0 + steps_per_split, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb0, kb1):
        k = kb * BLOCK_K
        k_ok = offs_k < K - k
        sb = tl.load(bs_ptrs + k // 128, mask=n_ok, other=0.0)  # [BN]: BLOCK_K divides the 128 group
        if DOT:
            xv = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + k + offs_k[None, :],
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
            b = tl.load(b_rows[None, :] + (k + offs_k)[:, None], mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0)  # [BK, BN]
            acc += _wo_dot(xv, b, UPCAST, IEEE) * sb[None, :]
        else:
            b = tl.load(b_rows[:, None] + (k + offs_k)[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)  # [BN, BK], K contiguous
            for r in tl.static_range(BLOCK_M):
                row = pid_m * BLOCK_M + r
                # loaded outside the `if` so the pipeliner can prefetch it (a masked row moves no bytes)
                k_end = tl.where(row < M, K - k, 0)
                xv = tl.load(x_ptr + row.to(tl.int64) * stride_xm + k + offs_k[None, :],
                             mask=offs_k[None, :] < k_end, other=0.0).to(tl.float32)  # [1, BK]
                if row < M:
                    part = tl.sum(b * xv, axis=1) * sb  # [BN]
                    acc += tl.where(rows[:, None] == r, part[None, :], 0.0)
    c_ptrs = c_ptr + pid_k.to(tl.int64) * stride_cs + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, cast_out(acc, c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _swap_w8a8_gemm_kernel(x_ptr, xs_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, steps_per_split,
                           stride_xm, stride_xsm, stride_bn, stride_bsn, stride_cm, stride_cs,
                           QX: tl.constexpr, HW_CVT: tl.constexpr, UPCAST: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """Swapped-operand w8a8 path for few rows: program (column tile, row tile, K split) computes
    c^T [BLOCK_N, BLOCK_T] = w [BLOCK_N, 128] @ q^T [128, BLOCK_T] per 128-column group on fp8 operands.

    Why swapped: the tensor-core instruction's M side is at least 64, and at decode there are 1-64 rows of x
    but thousands of weight rows, so the weight tile takes the M side and the tokens the narrow N side (16+).
    The e4m3 weight tile then goes to the tensor cores as it was loaded (no conversion in registers, unlike the
    weight-only path), and the cost barely depends on BLOCK_T. `QX`: x is the unquantised activation and each
    program quantises its [BLOCK_T, 128] group in registers (quant.py's formula: the codes `quantize_act`
    writes); else x is that e4m3 q with scales xs. Partial sums as on the other paths (`c_ptr + split *
    stride_cs`, fp32 when K is split)."""
    num_t = tl.cdiv(M, BLOCK_T)
    pid_t = tl.program_id(0) % num_t  # token tiles fastest: those of one weight tile run together and share
    pid_n = tl.program_id(0) // num_t  # its HBM reads through the L2
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, 128)
    n_ok = offs_n < N
    t_ok = offs_t < M
    b_ptrs = b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_k[None, :]  # [BN, 128], K contiguous
    x_ptrs = x_ptr + offs_t[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # [BT, 128]
    bs_ptrs = bs_ptr + (offs_n // 128) * stride_bsn
    xs_ptrs = xs_ptr + offs_t.to(tl.int64) * stride_xsm
    kb0 = pid_k * steps_per_split
    kb1 = tl.minimum(kb0 + steps_per_split, tl.cdiv(K, 128))
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for kb in range(kb0, kb1):
        k = kb * 128
        k_ok = offs_k < K - k
        b = tl.load(b_ptrs + k, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        sb = tl.load(bs_ptrs + kb, mask=n_ok, other=0.0)
        q, sa = act_group(x_ptrs + k, xs_ptrs + kb, t_ok[:, None] & k_ok[None, :], t_ok, QX, HW_CVT)
        acc += dot(b, tl.trans(q), UPCAST) * (sb[:, None] * sa[None, :])
    c_ptrs = c_ptr + pid_k.to(tl.int64) * stride_cs + offs_t[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
    tl.store(c_ptrs, cast_out(acc, c_ptr.dtype.element_ty), mask=n_ok[:, None] & t_ok[None, :])


@triton.jit
def _split_k_sum_kernel(p_ptr, c_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """`c = sum_s p[s]` over the SPLIT_K partials [SPLIT_K, numel], in split order (deterministic)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    p_ptrs = p_ptr + offs
    acc = tl.load(p_ptrs, mask=ok, other=0.0)
    for _ in tl.static_range(1, SPLIT_K):
        p_ptrs += numel  # pointer steps: no int32 product split * numel to overflow
        acc += tl.load(p_ptrs, mask=ok, other=0.0)
    tl.store(c_ptr + offs, cast_out(acc, c_ptr.dtype.element_ty), mask=ok)


# Up to this many rows (tokens) the fused path is the default: 0, off. Measured on the H200 at M = 1
# (bench/decode_kernels.py --fp8-fused-only, 35B shapes): the fused default 24.6-47.8 us and its best tile
# 12.5-22.0 us against 8.3-12.2 us for the two-kernel path with the swept tiles; in-register quantisation
# repeated by every column program costs more than the launch it saves. Kept selectable by config.
FUSED_MAX_R = 0


# From this many rows on (and in a graph whose row count may exceed DEQUANT_SYMBOLIC_MIN_BOUND: a prefill
# graph) the GEMM is compute bound and goes to cuBLAS: on sm_90 its block-scaled FP8 GEMM (SCALED_MM: x
# quantised per token per 128 as on every other path, the checkpoint's e4m3 weight and scales as they are),
# elsewhere (or for shapes it does not take) the weight dequantised to the activation dtype and a bf16 GEMM.
# H200, the engine's dense projections at 512-8192 rows (bench/results/fp8_prefill_gemm_h200/): SCALED_MM
# 870-1080 TFLOPS with its quantisation (44-54% of the FP8 peak), 1.3-1.6x the dequantised bf16 GEMM from
# 2048 rows (at 512 rows 1.0-1.6x), 1.8-2.0x this file's w8a8 kernel (which rescales every 128-wide K step
# in registers). The earlier measurement for DEQUANT, before SCALED_MM:
# H200, 35B-A3B prefill of 8192 tokens (bench/results/profile_h200/layers_35b_compiled_flash_attn.json): the
# w8a8 kernel took 1052 us for in_proj_qkvz + out_proj against 517 + ~170 us for the same two GEMMs in BF16;
# dequantising reads the FP8 weight once (12.6 M elements: ~10 us). Closer to the op's contract too (x
# unquantised).
DEQUANT_MIN_R = 256
# A graph with a symbolic row count dequantises only when that count may exceed this: a prefill graph
# (max_batch x max_seq_len rows), never a decode graph (max_batch rows: memory bound at every batch, where
# dequantising would read ~5 bytes per weight instead of 1 every step).
DEQUANT_SYMBOLIC_MIN_BOUND = 4096


def at_most(R: int | torch.SymInt, bound: int) -> bool:
    """`R <= bound` for every value R can take. R is symbolic under export (the flattened token count of a
    dynamic batch): its range is read without a guard, which would bake the example's choice into the graph."""
    return R <= bound if isinstance(R, int) else statically_known_true(R <= bound)


def two_kernel_config(R: int | torch.SymInt, N: int) -> dict:
    """Tiles of `_w8a8_gemm_kernel`: small R is memory bound (thin M tiles, many N tiles), large R compute
    bound. The R <= 64 tiles are the fastest of the H200 sweep (bench/results/decode_kernels_h200.md)."""
    if at_most(R, 16):  # BLOCK_M 16 either way: M = 1 and M = 16 cost the same; sweep's best at M = 1
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, GROUP_M=1, num_warps=2, num_stages=5)
    if at_most(R, 64):  # sweep's best at M = 64: wide tiles for the large projections
        bn, stages = (64, 3) if N >= 8192 else (32, 5)
        return dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, GROUP_M=1, num_warps=2, num_stages=stages)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)


def fused_config(R: int | torch.SymInt, N: int) -> dict:
    """Tiles of `_fused_w8a8_gemm_kernel` for up to FUSED_MAX_R rows (BLOCK_M covers every R admitted).

    Not yet swept on a device (bench/decode_kernels.py times them): up to 8 rows the per-row fp32 path
    with the two-kernel sweep's best M = 1 tile (BLOCK_N 16, 2 warps, 5 stages); beyond, tensor cores with
    64 columns per program, so each program's quantisation of its 16 rows is shared by more weight bytes.
    Keys: `DOT` (tensor cores, needs BLOCK_M >= 16) or per-row fp32 multiply-adds; `HW_CVT` (see
    quant.quant_group); `SPLIT_K` > 1 splits K over that many programs plus a sum kernel (two
    launches); the last two stay off until a device run shows they pay.
    """
    if at_most(R, 8):
        bm = next(b for b in (1, 2, 4, 8) if at_most(R, b))
        return dict(FUSED=True, DOT=False, HW_CVT=False, BLOCK_M=bm, BLOCK_N=16, SPLIT_K=1, num_warps=2,
                    num_stages=5)
    return dict(FUSED=True, DOT=True, HW_CVT=False, BLOCK_M=16, BLOCK_N=64, SPLIT_K=1, num_warps=4,
                num_stages=4)


# Up to this many rows (for every R a graph admits: a decode graph's max batch), and for at most WO_MAX_N
# output columns, the weight-only kernel was the default until the swapped-operand kernel (below, checked
# first in `default_config`, so this rule no longer decides anything by default) beat it: x stays unquantised and the e4m3 weight tile is converted in
# registers. It wins where a GEMV has too few column tiles to fill the GPU, by splitting K; on wide ones the
# conversion costs more than the quantisation launch it saves. H200, CUDA-graph replays, whole op, beside an
# engine build, single samples (bench/results/decode_fp8_wo_h200/): 35B out_proj (N 2048, K 4096) with the tiles
# below (the sweep's best) 7.8 / 10.1 us at M = 1 (16 / 64-row tile) and 11.2 at M = 64, the pre-sweep tile 7.7 /
# 11.2 / 11.6, against 12.1 / 16.5 us for quantise + GEMM; 35B in_proj_qkvz (N 12288, K 2048): best tile 13.2 /
# 20.5 us against 12.0. In the FP8 engine's decode step (8 layers, batch 1, profiler): out_proj + o_proj 101 ->
# 65 us (weight-only 6.9 us + split-K sum 1.2 per call). N between 2048 and
# 12288 (the 397B out_proj 4096 x 8192, attention qkv 9216) was not reached by the sweep: WO_MAX_N is a guess
# between the two measured widths.
WO_MAX_R = 64
WO_MAX_N = 4096
# K is split until the column tiles times the splits reach this many programs (two per SM of an H100 / H200),
# each split keeping at least WO_MIN_STEPS 128-column steps.
WO_TARGET_PROGRAMS = 256
WO_MIN_STEPS = 4
SWAP_TARGET_PROGRAMS = 512


def wo_config(R: int | torch.SymInt, N: int, K: int) -> dict:
    """Tiles of `_wo_gemm_kernel` for up to WO_MAX_R rows: tensor cores on a row tile covering every R the
    graph admits (16 or 64 rows; masked rows move no bytes) and K split over programs. The sweep's best for
    the 35B out_proj: 32 columns, 5 stages with the 16-row tile; 64 columns, 3 stages with the 64-row one."""
    bm, bn, stages = (16, 32, 5) if at_most(R, 16) else (64, 64, 3)
    steps = triton.cdiv(K, 128)
    split = max(1, min(8, WO_TARGET_PROGRAMS // triton.cdiv(N, bn), steps // WO_MIN_STEPS))
    return dict(WO=True, DOT=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=split, num_warps=4,
                num_stages=stages)


# The swapped-operand w8a8 kernel is the default for graphs of up to SWAP_MAX_R rows (for every R a graph admits)
# and, up to SWAP_PREQUANT_MAX_R rows, for at most WO_MAX_N columns. H200, CUDA-graph replays over weight sets
# past the L2, whole op (bench/results/fp8_swap_h200/): with a 16-token tile (graphs of <= 16 rows) and x
# quantised in the kernel by the hardware cast, 35B in_proj_qkvz 11.2 us against 12.0 for quantise + GEMM, 397B
# out_proj 13.9 against 19.1 for the weight-only kernel, 397B attention qkv 25.0 against 26.7 (M = 1; the 397B
# wide ones with split 2, which swap_config now gives them: split 3 took 28.8 there). With the
# 64-token tile of an engine's decode graph, quantising 64 rows in every program costs more than it saves
# (35B in_proj 24.4 us against 13.2) but a separate quantisation launch pays on the narrow GEMVs: 35B out_proj
# 9.3 against 10.2 (weight-only), 397B out_proj 16.1 against 24.9 at M = 1; on the wide ones quantise + GEMM
# stays (35B in_proj 13.2 against 14.7 at M = 1).
SWAP_MAX_R = 16
SWAP_PREQUANT_MAX_R = 64


def swap_config(R: int | torch.SymInt, N: int, K: int) -> dict:
    """Tiles of `_swap_w8a8_gemm_kernel` for up to 64 rows: a token tile (the MMA's N side) covering every R the
    graph admits; x quantised in the kernel (hardware cast) for tiles of 16 tokens, by `quantize_act` for wider
    ones; 64 weight rows per program up to 2048 columns, 128 beyond; K split (a power of two, as swept) until
    ~4 programs per SM. Measured (bench/results/fp8_swap_h200/): these are the sweep's best in-kernel-
    quantisation tiles at 16 and 64 tokens on the engine linears; the 64-token tiles with `quantize_act` first
    were timed only as the in-kernel sweep's best tile re-run that way, and 32-token tiles not at all."""
    bt = next((b for b in (16, 32, 64) if at_most(R, b)), 64)
    bn = 64 if N <= 2048 else 128
    steps = triton.cdiv(K, 128)
    want = max(1, min(8, SWAP_TARGET_PROGRAMS // triton.cdiv(N, bn), steps // WO_MIN_STEPS))
    split = 1 << (want.bit_length() - 1)  # 1, 2, 4 or 8: the splits the sweep measured
    # the interpreter misrounds the hardware cast (quant.quant_group): CPU runs take the software rounding
    return dict(SWAP=True, QX=bt == 16, HW_CVT=bt == 16 and not INTERPRET, BLOCK_N=bn, BLOCK_T=bt, SPLIT_K=split, num_warps=4,
                num_stages=3)


def default_config(R: int | torch.SymInt, N: int, K: int, device: torch.device | None = None) -> dict:
    """The config `fp8_linear_triton` uses for R rows, N output columns and K input columns when given none
    (`device`: where it runs; the prefill GEMM depends on it)."""
    if (R >= DEQUANT_MIN_R) if isinstance(R, int) else not at_most(R, DEQUANT_SYMBOLIC_MIN_BOUND):
        if device is not None and scaled_mm_supported(N, K, device):
            return dict(SCALED_MM=True)
        return dict(DEQUANT=True)
    if at_most(R, SWAP_MAX_R) or (at_most(R, SWAP_PREQUANT_MAX_R) and N <= WO_MAX_N):
        return swap_config(R, N, K)
    if at_most(R, WO_MAX_R) and N <= WO_MAX_N:
        return wo_config(R, N, K)
    if at_most(R, FUSED_MAX_R):
        return fused_config(R, N)
    return dict(FUSED=False, **two_kernel_config(R, N))


def _launch_two_kernel(x2: Tensor, w: Tensor, w_scale: Tensor, out: Tensor, cfg: dict) -> None:
    if 128 % cfg["BLOCK_K"]:
        raise ValueError(f"fp8_linear: BLOCK_K must divide the 128-column scale group, got {cfg}")
    R, K = x2.shape
    N = w.shape[0]
    tiles = triton.cdiv(R, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    launch_split_k(_w8a8_gemm_kernel, (*quantize_act(x2), w, w_scale), triton.cdiv(K, cfg["BLOCK_K"]), tiles,
                    out, cfg)


def _k_splits(steps: int, want: int, out: Tensor) -> tuple[int, int, Tensor]:
    """(K steps per split, splits, where the GEMM writes) for `want` splits of `steps` K steps, none empty.
    Split-K (few rows, long K: too few tiles to keep the SMs streaming) writes fp32 partials [split, R, N],
    summed in split order by `_split_k_sum` (deterministic, unlike atomics); one split writes `out` itself."""
    per_split = triton.cdiv(steps, max(1, min(want, steps)))
    split = triton.cdiv(steps, per_split)
    part = out if split == 1 else torch.empty(split, *out.shape, dtype=torch.float32, device=out.device)
    return per_split, split, part


def _split_k_sum(part: Tensor, out: Tensor, split: int) -> None:
    numel = out.numel()
    block = 1024
    wrap_triton(_split_k_sum_kernel)[(triton.cdiv(numel, block),)](
        part, out, numel, SPLIT_K=split, BLOCK=block, num_warps=4)


def launch_split_k(kernel, inputs: tuple[Tensor, ...], steps: int, tiles: int, out: Tensor, cfg: dict,
                    **consts) -> None:
    """Launch one of this file's GEMM kernels over `tiles` output tiles x the K splits cfg["SPLIT_K"] asks of
    its `steps` K steps (`_k_splits`), then sum the splits. The kernels share one argument order: the
    inputs, the output / partials, R, N, K, steps per split, each input's row stride, the partials' row and
    split strides; `inputs[0]` is the [R, K] activation."""
    R, N = out.shape
    per_split, split, part = _k_splits(steps, cfg.pop("SPLIT_K", 1), out)
    wrap_triton(kernel)[(tiles, split)](
        *inputs, part, R, N, inputs[0].shape[1], per_split, *(t.stride(0) for t in inputs), part.stride(-2),
        R * N if split > 1 else 0, UPCAST=INTERPRET, **consts, **cfg)
    if split > 1:
        _split_k_sum(part, out, split)


def _launch_fused(x2: Tensor, w: Tensor, w_scale: Tensor, out: Tensor, cfg: dict) -> None:
    cfg.setdefault("HW_CVT", False)
    if cfg.pop("BLOCK_K", GROUP) != GROUP or (cfg["DOT"] and cfg["BLOCK_M"] < 16):
        raise ValueError(f"fp8_linear: the fused path takes BLOCK_K = {GROUP} and, with DOT, BLOCK_M >= 16 "
                         f"(tl.dot's smallest tile), got {cfg}")
    R, K = x2.shape
    N = w.shape[0]
    tiles = triton.cdiv(R, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    launch_split_k(_fused_w8a8_gemm_kernel, (x2, w, w_scale), triton.cdiv(K, GROUP), tiles, out, cfg)


def _launch_wo(x2: Tensor, w: Tensor, w_scale: Tensor, out: Tensor, cfg: dict) -> None:
    if 128 % cfg["BLOCK_K"] or (cfg["DOT"] and min(cfg["BLOCK_M"], cfg["BLOCK_K"]) < 16):
        raise ValueError(f"fp8_linear: the weight-only path takes a BLOCK_K dividing 128 and, with DOT, "
                         f"BLOCK_M >= 16 and BLOCK_K >= 16 (tl.dot's smallest tile), got {cfg}")
    R, K = x2.shape
    N = w.shape[0]
    tiles = triton.cdiv(R, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    launch_split_k(_wo_gemm_kernel, (x2, w, w_scale), triton.cdiv(K, cfg["BLOCK_K"]), tiles, out, cfg,
                    IEEE=x2.dtype == torch.float32)


def _launch_swap(x2: Tensor, w: Tensor, w_scale: Tensor, out: Tensor, cfg: dict) -> None:
    if min(cfg["BLOCK_N"], cfg["BLOCK_T"]) < 16 or cfg.pop("BLOCK_K", GROUP) != GROUP:
        raise ValueError(f"fp8_linear: the swapped path takes BLOCK_N and BLOCK_T >= 16 (tl.dot's smallest "
                         f"tile) and BLOCK_K = {GROUP}, got {cfg}")
    R, K = x2.shape
    N = w.shape[0]
    cfg.setdefault("HW_CVT", False)
    xa, xs = (x2, x2) if cfg.setdefault("QX", True) else quantize_act(x2)  # xs unused with QX
    tiles = triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(R, cfg["BLOCK_T"])
    launch_split_k(_swap_w8a8_gemm_kernel, (xa, xs, w, w_scale), triton.cdiv(K, GROUP), tiles, out, cfg)


def scaled_mm_supported(N: int, K: int, device: torch.device) -> bool:
    """Whether `scaled_mm` runs here: cuBLASLt's block-scaled FP8 GEMM (DeepSeek's 1x128 activation and
    128x128 weight scales) is sm_90 only (CUDA >= 12.9, torch >= 2.9), and wants whole scale blocks: N a
    multiple of 128 and K of 512 (its weight scales are read in K groups of four blocks)."""
    if device.type != "cuda" or N % GROUP or K % (4 * GROUP) or not _stack_has_block_scaled_mm():
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


@functools.lru_cache(maxsize=None)
def _stack_has_block_scaled_mm() -> bool:
    """torch >= 2.9 built with CUDA >= 12.9 (read once: eager calls ask on every linear)."""
    if torch.version.cuda is None:
        return False
    torch_v, cuda_v = (tuple(int(p) for p in v.split("+")[0].split(".")[:2])  # "2.11.0+cu130" -> (2, 11)
                       for v in (torch.__version__, torch.version.cuda))
    return torch_v >= (2, 9) and cuda_v >= (12, 9)


def scaled_mm(x2: Tensor, w: Tensor, w_scale: Tensor, hw_cvt: bool = True) -> Tensor:
    """`x2` [R, K] @ dequant(w, w_scale).T through cuBLASLt's block-scaled FP8 GEMM (`torch._scaled_mm`):
    x quantised per row per 128 columns by `quantize_act` (rows padded to a multiple of 4 and the scales
    stored column-major, as cuBLASLt reads them), the checkpoint's e4m3 weight and 128x128 scales as they
    are (`w.t()` is the column-major [K, N] operand it wants, `w_scale.t()` its [K/128, N/128] scales)."""
    R, K = x2.shape
    N = w.shape[0]
    if not scaled_mm_supported(N, K, x2.device):
        raise ValueError(f"fp8_linear: the SCALED_MM path needs an sm_90 GPU, N % 128 == 0 and K % 512 == 0; "
                         f"got N={N}, K={K} on {x2.device}")
    w, w_scale = w.contiguous(), w_scale.contiguous()  # w.t() / w_scale.t(): the column-major operands
    xq, xs = quantize_act(x2, hw_cvt=hw_cvt, pad_rows=4, scales_by_column=True)  # [R', K], [R', K/128]
    y = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=w_scale.t(), out_dtype=x2.dtype)  # [R', N]
    return y[:R]


def fp8_linear_triton(x: Tensor, w: Tensor, w_scale: Tensor, config: dict | None = None) -> Tensor:
    """`x` [..., K] (bf16/fp16/fp32) times block-scaled e4m3 `w` [N, K]^T -> [..., N] in x's dtype.

    `config` (default `default_config`): `DEQUANT` (weight dequantised, then a dense GEMM in x's dtype),
    `SWAP` (swapped-operand w8a8 kernel), `WO` (weight-only kernel) or `FUSED` picks the path, else the
    two-kernel one; the rest are its kernel's tiles (`swap_config` / `wo_config` / `fused_config` /
    `two_kernel_config` keys; `SPLIT_K` > 1 splits K on any path)."""
    *lead, K = x.shape
    N = w.shape[0]
    x2 = x.reshape(-1, K)  # [R, K]
    if x2.stride(-1) != 1:  # strided rows (a column slice of a fused projection's output) are read in place
        x2 = x2.contiguous()
    R = x2.shape[0]
    if R == 0:
        return x.new_empty(*lead, N)
    cfg = dict(config or default_config(R, N, K, x.device))
    if cfg.pop("SCALED_MM", False):
        return scaled_mm(x2, w, w_scale, hw_cvt=cfg.pop("HW_CVT", x.is_cuda)).reshape(*lead, N)
    if cfg.pop("DEQUANT", False):
        wd = dequantize_fp8_block(w, w_scale, x.dtype)  # [N, K]; Inductor fuses this into one pass over w
        return torch.mm(x2, wd.t()).reshape(*lead, N)
    out = torch.empty(R, N, dtype=x.dtype, device=x.device)
    w, w_scale = w.contiguous(), w_scale.contiguous()
    if cfg.pop("SWAP", False):
        _launch_swap(x2, w, w_scale, out, cfg)
    elif cfg.pop("WO", False):
        _launch_wo(x2, w, w_scale, out, cfg)
    elif cfg.pop("FUSED", False):
        _launch_fused(x2, w, w_scale, out, cfg)
    else:
        _launch_two_kernel(x2, w, w_scale, out, cfg)
    return out.reshape(*lead, N)
