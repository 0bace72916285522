"""`qwen35_triton::` MoE ops: the signatures and semantics of `qwen35::moe_router`, `qwen35::moe_route`,
`qwen35::moe_experts` and `qwen35::moe_experts_fp8` (model/ops.py), as Triton ops AOTInductor compiles into
the package.

A gated shared expert fits the same ops: append its weights as expert E and a column of ids = E with
weights sigmoid(x @ w_sg.T) (bench/moe.py does this), so the whole MoE block is one node.

The regime (decode up to DECODE_MAX_TOKENS tokens, else prefill) and the tile table entry are picked in
Python from N inside the op. torch.export keeps each op as one node with a dynamic N (tested); whether
AOTInductor, which traces the op body, then guards on N has not been checked here: if it does, export
decode and prefill graphs with N ranges on either side of DECODE_MAX_TOKENS.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from .experts import moe_experts_triton
from .router import moe_route_triton, moe_router_triton


@triton_op("qwen35_triton::moe_router", mutates_args={})
def moe_router(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    return moe_router_triton(logits, top_k)


@moe_router.register_fake
def _(logits, top_k):
    n = logits.shape[0]
    return logits.new_empty(n, top_k, dtype=torch.float32), logits.new_empty(n, top_k, dtype=torch.int64)


@triton_op("qwen35_triton::moe_route", mutates_args={})
def moe_route(x: Tensor, w_gate: Tensor, num_experts: int, top_k: int,
              real: Tensor | None) -> tuple[Tensor, Tensor]:
    return moe_route_triton(x, w_gate, num_experts, top_k, real)


@moe_route.register_fake
def _(x, w_gate, num_experts, top_k, real):
    n = x.shape[0]
    return x.new_empty(n, top_k + 1), x.new_empty(n, top_k + 1, dtype=torch.int64)


@triton_op("qwen35_triton::moe_experts", mutates_args={})
def moe_experts(x: Tensor, weights: Tensor, ids: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    return moe_experts_triton(x, weights, ids, w_gate_up, w_down)


@moe_experts.register_fake
def _(x, weights, ids, w_gate_up, w_down):
    return torch.empty_like(x)


@triton_op("qwen35_triton::moe_experts_fp8", mutates_args={})
def moe_experts_fp8(x: Tensor, weights: Tensor, ids: Tensor, w_gate_up: Tensor, w_gate_up_scale: Tensor,
                    w_down: Tensor, w_down_scale: Tensor) -> Tensor:
    return moe_experts_triton(x, weights, ids, w_gate_up, w_down, w_gate_up_scale, w_down_scale)


@moe_experts_fp8.register_fake
def _(x, weights, ids, w_gate_up, w_gate_up_scale, w_down, w_down_scale):
    return torch.empty_like(x)
