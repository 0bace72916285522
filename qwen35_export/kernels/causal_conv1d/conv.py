"""Causal depthwise conv1d (kernel W, no bias) with fused SiLU: prefill (padded or packed) and decode update.

Memory-bound: each input read once (plus a W-1 row halo per tile), each output written once.
The conv state holds the last W-1 inputs of a sequence, [N, C, W-1], optionally in a pool indexed by slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton


@triton.jit
def _fwd_tile(xt, yt, w, cols, mc, t0, Tn, sx_t, C, lo,
              W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """y rows [t0 + lo, t0 + BT) of one channel tile from W shifted [BT, BC] loads (the overlap hits L1/L2);
    rows before 0 count as zeros (the state's part of the first W-1 rows is _fwd_head's).

    xt, yt point at row t0 of x and y (int64 scalar math done once per tile, so the tile offsets fit int32
    at any T). One code path for every tile, no state gather in it: a [BT, BC] gather of the [C, W-1] state
    (scalar loads) in the first tile's branch once set the register count of the whole kernel.
    """
    tl.static_assert(BT >= W - 1, "tiles after the first must not store rows < W-1 (_fwd_head's)")
    o_t = tl.arange(0, BT)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        s = o_t + (j - (W - 1))  # row offset from t0
        m = (s >= -t0) & (s < Tn - t0)
        b_x = tl.load(xt + s[:, None] * sx_t + cols[None, :], mask=m[:, None] & mc[None, :],
                      other=0.).to(tl.float32)
        b_w = tl.load(w + cols * W + j, mask=mc, other=0.).to(tl.float32)
        acc += b_x * b_w[None, :]
    b_y = acc * tl.sigmoid(acc)
    tl.store(yt + o_t[:, None] * C + cols[None, :], b_y.to(yt.dtype.element_ty),
             mask=((o_t >= lo) & (o_t < Tn - t0))[:, None] & mc[None, :])


@triton.jit
def _fwd_head(xb, yb, w, s0b, cols, mc, Tn, sx_t, C, s_lim,
              W: tl.constexpr, WP: tl.constexpr, BC: tl.constexpr):
    """y rows [0, W-1) of one channel tile, the only rows that read the initial state: [WP, BC] tiles."""
    o_h = tl.arange(0, WP)
    mh = (o_h < W - 1) & (o_h < Tn)
    acc = tl.zeros([WP, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        s = o_h + (j - (W - 1))  # >= -(W-1); s < 0 reads state column s + W-1
        b_x = tl.load(xb + s[:, None] * sx_t + cols[None, :], mask=(mh & (s >= 0))[:, None] & mc[None, :],
                      other=0.).to(tl.float32)
        b_x += tl.load(s0b + cols[None, :] * (W - 1) + (s[:, None] + (W - 1)),
                       mask=(mh & (s < s_lim))[:, None] & mc[None, :], other=0.).to(tl.float32)
        b_w = tl.load(w + cols * W + j, mask=mc, other=0.).to(tl.float32)
        acc += b_x * b_w[None, :]
    b_y = acc * tl.sigmoid(acc)
    tl.store(yb + o_h[:, None] * C + cols[None, :], b_y.to(yb.dtype.element_ty), mask=mh[:, None] & mc[None, :])


@triton.jit
def _fwd_window(xp, yp, w, cols, mc, t_begin, Tn, sx_t, C, lo,
                W: tl.constexpr, BT: tl.constexpr, NT: tl.constexpr):
    """Rows [t_begin, t_begin + BT * NT) of one channel tile as BT lanes of NT consecutive rows: step m
    loads row t_begin + r * NT + m of every lane r ([BT, BC], one load) and keeps each lane's last W-1 rows
    in registers, so each x element is loaded once (plus a W-1 row halo per lane). W == 4 only. Rows
    before 0 count as zeros and rows < lo are not stored (as in _fwd_tile).

    xp, yp point at row t_begin of x and y; offsets from there (< BT * NT rows) fit int32.
    """
    tl.static_assert(W == 4, "the window variant carries exactly W-1 = 3 rows")
    o_r = tl.arange(0, BT) * NT  # first row of each lane, from t_begin
    r0 = t_begin + o_r
    w0 = tl.load(w + cols * W + 0, mask=mc, other=0.).to(tl.float32)
    w1 = tl.load(w + cols * W + 1, mask=mc, other=0.).to(tl.float32)
    w2 = tl.load(w + cols * W + 2, mask=mc, other=0.).to(tl.float32)
    w3 = tl.load(w + cols * W + 3, mask=mc, other=0.).to(tl.float32)
    x_off = o_r[:, None] * sx_t + cols[None, :]  # [BT, BC]
    # each lane's halo, rows r0 - 3 .. r0 - 1
    x3 = tl.load(xp + x_off - 3 * sx_t, mask=((r0 >= 3) & (r0 - 3 < Tn))[:, None] & mc[None, :],
                 other=0.).to(tl.float32)
    x2 = tl.load(xp + x_off - 2 * sx_t, mask=((r0 >= 2) & (r0 - 2 < Tn))[:, None] & mc[None, :],
                 other=0.).to(tl.float32)
    x1 = tl.load(xp + x_off - sx_t, mask=((r0 >= 1) & (r0 - 1 < Tn))[:, None] & mc[None, :],
                 other=0.).to(tl.float32)
    y_off = o_r[:, None] * C + cols[None, :]
    # one step ahead: the load of step m + 1 is in flight while step m computes and stores
    x0 = tl.load(xp + x_off, mask=(r0 < Tn)[:, None] & mc[None, :], other=0.)
    for m in range(0, NT):
        xn = tl.load(xp + (m + 1) * sx_t + x_off,
                     mask=((r0 + (m + 1) < Tn) & (m + 1 < NT))[:, None] & mc[None, :], other=0.)
        xc = x0.to(tl.float32)
        acc = x3 * w0[None, :] + x2 * w1[None, :] + x1 * w2[None, :] + xc * w3[None, :]
        b_y = acc * tl.sigmoid(acc)
        tl.store(yp + m * C + y_off, b_y.to(yp.dtype.element_ty), mask=((r0 + m >= lo) & (r0 + m < Tn))[:, None] & mc[None, :])
        x3, x2, x1, x0 = x2, x1, xc, xn


@triton.jit
def causal_conv1d_prefill_kernel(
    x, w, s0, y, st, cu_seqlens, lengths, s0_idx, st_idx, T, C, sx_n, sx_t,
    W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, NT: tl.constexpr,
    WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr, USE_S0: tl.constexpr, USE_IDX: tl.constexpr,
    USE_LENGTHS: tl.constexpr, STORE_ST: tl.constexpr,
):
    """One (channel tile, run of BT * NT rows, sequence): y = silu(sum_j w[:, j] * xx[t + j]), xx = [state, x].

    Grid (cdiv(C, BC), cdiv(Tmax, BT * NT), N), channel tiles fastest: programs running together read
    neighbouring column blocks of the same rows (whole rows of DRAM pages), not one narrow column stripe
    down the time axis. x rows at strides sx_n (sequence; unused when varlen) and sx_t (time), channels
    contiguous: x may be a column slice of a wider projection output. y is contiguous [B, T, C].
    WINDOW: the register-window body (_fwd_window) instead of W shifted tile loads (_fwd_tile).

    The program with i_t == 0 is the only one that reads the initial state (rows t < W-1; needs
    BT * NT >= W-1) and the only one that writes the final state, after a barrier that follows all its
    reads of the state, so in and out may be the same pool rows.
    """
    tl.static_assert(BT * NT >= W - 1, "the first program must cover the whole state halo")
    i_c, i_t, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    prefill_program(x, w, s0, y, st, cu_seqlens, lengths, s0_idx, st_idx, T, C, sx_n, sx_t, i_c, i_t, i_n,
                     W, WP, BT, BC, NT, WINDOW, IS_VARLEN, USE_S0, USE_IDX, USE_LENGTHS, STORE_ST)


@triton.jit
def prefill_program(
    x, w, s0, y, st, cu_seqlens, lengths, s0_idx, st_idx, T, C, sx_n, sx_t, i_c, i_t, i_n,
    W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, NT: tl.constexpr,
    WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr, USE_S0: tl.constexpr, USE_IDX: tl.constexpr,
    USE_LENGTHS: tl.constexpr, STORE_ST: tl.constexpr,
):
    """The body of causal_conv1d_prefill_kernel for program (i_c, i_t, i_n); see there. Also the body of
    the TensorRT AOT adapter (plugins/tensorrt/aot_kernels.py), which runs one tile per program."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        Tn = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        xb = x + bos * sx_t
        yb = y + bos * C
    else:
        Tn = T
        xb = x + i_n.to(tl.int64) * sx_n
        yb = y + i_n.to(tl.int64) * T * C
    t_begin = i_t * (BT * NT)
    if t_begin >= Tn:
        return
    if USE_IDX:
        slot_in = tl.load(s0_idx + i_n).to(tl.int64)
        slot_out = tl.load(st_idx + i_n).to(tl.int64)
    else:
        slot_in = i_n.to(tl.int64)
        slot_out = i_n.to(tl.int64)
    if USE_S0:
        s0b = s0 + slot_in * C * (W - 1)
    else:
        s0b = xb  # not read
    # rows at positions < s_lim read the state: 0, or -W (none) for slot -1, a padding row with zero state
    # (a scalar bound, not a scalar in the mask: the interpreter rejects scalar boolean masks)
    s_lim = tl.where(slot_in >= 0, 0, -W)
    cols = i_c * BC + tl.arange(0, BC)
    mc = cols < C
    # with a state, rows < W-1 are _fwd_head's: the bodies leave them (no two stores to one row)
    if USE_S0:
        head = W - 1
        if i_t == 0:
            _fwd_head(xb, yb, w, s0b, cols, mc, Tn, sx_t, C, s_lim, W, WP, BC)
    else:
        head = 0
    if WINDOW:
        _fwd_window(xb + t_begin.to(tl.int64) * sx_t, yb + t_begin.to(tl.int64) * C, w, cols, mc,
                    t_begin, Tn, sx_t, C, tl.where(t_begin == 0, head, 0), W, BT, NT)
    else:
        n_tiles = tl.minimum(NT, tl.cdiv(Tn - t_begin, BT))
        for k in range(0, n_tiles):
            t0 = t_begin + k * BT
            _fwd_tile(xb + t0.to(tl.int64) * sx_t, yb + t0.to(tl.int64) * C, w, cols, mc, t0, Tn, sx_t, C,
                      tl.where(t0 == 0, head, 0), W, BT, BC)
    if STORE_ST:
        if i_t == 0:
            if USE_LENGTHS:
                L = tl.load(lengths + i_n).to(tl.int32)
            else:
                L = Tn
            o_j = tl.arange(0, WP)
            mj = o_j[:, None] < W - 1
            p = L - (W - 1) + o_j  # the last W-1 positions of the first L tokens
            f_x = tl.load(xb + p[:, None].to(tl.int64) * sx_t + cols[None, :],
                          mask=(p[:, None] >= 0) & mj & mc[None, :], other=0.)
            if USE_S0:
                f_s = tl.load(s0b + cols[None, :] * (W - 1) + (p[:, None] + (W - 1)),
                              mask=(p[:, None] < s_lim) & mj & mc[None, :], other=0.)
                f_x = tl.where(p[:, None] < 0, f_s.to(tl.float32), f_x.to(tl.float32))
                # other warps of this program read the same state rows in the first tile: all reads of
                # the state are done before any thread writes it (in-place pools)
                tl.debug_barrier()
            tl.store(st + (slot_out * C + cols[None, :]) * (W - 1) + o_j[:, None], f_x.to(st.dtype.element_ty),
                     mask=(o_j[:, None] < tl.where(slot_out >= 0, W - 1, 0)) & mc[None, :])


