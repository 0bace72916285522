"""Split-KV decode attention (flash-decoding) for T <= 8 query tokens per row with grouped KV heads; the
launcher sends any other T (a prefill graph's symbolic T, a long eager call) to the flash kernel in prefill.py.

One program per (row, KV head, split of SPLIT cache positions) scores the G*T query rows that share the KV
head against its positions with an online softmax, reading only positions below the row's length (a split
past it exits at once), so a step reads each live key and value once and never the preallocated tail.
A second kernel merges the splits. The cache length T_max and the head counts are static under export; the
batch is symbolic, so every launch decision here depends on static sizes only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .prefill import prefill_attention_triton

DECODE_MAX_T = 8  # query tokens per row up to which split-KV decoding is used
SPLIT = 256  # cache positions per program: 33 programs per KV head at T_max = 8448
BLOCK_N = 64


@triton.jit
def _decode_attn_partial(q_ptr, k_ptr, v_ptr, start_ptr, len_ptr, acc_ptr, ml_ptr, T, KVH, NSPLIT, Tmax, scale,
                         sq_b, sq_t, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                         G: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)  # b * KVH + h
    sp = tl.program_id(1)
    b = pid // KVH
    h = pid % KVH
    start = tl.load(start_ptr + b)
    # AOTI passes a Python float as a fp64 scalar, which would promote every score tile to fp64: convert once.
    scale = (tl.zeros([], tl.float32) + scale).to(tl.float32)
    # Clamped to the cache so that no input can make a load leave it (AOTI also runs kernels on random
    # example inputs while compiling). A split at or past the row's length runs no iteration; the merge
    # reads only the splits below it.
    total = tl.minimum(tl.maximum(start + tl.load(len_ptr + b), 1), Tmax)
    lo = sp * SPLIT
    hi = tl.minimum(lo + SPLIT, total)
    r = tl.arange(0, ROWS)
    g = r // T
    t = r % T
    row_ok = r < G * T
    pos = start + t
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + t[:, None] * sq_t + (h * G + g)[:, None] * sq_h + d[None, :],
                mask=row_ok[:, None], other=0.0)  # [ROWS, D]
    k_base = k_ptr + b.to(tl.int64) * sk_b + h * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + h * sv_h
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        kv_ok = j < hi
        k = tl.load(k_base + j[:, None].to(tl.int64) * sk_t + d[None, :], mask=kv_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale  # [ROWS, BLOCK_N] fp32
        s = tl.where(kv_ok[None, :] & (j[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep exp() at 0, not NaN
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_base + j[:, None].to(tl.int64) * sv_t + d[None, :], mask=kv_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    w = (pid.to(tl.int64) * NSPLIT + sp) * ROWS
    tl.store(acc_ptr + (w + r[:, None]) * D + d[None, :], acc)
    tl.store(ml_ptr + (w + r) * 2, m_i)
    tl.store(ml_ptr + (w + r) * 2 + 1, l_i)


@triton.jit
def _decode_attn_merge(acc_ptr, ml_ptr, start_ptr, len_ptr, o_ptr, T, KVH, NSPLIT, Tmax,
                       so_b, so_t, so_h, G: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr,
                       SPLIT: tl.constexpr, NSPLIT_P: tl.constexpr):
    pid = tl.program_id(0)  # b * KVH + h
    r = tl.program_id(1)  # query row g * T + t
    b = pid // KVH
    h = pid % KVH
    g = r // T
    t = r % T
    total = tl.minimum(tl.maximum(tl.load(start_ptr + b) + tl.load(len_ptr + b), 1), Tmax)
    sp = tl.arange(0, NSPLIT_P)
    used = sp < tl.cdiv(total, SPLIT)
    w = (pid.to(tl.int64) * NSPLIT + sp) * ROWS + r  # [NSPLIT_P]
    m = tl.load(ml_ptr + w * 2, mask=used, other=float("-inf"))
    lsum = tl.load(ml_ptr + w * 2 + 1, mask=used, other=0.0)
    m_max = tl.max(m, 0)  # finite: split 0 always holds position 0 <= every query position
    scale = tl.where(used, tl.exp(m - m_max), 0.0)
    d = tl.arange(0, D)
    acc = tl.load(acc_ptr + w[:, None] * D + d[None, :], mask=used[:, None], other=0.0)  # [NSPLIT_P, D]
    o = tl.sum(acc * scale[:, None], 0) / tl.sum(lsum * scale, 0)
    tl.store(o_ptr + b.to(tl.int64) * so_b + t * so_t + (h * G + g) * so_h + d, o.to(o_ptr.dtype.element_ty))


def _check_shapes(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, lengths: Tensor) -> None:
    """What the kernel indexes by: every query head in a group of one KV head, D a power of two (tl.arange,
    tl.dot), caches and per-row vectors of q's batch (else loads leave them)."""
    if q.dim() != 4 or k_cache.dim() != 4:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)}, expected "
                         "[B, T, NH, D] and [B, KVH, T_max, D]")
    B, T, NH, D = q.shape
    KVH = k_cache.shape[1]
    if NH % KVH != 0:
        raise ValueError(f"decode_attention: NH={NH} query heads is not a multiple of KVH={KVH} KV heads")
    if D < 16 or D & (D - 1):
        raise ValueError(f"decode_attention: head dim D={D}; the kernel needs a power of two >= 16")
    want = (B, KVH, k_cache.shape[2], D)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if tuple(t.shape) != want:
            raise ValueError(f"decode_attention: {name} {tuple(t.shape)}, expected {want} for q {tuple(q.shape)} "
                             f"(and k_cache's T_max)")
    for name, t in (("start", start), ("lengths", lengths)):
        if tuple(t.shape) != (B,):
            raise ValueError(f"decode_attention: {name} {tuple(t.shape)}, expected ({B},) for q {tuple(q.shape)}")


