"""The TP/EP math in one process: each rank's partial output, summed over the ranks, equals the
single-device layer (what the all-reduce will do), and each rank's state is its slice of the full state."""

from __future__ import annotations

import pytest
import torch

from parallel_helpers import random_weights
from qwen35_export.config import preset
from qwen35_export.graph.quantize_fp8 import quantize_layer_fp8
from qwen35_export.model import layers
from qwen35_export.model.model import State
from qwen35_export.parallel import layers as players
from qwen35_export.parallel.plan import ParallelPlan
from qwen35_export.parallel.shard import shard_layer

CFG = preset("tiny")
B, T, TMAX = 3, 5, 16


@pytest.fixture(scope="module")
def weights():
    return random_weights(CFG, seed=3)


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, T, CFG.hidden_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [2, 4])
def test_moe_partials_sum_to_full(weights, assert_logits_close, n: int) -> None:
    cfg = preset("tiny") if n == 2 else CFG
    plan = ParallelPlan(1, n)
    x = _x()
    w = weights.layers[0]
    full = layers.moe_block(x, w, cfg)
    parts = [players.moe_block_local(x, shard_layer(w, cfg, plan, 0, r), cfg) for r in range(n)]
    assert_logits_close(sum(parts), full, 1e-5, f"moe ep{n}")
    # Every rank holds a real share: no rank's part is zero, and no single part is the whole.
    for p in parts:
        assert p.abs().max() > 0 and (p - full).abs().max() > 1e-3


def test_moe_identity_map_is_the_single_device_block(weights) -> None:
    w = shard_layer(weights.layers[0], CFG, ParallelPlan(2, 1), 0, 0)  # ep=1: all experts, identity map
    x = _x(1)
    assert torch.equal(players.moe_block_local(x, w, CFG), layers.moe_block(x, w, CFG))


def test_gdn_mixer_partials_and_state_slices(weights, assert_logits_close) -> None:
    plan = ParallelPlan(2, 1)
    local = plan.local_config(CFG)
    w = weights.layers[0]
    lengths = torch.tensor([5, 2, 1])
    s = State.zeros(CFG, B, TMAX)
    out, conv, rec = layers.gdn_mixer(_x(), w, s.conv[0], s.recurrent[0], lengths, CFG)
    parts = []
    for r in range(2):
        sl = State.zeros(local, B, TMAX)
        o, c, h = layers.gdn_mixer(_x(), shard_layer(w, CFG, plan, 0, r), sl.conv[0], sl.recurrent[0], lengths,
                                   local)
        parts.append(o)
        heads = plan.gdn_value_heads(CFG, r)
        assert_logits_close(h, rec[:, heads.start:heads.stop], 1e-5, f"rank {r} recurrent state")
        kh = torch.arange(plan.gdn_key_heads(CFG, r).start * 128, plan.gdn_key_heads(CFG, r).stop * 128)
        ch = torch.cat([kh, 256 + kh, 512 + torch.arange(heads.start * 128, heads.stop * 128)])
        assert_logits_close(c, conv[:, ch], 1e-6, f"rank {r} conv state")
    assert_logits_close(sum(parts), out, 1e-5, "gdn mixer tp2")


