"""Parity with Hugging Face transformers' own Qwen3.5 MoE (the reference nobody here wrote).

Each case loads a checkpoint twice: with transformers' `from_pretrained` (which must report no missing,
unexpected or mismatched keys: that proves our files have the shipped layout) and with our
`load_model_weights`. Then, in fp32: our batched right-padded prefill of two rows of unequal length, then 16
decode steps with the state carried, against transformers run on each row alone and unpadded (transformers
does not mask right padding out of the GDN state), then 16 steps with its own cache (`use_cache=True`,
`past_key_values` fed back). Bound, per row and phase: max|d logit| <= 1e-4 * max|logit| (fp32; the two
sides differ in GDN algorithm: transformers' chunked WY form vs our step recurrence, and in summation order).
The observed max|d| of each case is printed (`pytest -s`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qwen35_export.checkpoint.reader import load_model_weights
from qwen35_export.config import Qwen35Config, preset
from qwen35_export.model.model import Qwen35Model
from qwen35_export.model.weights import ModelWeights

REL = 1e-4
N_DECODE = 16
T_SWEEP = [1, 7, 64, 65, 130]
T_SHORT = [7, 65]  # one short prompt and one across transformers' 64-token GDN chunk


def hf_load(ckpt: Path, cls_name: str = "Qwen3_5MoeForCausalLM"):
    """transformers' from_pretrained in fp32; asserts its loading report is clean."""
    import transformers

    model, info = getattr(transformers, cls_name).from_pretrained(ckpt, dtype=torch.float32,
                                                                  output_loading_info=True)
    missing = set(info["missing_keys"])
    if cls_name == "Qwen3_5MoeForConditionalGeneration":
        missing = {k for k in missing if not k.startswith("model.visual.")}  # our files hold no vision tower
    assert not missing and not info["unexpected_keys"] and not info["mismatched_keys"], {
        k: sorted(v)[:5] for k, v in info.items() if v}
    assert not info["error_msgs"], info["error_msgs"]
    return model.eval()


