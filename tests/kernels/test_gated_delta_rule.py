"""Gated delta rule kernels (chunked prefill, recurrent decode, torch op) against the fp64 naive reference.

Runs the Triton kernels on the CPU through the interpreter (conftest.py); small head dims keep it fast.
Error bounds (relative RMS, see gdn_compare.assert_close), from the precision of each path:
- fp32 inputs: every product in fp32 (the interpreter's fp32 dot is exact fp32): observed ~1e-6 at
  T <= 200, bound 2e-5. On a GPU fp32 dots run in tf32 (10-bit mantissa): bound 5e-3.
- bf16 inputs, chunked: the dot operands (normalised k, the (I+L)^-1 blocks, w, u, v_new, the state S)
  are rounded to bf16 (2^-9 relative each) on the way to o, and o is stored in bf16: observed 3e-3 to
  5e-3, bound 1.2e-2.
- recurrent: all math in fp32 on bf16-exact inputs; o stored in v's dtype: bound 1e-5 for the fp32
  state and fp32 o, 5e-3 (one bf16 rounding, 2^-9 relative at most) for bf16 o.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gdn_compare import DEVICE, ON_GPU, assert_close, needs_cuda
from qwen35_export.kernels.gated_delta_rule import (
    chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, naive_gated_delta_rule)

from qwen35_export.kernels.gated_delta_rule import chunk as chunk_mod

FP32_BOUND = 5e-3 if ON_GPU else 2e-5
BF16_BOUND = 1.2e-2


def bound(dtype: torch.dtype) -> float:
    return BF16_BOUND if dtype == torch.bfloat16 else FP32_BOUND


def make_inputs(B: int, T: int, H: int, HV: int, K: int, V: int, dtype: torch.dtype, seed: int = 0,
                N: int | None = None, h0: bool = True):
    """Random inputs: fresh draws per case; g = logsigmoid(randn) <= 0, beta in [0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen).to(dtype)
    k = torch.randn(B, T, H, K, generator=gen).to(dtype)
    v = torch.randn(B, T, HV, V, generator=gen).to(dtype)
    g = F.logsigmoid(torch.randn(B, T, HV, generator=gen))
    beta = torch.rand(B, T, HV, generator=gen)
    state = torch.randn(N or B, HV, K, V, generator=gen) if h0 else None
    to = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    return tuple(to(x) for x in (q, k, v, g, beta, state))


CHUNK_CASES = [
    # (B, T, H, HV, K, V, dtype, h0)
    pytest.param(1, 1, 1, 1, 32, 32, torch.float32, False, id="T1-B1-HV1-fp32-h0zero"),
    pytest.param(3, 2, 2, 4, 32, 32, torch.bfloat16, True, id="T2-B3-HV4-bf16"),
    pytest.param(1, 63, 1, 2, 32, 32, torch.float32, True, id="T63-B1-HV2-fp32"),
    pytest.param(3, 64, 2, 2, 32, 32, torch.bfloat16, False, id="T64-B3-HV2-bf16-h0zero"),
    pytest.param(1, 65, 2, 8, 32, 64, torch.bfloat16, True, id="T65-B1-HV8-HK2-V64-bf16"),
    pytest.param(3, 65, 1, 1, 32, 32, torch.float32, True, id="T65-B3-HV1-fp32"),
    pytest.param(1, 200, 2, 4, 32, 32, torch.float32, True, id="T200-B1-HV4-fp32"),
    pytest.param(3, 200, 3, 3, 32, 32, torch.bfloat16, True, id="T200-B3-HV3-bf16"),
    pytest.param(1, 130, 1, 2, 128, 128, torch.bfloat16, True, id="T130-B1-HV2-K128-bf16"),
]


@pytest.fixture(params=["fused", "split"])
def fwd_mode(request, monkeypatch):
    """Both second stages of the chunked kernel: one sequential kernel, or sequential states + parallel o."""
    monkeypatch.setattr(chunk_mod, "FWD_MODE", request.param)
    return request.param


