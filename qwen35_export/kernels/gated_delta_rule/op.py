"""`qwen35_triton::gated_delta_rule`: the Triton kernels behind the signature of `qwen35::gated_delta_rule`.

Padded layout [B, T, ...]: B sequences of T tokens each (padding tokens carry g = 0, beta = 0, which
leaves the state untouched, so no lengths are needed). T <= 8 runs the recurrent kernel (decode and
speculative verification), longer T the chunked one. When T is symbolic (a dynamic prefill graph) the
chunked kernel is taken: it is exact for every T, and the branch must not put a guard on T.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.library import triton_op

from .chunk import chunk_gated_delta_rule_fwd
from .recurrent import MAX_T, fused_recurrent_gated_delta_rule_fwd


@triton_op("qwen35_triton::gated_delta_rule", mutates_args=())
def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                     h0: Tensor) -> tuple[Tensor, Tensor]:
    """q, k [B, T, HK, K]; v [B, T, HV, V]; g, beta [B, T, HV] fp32; h0 [B, HV, K, V] fp32
    -> o [B, T, HV, V] in v's dtype, ht [B, HV, K, V] fp32 (h0 is not modified)."""
    B, T, HK, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    scale = K ** -0.5
    h0 = h0.float().contiguous()
    if statically_known_true(T <= MAX_T):
        ht = torch.empty(B, HV, K, V, dtype=torch.float32, device=v.device)
        o, _ = fused_recurrent_gated_delta_rule_fwd(q, k, v, g, beta, scale, h0, ht, None, None, False)
        return o, ht
    o, ht = chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, h0, True)
    return o, ht


@gated_delta_rule.register_fake
def _(q, k, v, g, beta, h0):
    # explicit shapes-only fake: the body cannot run on fake tensors under the Triton interpreter
    return torch.empty_like(v), torch.empty_like(h0, dtype=torch.float32)
