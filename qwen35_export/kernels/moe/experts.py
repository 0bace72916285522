"""Routed experts as two grouped GEMMs over expert-sorted, BLOCK_M-padded token tiles, then a combine.

1. `_gate_up_kernel`: each tile gathers its tokens' rows of x, multiplies by its expert's gate and up rows
   (two accumulators over the same columns) and writes `h = silu(gate) * up` at the tile's padded rows.
   FP8 prefill quantises h per row per 128 columns in this epilogue (BLOCK_N = 128, one scale group).
2. `_down_kernel`: h tiles (contiguous) times the expert's down weights, scaled by the routing weight,
   written to the slot's row of y [N*k, H].
3. `_combine_kernel`: out[t] = sum_j y[t*k + j] in fp32.

Weights: BF16, or e4m3 with the checkpoint's 128x128 block scales applied per K step. Two regimes by
token count (`DECODE_MAX_TOKENS`). Prefill quantises activations per token per 128 columns and runs
`tl.dot` on fp8 operands. FP8 decode has two variants, picked by the config: the swapped-operand kernels
(`SWAP`, what the stored tables use: `_gate_up_swap_kernel` / `_down_swap_kernel` put the e4m3 weight tile
on the MMA's wide side and quantise x and h as prefill does), or `_gate_up_kernel` / `_down_kernel` keeping
activations in bf16 and converting the fp8 weight tile in registers (closer to the reference, slower).

PAIRS mode (decode at up to `PAIRS_MAX_TOKENS` tokens) replaces the expert sort: the kernels read the ids
directly, tile i belongs to slot i's expert, and only the first slot of each BLOCK_M-group of an expert's
slots runs (see `_tile`); h is then indexed by slot. The combine is the same in both modes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ..fp8_linear.gemm import grouped_tile
from ..fp8_linear.quant import INTERPRET, act_group, cast_out, dot, quant_group, quantize_act
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .align import align_block_size, upper_bound
from .configs import DECODE_MAX_TOKENS, PAIRS_MAX_TOKENS, get_config

# Token count whose stored tiles a symbolic (dynamic prefill) graph uses: a typical prefill chunk.
PREFILL_CONFIG_TOKENS = 4096
# PAIRS mode holds all ids in one block per program (and a [BLOCK_M, BLOCK_P] rank match): past this many
# slots that costs registers the align path does not need.
PAIRS_MAX_SLOTS = 1024


@triton.jit
def _tile(slots_ptr, tile_expert_ptr, num_padded_ptr, M, num_tiles_m, num_cols,
          PAIRS: tl.constexpr, BLOCK_P: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's tile: (dead, expert, h rows, their slots, row mask, column offsets, mask, pid_n).

    Align mode: tiles come from `align_block_size`; dead tiles lie past the last expert's padded rows (the
    grid is sized for the worst case) and h rows are the padded positions.
    PAIRS mode (`slots_ptr` is ids.flatten(), M slots, `BLOCK_P` >= M): tile i starts at slot i with expert
    e = ids[i]; it is live when slot i is the 0th, BLOCK_M-th, ... slot of e (in slot order) and then takes
    that slot and e's next BLOCK_M - 1 slots. Each slot lands in exactly one live tile, and e has
    ceil(count / BLOCK_M) live tiles: the align path's weight reads, without its sort and launch. h rows are
    the slots themselves (h is [M, I])."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_tiles_m, tl.cdiv(num_cols, BLOCK_N), GROUP_M)
    if PAIRS:
        offs_j = tl.arange(0, BLOCK_P)
        ids = tl.load(slots_ptr + offs_j, mask=offs_j < M, other=-1)  # [BLOCK_P]; no expert is -1
        e = tl.load(slots_ptr + pid_m).to(tl.int64)
        same = (ids == e).to(tl.int32)
        rank = tl.cumsum(same, 0) - same  # each slot's index among its expert's slots
        first = tl.sum(tl.where(offs_j == pid_m, rank, 0), 0)
        dead = first % BLOCK_M != 0
        want = first + tl.arange(0, BLOCK_M)  # ranks of this tile's rows
        hit = (same[None, :] != 0) & (rank[None, :] == want[:, None])  # [BLOCK_M, BLOCK_P]
        slot = tl.min(tl.where(hit, offs_j[None, :], M), axis=1)  # M: padding row
        offs_p = slot
    else:
        dead = pid_m * BLOCK_M >= tl.load(num_padded_ptr)
        e = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
        offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        slot = tl.load(slots_ptr + offs_p)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return dead, e, offs_p, slot, slot < M, offs_n, offs_n < num_cols, pid_n


@triton.jit
def _mma(acc, a, b, sa, sb, A_FP8: tl.constexpr, B_FP8: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b for one K step, with the 128-block scales of this step: sa [BM] for e4m3 activations,
    sb [BN] for e4m3 weights (decode converts the weight tile to the activations' dtype instead)."""
    if B_FP8:
        if A_FP8:
            return acc + dot(a, b, UPCAST) * (sa[:, None] * sb[None, :])
        else:
            return acc + dot(a, b.to(a.dtype), UPCAST) * sb[None, :]
    else:
        return acc + dot(a, b, UPCAST)


