"""Attention over the KV cache, grouped KV heads: reference, split-KV decode kernel (T <= 8), flash prefill
kernel (any T), and the op that picks between them."""

from .decode import decode_attention_triton
from .op import decode_attention
from .prefill import prefill_attention_triton
from .reference import naive_decode_attention

__all__ = ["decode_attention", "decode_attention_triton", "naive_decode_attention", "prefill_attention_triton"]
