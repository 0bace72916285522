"""Fused MoE router: logits -> fp32 softmax over all E -> top-k -> renormalise, one program per token.

Top-k is k rounds of argmax over the E probabilities held in registers; among equal probabilities the
lowest expert index wins (`tie_break_left`). With ties across the top-k boundary that picks the same set
as torch.topk on CUDA (tested on H100); torch.topk on CPU picks among boundary ties in no fixed order,
so there only the chosen values are comparable. Order within a tie may differ from torch.topk's; the
experts op does not depend on slot order.

The whole routing of a layer with a folded shared expert (`qwen35::moe_route`, model/ops.py) is two launches
at decode: `_gate_logits_kernel` (x @ w_gate.T, the 1-4 MB gate streamed by one program per 16 gate rows,
where cuBLAS's GEMV ran at 0.19 TB/s on an H200 at one token) and `_route_kernel` (the router above for one
token, plus the shared slot and the padding-row redirect that were four more small launches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.library import wrap_triton

from .configs import DECODE_MAX_TOKENS


@triton.jit
def _softmax_topk(x, offs, ok, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """x [BLOCK_E] fp32 logits (-inf where not `ok`), offs = arange(BLOCK_E) -> (weights [BLOCK_K] fp32
    renormalised to sum 1 over the first TOP_K lanes, 0 after; ids [BLOCK_K] int32): softmax over the valid
    lanes, TOP_K argmax rounds, the lowest index first among equal probabilities."""
    p = tl.exp(x - tl.max(x, axis=0))
    p = tl.where(ok, p, 0.0)
    p = p / tl.sum(p, axis=0)
    # Probabilities are >= 0: -1 marks padding, -2 an expert already taken; neither can win again.
    work = tl.where(ok, p, -1.0)
    offs_k = tl.arange(0, BLOCK_K)
    vals = tl.zeros((BLOCK_K,), dtype=tl.float32)
    idxs = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        v, i = tl.max(work, axis=0, return_indices=True, return_indices_tie_break_left=True)
        vals = tl.where(offs_k == j, v, vals)
        idxs = tl.where(offs_k == j, i, idxs)
        work = tl.where(offs == i, -2.0, work)
    return vals / tl.sum(vals, axis=0), idxs


@triton.jit
def _router_kernel(logits_ptr, w_ptr, ids_ptr, E, stride_l, TOP_K: tl.constexpr,
                   BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    ok = offs < E
    x = tl.load(logits_ptr + row * stride_l + offs, mask=ok, other=-float("inf")).to(tl.float32)
    vals, idxs = _softmax_topk(x, offs, ok, TOP_K, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < TOP_K
    tl.store(w_ptr + row * TOP_K + offs_k, vals, mask=k_ok)
    tl.store(ids_ptr + row * TOP_K + offs_k, idxs.to(tl.int64), mask=k_ok)


def moe_router_triton(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """`logits` [N, E] -> (weights [N, k] fp32 summing to 1 per row, ids [N, k] int64), best first."""
    N, E = logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"moe_router: top_k must be in [1, E={E}], got {top_k}")
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    w = torch.empty(N, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(N, top_k, dtype=torch.int64, device=logits.device)
    if N == 0:
        return w, ids
    block_e = triton.next_power_of_2(E)
    wrap_triton(_router_kernel)[(N,)](logits, w, ids, E, logits.stride(0), TOP_K=top_k, BLOCK_E=block_e,
                                     BLOCK_K=triton.next_power_of_2(top_k),
                                     num_warps=4 if block_e >= 512 else 1)
    return w, ids


# -- whole routing (qwen35::moe_route) ---------------------------------------------------------------
@triton.jit
def _gate_logits_kernel(x_ptr, w_ptr, out_ptr, N, L, H, h_per_split, stride_x, stride_w, stride_o, stride_s,
                        BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
                        IEEE: tl.constexpr, SPLIT: tl.constexpr = False):
    """out[n, l] = sum_h x[n, h] w[l, h], fp32 accumulation rounded once to out's dtype; program (l, n) does
    BLOCK_L gate rows for BLOCK_N tokens (the token tile is masked: tl.dot needs >= 16 rows). SPLIT: program
    (l, n, s) sums columns [s * h_per_split, (s + 1) * h_per_split) into out[s] (fp32 partials)."""
    pid_l = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    x_rows = x_ptr + offs_n.to(tl.int64)[:, None] * stride_x
    w_rows = w_ptr + offs_l.to(tl.int64)[:, None] * stride_w
    if SPLIT:
        h_lo = pid_s * h_per_split
        h_hi = tl.minimum(h_lo + h_per_split, H)
    else:  # the unsplit form as every engine ran it
        h_lo = 0
        h_hi = H
    acc = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
    for h0 in range(h_lo, h_hi, BLOCK_H):
        h_ok = (h0 + offs_h) < h_hi
        xt = tl.load(x_rows + (h0 + offs_h)[None, :], mask=(offs_n[:, None] < N) & h_ok[None, :], other=0.0)
        wt = tl.load(w_rows + (h0 + offs_h)[None, :], mask=(offs_l[:, None] < L) & h_ok[None, :], other=0.0)
        if IEEE:  # fp32 inputs: full fp32 products as F.linear's, not tf32
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(wt), acc)
    out = out_ptr + pid_s.to(tl.int64) * stride_s + offs_n.to(tl.int64)[:, None] * stride_o + offs_l[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_l[None, :] < L))


@triton.jit
def _load_logits(lg_ptr, stride_s, offs, ok, like_ptr, SPLITS: tl.constexpr):
    """The logits at `lg_ptr + offs` in fp32: the sum of the SPLITS fp32 partial rows `stride_s` apart, rounded
    once to like_ptr's dtype, the dtype F.linear's logits would have."""
    x = tl.load(lg_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    for s in tl.static_range(1, SPLITS):
        x += tl.load(lg_ptr + s * stride_s + offs, mask=ok, other=0.0)
    return x.to(like_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _route_kernel(lg_ptr, real_ptr, w_ptr, ids_ptr, N, E, stride_l, stride_s, TOP_K: tl.constexpr,
                  HAS_REAL: tl.constexpr, PARTIALS: tl.constexpr, SPLITS: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Row `row` of qwen35::moe_route from the logits [N, >= E+1] (or, PARTIALS, SPLITS fp32 partials of them,
    rows `stride_s` apart, summed and rounded to w's dtype): TOP_K routed slots, then the shared slot (id E,
    weight sigmoid(logit E)), weights in w's dtype; a padding row (real 0) routes as real row
    row mod max(sum(real), 1) with weight 0."""
    row = tl.program_id(0).to(tl.int64)
    src = row
    if HAS_REAL:
        offs_r = tl.arange(0, BLOCK_R)
        n_real = tl.zeros((BLOCK_R,), dtype=tl.int64)
        for r0 in range(0, N, BLOCK_R):  # each program counts the real rows itself: a decode batch, a block or two
            n_real += tl.load(real_ptr + r0 + offs_r, mask=r0 + offs_r < N, other=0).to(tl.int64)
        n_real = tl.maximum(tl.sum(n_real, axis=0), 1)
        keep = tl.load(real_ptr + row) != 0
        src = tl.where(keep, row, row % n_real)
    offs = tl.arange(0, BLOCK_E)
    ok = offs < E
    if not PARTIALS:  # logits as F.linear gives them (the form every engine ran)
        x = tl.load(lg_ptr + src * stride_l + offs, mask=ok, other=-float("inf")).to(tl.float32)
        sg = tl.load(lg_ptr + row * stride_l + E).to(tl.float32)
    else:
        x = tl.where(ok, _load_logits(lg_ptr + src * stride_l, stride_s, offs, ok, w_ptr, SPLITS), -float("inf"))
        # the shared gate's logit (column E; BLOCK_E may end before it): one lane
        first = offs == 0
        sg = tl.sum(tl.where(first, _load_logits(lg_ptr + row * stride_l + E, stride_s, offs, first, w_ptr,
                                                 SPLITS), 0.0), axis=0)
    vals, idxs = _softmax_topk(x, offs, ok, TOP_K, BLOCK_K)
    sg = tl.sigmoid(sg)
    offs_k = tl.arange(0, BLOCK_K)
    vals = tl.where(offs_k == TOP_K, sg, vals)
    if HAS_REAL:
        vals = tl.where(keep, vals, 0.0)
    idxs = tl.where(offs_k == TOP_K, E, idxs)
    k_ok = offs_k <= TOP_K
    # Rounded to w's dtype once, as the reference rounds the fp32 router weights and the sigmoid.
    tl.store(w_ptr + row * (TOP_K + 1) + offs_k, vals.to(w_ptr.dtype.element_ty), mask=k_ok)
    tl.store(ids_ptr + row * (TOP_K + 1) + offs_k, idxs.to(tl.int64), mask=k_ok)


