"""FP8 e4m3 128×128 block quantisation, as in the shipped `-FP8` checkpoints.

A quantised Linear stores `weight` [out, in] as float8_e4m3fn and `weight_scale_inv` [ceil(out/128),
ceil(in/128)] fp32; the real weight is each block times its scale (a multiplier, despite the name).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
BLOCK = 128


def scale_shape(shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, ...]:
    """Shape of `weight_scale_inv` for a weight of `shape` ([..., out, in])."""
    *lead, o, i = shape
    return (*lead, -(-o // block), -(-i // block))


def quantize_fp8_block(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `w` [..., O, I] to e4m3 with one fp32 scale per block×block tile.

    Each tile's scale is amax/448, so the tile's largest element maps to the top of the e4m3 range;
    all-zero tiles get scale 1. Returns (weight fp8 [..., O, I], scale fp32 [..., ceil(O/b), ceil(I/b)]).
    """
    *lead, o, i = w.shape
    ob, ib = -(-o // block), -(-i // block)
    wf = w.float()
    pad = torch.zeros(*lead, ob * block, ib * block, dtype=torch.float32, device=w.device)
    pad[..., :o, :i] = wf
    tiles = pad.reshape(*lead, ob, block, ib, block)  # [..., OB, b, IB, b]
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., OB, IB]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(*lead, ob * block, ib * block)[..., :o, :i].to(FP8_DTYPE)
    return q.contiguous(), scale.contiguous()


def dequantize_fp8_block(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                         block: int = BLOCK) -> torch.Tensor:
    """Inverse of `quantize_fp8_block`: fp8 [..., O, I] × block scales → `dtype` [..., O, I]."""
    *_, o, i = w.shape
    s = scale.float().repeat_interleave(block, dim=-2)[..., :o, :].repeat_interleave(block, dim=-1)[..., :i]
    return (w.float() * s).to(dtype)