def check_chunk(B: int, T: int, H: int, HV: int, K: int, V: int, dtype: torch.dtype, h0: bool, label: str) -> None:
    """chunk_gated_delta_rule on fresh inputs (initial state when h0) against the fp64 reference."""
    q, k, v, g, beta, state = make_inputs(B, T, H, HV, K, V, dtype, seed=T * 7 + B, h0=h0)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    ro, rh = naive_gated_delta_rule(q, k, v, g, beta, state)
    assert o.dtype == v.dtype and ht.dtype == torch.float32
    assert_close(f"o {label}", o, ro, bound(dtype))
    assert_close(f"ht {label}", ht, rh, bound(dtype))


def check_chunk_varlen(lens: list[int], H: int, HV: int, dtype: torch.dtype, h0: bool, label: str) -> None:
    """Packed sequences of the given lengths in one call against the fp64 reference."""
    T = sum(lens)
    q, k, v, g, beta, state = make_inputs(1, T, H, HV, 32, 32, dtype, seed=len(lens), N=len(lens), h0=h0)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, cu_seqlens=cu)
    ro, rh = naive_gated_delta_rule(q, k, v, g, beta, state, cu_seqlens=cu)
    assert_close(f"o {label}", o, ro, bound(dtype))
    assert_close(f"ht {label}", ht, rh, bound(dtype))


@pytest.mark.parametrize("B,T,H,HV,K,V,dtype,h0", CHUNK_CASES)
def test_chunk_matches_reference(B, T, H, HV, K, V, dtype, h0, fwd_mode, poison_empty):
    check_chunk(B, T, H, HV, K, V, dtype, h0, fwd_mode)


# chunk.py's variant switches (split mode). The tf32 merges run only on a GPU: under the interpreter every
# fp32 product is exact whatever precision is asked for, so they would repeat "wyfull".
def _switches(form: str = "blocks", merge: str = "ieee", prenorm: bool = False, decay_v: bool = False) -> dict:
    return dict(WY_FORM=form, WY_MERGE=merge, PRENORM=prenorm, H_DECAY_V=decay_v)


# Each variant sets all four switches (the default is full + tf32 + prenorm + decay_v, which the whole sweep
# above runs; fp32 inputs take the blocks form whatever WY_FORM says). "blocks" is the earlier default.
VARIANTS = {
    "blocks": _switches(),
    "wyfull": _switches("full"),
    "prenorm": _switches(prenorm=True),
    "prenorm-decayv": _switches(prenorm=True, decay_v=True),
    "wyfull-ieee-prenorm-decayv": _switches("full", "ieee", True, True),
    **({"wyfull-tf32x3-prenorm-decayv": _switches("full", "tf32x3", True, True)} if ON_GPU else {}),
}
# the representative subset every variant runs (the default path runs the whole sweep above):
# T 1/2/63/65/200, HV/HK 1, 2 and 4, with and without an initial state, bf16 and fp32, B > 1
VARIANT_CASES = [p for p in CHUNK_CASES if p.id in (
    "T1-B1-HV1-fp32-h0zero", "T2-B3-HV4-bf16", "T63-B1-HV2-fp32", "T65-B1-HV8-HK2-V64-bf16",
    "T200-B1-HV4-fp32")]


@pytest.fixture(params=list(VARIANTS))
def variant(request, monkeypatch):
    """One variant of the split path, its switches set on chunk.py for the test."""
    monkeypatch.setattr(chunk_mod, "FWD_MODE", "split")
    for name, val in VARIANTS[request.param].items():
        monkeypatch.setattr(chunk_mod, name, val)
    return request.param


@pytest.mark.parametrize("B,T,H,HV,K,V,dtype,h0", VARIANT_CASES)
def test_chunk_variant_matches_reference(B, T, H, HV, K, V, dtype, h0, variant, poison_empty):
    check_chunk(B, T, H, HV, K, V, dtype, h0, variant)


