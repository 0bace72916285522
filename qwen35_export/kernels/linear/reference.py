"""Torch reference of the small-M linear: x @ w.T in fp64, cast to x's dtype (or `dtype`)."""

from __future__ import annotations

import torch
from torch import Tensor


def linear_reference(x: Tensor, w: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """x [..., K] @ w[N, K].T computed in fp64 (the bound the kernel is held to is its own rounding)."""
    return (x.double() @ w.double().t()).to(dtype or x.dtype)
