"""The sharding plan: ownership is a partition, shard shapes follow the local config, reassembly is exact,
FP8 block scales follow their rows, and plans that do not fit are refused with the field named."""

from __future__ import annotations

import pytest
import torch

from parallel_helpers import random_weights
from qwen35_export.checkpoint.fp8 import quantize_fp8_block
from qwen35_export.config import Qwen35Config, preset
from qwen35_export.model.weights import layer_weight_shapes
from qwen35_export.parallel.plan import ParallelError, ParallelPlan
from qwen35_export.parallel.shard import EXPERT_MAP, shard_layer, unshard_layer

PLANS = [pytest.param(ParallelPlan(2, 2), id="tp2-ep2"), pytest.param(ParallelPlan(2, 1), id="tp2"),
         pytest.param(ParallelPlan(1, 2), id="ep2"), pytest.param(ParallelPlan(4, 4), id="tp4-ep4")]


def _cfg(plan: ParallelPlan) -> Qwen35Config:
    # tp4 needs 4 GDN key heads; tiny has 2 KV heads, so tp4 also covers "fewer KV heads than ranks".
    if plan.world_size == 4:
        return preset("tiny", num_attention_heads=8, linear_num_key_heads=4, linear_num_value_heads=8)
    return preset("tiny")


def _owners(ranges: list[range], total: int) -> list[int]:
    count = [0] * total
    for r in ranges:
        for i in r:
            count[i] += 1
    return count


