"""Update a decode graph's recurrent state in place instead of copying a new state back into it.

The captured GDN layer calls the functional `gated_delta_rule` (a new state out) and then copies that
state into its state input (`rec_state.copy_(ht)`, exporter/capture.py). For a custom op Inductor cannot
write the output into the input, so the copy is a kernel of its own: one more read and write of the whole
state, as many bytes again as the recurrence moves itself (4 MB per 35B-A3B layer at batch 1, 268 MB per
397B layer at batch 64). Where the Triton op was substituted and the call is the recurrent (decode) path,
this pass puts the in-place op `qwen35_triton::gated_delta_rule_` in its place and drops the copy.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch.export import ExportedProgram
from torch.fx import Node

log = logging.getLogger(__name__)


def _inplace_op():
    ns = getattr(torch.ops, "qwen35_triton", None)
    return getattr(ns, "gated_delta_rule_").default if ns is not None and hasattr(ns, "gated_delta_rule_") else None


def _rewritable(node: Node) -> tuple[Node, Node, Node | None] | None:
    """(state placeholder, copy_ node, output getitem or None) when `node` reads an fp32 contiguous state
    input that nothing else in the graph touches but the copy of `node`'s new state back into it (a view or
    any other read of the state could see it updated early), and T is static and small enough for the
    recurrent kernel; else None."""
    from ..kernels.gated_delta_rule.recurrent import MAX_T

    if len(node.args) != 6 or node.kwargs:
        return None
    state = node.args[5]
    if not isinstance(state, Node) or state.op != "placeholder":
        return None
    sv = state.meta.get("val")
    if sv is None or sv.dtype != torch.float32 or not sv.is_contiguous():
        return None
    q = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
    if q is None or not isinstance(q.shape[1], int) or q.shape[1] > MAX_T:
        return None
    getters = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    if len(getters) != len(node.users) or 1 not in getters:
        return None
    copies = list(getters[1].users)
    if (len(copies) != 1 or copies[0].target is not torch.ops.aten.copy_.default
            or copies[0].args != (state, getters[1]) or copies[0].users):
        return None
    if set(state.users) != {node, copies[0]}:
        return None
    return state, copies[0], getters.get(0)


def reinplace_state(ep: ExportedProgram) -> tuple[ExportedProgram, dict[str, int]]:
    """Rewrite each qualifying `qwen35_triton::gated_delta_rule` call (see module docstring); returns the
    program (changed in place) and {"gated_delta_rule_": count}."""
    op = _inplace_op()
    functional = getattr(getattr(torch.ops, "qwen35_triton", None), "gated_delta_rule", None)
    if op is None or functional is None:
        return ep, {}
    g = ep.graph
    count = 0
    for node in list(g.nodes):
        if node.op != "call_function" or node.target is not functional.default:
            continue
        found = _rewritable(node)
        if found is None:
            continue
        state, copy, out = found
        with g.inserting_before(node):
            new = g.call_function(op, tuple(node.args[:6]))
        new.meta = dict(out.meta) if out is not None else {}
        if out is not None:
            out.replace_all_uses_with(new)
        for n in (copy, *(u for u in list(node.users)), node):
            g.erase_node(n)
        count += 1
    if count:
        g.lint()
        ep.graph_module.recompile()
    log.info("reinplace_state: %d", count)
    return ep, {"gated_delta_rule_": count} if count else {}