@pytest.mark.parametrize("n", [2, 4])
def test_attention_mixer_partials(assert_logits_close, n: int) -> None:
    cfg = preset("tiny", num_attention_heads=8, linear_num_key_heads=4, linear_num_value_heads=8)
    w = random_weights(cfg, seed=5).layers[3]
    plan = ParallelPlan(n, 1)
    local = plan.local_config(cfg)
    start, lengths = torch.tensor([0, 0, 0]), torch.tensor([5, 3, 1])
    s = State.zeros(cfg, B, TMAX)
    x = torch.randn(B, T, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    out, kc, _ = layers.attention_mixer(x, w, s.k_cache[0], s.v_cache[0], start, lengths, cfg)
    parts = []
    for r in range(n):
        sl = State.zeros(local, B, TMAX)
        o, k, _ = layers.attention_mixer(x, shard_layer(w, cfg, plan, 3, r), sl.k_cache[0], sl.v_cache[0], start,
                                         lengths, local)
        parts.append(o)
        kv = plan.kv_heads(cfg, r)
        assert torch.equal(k, kc[:, kv.start:kv.stop])
    assert_logits_close(sum(parts), out, 1e-5, f"attention tp{n}")


def test_layer_reduces_exactly_the_partials(weights, assert_logits_close) -> None:
    """The layer wiring without processes: rank r's reduce sees its mixer partial, then (given the summed
    mixer output) its MoE partial; summing both over the ranks gives the single-device layer."""
    plan = ParallelPlan(2, 2)
    local = plan.local_config(CFG)
    w = weights.layers[3]
    shards = [shard_layer(w, CFG, plan, 3, r) for r in range(2)]
    start, lengths = torch.zeros(B, dtype=torch.long), torch.tensor([5, 4, 2])
    x = _x(4)
    s = State.zeros(CFG, B, TMAX)
    ref, _, _ = layers.attention_layer(x, w, s.k_cache[0], s.v_cache[0], start, lengths, CFG)

    def run(rank: int, answers: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run rank `rank`; its i-th reduce returns answers[i] if given, else its input unchanged."""
        seen: list[torch.Tensor] = []

        def reduce(t: torch.Tensor) -> torch.Tensor:
            seen.append(t)
            return answers[len(seen) - 1] if len(seen) <= len(answers) else t

        sl = State.zeros(local, B, TMAX)
        y = players.attention_layer(x, shards[rank], sl.k_cache[0], sl.v_cache[0], start, lengths, local, plan,
                                    reduce)[0]
        assert len(seen) == 2, "one reduce after the mixer, one after the MoE"
        return y, seen

    mixed = sum(run(r, [])[1][0] for r in range(2))  # what the first all-reduce returns
    moe = [run(r, [mixed])[1][1] for r in range(2)]
    y, _ = run(0, [mixed, moe[0] + moe[1]])
    assert_logits_close(y, ref, 1e-5, "attention layer tp2 ep2")


def test_fp8_shards_sum_to_the_fp8_layer(assert_logits_close) -> None:
    """Block-quantised weights (as an FP8 build holds them) split tp2 ep2 on 128-blocks: the partials of the
    GDN mixer, the attention mixer and the MoE still sum to the single-device FP8 result."""
    cfg = preset("tiny", shared_expert_intermediate_size=256)  # 128 shared rows per rank: whole blocks
    plan = ParallelPlan(2, 2)
    local = plan.local_config(cfg)
    full = random_weights(cfg, seed=11)
    x, lengths = _x(5), torch.tensor([5, 3, 1])
    for i in (0, 3):
        w, n = quantize_layer_fp8(full.layers[i])
        assert n > 0
        shards = [shard_layer(w, cfg, plan, i, r) for r in range(2)]
        assert all(s["mlp.experts.gate_up_proj"].dtype == torch.float8_e4m3fn for s in shards)
        assert_logits_close(sum(players.moe_block_local(x, s, cfg) for s in shards), layers.moe_block(x, w, cfg),
                            1e-5, f"layer {i} fp8 moe")
        if i == 0:
            s0 = State.zeros(cfg, B, TMAX)
            ref = layers.gdn_mixer(x, w, s0.conv[0], s0.recurrent[0], lengths, cfg)[0]
            parts = [layers.gdn_mixer(x, s, *_gdn_state(local), lengths, local)[0] for s in shards]
        else:
            s0, start = State.zeros(cfg, B, TMAX), torch.zeros(B, dtype=torch.long)
            ref = layers.attention_mixer(x, w, s0.k_cache[0], s0.v_cache[0], start, lengths, cfg)[0]
            parts = [layers.attention_mixer(x, s, *_kv(local), start, lengths, local)[0] for s in shards]
        assert_logits_close(sum(parts), ref, 1e-5, f"layer {i} fp8 mixer")


def _gdn_state(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    s = State.zeros(cfg, B, TMAX)
    return s.conv[0], s.recurrent[0]


def _kv(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    s = State.zeros(cfg, B, TMAX)
    return s.k_cache[0], s.v_cache[0]
