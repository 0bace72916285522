"""Split-KV decode attention kernel against the fp64 reference.

Error bounds (relative RMS): scores and the softmax run in fp32; the probabilities are rounded to the cache
dtype before the P.V product (as flash kernels do), so bf16 caches carry ~2^-9 relative error per
probability plus one bf16 rounding of the output: bound 1e-2. fp32 inputs: exact fp32 dots in the
interpreter (bound 1e-5); on a GPU `tl.dot` takes fp32 operands as tf32 (10-bit mantissa): bound 5e-3.
"""

from __future__ import annotations

import pytest
import torch

from gdn_compare import DEVICE, ON_GPU, assert_close
from qwen35_export.kernels.attention import decode_attention_triton, naive_decode_attention
from qwen35_export.kernels.attention.decode import SPLIT


def bound(dtype: torch.dtype) -> float:
    return 1e-2 if dtype == torch.bfloat16 else (5e-3 if ON_GPU else 1e-5)


def case(B, T, NH, KVH, D, Tmax, dtype, seed, lengths=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, NH, D, generator=g).to(dtype)
    kc = torch.randn(B, KVH, Tmax, D, generator=g).to(dtype)
    vc = torch.randn(B, KVH, Tmax, D, generator=g).to(dtype)
    start = torch.randint(0, Tmax - T + 1, (B,), generator=g)
    start[0] = Tmax - T  # row 0 fills the cache: every split is live
    lens = torch.full((B,), T) if lengths is None else torch.tensor(lengths)
    return [t.to(DEVICE) for t in (q, kc, vc, start, lens)]


@pytest.mark.parametrize("B,T,NH,KVH,D,Tmax,dtype", [
    pytest.param(1, 1, 4, 2, 256, 40, torch.bfloat16, id="B1-T1-G2-D256-Tmax40-bf16"),
    pytest.param(3, 1, 16, 2, 64, 300, torch.float32, id="B3-T1-G8-Tmax300-fp32"),
    pytest.param(2, 1, 32, 2, 256, 2 * SPLIT + 77, torch.bfloat16, id="B2-T1-G16-3splits-bf16"),
    pytest.param(3, 5, 8, 2, 64, 130, torch.float32, id="B3-T5-G4-fp32"),
    pytest.param(1, 8, 4, 4, 128, 65, torch.bfloat16, id="B1-T8-G1-bf16"),
])
def test_matches_reference(B, T, NH, KVH, D, Tmax, dtype, poison_empty):
    q, kc, vc, start, lens = case(B, T, NH, KVH, D, Tmax, dtype, seed=B * 100 + T)
    out = decode_attention_triton(q, kc, vc, start, lens, D ** -0.5)
    ref = naive_decode_attention(q, kc, vc, start, lens, D ** -0.5)
    assert out.dtype == q.dtype
    assert_close("decode_attention", out, ref, bound(dtype))


def test_padding_rows_and_empty_rows(poison_empty):
    """Rows with fewer real tokens than T (padding queries attend to the row's live positions), a row with
    no token at position 0 (lengths 0: attends position 0 alone), and a row ending exactly at T_max."""
    B, T, NH, KVH, D, Tmax = 4, 3, 4, 2, 64, SPLIT + 5
    q, kc, vc, start, _ = case(B, T, NH, KVH, D, Tmax, torch.float32, seed=7)
    start = torch.tensor([0, 10, Tmax - 3, SPLIT - 1], device=DEVICE)
    lens = torch.tensor([0, 2, 3, 1], device=DEVICE)
    out = decode_attention_triton(q, kc, vc, start, lens, 0.125)
    assert_close("decode_attention padded", out, naive_decode_attention(q, kc, vc, start, lens, 0.125),
                 bound(torch.float32))


