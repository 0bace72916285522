"""TP/EP forward of the decoder layers, for one rank's shard; written for export like model/layers.py.

The mixers are the single-device functions run on the rank's heads (`ParallelPlan.local_config`): the out
projection of a head subset is a partial sum of the full one, so one all-reduce after it restores the
single-device result. The MoE is "replicated tokens + local experts + all-reduce": after the mixer's
all-reduce every rank holds all tokens, routes them over all E experts (router replicated), runs only the
experts it owns (the others' weights are zeroed for its sum) and its slice of the shared expert, and one
all-reduce adds the ranks' partial MoE outputs. Two all-reduces per layer, each a c10d functional
collective on the WORLD group, so torch.export keeps it as a node inside the layer's graph and AOTInductor
compiles it (spike, torch 2.13 cpu + gloo: works; see parallel/__init__.py).
"""

from __future__ import annotations

from typing import Callable

import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from ..config import Qwen35Config
from ..model import layers
from ..model.layers import rms_norm
from .plan import ParallelPlan
from .shard import EXPERT_MAP

Reduce = Callable[[Tensor], Tensor]


def all_reduce_world(x: Tensor) -> Tensor:
    """Sum over all ranks of the default group; a traceable functional collective (export keeps it)."""
    return funcol.all_reduce(x, "sum", dist.group.WORLD)


def moe_block_local(x: Tensor, w: dict[str, Tensor], cfg: Qwen35Config) -> Tensor:
    """This rank's part of the MoE over x [B, T, H]: routed experts it owns plus its shared-expert rows.

    Summed over the ranks this equals `layers.moe_block`; with an identity expert map and the whole shared
    expert it is `layers.moe_block` itself."""
    # Shared-expert rows of gate/up and columns of down are this rank's slice: silu(g)*u is per row, so the
    # down projection of the slice is a partial sum of the full shared expert, scaled by the replicated gate.
    return layers.moe_block(x, w, cfg, expert_map=w[EXPERT_MAP])


def _block(x: Tensor, w: dict[str, Tensor], cfg: Qwen35Config, plan: ParallelPlan, reduce: Reduce,
           mixer: Callable[[Tensor], Tensor]) -> Tensor:
    """x + mixer, then + MoE, each partial output summed over the ranks where that part is split."""
    h = mixer(rms_norm(x, w["input_layernorm.weight"], cfg.rms_norm_eps))
    x = x + (reduce(h) if plan.split_mixer else h)
    m = moe_block_local(rms_norm(x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps), w, cfg)
    return x + (reduce(m) if plan.split_moe else m)


def gdn_layer(x: Tensor, w: dict[str, Tensor], conv_state: Tensor, rec_state: Tensor, lengths: Tensor,
              cfg: Qwen35Config, plan: ParallelPlan, reduce: Reduce = all_reduce_world
              ) -> tuple[Tensor, Tensor, Tensor]:
    """GDN + MoE layer on a rank; cfg is the rank's `local_config`, states hold the rank's heads only:
    conv_state [B, conv_dim/tp, W-1], rec_state [B, HV/tp, K, V] fp32."""
    new: list[Tensor] = []

    def mixer(h: Tensor) -> Tensor:
        out, conv, rec = layers.gdn_mixer(h, w, conv_state, rec_state, lengths, cfg)
        new.extend((conv, rec))
        return out

    x = _block(x, w, cfg, plan, reduce, mixer)
    return x, new[0], new[1]


def attention_layer(x: Tensor, w: dict[str, Tensor], k_cache: Tensor, v_cache: Tensor, start: Tensor,
                    lengths: Tensor, cfg: Qwen35Config, plan: ParallelPlan, reduce: Reduce = all_reduce_world
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Attention + MoE layer on a rank; KV caches hold the rank's KV heads: [B, KVH_local, T_max, D]."""
    new: list[Tensor] = []

    def mixer(h: Tensor) -> Tensor:
        out, kc, vc = layers.attention_mixer(h, w, k_cache, v_cache, start, lengths, cfg)
        new.extend((kc, vc))
        return out

    x = _block(x, w, cfg, plan, reduce, mixer)
    return x, new[0], new[1]