@pytest.mark.parametrize("mode", ["subst", "joint", "power"])
def test_block_inverse_modes_agree(mode, monkeypatch):
    """Every WY_INV mode (substitution per block, one substitution over the four-block stack, the power
    product) matches the fp64 reference; the two substitutions compute the same numbers exactly."""
    q, k, v, g, beta, state = make_inputs(2, 130, 2, 4, 32, 32, torch.bfloat16, seed=11)
    monkeypatch.setattr(chunk_mod, "WY_FORM", "blocks")  # WY_INV is the blocks form's (full has its own merge)
    monkeypatch.setattr(chunk_mod, "WY_INV", "subst")
    o1, h1 = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    monkeypatch.setattr(chunk_mod, "WY_INV", mode)
    o2, h2 = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    ro, rh = naive_gated_delta_rule(q, k, v, g, beta, state)
    assert_close(f"o {mode}", o2, ro, BF16_BOUND)
    assert_close(f"ht {mode}", h2, rh, BF16_BOUND)
    if mode == "joint" and not ON_GPU:  # same operations in the same order under the interpreter
        assert torch.equal(o1, o2) and torch.equal(h1, h2)


VARLEN_CASES = [
    pytest.param([1, 63, 64, 65, 200, 7], 2, 4, torch.bfloat16, True, id="lens1-63-64-65-200-7-HV4-bf16"),
    pytest.param([130, 2, 64], 1, 1, torch.float32, True, id="lens130-2-64-HV1-fp32"),
    pytest.param([5, 128, 1], 2, 2, torch.float32, False, id="lens5-128-1-HV2-fp32-h0zero"),
]


@pytest.mark.parametrize("lens,H,HV,dtype,h0", VARLEN_CASES)
def test_chunk_varlen_matches_reference(lens, H, HV, dtype, h0, fwd_mode, poison_empty):
    check_chunk_varlen(lens, H, HV, dtype, h0, fwd_mode)


VARIANT_VARLEN_CASES = [  # short packed batches for the variants
    pytest.param([1, 65, 7], 2, 8, torch.bfloat16, True, id="lens1-65-7-HV8-HK2-bf16"),
    VARLEN_CASES[1],
]


@pytest.mark.parametrize("lens,H,HV,dtype,h0", VARIANT_VARLEN_CASES)
def test_chunk_variant_varlen_matches_reference(lens, H, HV, dtype, h0, variant, poison_empty):
    """Packed sequences: every chunk of every sequence, normalised q/k written once per key head."""
    check_chunk_varlen(lens, H, HV, dtype, h0, variant)


@pytest.mark.parametrize("split", [64, 100], ids=["at-chunk-boundary", "mid-chunk"])
def test_chunk_split_prefill_equals_one_call(split, fwd_mode):
    """Prefill of 200 tokens in two calls (state carried) equals one call: bitwise when the split falls on
    a chunk boundary (same chunks, fp32 state stored and reloaded exactly), to fp32 rounding elsewhere."""
    q, k, v, g, beta, state = make_inputs(2, 200, 2, 4, 32, 32, torch.float32, seed=5)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    a, b = slice(0, split), slice(split, 200)
    o1, h1 = chunk_gated_delta_rule(q[:, a], k[:, a], v[:, a], g[:, a], beta[:, a], initial_state=state)
    o2, h2 = chunk_gated_delta_rule(q[:, b], k[:, b], v[:, b], g[:, b], beta[:, b], initial_state=h1)
    o12 = torch.cat([o1, o2], dim=1)
    if split % 64 == 0:
        assert torch.equal(o12, o) and torch.equal(h2, ht)
    else:
        assert_close("o split", o12, o, FP32_BOUND)
        assert_close("ht split", h2, ht, FP32_BOUND)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])  # fp32 takes blocks
def test_chunk_variant_split_prefill_equals_one_call(variant, dtype):
    """A variant's prefill split at a chunk boundary equals one call bitwise (as the default path's)."""
    q, k, v, g, beta, state = make_inputs(1, 130, 1, 2, 32, 32, dtype, seed=6)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    a, b = slice(0, 64), slice(64, 130)
    o1, h1 = chunk_gated_delta_rule(q[:, a], k[:, a], v[:, a], g[:, a], beta[:, a], initial_state=state)
    o2, h2 = chunk_gated_delta_rule(q[:, b], k[:, b], v[:, b], g[:, b], beta[:, b], initial_state=h1)
    assert torch.equal(torch.cat([o1, o2], dim=1), o) and torch.equal(h2, ht)


