"""The small-M linear (kernels/linear: swapped operands, K split) against the fp64 reference.

Bounds (relative RMS against x @ w.T in fp64 on the same inputs): bf16 / fp16 outputs are rounded once
(2^-9 / 2^-11 relative at most, less in RMS) after an fp32 accumulation whose own error is ~2^-24 per term:
4e-3 for bf16, 1e-3 for fp16. fp32: exact fp32 products under the interpreter (observed ~1e-7; 2e-5), TF32
on the GPU (10-bit mantissa operands, 2^-11 relative each: 4 * 2^-11 = 2e-3).
"""

from __future__ import annotations

import pytest
import torch

from gdn_compare import DEVICE, ON_GPU
from qwen35_export.kernels.linear import linear_reference, linear_small_m, small_m_config

BOUNDS = {torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float32: 2e-3 if ON_GPU else 2e-5}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _inputs(M: int, N: int, K: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, K, generator=g).to(dtype).to(DEVICE),
            (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype).to(DEVICE))


# (M, N, K): one row, odd rows, a whole 16-token tile and one past it, 64 rows; N and K not multiples of the
# tiles (tails masked) and whole ones
SHAPES = [(1, 48, 96), (5, 48, 96), (16, 256, 512), (17, 256, 512), (64, 200, 320), (3, 128, 1024)]
CONFIGS = {
    "default": None,
    "split3-bk64": dict(BLOCK_N=32, BLOCK_T=16, BLOCK_K=64, SPLIT_K=3, num_warps=4, num_stages=2),
    "bt32-bn16": dict(BLOCK_N=16, BLOCK_T=32, BLOCK_K=32, SPLIT_K=1, num_warps=4, num_stages=2),
    "bt64-split2": dict(BLOCK_N=64, BLOCK_T=64, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=3),
}


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_small_m_linear_matches_reference(M, N, K, cfg):
    x, w = _inputs(M, N, K, torch.bfloat16, seed=M * 7 + N)
    out = linear_small_m(x, w, CONFIGS[cfg])
    assert out.shape == (M, N) and out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
    err = rel(out, linear_reference(x, w, torch.float64))
    assert err <= BOUNDS[torch.bfloat16], (M, N, K, cfg, err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_small_m_linear_dtypes(dtype):
    x, w = _inputs(7, 96, 256, dtype)
    out = linear_small_m(x, w)
    assert out.dtype == dtype
    assert rel(out, linear_reference(x, w, torch.float64)) <= BOUNDS[dtype]


def test_small_m_linear_keeps_leading_dims_and_reads_column_slices():
    """x [B, T, K] keeps its leading dims; a column slice of a wider activation (a fused projection's
    output) gives the same numbers as its contiguous copy."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(4, 1, 320, generator=g).bfloat16().to(DEVICE)
    x = wide[..., 64:64 + 192]  # [4, 1, 192], row stride 320
    w = (torch.randn(80, 192, generator=g) / 14).bfloat16().to(DEVICE)
    out = linear_small_m(x, w)
    assert out.shape == (4, 1, 80)
    assert torch.equal(out, linear_small_m(x.contiguous(), w))
    assert rel(out, linear_reference(x, w, torch.float64)) <= BOUNDS[torch.bfloat16]


def test_small_m_config_covers_the_graph_rows():
    """The token tile covers every row count up to 64 the graph admits; wide outputs take 128-row weight
    tiles unsplit, narrow ones 64-row tiles with K split (each split >= 4 steps)."""
    assert small_m_config(1, 2048, 4096)["BLOCK_T"] == 16
    assert small_m_config(17, 2048, 4096)["BLOCK_T"] == 32
    assert small_m_config(64, 2048, 4096)["BLOCK_T"] == 64
    assert small_m_config(1, 12288, 2048)["BLOCK_N"] == 128 and small_m_config(1, 12288, 2048)["SPLIT_K"] == 1
    for N, K in ((2048, 4096), (4096, 8192), (2048, 512)):
        c = small_m_config(1, N, K)
        assert c["BLOCK_N"] == 64 and c["SPLIT_K"] in (1, 2, 4) and K // 128 // c["SPLIT_K"] >= 4


def test_small_m_linear_rejects_bad_shapes_and_tiles():
    x, w = _inputs(2, 32, 64, torch.bfloat16)
    with pytest.raises(ValueError, match=r"x \(2, 64\) and w \(32, 48\)"):
        linear_small_m(x, w[:, :48])
    with pytest.raises(ValueError, match="BLOCK_T.*>= 16"):
        linear_small_m(x, w, dict(BLOCK_N=32, BLOCK_T=8, BLOCK_K=32, SPLIT_K=1, num_warps=4, num_stages=2))
