"""Routed experts as two grouped GEMMs over expert-sorted, BLOCK_M-padded token tiles, then a combine.

1. `_gate_up_kernel`: each tile gathers its tokens' rows of x, multiplies by its expert's gate and up rows
   (two accumulators over the same columns) and writes `h = silu(gate) * up` at the tile's padded rows.
   FP8 prefill quantises h per row per 128 columns in this epilogue (BLOCK_N = 128, one scale group).
2. `_down_kernel`: h tiles (contiguous) times the expert's down weights, scaled by the routing weight,
   written to the slot's row of y [N*k, H].
3. `_combine_kernel`: out[t] = sum_j y[t*k + j] in fp32.

Weights: BF16, or e4m3 with the checkpoint's 128x128 block scales applied per K step. Two regimes by
token count (`DECODE_MAX_TOKENS`): decode keeps activations in bf16 and converts the fp8 weight tile in
registers (memory bound: bytes, not tensor-core rate, matter, and it is closer to the reference);
prefill quantises activations per token per 128 columns and runs `tl.dot` on fp8 operands.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ..fp8_linear.gemm import grouped_tile
from ..fp8_linear.quant import INTERPRET, cast_out, dot, quant_group, quantize_act
from .align import align_block_size
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .configs import DECODE_MAX_TOKENS, get_config

# Token count whose stored tiles a symbolic (dynamic prefill) graph uses: a typical prefill chunk.
PREFILL_CONFIG_TOKENS = 4096


@triton.jit
def _tile(slots_ptr, tile_expert_ptr, num_padded_ptr, M, num_tiles_m, num_cols,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's tile: (dead, expert, padded rows, their slots, row mask, column offsets, mask, pid_n);
    dead tiles lie past the last expert's padded rows (the grid is sized for the worst case)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_tiles_m, tl.cdiv(num_cols, BLOCK_N), GROUP_M)
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
def _gate_up_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, h_ptr, hs_ptr, slots_ptr, tile_expert_ptr, num_padded_ptr,
                    M, H, I, top_k, num_tiles_m,
                    stride_xm, stride_xsm, stride_we, stride_wn, stride_wse, stride_wsn, stride_hm, stride_hsm,
                    A_FP8: tl.constexpr, B_FP8: tl.constexpr, OUT_FP8: tl.constexpr, UPCAST: tl.constexpr,
                    FUSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    dead, e, offs_p, slot, row_ok, offs_n, n_ok, pid_n = _tile(
        slots_ptr, tile_expert_ptr, num_padded_ptr, M, num_tiles_m, I, BLOCK_M, BLOCK_N, GROUP_M)
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
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
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
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            bg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
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
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up, fp32; padding rows give 0
    h_ptrs = h_ptr + offs_p[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    if OUT_FP8:
        q, s = quant_group(h)
        tl.store(h_ptrs, q, mask=n_ok[None, :])
        tl.store(hs_ptr + offs_p.to(tl.int64) * stride_hsm + pid_n, s)
    else:
        tl.store(h_ptrs, cast_out(h, h_ptr.dtype.element_ty), mask=n_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, hs_ptr, w_ptr, ws_ptr, y_ptr, tw_ptr, slots_ptr, tile_expert_ptr, num_padded_ptr,
                 M, H, I, num_tiles_m,
                 stride_hm, stride_hsm, stride_we, stride_wn, stride_wse, stride_wsn, stride_ym,
                 A_FP8: tl.constexpr, B_FP8: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    dead, e, offs_p, slot, row_ok, offs_n, n_ok, _ = _tile(
        slots_ptr, tile_expert_ptr, num_padded_ptr, M, num_tiles_m, H, BLOCK_M, BLOCK_N, GROUP_M)
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
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if B_FP8:
            sb = tl.load(bs_ptrs + (kb * BLOCK_K) // 128, mask=n_ok, other=0.0)
        if A_FP8:
            sa = tl.load(as_ptrs + (kb * BLOCK_K) // 128)
        acc = _mma(acc, a, b, sa, sb, A_FP8, B_FP8, UPCAST)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    tw = tl.load(tw_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * tw[:, None]
    y_ptrs = y_ptr + slot[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, cast_out(acc, y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(y_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (t * TOP_K + j) * H + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + offs, cast_out(acc, out_ptr.dtype.element_ty), mask=ok)


def _launch_opts(c: dict) -> dict:
    return {k: c[k] for k in ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")}


def _gate_up_opts(c: dict) -> dict:
    """gate_up also takes FUSED (one [BK, 2*BN] weight tile and one dot for gate and up; default off)."""
    return dict(_launch_opts(c), FUSED=bool(c.get("FUSED", 0)))


def gate_up(x: Tensor, tiles: tuple[Tensor, Tensor, Tensor], k: int, w_gate_up: Tensor,
            w_gate_up_scale: Tensor | None, cfg: dict, quant: bool) -> tuple[Tensor, Tensor]:
    """h = silu(gate) * up at the padded rows of `tiles` (align_block_size's output) -> (h [P, I], scales).

    `quant`: x is quantised first and h comes out e4m3 with scales [P, I/128]; else h is in x's dtype
    (the scales tensor is then h itself, unused)."""
    slots, tile_expert, num_padded = tiles
    N, H = x.shape
    I = w_gate_up.shape[1] // 2
    P, bm, c = slots.shape[0], cfg["BLOCK_M"], cfg["gate_up"]
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
    grid = (P // bm * triton.cdiv(I, c["BLOCK_N"]),)
    wrap_triton(_gate_up_kernel)[grid](
        xa, xs, w_gate_up, ws, h, hs, slots, tile_expert, num_padded, N * k, H, I, k, P // bm,
        xa.stride(0), xs.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), ws.stride(0), ws.stride(1),
        h.stride(0), hs.stride(0), A_FP8=quant, B_FP8=fp8, OUT_FP8=quant, UPCAST=INTERPRET, BLOCK_M=bm,
        **_gate_up_opts(c))
    return h, hs


def down(h: Tensor, hs: Tensor, weights: Tensor, tiles: tuple[Tensor, Tensor, Tensor], w_down: Tensor,
         w_down_scale: Tensor | None, cfg: dict, quant: bool, dtype: torch.dtype) -> Tensor:
    """y [N*k, H]: each slot's expert output times its routing weight, in `dtype`."""
    slots, tile_expert, num_padded = tiles
    M = weights.numel()
    H, I = w_down.shape[1], w_down.shape[2]
    P, bm, c = slots.shape[0], cfg["BLOCK_M"], cfg["down"]
    ws = w_down_scale if w_down_scale is not None else w_down
    # One weighted row per (token, expert) slot; x's dtype keeps it at half the bytes of fp32 for bf16
    # models, and the combine sums the k rows in fp32.
    y = torch.empty(M, H, dtype=dtype, device=h.device)
    grid = (P // bm * triton.cdiv(H, c["BLOCK_N"]),)
    wrap_triton(_down_kernel)[grid](
        h, hs, w_down, ws, y, weights, slots, tile_expert, num_padded, M, H, I, P // bm,
        h.stride(0), hs.stride(0), w_down.stride(0), w_down.stride(1), ws.stride(0), ws.stride(1), y.stride(0),
        A_FP8=quant, B_FP8=w_down_scale is not None, UPCAST=INTERPRET, BLOCK_M=bm, **_launch_opts(c))
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
    if fp8 and (128 % gu["BLOCK_K"] or 128 % dn["BLOCK_K"]):
        raise ValueError(f"moe_experts_fp8: BLOCK_K must divide the 128 scale block, got {cfg}")
    if quant and gu["BLOCK_N"] != 128:
        raise ValueError(f"moe_experts_fp8: prefill quantises h per 128 columns, gate_up BLOCK_N must be 128: {cfg}")
    if fp8 and I % 128:
        raise ValueError(f"moe_experts_fp8: I must be a multiple of 128 (scale blocks split gate/up), got {I}")


def moe_experts_triton(x: Tensor, weights: Tensor, ids: Tensor, w_gate_up: Tensor, w_down: Tensor,
                       w_gate_up_scale: Tensor | None = None, w_down_scale: Tensor | None = None,
                       config: dict | None = None, decode: bool | None = None) -> Tensor:
    """Routed experts: x [N, H], weights/ids [N, k], w_gate_up [E, 2I, H], w_down [E, H, I] -> [N, H].

    With scales, the weights are e4m3 with 128x128 block scales [E, 2I/128, ceil(H/128)] and
    [E, ceil(H/128), I/128]. `decode` (default: N <= DECODE_MAX_TOKENS) picks the regime; `config`
    overrides the stored tile table (see configs.py).
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
    quant = fp8 and not decode
    check_config(cfg, fp8, quant, I)
    s13 = w_gate_up_scale.contiguous() if fp8 else None
    s2 = w_down_scale.contiguous() if fp8 else None
    tiles = align_block_size(ids, E, cfg["BLOCK_M"])
    h, hs = gate_up(x.contiguous(), tiles, k, w_gate_up.contiguous(), s13, cfg, quant)
    y = down(h, hs, weights.contiguous(), tiles, w_down.contiguous(), s2, cfg, quant, x.dtype)
    return combine(y, N, k)
