"""Every captured layer graph, with the Triton ops a GPU build substitutes, lowers without a guard on the
batch or length symbols.

A guard taken while a `triton_op` body is traced (a Python `min`, `if N > ...`, `int(N)`) holds only on the
example's side and AOTInductor compiles that branch for every size, silently: `max_padded`'s `min(E, M)` took
the 54-slot capture example's side (M < E), so every prefill graph launched 128 * M MoE tile programs
(H200, 35B-A3B: 2.8 ms instead of 0.48 per MoE GEMM at 8192 tokens). Lowering runs here on the CPU: the
Triton kernels are recorded, never launched. The config has more experts (300) than the example has slots.
"""

from __future__ import annotations

import sys

import pytest
import torch

from qwen35_export.checkpoint.writer import random_tensor
from qwen35_export.config import preset
from qwen35_export.exporter import capture as C
from qwen35_export.graph.fuse_weights import fuse_layer_weights
from qwen35_export.graph.quantize_fp8 import quantize_layer_fp8
from qwen35_export.graph.substitute_custom_ops import substitute_custom_ops, triton_implementations
from qwen35_export.model import ops  # noqa: F401  (registers the qwen35:: reference ops)
from qwen35_export.model.weights import layer_weight_shapes

CFG = preset("tiny", num_experts=300, num_hidden_layers=4)  # layers 0-2 GDN, 3 attention
SHAPES = C.CaptureShapes(max_batch=64, max_seq_len=8256)


def _layer(i: int, dtype: str, fuse: bool = True) -> dict[str, torch.Tensor]:
    """Layer i's random weights in `dtype` (bf16 | fp8), with the projections fused as a single-rank build
    fuses them unless `fuse` is off (sharded builds do not fuse)."""
    w = {}
    for name, shape in layer_weight_shapes(CFG, i).items():
        t = random_tensor(f"layers.{i}.{name}", shape, seed=0)
        w[name] = t if name.endswith(("A_log", "dt_bias")) else t.to(torch.bfloat16)
    if dtype == "fp8":
        w, _ = quantize_layer_fp8(w)
    return fuse_layer_weights(w)[0] if fuse else w


class _Launch:
    """Stands in for `wrap_triton(kernel)[grid](...)` while lowering: records nothing, runs nothing (under
    TRITON_INTERPRET, set by the kernel tests, the real one would try to run kernels on fake tensors)."""

    def __init__(self, kernel):
        pass

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def relational_guards(ep: torch.export.ExportedProgram, monkeypatch) -> list[str]:
    """Guards of the lowered program's shape environment other than equalities (reshapes of one dim)."""
    for mod in [m for name, m in sys.modules.items() if name.startswith("qwen35_export.kernels")]:
        if hasattr(mod, "wrap_triton"):
            monkeypatch.setattr(mod, "wrap_triton", _Launch)
    lowered = ep.run_decompositions(decompose_custom_triton_ops=True)
    env = next(n for n in lowered.graph.nodes if n.op == "placeholder").meta["val"].fake_mode.shape_env
    return [str(g.expr) for g in env.guards if not str(g.expr).startswith("Eq(")]


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("kind,phase", [("gdn", "prefill"), ("gdn", "decode"), ("attn", "prefill"),
                                        ("attn", "decode")])
def test_lowering_adds_no_size_guard(kind, phase, dtype, monkeypatch):
    impls = triton_implementations()
    if not impls:
        pytest.skip("triton is not importable: no Triton ops to substitute")
    cap, layer, kw = (C.capture_gdn, 0, {}) if kind == "gdn" else (C.capture_attention, 3, {"cache_op": True})
    ep, _ = cap(CFG, _layer(layer, dtype), phase, SHAPES, torch.bfloat16, torch.device("cpu"), **kw)
    ep, subs = substitute_custom_ops(ep, impls)
    assert subs.get("moe_experts_fp8" if dtype == "fp8" else "moe_experts") == 1, subs
    if kind == "attn":
        assert subs.get("decode_attention") == 1, subs  # prefill too: the flash kernel GPU builds use
    assert relational_guards(ep, monkeypatch) == []


