"""MoE kernels (router, the whole routing with its gate GEMM, expert-sorted grouped GEMMs in BF16 and
block-scaled FP8) beside their references."""

from .align import align_block_size
from .experts import DECODE_MAX_TOKENS, moe_experts_triton
from .ops import moe_experts, moe_experts_fp8, moe_route, moe_router
from .reference import moe_experts_fp8_reference, moe_experts_reference, moe_router_reference
from .router import (gate_logit_partials, gate_logits_triton, moe_route_triton, moe_router_triton,
                     route_from_logits_triton)

__all__ = ["align_block_size", "moe_experts_triton", "moe_router_triton", "moe_router", "moe_experts",
           "moe_route", "moe_route_triton", "gate_logits_triton", "gate_logit_partials", "route_from_logits_triton",
           "moe_experts_fp8", "moe_router_reference", "moe_experts_reference", "moe_experts_fp8_reference",
           "DECODE_MAX_TOKENS"]
