"""Turn an engine trace and a reference trace into per-layer metrics and pass/fail checks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .metrics import TensorMetrics, compare, logit_metrics, routing_agreement, worst
from .result import Check
from .thresholds import Thresholds
from .trace import RowTrace

# rel_l2 below this is rounding noise; the "largest jump" ratio is taken against at least this floor.
_JUMP_FLOOR = 1e-7


def _per_layer_check(name: str, values: list[float | None], op: str, bound: float) -> Check | None:
    """One check over all layers: the value is the first failing layer's, else the worst layer's."""
    present = [(i, v) for i, v in enumerate(values) if v is not None]
    if not present:
        return None
    for i, v in present:
        c = Check.make(name, v, op, bound, layer=i)
        if not c.passed:
            return c
    i, v = (max if op == "<=" else min)(present, key=lambda t: t[1])
    return Check.make(name, v, op, bound)


def _largest_jump(rel: list[float | None]) -> int | None:
    r = [v for v in rel if v is not None]
    # Among errors that are all fp32 rounding noise, the "largest jump" would mean nothing.
    if len(r) != len(rel) or len(r) < 2 or max(r) < 100 * _JUMP_FLOOR:
        return None
    ratios = [r[i] / max(r[i - 1], _JUMP_FLOOR) for i in range(1, len(r))]
    return 1 + max(range(len(ratios)), key=lambda i: ratios[i])


def layer_metrics(eng: list[RowTrace], ref: list[RowTrace], kinds: list[str], gdn_layers: list[int],
                  routing: list[list[Tensor]] | None) -> list[dict[str, Any]]:
    """Per layer, worst over rows: prefill and decode hidden metrics, GDN state, routing agreement."""
    out: list[dict[str, Any]] = []
    has_dec = all(r.decode_hidden.shape[1] > 0 for r in ref)
    has_state = all(r.conv for r in ref)
    for i, kind in enumerate(kinds):
        d: dict[str, Any] = {"layer": i, "kind": kind}
        d["prefill"] = worst([compare(e.prefill_hidden[i], r.prefill_hidden[i]) for e, r in zip(eng, ref)]).to_dict()
        if has_dec:
            d["decode"] = worst([compare(e.decode_hidden[i], r.decode_hidden[i])
                                 for e, r in zip(eng, ref)]).to_dict()
        if has_state and i in gdn_layers:
            j = gdn_layers.index(i)
            d["conv_state"] = worst([compare(e.conv[j], r.conv[j]) for e, r in zip(eng, ref)]).to_dict()
            d["rec_state"] = worst([compare(e.rec[j], r.rec[j]) for e, r in zip(eng, ref)]).to_dict()
        if routing is not None and all(r.router_ids for r in ref):
            ids = torch.cat([routing[b][i] for b in range(len(ref))])
            rids = torch.cat([r.router_ids[i] for r in ref])
            d["routing"] = routing_agreement(ids, rids)
        out.append(d)
    return out


def layer_checks(layers: list[dict[str, Any]], th: Thresholds) -> list[Check]:
    def col(key: str, metric: str | None = None) -> list[float | None]:
        return [(d[key][metric] if metric else d[key]) if key in d else None for d in layers]

    specs = [("prefill hidden rel_l2 (max)", col("prefill", "rel_l2"), "<=", th.hidden_rel_l2),
             ("prefill hidden cos (min)", col("prefill", "cos"), ">=", th.hidden_cos),
             ("decode hidden rel_l2 (max)", col("decode", "rel_l2"), "<=", th.hidden_rel_l2),
             ("decode hidden cos (min)", col("decode", "cos"), ">=", th.hidden_cos),
             ("GDN conv state rel_l2 (max)", col("conv_state", "rel_l2"), "<=", th.state_rel_l2),
             ("GDN recurrent state rel_l2 (max)", col("rec_state", "rel_l2"), "<=", th.state_rel_l2),
             ("routing agreement (min)", col("routing"), ">=", th.routing)]
    checks = [_per_layer_check(*s) for s in specs]
    return [c for c in checks if c is not None]


def largest_jumps(layers: list[dict[str, Any]]) -> dict[str, int | None]:
    return {ph: _largest_jump([d[ph]["rel_l2"] if ph in d else None for d in layers])
            for ph in ("prefill", "decode")}


def logit_checks(eng: list[RowTrace], ref: list[RowTrace], th: Thresholds) -> tuple[list[Check], dict[str, Any]]:
    """KL, top-1, top-5 over every prompt position and every decode step; teacher-forced greedy match."""
    checks, summary = [], {}
    phases = {"prefill": (torch.cat([e.prefill_logits for e in eng]), torch.cat([r.prefill_logits for r in ref]))}
    if all(r.decode_logits.shape[0] for r in ref):
        phases["decode"] = (torch.cat([e.decode_logits for e in eng]), torch.cat([r.decode_logits for r in ref]))
    for ph, (a, r) in phases.items():
        m = logit_metrics(a, r)
        summary[ph] = m.to_dict()
        checks += [Check.make(f"{ph} logits KL (mean)", m.kl_mean, "<=", th.kl_mean, detail=f"max {m.kl_max:.3e}"),
                   Check.make(f"{ph} top-1 agreement", m.top1, ">=", th.top1, detail=f"{m.n} positions"),
                   Check.make(f"{ph} top-5 overlap", m.top5, ">=", th.top5)]
    same = [a == b for e, r in zip(eng, ref) for a, b in zip(e.tokens(), r.teacher)]
    greedy = sum(same) / max(len(same), 1)
    summary["greedy_match"] = greedy
    first = next((k for k, ok in enumerate(same) if not ok), None)
    checks.append(Check.make("greedy match (teacher-forced)", greedy, ">=", th.greedy,
                             detail="" if first is None else f"{len(same) - sum(same)}/{len(same)} tokens differ"))
    return checks, summary


__all__ = ["layer_metrics", "layer_checks", "largest_jumps", "logit_checks", "TensorMetrics"]
