"""graph/fuse_weights.py: fused projections give the layer's output exactly as the unfused weights do (fp32
on the CPU, reference ops), FP8 block scales stay with their rows, and groups that cannot fuse exactly
are left alone."""

from __future__ import annotations

import pytest
import torch

from qwen35_export.checkpoint.fp8 import FP8_DTYPE
from qwen35_export.config import preset
from qwen35_export.graph.fuse_weights import fuse_layer_weights
from qwen35_export.graph.quantize_fp8 import quantize_layer_fp8
from qwen35_export.model import layers as L
from qwen35_export.model.weights import layer_weight_shapes


def _random_layer(cfg, i: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + i)
    w = {}
    for name, shape in layer_weight_shapes(cfg, i).items():
        if "norm" in name:
            w[name] = torch.randn(shape, generator=g) * 0.1
        elif name.endswith("A_log"):
            w[name] = torch.rand(shape, generator=g).log()
        elif name.endswith("dt_bias"):
            w[name] = torch.randn(shape, generator=g) * 0.1
        else:
            w[name] = torch.randn(shape, generator=g) * shape[-1] ** -0.5
    return w


def _run(cfg, i: int, w: dict[str, torch.Tensor], x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    if cfg.layer_types[i] == "linear_attention":
        conv = torch.randn(B, cfg.conv_dim, cfg.linear_conv_kernel_dim - 1, generator=torch.Generator().manual_seed(1))
        rec = torch.zeros(B, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
        return L.gdn_layer(x, w, conv, rec, lengths, cfg)[0]
    kc = torch.zeros(B, cfg.num_key_value_heads, 16, cfg.head_dim)
    return L.attention_layer(x, w, kc, kc.clone(), torch.zeros(B, dtype=torch.int64), lengths, cfg)[0]


@pytest.mark.parametrize("layer", [0, 3])  # a GDN layer and an attention layer of the tiny preset
@pytest.mark.parametrize("fp8", [False, True])
def test_fused_layer_equals_unfused(layer: int, fp8: bool) -> None:
    cfg = preset("tiny")
    w = _random_layer(cfg, layer)
    if fp8:
        w, _ = quantize_layer_fp8(w)
    fused, groups = fuse_layer_weights(w)
    kind = cfg.layer_types[layer]
    # FP8 keeps b/a in BF16 (quantize_fp8), so their GEMM cannot join the FP8 qkvz one
    gdn = ({"linear_attn.in_proj_qkvz.weight", "linear_attn.in_proj_ba.weight"} if fp8
           else {"linear_attn.in_proj_qkvzba.weight"})
    want = {"linear_attention": gdn, "full_attention": {"self_attn.qkv_proj.weight"}}[kind]
    assert want | {"mlp.gate_shared.weight", "mlp.experts (+ shared expert as expert E)"} == set(groups)
    assert all(n in fused for n in want) and "mlp.gate.weight" not in fused
    gs = fused["mlp.gate_shared.weight"]  # router rows, the shared gate's row, zero rows to a multiple of 8
    assert gs.shape[0] % 8 == 0 and gs.shape[0] - cfg.num_experts - 1 < 8 and not gs[cfg.num_experts + 1:].any()
    assert torch.equal(gs[cfg.num_experts], w["mlp.shared_expert_gate.weight"][0])
    assert not any(n.startswith("linear_attn.in_proj_") and n.removeprefix("linear_attn.").removesuffix(".weight")
                   in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a") for n in fused)
    assert fused["mlp.experts.down_proj"].shape[0] == cfg.num_experts + 1
    assert not any(n.startswith("mlp.shared_expert.") and "proj" in n for n in fused)
    x = torch.randn(3, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([5, 1, 3])
    ref, got = _run(cfg, layer, w, x, lengths), _run(cfg, layer, fused, x, lengths)
    # Same math, different summation order only where the MoE now adds the shared expert inside its
    # combine: fp32 rounding, far below any real difference (a wrong row or scale gives O(1) changes).
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_fp8_scales_follow_their_rows() -> None:
    cfg = preset("tiny")
    w, _ = quantize_layer_fp8(_random_layer(cfg, 3))
    fused, _ = fuse_layer_weights(w)
    q, k, v = (w[f"self_attn.{n}_proj.weight_scale_inv"] for n in "qkv")
    s = fused["self_attn.qkv_proj.weight_scale_inv"]
    assert torch.equal(s, torch.cat([q, k, v])) and fused["self_attn.qkv_proj.weight"].dtype == FP8_DTYPE
    assert torch.equal(fused["mlp.experts.down_proj_scale_inv"][-1], w["mlp.shared_expert.down_proj.weight_scale_inv"])


def test_groups_that_cannot_fuse_exactly_are_left_alone() -> None:
    cfg = preset("tiny")
    w, _ = quantize_layer_fp8(_random_layer(cfg, 0))
    # an FP8 part whose rows end inside a 128-row scale block: fusing would make the block cover the next part
    w["linear_attn.in_proj_z.weight"] = w["linear_attn.in_proj_z.weight"][:100]
    w["linear_attn.in_proj_z.weight_scale_inv"] = w["linear_attn.in_proj_z.weight_scale_inv"][:1]
    # a shared expert of another size cannot be an expert of the routed op
    w["mlp.shared_expert.down_proj.weight"] = w["mlp.shared_expert.down_proj.weight"][:, :64]
    fused, groups = fuse_layer_weights(w)
    assert "linear_attn.in_proj_qkvz.weight" not in groups and "linear_attn.in_proj_qkv.weight" in fused
    assert fused["mlp.experts.down_proj"].shape[0] == cfg.num_experts
    assert "mlp.shared_expert.gate_up_proj.weight" in groups  # gate + up still fuse with each other


@pytest.mark.parametrize("layer", [0, 3])
def test_shipped_fp8_checkpoint_layer_fuses_exactly(tiny_ckpt_fp8, layer: int) -> None:
    """The weights of a shipped FP8 checkpoint (per-expert tensors + weight_scale_inv, as the reader hands
    them to the build) fuse too, and the fused layer computes what the unfused one does."""
    from qwen35_export.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(tiny_ckpt_fp8)
    cfg = reader.config
    w = reader.load_layer(layer, torch.float32, keep_fp8=True)
    reader.close()
    assert w["mlp.experts.down_proj"].dtype == FP8_DTYPE and "mlp.experts.down_proj_scale_inv" in w
    fused, groups = fuse_layer_weights(w)
    assert "mlp.experts (+ shared expert as expert E)" in groups and len(groups) >= 2
    x = torch.randn(2, 4, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([4, 2])
    torch.testing.assert_close(_run(cfg, layer, fused, x, lengths), _run(cfg, layer, w, x, lengths),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inter", [64, 192])
def test_fp8_shared_expert_of_partial_scale_blocks_stays_out_of_the_moe_op(inter: int) -> None:
    """FP8 with I not a multiple of 128: the experts' gate/up scale rows are per half (quantize_fp8), which
    the MoE ops do not read as such; the shared expert stays a linear with its own scales, computing what
    the unfused layer does (folded in, its up rows took the gate's last scale block)."""
    cfg = preset("tiny", moe_intermediate_size=inter, shared_expert_intermediate_size=inter)
    w, _ = quantize_layer_fp8(_random_layer(cfg, 0))
    fused, groups = fuse_layer_weights(w)
    assert fused["mlp.experts.down_proj"].shape[0] == cfg.num_experts
    x = torch.randn(2, 3, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([3, 2])
    torch.testing.assert_close(_run(cfg, 0, fused, x, lengths), _run(cfg, 0, w, x, lengths), rtol=1e-5, atol=1e-5)
