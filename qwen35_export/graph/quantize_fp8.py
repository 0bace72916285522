"""FP8 weights for a layer, before capture: the graph then holds `qwen35::fp8_linear` / `moe_experts_fp8`
nodes with the FP8 weights and their block scales as inputs.

This pass works on the layer's weight dict rather than on the FX graph because the weights are graph
inputs: quantising them changes the graph's signature, which the capture then records as it should.
A shipped FP8 checkpoint's weights and scales pass through untouched (no re-quantisation); BF16 weights
on the spec's FP8 list are quantised to 128x128-block e4m3; the keep-in-BF16 list stays as it is.
Activations are quantised per token and 128-column group at run time by the FP8 kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checkpoint.fp8 import FP8_DTYPE, dequantize_fp8_block, quantize_fp8_block
from ..model.weights import is_fp8_quantized, scale_name


def quantize_layer_fp8(w: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """Return (weights with every FP8-list weight block-quantised, number of weights quantised here)."""
    out = dict(w)
    n = 0
    for name, t in w.items():
        if not is_fp8_quantized(name) or scale_name(name) in w or t.dtype == FP8_DTYPE:
            continue
        if name.startswith("mlp.experts.gate_up_proj"):
            # Quantise gate and up halves separately, as per-expert FP8 files do, so scales never mix them.
            half = t.shape[1] // 2
            (qg, sg), (qu, su) = quantize_fp8_block(t[:, :half]), quantize_fp8_block(t[:, half:])
            out[name], out[scale_name(name)] = torch.cat([qg, qu], 1), torch.cat([sg, su], 1)
        else:
            out[name], out[scale_name(name)] = quantize_fp8_block(t)
        n += 1
    return out, n


def dequantize_all(w: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Inverse, for a BF16/FP32 engine built from an FP8 checkpoint: dequantise and drop the scales."""
    out = {}
    for name, t in w.items():
        if name.endswith("_scale_inv"):
            continue
        s = w.get(scale_name(name))
        out[name] = dequantize_fp8_block(t, s, dtype) if s is not None else t
    return out
