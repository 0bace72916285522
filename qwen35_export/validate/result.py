"""`ValidationResult`: the checks with their bounds, per-layer metrics, and the printed summary table."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Check:
    """One pass/fail comparison. `layer` names where a per-layer check first failed (None if it passed or
    has no layer)."""

    name: str
    value: float
    op: str  # "<=" or ">="
    bound: float
    passed: bool
    layer: int | None = None
    detail: str = ""

    @staticmethod
    def make(name: str, value: float, op: str, bound: float, layer: int | None = None,
             detail: str = "") -> "Check":
        ok = value <= bound if op == "<=" else value >= bound  # NaN fails either way
        return Check(name, value, op, bound, bool(ok) and not math.isnan(value), layer, detail)


@dataclass
class ValidationResult:
    engine: str
    precision: str
    reference: str
    prompt_lengths: list[int]
    gen: int
    checks: list[Check]
    layers: list[dict[str, Any]]  # per layer: index, kind, prefill/decode metrics, state, routing
    largest_jump: dict[str, int | None] = field(default_factory=dict)  # phase -> layer of largest rel_l2 rise
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    end_to_end: dict[str, Any] = field(default_factory=dict)  # logit metrics per phase, greedy match
    reference_mode: str = "whole"  # "whole" (one fp32 model in memory) or "stream" (one layer at a time)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def first_bad_layer(self) -> int | None:
        """The earliest layer at which any per-layer check failed: where the engine first goes wrong."""
        bad = [c.layer for c in self.checks if not c.passed and c.layer is not None]
        return min(bad) if bad else None

    def failures(self) -> list[str]:
        return [f"{c.name}: {_fmt(c.value)} not {c.op} {_fmt(c.bound)}"
                + (f" at layer {c.layer} ({self.layers[c.layer]['kind']})" if c.layer is not None else "")
                + (f" ({c.detail})" if c.detail else "") for c in self.checks if not c.passed]

    def headline(self) -> str:
        if self.passed:
            return f"PASS ({len(self.checks)} checks, {self.precision} bounds, reference {self.reference})"
        L = self.first_bad_layer
        where = f"first bad layer {L} ({self.layers[L]['kind']})" if L is not None else "end-to-end only"
        return f"FAIL: {where}; " + "; ".join(self.failures())

    def summary(self) -> str:
        """The table printed by the CLI (also the top of the markdown report)."""
        lines = [f"engine {self.engine}  precision {self.precision}  reference {self.reference} "
                 f"({self.reference_mode})  "
                 f"prompts {len(self.prompt_lengths)} (lengths {','.join(map(str, self.prompt_lengths))})  "
                 f"gen {self.gen}",
                 f"{'check':<34} {'value':>11} {'':>2} {'bound':>11}  {'result':<6} where"]
        for c in self.checks:
            where = f"layer {c.layer} ({self.layers[c.layer]['kind']})" if c.layer is not None else ""
            lines.append(f"{c.name:<34} {_fmt(c.value):>11} {c.op:>2} {_fmt(c.bound):>11}  "
                         f"{'ok' if c.passed else 'FAIL':<6} {where}")
        for phase, L in self.largest_jump.items():
            if L is not None:
                lines.append(f"largest {phase} error jump: into layer {L} ({self.layers[L]['kind']})")
        raw = [f"{ph} {self.end_to_end[ph]['top1_raw']:.4f}" for ph in ("prefill", "decode") if ph in self.end_to_end]
        if "greedy_match" in self.end_to_end:
            raw.append(f"greedy {self.end_to_end['greedy_match']['raw']:.4f}")
        if raw:
            lines.append("raw top-1 agreement, no ties excused: " + ", ".join(raw))
        for s in self.skipped:
            lines.append(f"skipped: {s}")
        lines.append(self.headline())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(passed=self.passed, first_bad_layer=self.first_bad_layer, headline=self.headline())
        return d


def _fmt(x: float) -> str:
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.6f}" if abs(x) < 10 else f"{x:.1f}"
    return f"{x:.3e}"
