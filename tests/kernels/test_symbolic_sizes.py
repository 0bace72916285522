"""Launch decisions under export: sizes are symbolic there, and a decision must hold for every size the
graph admits without putting a guard on it (a guard bakes the example's choice into an AOTI graph).

Found on the H100 (2026-11-24): the MoE tile map of the tiny engine was sized from the example token count
at trace time, so tokens past it were dropped at run time (rows of a batch beyond the 8th token wrong).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from qwen35_export.kernels.moe.align import upper_bound


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
