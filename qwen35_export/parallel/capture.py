"""The exporter's side of a sharded build: layer modules that run a rank's shard with the collectives
inside, capture functions of the exporter's signature, and the per-rank weight files."""

from __future__ import annotations

import socket
from functools import partial
from pathlib import Path
from typing import Callable

import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor
from torch.export import ExportedProgram

from ..config import Qwen35Config
from ..exporter import capture as C
from . import layers as players
from .plan import ParallelPlan
from .shard import shard_layer

CaptureFn = Callable[..., tuple[ExportedProgram, list[str]]]


class ShardedGDNLayer(C.GDNLayer):
    """`GDNLayer` on one rank's shard: cfg is the local config, the all-reduces are graph nodes."""

    def __init__(self, cfg: Qwen35Config, weight_names: list[str], plan: ParallelPlan):
        super().__init__(cfg, weight_names)
        self.plan = plan

    def forward(self, x: Tensor, lengths: Tensor, conv_state: Tensor, rec_state: Tensor, *weights: Tensor) -> Tensor:
        w = dict(zip(self.weight_names, weights))
        y, conv, rec = players.gdn_layer(x, w, conv_state, rec_state, lengths, self.cfg, self.plan)
        conv_state.copy_(conv)
        rec_state.copy_(rec)
        return y


class ShardedAttentionLayer(C.AttentionLayer):
    """`AttentionLayer` on one rank's shard (local KV heads in the caches)."""

    def __init__(self, cfg: Qwen35Config, weight_names: list[str], plan: ParallelPlan):
        super().__init__(cfg, weight_names)
        self.plan = plan

    def forward(self, x: Tensor, start: Tensor, lengths: Tensor, k_cache: Tensor, v_cache: Tensor,
                *weights: Tensor) -> Tensor:
        w = dict(zip(self.weight_names, weights))
        y, kc, vc = players.attention_layer(x, w, k_cache, v_cache, start, lengths, self.cfg, self.plan)
        k_cache.copy_(kc)
        v_cache.copy_(vc)
        return y


def sharded_capture(plan: ParallelPlan) -> dict[str, CaptureFn]:
    """Capture functions per layer kind, called as the exporter's (cfg = the global config); the example
    weights must be a rank's shard. Starts the build process's one-rank group (`ensure_build_group`)."""
    ensure_build_group()

    def wrap(fn: CaptureFn, layer: type) -> CaptureFn:
        def capture(cfg: Qwen35Config, *args, **kwargs):
            return fn(plan.local_config(cfg), *args, layer=partial(layer, plan=plan), **kwargs)
        return capture

    return {C.GDN: wrap(C.capture_gdn, ShardedGDNLayer), C.ATTN: wrap(C.capture_attention, ShardedAttentionLayer)}


def ensure_build_group() -> None:
    """Start a one-rank gloo group in a build that runs outside torchrun, and keep it for the process.

    Tracing a functional collective, and compiling it (torch 2.13: inductor's save_graph_repro resolves
    every collective's group name, unconditionally), both look the group up. The graph records only the
    name ("0", WORLD), the same in every process, so at run time the N-rank group is the one called.
    Compile workers in other processes have no group: sharded builds compile in the build process."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def save_layer_shards(w: dict[str, Tensor], cfg: Qwen35Config, plan: ParallelPlan, layer: int, root: Path,
                      files: list[list[str]]) -> dict[str, Tensor]:
    """Write every rank's shard of layer `layer` to weights/rank{r}/layer_XXX.safetensors under `root`,
    append the relative paths to files[r], and return rank 0's shard (the capture example)."""
    first: dict[str, Tensor] = {}
    for r in range(plan.world_size):
        s = shard_layer(w, cfg, plan, layer, r)
        rel = f"weights/rank{r}/layer_{layer:03d}.safetensors"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in s.items()}, str(root / rel))
        files[r].append(rel)
        if r == 0:
            first = s
    return first


def manifest_entry(plan: ParallelPlan, files: list[list[str]]) -> dict:
    """What the manifest records about the plan: tp, ep, world size and each rank's layer files."""
    return {**plan.to_dict(), "layer_files": files,
            "collectives": "all_reduce after the mixer (tp > 1) and after the MoE (ep > 1), inside the graphs",
            "moe": "replicated tokens + local experts + all-reduce"}