@triton.jit
def causal_conv1d_update_kernel(
    x, w, s0, y, st, lengths, s_idx, T, C, sx_n, sx_t,
    W: tl.constexpr, WP: tl.constexpr, BC: tl.constexpr, USE_IDX: tl.constexpr, USE_LENGTHS: tl.constexpr,
):
    """One (sequence, channel tile): T decode steps from state s0 [C, W-1] (pool row s_idx), the shifted
    state stored to st (st may be s0: in place). With lengths, the stored state is the one after the first
    lengths[n] tokens (y covers all T, as in the prefill kernel). x rows at strides sx_n, sx_t (channels
    contiguous); y contiguous [N, T, C]."""
    i_n, i_c = tl.program_id(0), tl.program_id(1)
    cols = i_c * BC + tl.arange(0, BC)
    mc = cols < C
    o_j = tl.arange(0, WP)  # W-1 state columns, padded to a power of two
    if USE_IDX:
        slot = tl.load(s_idx + i_n).to(tl.int64)
    else:
        slot = i_n.to(tl.int64)
    if USE_LENGTHS:
        L = tl.load(lengths + i_n).to(tl.int32)
    else:
        L = T
    ok = mc[:, None] & (o_j[None, :] < W - 1) & (o_j[None, :] * 0 + slot >= 0)
    s_off = (slot * C + cols[:, None]) * (W - 1) + o_j[None, :]  # [BC, W-1]
    b_s = tl.load(s0 + s_off, mask=ok, other=0.).to(tl.float32)  # window of the last W-1 inputs
    b_f = b_s  # the final state: the window after token lengths[n] - 1
    b_w = tl.load(w + cols[:, None] * W + o_j[None, :], mask=mc[:, None] & (o_j[None, :] < W - 1),
                  other=0.).to(tl.float32)
    b_wl = tl.load(w + cols * W + (W - 1), mask=mc, other=0.).to(tl.float32)
    for t in range(0, T):
        b_x = tl.load(x + i_n.to(tl.int64) * sx_n + t * sx_t + cols, mask=mc, other=0.).to(tl.float32)
        acc = tl.sum(b_s * b_w, axis=1) + b_x * b_wl
        tl.store(y + (i_n.to(tl.int64) * T + t) * C + cols, (acc * tl.sigmoid(acc)).to(y.dtype.element_ty),
                 mask=mc)
        # shift left by one: column j takes column j+1, the last takes x
        nxt = tl.sum(tl.where(o_j[None, :, None] == o_j[None, None, :] - 1, b_s[:, None, :], 0.), axis=2)
        b_s = tl.where(o_j[None, :] == W - 2, b_x[:, None], nxt)
        b_f = tl.where(t < L, b_s, b_f)  # y of padding tokens still slides; the state stops at lengths[n]
    # the loads of s0 above complete before this store (data dependence), so st may alias s0
    tl.store(st + s_off, b_f.to(st.dtype.element_ty), mask=ok)


