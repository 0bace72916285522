"""Plain-torch references for the FP8 kernels: the op contract (dequantised weights, unquantised
activations) and a simulation of the kernels' dynamic activation quantisation for tight checks."""

from __future__ import annotations

import torch
from torch import Tensor

from ...checkpoint.fp8 import FP8_DTYPE, FP8_MAX, dequantize_fp8_block

GROUP = 128


def quantize_act_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row, per-128-column e4m3 quantisation of `x` [R, K] -> (q fp8 [R, K], s fp32 [R, ceil(K/128)])."""
    R, K = x.shape
    G = -(-K // GROUP)
    pad = torch.zeros(R, G * GROUP, dtype=torch.float32, device=x.device)
    pad[:, :K] = x.float()
    groups = pad.reshape(R, G, GROUP)  # [R, G, 128]
    amax = groups.abs().amax(dim=-1)  # [R, G]
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (groups / s[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(R, G * GROUP)[:, :K].contiguous(), s


def fake_quant_act(x: Tensor) -> Tensor:
    """`x` [R, K] after an e4m3 round trip with per-row, per-128-column scales, in fp64."""
    q, s = quantize_act_reference(x)
    return (q.double() * s.double().repeat_interleave(GROUP, dim=-1)[:, :x.shape[1]])


def fp8_linear_reference(x: Tensor, w: Tensor, w_scale: Tensor, quant_act: bool = False,
                         dtype: torch.dtype = torch.float64) -> Tensor:
    """`x [..., in] @ dequant(w, w_scale).T` in `dtype`; `quant_act` quantises `x` first as the kernel does."""
    x2 = x.reshape(-1, x.shape[-1])  # [R, in]
    xa = fake_quant_act(x2) if quant_act else x2
    wd = dequantize_fp8_block(w, w_scale, torch.float64)
    y = xa.to(dtype) @ wd.to(dtype).T  # [R, out]
    return y.reshape(*x.shape[:-1], w.shape[0])
