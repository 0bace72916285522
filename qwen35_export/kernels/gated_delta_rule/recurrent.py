"""Recurrent gated delta rule (decode): a few tokens per sequence, fp32 state read once and written once.

One program per (sequence, value head, V block) holds S [K, BV] in registers across the T <= 8 steps.
The state lives in a pool indexed by a per-sequence slot so a runtime can keep one pool per layer and
update it in place (in and out slots may differ: copy-on-write for speculative branches). A negative slot
marks a padding row of a fixed-size (CUDA-graphed) batch: its state is neither read nor written.
Decode is bound by the state traffic, B * HV * K * V * 4 bytes each way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.library import wrap_triton

from ..gdn_gating.gating import _softplus
from ..layout import token_rows

MAX_T = 8  # tokens per sequence the recurrent path is meant for (speculative verification)


@triton.jit
def fused_recurrent_gdn_kernel(
    q, k, v, g, beta, A_log, dt_bias, o, h0, ht, h0_idx, ht_idx, hs, scale, T, SQ, SK, SV,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, USE_IDX: tl.constexpr, STORE_HT: tl.constexpr, STORE_STEPS: tl.constexpr,
    USE_GATE: tl.constexpr,
):
    """One (sequence, value head, V block): T steps of S <- e^g S + k (beta (v - S^T k))^T, o = S^T q.
    USE_GATE: g and beta hold the raw projections a and b; the gating is computed here (one launch less).
    SQ, SK, SV: token strides of q, k, v (layout.token_rows: column slices of the conv output, read in place)."""
    scale = (tl.zeros([], tl.float32) + scale).to(tl.float32)  # AOTI passes Python floats as fp64 scalars
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // HV, i_nh % HV
    i_hk = i_h // (HV // H)
    o_k = tl.arange(0, BK)
    cols = i_v * BV + tl.arange(0, BV)
    mk = o_k < K
    mv = cols < V
    tile = o_k[:, None] * V + cols[None, :]
    mkv = mk[:, None] & mv[None, :]
    if USE_IDX:
        slot_in = tl.load(h0_idx + i_n).to(tl.int64)
        slot_out = tl.load(ht_idx + i_n).to(tl.int64)
    else:
        slot_in = i_n.to(tl.int64)
        slot_out = i_n.to(tl.int64)
    if USE_H0:
        S = tl.load(h0 + (slot_in * HV + i_h) * K * V + tile, mask=mkv & (tile * 0 + slot_in >= 0), other=0.)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for t in range(0, T):
        tok = i_n.to(tl.int64) * T + t
        b_q = tl.load(q + tok * SQ + i_hk * K + o_k, mask=mk, other=0.).to(tl.float32)
        b_k = tl.load(k + tok * SK + i_hk * K + o_k, mask=mk, other=0.).to(tl.float32)
        b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + 1e-6) * scale
        b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + 1e-6)
        b_v = tl.load(v + tok * SV + i_h * V + cols, mask=mv, other=0.).to(tl.float32)
        b_g = tl.load(g + tok * HV + i_h).to(tl.float32)
        b_beta = tl.load(beta + tok * HV + i_h).to(tl.float32)
        if USE_GATE:
            b_A = tl.load(A_log + i_h).to(tl.float32)
            b_dt = tl.load(dt_bias + i_h).to(tl.float32)
            b_g = -tl.exp(b_A) * _softplus(b_g + b_dt)
            b_beta = tl.sigmoid(b_beta)
        S = S * tl.exp(b_g)
        b_vn = (b_v - tl.sum(S * b_k[:, None], axis=0)) * b_beta
        S = S + b_k[:, None] * b_vn[None, :]
        b_o = tl.sum(S * b_q[:, None], axis=0)
        tl.store(o + (tok * HV + i_h) * V + cols, b_o.to(o.dtype.element_ty), mask=mv)
        if STORE_STEPS:
            tl.store(hs + (tok * HV + i_h) * K * V + tile, S, mask=mkv)
    if STORE_HT:
        tl.store(ht + (slot_out * HV + i_h) * K * V + tile, S, mask=mkv & (tile * 0 + slot_out >= 0))


# (BV, num_warps) from N * HV (sequences x value heads) up; tuned on H100 with 397B heads (bench/results/gdn.json):
# B = 1: (16, 1) 3.7 us; B = 8: (32, 4) 18 us; B >= 64: (64, 4), 86-88% of HBM bandwidth.
RECURRENT_CONFIG = {0: (16, 1), 512: (32, 4), 4096: (64, 4)}


def recurrent_blocks(N: int | torch.SymInt, HV: int, V: int) -> tuple[int, int]:
    """(BV, num_warps): small batches split V finer so that enough programs stream the state.

    A symbolic N (a decode graph's batch) takes the bucket every N it admits reaches, i.e. its smallest
    one's: read with `statically_known_true`, never compared. A plain `N * HV >= lo` guarded `N < 16` while
    tracing (35B heads, example batch 2), which baked the example's bucket in and narrowed N's range for
    every op after it: the FP8 linears of the GDN decode graphs were then sized for <= 15 rows."""
    items = sorted(RECURRENT_CONFIG.items())
    BV, nw = next((c for lo, c in reversed(items) if statically_known_true(N * HV >= lo)), items[0][1])
    return min(BV, V), nw


def fused_recurrent_gated_delta_rule_fwd(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
    h0: Tensor | None, ht: Tensor | None, h0_idx: Tensor | None, ht_idx: Tensor | None,
    keep_steps: bool, A_log: Tensor | None = None, dt_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Launch the recurrent kernel; o [B, T, HV, V] and (keep_steps) states [B, T, HV, K, V] fp32.
    With A_log and dt_bias, g and beta are the raw a and b and the gating runs in the kernel."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    (q, sq), (k, sk), (v, sv) = (token_rows(x) for x in (q, k, v))
    g, beta = g.contiguous(), beta.contiguous()
    o = torch.empty(B, T, HV, V, dtype=v.dtype, device=v.device)
    hs = torch.empty(B, T, HV, K, V, dtype=torch.float32, device=v.device) if keep_steps else None
    BV, nw = recurrent_blocks(B, HV, V)
    wrap_triton(fused_recurrent_gdn_kernel)[(triton.cdiv(V, BV), B * HV)](
        q, k, v, g, beta, A_log, dt_bias, o, h0, ht, h0_idx, ht_idx, hs, scale, T, sq, sk, sv,
        H=H, HV=HV, K=K, V=V, BK=triton.next_power_of_2(K), BV=BV,
        USE_H0=h0 is not None, USE_IDX=h0_idx is not None, STORE_HT=ht is not None, STORE_STEPS=keep_steps,
        USE_GATE=A_log is not None,
        num_warps=nw,
    )
    return o, hs


def fused_recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    state_pool: Tensor | None = None,
    slot_idx: Tensor | None = None,
    keep_steps: bool = False,
    A_log: Tensor | None = None,
    dt_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, Tensor]:
    """Recurrent gated delta rule for decode (T <= 8 tokens per sequence), q/k L2-norm fused.

    q, k: [B, T, H, K]; v: [B, T, HV, V]; g, beta: [B, T, HV] fp32.
    Either `initial_state` [B, HV, K, V] fp32 (or None for zeros): returns o and a new final state;
    or `state_pool` [P, HV, K, V] fp32 with `slot_idx` [B] (int32/int64, -1 = padding row): the states of
    rows slot_idx are read and updated in place, and the second return value is None.
    With keep_steps, also returns the state after every token, [B, T, HV, K, V] fp32.
    With A_log and dt_bias ([HV]), g and beta are the raw projections a and b ([B, T, HV], any float dtype)
    and the kernel computes g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b) in fp32 (decode: one
    launch instead of two).
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if k.shape != q.shape or v.shape[:2] != (B, T) or g.shape != (B, T, HV) or beta.shape != (B, T, HV):
        raise ValueError(f"fused_recurrent_gated_delta_rule: shapes q {tuple(q.shape)} k {tuple(k.shape)} "
                         f"v {tuple(v.shape)} g {tuple(g.shape)} beta {tuple(beta.shape)}")
    if HV % H:
        raise ValueError(f"fused_recurrent_gated_delta_rule: HV={HV} is not a multiple of H={H}")
    scale = K ** -0.5 if scale is None else scale
    if (A_log is None) != (dt_bias is None):
        raise ValueError("fused_recurrent_gated_delta_rule: A_log and dt_bias come together (gating in kernel)")
    gate = {} if A_log is None else {"A_log": A_log.contiguous(), "dt_bias": dt_bias.contiguous()}
    if state_pool is not None:
        if slot_idx is None or slot_idx.shape != (B,):
            raise ValueError(f"fused_recurrent_gated_delta_rule: state_pool needs slot_idx of shape ({B},)")
        if (state_pool.dtype != torch.float32 or state_pool.shape[1:] != (HV, K, V)
                or not state_pool.is_contiguous()):
            raise ValueError(f"fused_recurrent_gated_delta_rule: state_pool {tuple(state_pool.shape)} "
                             f"{state_pool.dtype}; expected contiguous [P, {HV}, {K}, {V}] float32")
        o, hs = fused_recurrent_gated_delta_rule_fwd(q, k, v, g, beta, scale, state_pool, state_pool,
                                                     slot_idx, slot_idx, keep_steps, **gate)
        ht = None
    else:
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        ht = torch.empty(B, HV, K, V, dtype=torch.float32, device=v.device) if output_final_state else None
        o, hs = fused_recurrent_gated_delta_rule_fwd(q, k, v, g, beta, scale, h0, ht, None, None, keep_steps,
                                                     **gate)
    if keep_steps:
        return o, ht, hs
    return o, ht