@pytest.mark.parametrize("plan", PLANS)
def test_every_head_and_expert_owned_once(plan: ParallelPlan) -> None:
    cfg = _cfg(plan)
    plan.check(cfg)
    n = plan.world_size
    for what, total, split in [
        (plan.attention_heads, cfg.num_attention_heads, plan.split_mixer),
        (plan.gdn_key_heads, cfg.linear_num_key_heads, plan.split_mixer),
        (plan.gdn_value_heads, cfg.linear_num_value_heads, plan.split_mixer),
        (plan.experts, cfg.num_experts, plan.split_moe),
        (plan.shared_rows, cfg.shared_expert_intermediate_size, plan.split_moe),
    ]:
        count = _owners([what(cfg, r) for r in range(n)], total)
        assert count == ([1] * total if split else [n] * total), what.__name__
    # A rank's query heads only ever read the KV heads it holds.
    G = cfg.num_attention_heads // cfg.num_key_value_heads
    for r in range(n):
        assert {h // G for h in plan.attention_heads(cfg, r)} <= set(plan.kv_heads(cfg, r))
    # The expert map sends each owned global id to a distinct local index and the rest to -1.
    maps = torch.stack([plan.expert_map(cfg, r) for r in range(n)])  # [ranks, E]
    assert ((maps >= 0).sum(0) == (1 if plan.split_moe else n)).all()
    for r in range(n):
        own = maps[r][maps[r] >= 0]
        assert torch.equal(own, torch.arange(len(plan.experts(cfg, r))))


def test_kv_heads_duplicated_when_fewer_than_ranks() -> None:
    cfg, plan = _cfg(ParallelPlan(4, 4)), ParallelPlan(4, 4)
    assert [list(plan.kv_heads(cfg, r)) for r in range(4)] == [[0], [0], [1], [1]]


@pytest.mark.parametrize("plan", PLANS)
def test_shard_shapes_follow_local_config(plan: ParallelPlan) -> None:
    cfg = _cfg(plan)
    local = plan.local_config(cfg)
    w = random_weights(cfg)
    n = plan.world_size
    for i in (0, 3):  # a GDN layer and an attention layer
        want = layer_weight_shapes(local, i)
        if plan.split_moe:
            E, S = cfg.num_experts // n, cfg.shared_expert_intermediate_size // n
            want.update({"mlp.experts.gate_up_proj": (E, *want["mlp.experts.gate_up_proj"][1:]),
                         "mlp.experts.down_proj": (E, *want["mlp.experts.down_proj"][1:]),
                         "mlp.shared_expert.gate_proj.weight": (S, cfg.hidden_size),
                         "mlp.shared_expert.up_proj.weight": (S, cfg.hidden_size),
                         "mlp.shared_expert.down_proj.weight": (cfg.hidden_size, S)})
        want["mlp.gate.weight"] = (cfg.num_experts, cfg.hidden_size)  # router stays global
        want[EXPERT_MAP] = (cfg.num_experts,)
        for r in range(n):
            s = shard_layer(w.layers[i], cfg, plan, i, r)
            assert {k: tuple(v.shape) for k, v in s.items()} == want, f"layer {i} rank {r}"


@pytest.mark.parametrize("plan", PLANS)
def test_reassembly_equals_original(plan: ParallelPlan) -> None:
    cfg = _cfg(plan)
    w = random_weights(cfg)
    for i in (0, 3):
        shards = [shard_layer(w.layers[i], cfg, plan, i, r) for r in range(plan.world_size)]
        back = unshard_layer(shards, cfg, plan, i)
        assert back.keys() == w.layers[i].keys()
        for k, v in w.layers[i].items():
            assert torch.equal(back[k], v), k


def test_gdn_qkv_shard_keeps_q_k_v_of_own_heads() -> None:
    """in_proj_qkv rows are [q | k | v]: rank 1 of tp2 holds q and k of key head 1 and v of heads 2, 3."""
    cfg, plan = preset("tiny"), ParallelPlan(2, 1)
    full = random_weights(cfg).layers[0]["linear_attn.in_proj_qkv.weight"]  # [2*2*128 + 4*128, H]
    s = shard_layer(random_weights(cfg).layers[0], cfg, plan, 0, 1)["linear_attn.in_proj_qkv.weight"]
    K = 128
    assert torch.equal(s[:K], full[K:2 * K])  # q, key head 1
    assert torch.equal(s[K:2 * K], full[3 * K:4 * K])  # k, key head 1
    assert torch.equal(s[2 * K:], full[4 * K + 2 * K:4 * K + 4 * K])  # v, value heads 2 and 3


def test_unshard_detects_replicas_that_differ() -> None:
    cfg, plan = preset("tiny"), ParallelPlan(2, 2)
    w = random_weights(cfg)
    shards = [shard_layer(w.layers[0], cfg, plan, 0, r) for r in range(2)]
    shards[1]["input_layernorm.weight"] = shards[1]["input_layernorm.weight"] + 1
    with pytest.raises(ParallelError, match="replicated weight 'input_layernorm.weight' differs"):
        unshard_layer(shards, cfg, plan, 0)


def test_fp8_scales_follow_their_blocks() -> None:
    """A block-aligned split of an FP8 weight keeps exactly the scale rows of its blocks."""
    cfg, plan = preset("tiny"), ParallelPlan(2, 1)
    w = random_weights(cfg).layers[0]
    q, s = quantize_fp8_block(w["linear_attn.in_proj_qkv.weight"])
    wq = dict(w, **{"linear_attn.in_proj_qkv.weight": q, "linear_attn.in_proj_qkv.weight_scale_inv": s})
    sh = shard_layer(wq, cfg, plan, 0, 1)
    assert torch.equal(sh["linear_attn.in_proj_qkv.weight_scale_inv"], s[[1, 3, 6, 7]])
    assert torch.equal(sh["linear_attn.in_proj_qkv.weight"].view(torch.uint8),
                       q[list(range(128, 256)) + list(range(384, 512)) + list(range(768, 1024))].view(torch.uint8))


def test_fp8_split_off_block_refused() -> None:
    cfg, plan = preset("tiny"), ParallelPlan(1, 2)  # shared expert 128 rows -> 64 per rank: half a block
    w = random_weights(cfg).layers[0]
    q, s = quantize_fp8_block(w["mlp.shared_expert.gate_proj.weight"])
    wq = dict(w, **{"mlp.shared_expert.gate_proj.weight": q, "mlp.shared_expert.gate_proj.weight_scale_inv": s})
    with pytest.raises(ParallelError, match="shared_expert.gate_proj.weight: FP8 weight split does not fall on"):
        shard_layer(wq, cfg, plan, 0, 0)


@pytest.mark.parametrize("plan,match", [
    (ParallelPlan(3, 1), "'num_attention_heads' = 4 is not divisible by 3"),
    (ParallelPlan(2, 4), "--tp 2: expected 1 or the world size 4"),
    (ParallelPlan(1, 32), "'num_experts' = 16 is not divisible by 32"),
    (ParallelPlan(0, 1), "--tp: expected a positive integer"),
])
def test_plans_that_do_not_fit_are_refused(plan: ParallelPlan, match: str) -> None:
    with pytest.raises(ParallelError, match=match):
        plan.check(preset("tiny"))


def test_real_geometries_fit() -> None:
    """397B on 4 ranks and 8 ranks, 35B on 2: the plans the device script uses."""
    for name, n in (("397b-a17b", 4), ("397b-a17b", 8), ("35b-a3b", 2)):
        cfg = preset(name)
        ParallelPlan(n, n).check(cfg)
        local = ParallelPlan(n, n).local_config(cfg)
        assert local.num_attention_heads * n == cfg.num_attention_heads
        assert local.linear_num_value_heads * n == cfg.linear_num_value_heads


def test_plan_round_trips_through_manifest_dict() -> None:
    p = ParallelPlan(2, 2)
    assert p.to_dict() == {"tp": 2, "ep": 2, "world_size": 2}
    assert ParallelPlan.from_dict(p.to_dict()) == p
