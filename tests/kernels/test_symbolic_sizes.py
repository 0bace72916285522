"""Launch decisions under export: sizes are symbolic there, and a decision must hold for every size the
graph admits without putting a guard on it (a guard bakes the example's choice into an AOTI graph).

Found on the H100 (2026-11-24): the MoE tile map of the tiny engine was sized from the example token count
at trace time, so tokens past it were dropped at run time (rows of a batch beyond the 8th token wrong).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from qwen35_export.kernels.moe.align import max_padded, upper_bound


def _symbolic_rows(example: int):
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    x = mode.from_tensor(torch.zeros(example, 4), symbolic_context=StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC]))
    return env, x.shape[0]


def test_upper_bound_concrete() -> None:
    assert upper_bound(7) == 7


def test_upper_bound_reads_range_without_guard() -> None:
    env, n = _symbolic_rows(6)
    assert upper_bound(n * 4) is None  # unbounded: the general path must be taken
    torch._check(n <= 8)  # what a decode graph's Dim(max=8) declares
    guards = len(env.guards)
    assert upper_bound(n * 4) == 32
    assert len(env.guards) == guards


def test_max_padded_symbolic_no_guard_either_side_of_E() -> None:
    """The tile map's length for a symbolic slot count M is min(E, M)-aware for every M, with no guard: an
    example M below E (54 slots from a 2 x 3 capture) must not turn it into M * block_m for every M."""
    env, n = _symbolic_rows(6)
    M = n * 9
    guards = len(env.guards)
    P = max_padded(M, 257, 128)
    assert len(env.guards) == guards
    expr = P.node.expr
    (sym,) = expr.free_symbols
    for rows, want in ((6, 54 * 128), (8192, 8192 * 9 + 257 * 127)):
        assert int(expr.subs(sym, rows)) == want
    assert max_padded(54, 257, 128) == 54 * 128 and max_padded(73728, 257, 128) == 73728 + 257 * 127
