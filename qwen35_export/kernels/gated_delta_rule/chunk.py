"""Chunked gated delta rule (prefill), chunk BT = 64, WY/UT form, fp32 state, packed varlen in one launch.

Stage 1, `wy.chunk_gdn_wy_kernel` (all chunks in parallel): w = (I+L)^-1 (beta exp(gc) k),
u = (I+L)^-1 (beta v) and the in-chunk decay cumsum gc. Stage 2, with S the state at a chunk's start:
    v_new = u - w S
    o     = (q * exp(gc)) S + tril(q k^T * exp(gc_i - gc_j)) v_new
    S     = exp(gc_last) S + (k * exp(gc_last - gc))^T v_new
in one of two modes (FWD_MODE):
- "fused": `chunk_gdn_fwd_kernel`, one program per (sequence, value head, V block) walks the chunks and
  writes o; the per-chunk states never leave registers.
- "split": `chunk_gdn_h_kernel` walks the chunks doing only the two dependent products and stores each
  chunk's starting state (input dtype) and v_new; `chunk_gdn_o_kernel` then computes o for all chunks in
  parallel (fla's structure, with fewer launches).

Derivation (per chunk, S_0 its initial state): unrolling S_t = e^{g_t} S_{t-1} + k_t u_t^T with
u_t = beta_t (v_t - e^{g_t} S_{t-1}^T k_t) gives (I + L) U = beta V - beta exp(gc) K S_0.
Dots take their operands in the input dtype (bf16: tensor cores; fp32: tf32 on GPU, exact under the
interpreter) and accumulate in fp32; the state S stays fp32. q/k are L2-normalised in fp32 by the WY kernel,
which writes them once per key head in the input dtype (PRENORM, the default) for the h and o kernels to read
(o applies the scale after its q k^T product); with PRENORM off every kernel normalises the rows it reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ..layout import token_rows
from .wy import BC, BT, _load_rows, _load_rows_l2norm, _seq_bounds, chunk_gdn_wy_kernel

@triton.jit
def chunk_gdn_fwd_kernel(
    q, k, w, u, gc, o, h0, ht, cu_seqlens, scale, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One (sequence, value head, V block): walk the chunks, carry S [K, BV] in fp32, write o."""
    scale = (tl.zeros([], tl.float32) + scale).to(tl.float32)  # AOTI passes Python floats as fp64 scalars
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
    NORM: tl.constexpr = True, DECAY_V: tl.constexpr = False,
):
    """Split mode, the sequential half: per chunk store S (input dtype) and v_new, then advance S.

    Only the two dependent products (w S, k^T v_new) stay on the serial path; the outputs are left to
    chunk_gdn_o_kernel, which runs over all chunks in parallel. NORM: k is raw (normalise it here), else
    the WY kernel's normalised copy. DECAY_V: the decay exp(g_last - gc) scales the rows of v_new
    ([BT, BV]) instead of those of k ([BT, K]), so k goes from its load straight into the product.
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
        v_new = b_u.to(tl.float32) - tl.dot(b_w, b_S)  # [BT, BV]
        b_vn = v_new.to(DT)
        # k and g are loaded after the first product: loaded before it, k stays live across it and the
        # kernel spills more (sm_90: 1400 B of stack instead of 928 in the NORM / k-decay form)
        tl.store(vn_base + r64 * HV * V + cols[None, :], b_vn, mask=mrv)
        b_k = _load_rows(k_base, rows, Tn, H * K, K, BK, NORM)
        b_g = tl.load(g_base + rows.to(tl.int64) * HV, mask=mr, other=0.)
        g_last = tl.load(g_base + (tl.minimum(i_t * BT + BT, Tn) - 1).to(tl.int64) * HV)
        decay = tl.exp(g_last - b_g)[:, None]  # [BT, 1]
        if DECAY_V:  # on v_new's rows ([BT, BV]): k goes from its load into the product
            S = S * tl.exp(g_last) + tl.dot(tl.trans(b_k.to(DT)), (v_new * decay).to(DT))
        else:  # on k's rows ([BT, BK])
            S = S * tl.exp(g_last) + tl.dot(tl.trans((b_k.to(tl.float32) * decay).to(DT)), b_vn)
    if STORE_HT:
        tl.store(ht + s_off, S, mask=mkv)


@triton.jit
def chunk_gdn_o_kernel(
    q, k, vn, h, gc, o, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
    NORM: tl.constexpr = True,
):
    """Split mode, the parallel half: o = (q exp(gc)) S_chunk + tril(q k^T exp(gc_i - gc_j)) v_new.
    NORM: q, k are raw (normalise them here), else the WY kernel's normalised copies (scale applied
    after the q k^T product, in fp32)."""
    scale = (tl.zeros([], tl.float32) + scale).to(tl.float32)  # AOTI passes Python floats as fp64 scalars
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
    b_g = tl.load(gc + bos * HV + i_h + rows.to(tl.int64) * HV, mask=mr, other=0.)
    if NORM:
        b_q = (_load_rows_l2norm(q + bos * H * K + i_hk * K, rows, Tn, H * K, K, BK) * scale)
        b_k = _load_rows_l2norm(k + bos * H * K + i_hk * K, rows, Tn, H * K, K, BK).to(DT)
        b_qg = (b_q * tl.exp(b_g)[:, None]).to(DT)
        b_q = b_q.to(DT)
        qk_scale = 1.0
    else:
        b_q = _load_rows(q + bos * H * K + i_hk * K, rows, Tn, H * K, K, BK, False)
        b_k = _load_rows(k + bos * H * K + i_hk * K, rows, Tn, H * K, K, BK, False)
        b_qg = (b_q.to(tl.float32) * (scale * tl.exp(b_g))[:, None]).to(DT)
        qk_scale = scale
    b_S = tl.load(h + (i_c.to(tl.int64) * HV + i_h) * K * V + o_k[:, None] * V + cols[None, :],
                  mask=(o_k[:, None] < K) & (cols[None, :] < V), other=0.)
    b_vn = tl.load(vn + bos * HV * V + i_h * V + r64 * HV * V + cols[None, :], mask=mrv, other=0.)
    causal = o_t[:, None] >= o_t[None, :]
    A = tl.dot(b_q, tl.trans(b_k))  # [BT, BT]
    A = tl.where(causal, A * (qk_scale * tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], 0.))), 0.)
    b_o = tl.dot(b_qg, b_S) + tl.dot(A.to(DT), b_vn)
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
# H200, same sweep (2026-12-01, bench/device_profile.sh): split (64,4,2)+(64,4,2) 1.51 ms, (32,4,2) 1.55;
# WY_JOINT_INV 1.32 ms (WY kernel 0.63 ms, was 0.79).
WY_CONFIG = (128, 4, 1)
# How the blocks form of the WY kernel (WY_FORM "blocks", and every fp32 input) inverts the four diagonal
# 16x16 blocks of (I + L): "subst" (one substitution each, 4 x 15 serial steps), "joint" (one substitution
# over the stack: 15 steps), "power" (six fp32 products). The full form always takes the joint substitution.
WY_INV = "joint"
_WY_INV_CODE = {"subst": 0, "joint": 1, "power": 2}
_WY_FORM_CODE = {"blocks": 0, "full": 1}
_WY_MERGE_CODE = {"ieee": 0, "tf32x3": 1, "tf32": 2}
# Variants of the split path (bench/gdn_variants.py sweeps them; tests run each):
# WY_FORM "blocks" (16x16 blocks, ~30 small products) or "full" (one [64, 64] tile: one beta k k^T
# product, the inverse merged by three [64, 64] fp32 products of precision WY_MERGE, one product each for
# w and u); PRENORM: the WY kernel writes L2-normalised q, k once per key head, the h and o kernels read
# them instead of normalising again; H_DECAY_V: the h kernel scales v_new's rows by the decay instead of
# k's (half the elements, and k needs no conversion before the product).
# H200, 397B heads, one sequence (bench/results/gdn_variants_h200/, 2026-12-01): full + tf32 merge + PRENORM +
# H_DECAY_V with H (32,4,2), O (128,4,2): 0.893 ms at T = 8192 (WY 0.386, h 0.274, o 0.230) and 3.74 ms at
# 32768, against 1.259 / 5.216 ms for the blocks/ieee path (WY 0.635, h 0.371, o 0.253); error against the
# fp64 reference at T = 1024 the same (o 4.20e-3 vs 4.19e-3 relative RMS, state 3.25e-3 vs 2.93e-3).
# fp32 inputs keep the blocks form (the full form's fp32 tiles were never compiled on a GPU).
WY_FORM = "full"
WY_MERGE = "tf32"
PRENORM = True
H_DECAY_V = True
FWD_CONFIG = (64, 8, 3)
FWD_MODE = "split"
H_CONFIG = (32, 4, 2)
O_CONFIG = (128, 4, 2)


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
    prenorm = PRENORM and FWD_MODE == "split"  # the fused kernel normalises itself
    # only the WY kernel reads q, k, v when PRENORM is on: then they stay where they are (layout.py)
    (q, sq), (k, sk), (v, sv) = ((token_rows(x) if prenorm else (x.contiguous(), x.shape[2] * x.shape[3]))
                                 for x in (q, k, v))
    g, beta = g.contiguous(), beta.contiguous()
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
    qn, kn = ((torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=dt, device=k.device))
              if prenorm else (q, k))  # contiguous: the h and o kernels read them at stride H * K
    wrap_triton(chunk_gdn_wy_kernel)[grid1](
        k, v, g, beta, w, u, gc, q, qn, kn, cu_seqlens, chunk_indices, T, sq, sk, sv,
        H=H, HV=HV, K=K, V=V, BT=BT, BC=BC, BK=K, BV=wy_bv, IS_VARLEN=is_varlen, INV=_WY_INV_CODE[WY_INV],
        FORM=_WY_FORM_CODE["blocks" if dt == torch.float32 else WY_FORM], PRENORM=prenorm,
        MERGE=_WY_MERGE_CODE[WY_MERGE],
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
            kn, w, u, gc, h, vn, h0, ht, cu_seqlens, chunk_offsets, T,
            H=H, HV=HV, K=K, V=V, BT=BT, BK=K, BV=BV,
            USE_H0=h0 is not None, STORE_HT=ht is not None, IS_VARLEN=is_varlen,
            NORM=not prenorm, DECAY_V=H_DECAY_V, num_warps=nw, num_stages=ns,
        )
        wrap_triton(chunk_gdn_o_kernel)[(triton.cdiv(V, BVo),) + grid_o](
            qn, kn, vn, h, gc, o, cu_seqlens, chunk_indices, scale, T,
            H=H, HV=HV, K=K, V=V, BT=BT, BK=K, BV=BVo, IS_VARLEN=is_varlen,
            NORM=not prenorm, num_warps=nwo, num_stages=nso,
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