def prompts(T: int, vocab: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two prompts of unequal length (T and about 2T/3) and 16 decode tokens per row."""
    g = torch.Generator().manual_seed(T)
    rows = [torch.randint(0, vocab, (n,), generator=g) for n in (T, max(1, 2 * T // 3))]
    return rows, torch.randint(0, vocab, (2, N_DECODE), generator=g)


@torch.no_grad()
def ours_run(model: Qwen35Model, rows: list[torch.Tensor], dec: torch.Tensor):
    """Batched right-padded prefill (pads are random ids), then decode steps: (prefill rows, [B, N, V])."""
    B, T = len(rows), max(len(r) for r in rows)
    ids = torch.randint(0, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(123))
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    lengths = torch.tensor([len(r) for r in rows])
    logits, state = model.prefill(ids, lengths, model.init_state(B, T + N_DECODE))
    steps = []
    for j in range(dec.shape[1]):
        step, state = model.decode(dec[:, j:j + 1], state)
        steps.append(step[:, 0])
    return [logits[b, : len(r)] for b, r in enumerate(rows)], torch.stack(steps, 1)


@torch.no_grad()
def hf_run(hf, row: torch.Tensor, dec_row: torch.Tensor):
    """transformers on one unpadded row, then decode with its cache: (prefill [T, V], decode [N, V])."""
    out = hf(input_ids=row[None], use_cache=True)
    prefill, past = out.logits[0], out.past_key_values
    steps = []
    for t in dec_row:
        out = hf(input_ids=t.view(1, 1), past_key_values=past, use_cache=True)
        past = out.past_key_values
        steps.append(out.logits[0, -1])
    return prefill, torch.stack(steps)


def check_parity(hf, ours: Qwen35Model, T: int, case: str, assert_logits_close) -> None:
    rows, dec = prompts(T, ours.cfg.vocab_size)
    our_prefill, our_dec = ours_run(ours, rows, dec)
    worst = {"prefill": 0.0, "decode": 0.0}
    scale = 0.0
    for b, row in enumerate(rows):
        ref_prefill, ref_dec = hf_run(hf, row, dec[b])
        worst["prefill"] = max(worst["prefill"], assert_logits_close(
            our_prefill[b], ref_prefill, REL, f"{case} T={T} row {b} (length {len(row)}) prefill"))
        worst["decode"] = max(worst["decode"], assert_logits_close(
            our_dec[b], ref_dec, REL, f"{case} T={T} row {b} decode"))
        scale = max(scale, ref_prefill.abs().max().item(), ref_dec.abs().max().item())
    print(f"\nparity {case} T={T} lengths={[len(r) for r in rows]}: max|d| prefill {worst['prefill']:.2e}, "
          f"decode x{N_DECODE} {worst['decode']:.2e}; max|logit| {scale:.2f}")


# -- our own writer's files: fused, per expert, FP8, text-only, multimodal class -----------------------
@pytest.fixture(scope="module")
def fused_pair(tiny_ckpt_fp32):
    return hf_load(tiny_ckpt_fp32), Qwen35Model(load_model_weights(tiny_ckpt_fp32, progress=False))


@pytest.fixture(scope="module")
def per_expert_pair(tiny_ckpt_fp32_per_expert):
    return (hf_load(tiny_ckpt_fp32_per_expert),
            Qwen35Model(load_model_weights(tiny_ckpt_fp32_per_expert, progress=False)))


@pytest.mark.parametrize("T", T_SWEEP)
def test_parity_fp32_fused(fused_pair, T, assert_logits_close) -> None:
    check_parity(*fused_pair, T, "fp32-fused", assert_logits_close)


@pytest.mark.parametrize("T", T_SWEEP)
def test_parity_fp32_per_expert(per_expert_pair, T, assert_logits_close) -> None:
    check_parity(*per_expert_pair, T, "fp32-per-expert", assert_logits_close)


@pytest.fixture(scope="module")
def fp8_pair(tiny_ckpt_fp8):
    """transformers loading our FP8 files itself. Only `Qwen3_5MoeForConditionalGeneration` honours the
    top-level `quantization_config` of a multimodal checkpoint (transformers 5.23: `Qwen3_5MoeForCausalLM`
    reads only `text_config`, loads the e4m3 bytes as plain weights and reports every `weight_scale_inv` as
    unexpected). Its FineGrainedFP8 quantizer needs `accelerate`; without a GPU it dequantises the blocks
    in fp32 at load time (keep-list tensors stay bf16, so the model is cast to fp32 after loading:
    bf16 -> fp32 is exact)."""
    pytest.importorskip("accelerate", reason="transformers' FP8 loader needs accelerate")
    hf = hf_load(tiny_ckpt_fp8, "Qwen3_5MoeForConditionalGeneration").float()
    return hf, Qwen35Model(load_model_weights(tiny_ckpt_fp8, torch.float32, progress=False))


@pytest.mark.parametrize("T", T_SWEEP)
def test_parity_fp8_transformers_loads_fp8_files(fp8_pair, T, assert_logits_close) -> None:
    check_parity(*fp8_pair, T, "fp8-per-expert(transformers FP8 loader)", assert_logits_close)


def write_hf_fp32(mw: ModelWeights, out: Path) -> Path:
    """Our in-memory weights as a plain fp32 checkpoint in the shipped layout (fused experts, no FP8)."""
    cfg = mw.cfg.replace(fp8=None)
    p = "model.language_model." if cfg.model_type == "qwen3_5_moe" else "model."
    tensors = {(k if k == "lm_head.weight" else p + k): v.float().contiguous() for k, v in mw.globals.items()}
    for i, layer in enumerate(mw.layers):
        tensors.update({f"{p}layers.{i}.{k}": v.float().contiguous() for k, v in layer.items()})
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return out


@pytest.fixture(scope="module")
def fp8_dequantised_pair(tiny_ckpt_fp8, tmp_path_factory):
    """The FP8 path that needs nothing beyond transformers: our dequantised FP8 weights written out as an
    fp32 (BF16-style, unquantised) checkpoint that transformers loads, against our model reading the FP8
    files directly. This checks our dequantisation only through our own eyes; the transformers-FP8-loader
    test above is the independent one (skipped where accelerate is missing)."""
    ours = Qwen35Model(load_model_weights(tiny_ckpt_fp8, torch.float32, progress=False))
    equiv = write_hf_fp32(ours.w, tmp_path_factory.mktemp("fp8_dequantised") / "ckpt")
    return hf_load(equiv), ours


@pytest.mark.parametrize("T", T_SHORT)
def test_parity_fp8_dequantised_equivalent(fp8_dequantised_pair, T, assert_logits_close) -> None:
    check_parity(*fp8_dequantised_pair, T, "fp8-dequantised-equivalent", assert_logits_close)


@pytest.mark.parametrize("T", T_SHORT)
def test_parity_text_only_prefix(tiny_ckpt_fp32_text_only, T, assert_logits_close) -> None:
    hf = hf_load(tiny_ckpt_fp32_text_only)
    ours = Qwen35Model(load_model_weights(tiny_ckpt_fp32_text_only, progress=False))
    check_parity(hf, ours, T, "fp32-text-only(model.)", assert_logits_close)


def test_parity_conditional_generation_class(tiny_ckpt_fp32, fused_pair, assert_logits_close) -> None:
    hf = hf_load(tiny_ckpt_fp32, "Qwen3_5MoeForConditionalGeneration")
    check_parity(hf, fused_pair[1], 65, "fp32-fused(ForConditionalGeneration)", assert_logits_close)


# -- a checkpoint transformers wrote itself ----------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_saved_checkpoint(tmp_path_factory) -> Path:
    """A random Qwen3_5MoeForCausalLM of the tiny geometry, saved by transformers' save_pretrained
    (text-only config, `model.` prefix, experts written per expert). Norms, dt_bias and the router are
    re-drawn so that the (1 + w) norms, the decay and routing are all exercised.

    Its logits are small (max ~4) and its decays strong (A_log up to log 16), so max|d| sits nearer the
    bound (~2e-5 relative) than for our writer's files; that is transformers' own fp32 noise floor: on this
    model its chunked GDN and its recurrent GDN differ from each other by the same ~6e-5 at T=65."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    cfg: Qwen35Config = preset("tiny")
    d = {k: v for k, v in cfg.text_config_dict().items() if k != "model_type"}
    torch.manual_seed(0)
    model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**d, initializer_range=0.05)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and "linear_attn.norm" not in name:
                p.normal_(0.0, 0.1)
            elif name.endswith(("dt_bias", "linear_attn.norm.weight")):
                p.normal_(1.0, 0.1)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.2)
    out = tmp_path_factory.mktemp("hf_saved") / "ckpt"
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("T", T_SHORT)
def test_parity_checkpoint_saved_by_transformers(hf_saved_checkpoint, T, assert_logits_close) -> None:
    hf = hf_load(hf_saved_checkpoint)
    ours = Qwen35Model(load_model_weights(hf_saved_checkpoint, progress=False))
    check_parity(hf, ours, T, "transformers-save_pretrained", assert_logits_close)


