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


@triton_op("qwen35_triton::gated_delta_rule_", mutates_args=("state",))
def gated_delta_rule_(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor) -> Tensor:
    """In-place decode form of `gated_delta_rule` (T <= MAX_T): `state` [B, HV, K, V] fp32 contiguous is
    read and overwritten with the final state; returns o [B, T, HV, V]. graph/reinplace_state.py puts it
    where a decode graph copied the functional op's new state back into its state input: the copy was a
    second pass over the state (as many bytes again as the recurrence's own read and write)."""
    B, T, HK, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if not statically_known_true(T <= MAX_T):
        raise ValueError(f"qwen35_triton::gated_delta_rule_: T={T} tokens per row; the in-place form is the "
                         f"recurrent (decode) path, T <= {MAX_T}")
    # the batch dims are not compared: in a decode graph that would put a guard on the symbolic batch
    if state.dtype != torch.float32 or not state.is_contiguous() or tuple(state.shape[1:]) != (HV, K, V):
        raise ValueError(f"qwen35_triton::gated_delta_rule_: state {tuple(state.shape)} {state.dtype} "
                         f"(contiguous: {state.is_contiguous()}); expected contiguous [B, {HV}, {K}, {V}] "
                         f"float32")
    torch._check(state.shape[0] == B, lambda: f"qwen35_triton::gated_delta_rule_: state has {state.shape[0]} "
                 f"rows for a batch of {B}")
    # h0 and ht the same tensor: each program loads its state tile before its first step and stores it after
    # its last, and no two programs share a tile
    o, _ = fused_recurrent_gated_delta_rule_fwd(q, k, v, g, beta, K ** -0.5, state, state, None, None, False)
    return o


@gated_delta_rule_.register_fake
def _(q, k, v, g, beta, state):
    return torch.empty_like(v)