@pytest.mark.parametrize("T", [63, 64, 130])
def test_prefill_then_decode_equals_longer_prefill(T):
    """Prefill(T) then one recurrent decode step equals prefill(T+1): output of the new token and state."""
    q, k, v, g, beta, state = make_inputs(3, T + 1, 2, 4, 32, 32, torch.float32, seed=T)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    p = slice(0, T)
    _, hp = chunk_gated_delta_rule(q[:, p], k[:, p], v[:, p], g[:, p], beta[:, p], initial_state=state)
    d = slice(T, T + 1)
    od, hd = fused_recurrent_gated_delta_rule(q[:, d], k[:, d], v[:, d], g[:, d], beta[:, d], initial_state=hp)
    assert_close("o of token T", od, o[:, d], FP32_BOUND)
    assert_close("state after T+1", hd, ht, FP32_BOUND)


RECURRENT_CASES = [
    pytest.param(1, 1, 1, 1, torch.float32, id="T1-B1-HV1-fp32"),
    pytest.param(3, 1, 2, 4, torch.bfloat16, id="T1-B3-HV4-bf16"),
    pytest.param(3, 2, 1, 2, torch.float32, id="T2-B3-HV2-fp32"),
    pytest.param(1, 8, 2, 4, torch.bfloat16, id="T8-B1-HV4-bf16"),
]


@pytest.mark.parametrize("B,T,H,HV,dtype", RECURRENT_CASES)
def test_recurrent_pool_matches_reference(B, T, H, HV, dtype, poison_empty):
    """State pool updated in place at the slots, other rows untouched, -1 rows skipped; per-step states."""
    K = V = 32
    q, k, v, g, beta, _ = make_inputs(B, T, H, HV, K, V, dtype, seed=B * 10 + T, h0=False)
    gen = torch.Generator().manual_seed(1)
    pool = torch.randn(B + 4, HV, K, V, generator=gen).to(DEVICE)
    slot = torch.randperm(B + 4, generator=gen)[:B].to(DEVICE)
    if B > 1:
        slot[1] = -1  # a padding row of a fixed-size batch
    live = (slot >= 0).nonzero().flatten()
    pool0 = pool.clone()
    o, ht, hs = fused_recurrent_gated_delta_rule(q, k, v, g, beta, state_pool=pool, slot_idx=slot, keep_steps=True)
    assert ht is None
    ro, rh, rs = naive_gated_delta_rule(q[live], k[live], v[live], g[live], beta[live], pool0[slot[live]],
                                        keep_steps=True)
    assert_close("o", o[live], ro, 5e-3 if dtype == torch.bfloat16 else 1e-5)
    assert_close("pool at slots", pool[slot[live]], rh, 1e-5)
    assert_close("per-step states", hs[live], rs, 1e-5)
    untouched = torch.ones(B + 4, dtype=torch.bool, device=DEVICE)
    untouched[slot[live]] = False
    assert torch.equal(pool[untouched], pool0[untouched])


def test_recurrent_initial_state_api(poison_empty):
    q, k, v, g, beta, state = make_inputs(2, 3, 2, 2, 32, 32, torch.float32, seed=3)
    o, ht = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    ro, rh = naive_gated_delta_rule(q, k, v, g, beta, state)
    assert_close("o", o, ro, 1e-5)
    assert_close("ht", ht, rh, 1e-5)


@pytest.mark.parametrize("T", [1, 8, 9, 70], ids=["T1-recurrent", "T8-recurrent", "T9-chunk", "T70-chunk"])
def test_triton_op_matches_reference_op(T, poison_empty):
    """`qwen35_triton::gated_delta_rule` equals `qwen35::gated_delta_rule` on the padded layout, padding
    tokens (g = 0, beta = 0) included: both paths of the op's dispatch."""
    import qwen35_export.kernels.gated_delta_rule.op  # noqa: F401  (registers the op)
    import qwen35_export.model.ops  # noqa: F401

    B = 3
    q, k, v, g, beta, state = make_inputs(B, T, 2, 4, 32, 32, torch.float32, seed=T)
    lengths = [T, max(1, T - 5), 1]
    for b, L in enumerate(lengths):
        g[b, L:] = 0
        beta[b, L:] = 0
    o, ht = torch.ops.qwen35_triton.gated_delta_rule(q, k, v, g, beta, state)
    ro, rh = torch.ops.qwen35.gated_delta_rule(q, k, v, g, beta, state)
    assert_close("o", o, ro, FP32_BOUND)
    assert_close("ht", ht, rh, FP32_BOUND)
    # padding left the state of the short rows where their last real token put it
    _, h1 = naive_gated_delta_rule(q[2:, :1], k[2:, :1], v[2:, :1], g[2:, :1], beta[2:, :1], state[2:])
    assert_close("ht of a 1-token row", ht[2:], h1, FP32_BOUND)


