"""graph/reinplace_state.py: a decode graph's recurrent and conv states updated in place by the Triton ops,
their copies dropped; everything else (prefill, the reference ops, a read of the old state) left as it was. The numbers
of a rewritten layer graph: tests/kernels/test_gated_delta_rule.py (`test_reinplaced_decode_graph_*`)."""

from __future__ import annotations

import copy

import pytest
import torch

from qwen35_export.exporter import capture as C
from qwen35_export.graph.reinplace_state import reinplace_state
from qwen35_export.graph.substitute_custom_ops import substitute_custom_ops, triton_implementations
from test_size_guards import CFG, SHAPES, _layer, relational_guards


def _impls() -> dict:
    impls = triton_implementations()
    if "gated_delta_rule" not in impls:
        pytest.skip("triton is not importable: no Triton ops to substitute")
    return impls


def _copies(ep) -> list[str]:
    """Names of the placeholders the graph copies into."""
    return sorted(n.args[0].name for n in ep.graph.nodes if n.target is torch.ops.aten.copy_.default)


def _targets(ep, ns: str) -> list[str]:
    return sorted(n.target._opname for n in ep.graph.nodes
                  if n.op == "call_function" and getattr(n.target, "namespace", None) == ns)


@pytest.fixture(scope="module")
def gdn_decode():
    return C.capture_gdn(CFG, _layer(0, "bf16"), "decode", SHAPES, torch.bfloat16, torch.device("cpu"))[0]


def test_decode_state_updated_in_place(gdn_decode, monkeypatch):
    ep, _ = substitute_custom_ops(copy.deepcopy(gdn_decode), _impls())
    assert _copies(ep) == ["conv_state", "rec_state"]
    ep, counts = reinplace_state(ep)
    assert counts == {"gated_delta_rule_": 1, "causal_conv1d_": 1}
    assert _copies(ep) == []
    assert not {"gated_delta_rule", "causal_conv1d"} & set(_targets(ep, "qwen35_triton"))
    node = next(n for n in ep.graph.nodes if n.target is torch.ops.qwen35_triton.gated_delta_rule_.default)
    assert node.args[5].op == "placeholder" and node.args[5].name == "rec_state"
    node = next(n for n in ep.graph.nodes if n.target is torch.ops.qwen35_triton.causal_conv1d_.default)
    assert node.args[2].op == "placeholder" and node.args[2].name == "conv_state"
    assert relational_guards(ep, monkeypatch) == []  # no guard on the decode batch


def test_prefill_and_reference_graphs_unchanged(gdn_decode):
    impls = _impls()
    pre, _ = C.capture_gdn(CFG, _layer(0, "bf16"), "prefill", SHAPES, torch.bfloat16, torch.device("cpu"))
    pre, _ = substitute_custom_ops(pre, impls)  # T symbolic: the chunked kernel, functional
    ref = copy.deepcopy(gdn_decode)  # reference ops (cpu target, ONNX, TensorRT)
    for ep in (pre, ref):
        before = str(ep.graph)
        ep, counts = reinplace_state(ep)
        assert counts == {} and str(ep.graph) == before


class _Step(torch.nn.Module):
    """One recurrent call whose new state is copied back, plus (`extra`) another use of the state: a read
    before the copy, a read after it, a view taken before the call and read after it, a second call on the
    same state; or none."""

    def __init__(self, extra: str):
        super().__init__()
        self.extra = extra

    def forward(self, q, k, v, g, beta, h):
        hv = h.view(h.shape[0], -1) if self.extra == "view" else None
        o, hn = torch.ops.qwen35_triton.gated_delta_rule(q, k, v, g, beta, h)
        out = o.float().sum()
        if self.extra == "read-before-copy":
            out = out + h.sum()
        if self.extra == "view":
            out = out + hv.sum()
        h.copy_(hn)
        if self.extra == "read-after-copy":
            out = out + h.sum()
        if self.extra == "second-call":
            o2, hn2 = torch.ops.qwen35_triton.gated_delta_rule(q, k, v, g, beta, h)
            h.copy_(hn2)
            out = out + o2.float().sum()
        return out


def _step_inputs(state_dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 2, 16, generator=gen), torch.randn(2, 1, 2, 16, generator=gen)
    v = torch.randn(2, 1, 4, 16, generator=gen)
    g, beta = -torch.rand(2, 1, 4, generator=gen), torch.rand(2, 1, 4, generator=gen)
    return q, k, v, g, beta, torch.randn(2, 4, 16, 16, generator=gen).to(state_dtype)