# -- the bound is tight enough to catch real mistakes -------------------------------------------------------
@pytest.mark.parametrize("mistake", ["moe-output-x1.001", "attention-output-x1.001", "no-rope",
                                     "gdn-norm-1+w"])
def test_bound_catches_small_mistakes(fused_pair, monkeypatch, mistake) -> None:
    """On these random weights, a 0.1% error in one block's output, or a plausible porting slip, moves
    the logits past the parity bound: so passing it says more than "roughly the same model"."""
    from qwen35_export.model import layers

    def scaled(f):  # a mixer returns (out, *state): scale out only
        return lambda *a: (lambda r: (r[0] * 1.001, *r[1:]))(f(*a))

    patch = {"moe-output-x1.001": ("moe_block", lambda f: lambda *a, **kw: f(*a, **kw) * 1.001),
             "attention-output-x1.001": ("attention_mixer", scaled),
             "no-rope": ("apply_rope", lambda f: lambda x, cos, sin: x),
             "gdn-norm-1+w": ("gated_rms_norm", lambda f: lambda o, z, w, eps: f(o, z, 1 + w, eps))}[mistake]
    ours = fused_pair[1]
    rows, _ = prompts(65, ours.cfg.vocab_size)
    ids, lens = rows[0][None], torch.tensor([65])
    good, _ = ours.prefill(ids, lens, ours.init_state(1, 65))
    monkeypatch.setattr(layers, patch[0], patch[1](getattr(layers, patch[0])))
    bad, _ = ours.prefill(ids, lens, ours.init_state(1, 65))
    assert (bad - good).abs().max() > REL * good.abs().max()
