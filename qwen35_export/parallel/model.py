"""The reference model on one rank of a TP/EP plan (eager, under an initialised process group).

Same entry points as `Qwen35Model` (prefill, decode, generate_greedy); state tensors hold the rank's heads
only. Every rank must call with the same inputs: the collectives pair up layer by layer.
"""

from __future__ import annotations

from torch import Tensor

from ..config import LINEAR_ATTENTION, Qwen35Config
from ..model import layers
from ..model.model import LayerHook, Qwen35Model, State
from ..model.weights import ModelWeights
from . import layers as players
from .plan import ParallelPlan
from .shard import shard_layer


def shard_weights(weights: ModelWeights, plan: ParallelPlan, rank: int) -> ModelWeights:
    """Rank `rank`'s view of full weights: globals replicated, layers sharded, cfg = the local config."""
    cfg = weights.cfg
    plan.check(cfg)
    return ModelWeights(plan.local_config(cfg), dict(weights.globals),
                        [shard_layer(lw, cfg, plan, i, rank) for i, lw in enumerate(weights.layers)])


class ShardedModel(Qwen35Model):
    """`Qwen35Model` over one rank's shard (`shard_weights`); `self.cfg` is the rank's local config."""

    def __init__(self, weights: ModelWeights, plan: ParallelPlan, reduce: players.Reduce = players.all_reduce_world):
        super().__init__(weights)
        self.plan, self.reduce = plan, reduce

    def forward(self, input_ids: Tensor, lengths: Tensor, state: State,
                hook: LayerHook | None = None) -> tuple[Tensor, State]:
        """As `Qwen35Model.forward`, each layer through the TP/EP layers (collectives every layer)."""
        cfg: Qwen35Config = self.cfg
        if int((state.lengths + lengths).max()) > state.max_seq_len:
            raise ValueError(f"sequence would exceed the KV cache: {int((state.lengths + lengths).max())} "
                             f"> {state.max_seq_len}")
        lengths = lengths.long()
        x = layers.embed(input_ids, self.w.globals["embed_tokens.weight"])
        conv, rec, kc, vc = list(state.conv), list(state.recurrent), list(state.k_cache), list(state.v_cache)
        g = a = 0
        for i, lw in enumerate(self.w.layers):
            if cfg.layer_types[i] == LINEAR_ATTENTION:
                x, conv[g], rec[g] = players.gdn_layer(x, lw, conv[g], rec[g], lengths, cfg, self.plan, self.reduce)
                g += 1
            else:
                x, kc[a], vc[a] = players.attention_layer(x, lw, kc[a], vc[a], state.lengths, lengths, cfg,
                                                          self.plan, self.reduce)
                a += 1
            if hook is not None:
                hook(i, x)
        logits = layers.final_logits(x, self.w.globals["norm.weight"], self.w.globals["lm_head.weight"],
                                     cfg.rms_norm_eps)
        return logits, State(conv, rec, kc, vc, state.lengths + lengths)
