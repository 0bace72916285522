"""Inline the plain-math `qwen35::` ops (model/ops.py INLINE_OPS) that no kernel will replace.

Such an op exists so that a GPU build can swap in a Triton kernel for it (substitute_custom_ops); everywhere
else (the cpu target, `--kernels reference`, the ONNX and TensorRT exporters) its node becomes its torch body
again, so Inductor fuses it with its neighbours as before and no node runs through AOTI's proxy executor.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from ..model.ops import INLINE_OPS, LIB


def inline_ops(ep: ExportedProgram, keep: set[str] | frozenset[str] = frozenset()) -> tuple[ExportedProgram,
                                                                                          dict[str, int]]:
    """Decompose every INLINE_OPS node of `ep` whose op name is not in `keep`; returns the program and the
    count of inlined nodes per op name."""
    counts: dict[str, int] = {}
    for node in ep.graph.nodes:
        t = node.target
        if node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.namespace == LIB:
            name = t._opname
            if name in INLINE_OPS and name not in keep:
                counts[name] = counts.get(name, 0) + 1
    if not counts:
        return ep, counts
    ns = getattr(torch.ops, LIB)
    # A table of only these ops: every other node (the other qwen35 ops included) is left as it is.
    ep = ep.run_decompositions({getattr(ns, name).default: INLINE_OPS[name] for name in counts})
    return ep, counts
