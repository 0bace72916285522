"""The PyTorch reference model: explicit state in and out, prefill and decode entry points."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..config import LINEAR_ATTENTION, Qwen35Config
from . import layers
from .weights import ModelWeights

# Called after each decoder layer with (layer index, hidden [B, T, H]); validate/ uses it.
LayerHook = Callable[[int, Tensor], None]


@dataclass
class State:
    """Everything a sequence carries between calls, as plain tensors (no cache objects).

    conv[j]      [B, conv_dim, W-1]    per GDN layer j (in layer order), activation dtype
    recurrent[j] [B, HV, K, V] fp32    per GDN layer j
    k_cache[j], v_cache[j] [B, KVH, T_max, D] per attention layer j
    lengths      [B] int64             tokens seen so far per row
    """

    conv: list[Tensor]
    recurrent: list[Tensor]
    k_cache: list[Tensor]
    v_cache: list[Tensor]
    lengths: Tensor

    @staticmethod
    def zeros(cfg: Qwen35Config, batch: int, max_seq_len: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> "State":
        W = cfg.linear_conv_kernel_dim
        n_gdn, n_attn = len(cfg.gdn_layers), len(cfg.attention_layers)
        HV, K, V = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
        kv_shape = (batch, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        return State(
            conv=[torch.zeros(batch, cfg.conv_dim, W - 1, dtype=dtype, device=device) for _ in range(n_gdn)],
            recurrent=[torch.zeros(batch, HV, K, V, dtype=torch.float32, device=device) for _ in range(n_gdn)],
            k_cache=[torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(n_attn)],
            v_cache=[torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(n_attn)],
            lengths=torch.zeros(batch, dtype=torch.int64, device=device),
        )

    @property
    def max_seq_len(self) -> int:
        return self.k_cache[0].shape[2] if self.k_cache else 1 << 62


class Qwen35Model:
    """Reference forward of the text model over `ModelWeights` (any dtype; fp32 for parity)."""

    def __init__(self, weights: ModelWeights, cache_op: bool = False, fused_route: bool = False):
        """`cache_op`: prefill attention through `qwen35::decode_attention` too, as GPU engines run it;
        `fused_route`: MoE routing through `qwen35::moe_route` (layers.moe_block), as GPU builds capture their decode graphs."""
        self.w = weights
        self.cfg = weights.cfg
        self.cache_op = cache_op
        self.fused_route = fused_route

    @property
    def dtype(self) -> torch.dtype:
        return self.w.globals["embed_tokens.weight"].dtype

    @property
    def device(self) -> torch.device:
        return self.w.globals["embed_tokens.weight"].device

    def init_state(self, batch: int, max_seq_len: int) -> State:
        return State.zeros(self.cfg, batch, max_seq_len, self.dtype, self.device)

    def forward(self, input_ids: Tensor, lengths: Tensor, state: State,
                hook: LayerHook | None = None) -> tuple[Tensor, State]:
        """Run input_ids [B, T] (right-padded; row b has lengths[b] real tokens) on top of `state`.

        Returns logits [B, T, vocab] (padding positions hold values of no meaning) and the new state.
        """
        cfg = self.cfg
        B, T = input_ids.shape
        if int((state.lengths + lengths).max()) > state.max_seq_len:
            raise ValueError(f"sequence would exceed the KV cache: {int((state.lengths + lengths).max())} "
                             f"> {state.max_seq_len}")
        lengths = lengths.to(torch.int64)
        x = layers.embed(input_ids, self.w.globals["embed_tokens.weight"])
        conv, rec, kc, vc = list(state.conv), list(state.recurrent), list(state.k_cache), list(state.v_cache)
        g = a = 0
        for i, lw in enumerate(self.w.layers):
            if cfg.layer_types[i] == LINEAR_ATTENTION:
                x, conv[g], rec[g] = layers.gdn_layer(x, lw, conv[g], rec[g], lengths, cfg, self.fused_route)
                g += 1
            else:
                x, kc[a], vc[a] = layers.attention_layer(x, lw, kc[a], vc[a], state.lengths, lengths, cfg,
                                                         self.cache_op, self.fused_route)
                a += 1
            if hook is not None:
                hook(i, x)
        logits = layers.final_logits(x, self.w.globals["norm.weight"], self.w.globals["lm_head.weight"],
                                     cfg.rms_norm_eps)
        return logits, State(conv, rec, kc, vc, state.lengths + lengths)

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, lengths: Tensor, state: State,
                hook: LayerHook | None = None) -> tuple[Tensor, State]:
        """Prefill a right-padded batch input_ids [B, T] with per-row lengths [B] -> logits [B, T, V]."""
        return self.forward(input_ids, lengths, state, hook)

    @torch.no_grad()
    def decode(self, tokens: Tensor, state: State, hook: LayerHook | None = None) -> tuple[Tensor, State]:
        """One token per row, tokens [B, 1] -> logits [B, 1, V]."""
        ones = torch.ones(tokens.shape[0], dtype=torch.int64, device=tokens.device)
        return self.forward(tokens, ones, state, hook)

    @torch.no_grad()
    def generate_greedy(self, prompts: list[list[int]], max_new_tokens: int,
                        max_seq_len: int | None = None) -> list[list[int]]:
        """Greedy continuation of each prompt (no stop tokens): the oracle engines are compared with."""
        B = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=self.device)
        T = int(lens.max())
        ids = torch.zeros(B, T, dtype=torch.int64, device=self.device)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p, dtype=torch.int64)
        state = self.init_state(B, max_seq_len or (T + max_new_tokens))
        logits, state = self.prefill(ids, lens, state)
        nxt = logits[torch.arange(B), lens - 1].argmax(-1)  # [B]
        out = [[int(t)] for t in nxt]
        for _ in range(max_new_tokens - 1):
            logits, state = self.decode(nxt[:, None], state)
            nxt = logits[:, 0].argmax(-1)
            for b in range(B):
                out[b].append(int(nxt[b]))
        return out
