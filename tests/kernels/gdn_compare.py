"""The one comparison helper of the GDN kernel tests: relative RMS error against a reference, with a bound."""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

# conftest.py decides where kernels run (interpreter on CPU unless QWEN35_TRITON_GPU=1 on a CUDA machine)
ON_GPU = os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def assert_close(name: str, out: Tensor, ref: Tensor, rtol_rms: float) -> float:
    """Fail unless ||out - ref|| / ||ref|| <= rtol_rms; NaN/Inf on either side fails; max abs error reported.

    Returns the relative RMS error so tests can also compare errors with each other.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(r).all(), f"{name}: reference has NaN/Inf"
    bad = (~torch.isfinite(o)).sum().item()
    assert bad == 0, f"{name}: {bad} of {o.numel()} elements NaN/Inf (unwritten or overflowed)"
    err = ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
    max_abs = (o - r).abs().max().item()
    assert err <= rtol_rms, (f"{name}: relative RMS error {err:.3e} > bound {rtol_rms:.1e} "
                             f"(max abs {max_abs:.3e}, max |ref| {r.abs().max().item():.3e})")
    return err


def poisoned_like(x: Tensor) -> Tensor:
    """A fresh buffer of x's shape filled with NaN: an element the kernel never writes stays NaN."""
    return torch.full_like(x, float("nan"))
