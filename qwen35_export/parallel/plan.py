"""`ParallelPlan`: how the model is split over the ranks of one host, and which rank owns what.

Supported layouts (world = max(tp, ep)): tp and ep are each 1 or the world size. A part that is not split is
replicated and computed redundantly on every rank, with no collective; tp x ep meshes (sub-groups) are not
implemented and are refused with a message.

Ownership, rank r of N:
- attention: query heads [r*NH/N, (r+1)*NH/N); KV heads split the same way when N <= KVH, else each rank
  keeps the one KV head its query heads read (a KV head is then held by N/KVH ranks);
- GDN: key heads [r*HK/N, ...) and the Hv/Hk value heads each of those serves (value heads are grouped
  over key heads by repeat-interleave, so they are contiguous too);
- experts: the contiguous block [r*E/N, (r+1)*E/N), with a global -> local id map;
- shared expert (split when ep > 1, so the all-reduce of the MoE output adds it once): its intermediate
  rows [r*S/N, (r+1)*S/N);
- embeddings, norms, router, shared-expert gate, lm_head: replicated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import Qwen35Config
from ..errors import ConfigError


class ParallelError(ConfigError):
    """A parallel plan does not fit the model geometry, or the process group does not fit the plan."""


@dataclass(frozen=True)
class ParallelPlan:
    """Tensor parallelism `tp` for the attention/GDN mixers, expert parallelism `ep` for the routed MoE."""

    tp: int = 1
    ep: int = 1

    @property
    def world_size(self) -> int:
        return max(self.tp, self.ep)

    @property
    def split_mixer(self) -> bool:
        return self.tp > 1

    @property
    def split_moe(self) -> bool:
        return self.ep > 1

    # -- checks ------------------------------------------------------------------------------------
    def check(self, cfg: Qwen35Config) -> None:
        """Raise ParallelError naming the field when `cfg` cannot be split this way."""
        for name, v in (("tp", self.tp), ("ep", self.ep)):
            if not isinstance(v, int) or v < 1:
                raise ParallelError(f"--{name}: expected a positive integer, found {v!r}")
        n = self.world_size
        for name, v in (("tp", self.tp), ("ep", self.ep)):
            if v not in (1, n):
                raise ParallelError(f"--{name} {v}: expected 1 or the world size {n} (tp x ep meshes with "
                                    f"sub-groups are not implemented)")
        if self.split_mixer:
            self._need(cfg.num_attention_heads, n, "num_attention_heads", "tp")
            kvh = cfg.num_key_value_heads
            if not (kvh % n == 0 or n % kvh == 0):
                raise ParallelError(f"--tp {n}: num_key_value_heads {kvh} must divide or be divisible by tp")
            self._need(cfg.linear_num_key_heads, n, "linear_num_key_heads", "tp")
        if self.split_moe:
            self._need(cfg.num_experts, n, "num_experts", "ep")
            self._need(cfg.shared_expert_intermediate_size, n, "shared_expert_intermediate_size", "ep")

    @staticmethod
    def _need(value: int, n: int, field: str, flag: str) -> None:
        if value % n:
            raise ParallelError(f"--{flag} {n}: config field '{field}' = {value} is not divisible by {n}")

    # -- ownership (ranges of global indices) ---------------------------------------------------------
    def _block(self, total: int, rank: int, split: bool) -> range:
        if not split:
            return range(total)
        per = total // self.world_size
        return range(rank * per, (rank + 1) * per)

    def attention_heads(self, cfg: Qwen35Config, rank: int) -> range:
        return self._block(cfg.num_attention_heads, rank, self.split_mixer)

    def kv_heads(self, cfg: Qwen35Config, rank: int) -> range:
        kvh = cfg.num_key_value_heads
        if not self.split_mixer or kvh >= self.world_size:
            return self._block(kvh, rank, self.split_mixer)
        # Fewer KV heads than ranks: keep the KV head the rank's query heads read (replicated KV).
        G = cfg.num_attention_heads // kvh
        j = self.attention_heads(cfg, rank).start // G
        return range(j, j + 1)

    def gdn_key_heads(self, cfg: Qwen35Config, rank: int) -> range:
        return self._block(cfg.linear_num_key_heads, rank, self.split_mixer)

    def gdn_value_heads(self, cfg: Qwen35Config, rank: int) -> range:
        G = cfg.linear_num_value_heads // cfg.linear_num_key_heads
        kh = self.gdn_key_heads(cfg, rank)
        return range(kh.start * G, kh.stop * G)

    def experts(self, cfg: Qwen35Config, rank: int) -> range:
        return self._block(cfg.num_experts, rank, self.split_moe)

    def shared_rows(self, cfg: Qwen35Config, rank: int) -> range:
        return self._block(cfg.shared_expert_intermediate_size, rank, self.split_moe)

    def expert_map(self, cfg: Qwen35Config, rank: int) -> Tensor:
        """Global expert id -> local index on `rank`, -1 where another rank owns it; int64 [E]."""
        m = torch.full((cfg.num_experts,), -1, dtype=torch.int64)
        own = self.experts(cfg, rank)
        m[own.start:own.stop] = torch.arange(len(own))
        return m

    def local_config(self, cfg: Qwen35Config) -> Qwen35Config:
        """The geometry one rank's mixers see: local head counts; router and vocab stay global."""
        r0 = 0  # every rank owns equally many heads (check() requires even splits)
        return cfg.replace(num_attention_heads=len(self.attention_heads(cfg, r0)),
                           num_key_value_heads=len(self.kv_heads(cfg, r0)),
                           linear_num_key_heads=len(self.gdn_key_heads(cfg, r0)),
                           linear_num_value_heads=len(self.gdn_value_heads(cfg, r0)))

    # -- manifest ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "world_size": self.world_size}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ParallelPlan":
        return ParallelPlan(tp=int(d["tp"]), ep=int(d["ep"]))
