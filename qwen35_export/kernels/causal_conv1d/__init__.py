"""Causal depthwise conv1d + SiLU: reference, varlen prefill and decode-update kernels, torch op."""

from .conv import causal_conv1d_fwd, causal_conv1d_update, causal_conv1d_varlen
from .op import causal_conv1d
from .reference import naive_causal_conv1d, naive_causal_conv1d_update

__all__ = ["causal_conv1d", "causal_conv1d_fwd", "causal_conv1d_update", "causal_conv1d_varlen",
           "naive_causal_conv1d", "naive_causal_conv1d_update"]