# 35B-A3B's GDN heads (32 value heads of 128): a decode graph's batch (up to 64) times the heads crosses the
# recurrent kernel's launch-config buckets (kernels/gated_delta_rule/recurrent.py), which the tiny preset's
# few heads never reach.
WIDE_GDN = preset("tiny", num_experts=300, num_hidden_layers=4, linear_num_value_heads=32,
                  linear_value_head_dim=128, linear_num_key_heads=16, linear_key_head_dim=128)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_wide_gdn_decode_adds_no_size_guard(dtype, monkeypatch):
    """A recurrent launch config picked by comparing batch x heads with its buckets guarded `B < 16`: the
    capture example's bucket was baked into every engine's GDN decode graph, and the narrowed range then
    sized the graph's FP8 linears for <= 15 rows (H200 engines, 2026-12-01)."""
    impls = triton_implementations()
    if not impls:
        pytest.skip("triton is not importable: no Triton ops to substitute")
    monkeypatch.setattr(sys.modules[__name__], "CFG", WIDE_GDN)
    ep, _ = C.capture_gdn(WIDE_GDN, _layer(0, dtype), "decode", SHAPES, torch.bfloat16, torch.device("cpu"))
    ep, _ = substitute_custom_ops(ep, impls)
    assert relational_guards(ep, monkeypatch) == []


@pytest.mark.parametrize("large", [True, False], ids=["triton-kernels", "torch-ops"])
def test_large_m_align_paths_add_no_size_guard(large, monkeypatch):
    """Both align paths past SMALL_M slots (kernels/moe/align.py, LARGE_TRITON forced either way) in a
    prefill graph: no guard either."""
    from qwen35_export.kernels.moe import align

    impls = triton_implementations()
    if not impls:
        pytest.skip("triton is not importable: no Triton ops to substitute")
    calls = []
    fn = align._align_large
    monkeypatch.setattr(align, "LARGE_TRITON", large)
    monkeypatch.setattr(align, "_align_large", lambda *a: calls.append(1) or fn(*a))
    ep, _ = C.capture_gdn(CFG, _layer(0, "bf16"), "prefill", SHAPES, torch.bfloat16, torch.device("cpu"))
    ep, _ = substitute_custom_ops(ep, impls)
    assert relational_guards(ep, monkeypatch) == []
    assert bool(calls) == large, "the prefill graph did not take the forced align path"


@pytest.mark.parametrize("kind", ["gdn", "attn"])
def test_scaled_mm_prefill_adds_no_size_guard(kind, monkeypatch):
    """The sm_90 FP8 prefill linears (SCALED_MM: rows padded to 4 for cuBLASLt, sliced back) in a prefill
    graph, taken here by declaring the path supported (it needs an sm_90 GPU to run, not to lower): no guard.
    Padding with ceil(R / 4) * 4 guarded `R <= -4 * ((-R) // 4)` (true for every R, a guard all the same)."""
    from qwen35_export.kernels.fp8_linear import gemm

    impls = triton_implementations()
    if not impls:
        pytest.skip("triton is not importable: no Triton ops to substitute")
    calls = []
    monkeypatch.setattr(gemm, "scaled_mm_supported", lambda *a: True)
    fn = gemm.scaled_mm
    monkeypatch.setattr(gemm, "scaled_mm", lambda *a, **k: calls.append(1) or fn(*a, **k))
    cap, layer = (C.capture_gdn, 0) if kind == "gdn" else (C.capture_attention, 3)
    ep, _ = cap(CFG, _layer(layer, "fp8"), "prefill", SHAPES, torch.bfloat16, torch.device("cpu"))
    ep, subs = substitute_custom_ops(ep, impls)
    assert subs.get("fp8_linear"), subs
    assert relational_guards(ep, monkeypatch) == []
    assert calls, "the prefill graph's FP8 linears did not take the SCALED_MM path"
