"""Causal conv1d kernels (padded op, varlen prefill, decode update) against the fp64 reference.

Error bounds (relative RMS): the kernels sum W = 4 products in fp32 and apply SiLU in fp32, so fp32
results sit at ~1e-7 (bound 1e-6); bf16 outputs carry one final rounding (2^-9 relative at most,
bound 5e-3). Final conv states are copies of inputs: they must match exactly.
"""

from __future__ import annotations

import pytest
import torch

from gdn_compare import DEVICE, ON_GPU, assert_close
from qwen35_export.kernels.causal_conv1d import (
    causal_conv1d_fwd, causal_conv1d_update, causal_conv1d_varlen, naive_causal_conv1d)
from qwen35_export.kernels.causal_conv1d import conv as conv_mod
from qwen35_export.kernels.causal_conv1d import op as op_mod


def bound(dtype: torch.dtype) -> float:
    return 5e-3 if dtype == torch.bfloat16 else 1e-6


def make(shape, dtype, gen):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("T,B,C,dtype", [
    pytest.param(1, 3, 200, torch.bfloat16, id="T1-B3-C200-bf16"),
    pytest.param(2, 1, 64, torch.float32, id="T2-B1-C64-fp32"),
    pytest.param(63, 3, 130, torch.float32, id="T63-B3-C130-fp32"),
    pytest.param(64, 1, 256, torch.bfloat16, id="T64-B1-C256-bf16"),
    pytest.param(65, 3, 200, torch.bfloat16, id="T65-B3-C200-bf16"),
    pytest.param(200, 1, 100, torch.float32, id="T200-B1-C100-fp32"),
])
def test_op_matches_reference_ops(T, B, C, dtype, poison_empty):
    """`qwen35_triton::causal_conv1d` equals `qwen35::causal_conv1d`, right-padded rows included
    (lengths shorter than W-1 take part of the final state from the initial state)."""
    import qwen35_export.model.ops  # noqa: F401

    gen = torch.Generator().manual_seed(T + B)
    x, w, s = make((B, T, C), dtype, gen), make((C, 4), dtype, gen), make((B, C, 3), dtype, gen)
    lengths = torch.tensor([T, max(1, T // 2), 1][:B], dtype=torch.int64, device=DEVICE)
    s0 = s.clone()
    y, st = torch.ops.qwen35_triton.causal_conv1d(x, w, s, lengths)
    assert torch.equal(s, s0), "the op is functional: conv_state must not be written"
    ry, rst = naive_causal_conv1d(x, w, s, lengths=lengths)
    assert y.dtype == dtype and st.dtype == s.dtype
    assert_close("y", y, ry, bound(dtype))
    assert torch.equal(st, rst.to(dtype)), "final conv state is a copy of inputs: must be exact"
    y2, st2 = torch.ops.qwen35.causal_conv1d(x, w, s, lengths)
    assert_close("y vs qwen35 op", y, y2.double(), bound(dtype))
    assert torch.equal(st, st2)


def _decode_cases():
    for lens in ([1], [0], [1, 0, 1], [0, 1, 0, 0, 1]):
        for C, dtype in ((40, torch.float32), (200, torch.bfloat16), (40, torch.bfloat16), (200, torch.float32)):
            L = "".join(map(str, lens))
            view = dtype == torch.bfloat16
            yield pytest.param(lens, C, dtype, view,
                               id=f"B{len(lens)}-L{L}-C{C}-{str(dtype)[6:]}" + ("-view" if view else ""))


@pytest.mark.parametrize("lens,C,dtype,view", list(_decode_cases()))
def test_op_decode_step(lens, C, dtype, view, poison_empty, monkeypatch):
    """T = 1 through the op takes the update kernel and equals the reference, the reference op and the
    prefill kernel; rows with lengths 0 (padded decode rows) keep their state and leak into no other row;
    the input state is not written (C = 40, 200: tails of the channel block). `view`: x is the channel
    slice of a wider projection output, as with fused projections (graph/fuse_weights.py)."""
    import qwen35_export.model.ops  # noqa: F401

    B = len(lens)
    calls = []
    real_update, real_fwd = op_mod.causal_conv1d_update, op_mod.causal_conv1d_fwd
    monkeypatch.setattr(op_mod, "causal_conv1d_update", lambda *a, **k: calls.append("update") or real_update(*a, **k))
    monkeypatch.setattr(op_mod, "causal_conv1d_fwd", lambda *a, **k: calls.append("fwd") or real_fwd(*a, **k))
    gen = torch.Generator().manual_seed(B * 1000 + C)
    x, w, s = make((B, 1, C), dtype, gen), make((C, 4), dtype, gen), make((B, C, 3), dtype, gen)
    if view:
        x = torch.cat([x, make((B, 1, 24), dtype, gen)], dim=-1)[..., :C]  # [B, 1, C], row stride C + 24
    lengths = torch.tensor(lens, dtype=torch.int64, device=DEVICE)
    s0 = s.clone()
    y, st = torch.ops.qwen35_triton.causal_conv1d(x, w, s, lengths)
    assert calls == ["update"], f"T = 1 must take the update kernel, took {calls}"
    assert torch.equal(s, s0), "the op is functional: conv_state must not be written"
    assert y.shape == x.shape and y.dtype == dtype and st.shape == s.shape and st.dtype == s.dtype
    assert y.is_contiguous() and st.is_contiguous()
    ry, rst = naive_causal_conv1d(x, w, s0, lengths=lengths)
    assert_close("y", y, ry, bound(dtype))
    assert torch.equal(st, rst.to(dtype)), "final conv state is a copy of inputs: must be exact"
    pad = lengths == 0
    assert torch.equal(st[pad], s0[pad]), "a lengths-0 row must keep its state"
    y2, st2 = torch.ops.qwen35.causal_conv1d(x, w, s0, lengths)
    assert_close("y vs qwen35 op", y, y2.double(), bound(dtype))
    assert torch.equal(st, st2)
    st3 = torch.empty_like(s0)
    y3 = causal_conv1d_fwd(x, w, s0, st3, lengths=lengths)  # what the op launched before at T = 1
    assert_close("y vs prefill kernel", y, y3.double(), bound(dtype))
    assert torch.equal(st, st3)
    # the in-place form (graph/reinplace_state.py): the same y, and the state input becomes the final state
    s4 = s0.clone()
    y4 = torch.ops.qwen35_triton.causal_conv1d_(x, w, s4, lengths)
    assert torch.equal(y4, y) and torch.equal(s4, st)


def test_inplace_op_takes_one_step_only(poison_empty):
    """causal_conv1d_ is the T = 1 update: longer calls and strided states are refused by name."""
    gen = torch.Generator().manual_seed(3)
    w, s = make((8, 4), torch.float32, gen), make((2, 8, 3), torch.float32, gen)
    lengths = torch.ones(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="causal_conv1d_: T=2"):
        torch.ops.qwen35_triton.causal_conv1d_(make((2, 2, 8), torch.float32, gen), w, s, lengths)
    with pytest.raises(ValueError, match="conv_state .* must be contiguous"):
        torch.ops.qwen35_triton.causal_conv1d_(make((2, 1, 8), torch.float32, gen), w,
                                               make((2, 3, 8), torch.float32, gen).transpose(1, 2), lengths)


def test_update_lengths_into_separate_state(poison_empty):
    """Update kernel with lengths and a separate output state at T = 3: steps t >= lengths[b] leave the
    state alone, and the input state is not written."""
    gen = torch.Generator().manual_seed(3)
    B, T, C = 4, 3, 200
    x, w, s = make((B, T, C), torch.float32, gen), make((C, 4), torch.float32, gen), make((B, C, 3), torch.float32, gen)
    lengths = torch.tensor([0, 2, 3, 1], device=DEVICE)
    s0 = s.clone()
    st = torch.empty_like(s)
    y = causal_conv1d_update(x, w, s, final_state=st, lengths=lengths)
    ry, rst = naive_causal_conv1d(x, w, s0, lengths=lengths)
    assert_close("y", y, ry, 1e-6)
    assert torch.equal(st, rst.float())
    assert torch.equal(s, s0)


@pytest.mark.parametrize("lens,dtype,use_state", [
    pytest.param([1, 2, 63, 64, 65, 200], torch.float32, True, id="lens1-2-63-64-65-200-fp32"),
    pytest.param([130, 3], torch.bfloat16, True, id="lens130-3-bf16"),
    pytest.param([5, 70], torch.float32, False, id="lens5-70-nostate"),
])
def test_varlen_matches_reference(lens, dtype, use_state, poison_empty):
    gen = torch.Generator().manual_seed(len(lens))
    C = 96
    x, w = make((sum(lens), C), dtype, gen), make((C, 4), dtype, gen)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    st = make((len(lens), C, 3), dtype, gen) if use_state else None
    st0 = st.clone() if use_state else None
    y, _ = causal_conv1d_varlen(x, w, cu, st)
    ry, rst = naive_causal_conv1d(x[None], w, st0, cu_seqlens=cu)
    assert_close("y", y, ry[0], bound(dtype))
    if use_state:
        assert torch.equal(st, rst.to(dtype))


# Prefill variants and tiles bench/gdn.py's tune step may pick: NT > 1 (a loop of tiles / window steps per
# program), BT * NT not dividing T, C not a multiple of BC, window lanes shorter than the state (NT < W-1).
_PREFILL_CFGS = [
    pytest.param(conv_mod.FWD_CONFIG, id="default"),
    pytest.param(("tile", 4, 64, 3, 4), id="tile-BT4-BC64-NT3"),
    pytest.param(("tile", 16, 128, 1, 4), id="tile-BT16-BC128-NT1"),
    pytest.param(("window", 4, 64, 5, 4), id="window-BT4-BC64-NT5"),
    pytest.param(("window", 2, 64, 2, 4), id="window-BT2-BC64-NT2"),
]


@pytest.mark.parametrize("cfg", _PREFILL_CFGS)
def test_varlen_other_tiles(cfg, monkeypatch, poison_empty):
    """Every variant and tile shape gives the reference's results (tails of both dims)."""
    monkeypatch.setattr(conv_mod, "FWD_CONFIG", cfg)
    gen = torch.Generator().manual_seed(7)
    lens, C = [1, 17, 130], 300
    x, w = make((sum(lens), C), torch.float32, gen), make((C, 4), torch.float32, gen)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    st = make((len(lens), C, 3), torch.float32, gen)
    st0 = st.clone()
    y, _ = causal_conv1d_varlen(x, w, cu, st)
    ry, rst = naive_causal_conv1d(x[None], w, st0, cu_seqlens=cu)
    assert_close("y", y, ry[0], 1e-6)
    assert torch.equal(st, rst.float())


@pytest.mark.parametrize("cfg", _PREFILL_CFGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_prefill_strided_padded_rows(cfg, dtype, monkeypatch, poison_empty):
    """Padded prefill (B = 3, lengths < T) on x that is a column slice of a wider projection output (row
    stride C + 24, as model/layers.py's fused qkv): read in place, y contiguous; T = 37 and C = 200 are
    not multiples of any tile."""
    monkeypatch.setattr(conv_mod, "FWD_CONFIG", cfg)
    gen = torch.Generator().manual_seed(11)
    B, T, C = 3, 37, 200
    xz = make((B, T, C + 24), dtype, gen)
    x = xz[..., :C]  # [B, T, C], strides (T * (C + 24), C + 24, 1)
    w, s = make((C, 4), dtype, gen), make((B, C, 3), dtype, gen)
    lengths = torch.tensor([T, 5, 2], dtype=torch.int64, device=DEVICE)
    s0 = s.clone()
    st = torch.empty_like(s)
    y = causal_conv1d_fwd(x, w, s, st, lengths=lengths)
    assert y.is_contiguous() and y.shape == x.shape
    assert torch.equal(s, s0), "a separate final state must leave the initial one alone"
    ry, rst = naive_causal_conv1d(x, w, s0, lengths=lengths)
    assert_close("y", y, ry, bound(dtype))
    assert torch.equal(st, rst.to(dtype)), "final conv state is a copy of inputs: must be exact"


@pytest.mark.parametrize("cfg", _PREFILL_CFGS)
def test_varlen_pool_in_place_strided(cfg, monkeypatch, poison_empty):
    """Packed prefill on a strided x with a state pool: the rows at state_idx are read and overwritten in
    place (in == out), a -1 slot computes from a zero state and writes nothing, other rows stay."""
    monkeypatch.setattr(conv_mod, "FWD_CONFIG", cfg)
    gen = torch.Generator().manual_seed(13)
    lens, C = [1, 2, 40, 9], 72
    x = make((sum(lens), C + 24), torch.bfloat16, gen)[:, 24:]  # [T_total, C], row stride C + 24
    w = make((C, 4), torch.bfloat16, gen)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    pool = make((6, C, 3), torch.bfloat16, gen)
    idx = torch.tensor([4, -1, 0, 2], device=DEVICE)
    pool0 = pool.clone()
    s_init = torch.stack([pool0[i] if i >= 0 else torch.zeros_like(pool0[0]) for i in idx.tolist()])
    y, _ = causal_conv1d_varlen(x, w, cu, pool, state_idx=idx)
    ry, rst = naive_causal_conv1d(x[None], w, s_init, cu_seqlens=cu)
    assert_close("y", y, ry[0], bound(torch.bfloat16))
    keep = [0, 2, 3]
    assert torch.equal(pool[idx[keep]], rst[keep].to(torch.bfloat16))
    assert torch.equal(pool[[1, 3, 5]], pool0[[1, 3, 5]]), "rows without a sequence must stay"


@pytest.mark.parametrize("T,dtype", [(1, torch.float32), (3, torch.bfloat16)])
def test_update_pool_matches_reference(T, dtype, poison_empty):
    """Decode update: pool rows at the slots shift in place, a -1 slot and other rows stay untouched."""
    gen = torch.Generator().manual_seed(T)
    B, C = 3, 200
    x, w = make((B, T, C), dtype, gen), make((C, 4), dtype, gen)
    pool = make((6, C, 3), dtype, gen)
    slot = torch.tensor([4, -1, 0], device=DEVICE)
    pool0 = pool.clone()
    y = causal_conv1d_update(x, w, pool, slot)
    ry, rst = naive_causal_conv1d(x[[0, 2]], w, pool0[[4, 0]])
    assert_close("y", y[[0, 2]], ry, bound(dtype))
    assert torch.equal(pool[[4, 0]], rst.to(dtype))
    assert torch.equal(pool[[1, 2, 3, 5]], pool0[[1, 2, 3, 5]])


def test_prefill_then_update_equals_longer_prefill():
    """Prefill(T) then one decode step equals prefill(T+1), output and state."""
    gen = torch.Generator().manual_seed(0)
    T, C = 65, 64
    x, w = make((1, T + 1, C), torch.float32, gen), make((C, 4), torch.float32, gen)
    s = make((1, C, 3), torch.float32, gen)
    cu = torch.tensor([0, T + 1], device=DEVICE)
    st_full = s.clone()
    y_full, _ = causal_conv1d_varlen(x[0], w, cu, st_full)
    st = s.clone()
    causal_conv1d_varlen(x[0, :T], w, torch.tensor([0, T], device=DEVICE), st)
    y_last = causal_conv1d_update(x[0, T:], w, st)
    assert_close("y of token T", y_last, y_full[T:], 1e-6)
    assert torch.equal(st, st_full)


class _ConvModule(torch.nn.Module):
    def forward(self, x, w, s, lengths):
        return torch.ops.qwen35_triton.causal_conv1d(x, w, s, lengths)


class _FusedProjConvModule(torch.nn.Module):
    """x is a channel slice of a wider projection output, as model/layers.py's fused in_proj_qkvz gives."""

    def forward(self, xz, w, s, lengths):
        x, _ = torch.split(xz, [w.shape[0], xz.shape[-1] - w.shape[0]], dim=-1)
        return torch.ops.qwen35_triton.causal_conv1d(x, w, s, lengths)


def test_op_exports():
    """torch.export keeps `qwen35_triton::causal_conv1d` as one node, traced through its fake kernel."""
    gen = torch.Generator().manual_seed(0)
    args = (make((2, 16, 64), torch.bfloat16, gen), make((64, 4), torch.bfloat16, gen),
            make((2, 64, 3), torch.bfloat16, gen), torch.tensor([16, 3], device=DEVICE))
    T = torch.export.Dim("T", min=2, max=4096)
    ep = torch.export.export(_ConvModule(), args, dynamic_shapes=({1: T}, None, None, None))
    nodes = [n for n in ep.graph.nodes if n.target == torch.ops.qwen35_triton.causal_conv1d.default]
    assert len(nodes) == 1
    assert nodes[0].meta["val"][1].shape == (2, 64, 3)


def _kernels_traced(ep, monkeypatch) -> tuple[list[str], torch.export.ExportedProgram]:
    """Decompose the op as AOTInductor does (its body traced on the graph's fake tensors) and return the
    names of the Triton kernels in the decomposed graph, and the graph.

    Under the interpreter wrap_triton hands the bare kernel back (it cannot be traced), so a traceable
    JITFunction of the same source stands in: the trace is then the one the GPU build sees, except that
    Triton cannot analyse which arguments the kernel writes without a GPU (it warns and assumes all)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch.library import wrap_triton
    from triton.runtime.jit import JITFunction

    def traceable(kernel):
        return wrap_triton(kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn))

    monkeypatch.setattr(conv_mod, "wrap_triton", traceable)
    # the kernels' @triton.jit helpers too: a JITFunction refuses to reference interpreted functions
    from triton.runtime.interpreter import InterpretedFunction
    for name, val in list(vars(conv_mod).items()):
        if isinstance(val, InterpretedFunction):
            monkeypatch.setattr(conv_mod, name, JITFunction(val.fn))
    gm = ep.run_decompositions(decompose_custom_triton_ops=True)
    hops = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    return [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in hops], gm


@pytest.mark.parametrize("fused", [False, True], ids=["x", "x-slice-of-qkvz"])
def test_decode_graph_traces_update_kernel(fused, monkeypatch):
    """A graph exported with T = 1 static (the decode graph: only B dynamic) launches the update kernel,
    once, with no copy of an input (x a slice of a fused projection included); a graph with a symbolic T
    launches the prefill kernel, copies no input either, and puts no guard on T (a guard bakes the
    example's choice into the graph)."""
    gen = torch.Generator().manual_seed(0)
    C = 40
    w = make((C, 4), torch.bfloat16, gen)
    B = torch.export.Dim("B", min=1, max=64)
    dec_args = (make((2, 1, C + 24 * fused), torch.bfloat16, gen), w, make((2, C, 3), torch.bfloat16, gen),
                torch.ones(2, dtype=torch.int64, device=DEVICE))
    module = _FusedProjConvModule() if fused else _ConvModule()
    ep = torch.export.export(module, dec_args, dynamic_shapes=({0: B}, None, {0: B}, {0: B}))
    kernels, gm = _kernels_traced(ep, monkeypatch)
    assert kernels == ["causal_conv1d_update_kernel"], kernels
    copies = [n for n in gm.graph.nodes if n.target in (torch.ops.aten.clone.default, torch.ops.aten.copy.default,
                                                         torch.ops.aten.copy_.default)]
    assert not copies, f"the decode op copies an input: {copies}"
    if ON_GPU:  # Triton's write analysis needs a GPU: the functional op must not write conv_state
        hop = next(n for n in gm.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional)
        assert set(hop.kwargs["tensors_to_clone"]) <= {"y", "st"}, hop.kwargs["tensors_to_clone"]

    T = torch.export.Dim("T", min=1, max=4096)
    pre_args = (make((2, 3, C + 24 * fused), torch.bfloat16, gen), w, dec_args[2],
                torch.full((2,), 3, device=DEVICE))
    ep = torch.export.export(module, pre_args, dynamic_shapes=({0: B, 1: T}, None, {0: B}, {0: B}))
    kernels, gm = _kernels_traced(ep, monkeypatch)
    assert kernels == ["causal_conv1d_prefill_kernel"], kernels
    copies = [n for n in gm.graph.nodes if n.target in (torch.ops.aten.clone.default, torch.ops.aten.copy.default,
                                                         torch.ops.aten.copy_.default)]
    assert not copies, f"the prefill op copies an input: {copies}"
    t_sym = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name in ("x", "xz")).meta["val"].shape[1]
    assert isinstance(t_sym, torch.SymInt)
    on_t = [g.expr for g in t_sym.node.shape_env.guards if g.expr.free_symbols & t_sym.node.expr.free_symbols]
    assert not on_t, f"the op put guards on the symbolic T: {on_t}"
