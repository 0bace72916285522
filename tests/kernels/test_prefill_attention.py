"""Flash prefill attention over the KV cache (any T) against the fp64 reference of `qwen35::decode_attention`.

Error bounds (relative RMS) as for the decode kernel (test_decode_attention.py): scores and softmax in fp32,
probabilities rounded to the cache dtype before P.V, so bf16 inputs carry ~2^-9 per probability plus one
bf16 rounding of the output: 1e-2. fp32 inputs: exact fp32 dots in the interpreter (1e-5); on a GPU
`tl.dot` takes fp32 operands as tf32 (10-bit mantissa): 5e-3.
"""

from __future__ import annotations

import pytest
import torch

from gdn_compare import DEVICE, ON_GPU, assert_close
from qwen35_export.kernels.attention import decode_attention_triton, naive_decode_attention
from qwen35_export.kernels.attention.prefill import prefill_attention_triton

SMALL = (16, 16, 4, 1)  # tiles small enough that interpreter-sized cases span several query and key blocks


def bound(dtype: torch.dtype) -> float:
    return 1e-2 if dtype == torch.bfloat16 else (5e-3 if ON_GPU else 1e-5)


def case(B, T, NH, KVH, D, Tmax, dtype, seed, start=None, lengths=None, poison=True):
    """Inputs whose cache positions at or past each row's max(start + lengths, 1) hold NaN: a kernel that
    reads one of them returns NaN, so every case also checks that the tail is never read."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, NH, D, generator=g).to(dtype)
    kc = torch.randn(B, KVH, Tmax, D, generator=g).to(dtype)
    vc = torch.randn(B, KVH, Tmax, D, generator=g).to(dtype)
    start = torch.zeros(B, dtype=torch.int64) if start is None else torch.tensor(start)
    lens = torch.full((B,), T) if lengths is None else torch.tensor(lengths)
    ref = naive_decode_attention(q, kc, vc, start, lens, D ** -0.5)
    if poison:
        for b in range(B):
            end = max(int(start[b] + lens[b]), 1)
            kc[b, :, end:] = float("nan")
            vc[b, :, end:] = float("nan")
    return [t.to(DEVICE) for t in (q, kc, vc, start, lens)], ref.to(DEVICE)


@pytest.mark.parametrize("B,T,NH,KVH,D,Tmax,dtype", [
    pytest.param(1, 9, 2, 2, 16, 9, torch.float32, id="T9-G1-cache-exactly-full"),
    pytest.param(1, 63, 4, 2, 32, 70, torch.float32, id="T63-G2"),
    pytest.param(1, 64, 4, 1, 32, 64, torch.bfloat16, id="T64-G4-bf16"),
    pytest.param(3, 65, 4, 2, 16, 81, torch.float32, id="B3-T65-G2"),
    pytest.param(2, 130, 8, 2, 16, 131, torch.bfloat16, id="B2-T130-G4-bf16"),
    pytest.param(1, 17, 2, 1, 64, 40, torch.bfloat16, id="T17-D64-bf16"),
])
def test_matches_reference(B, T, NH, KVH, D, Tmax, dtype):
    (q, kc, vc, start, lens), ref = case(B, T, NH, KVH, D, Tmax, dtype, seed=B * 1000 + T)
    out = prefill_attention_triton(q, kc, vc, start, lens, D ** -0.5, config=SMALL)
    assert out.dtype == q.dtype
    assert_close("prefill_attention", out, ref, bound(dtype))


@pytest.mark.parametrize("T,Tmax,start,lengths", [
    pytest.param(20, 60, [0, 5, 40], [20, 20, 20], id="continuation-after-cached-tokens"),
    pytest.param(33, 70, [0, 3, 30, 37], [33, 7, 1, 33], id="padding-rows-lengths-below-T"),
    pytest.param(17, 50, [33, 0], [17, 0], id="row-ending-at-cache-end-and-empty-row"),
    pytest.param(24, 41, [17, 16], [24, 24], id="start-not-multiple-of-block"),
])
def test_rows_with_offsets_and_padding(T, Tmax, start, lengths):
    """Prefill on top of cached tokens (start > 0: the unmasked loop covers earlier positions, the diagonal
    blocks start mid-block), padding queries past a row's length (they see the row's live positions), a row
    with no tokens (attends position 0 alone), a row whose prompt ends exactly at T_max."""
    B, NH, KVH, D = len(start), 4, 2, 16
    (q, kc, vc, s, lens), ref = case(B, T, NH, KVH, D, Tmax, torch.float32, seed=T, start=start, lengths=lengths)
    out = prefill_attention_triton(q, kc, vc, s, lens, 0.25, config=SMALL)
    assert_close("prefill_attention offsets/padding", out, ref, bound(torch.float32))


@pytest.mark.parametrize("config", [(16, 16, 4, 1), (32, 16, 4, 1), (16, 32, 4, 2)])
def test_tile_shapes(config):
    """Query and key blocks of different sizes (BLOCK_N > BLOCK_M makes the diagonal span key blocks that
    start below the query block)."""
    (q, kc, vc, start, lens), ref = case(2, 45, 4, 2, 16, 77, torch.float32, seed=5, start=[0, 19],
                                         lengths=[45, 40])
    out = prefill_attention_triton(q, kc, vc, start, lens, 0.25, config=config)
    assert_close(f"prefill_attention {config}", out, ref, bound(torch.float32))


def test_op_dispatch_by_T():
    """Through the launcher: T <= 8 (static) takes split-KV decoding, T > 8 the flash prefill kernel; both
    give the reference's numbers."""
    for T in (8, 9):
        (q, kc, vc, start, lens), ref = case(2, T, 4, 2, 16, 40, torch.float32, seed=T, start=[3, 0])
        out = decode_attention_triton(q, kc, vc, start, lens, 0.25)
        assert_close(f"decode_attention_triton T={T}", out, ref, bound(torch.float32))


@pytest.mark.skipif(not ON_GPU, reason="real-size case: needs a CUDA GPU (QWEN35_TRITON_GPU=1)")
@pytest.mark.parametrize("NH,T,start", [(16, 2048, 0), (32, 1000, 777)])
def test_real_size_cuda(NH, T, start):
    """35B-A3B / 397B attention geometry (2 KV heads, head dim 256), bf16, the default launch config."""
    Tmax = 4096
    (q, kc, vc, s, lens), ref = case(1, T, NH, 2, 256, Tmax, torch.bfloat16, seed=NH, start=[start])
    out = prefill_attention_triton(q, kc, vc, s, lens, 256 ** -0.5)
    assert_close("prefill_attention real size", out, ref, bound(torch.bfloat16))
