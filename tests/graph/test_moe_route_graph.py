"""`qwen35::moe_route` in captured layer graphs: one node per MoE layer with fused gate rows and a folded
shared expert; GPU builds swap it for the Triton op without a guard on the batch, the cpu target (and ONNX /
TensorRT) inline it back to its math, whose `moe_router` node those backends map as before."""

from __future__ import annotations

import copy

import pytest
import torch

from qwen35_export.exporter import capture as C
from qwen35_export.graph.inline_ops import inline_ops
from qwen35_export.graph.substitute_custom_ops import substitute_custom_ops, triton_implementations
from test_size_guards import CFG, SHAPES, _layer, relational_guards


def _ops(ep: torch.export.ExportedProgram, ns: str) -> list[str]:
    return sorted(n.target._opname for n in ep.graph.nodes
                  if n.op == "call_function" and getattr(n.target, "namespace", None) == ns)


@pytest.fixture(scope="module")
def decode_gdn() -> tuple[torch.export.ExportedProgram, tuple]:
    """A GDN decode layer graph (batch dynamic, up to 64 rows) on fused BF16 weights, and inputs for it with
    row 1 of 2 a padding row (length 0)."""
    w = _layer(0, "bf16")
    assert "mlp.gate_shared.weight" in w and w["mlp.experts.down_proj"].shape[0] == CFG.num_experts + 1
    ep, names = C.capture_gdn(CFG, w, "decode", SHAPES, torch.bfloat16, torch.device("cpu"), fused_route=True)
    x = torch.randn(2, 1, CFG.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
    conv = torch.zeros(2, CFG.conv_dim, CFG.linear_conv_kernel_dim - 1, dtype=torch.bfloat16)
    rec = torch.zeros(2, CFG.linear_num_value_heads, CFG.linear_key_head_dim, CFG.linear_value_head_dim)
    return ep, (x, torch.tensor([1, 0]), conv, rec, *[w[n] for n in names])


def test_decode_graph_routes_in_one_node(decode_gdn):
    ops = _ops(decode_gdn[0], "qwen35")
    assert ops.count("moe_route") == 1 and "moe_router" not in ops, ops


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_triton_route_adds_no_batch_guard(phase, decode_gdn, monkeypatch):
    """Decode (batch <= 64 = DECODE_MAX_TOKENS) takes the gate-logits kernel, prefill F.linear, neither guards."""
    from qwen35_export.kernels.moe import router

    impls = triton_implementations()
    if "moe_route" not in impls:
        pytest.skip("triton is not importable: no Triton ops to substitute")
    if phase == "decode":
        ep = copy.deepcopy(decode_gdn[0])  # the pass edits in place
    else:
        ep, _ = C.capture_gdn(CFG, _layer(0, "bf16"), phase, SHAPES, torch.bfloat16, torch.device("cpu"),
                              fused_route=True)
    ep, subs = substitute_custom_ops(ep, impls)
    assert subs.get("moe_route") == 1 and _ops(ep, "qwen35_triton").count("moe_route") == 1, subs
    calls = []
    logits = router.gate_logits_triton
    monkeypatch.setattr(router, "gate_logits_triton", lambda *a: calls.append(1) or logits(*a))
    assert relational_guards(ep, monkeypatch) == []
    assert bool(calls) == (phase == "decode")


def test_inlined_route_keeps_router_and_numbers(decode_gdn):
    """The cpu target's form: moe_route inlined, its moe_router node left; the same outputs as the op."""
    ep0, args = decode_gdn
    ep, counts = inline_ops(copy.deepcopy(ep0))
    assert counts.get("moe_route") == 1
    ops = _ops(ep, "qwen35")
    assert "moe_route" not in ops and ops.count("moe_router") == 1, ops
    assert torch.equal(ep.module()(*[a.clone() for a in args]), ep0.module()(*[a.clone() for a in args]))


def test_route_node_only_when_asked():
    """The captures take `qwen35::moe_route` only when asked (default: the op-by-op routing, F.linear,
    qwen35::moe_router, the shared slot, the padding redirect), for both layer kinds; `--kernels triton`
    then needs the fused op only when the build asks for it (single-rank builds)."""
    from qwen35_export.exporter.build import BuildSettings, _select_kernels

    w = _layer(0, "bf16")
    ep, _ = C.capture_gdn(CFG, w, "decode", SHAPES, torch.bfloat16, torch.device("cpu"))
    ops = _ops(ep, "qwen35")
    assert "moe_route" not in ops and ops.count("moe_router") == 1, ops
    wa = _layer(3, "bf16")  # the tiny preset's attention layer
    for fused, want in ((False, 0), (True, 1)):
        ep, _ = C.capture_attention(CFG, wa, "decode", SHAPES, torch.bfloat16, torch.device("cpu"), fused_route=fused)
        assert _ops(ep, "qwen35").count("moe_route") == want, (fused, _ops(ep, "qwen35"))
    impls = triton_implementations()
    if "moe_route" not in impls:
        pytest.skip("triton is not importable: no Triton ops to substitute")
    from qwen35_export.exporter import build as B

    without = {k: v for k, v in impls.items() if k != "moe_route"}
    with pytest.MonkeyPatch.context() as m:  # a Triton build whose kernels lack the fused route op
        m.setattr(B, "triton_implementations", lambda: dict(without))
        with pytest.raises(B.BuildError, match="moe_route"):
            _select_kernels(BuildSettings(target="h100", fused_route=True, kernels="triton"), "bf16")
        for s in (BuildSettings(target="h100", fused_route=False, kernels="triton"),
                  BuildSettings(target="h100", tp=2, kernels="triton")):  # sharded builds never capture it
            assert "moe_route" not in _select_kernels(s, "bf16")


def test_build_fuses_the_route_of_gpu_decode_graphs_only():
    """What a build asks the captures for (exporter/build.py capture_flags): the fused route by default in
    the decode graphs of single-rank builds that substitute the Triton op; never in prefill graphs, sharded
    builds, builds without the op (cpu target, ONNX, TensorRT) or with `--no-fused-route`."""
    from qwen35_export.exporter.build import BuildSettings, capture_flags

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    impls = {"moe_route": object(), "decode_attention": object()}
    on = BuildSettings(target="h100")
    assert on.fused_route
    assert capture_flags(on, C.GDN, C.DECODE, impls, gpu, sharded=False) == {"fused_route": True}
    assert capture_flags(on, C.ATTN, C.DECODE, impls, gpu, sharded=False) == {"cache_op": True, "fused_route": True}
    assert capture_flags(on, C.GDN, C.PREFILL, impls, gpu, sharded=False) == {}
    assert capture_flags(on, C.ATTN, C.PREFILL, impls, gpu, sharded=False) == {"cache_op": True}
    assert capture_flags(on, C.GDN, C.DECODE, impls, gpu, sharded=True) == {}
    assert capture_flags(on, C.GDN, C.DECODE, {}, cpu, sharded=False) == {}
    assert capture_flags(on, C.GDN, C.DECODE, impls, cpu, sharded=False) == {}  # `--target cpu --kernels triton`
    off = BuildSettings(target="h100", fused_route=False)
    assert capture_flags(off, C.GDN, C.DECODE, impls, gpu, sharded=False) == {}


@pytest.mark.parametrize("kind", ["gdn", "attn"])
def test_batch1_decode_graph_routes_without_a_padding_mask(kind):
    """The static batch-1 decode graph (capture.DECODE1) has no padding rows to redirect: its route node
    takes no `real` mask (one launch fewer per layer), while the dynamic decode graph's does."""
    w = _layer(0 if kind == "gdn" else CFG.layer_types.index("full_attention"), "bf16")
    capture = C.capture_gdn if kind == "gdn" else C.capture_attention
    real = {}
    for phase in (C.DECODE, C.DECODE1):
        ep, _ = capture(CFG, w, phase, SHAPES, torch.bfloat16, torch.device("cpu"), fused_route=True)
        route = torch.ops.qwen35.moe_route.default
        (node,) = [n for n in ep.graph.nodes if n.op == "call_function" and n.target is route]
        real[phase] = node.args[4]
        x = next(n for n in ep.graph.nodes if n.op == "placeholder").meta["val"]
        static = isinstance(x.shape[0], int)  # a SymInt in the dynamic graph
        assert static == (phase == C.DECODE1) and (not static or x.shape[0] == 1)
    assert real[C.DECODE1] is None and real[C.DECODE] is not None
