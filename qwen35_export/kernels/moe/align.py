"""Sort token slots by expert into BLOCK_M-padded tiles (vLLM's `moe_align_block_size`), in torch ops.

Static shapes only (no `.item()`, no data-dependent sizes), so it traces under torch.export and captures
in CUDA graphs: the tile map is sized for the worst case and tiles past `num_padded` are skipped by the
GEMM kernels. A slot is `token * k + j`, the j-th expert of a token; padding slots hold `M = N * k`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def max_padded(M: int, E: int, block_m: int) -> int:
    """Worst-case padded length: each non-empty expert (at most min(E, M)) wastes < block_m rows."""
    return M + min(E, M) * (block_m - 1)


def align_block_size(ids: Tensor, E: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """`ids` [N, k] -> (sorted_slots [P] int32, tile_expert [P / block_m] int32, num_padded [1] int32).

    Rows `tile * block_m ...` of `sorted_slots` all belong to expert `tile_expert[tile]`; tiles at or past
    `num_padded / block_m` are unused (their expert is E). P = `max_padded` rounded up to block_m.
    """
    flat = ids.reshape(-1)  # [M]
    M = flat.numel()
    dev = ids.device
    P = -(-max_padded(M, E, block_m) // block_m) * block_m
    counts = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)  # [E]
    start = torch.cumsum(counts, 0) - counts  # [E] first sorted index of each expert
    order = torch.sort(flat, stable=True).indices  # [M] slots grouped by expert, in slot order
    e_sorted = flat[order]
    pos = (pad_end - padded)[e_sorted] + torch.arange(M, device=dev) - start[e_sorted]  # [M]
    sorted_slots = torch.full((P,), M, dtype=torch.int32, device=dev)
    sorted_slots.scatter_(0, pos, order.to(torch.int32))
    tile_start = torch.arange(0, P, block_m, device=dev)  # [P / block_m]
    tile_expert = torch.searchsorted(pad_end, tile_start, right=True).to(torch.int32)  # E past the end
    return sorted_slots, tile_expert, pad_end[-1:].to(torch.int32)
