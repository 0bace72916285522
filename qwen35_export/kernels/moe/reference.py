"""Plain-torch MoE references, the oracle for the Triton kernels beside them.

Same math as `qwen35::moe_router` / `qwen35::moe_experts(_fp8)`, written as transformers' loop over
experts, in a chosen precision (fp64 by default) so the kernels' errors stand out.
"""

from __future__ import annotations

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


def moe_experts_reference(x: Tensor, weights: Tensor, ids: Tensor, w_gate_up: Tensor, w_down: Tensor,
                          dtype: torch.dtype = torch.float64, quant_act: bool = False) -> Tensor:
    """`sum_j weights[:, j] * down(silu(gate(x)) * up(x))` over each token's experts `ids`, in `dtype`.

    x [N, H], weights/ids [N, k], w_gate_up [E, 2I, H] (gate rows first), w_down [E, H, I] -> [N, H] in
    `dtype`. `quant_act` rounds the expert inputs (x, and the SiLU output) through per-token,
    per-128-column e4m3 as the FP8 prefill kernels do, to check them tightly.
    """
    N, H = x.shape
    I = w_down.shape[2]
    out = torch.zeros(N, H, dtype=dtype, device=x.device)
    for e in torch.unique(ids.reshape(-1)).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        xe = fake_quant_act(x[tok]) if quant_act else x[tok]
        gu = xe.to(dtype) @ w_gate_up[e].to(dtype).T  # [n, 2I]
        h = F.silu(gu[:, :I]) * gu[:, I:]  # [n, I]
        if quant_act:
            h = fake_quant_act(h)
        y = h.to(dtype) @ w_down[e].to(dtype).T  # [n, H]
        out.index_add_(0, tok, y * weights[tok, slot].to(dtype)[:, None])
    return out


def moe_experts_fp8_reference(x: Tensor, weights: Tensor, ids: Tensor, w_gate_up: Tensor,
                              w_gate_up_scale: Tensor, w_down: Tensor, w_down_scale: Tensor,
                              dtype: torch.dtype = torch.float64, quant_act: bool = False) -> Tensor:
    """The block-scaled e4m3 experts through dequantised weights (exact: fp8 x fp32 scale fits fp64)."""
    used = torch.unique(ids.reshape(-1))
    w13 = torch.zeros(w_gate_up.shape, dtype=dtype, device=x.device)  # [E, 2I, H]
    w2 = torch.zeros(w_down.shape, dtype=dtype, device=x.device)  # [E, H, I]
    w13[used] = dequantize_fp8_block(w_gate_up[used], w_gate_up_scale[used], torch.float64).to(dtype)
    w2[used] = dequantize_fp8_block(w_down[used], w_down_scale[used], torch.float64).to(dtype)
    return moe_experts_reference(x, weights, ids, w13, w2, dtype=dtype, quant_act=quant_act)