@pytest.mark.parametrize("extra", ["none", "read-before-copy", "read-after-copy", "view", "second-call"])
def test_only_a_state_nothing_else_touches_is_rewritten(extra):
    """In place, any other read of the state (directly, through a view, or by a second call) could see it
    updated at another point than the functional graph does: only the plain call + copy is rewritten; the
    others keep the functional op and their copies (a second call on the same state included, no error)."""
    _impls()
    ep = torch.export.export(_Step(extra), _step_inputs())
    n_copies = len(_copies(ep))
    ep, counts = reinplace_state(ep)
    rewritten = extra == "none"
    assert counts == ({"gated_delta_rule_": 1} if rewritten else {})
    assert len(_copies(ep)) == n_copies - rewritten


def test_non_fp32_state_keeps_the_functional_op():
    """The in-place kernel updates an fp32 state; a state of another dtype keeps the functional op (which
    computes in fp32 and casts back through the copy)."""
    _impls()
    ep = torch.export.export(_Step("none"), _step_inputs(torch.bfloat16))
    ep, counts = reinplace_state(ep)
    assert counts == {} and _copies(ep) == ["h"]


def test_sharded_decode_state_updated_in_place():
    """A tensor-parallel rank's GDN decode graph (parallel/capture.py: collectives inside, the same state
    copy) is rewritten the same way."""
    impls = _impls()
    from qwen35_export.parallel.capture import sharded_capture
    from qwen35_export.parallel.plan import ParallelPlan
    from qwen35_export.parallel.shard import shard_layer

    plan = ParallelPlan(2, 1)
    shard = shard_layer(_layer(0, "bf16", fuse=False), CFG, plan, 0, rank=0)
    ep, _ = sharded_capture(plan)[C.GDN](CFG, shard, "decode", SHAPES, torch.bfloat16, torch.device("cpu"))
    ep, _ = substitute_custom_ops(ep, impls)
    assert _copies(ep) == ["conv_state", "rec_state"]
    ep, counts = reinplace_state(ep)
    assert counts == {"gated_delta_rule_": 1, "causal_conv1d_": 1} and _copies(ep) == []



class _ConvStep(torch.nn.Module):
    """One conv update whose new state is copied back, plus (`extra`) another use of the state, as _Step."""

    def __init__(self, extra: str):
        super().__init__()
        self.extra = extra

    def forward(self, x, w, s, lengths):
        sv = s.view(s.shape[0], -1) if self.extra == "view" else None
        y, sn = torch.ops.qwen35_triton.causal_conv1d(x, w, s, lengths)
        out = y.float().sum()
        if self.extra == "read-before-copy":
            out = out + s.sum()
        if self.extra == "view":
            out = out + sv.sum()
        s.copy_(sn)
        if self.extra == "read-after-copy":
            out = out + s.sum()
        return out


@pytest.mark.parametrize("extra,T", [("none", 1), ("read-before-copy", 1), ("read-after-copy", 1), ("view", 1),
                                     ("none", 2)])
def test_conv_state_rewritten_only_when_alone_and_one_step(extra, T):
    """The conv state takes the in-place update under the same rule as the recurrent state, and only at
    T = 1 (the in-place op is the one-step update kernel; a static T = 2 keeps the functional op)."""
    _impls()
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(2, T, 8, generator=gen), torch.randn(8, 4, generator=gen),
            torch.randn(2, 8, 3, generator=gen), torch.ones(2, dtype=torch.int64))
    ep = torch.export.export(_ConvStep(extra), args)
    ep, counts = reinplace_state(ep)
    rewritten = extra == "none" and T == 1
    assert counts == ({"causal_conv1d_": 1} if rewritten else {})
    assert _copies(ep) == ([] if rewritten else ["s"])


def test_batch1_decode_graph_states_updated_in_place():
    """The static batch-1 decode graph (capture.DECODE1) takes both in-place updates like the dynamic one."""
    ep, _ = C.capture_gdn(CFG, _layer(0, "bf16"), C.DECODE1, SHAPES, torch.bfloat16, torch.device("cpu"))
    ep, _ = substitute_custom_ops(ep, _impls())
    ep, counts = reinplace_state(ep)
    assert counts == {"gated_delta_rule_": 1, "causal_conv1d_": 1} and _copies(ep) == []
