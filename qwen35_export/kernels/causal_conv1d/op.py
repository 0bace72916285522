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