@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (2, 5)])
def test_inplace_op_matches_functional_op(B, T):
    """`qwen35_triton::gated_delta_rule_` (graph/reinplace_state.py's op) writes into `state` exactly the
    state the functional op returns and returns the same o: same kernel, same launch, h0 and ht one tensor."""
    import qwen35_export.kernels.gated_delta_rule.op  # noqa: F401

    q, k, v, g, beta, state = make_inputs(B, T, 2, 4, 32, 32, torch.bfloat16, seed=B * 10 + T)
    state = state.to(DEVICE)
    q, k, v, g, beta = (x.to(DEVICE) for x in (q, k, v, g, beta))
    o_ref, ht_ref = torch.ops.qwen35_triton.gated_delta_rule(q, k, v, g, beta, state)
    st = state.clone()
    o = torch.ops.qwen35_triton.gated_delta_rule_(q, k, v, g, beta, st)
    assert torch.equal(o, o_ref) and torch.equal(st, ht_ref)
    assert not torch.equal(st, state)  # it did write (the random inputs move every state)


def test_inplace_op_refuses_what_it_cannot_update():
    """Prefill lengths (the chunked path keeps the functional op) and a state it cannot write in place are
    errors naming the op and what it found, not wrong numbers."""
    import qwen35_export.kernels.gated_delta_rule.op  # noqa: F401

    q, k, v, g, beta, state = make_inputs(1, 9, 2, 4, 32, 32, torch.bfloat16)
    with pytest.raises(ValueError, match=r"gated_delta_rule_: T=9 .* T <= 8"):
        torch.ops.qwen35_triton.gated_delta_rule_(q, k, v, g, beta, state)
    q, k, v, g, beta, state = make_inputs(2, 1, 2, 4, 32, 32, torch.bfloat16)
    with pytest.raises(ValueError, match=r"state \(2, 4, 32, 32\) .*contiguous: False"):
        torch.ops.qwen35_triton.gated_delta_rule_(q, k, v, g, beta, state.transpose(2, 3))


def test_reinplaced_decode_graph_matches_functional():
    """A GDN decode layer graph after graph/reinplace_state.py (Triton ops, state updated in place) against
    the same graph before it: bit for bit the same hidden states, conv state and recurrent state in the
    state inputs, and a padding row's states left alone."""
    import copy

    from qwen35_export.checkpoint.writer import random_tensor
    from qwen35_export.config import preset
    from qwen35_export.exporter import capture as C
    from qwen35_export.graph.fuse_weights import fuse_layer_weights
    from qwen35_export.graph.reinplace_state import reinplace_state
    from qwen35_export.graph.substitute_custom_ops import substitute_custom_ops, triton_implementations
    from qwen35_export.model.weights import layer_weight_shapes

    cfg = preset("tiny", num_hidden_layers=4)
    w = {n: random_tensor(f"layers.0.{n}", s, seed=0) for n, s in layer_weight_shapes(cfg, 0).items()}
    w = fuse_layer_weights({n: t if n.endswith(("A_log", "dt_bias")) else t.bfloat16() for n, t in w.items()})[0]
    w = {n: t.to(DEVICE) for n, t in w.items()}
    ep, names = C.capture_gdn(cfg, w, "decode", C.CaptureShapes(max_batch=8, max_seq_len=64), torch.bfloat16,
                              torch.device(DEVICE))
    functional, _ = substitute_custom_ops(ep, triton_implementations())
    inplace, counts = reinplace_state(copy.deepcopy(functional))
    assert counts == {"gated_delta_rule_": 1, "causal_conv1d_": 1}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, cfg.hidden_size, generator=gen).bfloat16().to(DEVICE)
    lengths = torch.tensor([1, 1, 0], device=DEVICE)  # row 2: a CUDA-graph bucket's padding row
    conv = torch.randn(3, cfg.conv_dim, cfg.linear_conv_kernel_dim - 1, generator=gen).bfloat16().to(DEVICE)
    rec = torch.randn(3, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim,
                      generator=gen).to(DEVICE)
    states = [(conv.clone(), rec.clone()) for _ in range(2)]
    outs = [m.module()(x, lengths, c, r, *[w[n] for n in names])
            for m, (c, r) in zip((functional, inplace), states)]
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])
    assert not torch.equal(states[1][1][:2], rec[:2]) and torch.equal(states[1][1][2], rec[2])
    assert not torch.equal(states[1][0][:2], conv[:2]) and torch.equal(states[1][0][2], conv[2])


