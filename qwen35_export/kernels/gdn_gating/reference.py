"""GDN gating and gated RMSNorm in plain torch (the formulas of transformers' Qwen3.5 MoE GDN layer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def naive_gdn_gating(A_log: Tensor, a: Tensor, dt_bias: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """A_log, dt_bias [HV]; a, b [..., HV] -> g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b),
    both fp32 (A_log goes to fp32 before exp: a bf16 exp loses the decay)."""
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, b.float().sigmoid()


def naive_gated_rms_norm(o: Tensor, z: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Qwen3_5MoeRMSNormGated: normalise o in fp32, multiply by weight in o's dtype (torch promotion),
    multiply by silu(z) in fp32, cast back to o's dtype. o, z [..., V]; weight [V]."""
    dt = o.dtype
    h = o.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = weight * h.to(dt)
    h = h * F.silu(z.float())
    return h.to(dt)
