"""`ShardedEngine`: one rank of a sharded engine, under torchrun (or any initialised process group).

Each rank loads the shared graphs, the replicated globals and its own weights/rank{r}/ files; its state
pools hold its heads only. Every rank runs the same prefill/decode/sampling on the same inputs: the hidden
state is replicated after each all-reduce, so logits and sampled tokens agree on all ranks (sampling
seeds are the same everywhere), and the collectives inside the graphs pair up layer by layer.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import EngineError
from ..exporter.manifest import Manifest
from ..runtime.engine import Engine, _config_from_manifest, check_device
from .plan import ParallelPlan


def init_process_group(target: str, world: int) -> tuple[int, int]:
    """(rank, world size) of the default group, starting it from torchrun's environment when needed."""
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise EngineError(f"a sharded engine runs one process per rank: launch with "
                              f"`torchrun --nproc-per-node {world} -m qwen35_export.cli ...`")
        dist.init_process_group("gloo" if target == "cpu" else "nccl")
    return dist.get_rank(), dist.get_world_size()


class ShardedEngine(Engine):
    """An `Engine` over rank `dist.get_rank()`'s shard. Load with `ShardedEngine.load` (or `Engine.load`,
    which comes here for a sharded manifest)."""

    def __init__(self, engine_dir: Path, man: Manifest, device: torch.device, use_cuda_graphs: bool = True):
        self.plan = ParallelPlan.from_dict(man.parallel)
        self.rank = dist.get_rank()
        self.local_cfg = self.plan.local_config(_config_from_manifest(man.model_config))
        super().__init__(engine_dir, replace(man, layer_files=man.parallel["layer_files"][self.rank]), device,
                         use_cuda_graphs)

    def _alloc_pools(self) -> None:
        # The pools hold this rank's heads: allocate them from the local geometry.
        full, self.cfg = self.cfg, self.local_cfg
        try:
            super()._alloc_pools()
        finally:
            self.cfg = full

    @classmethod
    def load(cls, engine_dir: str | Path, device: str | torch.device | None = None, verify_hashes: bool = True,
             use_cuda_graphs: bool = True) -> "ShardedEngine":
        engine_dir = Path(engine_dir)
        man = Manifest.load(engine_dir)
        if man.parallel is None:
            raise EngineError(f"{engine_dir}: not a sharded engine (no 'parallel' in the manifest); use Engine.load")
        if device is None:
            device = "cpu" if man.target == "cpu" else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        device = torch.device(device)
        check_device(man, device, engine_dir)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # before NCCL starts: each rank's communicator on its own GPU
        rank, world = init_process_group(man.target, man.parallel["world_size"])
        if world != man.parallel["world_size"]:
            raise EngineError(f"{engine_dir}: sharded for {man.parallel['world_size']} ranks "
                              f"(tp {man.parallel['tp']}, ep {man.parallel['ep']}); the process group has {world}: "
                              f"launch with torchrun --nproc-per-node {man.parallel['world_size']}")
        # Check only what this rank reads: the other ranks' shards are theirs to check.
        mine = f"weights/rank{rank}/"
        own = {k: v for k, v in man.files.items() if not k.startswith("weights/rank") or k.startswith(mine)}
        replace(man, files=own).verify_files(engine_dir, hashes=verify_hashes)
        return cls(engine_dir, man, device, use_cuda_graphs)
