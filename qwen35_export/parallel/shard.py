"""Split one decoder layer's weights into per-rank shards, and put shards back together (for checks).

One table, `layer_splits`, says for every weight of a layer which global indices of which dim each rank
keeps; sharding and reassembly both read it, so they cannot disagree. FP8 weights carry their block scales
along: a split of a quantised dim must cover whole 128-blocks, and the scale keeps those blocks' rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..config import LINEAR_ATTENTION, Qwen35Config
from ..model.weights import scale_name
from .plan import ParallelError, ParallelPlan

FP8_BLOCK = 128
EXPERT_MAP = "mlp.experts.expert_map"  # int64 [E]: global expert id -> local index, -1 elsewhere


@dataclass(frozen=True)
class Split:
    """Rank r keeps `index(r)` (global indices) along `dim`. `blocked`: FP8 block scales tile this dim
    (false for the expert dim of fused experts, whose scales have one entry per expert)."""

    dim: int
    index: Callable[[int], Tensor]
    blocked: bool = True


def _heads(r: range, width: int) -> Tensor:
    """Row indices of heads `r`, each `width` rows wide, in a head-major projection."""
    return torch.arange(r.start * width, r.stop * width)


def _mixer_splits(cfg: Qwen35Config, plan: ParallelPlan, layer_type: str) -> dict[str, Split]:
    if layer_type == LINEAR_ATTENTION:
        HK, K, V = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim

        def vheads(r: int) -> Tensor:
            return _heads(plan.gdn_value_heads(cfg, r), V)

        def qkv(r: int) -> Tensor:
            # in_proj_qkv / conv1d channels are [q (HK*K) | k (HK*K) | v (HV*V)]: keep the rank's heads in each.
            kh = _heads(plan.gdn_key_heads(cfg, r), K)
            return torch.cat([kh, HK * K + kh, 2 * HK * K + vheads(r)])

        def vh(r: int) -> Tensor:
            return _heads(plan.gdn_value_heads(cfg, r), 1)

        p = "linear_attn."
        return {p + "in_proj_qkv.weight": Split(0, qkv), p + "conv1d.weight": Split(0, qkv),
                p + "in_proj_z.weight": Split(0, vheads), p + "in_proj_b.weight": Split(0, vh),
                p + "in_proj_a.weight": Split(0, vh), p + "A_log": Split(0, vh), p + "dt_bias": Split(0, vh),
                p + "out_proj.weight": Split(1, vheads)}
    D = cfg.head_dim

    def q(r: int) -> Tensor:
        return _heads(plan.attention_heads(cfg, r), 2 * D)  # per head [query D | gate D]

    def kv(r: int) -> Tensor:
        return _heads(plan.kv_heads(cfg, r), D)

    def o(r: int) -> Tensor:
        return _heads(plan.attention_heads(cfg, r), D)

    p = "self_attn."
    return {p + "q_proj.weight": Split(0, q), p + "k_proj.weight": Split(0, kv), p + "v_proj.weight": Split(0, kv),
            p + "o_proj.weight": Split(1, o)}


def _moe_splits(cfg: Qwen35Config, plan: ParallelPlan) -> dict[str, Split]:
    def experts(r: int) -> Tensor:
        return _heads(plan.experts(cfg, r), 1)

    def shared(r: int) -> Tensor:
        return _heads(plan.shared_rows(cfg, r), 1)

    s = "mlp.shared_expert."
    return {"mlp.experts.gate_up_proj": Split(0, experts, blocked=False),
            "mlp.experts.down_proj": Split(0, experts, blocked=False),
            s + "gate_proj.weight": Split(0, shared), s + "up_proj.weight": Split(0, shared),
            s + "down_proj.weight": Split(1, shared)}


def layer_splits(cfg: Qwen35Config, plan: ParallelPlan, layer_type: str) -> dict[str, Split]:
    """Every split weight of a layer of `layer_type`; weights not named here are replicated."""
    out: dict[str, Split] = {}
    if plan.split_mixer:
        out.update(_mixer_splits(cfg, plan, layer_type))
    if plan.split_moe:
        out.update(_moe_splits(cfg, plan))
    return out


def _scale_index(idx: Tensor, name: str) -> Tensor:
    """Block indices of the 128-blocks that `idx` covers; fails unless it covers whole aligned blocks."""
    blocks = idx.reshape(-1, FP8_BLOCK) if idx.numel() % FP8_BLOCK == 0 else None  # [n_blocks, 128]
    if blocks is None or (blocks - blocks[:, :1] != torch.arange(FP8_BLOCK)).any() or (blocks[:, 0] % FP8_BLOCK).any():
        raise ParallelError(f"{name}: FP8 weight split does not fall on {FP8_BLOCK}-blocks "
                            f"({idx.numel()} indices from {int(idx[0])}); choose a tp/ep that keeps whole blocks")
    return blocks[:, 0] // FP8_BLOCK


def shard_layer(w: dict[str, Tensor], cfg: Qwen35Config, plan: ParallelPlan, layer: int,
                rank: int) -> dict[str, Tensor]:
    """Rank `rank`'s weights of decoder layer `layer` (suffix names, fused experts, FP8 scales beside),
    plus EXPERT_MAP. Every split weight is a contiguous copy of its own."""
    splits = layer_splits(cfg, plan, cfg.layer_types[layer])
    missing = [n for n in splits if n not in w]
    if missing:
        raise ParallelError(f"layer {layer}: weight '{missing[0]}' expected by the split table is missing")
    out: dict[str, Tensor] = {}
    for name, t in w.items():
        base = name[: -len("_scale_inv")] if name.endswith("_scale_inv") else None
        if base is not None and base in w:
            continue  # a scale travels with its weight below
        sp = splits.get(name)
        if sp is None:
            out[name] = t
            if scale_name(name) in w:
                out[scale_name(name)] = w[scale_name(name)]
            continue
        idx = sp.index(rank)
        out[name] = t.index_select(sp.dim, idx).contiguous()
        sc = w.get(scale_name(name))
        if sc is not None:
            sidx = _scale_index(idx, name) if sp.blocked else idx
            out[scale_name(name)] = sc.index_select(sp.dim, sidx).contiguous()
    out[EXPERT_MAP] = plan.expert_map(cfg, rank)
    return out


def unshard_layer(shards: list[dict[str, Tensor]], cfg: Qwen35Config, plan: ParallelPlan,
                  layer: int) -> dict[str, Tensor]:
    """Reassemble the full layer from every rank's shard (unquantised weights only; used by checks).

    Raises ParallelError when an index is owned by no rank, or when two ranks hold different copies of a
    replicated weight or of a duplicated KV head."""
    splits = layer_splits(cfg, plan, cfg.layer_types[layer])
    out: dict[str, Tensor] = {}
    for name, t0 in shards[0].items():
        if name == EXPERT_MAP:
            continue
        sp = splits.get(name)
        if sp is None:
            if any(not torch.equal(s[name], t0) for s in shards[1:]):
                raise ParallelError(f"layer {layer}: replicated weight '{name}' differs between ranks")
            out[name] = t0
            continue
        size = max(int(sp.index(r).max()) for r in range(plan.world_size)) + 1
        full = t0.new_zeros(*t0.shape[: sp.dim], size, *t0.shape[sp.dim + 1:])
        seen = torch.zeros(size, dtype=torch.bool)
        for r, s in enumerate(shards):
            idx = sp.index(r)
            dup = seen[idx]  # indices another rank already filled (duplicated KV heads)
            if dup.any() and not torch.equal(full.index_select(sp.dim, idx[dup]),
                                             s[name].index_select(sp.dim, dup.nonzero()[:, 0])):
                raise ParallelError(f"layer {layer}: '{name}' rows held by several ranks differ")
            full.index_copy_(sp.dim, idx, s[name])
            seen[idx] = True
        if not bool(seen.all()):
            raise ParallelError(f"layer {layer}: '{name}' index {int((~seen).nonzero()[0])} owned by no rank")
        out[name] = full
    return out
