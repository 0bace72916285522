"""Tile configs for the MoE kernels: tuned tables stored as data, looked up, never searched at run time.

A table lives in `configs/E={E},N={I},device={H100|H200},dtype={bf16|fp8}.json` (vLLM's naming; N is the
expert intermediate size I) and maps a token count to one config:
`{"BLOCK_M": 16, "gate_up": {BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages}, "down": {...}}`; FP8 decode
entries may add `"SWAP": 1` (experts.py's swapped-operand kernels; then `HW_CVT`, and gate_up's `QX`, `OUT_FP8`,
`SPLIT_K`).
The entry whose token count is nearest the call's is used; an H200 without its own table uses the H100's and
the other way round (same SM); without a table, `default_config`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).with_name("configs")
DECODE_MAX_TOKENS = 64  # up to this many tokens a call is memory bound: the decode regime
# Up to this many tokens (known statically) decode skips align_block_size: PAIRS mode in experts.py. Same
# live tiles and weight reads as the align path, one launch fewer; past it the ids block per program grows.
# H200, 397B layer (bench/results/moe_pairs_h200.md): T = 1 pairs 84.3 / 66.4 us vs align 91.5 / 73.0 (BF16 /
# FP8); T = 8 pairs 503.5 / 364.1 vs 483.5 / 356.0 (the rank match per program costs more than the launch);
# T = 64 far slower. So one token only: a decode graph with a dynamic batch (max >= 2) never proves N <= 1 and
# keeps the align path; eager and static single-row calls take pairs.
PAIRS_MAX_TOKENS = 1
# A GPU without its own table takes the table of one with the same SM (the H200 is an sm_90 H100 with
# faster, larger HBM: its tiles compile and run the same, tuned there rather than not at all). 397B tables
# were tuned on an H100, the 35B-A3B ones (E 256/257, I 512) on an H200 (bench/results/moe_35b_h200/); the FP8
# decode entries of both (swapped-operand kernels) on an H200 (bench/results/fp8_swap_h200/), untimed on an H100.
# An engine's dynamic decode graph serves batches 2..max with the entry nearest DECODE_MAX_TOKENS (64); its
# batch-1 graph (exporter/capture.py DECODE1) takes entry 1. So the 35B FP8 table of single-rank builds (E 257:
# the shared expert folded in, graph/fuse_weights.py; they have batch-1 graphs by default) keeps 64-column
# swapped gate_up tiles at 1 (128-column ones took gate_up from 15.7 to 24.0 us per layer at batch 1 in the
# engine) and takes the 128-column ones (h out in e4m3; down 64 columns at 8, 128 at 64) at 8 and 64, the H200
# sweep's best there (65.4 vs 81.1 us at T = 8, 213.8 vs 232.3 at 64; engine decode 7.8% / 6.6% faster at
# batch 8 / 64: bench/results/fp8_swap_h200/README.md, call 3). The E 256 table (sharded builds, which have no
# batch-1 graph, and eager calls) keeps 64-column tiles at every decode entry, good at batch 1 too.
# FP8 prefill down entries (E 513 at 4096 / 16384, E 257 at 4096) take 4-warp 128-column tiles since the
# twelfth session's H200 sweep (bench/results/moe_prefill_sweep_h200/: 397B 16384 tokens 3610 -> 3465 us,
# 4096 1278 -> 1229, 35B 8192 508 -> 456; outputs bit-identical); the E 513 table's other entries stay H100-tuned.
SAME_SM_TABLES = {"H200": "H100", "H100": "H200"}


def device_tag(device: torch.device) -> str:
    """'H100' / 'H200' for those GPUs (the name's model number), the full name otherwise, 'cpu' off GPU."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    for tag in ("H200", "H100"):
        if tag in name:
            return tag
    return name.replace(" ", "_")


def config_file(E: int, I: int, device: str, dtype: str) -> Path:
    return CONFIG_DIR / f"E={E},N={I},device={device},dtype={dtype}.json"


@functools.lru_cache(maxsize=None)
def load_table(E: int, I: int, device: str, dtype: str) -> dict[int, dict] | None:
    """The stored table for this key, with integer token-count keys, or None."""
    path = config_file(E, I, device, dtype)
    if not path.exists():
        return None
    return {int(t): c for t, c in json.loads(path.read_text()).items()}


def default_config(N: int, E: int, k: int, dtype: str, decode: bool) -> dict:
    """Untuned fallback. BLOCK_M follows the mean tokens per expert (N*k/E) so tiles are not mostly padding;
    decode streams thin tiles of many weight columns, prefill uses tensor-core sized tiles."""
    mean = N * k / E
    bm = 16 if mean <= 16 else 32 if mean <= 32 else 64 if mean <= 96 else 128
    fp8 = dtype == "fp8"
    if decode:
        tile = dict(BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
        return {"BLOCK_M": 16, "gate_up": dict(tile), "down": dict(tile)}
    if fp8:
        # BLOCK_M 128 with two 128-wide fp32 accumulators plus the per-K-step scaled partial spills
        # registers: 2-3x slower on H100 (bench/results/moe_notes.md).
        bm = min(bm, 64)
        gate_up = dict(BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
        down = dict(BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
    else:
        gate_up = dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
        down = dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return {"BLOCK_M": bm, "gate_up": gate_up, "down": down}


def get_config(E: int, I: int, N: int, device: torch.device, dtype: str, k: int, decode: bool) -> dict:
    """Config for N tokens: the stored table's nearest entry in the same regime (decode entries are those
    keyed <= DECODE_MAX_TOKENS), else `default_config`."""
    tag = device_tag(device)
    table = load_table(E, I, tag, dtype)
    if table is None and tag in SAME_SM_TABLES:
        table = load_table(E, I, SAME_SM_TABLES[tag], dtype)
    keys = [t for t in table or () if (t <= DECODE_MAX_TOKENS) == decode]
    if not keys:
        return default_config(N, E, k, dtype, decode)
    return table[min(keys, key=lambda t: abs(t - N))]
