"""Chunked gated delta rule (prefill), chunk BT = 64, WY/UT form, fp32 state.

Two launches:
1. `chunk_gdn_wy_kernel`, one program per (chunk, value head), all in parallel: L2-normalises k, takes the
   in-chunk cumulative decay gc, builds L = strict_tril(beta k k^T * exp(gc_i - gc_j)), inverts (I + L)
   (16x16 diagonal blocks by substitution, then block merge) and writes
   w = (I+L)^-1 (beta * exp(gc) * k) and u = (I+L)^-1 (beta * v).
2. `chunk_gdn_fwd_kernel`, one program per (sequence, value head, V block), sequential over the chunks:
   with S the state at the chunk start,
       v_new = u - w S
       o     = (q * exp(gc)) S + tril(q k^T * exp(gc_i - gc_j)) v_new
       S     = exp(gc_last) S + (k * exp(gc_last - gc))^T v_new
   so the per-chunk states never leave registers (fla stores them all and reads them back in a third pass).

Derivation (per chunk, S_0 its initial state): unrolling S_t = e^{g_t} S_{t-1} + k_t u_t^T with
u_t = beta_t (v_t - e^{g_t} S_{t-1}^T k_t) gives (I + L) U = beta V - beta exp(gc) K S_0.
Dots take their operands in the input dtype (bf16: tensor cores; fp32: tf32 on GPU, exact under the
interpreter) and accumulate in fp32; the state S stays fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

BT = 64  # chunk length
BC = 16  # diagonal block of the (I + L) inverse


@triton.jit
def _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """Start and length of sequence i_n: from cu_seqlens when packed, else i_n * T and T."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        return bos, (eos - bos).to(tl.int32)
    else:
        return i_n.to(tl.int64) * T, T


@triton.jit
def _load_rows_l2norm(x, rows, n_rows, stride, K: tl.constexpr, BK: tl.constexpr):
    """Rows of x ([n, K] with row stride `stride`), L2-normalised in fp32; rows past n_rows read as 0."""
    o_k = tl.arange(0, BK)
    m = (rows[:, None] < n_rows) & (o_k[None, :] < K)
    b = tl.load(x + rows[:, None].to(tl.int64) * stride + o_k[None, :], mask=m, other=0.).to(tl.float32)
    return b * tl.rsqrt(tl.sum(b * b, axis=1) + 1e-6)[:, None]


@triton.jit
def _inv_unit_lower(L, BC: tl.constexpr):
    """(I + L)^-1 for a strictly lower-triangular [BC, BC] fp32 tile, by forward substitution."""
    o = tl.arange(0, BC)
    A = -L
    for i in range(1, BC):
        row = o == i
        a = tl.sum(tl.where(row[:, None], A, 0.), axis=0)
        # rows < i of A already hold the inverse's strict part; rows >= i multiply a zero of a
        a = a + tl.sum(a[:, None] * A, axis=0) * (o < i)
        A = tl.where(row[:, None], a[None, :], A)
    return A + (o[:, None] == o[None, :]).to(tl.float32)


@triton.jit
def _kkt_block(ka, kb, ga, gb, ba, BC: tl.constexpr, DIAG: tl.constexpr):
    """Block of L: beta_a * (k_a . k_b) * exp(g_a - g_b), strictly lower when on the diagonal."""
    s = tl.dot((ka * ba[:, None]).to(ka.dtype), tl.trans(kb))
    if DIAG:
        o = tl.arange(0, BC)
        keep = o[:, None] > o[None, :]
        # the exponent is masked before exp: above the diagonal it is positive and could overflow
        return tl.where(keep, s * tl.exp(tl.where(keep, ga[:, None] - gb[None, :], 0.)), 0.)
    return s * tl.exp(ga[:, None] - gb[None, :])


