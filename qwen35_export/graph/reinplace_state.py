"""Update a decode graph's recurrent and conv states in place instead of copying new states back into them.

The captured GDN layer calls the functional `gated_delta_rule` (a new state out) and then copies that
state into its state input (`rec_state.copy_(ht)`, exporter/capture.py). For a custom op Inductor cannot
write the output into the input, so the copy is a kernel of its own: one more read and write of the whole
state, as many bytes again as the recurrence moves itself (4 MB per 35B-A3B layer at batch 1, 268 MB per
397B layer at batch 64). Where the Triton op was substituted and the call is the recurrent (decode) path,
this pass puts the in-place op `qwen35_triton::gated_delta_rule_` in its place and drops the copy.
The conv state's copy (a few KB per row, but a launch of its own in every GDN layer's decode step) goes the
same way: `qwen35_triton::causal_conv1d_` at T = 1.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch.export import ExportedProgram
from torch.fx import Node

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Rewrite:
    """A functional state op and its in-place twin: the state is argument `state_arg`, the new state output
    1, the other output 0; the in-place op takes calls whose static T (argument 0's dim 1) is at most
    `max_T()` (decode); `state_dtypes`: the state dtypes it updates (None: any)."""

    functional: str
    inplace: str
    state_arg: int
    max_T: Callable[[], int]
    state_dtypes: tuple[torch.dtype, ...] | None = None


def _recurrent_max_T() -> int:
    from ..kernels.gated_delta_rule.recurrent import MAX_T  # imported late: needs triton

    return MAX_T


# The recurrent state (fp32: the in-place kernel updates fp32 only) and the conv state (activation dtype:
# the one-step update kernel stores in the state's own dtype, as the functional op's copy did).
_REWRITES = (_Rewrite("gated_delta_rule", "gated_delta_rule_", 5, _recurrent_max_T, (torch.float32,)),
             _Rewrite("causal_conv1d", "causal_conv1d_", 2, lambda: 1))


def _op(name: str):
    ns = getattr(torch.ops, "qwen35_triton", None)
    return getattr(ns, name).default if ns is not None and hasattr(ns, name) else None


def _rewritable(node: Node, rw: _Rewrite) -> tuple[Node, Node, Node | None] | None:
    """(state placeholder, copy_ node, output-0 getitem or None) when `node` reads a contiguous state input
    that nothing else in the graph touches but the copy of `node`'s new state back into it (a view or any
    other read of the state could see it updated early), and T is what the in-place op takes; else None."""
    if node.kwargs or len(node.args) <= rw.state_arg:
        return None
    state = node.args[rw.state_arg]
    if not isinstance(state, Node) or state.op != "placeholder":
        return None
    sv = state.meta.get("val")
    if sv is None or not sv.is_contiguous() or (rw.state_dtypes is not None and sv.dtype not in rw.state_dtypes):
        return None
    x = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
    if x is None or not isinstance(x.shape[1], int) or x.shape[1] > rw.max_T():
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
    """Rewrite each qualifying `qwen35_triton::gated_delta_rule` / `causal_conv1d` call (see module
    docstring); returns the program (changed in place) and {in-place op name: count}."""
    g = ep.graph
    counts: dict[str, int] = {}
    for rw in _REWRITES:
        functional, op = _op(rw.functional), _op(rw.inplace)
        if functional is None or op is None:
            continue
        for node in list(g.nodes):
            if node.op != "call_function" or node.target is not functional:
                continue
            found = _rewritable(node, rw)
            if found is None:
                continue
            state, copy, out = found
            with g.inserting_before(node):
                new = g.call_function(op, tuple(node.args))
            new.meta = dict(out.meta) if out is not None else {}
            if out is not None:
                out.replace_all_uses_with(new)
            for n in (copy, *(u for u in list(node.users)), node):
                g.erase_node(n)
            counts[rw.inplace] = counts.get(rw.inplace, 0) + 1
    if counts:
        g.lint()
        ep.graph_module.recompile()
    log.info("reinplace_state: %s", counts)
    return ep, counts