def decode_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, lengths: Tensor,
                            scale: float) -> Tensor:
    """Triton version of `qwen35::decode_attention`: q [B, T, NH, D], caches [B, KVH, T_max, D] -> [B, T, NH, D].

    T that is an int <= 8 (the decode graph's static T) takes split-KV decoding; any other T (a prefill
    graph's symbolic T, or a long eager call) the flash prefill kernel (prefill.py). Deciding on the type of
    T, not its value, puts no guard on a symbolic T."""
    _check_shapes(q, k_cache, v_cache, start, lengths)
    B, T, NH, D = q.shape
    KVH, Tmax = k_cache.shape[1], k_cache.shape[2]
    G = NH // KVH
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        q, k_cache, v_cache = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        k_cache, v_cache = k_cache.to(q.dtype), v_cache.to(q.dtype)
    start, lengths = start.contiguous(), lengths.contiguous()
    if not (type(T) is int and T <= DECODE_MAX_T):
        return prefill_attention_triton(q, k_cache, v_cache, start, lengths, scale)
    ROWS = max(16, triton.next_power_of_2(G * T))  # tl.dot needs >= 16 rows
    nsplit = triton.cdiv(Tmax, SPLIT)
    acc = torch.empty(B * KVH, nsplit, ROWS, D, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * KVH, nsplit, ROWS, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(B, T, NH, D, dtype=q.dtype, device=q.device)
    wrap_triton(_decode_attn_partial)[(B * KVH, nsplit)](
        q, k_cache, v_cache, start, lengths, acc, ml, T, KVH, nsplit, Tmax, scale,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        G=G, D=D, ROWS=ROWS, SPLIT=SPLIT, BLOCK_N=BLOCK_N, num_warps=4, num_stages=2)
    wrap_triton(_decode_attn_merge)[(B * KVH, G * T)](
        acc, ml, start, lengths, out, T, KVH, nsplit, Tmax, out.stride(0), out.stride(1), out.stride(2),
        G=G, D=D, ROWS=ROWS, SPLIT=SPLIT, NSPLIT_P=max(2, triton.next_power_of_2(nsplit)), num_warps=4)
    return out
