"""Sort token slots by expert into BLOCK_M-padded tiles (vLLM's `moe_align_block_size`).

Static shapes only (no `.item()`, no data-dependent sizes), so it traces under torch.export and captures
in CUDA graphs: the tile map is sized for the worst case and tiles past `num_padded` are skipped by the
GEMM kernels. A slot is `token * k + j`, the j-th expert of a token; padding slots hold `M = N * k`.
Up to `SMALL_M` slots (decode) one Triton program does it all in one launch (launches dominate there);
beyond, three Triton kernels or a dozen torch ops (LARGE_TRITON below). All give identical maps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

SMALL_M = 4096


@triton.jit
def _store_tile_map(pad_end, padded, tile_expert_ptr, num_padded_ptr, E, num_tiles,
                    TILE: tl.constexpr, BLOCK_T: tl.constexpr):
    """Each tile's expert (the number of experts whose padded rows end at or before the tile's start; E past
    the used tiles) and the padded total."""
    for t0 in range(0, num_tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        before = tl.sum((pad_end[None, :] <= (t * TILE)[:, None]).to(tl.int32), axis=1)  # [BLOCK_T]
        tl.store(tile_expert_ptr + t, tl.minimum(before, E), mask=t < num_tiles)
    tl.store(num_padded_ptr, tl.sum(padded, 0))


@triton.jit
def _align_body(ids_ptr, slots_ptr, tile_expert_ptr, num_padded_ptr, M, E, P, num_tiles,
                TILE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
                FILL: tl.constexpr):
    """The tile map of M <= BLOCK slots (see align_block_size)."""
    offs = tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + offs, mask=offs < M, other=E).to(tl.int32)  # padding lands in spare bin E
    eo = tl.arange(0, BLOCK_E)
    counts = tl.where(eo < E, tl.histogram(e, BLOCK_E), 0)
    padded = (counts + TILE - 1) // TILE * TILE
    pad_end = tl.cumsum(padded, 0)
    shift = pad_end - padded - (tl.cumsum(counts, 0) - counts)  # padded start - sorted start, per expert
    key = tl.sort(e * BLOCK + offs)  # expert-major, slot order inside an expert (stable)
    se = key // BLOCK
    pos = tl.gather(shift, tl.minimum(se, BLOCK_E - 1), 0) + offs  # offs is now the sorted index
    o_f = tl.arange(0, FILL)
    for p0 in range(0, P, FILL):
        tl.store(slots_ptr + p0 + o_f, M, mask=p0 + o_f < P)
    tl.debug_barrier()  # one CTA: the padding fill above lands before the real slots below
    tl.store(slots_ptr + pos, key % BLOCK, mask=se < E)
    _store_tile_map(pad_end, padded, tile_expert_ptr, num_padded_ptr, E, num_tiles, TILE, BLOCK_T)


@triton.jit
def _align_kernel(ids_ptr, slots_ptr, tile_expert_ptr, num_padded_ptr, M, E, P, num_tiles,
                  TILE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_SMALL: tl.constexpr):
    """One program. BLOCK is sized for the largest M the graph admits; a run with M <= BLOCK_SMALL sorts
    BLOCK_SMALL keys instead (a batch-1 step of a graph built for batch 64 sorted 1024 keys: ~5 us)."""
    if M <= BLOCK_SMALL:
        _align_body(ids_ptr, slots_ptr, tile_expert_ptr, num_padded_ptr, M, E, P, num_tiles,
                    TILE, BLOCK_SMALL, BLOCK_E, BLOCK_T, BLOCK)
    else:
        _align_body(ids_ptr, slots_ptr, tile_expert_ptr, num_padded_ptr, M, E, P, num_tiles,
                    TILE, BLOCK, BLOCK_E, BLOCK_T, BLOCK)


# slots sorted by the small branch of _align_kernel (a few tokens of top-10 + shared)
ALIGN_SMALL_BLOCK = 64


@triton.jit
def _align_hist_kernel(ids_ptr, hist_ptr, slots_ptr, M, E, P, fill_per_block,
                       BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Block b of BLOCK slots: its per-expert counts -> hist[b, :]; and its share of the padding fill."""
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + offs, mask=offs < M, other=E).to(tl.int32)
    tl.store(hist_ptr + b * BLOCK_E + tl.arange(0, BLOCK_E), tl.histogram(e, BLOCK_E))
    for p0 in range(b * fill_per_block, tl.minimum((b + 1) * fill_per_block, P), BLOCK):
        o = p0 + tl.arange(0, BLOCK)
        tl.store(slots_ptr + o, M, mask=(o < P) & (o < (b + 1) * fill_per_block))


