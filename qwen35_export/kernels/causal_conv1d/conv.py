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
def causal_conv1d_fwd_kernel(
    x, w, s0, y, st, cu_seqlens, lengths, s0_idx, st_idx, T, C,
    W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_S0: tl.constexpr, USE_IDX: tl.constexpr, USE_LENGTHS: tl.constexpr,
    STORE_ST: tl.constexpr,
):
    """One (time tile, channel tile, sequence): y = silu(sum_j w[:, j] * xx[t + j]), xx = [state, x].

    The tile with i_t == 0 is the only one that reads the initial state (rows t < W-1) and the only one
    that writes the final state, after its reads, so in and out may be the same pool rows.
    """
    i_t, i_c, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        Tn = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        bos = i_n.to(tl.int64) * T
        Tn = T
    if i_t * BT >= Tn:
        return
    if USE_IDX:
        slot_in = tl.load(s0_idx + i_n).to(tl.int64)
        slot_out = tl.load(st_idx + i_n).to(tl.int64)
    else:
        slot_in = i_n.to(tl.int64)
        slot_out = i_n.to(tl.int64)
    rows = i_t * BT + tl.arange(0, BT)
    cols = i_c * BC + tl.arange(0, BC)
    mc = cols < C
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        s = rows + (j - (W - 1))  # position in the sequence; negative reads the state
        b_x = tl.load(x + (bos + s[:, None]) * C + cols[None, :],
                      mask=(s[:, None] >= 0) & (s[:, None] < Tn) & mc[None, :], other=0.).to(tl.float32)
        if USE_S0:
            b_s = tl.load(s0 + (slot_in * C + cols[None, :]) * (W - 1) + (s[:, None] + (W - 1)),
                          mask=(s[:, None] < 0) & mc[None, :] & (s[:, None] * 0 + slot_in >= 0),
                          other=0.).to(tl.float32)
            b_x += b_s
        b_w = tl.load(w + cols * W + j, mask=mc, other=0.).to(tl.float32)
        acc += b_x * b_w[None, :]
    b_y = acc * tl.sigmoid(acc)
    tl.store(y + (bos + rows[:, None]) * C + cols[None, :], b_y.to(y.dtype.element_ty),
             mask=(rows[:, None] < Tn) & mc[None, :])
    if STORE_ST:
        if i_t == 0:
            if USE_LENGTHS:
                L = tl.load(lengths + i_n).to(tl.int32)
            else:
                L = Tn
            o_j = tl.arange(0, WP)
            mj = o_j[:, None] < W - 1
            p = L - (W - 1) + o_j  # the last W-1 positions of the first L tokens
            f_x = tl.load(x + (bos + p[:, None]) * C + cols[None, :],
                          mask=(p[:, None] >= 0) & mj & mc[None, :], other=0.).to(tl.float32)
            if USE_S0:
                f_s = tl.load(s0 + (slot_in * C + cols[None, :]) * (W - 1) + (p[:, None] + (W - 1)),
                              mask=(p[:, None] < 0) & mj & mc[None, :] & (p[:, None] * 0 + slot_in >= 0),
                              other=0.).to(tl.float32)
                f_x += f_s
            # loads above complete before this store (data dependence), so in-place pools are safe
            tl.store(st + (slot_out * C + cols[None, :]) * (W - 1) + o_j[:, None], f_x.to(st.dtype.element_ty),
                     mask=mj & mc[None, :] & (o_j[:, None] * 0 + slot_out >= 0))


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


# (BT, BC, num_warps) of the prefill kernel; module-level so bench/gdn.py's tune step can try others.
# (64, 128, 4) moved 13% of HBM bandwidth at T = 8192, C = 12288 on H100 (bench/results/gdn.md): untuned.
FWD_CONFIG = (64, 128, 4)


def causal_conv1d_fwd(
    x: Tensor, weight: Tensor, conv_state: Tensor | None, final_state: Tensor | None,
    cu_seqlens: Tensor | None = None, lengths: Tensor | None = None,
    state_idx: Tensor | None = None, max_seqlen: int | None = None,
) -> Tensor:
    """Launch the prefill kernel; writes final_state (if given) and returns y like x."""
    B, T, C = x.shape
    W = weight.shape[1]
    x = x.contiguous()
    weight = weight.contiguous()
    y = torch.empty_like(x)
    if cu_seqlens is not None:
        N = cu_seqlens.shape[0] - 1
        Tmax = max_seqlen if max_seqlen is not None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    else:
        N, Tmax = B, T
    BT, BC, nw = FWD_CONFIG
    wrap_triton(causal_conv1d_fwd_kernel)[(triton.cdiv(Tmax, BT), triton.cdiv(C, BC), N)](
        x, weight, conv_state, y, final_state, cu_seqlens, lengths, state_idx, state_idx, T, C,
        W=W, WP=triton.next_power_of_2(W - 1), BT=BT, BC=BC,
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
