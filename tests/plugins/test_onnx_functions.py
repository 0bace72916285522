"""The ONNX function bodies of the `qwen35` nodes, run by ONNX Runtime, against the torch reference ops.

Bound: both sides compute in fp32 and differ only in rounding order (MatMul vs einsum, Sigmoid-based
SiLU): 1e-5 of the largest reference value, far below any real error (a wrong head grouping, a missed
decay or padding leaking into the state moves results by O(1)).
"""

from __future__ import annotations

import pytest
import torch

from onnx_helpers import assert_close, run_node
from qwen35_export.checkpoint.fp8 import quantize_fp8_block
from qwen35_export.model import ops

REL = 1e-5


@pytest.mark.parametrize("B,T,C,W,lengths", [
    pytest.param(2, 1, 8, 4, [1, 1], id="decode-T1"),
    pytest.param(3, 7, 24, 4, [7, 1, 4], id="T7-B3-padded"),
    pytest.param(2, 65, 16, 3, [65, 2], id="T65-W3"),
])
def test_causal_conv1d(B, T, C, W, lengths) -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(B, T, C, generator=g), torch.randn(C, W, generator=g)
    state, L = torch.randn(B, C, W - 1, generator=g), torch.tensor(lengths)
    ry, rfinal = ops.causal_conv1d(x, w, state, L)
    y, final = run_node("CausalConv1d", [x, w, state, L], [ry, rfinal])
    assert_close("y", y, ry, REL)
    # the final state is a gather of inputs: exact
    assert torch.equal(final, rfinal)


@pytest.mark.parametrize("B,T,HK,HV,K,V", [
    pytest.param(2, 1, 2, 4, 16, 8, id="decode-T1-G2"),
    pytest.param(3, 9, 1, 3, 8, 16, id="T9-G3"),
    pytest.param(1, 65, 2, 2, 32, 32, id="T65-G1"),
])
def test_gated_delta_rule(B, T, HK, HV, K, V) -> None:
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(B, T, HK, K, generator=g), torch.randn(B, T, HK, K, generator=g)
    v = torch.randn(B, T, HV, V, generator=g)
    gate = -torch.rand(B, T, HV, generator=g) * 2
    beta = torch.rand(B, T, HV, generator=g)
    gate[0, T - 1], beta[0, T - 1] = 0.0, 0.0  # a padding token: must leave row 0's state untouched
    h0 = torch.randn(B, HV, K, V, generator=g)
    ro, rht = ops.gated_delta_rule(q, k, v, gate, beta, h0)
    o, ht = run_node("GatedDeltaRule", [q, k, v, gate, beta, h0], [ro, rht])
    assert_close("o", o, ro, REL)
    assert_close("ht", ht, rht, REL)


@pytest.mark.parametrize("N,E,k", [pytest.param(1, 8, 2, id="N1-E8-k2"), pytest.param(37, 16, 4, id="N37-E16-k4")])
def test_moe_router(N, E, k) -> None:
    # No exact ties here: ORT's TopK and torch.topk break ties differently (both implementation-defined,
    # e.g. torch picks ids [2, 4] of three equal maxima at 1, 2, 4); real-valued router logits do not tie.
    logits = torch.randn(N, E, generator=torch.Generator().manual_seed(2)) * 3
    rw, rids = ops.moe_router(logits, k)
    w, ids = run_node("MoERouter", [logits], [rw, rids], top_k=k)
    assert torch.equal(ids, rids)
    assert_close("weights", w, rw, REL)


def _moe_inputs(N: int, E: int, k: int, H: int, I: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g)
    w, ids = ops.moe_router(torch.randn(N, E, generator=g), k)
    return x, w, ids, torch.randn(E, 2 * I, H, generator=g) * 0.05, torch.randn(E, H, I, generator=g) * 0.05


@pytest.mark.parametrize("N,E,k,H,I", [
    pytest.param(1, 8, 2, 32, 16, id="decode-N1"),
    pytest.param(29, 16, 4, 64, 48, id="N29-E16-unused-experts"),
])
def test_moe_experts(N, E, k, H, I) -> None:
    x, w, ids, w13, w2 = _moe_inputs(N, E, k, H, I)
    ref = ops.moe_experts(x, w, ids, w13, w2)
    (y,) = run_node("MoE", [x, w, ids, w13, w2], [ref])
    assert_close("y", y, ref, REL)


def test_moe_experts_fp8() -> None:
    """e4m3 experts with 128x128 block scales; H = 200 is not a multiple of the block."""
    x, w, ids, w13, w2 = _moe_inputs(9, 4, 2, 200, 128)
    (q13, s13), (q2, s2) = quantize_fp8_block(w13), quantize_fp8_block(w2)
    ref = ops.moe_experts_fp8(x, w, ids, q13, s13, q2, s2)
    (y,) = run_node("MoEFP8", [x, w, ids, q13, s13, q2, s2], [ref])
    assert_close("y", y, ref, REL)


class _DecodeAttention(torch.nn.Module):
    def forward(self, q, k_cache, v_cache, start, lengths):
        return torch.ops.qwen35.decode_attention(q, k_cache, v_cache, start, lengths, 0.125)


@pytest.mark.parametrize("start,lengths", [
    pytest.param([5, 0, 37], [1, 1, 1], id="decode"),
    pytest.param([0, 36, 12], [0, 4, 2], id="T4-lengths0-cache-end-padded"),
])
def test_decode_attention_standard_ops(tmp_path, start, lengths) -> None:
    """`qwen35::decode_attention` exports as standard ops (no custom node); ONNX Runtime on that graph equals the
    reference op, padding queries, a lengths-0 row and a row ending at the cache end included."""
    import onnx
    import onnxruntime as ort

    from qwen35_export.plugins.onnx.translate import translation_table

    B, NH, KVH, D, Tmax = 3, 8, 2, 64, 40
    T = 1 if max(lengths) <= 1 else 4
    g = torch.Generator().manual_seed(1)
    q, kc, vc = torch.randn(B, T, NH, D, generator=g), torch.randn(B, KVH, Tmax, D, generator=g), \
        torch.randn(B, KVH, Tmax, D, generator=g)
    args = (q, kc, vc, torch.tensor(start), torch.tensor(lengths))
    path = tmp_path / "da.onnx"
    torch.onnx.export(_DecodeAttention(), args, str(path), dynamo=True, opset_version=23,
                      custom_translation_table=translation_table())
    m = onnx.load(str(path))
    assert not [n for n in m.graph.node if n.domain not in ("", "ai.onnx")], "expected standard ops only"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})[0]
    assert_close("decode_attention", torch.from_numpy(out), ops.decode_attention(*args, 0.125), REL)