def test_triton_op_exports():
    """torch.export traces the op through its fake kernel (dynamic T), keeping it as one node."""
    import qwen35_export.kernels.gated_delta_rule.op  # noqa: F401

    class M(torch.nn.Module):
        def forward(self, q, k, v, g, beta, h0):
            return torch.ops.qwen35_triton.gated_delta_rule(q, k, v, g, beta, h0)

    args = make_inputs(2, 16, 2, 4, 32, 32, torch.bfloat16)
    T = torch.export.Dim("T", min=2, max=4096)
    ep = torch.export.export(M(), args, dynamic_shapes=({1: T}, {1: T}, {1: T}, {1: T}, {1: T}, None))
    nodes = [n for n in ep.graph.nodes if n.target == torch.ops.qwen35_triton.gated_delta_rule.default]
    assert len(nodes) == 1
    o_meta = nodes[0].meta["val"][0]
    assert o_meta.dtype == torch.bfloat16 and o_meta.shape[2:] == (4, 32)


@needs_cuda
def test_state_error_does_not_grow_with_T():
    """T = 8192 on the device, 397B heads: the final-state error against fp64 stays flat as T grows
    (decay forgets old rounding); a growing error would mean state drift. bench/gdn.py reports the same."""
    q, k, v, g, beta, _ = make_inputs(1, 8192, 16, 64, 128, 128, torch.bfloat16, h0=False)
    q, k, v, g, beta = (x.cuda() for x in (q, k, v, g, beta))
    h = torch.zeros(1, 64, 128, 128, dtype=torch.float64, device="cuda")
    errs, prev = [], 0
    for m in (1024, 2048, 4096, 8192):
        s = slice(prev, m)
        _, h = naive_gated_delta_rule(q[:, s], k[:, s], v[:, s], g[:, s], beta[:, s], h)
        _, ht = chunk_gated_delta_rule(q[:, :m], k[:, :m], v[:, :m], g[:, :m], beta[:, :m])
        errs.append(assert_close(f"ht at T={m}", ht, h, BF16_BOUND))
        prev = m
    assert errs[-1] <= 1.5 * errs[0], f"state error grows with T: {errs}"


def test_recurrent_gating_in_kernel(poison_empty):
    """Decode with the GDN gating fused in (raw a, b + A_log, dt_bias) equals gating then decode."""
    from qwen35_export.kernels.gdn_gating import naive_gdn_gating

    q, k, v, _, _, state = make_inputs(3, 2, 2, 4, 32, 32, torch.bfloat16, seed=4)
    gen = torch.Generator().manual_seed(4)
    a = (torch.randn(3, 2, 4, generator=gen) * 4).to(torch.bfloat16).to(DEVICE)
    b = torch.randn(3, 2, 4, generator=gen).to(torch.bfloat16).to(DEVICE)
    A_log = torch.empty(4).uniform_(0.01, 16, generator=gen).log().to(DEVICE)
    dt_bias = torch.randn(4, generator=gen).to(DEVICE)
    o, ht = fused_recurrent_gated_delta_rule(q, k, v, a, b, initial_state=state, A_log=A_log, dt_bias=dt_bias)
    g, beta = naive_gdn_gating(A_log.double(), a.double(), dt_bias.double(), b.double())
    ro, rh = naive_gated_delta_rule(q, k, v, g, beta, state)
    assert_close("o", o, ro, 5e-3)  # bf16 output: one rounding
    assert_close("ht", ht, rh, 1e-5)