@triton.jit
def _dot32(a, b):
    """fp32 x fp32 product at full fp32 precision (the inverse's merge steps are sensitive)."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def chunk_gdn_wy_kernel(
    k, v, g, beta, w, u, gc, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One (chunk, value head): w [BT, K], u [BT, V] and the in-chunk decay cumsum gc [BT]."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // H)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
    else:
        i_n = i_b
    bos, Tn = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    DT = k.dtype.element_ty
    k_base = k + bos * H * K + i_hk * K
    v_base = v + bos * HV * V + i_h * V
    gb_off = bos * HV + i_h
    o_c = tl.arange(0, BC)
    o_v = tl.arange(0, BV)
    r0 = i_t * BT + o_c
    r1, r2, r3 = r0 + BC, r0 + 2 * BC, r0 + 3 * BC

    # sub-blocks of 16 rows: normalised keys, beta, and the running decay cumsum across them
    k0 = _load_rows_l2norm(k_base, r0, Tn, H * K, K, BK)
    k1 = _load_rows_l2norm(k_base, r1, Tn, H * K, K, BK)
    k2 = _load_rows_l2norm(k_base, r2, Tn, H * K, K, BK)
    k3 = _load_rows_l2norm(k_base, r3, Tn, H * K, K, BK)
    b0 = tl.load(beta + gb_off + r0.to(tl.int64) * HV, mask=r0 < Tn, other=0.).to(tl.float32)
    b1 = tl.load(beta + gb_off + r1.to(tl.int64) * HV, mask=r1 < Tn, other=0.).to(tl.float32)
    b2 = tl.load(beta + gb_off + r2.to(tl.int64) * HV, mask=r2 < Tn, other=0.).to(tl.float32)
    b3 = tl.load(beta + gb_off + r3.to(tl.int64) * HV, mask=r3 < Tn, other=0.).to(tl.float32)
    g0 = tl.cumsum(tl.load(g + gb_off + r0.to(tl.int64) * HV, mask=r0 < Tn, other=0.).to(tl.float32), axis=0)
    g1 = tl.cumsum(tl.load(g + gb_off + r1.to(tl.int64) * HV, mask=r1 < Tn, other=0.).to(tl.float32), axis=0)
    g2 = tl.cumsum(tl.load(g + gb_off + r2.to(tl.int64) * HV, mask=r2 < Tn, other=0.).to(tl.float32), axis=0)
    g3 = tl.cumsum(tl.load(g + gb_off + r3.to(tl.int64) * HV, mask=r3 < Tn, other=0.).to(tl.float32), axis=0)
    g1 += tl.sum(tl.where(o_c == BC - 1, g0, 0.), axis=0)
    g2 += tl.sum(tl.where(o_c == BC - 1, g1, 0.), axis=0)
    g3 += tl.sum(tl.where(o_c == BC - 1, g2, 0.), axis=0)
    tl.store(gc + gb_off + r0.to(tl.int64) * HV, g0, mask=r0 < Tn)
    tl.store(gc + gb_off + r1.to(tl.int64) * HV, g1, mask=r1 < Tn)
    tl.store(gc + gb_off + r2.to(tl.int64) * HV, g2, mask=r2 < Tn)
    tl.store(gc + gb_off + r3.to(tl.int64) * HV, g3, mask=r3 < Tn)
    k0, k1, k2, k3 = k0.to(DT), k1.to(DT), k2.to(DT), k3.to(DT)

    # (I + L)^-1 by blocks: T_ii by substitution, T_ij = -T_ii sum_{j<=m<i} L_im T_mj
    T0 = _inv_unit_lower(_kkt_block(k0, k0, g0, g0, b0, BC, True), BC)
    T1 = _inv_unit_lower(_kkt_block(k1, k1, g1, g1, b1, BC, True), BC)
    T2 = _inv_unit_lower(_kkt_block(k2, k2, g2, g2, b2, BC, True), BC)
    T3 = _inv_unit_lower(_kkt_block(k3, k3, g3, g3, b3, BC, True), BC)
    L10 = _kkt_block(k1, k0, g1, g0, b1, BC, False)
    L20 = _kkt_block(k2, k0, g2, g0, b2, BC, False)
    L21 = _kkt_block(k2, k1, g2, g1, b2, BC, False)
    L30 = _kkt_block(k3, k0, g3, g0, b3, BC, False)
    L31 = _kkt_block(k3, k1, g3, g1, b3, BC, False)
    L32 = _kkt_block(k3, k2, g3, g2, b3, BC, False)
    T10 = -_dot32(T1, _dot32(L10, T0))
    T21 = -_dot32(T2, _dot32(L21, T1))
    T32 = -_dot32(T3, _dot32(L32, T2))
    T20 = -_dot32(T2, _dot32(L20, T0) + _dot32(L21, T10))
    T31 = -_dot32(T3, _dot32(L31, T1) + _dot32(L32, T21))
    T30 = -_dot32(T3, _dot32(L30, T0) + _dot32(L31, T10) + _dot32(L32, T20))

    # w = T (beta exp(gc) k): the keys the state is read with; rows past Tn are zero since beta is
    kg0 = (k0 * (b0 * tl.exp(g0))[:, None]).to(DT)
    kg1 = (k1 * (b1 * tl.exp(g1))[:, None]).to(DT)
    kg2 = (k2 * (b2 * tl.exp(g2))[:, None]).to(DT)
    kg3 = (k3 * (b3 * tl.exp(g3))[:, None]).to(DT)
    o_k = tl.arange(0, BK)
    w_base = w + bos * HV * K + i_h * K + o_k[None, :]
    mk = o_k[None, :] < K
    w0 = tl.dot(T0.to(DT), kg0)
    w1 = tl.dot(T10.to(DT), kg0) + tl.dot(T1.to(DT), kg1)
    w2 = tl.dot(T20.to(DT), kg0) + tl.dot(T21.to(DT), kg1) + tl.dot(T2.to(DT), kg2)
    w3 = tl.dot(T30.to(DT), kg0) + tl.dot(T31.to(DT), kg1) + tl.dot(T32.to(DT), kg2) + tl.dot(T3.to(DT), kg3)
    tl.store(w_base + r0[:, None].to(tl.int64) * HV * K, w0.to(DT), mask=(r0 < Tn)[:, None] & mk)
    tl.store(w_base + r1[:, None].to(tl.int64) * HV * K, w1.to(DT), mask=(r1 < Tn)[:, None] & mk)
    tl.store(w_base + r2[:, None].to(tl.int64) * HV * K, w2.to(DT), mask=(r2 < Tn)[:, None] & mk)
    tl.store(w_base + r3[:, None].to(tl.int64) * HV * K, w3.to(DT), mask=(r3 < Tn)[:, None] & mk)

    # u = T (beta v), V in blocks of BV
    for i_v in range(0, tl.cdiv(V, BV)):
        cols = i_v * BV + o_v
        mv = cols[None, :] < V
        v0 = tl.load(v_base + r0[:, None].to(tl.int64) * HV * V + cols[None, :], mask=(r0 < Tn)[:, None] & mv, other=0.)
        v1 = tl.load(v_base + r1[:, None].to(tl.int64) * HV * V + cols[None, :], mask=(r1 < Tn)[:, None] & mv, other=0.)
        v2 = tl.load(v_base + r2[:, None].to(tl.int64) * HV * V + cols[None, :], mask=(r2 < Tn)[:, None] & mv, other=0.)
        v3 = tl.load(v_base + r3[:, None].to(tl.int64) * HV * V + cols[None, :], mask=(r3 < Tn)[:, None] & mv, other=0.)
        vb0 = (v0.to(tl.float32) * b0[:, None]).to(DT)
        vb1 = (v1.to(tl.float32) * b1[:, None]).to(DT)
        vb2 = (v2.to(tl.float32) * b2[:, None]).to(DT)
        vb3 = (v3.to(tl.float32) * b3[:, None]).to(DT)
        u0 = tl.dot(T0.to(DT), vb0)
        u1 = tl.dot(T10.to(DT), vb0) + tl.dot(T1.to(DT), vb1)
        u2 = tl.dot(T20.to(DT), vb0) + tl.dot(T21.to(DT), vb1) + tl.dot(T2.to(DT), vb2)
        u3 = tl.dot(T30.to(DT), vb0) + tl.dot(T31.to(DT), vb1) + tl.dot(T32.to(DT), vb2) + tl.dot(T3.to(DT), vb3)
        u_base = u + bos * HV * V + i_h * V + cols[None, :]
        tl.store(u_base + r0[:, None].to(tl.int64) * HV * V, u0.to(DT), mask=(r0 < Tn)[:, None] & mv)
        tl.store(u_base + r1[:, None].to(tl.int64) * HV * V, u1.to(DT), mask=(r1 < Tn)[:, None] & mv)
        tl.store(u_base + r2[:, None].to(tl.int64) * HV * V, u2.to(DT), mask=(r2 < Tn)[:, None] & mv)
        tl.store(u_base + r3[:, None].to(tl.int64) * HV * V, u3.to(DT), mask=(r3 < Tn)[:, None] & mv)


@triton.jit
def chunk_gdn_fwd_kernel(
    q, k, w, u, gc, o, h0, ht, cu_seqlens, scale, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One (sequence, value head, V block): walk the chunks, carry S [K, BV] in fp32, write o."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // HV, i_nh % HV
    i_hk = i_h // (HV // H)
    bos, Tn = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    DT = w.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    cols = i_v * BV + tl.arange(0, BV)
    mkv = (o_k[:, None] < K) & (cols[None, :] < V)
    s_off = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + cols[None, :]
    if USE_H0:
        S = tl.load(h0 + s_off, mask=mkv, other=0.).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    q_base = q + bos * H * K + i_hk * K
    k_base = k + bos * H * K + i_hk * K
    w_base = w + bos * HV * K + i_h * K
    u_base = u + bos * HV * V + i_h * V
    o_base = o + bos * HV * V + i_h * V
    g_base = gc + bos * HV + i_h
    causal = o_t[:, None] >= o_t[None, :]
    for i_t in range(0, tl.cdiv(Tn, BT)):
        rows = i_t * BT + o_t
        mr = rows < Tn
        r64 = rows[:, None].to(tl.int64)
        b_q = (_load_rows_l2norm(q_base, rows, Tn, H * K, K, BK) * scale).to(DT)
        b_k = _load_rows_l2norm(k_base, rows, Tn, H * K, K, BK)
        b_w = tl.load(w_base + r64 * HV * K + o_k[None, :], mask=mr[:, None] & (o_k[None, :] < K), other=0.)
        b_u = tl.load(u_base + r64 * HV * V + cols[None, :], mask=mr[:, None] & (cols[None, :] < V), other=0.)
        b_g = tl.load(g_base + rows.to(tl.int64) * HV, mask=mr, other=0.)
        g_last = tl.load(g_base + (tl.minimum(i_t * BT + BT, Tn) - 1).to(tl.int64) * HV)

        b_S = S.to(DT)
        v_new = b_u.to(tl.float32) - tl.dot(b_w, b_S)  # [BT, BV]
        b_vn = v_new.to(DT)
        A = tl.dot(b_q, tl.trans(b_k.to(DT)))  # [BT, BT]
        A = tl.where(causal, A * tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], 0.)), 0.)
        b_o = tl.dot((b_q.to(tl.float32) * tl.exp(b_g)[:, None]).to(DT), b_S) + tl.dot(A.to(DT), b_vn)
        tl.store(o_base + r64 * HV * V + cols[None, :], b_o.to(o.dtype.element_ty),
                 mask=mr[:, None] & (cols[None, :] < V))
        b_kd = (b_k * tl.exp(g_last - b_g)[:, None]).to(DT)  # [BT, BK]
        S = S * tl.exp(g_last) + tl.dot(tl.trans(b_kd), b_vn)
    if STORE_HT:
        tl.store(ht + s_off, S, mask=mkv)


@triton.jit
def chunk_gdn_h_kernel(
    k, w, u, gc, h, vn, h0, ht, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Split mode, the sequential half: per chunk store S (input dtype) and v_new, then advance S.

    Only the two dependent products (w S, k^T v_new) stay on the serial path; the outputs are left to
    chunk_gdn_o_kernel, which runs over all chunks in parallel.
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // HV, i_nh % HV
    i_hk = i_h // (HV // H)
    bos, Tn = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    if IS_VARLEN:
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        boh = i_n.to(tl.int64) * tl.cdiv(T, BT)
    DT = w.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    cols = i_v * BV + tl.arange(0, BV)
    mkv = (o_k[:, None] < K) & (cols[None, :] < V)
    s_tile = o_k[:, None] * V + cols[None, :]
    s_off = i_nh.to(tl.int64) * K * V + s_tile
    if USE_H0:
        S = tl.load(h0 + s_off, mask=mkv, other=0.).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    k_base = k + bos * H * K + i_hk * K
    w_base = w + bos * HV * K + i_h * K
    u_base = u + bos * HV * V + i_h * V
    vn_base = vn + bos * HV * V + i_h * V
    g_base = gc + bos * HV + i_h
    for i_t in range(0, tl.cdiv(Tn, BT)):
        rows = i_t * BT + o_t
        mr = rows < Tn
        r64 = rows[:, None].to(tl.int64)
        mrv = mr[:, None] & (cols[None, :] < V)
        b_S = S.to(DT)
        tl.store(h + ((boh + i_t) * HV + i_h) * K * V + s_tile, b_S, mask=mkv)
        b_w = tl.load(w_base + r64 * HV * K + o_k[None, :], mask=mr[:, None] & (o_k[None, :] < K), other=0.)
        b_u = tl.load(u_base + r64 * HV * V + cols[None, :], mask=mrv, other=0.)
        b_vn = (b_u.to(tl.float32) - tl.dot(b_w, b_S)).to(DT)  # [BT, BV]
        tl.store(vn_base + r64 * HV * V + cols[None, :], b_vn, mask=mrv)
        b_k = _load_rows_l2norm(k_base, rows, Tn, H * K, K, BK)
        b_g = tl.load(g_base + rows.to(tl.int64) * HV, mask=mr, other=0.)
        g_last = tl.load(g_base + (tl.minimum(i_t * BT + BT, Tn) - 1).to(tl.int64) * HV)
        b_kd = (b_k * tl.exp(g_last - b_g)[:, None]).to(DT)  # [BT, BK]
        S = S * tl.exp(g_last) + tl.dot(tl.trans(b_kd), b_vn)
    if STORE_HT:
        tl.store(ht + s_off, S, mask=mkv)


@triton.jit
def chunk_gdn_o_kernel(
    q, k, vn, h, gc, o, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Split mode, the parallel half: o = (q exp(gc)) S_chunk + tril(q k^T exp(gc_i - gc_j)) v_new."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // H)
    i_c = i_t  # global chunk index, the row of h
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
    else:
        i_n = i_b
        i_c = i_b * tl.cdiv(T, BT) + i_t
    bos, Tn = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    DT = vn.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    cols = i_v * BV + tl.arange(0, BV)
    rows = i_t * BT + o_t
    mr = rows < Tn
    r64 = rows[:, None].to(tl.int64)
    mrv = mr[:, None] & (cols[None, :] < V)
    b_q = (_load_rows_l2norm(q + bos * H * K + i_hk * K, rows, Tn, H * K, K, BK) * scale)
    b_k = _load_rows_l2norm(k + bos * H * K + i_hk * K, rows, Tn, H * K, K, BK).to(DT)
    b_g = tl.load(gc + bos * HV + i_h + rows.to(tl.int64) * HV, mask=mr, other=0.)
    b_S = tl.load(h + (i_c.to(tl.int64) * HV + i_h) * K * V + o_k[:, None] * V + cols[None, :],
                  mask=(o_k[:, None] < K) & (cols[None, :] < V), other=0.)
    b_vn = tl.load(vn + bos * HV * V + i_h * V + r64 * HV * V + cols[None, :], mask=mrv, other=0.)
    causal = o_t[:, None] >= o_t[None, :]
    A = tl.dot(b_q.to(DT), tl.trans(b_k))  # [BT, BT]
    A = tl.where(causal, A * tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], 0.)), 0.)
    b_o = tl.dot((b_q * tl.exp(b_g)[:, None]).to(DT), b_S) + tl.dot(A.to(DT), b_vn)
    tl.store(o + bos * HV * V + i_h * V + r64 * HV * V + cols[None, :], b_o.to(o.dtype.element_ty), mask=mrv)


def prepare_chunk_indices(cu_seqlens: Tensor, chunk_size: int = BT) -> Tensor:
    """[NT_total, 2] int32 (sequence, chunk within it) for every chunk of a packed batch (host sync)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    idx = [(n, c) for n, L in enumerate(lens) for c in range(triton.cdiv(L, chunk_size))]
    return torch.tensor(idx, dtype=torch.int32, device=cu_seqlens.device).reshape(-1, 2)


