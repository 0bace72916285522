"""Decode attention in plain torch (any float dtype, math in `dtype`): the oracle for the Triton kernel.

Same contract as `qwen35::decode_attention` (model/ops.py), which is this function in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def naive_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, lengths: Tensor,
                           scale: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """q [B, T, NH, D]; caches [B, KVH, T_max, D] already holding this call's keys/values; start, lengths [B].

    Query t of row b sits at position start[b] + t and attends to cache positions j <= its own position and
    j < max(start[b] + lengths[b], 1). Query head h reads KV head h // (NH / KVH). -> [B, T, NH, D] in `dtype`.
    """
    B, T, NH, D = q.shape
    KVH, Tmax = k_cache.shape[1], k_cache.shape[2]
    G = NH // KVH
    qg = q.to(dtype).reshape(B, T, KVH, G, D).permute(0, 2, 3, 1, 4)  # [B, KVH, G, T, D]
    s = torch.einsum("bhgtd,bhjd->bhgtj", qg, k_cache.to(dtype)) * scale  # [B, KVH, G, T, Tmax]
    pos = start[:, None] + torch.arange(T, device=q.device)[None, :]  # [B, T]
    total = (start + lengths).clamp(min=1)
    j = torch.arange(Tmax, device=q.device)
    ok = (j[None, None, :] <= pos[:, :, None]) & (j[None, None, :] < total[:, None, None])  # [B, T, Tmax]
    s = s.masked_fill(~ok[:, None, None], float("-inf"))
    o = torch.einsum("bhgtj,bhjd->bhgtd", s.softmax(-1), v_cache.to(dtype))  # [B, KVH, G, T, D]
    return o.permute(0, 3, 1, 2, 4).reshape(B, T, NH, D)
