"""Checkpoint I/O: the writer's determinism and sharding, both expert layouts, FP8 block quantisation and
FP8 loading (dequantised or kept), unused-prefix reporting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qwen35_export.checkpoint.fp8 import (FP8_DTYPE, FP8_MAX, dequantize_fp8_block, quantize_fp8_block,
                                          scale_shape)
from qwen35_export.checkpoint.info import checkpoint_summary
from qwen35_export.checkpoint.reader import CheckpointReader, load_model_weights
from qwen35_export.checkpoint.writer import write_random_checkpoint
from qwen35_export.config import preset
from qwen35_export.model.model import Qwen35Model
from qwen35_export.model.weights import ModelWeights, is_fp8_quantized


def file_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def all_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def assert_same_weights(a: ModelWeights, b: ModelWeights) -> None:
    assert a.globals.keys() == b.globals.keys()
    for k in a.globals:
        assert torch.equal(a.globals[k], b.globals[k]), k
    assert len(a.layers) == len(b.layers)
    for i, (la, lb) in enumerate(zip(a.layers, b.layers)):
        assert la.keys() == lb.keys(), i
        for k in la:
            assert la[k].dtype == lb[k].dtype and torch.equal(la[k], lb[k]), f"layer {i} {k}"


# -- writer --------------------------------------------------------------------------------------------
def test_writer_is_deterministic_per_seed(tmp_path: Path) -> None:
    cfg = preset("tiny", num_hidden_layers=4, mtp_num_hidden_layers=1)
    a = write_random_checkpoint(cfg, tmp_path / "a", dtype="bf16", seed=7, progress=False)
    b = write_random_checkpoint(cfg, tmp_path / "b", dtype="bf16", seed=7, progress=False)
    c = write_random_checkpoint(cfg, tmp_path / "c", dtype="bf16", seed=8, progress=False)
    assert file_bytes(a) == file_bytes(b)
    ta, tc = all_tensors(a), all_tensors(c)
    assert ta.keys() == tc.keys()
    same = [k for k in ta if ta[k].numel() > 1 and torch.equal(ta[k], tc[k])]
    assert not same, f"seed 8 reproduced seed 7's values for {same[:3]}"


def test_writer_refuses_non_empty_directory(tmp_path: Path, tiny_config) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match="not empty"):
        write_random_checkpoint(tiny_config, tmp_path / "x", progress=False)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_sharded_index_is_correct(tiny_ckpt_fp32_sharded: Path, tiny_ckpt_fp32: Path) -> None:
    index = json.loads((tiny_ckpt_fp32_sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tiny_ckpt_fp32_sharded.glob("*.safetensors"))
    n = len(shards)
    assert n > 3
    assert shards == [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    assert sorted(set(index["weight_map"].values())) == shards
    total = 0
    for shard in shards:
        with safe_open(str(tiny_ckpt_fp32_sharded / shard), framework="pt") as h:
            keys = set(h.keys())
            for k in keys:
                t = h.get_tensor(k)
                total += t.numel() * t.element_size()
        assert keys == {k for k, f in index["weight_map"].items() if f == shard}
        # 8 MiB per shard unless one tensor alone is larger (the embedding is 1 MiB here, so none is).
        assert (tiny_ckpt_fp32_sharded / shard).stat().st_size <= (8 << 20) + 100_000
    assert index["metadata"]["total_size"] == total
    # Same tensors as the single-file checkpoint of the same seed, and the same loaded model.
    sharded, single = all_tensors(tiny_ckpt_fp32_sharded), all_tensors(tiny_ckpt_fp32)
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)
    assert_same_weights(load_model_weights(tiny_ckpt_fp32_sharded, progress=False),
                        load_model_weights(tiny_ckpt_fp32, progress=False))


def test_shipped_key_names(tiny_ckpt_fp32: Path, tiny_ckpt_fp8: Path, tiny_ckpt_fp32_text_only: Path) -> None:
    fused = all_tensors(tiny_ckpt_fp32)
    p = "model.language_model."
    assert {"lm_head.weight", p + "embed_tokens.weight", p + "norm.weight"} <= fused.keys()
    assert fused[p + "layers.0.mlp.experts.gate_up_proj"].shape == (16, 256, 256)
    assert fused[p + "layers.0.mlp.experts.down_proj"].shape == (16, 256, 128)
    assert fused[p + "layers.0.linear_attn.A_log"].dtype == torch.float32
    assert p + "layers.3.self_attn.q_proj.weight" in fused and p + "layers.3.linear_attn.A_log" not in fused
    assert "mtp.fc.weight" in fused and "mtp.layers.0.self_attn.q_proj.weight" in fused
    fp8 = all_tensors(tiny_ckpt_fp8)
    assert fp8[p + "layers.0.mlp.experts.15.gate_proj.weight"].dtype == FP8_DTYPE
    assert fp8[p + "layers.0.mlp.experts.15.gate_proj.weight_scale_inv"].shape == (1, 2)
    assert fp8[p + "layers.0.linear_attn.A_log"].dtype == torch.float32
    for bf16 in ("lm_head.weight", p + "embed_tokens.weight", p + "layers.0.linear_attn.in_proj_a.weight",
                 p + "layers.0.linear_attn.conv1d.weight", p + "layers.0.mlp.gate.weight",
                 p + "layers.0.mlp.shared_expert_gate.weight", "mtp.fc.weight"):
        assert fp8[bf16].dtype == torch.bfloat16, bf16
    cfg = json.loads((tiny_ckpt_fp8 / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "fp8" and q["weight_block_size"] == [128, 128] and "fmt" not in q
    assert "lm_head" in q["modules_to_not_convert"]
    text = all_tensors(tiny_ckpt_fp32_text_only)
    assert "model.layers.0.mlp.experts.gate_up_proj" in text and not any(k.startswith(p) for k in text)


# -- layouts --------------------------------------------------------------------------------------------
def test_fused_per_expert_and_text_only_load_identically(tiny_ckpt_fp32, tiny_ckpt_fp32_per_expert,
                                                         tiny_ckpt_fp32_text_only) -> None:
    assert CheckpointReader(tiny_ckpt_fp32).info.expert_layout == "fused"
    assert CheckpointReader(tiny_ckpt_fp32_per_expert).info.expert_layout == "per_expert"
    info = CheckpointReader(tiny_ckpt_fp32_text_only).info
    assert info.prefix == "model." and info.config.model_type == "qwen3_5_moe_text"
    fused = load_model_weights(tiny_ckpt_fp32, progress=False)
    assert_same_weights(load_model_weights(tiny_ckpt_fp32_per_expert, progress=False), fused)
    assert_same_weights(load_model_weights(tiny_ckpt_fp32_text_only, progress=False), fused)


def test_bf16_checkpoint_loads_as_rounded_fp32(tiny_ckpt_bf16, tiny_ckpt_fp32) -> None:
    """Same seed in bf16: every weight is the fp32 one rounded to bf16 (A_log stays fp32)."""
    bf, fp = load_model_weights(tiny_ckpt_bf16, progress=False), load_model_weights(tiny_ckpt_fp32, progress=False)
    for k in fp.globals:
        assert torch.equal(bf.globals[k], fp.globals[k].bfloat16().float()), k
    for k, v in fp.layers[0].items():
        want = v if k == "linear_attn.A_log" else v.bfloat16().float()
        assert torch.equal(bf.layers[0][k], want), k


def test_load_layer_in_bf16_keeps_a_log_exact_fp32(tiny_ckpt_bf16) -> None:
    """A bf16 build reads layers with dtype=bf16: A_log must come back as the file's fp32 values, unrounded."""
    r = CheckpointReader(tiny_ckpt_bf16)
    i = r.config.gdn_layers[0]
    got = r.load_layer(i, torch.bfloat16)["linear_attn.A_log"]
    want = r.read(f"{r.info.prefix}layers.{i}.linear_attn.A_log")
    assert want.dtype == torch.float32 and got.dtype == torch.float32
    assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item():.3g}"