# One program per 16 gate rows (L = 264: 17 programs, 520: 33) and 16 tokens: at decode the gate weight is
# read from HBM once, the token tiles of a batch read it again from L2. Of bench/decode_kernels.py's eight
# candidates on the H200 (bench/results/moe_route_h200/), BLOCK_H 512 with 3 or 4 stages (tied over the six
# geometry x batch cases, 4 faster at batch 1): 35B 4.8-5.1 us, 397B 7.5-8.1 us at batch 1 / 8 / 64, against
# 5.9 / 10.0-10.6 us for the first guess (BLOCK_H 256, 3 stages) and 5.6-5.7 / 7.4-7.6 us for F.linear.
# SPLIT_H: programs per tile over H (fp32 partials summed by the route kernel, `gate_logit_partials`); 1 is
# the form every engine ran; split variants are timed by `bench/decode_kernels.py --route-only`.
# SPLIT_H_ONE_ROW: the split for a call of one row known statically (an engine's batch-1 decode graph,
# exporter/capture.py DECODE1, and eager one-row calls), where no larger batch shares the choice. H200
# (bench/results/moe_route_h200/README.md, tenth session, standalone): 35B 11.30 -> 9.60 us with 4 splits at
# one row, 397B 13.95 -> 12.55.
GATE_LOGITS_CONFIG = dict(BLOCK_N=16, BLOCK_L=16, BLOCK_H=512, num_warps=4, num_stages=4, SPLIT_H=1,
                          SPLIT_H_ONE_ROW=4)