@triton.jit
def _load_a(a_ptrs, row_ok, k_ok, EVEN_K: tl.constexpr):
    """One K step's activation tile [BM, BK], zero past the rows and, unless EVEN_K (no K tail), past K."""
    if EVEN_K:
        return tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        return tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)


@triton.jit
def _load_b(b_ptrs, col_ok, k_ok, EVEN_K: tl.constexpr):
    """One K step's weight tile [BK, BN], zero past the columns and, unless EVEN_K, past K."""
    if EVEN_K:
        return tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
    else:
        return tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _gate_up_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, h_ptr, hs_ptr, slots_ptr, tile_expert_ptr, num_padded_ptr,
                    M, H, I, top_k, num_tiles_m,
                    stride_xm, stride_xsm, stride_we, stride_wn, stride_wse, stride_wsn, stride_hm, stride_hsm,
                    A_FP8: tl.constexpr, B_FP8: tl.constexpr, OUT_FP8: tl.constexpr, UPCAST: tl.constexpr,
                    EVEN_K: tl.constexpr, FUSED: tl.constexpr, PAIRS: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    dead, e, offs_p, slot, row_ok, offs_n, n_ok, pid_n = _tile(
        slots_ptr, tile_expert_ptr, num_padded_ptr, M, num_tiles_m, I, PAIRS, BLOCK_P, BLOCK_M, BLOCK_N, GROUP_M)
    if dead:
        return
    tok = (slot // top_k).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]
    xs_ptrs = xs_ptr + tok * stride_xsm
    sa = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if FUSED:
        # One [BK, 2*BN] weight tile (gate columns, then the matching up columns) and one wide dot:
        # the A tile feeds twice the MMA width, as a 256-wide wgmma does best.
        offs_c = tl.arange(0, 2 * BLOCK_N)
        n_c = pid_n * BLOCK_N + offs_c % BLOCK_N
        rows = tl.where(offs_c < BLOCK_N, n_c, I + n_c)  # weight rows of the gate / up columns
        c_ok = n_c < I
        b_ptrs = w_ptr + e * stride_we + rows[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, 2BN]
        bs_ptrs = ws_ptr + e * stride_wse + (rows // 128) * stride_wsn
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        sb = tl.zeros((2 * BLOCK_N,), dtype=tl.float32)
        for kb in range(0, tl.cdiv(H, BLOCK_K)):
            k_ok = offs_k < H - kb * BLOCK_K
            a, b = _load_a(a_ptrs, row_ok, k_ok, EVEN_K), _load_b(b_ptrs, c_ok, k_ok, EVEN_K)
            if B_FP8:
                sb = tl.load(bs_ptrs + (kb * BLOCK_K) // 128, mask=c_ok, other=0.0)
            if A_FP8:
                sa = tl.load(xs_ptrs + (kb * BLOCK_K) // 128, mask=row_ok, other=0.0)
            acc = _mma(acc, a, b, sa, sb, A_FP8, B_FP8, UPCAST)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    else:
        g_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, BN]
        u_ptrs = g_ptrs + I * stride_wn
        gs_ptrs = ws_ptr + e * stride_wse + (offs_n // 128) * stride_wsn
        us_ptrs = ws_ptr + e * stride_wse + ((offs_n + I) // 128) * stride_wsn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sg = tl.zeros((BLOCK_N,), dtype=tl.float32)
        su = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for kb in range(0, tl.cdiv(H, BLOCK_K)):
            k_ok = offs_k < H - kb * BLOCK_K
            a = _load_a(a_ptrs, row_ok, k_ok, EVEN_K)
            bg, bu = _load_b(g_ptrs, n_ok, k_ok, EVEN_K), _load_b(u_ptrs, n_ok, k_ok, EVEN_K)
            if B_FP8:
                sg = tl.load(gs_ptrs + (kb * BLOCK_K) // 128, mask=n_ok, other=0.0)
                su = tl.load(us_ptrs + (kb * BLOCK_K) // 128, mask=n_ok, other=0.0)
            if A_FP8:
                sa = tl.load(xs_ptrs + (kb * BLOCK_K) // 128, mask=row_ok, other=0.0)
            acc_g = _mma(acc_g, a, bg, sa, sg, A_FP8, B_FP8, UPCAST)
            acc_u = _mma(acc_u, a, bu, sa, su, A_FP8, B_FP8, UPCAST)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up, fp32
    # Padding rows are not stored (PAIRS mode has no row for them); `_down_kernel` masks them on load.
    h_ptrs = h_ptr + offs_p[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    if OUT_FP8:
        q, s = quant_group(h)
        tl.store(h_ptrs, q, mask=row_ok[:, None] & n_ok[None, :])
        tl.store(hs_ptr + offs_p.to(tl.int64) * stride_hsm + pid_n, s, mask=row_ok)
    else:
        tl.store(h_ptrs, cast_out(h, h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, hs_ptr, w_ptr, ws_ptr, y_ptr, tw_ptr, slots_ptr, tile_expert_ptr, num_padded_ptr,
                 M, H, I, num_tiles_m,
                 stride_hm, stride_hsm, stride_we, stride_wn, stride_wse, stride_wsn, stride_ym,
                 A_FP8: tl.constexpr, B_FP8: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
                 PAIRS: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    dead, e, offs_p, slot, row_ok, offs_n, n_ok, _ = _tile(
        slots_ptr, tile_expert_ptr, num_padded_ptr, M, num_tiles_m, H, PAIRS, BLOCK_P, BLOCK_M, BLOCK_N, GROUP_M)
    if dead:
        return
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + offs_p[:, None].to(tl.int64) * stride_hm + offs_k[None, :]
    b_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, BN]
    bs_ptrs = ws_ptr + e * stride_wse + (offs_n // 128) * stride_wsn
    as_ptrs = hs_ptr + offs_p.to(tl.int64) * stride_hsm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sa = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sb = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kb in range(0, tl.cdiv(I, BLOCK_K)):
        k_ok = offs_k < I - kb * BLOCK_K
        a, b = _load_a(a_ptrs, row_ok, k_ok, EVEN_K), _load_b(b_ptrs, n_ok, k_ok, EVEN_K)
        if B_FP8:
            sb = tl.load(bs_ptrs + (kb * BLOCK_K) // 128, mask=n_ok, other=0.0)
        if A_FP8:
            sa = tl.load(as_ptrs + (kb * BLOCK_K) // 128, mask=row_ok, other=0.0)
        acc = _mma(acc, a, b, sa, sb, A_FP8, B_FP8, UPCAST)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    tw = tl.load(tw_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * tw[:, None]
    y_ptrs = y_ptr + slot[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, cast_out(acc, y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _gate_up_swap_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, h_ptr, hs_ptr, slots_ptr, tile_expert_ptr, num_padded_ptr,
                         M, H, I, top_k, num_tiles_m,
                         stride_xm, stride_xsm, stride_we, stride_wn, stride_wse, stride_wsn, stride_hm,
                         stride_hsm, stride_hk, QX: tl.constexpr, OUT_FP8: tl.constexpr, HW_CVT: tl.constexpr,
                         SPLIT_K: tl.constexpr, UPCAST: tl.constexpr, PAIRS: tl.constexpr, BLOCK_P: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """FP8 decode gate_up with swapped operands (see fp8_linear's `_swap_w8a8_gemm_kernel`): the e4m3 gate
    and up tiles [BLOCK_N, 128] take the MMA's M side, the tile's BLOCK_M tokens its N side, per 128-column
    group on e4m3 operands. `QX`: x is unquantised and each program quantises its gathered rows per group
    (else x is `quantize_act`'s q with scales xs). h = silu(gate) * up comes out e4m3 per row per 128
    columns (`OUT_FP8`, BLOCK_N = 128: one group per program) or in fp32 for the down kernel to quantise:
    either way the quantisation of the prefill path, from the fp32 h. `SPLIT_K` > 1 (program axis 1: its
    share of H's 128-column groups) writes its fp32 gate and up partial sums instead, [SPLIT_K, P, 2I] at
    `h_ptr + split * stride_hk`: the down kernel sums them and applies the SiLU (a decode call of a few
    experts has too few weight tiles to keep every SM streaming)."""
    dead, e, offs_p, slot, row_ok, offs_n, n_ok, pid_n = _tile(
        slots_ptr, tile_expert_ptr, num_padded_ptr, M, num_tiles_m, I, PAIRS, BLOCK_P, BLOCK_M, BLOCK_N, GROUP_M)
    if dead:
        return
    tok = (slot // top_k).to(tl.int64)
    offs_k = tl.arange(0, 128)
    x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]  # [BM, 128]
    xs_ptrs = xs_ptr + tok * stride_xsm
    g_ptrs = w_ptr + e * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BN, 128]
    u_ptrs = g_ptrs + I * stride_wn
    gs_ptrs = ws_ptr + e * stride_wse + (offs_n // 128) * stride_wsn
    us_ptrs = ws_ptr + e * stride_wse + ((offs_n + I) // 128) * stride_wsn
    acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    steps = tl.cdiv(tl.cdiv(H, 128), SPLIT_K)
    kb0 = tl.program_id(1) * steps
    x_ptrs += kb0 * 128
    g_ptrs += kb0 * 128
    u_ptrs += kb0 * 128
    for kb in range(kb0, tl.minimum(kb0 + steps, tl.cdiv(H, 128))):
        k_ok = offs_k < H - kb * 128
        q, sa = act_group(x_ptrs, xs_ptrs + kb, row_ok[:, None] & k_ok[None, :], row_ok, QX, HW_CVT)
        qt = tl.trans(q)  # [128, BM]
        bg = tl.load(g_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        bu = tl.load(u_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        sg = tl.load(gs_ptrs + kb, mask=n_ok, other=0.0)
        su = tl.load(us_ptrs + kb, mask=n_ok, other=0.0)
        acc_g += dot(bg, qt, UPCAST) * (sg[:, None] * sa[None, :])
        acc_u += dot(bu, qt, UPCAST) * (su[:, None] * sa[None, :])
        x_ptrs += 128
        g_ptrs += 128
        u_ptrs += 128
    h_ptrs = h_ptr + offs_p[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    if SPLIT_K > 1:
        h_ptrs += tl.program_id(1).to(tl.int64) * stride_hk
        tl.store(h_ptrs, tl.trans(acc_g), mask=row_ok[:, None] & n_ok[None, :])
        tl.store(h_ptrs + I, tl.trans(acc_u), mask=row_ok[:, None] & n_ok[None, :])
        return
    h = tl.trans(acc_g * tl.sigmoid(acc_g) * acc_u)  # [BM, BN]: silu(gate) * up, fp32
    if OUT_FP8:
        q, s = quant_group(h, HW_CVT)
        tl.store(h_ptrs, q, mask=row_ok[:, None] & n_ok[None, :])
        tl.store(hs_ptr + offs_p.to(tl.int64) * stride_hsm + pid_n, s, mask=row_ok)
    else:
        tl.store(h_ptrs, h, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_swap_kernel(h_ptr, hs_ptr, w_ptr, ws_ptr, y_ptr, tw_ptr, slots_ptr, tile_expert_ptr, num_padded_ptr,
                      M, H, I, num_tiles_m,
                      stride_hm, stride_hsm, stride_hk, stride_we, stride_wn, stride_wse, stride_wsn, stride_ym,
                      QX: tl.constexpr, HW_CVT: tl.constexpr, SPLIT_IN: tl.constexpr, UPCAST: tl.constexpr,
                      PAIRS: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """FP8 decode down with swapped operands: e4m3 down tile [BLOCK_N, 128] times the tile's h rows (fp32,
    quantised here per 128-column group when `QX`, else e4m3 with scales from gate_up), scaled by the
    routing weight, written to each slot's row of y as `_down_kernel` does. `SPLIT_IN` > 1: h arrives as
    gate_up's SPLIT_IN fp32 gate / up partial sums ([SPLIT_IN, P, 2I]), summed and put through the SiLU here."""
    dead, e, offs_p, slot, row_ok, offs_n, n_ok, _ = _tile(
        slots_ptr, tile_expert_ptr, num_padded_ptr, M, num_tiles_m, H, PAIRS, BLOCK_P, BLOCK_M, BLOCK_N, GROUP_M)
    if dead:
        return
    offs_k = tl.arange(0, 128)
    a_ptrs = h_ptr + offs_p[:, None].to(tl.int64) * stride_hm + offs_k[None, :]  # [BM, 128]
    as_ptrs = hs_ptr + offs_p.to(tl.int64) * stride_hsm
    b_ptrs = w_ptr + e * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BN, 128]
    bs_ptrs = ws_ptr + e * stride_wse + (offs_n // 128) * stride_wsn
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kb in range(0, tl.cdiv(I, 128)):
        if SPLIT_IN > 1:
            g = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
            u = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
            for sk in tl.static_range(SPLIT_IN):
                g += tl.load(a_ptrs + sk * stride_hk, mask=row_ok[:, None], other=0.0)
                u += tl.load(a_ptrs + sk * stride_hk + I, mask=row_ok[:, None], other=0.0)
            q, sa = quant_group(g * tl.sigmoid(g) * u, HW_CVT)
        else:  # I is a multiple of 128 (check_config): no column mask
            q, sa = act_group(a_ptrs, as_ptrs + kb, row_ok[:, None], row_ok, QX, HW_CVT)
        b = tl.load(b_ptrs, mask=n_ok[:, None], other=0.0)
        sb = tl.load(bs_ptrs + kb, mask=n_ok, other=0.0)
        acc += dot(b, tl.trans(q), UPCAST) * (sb[:, None] * sa[None, :])
        a_ptrs += 128
        b_ptrs += 128
    tw = tl.load(tw_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)
    y = tl.trans(acc) * tw[:, None]  # [BM, BN]
    y_ptrs = y_ptr + slot[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, cast_out(y, y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(y_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (t * TOP_K + j) * H + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + offs, cast_out(acc, out_ptr.dtype.element_ty), mask=ok)


# BF16 weights load without a K mask when K is a multiple of BLOCK_K (every Qwen3.5 geometry: H and I are
# multiples of 128). H200, CUDA-graph medians while an engine compiled beside them (bench/moe.py --masked-k
# for the masked side; bench/results/moe_even_k_h200/): BF16 prefill 2-3% faster unmasked (35B 4096 / 16384
# tokens 851 -> 832 / 2503 -> 2424 us, 397B 4338 -> 4238 / 11807 -> 11530 us), FP8 prefill 3-5% slower
# (762 -> 801, 2507 -> 2619, 3709 -> 3820, 10155 -> 10670 us; measured with the unmasked loads on for FP8 too,
# before this rule): FP8 weights keep the masked loads. A single run per side on a loaded machine: small
# effects, either way. False: always masked.
EVEN_K_LOADS = True


def even_k(K: int, block_k: int, fp8_weights: bool = False) -> bool:
    """Whether the kernels drop the K mask from their loads (see EVEN_K_LOADS)."""
    return EVEN_K_LOADS and not fp8_weights and K % block_k == 0


def _launch_opts(c: dict) -> dict:
    return {k: c[k] for k in ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")}


def _gate_up_opts(c: dict) -> dict:
    """gate_up also takes FUSED (one [BK, 2*BN] weight tile and one dot for gate and up; default off)."""
    return dict(_launch_opts(c), FUSED=bool(c.get("FUSED", 0)))


Tiles = tuple[Tensor, Tensor, Tensor]  # align_block_size's (sorted_slots, tile_expert, num_padded)


def _tile_args(tiles: Tiles | Tensor, M: int, bm: int) -> tuple[Tensor, Tensor, Tensor, int, int, dict]:
    """Kernel tile arguments -> (slots, tile_expert, num_padded, tile rows, h rows, constexprs).

    `tiles` is align_block_size's output, or ids.flatten() [M] for PAIRS mode (one tile per slot; the
    kernels find each tile's rows from the ids themselves, see `_tile`)."""
    if isinstance(tiles, Tensor):
        # The kernel holds all M ids in one block: size it for the largest M the (symbolic) graph admits.
        m_max = upper_bound(M)
        if m_max is None or m_max > PAIRS_MAX_SLOTS:
            raise ValueError(f"moe experts: PAIRS mode needs at most {PAIRS_MAX_SLOTS} (token, expert) slots "
                             f"known statically, found an upper bound of {m_max}")
        return tiles, tiles, tiles, M, M, dict(PAIRS=True, BLOCK_P=triton.next_power_of_2(m_max))
    slots, tile_expert, num_padded = tiles
    P = slots.shape[0]
    return slots, tile_expert, num_padded, P // bm, P, dict(PAIRS=False, BLOCK_P=1)


def gate_up(x: Tensor, tiles: Tiles | Tensor, k: int, w_gate_up: Tensor,
            w_gate_up_scale: Tensor | None, cfg: dict, quant: bool) -> tuple[Tensor, Tensor]:
    """h = silu(gate) * up -> (h [P, I], scales). `tiles`: align_block_size's output (h rows are its padded
    rows, P of them) or ids.flatten() for PAIRS mode (h rows are the slots, P = N*k).

    `quant`: x is quantised first and h comes out e4m3 with scales [P, I/128]; else h is in x's dtype
    (the scales tensor is then h itself, unused). Padding rows of h are left unwritten."""
    N, H = x.shape
    I = w_gate_up.shape[1] // 2
    bm, c = cfg["BLOCK_M"], cfg["gate_up"]
    slots, tile_expert, num_padded, num_tiles_m, P, mode = _tile_args(tiles, N * k, bm)
    fp8 = w_gate_up_scale is not None
    if quant:
        xa, xs = quantize_act(x)  # [N, H] fp8, [N, ceil(H/128)]
        h = torch.empty(P, I, dtype=torch.float8_e4m3fn, device=x.device)
        hs = torch.empty(P, I // 128, dtype=torch.float32, device=x.device)
    else:
        xa, xs = x, x  # xs unused: A_FP8 is off
        h = torch.empty(P, I, dtype=x.dtype, device=x.device)
        hs = h
    ws = w_gate_up_scale if fp8 else w_gate_up  # unused when B_FP8 is off
    grid = (num_tiles_m * triton.cdiv(I, c["BLOCK_N"]),)
    wrap_triton(_gate_up_kernel)[grid](
        xa, xs, w_gate_up, ws, h, hs, slots, tile_expert, num_padded, N * k, H, I, k, num_tiles_m,
        xa.stride(0), xs.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), ws.stride(0), ws.stride(1),
        h.stride(0), hs.stride(0), A_FP8=quant, B_FP8=fp8, OUT_FP8=quant, UPCAST=INTERPRET,
        EVEN_K=even_k(H, c["BLOCK_K"], fp8), BLOCK_M=bm, **mode, **_gate_up_opts(c))
    return h, hs


def down(h: Tensor, hs: Tensor, weights: Tensor, tiles: Tiles | Tensor, w_down: Tensor,
         w_down_scale: Tensor | None, cfg: dict, quant: bool, dtype: torch.dtype) -> Tensor:
    """y [N*k, H]: each slot's expert output times its routing weight, in `dtype` (`tiles` as for gate_up)."""
    M = weights.numel()
    H, I = w_down.shape[1], w_down.shape[2]
    bm, c = cfg["BLOCK_M"], cfg["down"]
    slots, tile_expert, num_padded, num_tiles_m, _, mode = _tile_args(tiles, M, bm)
    ws = w_down_scale if w_down_scale is not None else w_down
    # One weighted row per (token, expert) slot; x's dtype keeps it at half the bytes of fp32 for bf16
    # models, and the combine sums the k rows in fp32.
    y = torch.empty(M, H, dtype=dtype, device=h.device)
    grid = (num_tiles_m * triton.cdiv(H, c["BLOCK_N"]),)
    wrap_triton(_down_kernel)[grid](
        h, hs, w_down, ws, y, weights, slots, tile_expert, num_padded, M, H, I, num_tiles_m,
        h.stride(0), hs.stride(0), w_down.stride(0), w_down.stride(1), ws.stride(0), ws.stride(1), y.stride(0),
        A_FP8=quant, B_FP8=w_down_scale is not None, UPCAST=INTERPRET,
        EVEN_K=even_k(I, c["BLOCK_K"], w_down_scale is not None),
        BLOCK_M=bm, **mode, **_launch_opts(c))
    return y


def _swap_opts(c: dict) -> dict:
    return {k: c[k] for k in ("BLOCK_N", "GROUP_M", "num_warps", "num_stages")}


def gate_up_swap(x: Tensor, tiles: Tiles | Tensor, k: int, w_gate_up: Tensor, w_gate_up_scale: Tensor,
                 cfg: dict) -> tuple[Tensor, Tensor]:
    """FP8 decode gate_up on swapped operands -> (h [P, I], scales [P, I/128]): h e4m3 with its scales when
    cfg["gate_up"]["OUT_FP8"], else fp32 h (the scales tensor is then h itself, unused)."""
    N, H = x.shape
    I = w_gate_up.shape[1] // 2
    bm, c = cfg["BLOCK_M"], cfg["gate_up"]
    slots, tile_expert, num_padded, num_tiles_m, P, mode = _tile_args(tiles, N * k, bm)
    qx, out_fp8, split = bool(c.get("QX", 1)), bool(c.get("OUT_FP8", 0)), int(c.get("SPLIT_K", 1))
    xa, xs = (x, x) if qx else quantize_act(x)  # xs unused with QX
    if split > 1:  # fp32 gate / up partial sums per split: [split, P, 2I]
        h = torch.empty(split, P, 2 * I, dtype=torch.float32, device=x.device)
        hs = h
    elif out_fp8:
        h = torch.empty(P, I, dtype=torch.float8_e4m3fn, device=x.device)
        hs = torch.empty(P, I // 128, dtype=torch.float32, device=x.device)
    else:
        h = torch.empty(P, I, dtype=torch.float32, device=x.device)
        hs = h
    grid = (num_tiles_m * triton.cdiv(I, c["BLOCK_N"]), split)
    wrap_triton(_gate_up_swap_kernel)[grid](
        xa, xs, w_gate_up, w_gate_up_scale, h, hs, slots, tile_expert, num_padded, N * k, H, I, k, num_tiles_m,
        xa.stride(0), xs.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up_scale.stride(0),
        w_gate_up_scale.stride(1), h.stride(-2), hs.stride(-2), h.stride(0) if split > 1 else 0, QX=qx,
        OUT_FP8=out_fp8, HW_CVT=bool(cfg.get("HW_CVT", 0)), SPLIT_K=split, UPCAST=INTERPRET, BLOCK_M=bm, **mode,
        **_swap_opts(c))
    return h, hs


def down_swap(h: Tensor, hs: Tensor, weights: Tensor, tiles: Tiles | Tensor, w_down: Tensor,
              w_down_scale: Tensor, cfg: dict, dtype: torch.dtype) -> Tensor:
    """FP8 decode down on swapped operands: y [N*k, H] in `dtype` (h as gate_up_swap returns it: e4m3 with
    scales, fp32 [P, I], or fp32 gate / up partial sums [split, P, 2I])."""
    M = weights.numel()
    H, I = w_down.shape[1], w_down.shape[2]
    bm, c = cfg["BLOCK_M"], cfg["down"]
    slots, tile_expert, num_padded, num_tiles_m, _, mode = _tile_args(tiles, M, bm)
    y = torch.empty(M, H, dtype=dtype, device=h.device)
    grid = (num_tiles_m * triton.cdiv(H, c["BLOCK_N"]),)
    wrap_triton(_down_swap_kernel)[grid](
        h, hs, w_down, w_down_scale, y, weights, slots, tile_expert, num_padded, M, H, I, num_tiles_m,
        h.stride(-2), hs.stride(-2), h.stride(0) if h.dim() == 3 else 0, w_down.stride(0), w_down.stride(1),
        w_down_scale.stride(0), w_down_scale.stride(1), y.stride(0), QX=h.dtype != torch.float8_e4m3fn,
        HW_CVT=bool(cfg.get("HW_CVT", 0)), SPLIT_IN=h.shape[0] if h.dim() == 3 else 1, UPCAST=INTERPRET,
        BLOCK_M=bm, **mode, **_swap_opts(c))
    return y


def combine(y: Tensor, N: int, k: int) -> Tensor:
    """out [N, H] = sum over each token's k slot rows of y [N*k, H], accumulated in fp32."""
    H = y.shape[1]
    out = torch.empty(N, H, dtype=y.dtype, device=y.device)
    block_h = min(1024, triton.next_power_of_2(H))
    wrap_triton(_combine_kernel)[(N, triton.cdiv(H, block_h))](y, out, H, TOP_K=k, BLOCK_H=block_h, num_warps=4)
    return out


def check_config(cfg: dict, fp8: bool, quant: bool, I: int) -> None:
    gu, dn = cfg["gate_up"], cfg["down"]
    if cfg.get("SWAP"):
        if gu.get("BLOCK_K", 128) != 128 or dn.get("BLOCK_K", 128) != 128:
            raise ValueError(f"moe_experts_fp8: SWAP kernels step K by the 128-column scale group: {cfg}")
        if not fp8 or quant:
            raise ValueError(f"moe experts: SWAP is the FP8 decode path (fp8 weights, decode regime): {cfg}")
        if min(gu["BLOCK_N"], dn["BLOCK_N"], cfg["BLOCK_M"]) < 16:
            raise ValueError(f"moe_experts_fp8: SWAP tiles are >= 16 on each side (tl.dot's smallest): {cfg}")
        if gu.get("OUT_FP8") and gu.get("SPLIT_K", 1) > 1:
            raise ValueError(f"moe_experts_fp8: SWAP gate_up with SPLIT_K leaves the SiLU and h's quantisation "
                             f"to down; OUT_FP8 cannot be on: {cfg}")
        if gu.get("OUT_FP8") and gu["BLOCK_N"] != 128:
            raise ValueError(f"moe_experts_fp8: SWAP gate_up quantises h per 128 columns with OUT_FP8, its "
                             f"BLOCK_N must be 128: {cfg}")
    if fp8 and (128 % gu.get("BLOCK_K", 128) or 128 % dn.get("BLOCK_K", 128)):
        raise ValueError(f"moe_experts_fp8: BLOCK_K must divide the 128 scale block, got {cfg}")
    if quant and gu["BLOCK_N"] != 128:
        raise ValueError(f"moe_experts_fp8: prefill quantises h per 128 columns, gate_up BLOCK_N must be 128: {cfg}")
    if fp8 and I % 128:
        raise ValueError(f"moe_experts_fp8: I must be a multiple of 128 (scale blocks split gate/up), got {I}")


def use_pairs(N: int | torch.SymInt, decode: bool) -> bool:
    """Whether N tokens take PAIRS mode: decode with N <= PAIRS_MAX_TOKENS for every N the graph admits.

    At a few tokens nearly every slot has its own expert: sorting slots by expert buys nothing, and the
    align kernel is a launch of its own (3.8 us of a 25 us decode MoE on H200). A decode graph whose batch
    may exceed PAIRS_MAX_TOKENS (every engine's: its batch Dim has max >= 2) keeps the align path: the
    bound is not provable there, and asking would guard on N."""
    return decode and statically_known_true(N <= PAIRS_MAX_TOKENS)


def moe_experts_triton(x: Tensor, weights: Tensor, ids: Tensor, w_gate_up: Tensor, w_down: Tensor,
                       w_gate_up_scale: Tensor | None = None, w_down_scale: Tensor | None = None,
                       config: dict | None = None, decode: bool | None = None,
                       pairs: bool | None = None) -> Tensor:
    """Routed experts: x [N, H], weights/ids [N, k], w_gate_up [E, 2I, H], w_down [E, H, I] -> [N, H].

    With scales, the weights are e4m3 with 128x128 block scales [E, 2I/128, ceil(H/128)] and
    [E, ceil(H/128), I/128]. `decode` (default: N <= DECODE_MAX_TOKENS) picks the regime; `pairs`
    (default: decode and N <= PAIRS_MAX_TOKENS) skips align_block_size and gives each (token, expert) slot
    its own tile (see `_tile`); `config` overrides the stored tile table (see configs.py).
    """
    N, _ = x.shape
    k = ids.shape[1]
    E, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    fp8 = w_gate_up_scale is not None
    if N == 0:
        return torch.empty_like(x)
    # Under export N is symbolic (a dynamic batch/length): every choice below must hold for all N the graph
    # admits, so decide from what is statically known and never let a comparison put a guard on N (a guard
    # would bake the example's regime and tile map into an AOTI graph that then runs other N).
    if decode is None:
        decode = statically_known_true(N <= DECODE_MAX_TOKENS)
    n_cfg = N if isinstance(N, int) else (DECODE_MAX_TOKENS if decode else PREFILL_CONFIG_TOKENS)
    cfg = config or get_config(E, I, n_cfg, x.device, "fp8" if fp8 else "bf16", k, decode)
    if pairs is None:
        pairs = use_pairs(N, decode)
    quant = fp8 and not decode
    check_config(cfg, fp8, quant, I)
    s13 = w_gate_up_scale.contiguous() if fp8 else None
    s2 = w_down_scale.contiguous() if fp8 else None
    tiles = ids.contiguous().reshape(-1) if pairs else align_block_size(ids, E, cfg["BLOCK_M"])
    if cfg.get("SWAP"):
        h, hs = gate_up_swap(x.contiguous(), tiles, k, w_gate_up.contiguous(), s13, cfg)
        y = down_swap(h, hs, weights.contiguous(), tiles, w_down.contiguous(), s2, cfg, x.dtype)
        return combine(y, N, k)
    h, hs = gate_up(x.contiguous(), tiles, k, w_gate_up.contiguous(), s13, cfg, quant)
    y = down(h, hs, weights.contiguous(), tiles, w_down.contiguous(), s2, cfg, quant, x.dtype)
    return combine(y, N, k)
