"""The ordered list of graph passes a build runs on each captured graph, with optional graph dumps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch.export import ExportedProgram

from .inline_ops import inline_ops
from .reinplace_state import reinplace_state
from .substitute_custom_ops import substitute_custom_ops


@dataclass
class PassRecord:
    name: str
    changes: dict[str, int] = field(default_factory=dict)


def run_passes(ep: ExportedProgram, graph_name: str, op_impls: dict[str, object],
               dump_dir: Path | None = None) -> tuple[ExportedProgram, list[PassRecord]]:
    """Run the pass list on one graph; write `<graph>.<i>.<pass>.before/after.txt` when dumping."""
    passes = [("inline_ops", lambda e: inline_ops(e, keep=set(op_impls))),
              ("substitute_custom_ops", lambda e: substitute_custom_ops(e, op_impls)),
              # after the substitution: it rewrites the Triton op's calls (none where the reference stays)
              ("reinplace_state", reinplace_state)]
    records = []
    for i, (name, fn) in enumerate(passes):
        if dump_dir is not None:
            dump_dir.mkdir(parents=True, exist_ok=True)
            (dump_dir / f"{graph_name}.{i}.{name}.before.txt").write_text(str(ep.graph_module.code))
        ep, changes = fn(ep)
        if dump_dir is not None:
            (dump_dir / f"{graph_name}.{i}.{name}.after.txt").write_text(str(ep.graph_module.code))
        records.append(PassRecord(name, changes))
    return ep, records
