"""Gated delta rule: naive reference, chunked prefill (varlen), recurrent decode (slot pool), torch op."""

from .chunk import chunk_gated_delta_rule, prepare_chunk_indices
from .op import gated_delta_rule
from .recurrent import fused_recurrent_gated_delta_rule
from .reference import naive_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "gated_delta_rule",
           "naive_gated_delta_rule", "prepare_chunk_indices"]
