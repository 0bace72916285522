"""Comparison metrics: per tensor (cosine, relative L2, max abs), logits (KL, top-k) and MoE routing.

All metrics are computed in float64 on CPU so the comparison itself adds no rounding of its own. A NaN or
Inf on either side makes every metric its worst value (cos -1, errors inf): a broken engine never "passes"
because NaN compared with a bound is False in one direction and True in the other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass
class TensorMetrics:
    """How far `actual` is from `ref` (same shape): cos similarity, ||a - r|| / ||r||, max |a - r|."""

    cos: float
    rel_l2: float
    max_abs: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


WORST = TensorMetrics(cos=-1.0, rel_l2=math.inf, max_abs=math.inf)


def compare(actual: Tensor, ref: Tensor) -> TensorMetrics:
    """Metrics of `actual` against `ref` over all elements (flattened)."""
    if actual.shape != ref.shape:
        raise ValueError(f"compare: shape {tuple(actual.shape)} != reference {tuple(ref.shape)}")
    a = actual.detach().to("cpu", torch.float64).reshape(-1)
    r = ref.detach().to("cpu", torch.float64).reshape(-1)
    if not (torch.isfinite(a).all() and torch.isfinite(r).all()):
        return WORST
    if a.numel() == 0:
        return TensorMetrics(1.0, 0.0, 0.0)
    d = a - r
    rn, an = r.norm().item(), a.norm().item()
    # Two zero tensors are identical; one zero against a non-zero one is as wrong as it gets.
    cos = 1.0 if rn == an == 0.0 else (float(a @ r) / (an * rn) if an > 0 and rn > 0 else 0.0)
    rel = d.norm().item() / rn if rn > 0 else (0.0 if an == 0 else math.inf)
    return TensorMetrics(cos=cos, rel_l2=rel, max_abs=d.abs().max().item())


def worst(ms: list[TensorMetrics]) -> TensorMetrics:
    """Elementwise worst of several comparisons (lowest cos, highest errors)."""
    if not ms:
        return TensorMetrics(1.0, 0.0, 0.0)
    return TensorMetrics(cos=min(m.cos for m in ms), rel_l2=max(m.rel_l2 for m in ms),
                         max_abs=max(m.max_abs for m in ms))


# A top-1 flip is a tie when the reference's margin between its pick and the engine's is within this many
# standard deviations of the noise in a difference of two logits at that position (sqrt(2) * std of the
# engine - reference logit error over the vocab): rounding alone flips such a pair. 3 sigma: ~0.3% of
# independent noisy pairs exceed it. Only positions whose own KL is within the precision's bound may excuse
# a flip, so noise from a bug never turns flips into ties.
TIE_SIGMAS = 3.0


def _kl(a: Tensor, r: Tensor) -> Tensor:
    """KL(softmax(r) || softmax(a)) per row of [N, V] float64 logits."""
    lp_r, lp_a = torch.log_softmax(r, -1), torch.log_softmax(a, -1)
    return (lp_r.exp() * (lp_r - lp_a)).sum(-1).clamp(min=0.0)  # tiny negatives are rounding


@dataclass
class LogitMetrics:
    """Over N positions: mean and max KL(ref || actual), top-1 agreement (raw, and with ties within the
    logit noise excused), mean top-5 overlap."""

    kl_mean: float
    kl_max: float
    top1_raw: float
    top1: float
    top5: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def token_agreement(actual: Tensor, ref: Tensor, ref_tokens: Tensor | None = None,
                    kl_bound: float = 0.0) -> tuple[float, float]:
    """(raw, ties excused) fraction of positions where actual's argmax equals the reference token.

    actual, ref [N, V] logits; ref_tokens [N] (default: ref's argmax; a teacher's tokens otherwise);
    a flip is excused only at a position whose KL is <= kl_bound (0: no flip is ever excused)."""
    a = actual.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    if a.shape[0] == 0:
        return 1.0, 1.0
    if not (torch.isfinite(a).all() and torch.isfinite(r).all()):
        return 0.0, 0.0
    want = r.argmax(-1) if ref_tokens is None else ref_tokens.to("cpu", torch.int64)
    got = a.argmax(-1)
    same = got == want
    rows = torch.arange(a.shape[0])
    margin = r[rows, want] - r[rows, got]  # >= 0 when want is the reference's own argmax
    noise = (a - r).std(-1) * math.sqrt(2.0)  # [N]; std ignores a constant shift (softmax-invariant)
    tie = (margin <= TIE_SIGMAS * noise) & (_kl(a, r) <= kl_bound)
    return same.double().mean().item(), (same | tie).double().mean().item()


def logit_metrics(actual: Tensor, ref: Tensor, kl_bound: float = 0.0) -> LogitMetrics:
    """actual, ref [N, V] logits at the same N positions; kl_bound as in `token_agreement`."""
    a = actual.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    if a.shape != r.shape or a.dim() != 2:
        raise ValueError(f"logit_metrics: expected two [N, V] tensors, found {tuple(a.shape)}, {tuple(r.shape)}")
    n = a.shape[0]
    if not (torch.isfinite(a).all() and torch.isfinite(r).all()):
        return LogitMetrics(math.inf, math.inf, 0.0, 0.0, 0.0, n)
    kl = _kl(a, r)  # [N]
    raw, excused = token_agreement(a, r, kl_bound=kl_bound)
    k = min(5, a.shape[1])
    ta, tr = a.topk(k, -1).indices, r.topk(k, -1).indices  # [N, k]
    overlap = (ta[:, :, None] == tr[:, None, :]).any(-1).double().sum(-1) / k  # [N]
    return LogitMetrics(kl_mean=kl.mean().item(), kl_max=kl.max().item(), top1_raw=raw, top1=excused,
                        top5=overlap.mean().item(), n=n)


def routing_agreement(ids: Tensor, ref_ids: Tensor) -> float:
    """Fraction of top-k expert picks that agree: ids, ref_ids [N, k] (order within a row ignored)."""
    if ids.shape != ref_ids.shape:
        raise ValueError(f"routing_agreement: shape {tuple(ids.shape)} != {tuple(ref_ids.shape)}")
    if ids.numel() == 0:
        return 1.0
    hit = (ids[:, :, None] == ref_ids[:, None, :]).any(-1)  # [N, k]
    return hit.double().mean().item()