# (variant, BT, BC, NT, num_warps) of the prefill kernel; module-level so bench/gdn.py's tune step can try
# others. "tile": each program runs NT tiles of [BT, BC] (W shifted loads per tile); "window": BT lanes of NT
# rows with the last W-1 rows in registers (W == 4 only; others take "tile"). The old one-tile-per-program,
# time-fastest grid ran at 13-15% of HBM bandwidth at T = 8192, C = 12288 (H100, H200): 517 us at C = 8192.
# H200 sweep of 41 configs at T = 8192 on x sliced from a fused projection (python bench/gdn.py --conv1d-only,
# bench/results/conv1d_tune_h200.json): this one 166 us at C = 8192 and 172 us at C = 12288 (34% / 49% of
# 4.8 TB/s), within 2% of the best at each width; the best "tile" config 167 us.
FWD_CONFIG = ("window", 4, 256, 32, 8)


def causal_conv1d_fwd(
    x: Tensor, weight: Tensor, conv_state: Tensor | None, final_state: Tensor | None,
    cu_seqlens: Tensor | None = None, lengths: Tensor | None = None,
    state_idx: Tensor | None = None, max_seqlen: int | None = None,
) -> Tensor:
    """Launch the prefill kernel on x [B, T, C] (any batch and time strides, channels contiguous: a column
    slice of a fused projection output is read in place); writes final_state (if given) and returns y,
    a fresh contiguous [B, T, C]."""
    B, T, C = x.shape
    W = weight.shape[1]
    if x.stride(2) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    y = torch.empty((B, T, C), dtype=x.dtype, device=x.device)
    if cu_seqlens is not None:
        N = cu_seqlens.shape[0] - 1
        Tmax = max_seqlen if max_seqlen is not None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    else:
        N, Tmax = B, T
    variant, BT, BC, NT, nw = FWD_CONFIG
    window = variant == "window" and W == 4
    if not window:
        BT = max(BT, triton.next_power_of_2(W - 1))  # a tile's halo must not reach past the previous tile
    wrap_triton(causal_conv1d_prefill_kernel)[(triton.cdiv(C, BC), triton.cdiv(Tmax, BT * NT), N)](
        x, weight, conv_state, y, final_state, cu_seqlens, lengths, state_idx, state_idx, T, C,
        x.stride(0), x.stride(1),
        W=W, WP=triton.next_power_of_2(W - 1), BT=BT, BC=BC, NT=NT, WINDOW=window,
        IS_VARLEN=cu_seqlens is not None, USE_S0=conv_state is not None,
        USE_IDX=state_idx is not None, USE_LENGTHS=lengths is not None, STORE_ST=final_state is not None,
        num_warps=nw,
    )
    return y


