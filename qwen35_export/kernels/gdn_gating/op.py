"""`qwen35_triton::gdn_gating` and `qwen35_triton::gated_rms_norm` torch ops over the Triton kernels."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from .gating import gated_rms_norm_fwd, gdn_gating_fwd


@triton_op("qwen35_triton::gdn_gating", mutates_args=())
def gdn_gating(A_log: Tensor, a: Tensor, dt_bias: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """A_log, dt_bias [HV]; a, b [..., HV] -> (g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b)) fp32."""
    return gdn_gating_fwd(A_log, a, dt_bias, b)


@gdn_gating.register_fake
def _(A_log, a, dt_bias, b):
    return torch.empty_like(a, dtype=torch.float32), torch.empty_like(b, dtype=torch.float32)


@triton_op("qwen35_triton::gated_rms_norm", mutates_args=())
def gated_rms_norm(o: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
    """o, z [..., V]; weight [V] -> norm(o) * weight * silu(z) in o's dtype (Qwen3_5MoeRMSNormGated)."""
    return gated_rms_norm_fwd(o, z, weight, eps)


@gated_rms_norm.register_fake
def _(o, z, weight, eps):
    return torch.empty(o.shape, dtype=o.dtype, device=o.device)  # contiguous, as the kernel writes it
