"""Shared fixtures: tiny random checkpoints written once per session, and the logit comparison.

Every checkpoint here is the `tiny` preset plus one MTP layer (as the shipped releases carry one), written
by `write_random_checkpoint` with seed 0, so the fp32 fused, fp32 per-expert and text-only checkpoints hold
the same weights in different layouts. Tests that break a checkpoint copy one of these into their own
tmp_path first; nothing here is ever modified.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen35_export.checkpoint.writer import write_random_checkpoint
from qwen35_export.config import Qwen35Config, preset

SEED = 0


@pytest.fixture(scope="session")
def tiny_config() -> Qwen35Config:
    """The `tiny` geometry with one MTP layer, multimodal nesting (`model.language_model.` prefix)."""
    return preset("tiny", mtp_num_hidden_layers=1)


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


def _write(root: Path, name: str, cfg: Qwen35Config, **kwargs) -> Path:
    return write_random_checkpoint(cfg, root / name, seed=SEED, progress=False, **kwargs)


@pytest.fixture(scope="session")
def tiny_ckpt_fp32(checkpoint_root: Path, tiny_config: Qwen35Config) -> Path:
    """fp32, routed experts fused (`mlp.experts.gate_up_proj` / `down_proj`), one file."""
    return _write(checkpoint_root, "fp32_fused", tiny_config, dtype="fp32", expert_layout="fused")


@pytest.fixture(scope="session")
def tiny_ckpt_fp32_per_expert(checkpoint_root: Path, tiny_config: Qwen35Config) -> Path:
    """fp32, routed experts per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`)."""
    return _write(checkpoint_root, "fp32_per_expert", tiny_config, dtype="fp32", expert_layout="per_expert")


@pytest.fixture(scope="session")
def tiny_ckpt_fp32_sharded(checkpoint_root: Path, tiny_config: Qwen35Config) -> Path:
    """fp32 fused, split into shards of at most 8 MiB with `model.safetensors.index.json`."""
    return _write(checkpoint_root, "fp32_sharded", tiny_config, dtype="fp32", max_shard_size=8 << 20)


@pytest.fixture(scope="session")
def tiny_ckpt_fp32_text_only(checkpoint_root: Path, tiny_config: Qwen35Config) -> Path:
    """fp32 fused, flat `qwen3_5_moe_text` config and `model.` prefix (text-only checkpoint)."""
    cfg = tiny_config.replace(model_type="qwen3_5_moe_text")
    return _write(checkpoint_root, "fp32_text_only", cfg, dtype="fp32")


@pytest.fixture(scope="session")
def tiny_ckpt_fp8(checkpoint_root: Path, tiny_config: Qwen35Config) -> Path:
    """As the `-FP8` releases: e4m3 weights + 128x128 block scales, experts per expert, BF16 keep-list."""
    return _write(checkpoint_root, "fp8_per_expert", tiny_config, dtype="fp8")


@pytest.fixture(scope="session")
def tiny_ckpt_bf16(checkpoint_root: Path, tiny_config: Qwen35Config) -> Path:
    """As the BF16 releases: bf16, experts fused."""
    return _write(checkpoint_root, "bf16_fused", tiny_config, dtype="bf16")


def max_abs_diff(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """max |actual - ref|; NaN/Inf on either side, or different shapes, fail the calling test."""
    assert actual.shape == ref.shape, f"shape {tuple(actual.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    assert torch.isfinite(ref).all(), "non-finite values in the reference"
    return (actual.double() - ref.double()).abs().max().item()


@pytest.fixture
def assert_logits_close():
    """`check(actual, ref, rel, what) -> max|d|`: asserts max|actual - ref| <= rel * max|ref|."""

    def check(actual: torch.Tensor, ref: torch.Tensor, rel: float, what: str = "") -> float:
        d = max_abs_diff(actual, ref)
        scale = ref.abs().max().item()
        assert d <= rel * scale, f"{what}: max|d| = {d:.3e} > {rel:g} * max|ref| = {rel * scale:.3e}"
        return d

    return check


# Engines built once per session (shared by the engine, validate and backend tests).
from engine_fixtures import *  # noqa: E402,F401,F403
