"""graph/reinplace_state.py: a decode graph's recurrent state updated in place by the Triton op, its copy
dropped; everything else (prefill, the reference ops, a read of the old state) left as it was. The numbers
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
    assert counts == {"gated_delta_rule_": 1}
    assert _copies(ep) == ["conv_state"]  # the conv state (a few KB per row) keeps its copy
    assert "gated_delta_rule" not in _targets(ep, "qwen35_triton")
    node = next(n for n in ep.graph.nodes if n.target is torch.ops.qwen35_triton.gated_delta_rule_.default)
    assert node.args[5].op == "placeholder" and node.args[5].name == "rec_state"
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
    """One recurrent call whose new state is copied back, with a read of the state before the copy or
    after it."""

    def __init__(self, read: str):
        super().__init__()
        self.read = read

    def forward(self, q, k, v, g, beta, h):
        o, hn = torch.ops.qwen35_triton.gated_delta_rule(q, k, v, g, beta, h)
        s = h.sum() if self.read == "before-copy" else None
        h.copy_(hn)
        if self.read == "after-copy":
            s = h.sum()
        return o.float().sum() + s


@pytest.mark.parametrize("read,rewritten", [("before-copy", False), ("after-copy", True)])
def test_read_of_old_state_blocks_rewrite(read, rewritten):
    """A read between the call and the copy sees the old state: in place it would see the new one, so that
    graph keeps the functional op; a read after the copy saw the new state anyway."""
    _impls()
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 2, 16, generator=gen), torch.randn(2, 1, 2, 16, generator=gen)
    v = torch.randn(2, 1, 4, 16, generator=gen)
    g, beta = -torch.rand(2, 1, 4, generator=gen), torch.rand(2, 1, 4, generator=gen)
    h = torch.randn(2, 4, 16, 16, generator=gen)
    ep = torch.export.export(_Step(read), (q, k, v, g, beta, h))
    ep, counts = reinplace_state(ep)
    assert counts == ({"gated_delta_rule_": 1} if rewritten else {})
    assert _copies(ep) == ([] if rewritten else ["h"])
