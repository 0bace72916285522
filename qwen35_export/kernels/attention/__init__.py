"""Decode attention over the KV cache (T <= 8 query tokens, grouped KV heads): reference, Triton kernel, op."""

from .decode import decode_attention_triton
from .op import decode_attention
from .reference import naive_decode_attention

__all__ = ["decode_attention", "decode_attention_triton", "naive_decode_attention"]
