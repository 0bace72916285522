"""Fused MoE router: logits -> fp32 softmax over all E -> top-k -> renormalise, one program per token.

Top-k is k rounds of argmax over the E probabilities held in registers; among equal probabilities the
lowest expert index wins (`tie_break_left`). With ties across the top-k boundary that picks the same set
as torch.topk on CUDA (tested on H100); torch.topk on CPU picks among boundary ties in no fixed order,
so there only the chosen values are comparable. Order within a tie may differ from torch.topk's; the
experts op does not depend on slot order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton


@triton.jit
def _router_kernel(logits_ptr, w_ptr, ids_ptr, E, stride_l, TOP_K: tl.constexpr,
                   BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    ok = offs < E
    x = tl.load(logits_ptr + row * stride_l + offs, mask=ok, other=-float("inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = tl.where(ok, p, 0.0)
    p = p / tl.sum(p, axis=0)
    # Probabilities are >= 0: -1 marks padding, -2 an expert already taken; neither can win again.
    work = tl.where(ok, p, -1.0)
    offs_k = tl.arange(0, BLOCK_K)
    vals = tl.zeros((BLOCK_K,), dtype=tl.float32)
    idxs = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        v, i = tl.max(work, axis=0, return_indices=True, return_indices_tie_break_left=True)
        vals = tl.where(offs_k == j, v, vals)
        idxs = tl.where(offs_k == j, i, idxs)
        work = tl.where(offs == i, -2.0, work)
    vals = vals / tl.sum(vals, axis=0)
    k_ok = offs_k < TOP_K
    tl.store(w_ptr + row * TOP_K + offs_k, vals, mask=k_ok)
    tl.store(ids_ptr + row * TOP_K + offs_k, idxs.to(tl.int64), mask=k_ok)


def moe_router_triton(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """`logits` [N, E] -> (weights [N, k] fp32 summing to 1 per row, ids [N, k] int64), best first."""
    N, E = logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"moe_router: top_k must be in [1, E={E}], got {top_k}")
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    w = torch.empty(N, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(N, top_k, dtype=torch.int64, device=logits.device)
    if N == 0:
        return w, ids
    block_e = triton.next_power_of_2(E)
    wrap_triton(_router_kernel)[(N,)](logits, w, ids, E, logits.stride(0), TOP_K=top_k, BLOCK_E=block_e,
                                     BLOCK_K=triton.next_power_of_2(top_k),
                                     num_warps=4 if block_e >= 512 else 1)
    return w, ids
