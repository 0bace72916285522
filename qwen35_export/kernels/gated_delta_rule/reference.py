"""Naive gated delta rule: plain torch, one token at a time, any float dtype (fp64 for test oracles).

Same math as `qwen35::gated_delta_rule` (model/ops.py), extended to packed variable-length batches
(`cu_seqlens`) and to per-step states, so it is the oracle for both the chunked and recurrent kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """`x * rsqrt(sum(x^2) + eps)` over the last dim, in x's dtype (the kernels do this in fp32)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def naive_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    dtype: torch.dtype = torch.float64,
    keep_steps: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Step-by-step gated delta rule.

    q, k: [B, T, HK, K]; v: [B, T, HV, V]; g, beta: [B, T, HV]; initial_state: [N, HV, K, V] or None
    (zeros). With `cu_seqlens` ([N+1], B must be 1) the T axis holds N packed sequences; else N = B.
    Every step runs in `dtype`. Returns o [B, T, HV, V] and ht [N, HV, K, V] in `dtype`, plus, with
    `keep_steps`, the state after every token [B, T, HV, K, V].
    """
    B, T, HK, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    G = HV // HK
    scale = K ** -0.5 if scale is None else scale
    qf, kf = q.to(dtype), k.to(dtype)
    if use_qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    qf = qf.repeat_interleave(G, dim=2) * scale  # [B, T, HV, K]
    kf = kf.repeat_interleave(G, dim=2)  # [B, T, HV, K]
    vf, gf, bf = v.to(dtype), g.to(dtype), beta.to(dtype)
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        if B != 1:
            raise ValueError(f"naive_gated_delta_rule: cu_seqlens needs B == 1, got q of shape {tuple(q.shape)}")
        cu = cu_seqlens.tolist()
        spans = [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]
    N = len(spans)
    if initial_state is None:
        h0 = torch.zeros(N, HV, K, V, dtype=dtype, device=q.device)
    else:
        h0 = initial_state.to(dtype)
    o = torch.zeros(B, T, HV, V, dtype=dtype, device=q.device)
    ht = torch.empty(N, HV, K, V, dtype=dtype, device=q.device)
    steps = torch.zeros(B, T, HV, K, V, dtype=dtype, device=q.device) if keep_steps else None
    for n, (b, bos, eos) in enumerate(spans):
        h = h0[n].clone()  # [HV, K, V]
        for t in range(bos, eos):
            h = h * gf[b, t].exp()[:, None, None]
            kv_mem = torch.einsum("hkv,hk->hv", h, kf[b, t])
            delta = (vf[b, t] - kv_mem) * bf[b, t][:, None]
            h = h + kf[b, t][:, :, None] * delta[:, None, :]
            o[b, t] = torch.einsum("hkv,hk->hv", h, qf[b, t])
            if steps is not None:
                steps[b, t] = h
        ht[n] = h
    if keep_steps:
        return o, ht, steps
    return o, ht
