"""Turn an engine trace and a reference trace into per-layer metrics and pass/fail checks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .metrics import compare, logit_metrics, routing_agreement, token_agreement, worst
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


def _update_rel(eng: list[RowTrace], ref: list[RowTrace], i: int, attr: str) -> float:
    def upd(r: RowTrace) -> Tensor:
        h = getattr(r, attr)
        return h[i] - h[i - 1]

    return worst([compare(upd(e), upd(r)) for e, r in zip(eng, ref)]).rel_l2


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
        if i > 0:
            # The layer's own update (output - input): one layer's error, undiluted by the residual stream.
            # Reported, not gated: in bf16/fp8 its noise floor is the residual's rounding scaled by
            # |x| / |update|, which depends on the model, so no bound follows from the precision alone.
            d["prefill_update_rel_l2"] = _update_rel(eng, ref, i, "prefill_hidden")
            if has_dec:
                d["decode_update_rel_l2"] = _update_rel(eng, ref, i, "decode_hidden")
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
        m = logit_metrics(a, r, kl_bound=th.kl_mean)
        summary[ph] = m.to_dict()
        checks += [Check.make(f"{ph} logits KL (mean)", m.kl_mean, "<=", th.kl_mean, detail=f"max {m.kl_max:.3e}"),
                   Check.make(f"{ph} top-1 (near-ties excused)", m.top1, ">=", th.top1,
                              detail=f"{m.n} positions, raw {m.top1_raw:.4f} before excusing ties"),
                   Check.make(f"{ph} top-5 overlap", m.top5, ">=", th.top5)]
    # The engine's greedy token at each generated position against the reference's (the teacher).
    gen_a = torch.cat([torch.cat([e.prefill_logits[-1:], e.decode_logits]) for e in eng])  # [rows * gen, V]
    gen_r = torch.cat([torch.cat([r.prefill_logits[-1:], r.decode_logits]) for r in ref])
    teacher = torch.tensor([t for r in ref for t in r.teacher])
    raw, greedy = token_agreement(gen_a, gen_r, teacher, kl_bound=th.kl_mean)
    summary["greedy_match"] = {"raw": raw, "ties_excused": greedy}
    checks.append(Check.make("greedy match (teacher-forced)", greedy, ">=", th.greedy,
                             detail=f"{len(teacher)} tokens, raw {raw:.4f} before excusing ties"))
    return checks, summary

