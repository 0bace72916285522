"""Flash attention over the KV cache for prefill (T query tokens per row, any T), grouped KV heads, causal.

Same contract as `qwen35::decode_attention`: the cache already holds this call's keys and values; query t of
row b sits at position start[b] + t and attends to positions j <= its own and j < max(start[b] + lengths[b], 1).
One program per (block of BLOCK_M queries, row, query head) streams the keys of its KV head with an online
softmax, reading only positions below the last query of its block (causal) and below the row's length: a
prompt of T tokens touches T * (T + 1) / 2 scores, never the preallocated tail of the cache. Blocks wholly
below every query of the program take the unmasked loop; only the diagonal blocks pay for the mask.

This replaces SDPA with a boolean mask over the whole cache (no flash kernel takes that mask: it ran cuDNN's
kernel over all T_max positions, 4.2 ms per layer at T = 8192 for 35B-A3B's 16 heads on an H200).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

LOG2E = 1.4426950408889634  # the kernel's softmax runs in base 2 (exp2): scores are scaled by log2(e)

# (BLOCK_M, BLOCK_N, num_warps, num_stages); module-level so bench/prefill_attention.py can try others.
# H200, T = 8192, 2 KV heads, D 256 (bench/results/prefill_attention_h200.json): 1.12 ms (493 TFLOPS) at 16
# query heads, 2.11 ms (520 TFLOPS) at 32, 0.83x torch's causal flash attention over the bare T keys and
# 4.3x the masked SDPA it replaced; (64, 64, 4, 2) 1.49 ms; BLOCK_N 128 or 3 stages exceed shared memory.
PREFILL_CONFIG = (128, 64, 8, 2)


@triton.jit
def _attn_block(acc, m_i, l_i, q, k_base, v_base, lo, hi, pos, total, qk_scale, sk_t, sv_t,
                D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Online-softmax update over key positions [lo, hi) (multiples of BLOCK_N except the last hi)."""
    d = tl.arange(0, D)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        if MASK:
            kv_ok = j < hi
            k = tl.load(k_base + j[:, None].to(tl.int64) * sk_t + d[None, :], mask=kv_ok[:, None], other=0.0)
        else:
            k = tl.load(k_base + j[:, None].to(tl.int64) * sk_t + d[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N] fp32, log2 units
        if MASK:
            s = tl.where((j[None, :] <= pos[:, None]) & (j[None, :] < total), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays at 0, not NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        if MASK:
            v = tl.load(v_base + j[:, None].to(tl.int64) * sv_t + d[None, :], mask=kv_ok[:, None], other=0.0)
        else:
            v = tl.load(v_base + j[:, None].to(tl.int64) * sv_t + d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_attn_fwd(q_ptr, k_ptr, v_ptr, start_ptr, len_ptr, o_ptr, T, NH, Tmax, qk_scale,
                      sq_b, sq_t, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_t, so_h,
                      G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    i_m = tl.program_id(0)
    bh = tl.program_id(1)  # b * NH + h
    b = bh // NH
    h = bh % NH
    kvh = h // G
    # Clamped to the cache so that no input can make a load leave it (AOTI also runs kernels on random
    # example inputs while compiling): start >= 0, 1 <= total <= T_max.
    start = tl.maximum(tl.load(start_ptr + b), 0)
    total = tl.minimum(tl.maximum(start + tl.load(len_ptr + b), 1), Tmax)
    # AOTI passes a Python float as a fp64 scalar, which would promote every score tile to fp64 (193 fp64
    # instructions per thread in the sm_90 PTX): one scalar conversion here instead.
    qk_scale = (tl.zeros([], tl.float32) + qk_scale).to(tl.float32)
    m0 = i_m * BLOCK_M
    t = m0 + tl.arange(0, BLOCK_M)
    row_ok = t < T
    pos = start + t
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + t[:, None].to(tl.int64) * sq_t + h * sq_h + d[None, :],
                mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    k_base = k_ptr + b.to(tl.int64) * sk_b + kvh * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + kvh * sv_h
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    # Keys every query of the block may see (j <= start + m0 and j < total), whole blocks: no mask.
    full = (tl.minimum(start + m0 + 1, total) // BLOCK_N) * BLOCK_N
    # Keys some query may see: up to the block's last real query, and the row's length.
    hi = tl.minimum(start + tl.minimum(m0 + BLOCK_M, T), total)
    acc, m_i, l_i = _attn_block(acc, m_i, l_i, q, k_base, v_base, 0, full, pos, total, qk_scale, sk_t, sv_t,
                                D, BLOCK_N, False)
    acc, m_i, l_i = _attn_block(acc, m_i, l_i, q, k_base, v_base, full, hi, pos, total, qk_scale, sk_t, sv_t,
                                D, BLOCK_N, True)
    # Every real query sees position 0 (0 <= pos, 0 < total), so l_i > 0 there; rows past T are not stored.
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + b.to(tl.int64) * so_b + t[:, None].to(tl.int64) * so_t + h * so_h + d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, lengths: Tensor,
                             scale: float, config: tuple[int, int, int, int] | None = None) -> Tensor:
    """Triton flash attention with the contract of `qwen35::decode_attention`, for any T:
    q [B, T, NH, D], caches [B, KVH, T_max, D] (q's dtype), start/lengths [B] -> [B, T, NH, D].
    Shapes are checked by the caller (`decode.py`'s `_check_shapes`)."""
    B, T, NH, D = q.shape
    KVH, Tmax = k_cache.shape[1], k_cache.shape[2]
    BM, BN, nw, ns = config or PREFILL_CONFIG
    out = torch.empty(B, T, NH, D, dtype=q.dtype, device=q.device)
    wrap_triton(_prefill_attn_fwd)[(triton.cdiv(T, BM), B * NH)](
        q, k_cache, v_cache, start, lengths, out, T, NH, Tmax, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), out.stride(2),
        G=NH // KVH, D=D, BLOCK_M=BM, BLOCK_N=BN, num_warps=nw, num_stages=ns)
    return out
