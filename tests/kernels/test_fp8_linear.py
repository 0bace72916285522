"""Dense w8a8 block-scaled FP8 linear against the dequantised reference and `qwen35::fp8_linear`.

CPU through Triton's interpreter (conftest.py); the real-size case needs CUDA. Comparisons use the kernel
tests' one helper (gdn_compare.assert_close); the unit roundoffs behind the bounds are test_moe.py's.
"""

from __future__ import annotations

import math

import pytest
import torch

import qwen35_export.model.ops  # noqa: F401  (registers the qwen35:: reference ops)
from qwen35_export.checkpoint.fp8 import quantize_fp8_block
from qwen35_export.kernels.fp8_linear import (fp8_linear, fp8_linear_reference, quantize_act,
                                              quantize_act_reference)

from gdn_compare import assert_close  # the kernel tests' one comparison helper
from test_moe import BF16_U, FP8_U, nan_empty  # noqa: F401  (fixture re-exported)


def assert_quant_match(q: torch.Tensor, s: torch.Tensor, q_ref: torch.Tensor, s_ref: torch.Tensor) -> None:
    """e4m3 codes and scales equal to the reference: bit for bit on CPU (the interpreter divides exactly);
    on the GPU Triton's fp32 `/` may be an ulp off IEEE, so scales may differ by 2 ulp and a code may sit
    one step from the reference's on at most 1 element in 1e4 (ties flipped by that ulp)."""
    if not q.is_cuda:
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
        return
    assert ((s - s_ref).abs() <= 2 * torch.finfo(torch.float32).eps * s_ref.abs()).all(), "scales"
    codes, codes_ref = q.view(torch.uint8).int(), q_ref.view(torch.uint8).int()
    diff = codes != codes_ref
    assert diff.float().mean().item() <= 1e-4, f"{int(diff.sum())} of {diff.numel()} codes differ"
    assert ((codes - codes_ref).abs()[diff] == 1).all(), "a code differs by more than one step"


def make_linear(N: int, K: int, seed: int, dev: str = "cpu"):
    g = torch.Generator(device=dev).manual_seed(seed)
    return quantize_fp8_block(torch.randn(N, K, generator=g, device=dev) * K ** -0.5)


@pytest.mark.parametrize("R,K", [(1, 128), (63, 300), (130, 256)], ids=["R1-K128", "R63-K300", "R130-K256"])
def test_quantize_act_exact(R, K, nan_empty):
    """Same e4m3 codes and scales as the torch reference (ties to even, zero groups scale 1)."""
    x = torch.randn(R, K, generator=torch.Generator().manual_seed(R)).bfloat16()
    x[0, :128] = 0.0
    # e4m3 subnormals and signed zeros (after scaling by 448/amax): -0 must stay -0 (code 0x80) as in torch
    x[-1, :8] = torch.tensor([-0.0, 0.0, -1e-6, 1e-6, -2e-3, 3e-3, -6e-3, 1e-2]) * x[-1].float().abs().max()
    q, s = quantize_act(x)
    q_ref, s_ref = quantize_act_reference(x)
    assert_quant_match(q, s, q_ref, s_ref)


@pytest.mark.parametrize("shape,N,K", [
    pytest.param((1,), 256, 128, id="T1-N256-K128"),
    pytest.param((2, 33), 200, 384, id="B2-T33-N200-K384"),
    pytest.param((70,), 384, 300, id="T70-N384-K300"),
    pytest.param((130,), 128, 256, id="T130-N128-K256"),
])
def test_fp8_linear(shape, N, K, nan_empty):
    w, s = make_linear(N, K, seed=N + K)
    x = torch.randn(*shape, K, generator=torch.Generator().manual_seed(K)).bfloat16()
    y = fp8_linear(x, w, s)
    assert y.shape == (*shape, N) and y.dtype == x.dtype
    # Same activation quantisation simulated: only the output's bf16 rounding remains.
    assert_close("fp8_linear vs simulated", y, fp8_linear_reference(x, w, s, quant_act=True), BF16_U)
    # The op contract (unquantised x): plus one e4m3 rounding of x (at most FP8_U relative).
    ref = torch.ops.qwen35.fp8_linear(x.float(), w, s)
    assert_close("fp8_linear vs qwen35::fp8_linear", y, ref, math.sqrt(FP8_U ** 2 + BF16_U ** 2))


def test_fp8_linear_traces_under_export():
    class Lin(torch.nn.Module):
        def forward(self, x, w, s):
            return torch.ops.qwen35_triton.fp8_linear(x, w, s)

    w, s = make_linear(256, 128, seed=0)
    ep = torch.export.export(Lin(), (torch.randn(3, 128).bfloat16(), w, s))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("qwen35_triton.fp8_linear.default") == 1, targets


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("R", [1, 16, 4096])
def test_fp8_linear_real_size_cuda(R):
    w, s = make_linear(16384, 4096, seed=0, dev="cuda")  # q_proj-sized at 397B geometry
    x = torch.randn(R, 4096, device="cuda").bfloat16()
    q, qs = quantize_act(x)
    q_ref, qs_ref = quantize_act_reference(x)
    assert_quant_match(q, qs, q_ref, qs_ref)
    y = fp8_linear(x, w, s)
    sim = fp8_linear_reference(x, w, s, quant_act=True, dtype=torch.float32)
    assert_close("fp8_linear vs simulated", y, sim, BF16_U)