# -- FP8 ------------------------------------------------------------------------------------------------
# Error bound of quantize -> dequantize, per element, derived from e4m3fn (1 sign, 4 exponent, 3 mantissa
# bits, bias 7, largest finite 448). Each 128x128 block is divided by s = amax/448 so its largest element
# lands on 448. A scaled value |x| >= 2^-6 is a normal e4m3 number: 3 mantissa bits make the spacing
# 2^-3 * 2^floor(log2|x|) <= 2^-3 |x|, so round-to-nearest errs by at most half of that, 2^-4 |x|.
# Below 2^-6 (subnormals) the spacing is the fixed 2^-9, so the error is at most 2^-10. Multiplying back by
# s: |deq - w| <= max(2^-4 |w|, 2^-10 s). The divide and multiply in fp32 add ~2^-24 relative (slack 1e-6).
def block_scale_per_element(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return dequantize_fp8_block(torch.ones(w.shape, dtype=FP8_DTYPE), scale)  # 1.0 is exact in e4m3


def fp8_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = block_scale_per_element(w, scale)
    return torch.maximum(2.0 ** -4 * w.abs(), 2.0 ** -10 * s) * (1 + 1e-6)


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (3, 130, 257), (1, 5)],
                         ids=["whole-blocks", "partial-2d", "partial-3d-experts", "one-partial-block"])
