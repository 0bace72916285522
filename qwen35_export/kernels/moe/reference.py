"""Plain-torch MoE references, the oracle for the Triton kernels beside them.

Same math as `qwen35::moe_router` / `qwen35::moe_experts(_fp8)`, written as transformers' loop over
experts, in a chosen precision (fp64 by default) so the kernels' errors stand out.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ...checkpoint.fp8 import dequantize_fp8_block
from ..fp8_linear.reference import fake_quant_act


def moe_router_reference(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Softmax over all E in fp32, top-k (torch.topk), renormalise -> (weights [N,k] fp32, ids [N,k] int64)."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), ids.to(torch.int64)


def _experts_loop(x: Tensor, weights: Tensor, ids: Tensor, w13: Callable[[int], Tensor],
                  w2: Callable[[int], Tensor], dtype: torch.dtype, quant_act: bool) -> Tensor:
    """transformers' loop over the experts that received tokens; `w13(e)` / `w2(e)` give expert e's
    [2I, H] / [H, I] weights in `dtype` (so FP8 experts are dequantised one at a time)."""
    N, H = x.shape
    out = torch.zeros(N, H, dtype=dtype, device=x.device)
    for e in torch.unique(ids.reshape(-1)).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        xe = fake_quant_act(x[tok]) if quant_act else x[tok]
        w_gu = w13(e)
        I = w_gu.shape[0] // 2
        gu = xe.to(dtype) @ w_gu.T  # [n, 2I]
        h = F.silu(gu[:, :I]) * gu[:, I:]  # [n, I]
        if quant_act:
            h = fake_quant_act(h)
        y = h.to(dtype) @ w2(e).T  # [n, H]
        out.index_add_(0, tok, y * weights[tok, slot].to(dtype)[:, None])
    return out


def moe_experts_reference(x: Tensor, weights: Tensor, ids: Tensor, w_gate_up: Tensor, w_down: Tensor,
                          dtype: torch.dtype = torch.float64, quant_act: bool = False) -> Tensor:
    """`sum_j weights[:, j] * down(silu(gate(x)) * up(x))` over each token's experts `ids`, in `dtype`.

    x [N, H], weights/ids [N, k], w_gate_up [E, 2I, H] (gate rows first), w_down [E, H, I] -> [N, H] in
    `dtype`. `quant_act` rounds the expert inputs (x, and the SiLU output) through per-token,
    per-128-column e4m3 as the FP8 prefill kernels do, to check them tightly.
    """
    return _experts_loop(x, weights, ids, lambda e: w_gate_up[e].to(dtype), lambda e: w_down[e].to(dtype),
                         dtype, quant_act)


def moe_experts_fp8_reference(x: Tensor, weights: Tensor, ids: Tensor, w_gate_up: Tensor,
                              w_gate_up_scale: Tensor, w_down: Tensor, w_down_scale: Tensor,
                              dtype: torch.dtype = torch.float64, quant_act: bool = False) -> Tensor:
    """The block-scaled e4m3 experts through dequantised weights (exact in fp64: fp8 x fp32 scale)."""
    return _experts_loop(
        x, weights, ids,
        lambda e: dequantize_fp8_block(w_gate_up[e], w_gate_up_scale[e], torch.float64).to(dtype),
        lambda e: dequantize_fp8_block(w_down[e], w_down_scale[e], torch.float64).to(dtype),
        dtype, quant_act)
