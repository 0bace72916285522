"""Token sampling: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = 0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def validate(self) -> None:
        from ..errors import InputError

        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens: expected >= 1, found {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature: expected >= 0, found {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k: expected >= 0, found {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p: expected in (0, 1], found {self.top_p}")


def sample(logits: Tensor, p: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """logits [B, V] -> token ids [B] (int64)."""
    if p.temperature == 0.0:
        return logits.argmax(dim=-1)
    x = logits.float()
    # Shift the top logit to 0 before dividing (softmax is shift-invariant): a tiny temperature then sends
    # the rest to -inf instead of overflowing the top to inf, whose softmax is NaN.
    x = (x - x.max(dim=-1, keepdim=True).values) / p.temperature
    if p.top_k > 0:
        k = min(p.top_k, x.shape[-1])
        kth = torch.topk(x, k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