@triton.jit
def _align_scan_kernel(hist_ptr, pad_start_ptr, tile_expert_ptr, num_padded_ptr, E, n_blocks, num_tiles,
                       TILE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    """One program: hist[b] becomes the count of each expert's slots in blocks before b (in place); then the
    padded expert starts (pad_start[:BLOCK_E]; their ends after them), the tile map and the padded total, as
    `_align_body` computes them."""
    eo = tl.arange(0, BLOCK_E)
    acc = tl.zeros([BLOCK_E], tl.int32)
    for b in range(0, n_blocks):
        h = tl.load(hist_ptr + b * BLOCK_E + eo)
        tl.store(hist_ptr + b * BLOCK_E + eo, acc)
        acc += h
    counts = tl.where(eo < E, acc, 0)
    padded = (counts + TILE - 1) // TILE * TILE
    pad_end = tl.cumsum(padded, 0)
    tl.store(pad_start_ptr + eo, pad_end - padded)
    # The tile map reads pad_end back from memory. Computed in registers, with few experts (BLOCK_E 16 over
    # 8 warps: every value held by many threads) the compiled tile map took wrong ends for some tiles while
    # the stored starts were right (H200, triton 3.6: test_align_tile_map[65-8-2-16]; 257+ experts were not
    # affected). One copy in memory, read after a barrier, is the same for every thread.
    tl.store(pad_start_ptr + BLOCK_E + eo, pad_end)
    tl.debug_barrier()
    pad_end = tl.load(pad_start_ptr + BLOCK_E + eo)
    padded = pad_end - tl.load(pad_start_ptr + eo)
    _store_tile_map(pad_end, padded, tile_expert_ptr, num_padded_ptr, E, num_tiles, TILE, BLOCK_T)


@triton.jit
def _align_scatter_kernel(ids_ptr, hist_ptr, pad_start_ptr, slots_ptr, M, E,
                          BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Block b: each slot's place = its expert's padded start + that expert's slots in earlier blocks + its
    rank among them in this block (slot order: the torch path's stable sort)."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + b * BLOCK + offs, mask=b * BLOCK + offs < M, other=E).to(tl.int32)
    h = tl.histogram(e, BLOCK_E)
    first = tl.cumsum(h, 0) - h  # [BLOCK_E] first sorted index of each expert inside this block
    key = tl.sort(e * BLOCK + offs)
    se = key // BLOCK
    sec = tl.minimum(se, BLOCK_E - 1)
    eo = tl.arange(0, BLOCK_E)
    base = tl.gather(tl.load(pad_start_ptr + eo) + tl.load(hist_ptr + b * BLOCK_E + eo), sec, 0)
    pos = base + offs - tl.gather(first, sec, 0)
    tl.store(slots_ptr + pos, b * BLOCK + key % BLOCK, mask=se < E)


# Past SMALL_M slots (every prefill graph): the torch ops (scatter_add, sort, searchsorted) or the three
# kernels above (histogram per block, one scan, scatter; the same map bit for bit). H200, CUDA graphs
# (bench/results/align_h200/): with 257 experts (35B-A3B) the kernels are 4.0x / 3.3x / 1.7x / 1.1x faster at
# 512 / 2K / 8K / 16K tokens (27 vs 110 us at 512); with 513 (397B) 2.0x / 1.5x up to 2K tokens but 0.82x /
# 0.53x at 8K / 16K, where the one-program scan over blocks x expert bins dominates. At 257 experts the
# kernels' time grows ~6.5 us per 1K tokens against ~2.4 for the torch ops, so they would lose from ~20K
# tokens in one call (~1% of such a layer's prefill) against ~80 us per layer won at 512 tokens; the
# token count is symbolic in a prefill graph, so the choice cannot follow it without a guard.
# LARGE_TRITON: None picks the kernels for E <= LARGE_TRITON_MAX_E (E is static in a graph: no guard),
# True / False force one path.
LARGE_TRITON: bool | None = None
LARGE_TRITON_MAX_E = 320
LARGE_BLOCK = 1024  # slots per program of the large-M kernels


def upper_bound(n: int | torch.SymInt) -> int | None:
    """The largest value `n` can take: itself when concrete, else the upper end of its symbolic range
    (None when unbounded). Reads the range without adding a guard."""
    if isinstance(n, int):
        return n
    try:
        return int(n.node.shape_env.bound_sympy(n.node.expr).upper)
    except (AttributeError, TypeError, ValueError, OverflowError):  # unbounded (int_oo) or no shape env
        return None


def max_padded(M: int | torch.SymInt, E: int, block_m: int) -> int | torch.SymInt:
    """Worst-case padded length: each non-empty expert (at most min(E, M)) wastes < block_m rows.

    `torch.sym_min`, not `min`: on a symbolic M, Python's min compares and guards, so the example's branch
    was baked in. Captured with 54 example slots (< E = 257), a 35B-A3B prefill graph sized its tile grid
    128 * M instead of M + 127 * E: 1.2 M mostly idle programs per MoE GEMM at 8192 tokens, 2.8 ms per layer
    of `_down_kernel` against 0.48 ms (H200, bench/results/perf_h200.md)."""
    return M + torch.sym_min(E, M) * (block_m - 1)


def align_block_size(ids: Tensor, E: int, block_m: int, m_max: int | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """`ids` [N, k] -> (sorted_slots [P] int32, tile_expert [P / block_m] int32, num_padded [1] int32).

    Rows `tile * block_m ...` of `sorted_slots` all belong to expert `tile_expert[tile]`; tiles at or past
    `num_padded / block_m` are unused (their expert is E). P = `max_padded` rounded up to block_m.
    `m_max`: the most slots the kernel is sized for (default: the largest M the graph admits; tests pass
    a larger one to run a small M through a kernel built for many).
    """
    flat = ids.reshape(-1)  # [M]
    M = flat.numel()
    dev = ids.device
    P = -(-max_padded(M, E, block_m) // block_m) * block_m
    # M is symbolic under export: take the one-program path only when every admitted M fits it, sized for
    # the largest (a block sized from the example M would drop slots at run time).
    if m_max is None:
        m_max = upper_bound(M)
    small = (0 < M <= SMALL_M) if isinstance(M, int) else (m_max is not None and m_max <= SMALL_M)
    if small:
        slots = torch.empty(P, dtype=torch.int32, device=dev)
        tile_expert = torch.empty(P // block_m, dtype=torch.int32, device=dev)
        num_padded = torch.empty(1, dtype=torch.int32, device=dev)
        block_e = triton.next_power_of_2(E + 1)
        block = triton.next_power_of_2(m_max)
        wrap_triton(_align_kernel)[(1,)](flat, slots, tile_expert, num_padded, M, E, P, P // block_m,
                                         TILE=block_m, BLOCK=block, BLOCK_E=block_e,
                                         BLOCK_T=max(1, 8192 // block_e),
                                         BLOCK_SMALL=min(block, ALIGN_SMALL_BLOCK), num_warps=8)
        return slots, tile_expert, num_padded
    if LARGE_TRITON or (LARGE_TRITON is None and E <= LARGE_TRITON_MAX_E):
        return _align_large(flat, E, block_m, P)
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


def _align_large(flat: Tensor, E: int, block_m: int, P: int | torch.SymInt) -> tuple[Tensor, Tensor, Tensor]:
    """The tile map of any number of slots in three launches (see LARGE_TRITON)."""
    M = flat.numel()
    dev = flat.device
    block, block_e = LARGE_BLOCK, triton.next_power_of_2(E + 1)
    n_blocks = -(-M // block)
    hist = torch.empty(n_blocks, block_e, dtype=torch.int32, device=dev)  # [blocks, experts (+ padding bins)]
    pad_start = torch.empty(2 * block_e, dtype=torch.int32, device=dev)  # each expert's padded start, then end
    slots = torch.empty(P, dtype=torch.int32, device=dev)
    tile_expert = torch.empty(P // block_m, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    fill = -(-P // n_blocks)
    wrap_triton(_align_hist_kernel)[(n_blocks,)](flat, hist, slots, M, E, P, fill, BLOCK=block, BLOCK_E=block_e,
                                                 num_warps=8)
    wrap_triton(_align_scan_kernel)[(1,)](hist, pad_start, tile_expert, num_padded, E, n_blocks, P // block_m,
                                          TILE=block_m, BLOCK_E=block_e, BLOCK_T=max(1, 8192 // block_e),
                                          num_warps=8)
    wrap_triton(_align_scatter_kernel)[(n_blocks,)](flat, hist, pad_start, slots, M, E, BLOCK=block,
                                                    BLOCK_E=block_e, num_warps=8)
    return slots, tile_expert, num_padded
