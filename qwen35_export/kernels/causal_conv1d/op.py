"""`qwen35_triton::causal_conv1d`: the Triton kernels behind the signature of `qwen35::causal_conv1d`."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from .conv import causal_conv1d_fwd, causal_conv1d_update


@triton_op("qwen35_triton::causal_conv1d", mutates_args=())
def causal_conv1d(x: Tensor, weight: Tensor, conv_state: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """x [B, T, C], weight [C, W], conv_state [B, C, W-1], lengths [B] int64 -> (y = silu(conv) [B, T, C],
    final state [B, C, W-1]: the last W-1 inputs of each row's first lengths[b] tokens, state included).
    x may have any batch and time strides with channels contiguous (in the model it is a column slice of a
    fused projection output): both kernels read it in place, a copy would cost a pass over x per layer.

    T that is the int 1 (the decode graph; eager T = 1) takes the one-step update kernel, which reads
    conv_state and writes the fresh final state (the op is functional: conv_state is never written). A
    symbolic T (the prefill graph) takes the prefill kernel without a guard on T: comparing a SymInt
    with 1 would bake the example's choice into the graph.
    """
    T = x.shape[1]
    final = torch.empty_like(conv_state, memory_format=torch.contiguous_format)
    conv_state = conv_state.contiguous()  # no copy for the contiguous state the graphs pass
    if type(T) is int and T == 1:
        y = causal_conv1d_update(x, weight, conv_state, final_state=final, lengths=lengths)
    else:
        y = causal_conv1d_fwd(x, weight, conv_state, final, lengths=lengths)
    return y, final


@causal_conv1d.register_fake
def _(x, weight, conv_state, lengths):
    # explicit shapes-only fake: the body cannot run on fake tensors under the Triton interpreter
    return torch.empty_like(x), torch.empty_like(conv_state)


@triton_op("qwen35_triton::causal_conv1d_", mutates_args=("conv_state",))
def causal_conv1d_(x: Tensor, weight: Tensor, conv_state: Tensor, lengths: Tensor) -> Tensor:
    """In-place decode form of `causal_conv1d` (T = 1): `conv_state` [B, C, W-1] contiguous is read and
    overwritten with the final state; returns y [B, 1, C]. graph/reinplace_state.py puts it where a decode
    graph copied the functional op's new state back into its state input (a copy kernel per GDN layer)."""
    T = x.shape[1]
    if not (type(T) is int and T == 1):
        raise ValueError(f"qwen35_triton::causal_conv1d_: T={T}; the in-place form is the one-step update (T = 1)")
    if not conv_state.is_contiguous():
        raise ValueError(f"qwen35_triton::causal_conv1d_: conv_state {tuple(conv_state.shape)} must be contiguous")
    # in place: each program loads its [BC, W-1] state tile before it stores it, and no two programs share one
    return causal_conv1d_update(x, weight, conv_state, lengths=lengths)


@causal_conv1d_.register_fake
def _(x, weight, conv_state, lengths):
    return torch.empty_like(x)
