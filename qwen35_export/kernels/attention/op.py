"""`qwen35_triton::decode_attention`: the Triton kernel behind the signature of `qwen35::decode_attention`."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from .decode import decode_attention_triton


@triton_op("qwen35_triton::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, lengths: Tensor,
                     scale: float) -> Tensor:
    """q [B, T, NH, D], caches [B, KVH, T_max, D], start/lengths [B] int64 -> [B, T, NH, D] in q's dtype."""
    return decode_attention_triton(q, k_cache, v_cache, start, lengths, scale)


@decode_attention.register_fake
def _(q, k_cache, v_cache, start, lengths, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