# Launch configs, (BV, num_warps, num_stages), and the mode of the second stage: "fused" (one sequential
# kernel writes o) or "split" (sequential states + parallel outputs). Module-level so that
# bench/gdn.py (its tune step) can try others; the defaults are the fastest measured there (bench/results/gdn.md).
# H100, T = 8192, 397B heads (bench/results/gdn.json): split (32,4,2)+(64,4,2) 1.59 ms, fused (64,8,3) 1.60 ms,
# then WY (128,4,1) 1.53 ms; the WY kernel is half of the time (0.79 ms of 1.54).
WY_CONFIG = (128, 4, 1)
FWD_CONFIG = (64, 8, 3)
FWD_MODE = "split"
H_CONFIG = (32, 4, 2)
O_CONFIG = (64, 4, 2)


def _check(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> None:
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if k.shape != q.shape or v.shape[:2] != (B, T) or g.shape != (B, T, HV) or beta.shape != (B, T, HV):
        raise ValueError(f"gated_delta_rule: shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} "
                         f"g {tuple(g.shape)} beta {tuple(beta.shape)}; expected q,k [B,T,H,K], v [B,T,HV,V], "
                         "g,beta [B,T,HV]")
    if HV % H:
        raise ValueError(f"gated_delta_rule: HV={HV} is not a multiple of H={H}")
    for name, d in (("K", K), ("V", V)):
        if d < 16 or d & (d - 1):
            raise ValueError(f"gated_delta_rule: {name}={d}; the kernels need a power of two >= 16")


def chunk_gated_delta_rule_fwd(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
    initial_state: Tensor | None, output_final_state: bool,
    cu_seqlens: Tensor | None = None, chunk_indices: Tensor | None = None, N: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Launch both kernels. Padded layout when cu_seqlens is None (B sequences of T), else packed (B == 1)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    dt = k.dtype
    is_varlen = cu_seqlens is not None
    if is_varlen:
        if chunk_indices is None:
            chunk_indices = prepare_chunk_indices(cu_seqlens)
        NT = chunk_indices.shape[0]
        N = cu_seqlens.shape[0] - 1
        grid1 = (NT, HV)
    else:
        N = B
        grid1 = (triton.cdiv(T, BT), B * HV)
    w = torch.empty(B, T, HV, K, dtype=dt, device=q.device)
    u = torch.empty(B, T, HV, V, dtype=dt, device=q.device)
    gc = torch.empty(B, T, HV, dtype=torch.float32, device=q.device)
    o = torch.empty(B, T, HV, V, dtype=v.dtype, device=q.device)
    ht = torch.empty(N, HV, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    wy_bv = min(V, 64 if dt == torch.float32 else WY_CONFIG[0])
    wrap_triton(chunk_gdn_wy_kernel)[grid1](
        k, v, g, beta, w, u, gc, cu_seqlens, chunk_indices, T,
        H=H, HV=HV, K=K, V=V, BT=BT, BC=BC, BK=K, BV=wy_bv, IS_VARLEN=is_varlen,
        num_warps=WY_CONFIG[1], num_stages=1 if dt == torch.float32 else WY_CONFIG[2],
    )
    h0 = initial_state.contiguous() if initial_state is not None else None
    # fp32 operands take twice the shared memory of bf16: the bf16-tuned configs overflow it (seen on H100)
    small = dt == torch.float32
    if FWD_MODE == "split":
        if is_varlen:
            n_chunks = triton.cdiv(cu_seqlens[1:] - cu_seqlens[:-1], BT)
            chunk_offsets = torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])
            NT_total = chunk_indices.shape[0]
            grid_o = (NT_total, HV)
        else:
            chunk_offsets = None
            NT_total = B * triton.cdiv(T, BT)
            grid_o = (triton.cdiv(T, BT), B * HV)
        h = torch.empty(NT_total, HV, K, V, dtype=dt, device=q.device)
        vn = torch.empty(B, T, HV, V, dtype=dt, device=q.device)
        BV, nw, ns = (min(V, 32), 4, 1) if small else (min(V, H_CONFIG[0]), H_CONFIG[1], H_CONFIG[2])
        BVo, nwo, nso = (min(V, 32), 4, 1) if small else (min(V, O_CONFIG[0]), O_CONFIG[1], O_CONFIG[2])
        wrap_triton(chunk_gdn_h_kernel)[(triton.cdiv(V, BV), N * HV)](
            k, w, u, gc, h, vn, h0, ht, cu_seqlens, chunk_offsets, T,
            H=H, HV=HV, K=K, V=V, BT=BT, BK=K, BV=BV,
            USE_H0=h0 is not None, STORE_HT=ht is not None, IS_VARLEN=is_varlen,
            num_warps=nw, num_stages=ns,
        )
        wrap_triton(chunk_gdn_o_kernel)[(triton.cdiv(V, BVo),) + grid_o](
            q, k, vn, h, gc, o, cu_seqlens, chunk_indices, scale, T,
            H=H, HV=HV, K=K, V=V, BT=BT, BK=K, BV=BVo, IS_VARLEN=is_varlen,
            num_warps=nwo, num_stages=nso,
        )
        return o, ht
    # small BV: S [K, BV] stays in registers and a single sequence still gives HV * V / BV programs
    BV, nw, ns = (min(V, 32), 4, 1) if small else (min(V, FWD_CONFIG[0]), FWD_CONFIG[1], FWD_CONFIG[2])
    wrap_triton(chunk_gdn_fwd_kernel)[(triton.cdiv(V, BV), N * HV)](
        q, k, w, u, gc, o, h0, ht, cu_seqlens, scale, T,
        H=H, HV=HV, K=K, V=V, BT=BT, BK=K, BV=BV,
        USE_H0=h0 is not None, STORE_HT=ht is not None, IS_VARLEN=is_varlen,
        num_warps=nw, num_stages=ns,
    )
    return o, ht


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    cu_seqlens: Tensor | None = None,
    chunk_indices: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunked gated delta rule with q/k L2-norm and q scaling fused in.

    q, k: [B, T, H, K] (bf16 or fp32); v: [B, T, HV, V]; g (log decay), beta: [B, T, HV] fp32;
    initial_state: [N, HV, K, V] fp32 or None. With cu_seqlens ([N+1], int32/int64) B must be 1 and
    T holds N packed sequences (one launch for all). Returns o [B, T, HV, V] in v's dtype and the final
    state [N, HV, K, V] fp32 (None unless output_final_state).
    """
    _check(q, k, v, g, beta)
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"chunk_gated_delta_rule: cu_seqlens needs B == 1, got q {tuple(q.shape)}")
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is not None and initial_state.shape != (N, v.shape[2], q.shape[3], v.shape[3]):
        raise ValueError(f"chunk_gated_delta_rule: initial_state {tuple(initial_state.shape)}, expected "
                         f"{(N, v.shape[2], q.shape[3], v.shape[3])}")
    scale = q.shape[3] ** -0.5 if scale is None else scale
    return chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state,
                                      cu_seqlens, chunk_indices)