def _as_conv_slices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: int = 8):
    """q, k, v copied into column slices of one [B, T, C + pad] tensor, as the model takes them from the conv
    output (token stride C + pad, not heads x head_dim); the pad columns hold NaN, so reading them shows."""
    B, T = q.shape[:2]
    qf, kf, vf = (x.reshape(B, T, -1) for x in (q, k, v))
    buf = torch.cat([qf, kf, vf, torch.full((B, T, pad), float("nan"), dtype=q.dtype, device=q.device)], -1)
    a, b = qf.shape[-1], kf.shape[-1]
    return (buf[..., :a].view(q.shape), buf[..., a:a + b].view(k.shape), buf[..., a + b:a + b + vf.shape[-1]]
            .view(v.shape))


@pytest.mark.parametrize("B,T,varlen,dtype", [(3, 65, False, torch.bfloat16), (1, 130, True, torch.bfloat16),
                                              (2, 70, False, torch.float32), (2, 1, False, torch.bfloat16),
                                              (2, 5, False, torch.bfloat16)],
                         ids=["B3-T65", "varlen-130", "B2-T70-fp32-blocks-form", "B2-T1-recurrent", "B2-T5-recurrent"])
def test_strided_qkv_read_in_place(B, T, varlen, dtype, poison_empty):
    """q, k, v as column slices of one wider tensor (the conv output) give exactly the outputs of contiguous
    copies: the kernels read them at their token stride, no copy (layout.token_rows). fp32 inputs take the
    WY kernel's blocks form, bf16 its full form."""
    from qwen35_export.kernels.layout import token_rows

    q, k, v, g, beta, state = make_inputs(B, T, 2, 4, 32, 32, dtype, seed=T + B, N=2 if varlen else B)
    qs, ks, vs = _as_conv_slices(q, k, v)
    assert [token_rows(x)[0].data_ptr() for x in (qs, ks, vs)] == [x.data_ptr() for x in (qs, ks, vs)]
    if T <= 8:
        run = lambda a, b, c: fused_recurrent_gated_delta_rule(a, b, c, g, beta, initial_state=state)  # noqa: E731
    else:
        cu = torch.tensor([0, 47, T], dtype=torch.int32, device=DEVICE) if varlen else None
        run = lambda a, b, c: chunk_gated_delta_rule(a, b, c, g, beta, initial_state=state,  # noqa: E731
                                                     cu_seqlens=cu)
    o1, h1 = run(q, k, v)
    o2, h2 = run(qs, ks, vs)
    assert torch.equal(o1, o2) and torch.equal(h1, h2)


def test_token_rows_copies_what_it_cannot_read():
    """Layouts the kernels cannot address (heads not adjacent, a batch stride that is not T x the token
    stride) are copied to contiguous; the rest pass through with their token stride."""
    from qwen35_export.kernels.layout import token_rows

    x = torch.randn(2, 5, 3, 4)
    assert token_rows(x) == (x, 12)
    wide = torch.randn(2, 5, 20)[..., 4:16].view(2, 5, 3, 4)  # a column slice: token stride 20
    assert token_rows(wide)[0] is wide and token_rows(wide)[1] == 20
    heads_apart = torch.randn(2, 5, 3, 8)[..., :4]  # head stride 8 != head dim 4
    y, s = token_rows(heads_apart)
    assert y.is_contiguous() and s == 12 and torch.equal(y, heads_apart)
    batch_apart = torch.randn(2, 7, 3, 4)[:, :5]  # batch stride 7 x 12 != 5 x 12
    y, s = token_rows(batch_apart)
    assert y.is_contiguous() and s == 12 and torch.equal(y, batch_apart)
    one_seq = torch.randn(1, 7, 3, 4)[:, :5]
    assert token_rows(one_seq) == (one_seq, 12)
    decode = torch.randn(3, 1, 20)[..., 4:16].view(3, 1, 3, 4)  # T = 1: tokens one batch stride apart
    assert token_rows(decode) == (decode, 20)
    odd_t = torch.randn(3, 20)[:, 4:16].view(3, 3, 4).unsqueeze(1)  # T = 1 whose stride is not the batch's
    assert odd_t.stride()[:2] == (20, 12) and token_rows(odd_t) == (odd_t, 20)
    one_head = torch.randn(2, 5, 1, 8)[..., :4]  # a single head: its stride (8) is irrelevant
    assert token_rows(one_head) == (one_head, 8)
