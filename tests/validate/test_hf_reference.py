"""validate's transformers reference loads every checkpoint flavour as an fp32 model of the same weights."""

from __future__ import annotations

import pytest
import torch

from qwen35_export.checkpoint.reader import load_model_weights
from qwen35_export.checkpoint.writer import write_random_checkpoint
from qwen35_export.model.model import Qwen35Model
from qwen35_export.validate.hf_reference import hf_trace, load_hf

pytest.importorskip("transformers")

PROMPT = [5, 6, 7, 8, 9, 10, 11]


@pytest.fixture(scope="module")
def tiny_ckpt_fp8_text_only(checkpoint_root, tiny_config):
    """FP8 with the flat `qwen3_5_moe_text` config and `model.` prefix (a text-only FP8 checkpoint)."""
    cfg = tiny_config.replace(model_type="qwen3_5_moe_text")
    return write_random_checkpoint(cfg, checkpoint_root / "fp8_text_only", seed=0, progress=False, dtype="fp8")


@pytest.mark.parametrize("ckpt", ["tiny_ckpt_fp32", "tiny_ckpt_fp8", "tiny_ckpt_fp8_text_only"])
def test_load_hf_matches_our_fp32_reference(ckpt, request) -> None:
    """The FP8 checkpoint used to load through Qwen3_5MoeForCausalLM, which takes the e4m3 bytes for weights
    (every layer wrong). Both models here are fp32 on the same (dequantised) weights, so the logits agree to
    fp32 accumulation-order error; 1e-4 of the largest logit is the parity tests' bound."""
    if ckpt.startswith("tiny_ckpt_fp8"):
        pytest.importorskip("accelerate", reason="transformers' FP8 loader needs accelerate")
    path = request.getfixturevalue(ckpt)
    hf = load_hf(path, torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in hf.parameters())
    ours = Qwen35Model(load_model_weights(path, torch.float32, keep_fp8=False, progress=False))
    [row] = hf_trace(hf, [PROMPT], gen=4, n_layers=ours.cfg.num_hidden_layers, progress=False)
    ref, _ = ours.prefill(torch.tensor([PROMPT]), torch.tensor([len(PROMPT)]), ours.init_state(1, 16))
    ref = ref[0].float()
    assert (row.prefill_logits - ref).abs().max() <= 1e-4 * ref.abs().max()