def causal_conv1d_varlen(
    x: Tensor, weight: Tensor, cu_seqlens: Tensor, conv_state: Tensor | None = None,
    state_idx: Tensor | None = None, max_seqlen: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Packed prefill: x [T_total, C] holding N sequences (cu_seqlens [N+1]); weight [C, W].

    conv_state [N, C, W-1] (or a pool [P, C, W-1] with state_idx [N]) is read as the initial state and
    overwritten with the final one, in place. Returns y [T_total, C] and the state tensor (None if none).
    """
    W = weight.shape[1]
    if conv_state is not None and (conv_state.shape[1:] != (x.shape[1], W - 1) or not conv_state.is_contiguous()):
        raise ValueError(f"causal_conv1d_varlen: conv_state {tuple(conv_state.shape)}, expected contiguous "
                         f"[N, {x.shape[1]}, {W - 1}]")
    y = causal_conv1d_fwd(x[None], weight, conv_state, conv_state, cu_seqlens=cu_seqlens,
                          state_idx=state_idx, max_seqlen=max_seqlen)
    return y[0], conv_state


# (BC, num_warps) of the update kernel; module-level so a bench can try others. Untuned.
UPDATE_CONFIG = (256, 4)


def causal_conv1d_update(x: Tensor, weight: Tensor, conv_state: Tensor, state_idx: Tensor | None = None,
                         final_state: Tensor | None = None, lengths: Tensor | None = None) -> Tensor:
    """Decode: x [B, C] or [B, T, C] (T small); conv_state [B, C, W-1] or a pool [P, C, W-1] indexed by
    state_idx [B] (-1 = padding row, left alone). The new state goes to final_state (same shape as
    conv_state; the pool rows at state_idx) or, if None, into conv_state in place. lengths [B]: tokens
    t >= lengths[b] do not enter the state (a row with 0 keeps it). Returns y like x."""
    x3 = x[:, None] if x.dim() == 2 else x  # [B, T, C]
    B, T, C = x3.shape
    W = weight.shape[1]
    for name, s in (("conv_state", conv_state), ("final_state", final_state)):
        if s is not None and (s.shape[1:] != (C, W - 1) or not s.is_contiguous()):
            raise ValueError(f"causal_conv1d_update: {name} {tuple(s.shape)}, expected contiguous "
                             f"[P, {C}, {W - 1}]")
    if final_state is not None and final_state.shape[0] != conv_state.shape[0]:
        raise ValueError(f"causal_conv1d_update: final_state {tuple(final_state.shape)} and conv_state "
                         f"{tuple(conv_state.shape)} differ in their first dim")
    if x3.stride(2) != 1:
        x3 = x3.contiguous()
    # x is read at its strides: the decode graph's x can be a channel slice of a fused projection's output
    # (graph/fuse_weights.py), and a .contiguous() copy of it would cost a launch per layer
    y = torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)
    BC, nw = UPDATE_CONFIG
    wrap_triton(causal_conv1d_update_kernel)[(B, triton.cdiv(C, BC))](
        x3, weight.contiguous(), conv_state, y, conv_state if final_state is None else final_state,
        lengths, state_idx, T, C, x3.stride(0), x3.stride(1),
        W=W, WP=triton.next_power_of_2(W - 1), BC=BC, USE_IDX=state_idx is not None,
        USE_LENGTHS=lengths is not None, num_warps=nw,
    )
    return y.reshape(x.shape)