@pytest.mark.parametrize("T,Tmax,start,lengths", [
    pytest.param(3, 2 * SPLIT + 3, [SPLIT - 1, SPLIT - 2, 2 * SPLIT], [3, 3, 3], id="queries-across-a-split"),
    pytest.param(3, 2 * SPLIT + 3, [2 * SPLIT + 3, 7, 2 * SPLIT + 1], [0, 1, 2], id="full-row-and-end-of-cache"),
    pytest.param(8, SPLIT + 8, [SPLIT, 0], [8, 5], id="T8-tail-split"),
])
def test_rows_spanning_splits(T, Tmax, start, lengths, poison_empty):
    """The T queries of one row straddle a split boundary (query 0 sees none of the next split), a row whose
    cache is full (start == T_max, lengths 0), rows ending at T_max with padding queries after them."""
    B, NH, KVH, D = len(start), 16, 2, 64
    q, kc, vc, _, _ = case(B, T, NH, KVH, D, Tmax, torch.float32, seed=T)
    start, lens = torch.tensor(start, device=DEVICE), torch.tensor(lengths, device=DEVICE)
    out = decode_attention_triton(q, kc, vc, start, lens, 0.125)
    assert_close("decode_attention across splits", out, naive_decode_attention(q, kc, vc, start, lens, 0.125),
                 bound(torch.float32))


def test_never_reads_past_the_row_length():
    """Positions at or past max(start + lengths) must not matter: NaN there leaves the output finite and equal."""
    B, T, NH, KVH, D, Tmax = 2, 1, 8, 2, 64, 2 * SPLIT
    q, kc, vc, _, lens = case(B, T, NH, KVH, D, Tmax, torch.float32, seed=3)
    start = torch.tensor([5, SPLIT + 9], device=DEVICE)
    ref = naive_decode_attention(q, kc, vc, start, lens, 0.125)
    for b in range(B):
        kc[b, :, int(start[b]) + 1:] = float("nan")
        vc[b, :, int(start[b]) + 1:] = float("nan")
    out = decode_attention_triton(q, kc, vc, start, lens, 0.125)
    assert_close("decode_attention NaN tail", out, ref, bound(torch.float32))


def test_op_matches_reference_op():
    """`qwen35_triton::decode_attention` equals `qwen35::decode_attention` (the reference the model calls)."""
    import qwen35_export.kernels.attention.op  # noqa: F401  (registers the op)
    import qwen35_export.model.ops  # noqa: F401

    q, kc, vc, start, lens = case(3, 1, 4, 2, 128, 70, torch.bfloat16, seed=11)
    out = torch.ops.qwen35_triton.decode_attention(q, kc, vc, start, lens, 128 ** -0.5)
    ref = torch.ops.qwen35.decode_attention(q, kc, vc, start, lens, 128 ** -0.5)
    assert_close("op vs reference op", out, ref, bound(torch.bfloat16))


@pytest.mark.parametrize("shapes,match", [
    pytest.param(dict(NH=6, KVH=4), "multiple of", id="NH-not-multiple-of-KVH"),
    pytest.param(dict(D=80), "power of two", id="D80"),
    pytest.param(dict(cache_D=32), "k_cache", id="cache-D-differs"),
    pytest.param(dict(cache_B=1), "k_cache", id="cache-batch-differs"),
    pytest.param(dict(v_Tmax=40), "v_cache", id="v-cache-shorter"),
    pytest.param(dict(len_B=3), "lengths", id="lengths-not-B"),
])
def test_launcher_rejects_bad_shapes(shapes, match):
    """Shapes the kernel cannot index correctly (heads of a group left unwritten, loads past a cache) are
    refused before launching, naming the tensor."""
    s = dict(B=2, T=1, NH=4, KVH=2, D=64, Tmax=48) | shapes
    B, D = s["B"], s["D"]
    q = torch.randn(B, s["T"], s["NH"], D, device=DEVICE)
    kc = torch.randn(s.get("cache_B", B), s["KVH"], s["Tmax"], s.get("cache_D", D), device=DEVICE)
    vc = torch.randn(B, s["KVH"], s.get("v_Tmax", s["Tmax"]), D, device=DEVICE)
    start = torch.zeros(B, dtype=torch.int64, device=DEVICE)
    lens = torch.ones(s.get("len_B", B), dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        decode_attention_triton(q, kc, vc, start, lens, 0.125)
