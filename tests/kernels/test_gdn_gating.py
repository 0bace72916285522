"""GDN gating and gated RMSNorm kernels against their references (and the reference against transformers).

Bounds: gating is a few fp32 transcendentals (softplus via a compensated log1p): relative RMS 1e-6
against fp64. The gated norm rounds like torch at the same points (norm to o's dtype, times weight in
o's dtype when the weight has it, times silu(z) in fp32, cast): only rsqrt/exp rounding can flip a last
bf16 bit, so the bound is 1e-3 (a few flipped bits among thousands give far less).
"""

from __future__ import annotations

import pytest
import torch

from gdn_compare import DEVICE, assert_close
from qwen35_export.kernels.gdn_gating import naive_gated_rms_norm, naive_gdn_gating


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gating_matches_reference(dtype, poison_empty):
    import qwen35_export.kernels.gdn_gating.op  # noqa: F401  (registers the ops)

    gen = torch.Generator().manual_seed(0)
    HV = 12
    A_log = torch.empty(HV).uniform_(0.01, 16, generator=gen).log().to(DEVICE)
    dt_bias = torch.randn(HV, generator=gen).to(DEVICE)
    a = (torch.randn(3, 37, HV, generator=gen) * 8).to(dtype).to(DEVICE)
    # softplus edges: deep negative (log1p of a tiny number), around torch's threshold 20, large
    edges = torch.tensor([-40, -15, -5, -1e-3, 0, 1e-3, 5, 19.5, 20.5, 25, 40, 80.0])[:HV]
    a[0, 0] = edges.to(dtype).to(DEVICE) - dt_bias.to(dtype)
    b = torch.randn(3, 37, HV, generator=gen).to(dtype).to(DEVICE)
    g, beta = torch.ops.qwen35_triton.gdn_gating(A_log, a, dt_bias, b)
    rg, rbeta = naive_gdn_gating(A_log.double(), a.double(), dt_bias.double(), b.double())
    assert g.dtype == torch.float32 and beta.dtype == torch.float32
    assert_close("g", g, rg, 1e-6)
    assert_close("beta", beta, rbeta, 1e-6)
    assert_close("g elementwise", g / rg, torch.ones_like(rg), 1e-6)  # small g must be right too


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,V", [(5, 128), (33, 32)])
def test_gated_rms_norm_matches_reference(rows, V, w_dtype, poison_empty):
    import qwen35_export.kernels.gdn_gating.op  # noqa: F401

    gen = torch.Generator().manual_seed(rows)
    o = (torch.randn(rows, 3, V, generator=gen) * 3).to(torch.bfloat16).to(DEVICE)
    z = torch.randn(rows, 3, V, generator=gen).to(torch.bfloat16).to(DEVICE)
    w = (1 + 0.1 * torch.randn(V, generator=gen)).to(w_dtype).to(DEVICE)
    y = torch.ops.qwen35_triton.gated_rms_norm(o, z, w, 1e-6)
    ry = naive_gated_rms_norm(o, z, w)
    assert y.dtype == o.dtype
    assert_close("y", y, ry, 1e-3)


@pytest.mark.parametrize("B,T,HV,V", [(1, 37, 3, 128), (2, 5, 4, 32), (3, 1, 2, 32)])
def test_gated_rms_norm_reads_z_in_place(B, T, HV, V, poison_empty):
    """z as the model has it: a column slice of the input projection's [B, T, width] output viewed as
    [B, T, HV, V] (token stride = width). The kernel reads it in place (no copy) and gives exactly the
    contiguous result; the columns around the slice hold NaN, so reading them would show."""
    import qwen35_export.kernels.gdn_gating.op  # noqa: F401
    from qwen35_export.kernels.layout import token_rows

    gen = torch.Generator().manual_seed(B * 100 + T)
    o = (torch.randn(B, T, HV, V, generator=gen) * 3).to(torch.bfloat16).to(DEVICE)
    zc = torch.randn(B, T, HV, V, generator=gen).to(torch.bfloat16).to(DEVICE)
    w = (1 + 0.1 * torch.randn(V, generator=gen)).to(torch.bfloat16).to(DEVICE)
    wide = torch.full((B, T, 24 + HV * V + 8), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    wide[..., 24:24 + HV * V] = zc.reshape(B, T, HV * V)
    z = wide[..., 24:24 + HV * V].reshape(B, T, HV, V)
    assert not z.is_contiguous() and token_rows(z)[0].data_ptr() == z.data_ptr()
    y = torch.ops.qwen35_triton.gated_rms_norm(o, z, w, 1e-6)
    assert torch.equal(y, torch.ops.qwen35_triton.gated_rms_norm(o, zc, w, 1e-6))
    assert_close("y", y, naive_gated_rms_norm(o, zc, w), 1e-3)


def test_reference_op_is_the_reference():
    """`qwen35::gated_rms_norm` (what the layers call) computes naive_gated_rms_norm exactly."""
    import qwen35_export.model.ops  # noqa: F401

    gen = torch.Generator().manual_seed(3)
    o = torch.randn(2, 5, 4, 32, generator=gen).to(torch.bfloat16)
    z = torch.randn(2, 5, 4, 32, generator=gen).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(32, generator=gen)).to(torch.bfloat16)
    assert torch.equal(torch.ops.qwen35.gated_rms_norm(o, z, w, 1e-6), naive_gated_rms_norm(o, z, w))


def test_reference_matches_transformers():
    """naive_gated_rms_norm is the formula of transformers' Qwen3_5MoeRMSNormGated, bit for bit."""
    mod = pytest.importorskip("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    norm = mod.Qwen3_5MoeRMSNormGated(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64))
    o = torch.randn(7, 64, dtype=torch.bfloat16)
    z = torch.randn(7, 64, dtype=torch.bfloat16)
    assert torch.equal(naive_gated_rms_norm(o, z, norm.weight.data), norm(o, z))


def test_ops_export():
    """torch.export keeps both ops as single nodes (fake kernels give fp32 g/beta and y like o)."""
    import qwen35_export.kernels.gdn_gating.op  # noqa: F401

    class M(torch.nn.Module):
        def forward(self, A_log, a, dt_bias, b, o, z, w):
            g, beta = torch.ops.qwen35_triton.gdn_gating(A_log, a, dt_bias, b)
            return g, beta, torch.ops.qwen35_triton.gated_rms_norm(o, z, w, 1e-6)

    HV, V = 4, 32
    args = (torch.zeros(HV), torch.randn(2, 8, HV, dtype=torch.bfloat16), torch.zeros(HV),
            torch.randn(2, 8, HV, dtype=torch.bfloat16), torch.randn(2, 8, HV, V, dtype=torch.bfloat16),
            torch.randn(2, 8, HV, V, dtype=torch.bfloat16), torch.ones(V, dtype=torch.bfloat16))
    args = tuple(x.to(DEVICE) for x in args)
    ep = torch.export.export(M(), args)
    targets = [n.target for n in ep.graph.nodes]
    assert targets.count(torch.ops.qwen35_triton.gdn_gating.default) == 1
    assert targets.count(torch.ops.qwen35_triton.gated_rms_norm.default) == 1
    g_meta = next(n for n in ep.graph.nodes if n.target == torch.ops.qwen35_triton.gdn_gating.default).meta["val"][0]
    assert g_meta.dtype == torch.float32