def _h_splits(H: int, splits: int, block_h: int) -> tuple[int, int]:
    """(columns per split, splits) for H split `splits` ways in whole BLOCK_H steps: the last split may be
    short, none is empty (so there may be fewer than asked)."""
    per = triton.cdiv(triton.cdiv(H, splits), block_h) * block_h
    return per, triton.cdiv(H, per)


def _launch_gate_logits(x: Tensor, w_gate: Tensor, out: Tensor, splits: int, cfg: dict) -> None:
    """`_gate_logits_kernel` into out [N, L] (one split) or [S, N, L] (fp32 partials, S from `_h_splits`)."""
    N, H = x.shape
    L = w_gate.shape[0]
    bn, bl, bh = cfg["BLOCK_N"], cfg["BLOCK_L"], cfg["BLOCK_H"]
    h_per_split, splits = _h_splits(H, splits, bh)
    grid = ((L + bl - 1) // bl, (N + bn - 1) // bn, splits)
    wrap_triton(_gate_logits_kernel)[grid](x, w_gate, out, N, L, H, h_per_split, x.stride(0), w_gate.stride(0),
                                           out.stride(-2), out.stride(0) if out.dim() == 3 else 0,
                                           BLOCK_N=bn, BLOCK_L=bl, BLOCK_H=bh,
                                           IEEE=x.dtype == torch.float32, SPLIT=out.dim() == 3,
                                           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _check_gate(x: Tensor, w_gate: Tensor) -> None:
    if w_gate.shape[1] != x.shape[1] or w_gate.dtype != x.dtype:
        raise ValueError(f"gate logits: x {tuple(x.shape)} {x.dtype} and w_gate {tuple(w_gate.shape)} "
                         f"{w_gate.dtype} must share H and dtype")


def gate_logits_triton(x: Tensor, w_gate: Tensor, config: dict | None = None) -> Tensor:
    """x [N, H] @ w_gate [L, H].T -> [N, L] in x's dtype (fp32 accumulation, one rounding), as F.linear."""
    _check_gate(x, w_gate)
    cfg = {**GATE_LOGITS_CONFIG, **(config or {})}
    x, w_gate = x.contiguous(), w_gate.contiguous()
    out = torch.empty(x.shape[0], w_gate.shape[0], dtype=x.dtype, device=x.device)
    if x.shape[0]:
        _launch_gate_logits(x, w_gate, out, 1, cfg)
    return out


def gate_logit_partials(x: Tensor, w_gate: Tensor, splits: int, config: dict | None = None) -> Tensor:
    """The gate GEMV with H split over `splits` programs per tile: fp32 partials [S, N, L] (S <= splits:
    whole BLOCK_H steps per split) whose sum over S is x @ w_gate.T before its rounding; the route kernel
    sums and rounds them (`route_from_logits_triton`). At one token a 35B gate (264 rows) makes 17 tiles:
    splitting H gives 17 x S programs to stream it."""
    _check_gate(x, w_gate)
    cfg = {**GATE_LOGITS_CONFIG, **(config or {})}
    x, w_gate = x.contiguous(), w_gate.contiguous()
    H, bh = x.shape[1], cfg["BLOCK_H"]
    S = _h_splits(H, splits, bh)[1]
    out = torch.empty(S, x.shape[0], w_gate.shape[0], dtype=torch.float32, device=x.device)
    if x.shape[0]:
        _launch_gate_logits(x, w_gate, out, splits, cfg)
    return out


def route_from_logits_triton(logits: Tensor, num_experts: int, top_k: int, real: Tensor | None,
                             dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """`_route_kernel` over logits [N, L >= E + 1] -> (weights [N, k+1] in logits' dtype, ids [N, k+1] int64).
    Or over `gate_logit_partials`' fp32 partials [S, N, L] with `dtype` the logits' dtype (x's): summed and
    rounded to it in the kernel, the weights in it."""
    if logits.dim() == 3:
        if dtype is None:
            raise ValueError("moe_route: logit partials [S, N, L] need the logits' dtype (`dtype`)")
        S, N, L = logits.shape
    else:
        (N, L), S, dtype = logits.shape, 1, dtype or logits.dtype
    E = num_experts
    if not 1 <= top_k <= E or L < E + 1:
        raise ValueError(f"moe_route: need 1 <= top_k <= E = {E} and E + 1 <= L = {L} logit columns, got "
                         f"top_k {top_k}")
    logits = logits.contiguous()
    w = torch.empty(N, top_k + 1, dtype=dtype, device=logits.device)
    ids = torch.empty(N, top_k + 1, dtype=torch.int64, device=logits.device)
    if N == 0:
        return w, ids
    # Flags as bytes: one load per flag on every Triton version. A conversion, not a dtype view:
    # Inductor cannot lower view(bool -> uint8) (H200 build, torch 2.11: "torch.bool is not supported by
    # torch.iinfo"); it fuses the conversion into the pointwise kernel that computes `real`.
    flags = real.to(torch.uint8).contiguous() if real is not None else logits
    block_e = triton.next_power_of_2(E)
    wrap_triton(_route_kernel)[(N,)](logits, flags, w, ids, N, E, logits.stride(-2),
                                    logits.stride(0) if S > 1 else 0, TOP_K=top_k,
                                    HAS_REAL=real is not None, PARTIALS=logits.dim() == 3, SPLITS=S,
                                    BLOCK_E=block_e,
                                    BLOCK_K=triton.next_power_of_2(top_k + 1), BLOCK_R=DECODE_MAX_TOKENS,
                                    num_warps=4 if block_e >= 512 else 1)
    return w, ids


def moe_route_triton(x: Tensor, w_gate: Tensor, num_experts: int, top_k: int,
                     real: Tensor | None) -> tuple[Tensor, Tensor]:
    """`qwen35::moe_route` (model/ops.py): x [N, H], w_gate [L, H] (router rows, then the shared gate row E)
    -> (weights [N, k+1] in x's dtype, ids [N, k+1] int64), shared slot last.

    The logits come from `_gate_logits_kernel` when N <= DECODE_MAX_TOKENS for every N the graph admits
    (decided without a guard on a symbolic N; with GATE_LOGITS_CONFIG["SPLIT_H"] > 1, or its
    "SPLIT_H_ONE_ROW" for one row known statically, as fp32 partials over H that the route kernel sums),
    else from F.linear (cuBLAS, right at prefill sizes)."""
    N = x.shape[0]
    if statically_known_true(N <= DECODE_MAX_TOKENS):
        splits = GATE_LOGITS_CONFIG.get("SPLIT_H", 1)
        if statically_known_true(N == 1):
            splits = GATE_LOGITS_CONFIG.get("SPLIT_H_ONE_ROW", splits)
        if splits > 1:
            return route_from_logits_triton(gate_logit_partials(x, w_gate, splits), num_experts, top_k, real,
                                            dtype=x.dtype)
        logits = gate_logits_triton(x, w_gate)
    else:
        logits = F.linear(x, w_gate)
    return route_from_logits_triton(logits, num_experts, top_k, real)
