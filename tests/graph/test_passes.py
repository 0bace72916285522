"""Graph passes on tiny graphs: structure (op counts) and numbers."""

from __future__ import annotations

import torch
from torch import nn

from qwen35_export.graph.pipeline import run_passes
from qwen35_export.graph.quantize_fp8 import dequantize_all, quantize_layer_fp8
from qwen35_export.graph.substitute_custom_ops import substitute_custom_ops
from qwen35_export.model import ops  # noqa: F401

# A stand-in implementation with the reference's signature, registered under another namespace.
_lib = torch.library.Library("qwen35_test", "DEF")
_lib.define("moe_router(Tensor logits, int top_k) -> (Tensor, Tensor)")


@torch.library.impl(_lib, "moe_router", "CompositeExplicitAutograd")
def _router(logits, top_k):
    w, ids = torch.ops.qwen35.moe_router(logits, top_k)
    return w * 2, ids  # deliberately different, so the test can see which one ran


@torch.library.register_fake("qwen35_test::moe_router")
def _(logits, top_k):
    return (logits.new_empty(logits.shape[0], top_k), logits.new_empty(logits.shape[0], top_k, dtype=torch.int64))


class Routed(nn.Module):
    def forward(self, x):
        w, ids = torch.ops.qwen35.moe_router(x, 2)
        return w, ids


class Plain(nn.Module):
    def forward(self, x):
        return torch.softmax(x, -1)


def _ops(ep, ns: str) -> list[str]:
    return [n.target._opname for n in ep.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == ns]


def test_substitute_retargets_custom_op() -> None:
    x = torch.randn(5, 8)
    ep = torch.export.export(Routed(), (x,))
    assert _ops(ep, "qwen35") == ["moe_router"]
    ep, counts = substitute_custom_ops(ep, {"moe_router": torch.ops.qwen35_test.moe_router.default})
    assert counts == {"moe_router": 1}
    assert _ops(ep, "qwen35") == [] and _ops(ep, "qwen35_test") == ["moe_router"]
    w_ref, _ = torch.ops.qwen35.moe_router(x, 2)
    w, _ = ep.module()(x)
    torch.testing.assert_close(w, 2 * w_ref)


def test_substitute_leaves_other_graphs_alone() -> None:
    ep = torch.export.export(Plain(), (torch.randn(3, 4),))
    before = str(ep.graph)
    ep, counts = substitute_custom_ops(ep, {"moe_router": torch.ops.qwen35_test.moe_router.default})
    assert counts == {} and str(ep.graph) == before


def test_substitute_without_impl_keeps_reference() -> None:
    ep = torch.export.export(Routed(), (torch.randn(4, 8),))
    ep, counts = substitute_custom_ops(ep, {})
    assert counts == {} and _ops(ep, "qwen35") == ["moe_router"]


def test_pipeline_dumps_before_and_after(tmp_path) -> None:
    ep = torch.export.export(Routed(), (torch.randn(4, 8),))
    ep, recs = run_passes(ep, "g", {"moe_router": torch.ops.qwen35_test.moe_router.default}, tmp_path)
    assert [r.name for r in recs] == ["inline_ops", "substitute_custom_ops", "reinplace_state"]
    before = (tmp_path / "g.1.substitute_custom_ops.before.txt").read_text()
    after = (tmp_path / "g.1.substitute_custom_ops.after.txt").read_text()
    assert "qwen35.moe_router" in before and "qwen35_test.moe_router" in after


def test_quantize_fp8_respects_keep_list() -> None:
    g = torch.Generator().manual_seed(0)
    w = {
        "linear_attn.in_proj_qkv.weight": torch.randn(256, 128, generator=g),
        "linear_attn.in_proj_a.weight": torch.randn(4, 128, generator=g),  # kept BF16 in shipped files
        "mlp.gate.weight": torch.randn(16, 128, generator=g),  # router: kept
        "mlp.experts.gate_up_proj": torch.randn(2, 256, 128, generator=g),
        "input_layernorm.weight": torch.randn(128, generator=g),
    }
    q, n = quantize_layer_fp8(w)
    assert n == 2
    assert q["linear_attn.in_proj_qkv.weight"].dtype == torch.float8_e4m3fn
    assert q["linear_attn.in_proj_qkv.weight_scale_inv"].shape == (2, 1)
    # gate and up halves quantised separately: 2 experts x (1 + 1) row blocks
    assert q["mlp.experts.gate_up_proj_scale_inv"].shape == (2, 2, 1)
    for kept in ("linear_attn.in_proj_a.weight", "mlp.gate.weight", "input_layernorm.weight"):
        assert q[kept] is w[kept] and kept + "_scale_inv" not in q
    # quantising twice changes nothing (shipped FP8 weights are never re-quantised)
    q2, n2 = quantize_layer_fp8(q)
    assert n2 == 0 and q2["linear_attn.in_proj_qkv.weight"] is q["linear_attn.in_proj_qkv.weight"]
    # Dequantised weights are within e4m3 rounding: half a step of 3 mantissa bits (2^-4 relative) for
    # normal values, half the subnormal step (2^-10 in units of the block scale amax/448) near zero.
    d = dequantize_all(q, torch.float32)
    ref = w["linear_attn.in_proj_qkv.weight"]
    bound = ref.abs() * 2 ** -4 + ref.abs().max() / 448 * 2 ** -10
    assert ((d["linear_attn.in_proj_qkv.weight"] - ref).abs() <= bound).all()
    assert set(d) == set(w)


class GatedNorm(nn.Module):
    """The GDN output norm node between other ops, as the layer has it."""

    def forward(self, o, z, w):
        y = torch.ops.qwen35.gated_rms_norm(o * 2, z, w, 1e-6)
        return torch.ops.qwen35.moe_router(y.flatten(1), 2)[0]


def _gated_norm_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 4, 16, generator=g), torch.randn(3, 4, 16, generator=g), torch.randn(16, generator=g))


def test_inline_ops_inlines_what_no_kernel_replaces() -> None:
    """No kernel for gated_rms_norm: its node becomes its torch body (same numbers), other qwen35 ops stay."""
    from qwen35_export.graph.inline_ops import inline_ops

    args = _gated_norm_inputs()
    ep = torch.export.export(GatedNorm(), args)
    ref = ep.module()(*args)
    ep, counts = inline_ops(ep)
    assert counts == {"gated_rms_norm": 1}
    assert _ops(ep, "qwen35") == ["moe_router"]
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"aten.rsqrt.default", "aten.silu.default"} <= targets
    assert torch.equal(ep.module()(*args), ref)


def test_inline_ops_keeps_what_a_kernel_replaces() -> None:
    """With a kernel named for it the node stays (for substitute_custom_ops to retarget), graph untouched."""
    from qwen35_export.graph.inline_ops import inline_ops

    ep = torch.export.export(GatedNorm(), _gated_norm_inputs())
    before = str(ep.graph)
    ep, counts = inline_ops(ep, keep={"gated_rms_norm"})
    assert counts == {} and str(ep.graph) == before
    assert _ops(ep, "qwen35") == ["gated_rms_norm", "moe_router"]