def test_quantize_fp8_block_round_trip_bound(shape) -> None:
    g = torch.Generator().manual_seed(0)
    # Magnitudes over 6 decades within each block so both the normal and the subnormal range are hit.
    w = torch.randn(shape, generator=g) * torch.exp(torch.empty(shape).uniform_(-14.0, 0.0, generator=g))
    q, s = quantize_fp8_block(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.dtype == torch.float32 and tuple(s.shape) == scale_shape(tuple(shape)) == (
        *shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    deq = dequantize_fp8_block(q, s)
    err = (deq - w).abs()
    bound = fp8_bound(w, s)
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3e}"
    # The block maximum maps to +-448 and comes back exactly (448 is representable), and the bound is
    # not vacuous: the relative error of the normal-range values actually reaches its 2^-4 order.
    assert q.float().abs().max().item() == FP8_MAX
    normal = w.abs() >= 2.0 ** -6 * block_scale_per_element(w, s)
    assert (err[normal] / w.abs()[normal]).max().item() > 2.0 ** -5


def test_quantize_fp8_block_zero_block_and_exact_values() -> None:
    w = torch.zeros(130, 260)
    w[:128, :128] = torch.tensor([1.0, -2.0, 448.0, 0.5]).repeat(128, 32)  # exactly representable after /1
    q, s = quantize_fp8_block(w)
    assert torch.equal(s, torch.ones(2, 3))  # amax 448 -> scale 1; all-zero blocks -> scale 1
    assert torch.equal(dequantize_fp8_block(q, s), w)


def test_fp8_checkpoint_dequantised_vs_kept(tiny_ckpt_fp8, assert_logits_close) -> None:
    deq = load_model_weights(tiny_ckpt_fp8, torch.float32, keep_fp8=False, progress=False)
    kept = load_model_weights(tiny_ckpt_fp8, torch.float32, keep_fp8=True, progress=False)
    cfg = deq.cfg
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    for i, (ld, lk) in enumerate(zip(deq.layers, kept.layers)):
        assert not any(k.endswith("_scale_inv") for k in ld)
        for name, t in lk.items():
            if name.endswith("_scale_inv"):
                continue
            if is_fp8_quantized(name):
                s = lk[name + "_scale_inv"]
                assert t.dtype == FP8_DTYPE and s.dtype == torch.float32, name
                assert tuple(s.shape) == scale_shape(tuple(t.shape)), name
                assert torch.equal(dequantize_fp8_block(t, s), ld[name]), f"layer {i} {name}"
            else:
                assert t.dtype == torch.float32 and torch.equal(t, ld[name]), f"layer {i} {name}"
        assert lk["mlp.experts.gate_up_proj_scale_inv"].shape == (E, 2 * I // 128, -(-H // 128))
        assert lk["mlp.experts.down_proj_scale_inv"].shape == (E, -(-H // 128), -(-I // 128))
    # The FP8 custom ops (fp8_linear, moe_experts_fp8) dequantise in fp32: same logits as dequantised.
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    lens = torch.tensor([20])
    m_deq, m_kept = Qwen35Model(deq), Qwen35Model(kept)
    a, _ = m_kept.prefill(ids, lens, m_kept.init_state(1, 32))
    b, _ = m_deq.prefill(ids, lens, m_deq.init_state(1, 32))
    assert_logits_close(a, b, 1e-5, "kept FP8 vs dequantised")


def test_fp8_checkpoint_is_the_fp32_one_quantised(tiny_ckpt_fp8, tiny_ckpt_fp32) -> None:
    """The FP8 checkpoint of a seed is the fp32 one of that seed, block-quantised within the derived bound."""
    q = load_model_weights(tiny_ckpt_fp8, progress=False, keep_fp8=True)
    f = load_model_weights(tiny_ckpt_fp32, progress=False)
    for name in ("linear_attn.in_proj_qkv.weight", "mlp.experts.gate_up_proj", "mlp.shared_expert.down_proj.weight"):
        w, s = q.layers[0][name], q.layers[0][name + "_scale_inv"]
        ref = f.layers[0][name]
        assert ((dequantize_fp8_block(w, s) - ref).abs() <= fp8_bound(ref, s)).all(), name


# -- unused prefixes ------------------------------------------------------------------------------------
def test_mtp_reported_unused(tiny_ckpt_fp32, tiny_ckpt_fp8) -> None:
    for ckpt in (tiny_ckpt_fp32, tiny_ckpt_fp8):
        r = CheckpointReader(ckpt)
        n_mtp = sum(1 for k in r.weight_map if k.startswith("mtp."))
        assert n_mtp > 0 and r.info.unused_prefixes == {"mtp.": n_mtp}
        summary = checkpoint_summary(ckpt)
        assert f"not used     {n_mtp} tensors under 'mtp.'" in summary


def test_writer_init_keeps_a_deep_forward_finite_and_position_dependent(tmp_path) -> None:
    """24 layers (3x the tiny preset) in bf16, as released, run in bf16: no NaN/Inf, hidden states neither
    blow up nor vanish, and the logits still differ across positions."""
    cfg = preset("tiny", num_hidden_layers=24)
    ckpt = write_random_checkpoint(cfg, tmp_path / "deep", dtype="bf16", seed=3, progress=False)
    model = Qwen35Model(load_model_weights(ckpt, torch.bfloat16, progress=False))
    ids = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    rms = []
    logits, _ = model.prefill(ids, torch.tensor([24]), model.init_state(1, 24),
                              hook=lambda i, x: rms.append(x.float().pow(2).mean().sqrt().item()))
    assert torch.isfinite(logits).all()
    assert all(0.1 < r < 1e3 for r in rms), rms
    top = logits[0].float().argmax(-1)
    assert top.unique().numel() > 4, top
