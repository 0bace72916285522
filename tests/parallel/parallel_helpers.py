"""Helpers of the parallel tests: random in-memory weights, and running a function on N gloo ranks."""

from __future__ import annotations

import json
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qwen35_export.checkpoint.writer import random_tensor
from qwen35_export.config import Qwen35Config
from qwen35_export.model.weights import ModelWeights, global_weight_shapes, layer_weight_shapes


def random_weights(cfg: Qwen35Config, seed: int = 0) -> ModelWeights:
    """fp32 weights drawn as `write_random_checkpoint` draws them, fused experts."""
    glob = {n: random_tensor(n, s, seed) for n, s in global_weight_shapes(cfg).items()}
    layers = [{n: random_tensor(f"layers.{i}.{n}", s, seed) for n, s in layer_weight_shapes(cfg, i).items()}
              for i in range(cfg.num_hidden_layers)]
    return ModelWeights(cfg, glob, layers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    # One thread per rank: the CI machine has 2 cores for 2 ranks.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = fn(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """Run fn(rank, *args) in `world` fresh processes joined in a gloo group; its JSON results by rank.

    fn must be importable by name (module level) so the spawned processes can find it."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_rank_main, args=(world, free_port(), d, fn, args), nprocs=world, join=True)
        return [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(world)]
