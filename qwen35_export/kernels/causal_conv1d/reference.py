"""Causal depthwise conv1d + SiLU, plain torch, any float dtype: the oracle for the Triton kernels.

Extends `qwen35::causal_conv1d` (model/ops.py) to packed variable-length batches (`cu_seqlens`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def naive_causal_conv1d(
    x: Tensor,
    weight: Tensor,
    conv_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    lengths: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """x [B, T, C]; weight [C, W]; conv_state [N, C, W-1] (None: zeros) -> y [B, T, C], final [N, C, W-1].

    With cu_seqlens ([N+1], B == 1) T holds N packed sequences; else N = B and `lengths` [B] (default T)
    says how many leading tokens of each row feed the final state. Math in `dtype`, results too.
    """
    B, T, C = x.shape
    W = weight.shape[1]
    if cu_seqlens is None:
        spans = [(b, 0, T, T if lengths is None else int(lengths[b])) for b in range(B)]
    else:
        cu = cu_seqlens.tolist()
        spans = [(0, cu[n], cu[n + 1], cu[n + 1] - cu[n]) for n in range(len(cu) - 1)]
    N = len(spans)
    w = weight.to(dtype)
    st = torch.zeros(N, C, W - 1, dtype=dtype, device=x.device) if conv_state is None else conv_state.to(dtype)
    y = torch.zeros(B, T, C, dtype=dtype, device=x.device)
    final = torch.empty(N, C, W - 1, dtype=dtype, device=x.device)
    for n, (b, bos, eos, L) in enumerate(spans):
        xx = torch.cat([st[n].T, x[b, bos:eos].to(dtype)], dim=0)  # [W-1+Tn, C]
        Tn = eos - bos
        y[b, bos:eos] = F.silu(sum(xx[j:j + Tn] * w[:, j] for j in range(W)))
        final[n] = xx[L:L + W - 1].T
    return y, final


def naive_causal_conv1d_update(x: Tensor, weight: Tensor, conv_state: Tensor,
                               dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """One decode step per row: x [B, C], conv_state [B, C, W-1] -> y [B, C], new state [B, C, W-1]."""
    y, final = naive_causal_conv1d(x[:, None], weight, conv_state, dtype=dtype)
    return y[:, 0], final
