"""Unit tests of the comparison metrics, the threshold table and the per-layer check."""

from __future__ import annotations

import math

import pytest
import torch

from qwen35_export.errors import InputError
from qwen35_export.validate.checks import _largest_jump, _per_layer_check
from qwen35_export.validate.metrics import compare, logit_metrics, routing_agreement, token_agreement
from qwen35_export.validate.result import Check
from qwen35_export.validate.thresholds import THRESHOLDS, thresholds_for


def test_compare_identical_scaled_and_orthogonal() -> None:
    x = torch.randn(4, 8, dtype=torch.float64)
    m = compare(x, x)
    assert m.cos == pytest.approx(1.0) and m.rel_l2 == 0.0 and m.max_abs == 0.0
    m = compare(1.01 * x, x)
    assert m.rel_l2 == pytest.approx(0.01) and m.cos == pytest.approx(1.0)
    assert m.max_abs == pytest.approx(0.01 * x.abs().max().item())
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert compare(a, b).cos == pytest.approx(0.0) and compare(a, b).rel_l2 == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_compare_non_finite_is_worst(bad: float) -> None:
    x = torch.ones(5)
    y = x.clone()
    y[2] = bad
    for m in (compare(y, x), compare(x, y)):
        assert m.cos == -1.0 and m.rel_l2 == math.inf


def test_compare_zero_cases_and_shape() -> None:
    z = torch.zeros(3)
    assert compare(z, z).rel_l2 == 0.0 and compare(z, z).cos == 1.0
    assert compare(torch.ones(3), z).rel_l2 == math.inf
    with pytest.raises(ValueError, match="shape"):
        compare(torch.ones(3), torch.ones(4))


def test_logit_metrics() -> None:
    r = torch.randn(6, 50)
    m = logit_metrics(r, r)
    assert m.kl_mean == pytest.approx(0.0, abs=1e-12) and m.top1 == m.top1_raw == 1.0 and m.top5 == 1.0 and m.n == 6
    assert logit_metrics(r + 3.0, r).kl_mean == pytest.approx(0.0, abs=1e-12)  # a shift is the same softmax
    m = logit_metrics(-r, r, kl_bound=1e-2)
    assert m.top1_raw == 0.0 and m.top1 == 0.0 and m.kl_mean > 1.0  # garbage: far too noisy to excuse flips
    nan = r.clone()
    nan[0, 0] = float("nan")
    assert logit_metrics(nan, r).kl_mean == math.inf and logit_metrics(nan, r).top1 == 0.0


def test_top1_ties_are_excused_only_within_the_noise() -> None:
    r = torch.zeros(1, 100, dtype=torch.float64)
    r[0, 3], r[0, 7] = 5.0, 4.999  # a near-tie between tokens 3 and 7
    noise = 1e-3 * torch.randn(1, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = r + noise
    a[0, 7] = 5.001  # the engine flips the tie
    raw, excused = token_agreement(a, r, kl_bound=1e-3)
    assert raw == 0.0 and excused == 1.0
    assert token_agreement(a, r) == (0.0, 0.0)  # no KL allowance: nothing is excused
    a = r + noise
    a[0, 7] = 6.0  # picks token 7 although the reference prefers 3 by far more than the noise
    r2 = r.clone()
    r2[0, 7] = 2.0
    assert token_agreement(a, r2, kl_bound=1e-3) == (0.0, 0.0)
    # a teacher's token counts as the reference pick
    assert token_agreement(r, r, torch.tensor([3]))[0] == 1.0


def test_routing_agreement_ignores_order() -> None:
    ref = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert routing_agreement(ref.flip(-1), ref) == 1.0
    assert routing_agreement(torch.tensor([[0, 1, 2, 9], [4, 5, 10, 11]]), ref) == pytest.approx(5 / 8)


def test_threshold_table() -> None:
    assert set(THRESHOLDS) == {"fp32", "bf16", "fp8"}
    f32, b16, f8 = THRESHOLDS["fp32"], THRESHOLDS["bf16"], THRESHOLDS["fp8"]
    # lower precision may only loosen a bound, never tighten it
    for err in ("hidden_rel_l2", "state_rel_l2", "kl_mean"):
        assert getattr(f32, err) < getattr(b16, err) < getattr(f8, err)
    for agree in ("hidden_cos", "routing", "top1", "greedy"):
        assert getattr(f32, agree) > getattr(b16, agree) > getattr(f8, agree)
    with pytest.raises(InputError, match="fp16"):
        thresholds_for("fp16")


def test_check_and_per_layer_check() -> None:
    assert not Check.make("x", float("nan"), "<=", 1.0).passed
    assert not Check.make("x", float("nan"), ">=", 0.0).passed
    c = _per_layer_check("rel", [1e-7, 2e-7, 5e-2, 1.0], "<=", 1e-4)
    assert not c.passed and c.layer == 2 and c.value == 5e-2
    c = _per_layer_check("rel", [1e-7, None, 3e-7], "<=", 1e-4)
    assert c.passed and c.layer is None and c.value == 3e-7
    assert _per_layer_check("rel", [None, None], "<=", 1.0) is None
    assert _largest_jump([1e-7, 1.2e-7, 3e-2, 3.1e-2]) == 2
    assert _largest_jump([1e-7, 3e-7, 2e-7]) is None  # all rounding noise: no jump to name
