"""Config: both nestings of config.json, layer patterns, rope parameters, round trips, presets, parameter
counts, and agreement with transformers' own config classes."""

from __future__ import annotations

import pytest
import torch

from qwen35_export.config import (FULL_ATTENTION, LINEAR_ATTENTION, PRESETS, FP8Config, Qwen35Config,
                                  param_counts, preset)
from qwen35_export.errors import ConfigError

G, A = LINEAR_ATTENTION, FULL_ATTENTION


def text_dict(**changes) -> dict:
    d = preset("tiny").text_config_dict()
    d.update(changes)
    return d


def test_parse_nested_multimodal() -> None:
    d = {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
         "text_config": text_dict(), "vision_config": {"depth": 27}, "tie_word_embeddings": False}
    cfg = Qwen35Config.from_hf_dict(d)
    assert cfg.model_type == "qwen3_5_moe"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok) == (256, 8, 16, 4)
    assert (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.head_dim) == (2, 4, 256)


def test_parse_flat_text_only() -> None:
    cfg = Qwen35Config.from_hf_dict(text_dict(eos_token_id=[1023, 5]))
    assert cfg.model_type == "qwen3_5_moe_text"
    assert cfg.eos_token_id == 1023
    assert cfg == preset("tiny", model_type="qwen3_5_moe_text")


def test_layer_types_explicit_or_from_interval() -> None:
    d = text_dict(num_hidden_layers=6)
    del d["layer_types"]
    assert Qwen35Config.from_hf_dict(d).layer_types == (G, G, G, A, G, G)  # default interval 4
    d["full_attention_interval"] = 3
    cfg = Qwen35Config.from_hf_dict(d)
    assert cfg.layer_types == (G, G, A, G, G, A)
    assert cfg.gdn_layers == [0, 1, 3, 4] and cfg.attention_layers == [2, 5]
    explicit = (A, G, G, G, G, A)
    d["layer_types"] = list(explicit)  # wins over the interval
    assert Qwen35Config.from_hf_dict(d).layer_types == explicit


def test_rope_parameters() -> None:
    rope = {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5,
            "mrope_section": [24, 20, 20], "mrope_interleaved": True}
    cfg = Qwen35Config.from_hf_dict(text_dict(rope_parameters=rope))
    assert cfg.rope_theta == 5e6 and cfg.partial_rotary_factor == 0.5 and cfg.rotary_dim == 128
    assert cfg.mrope_section == (24, 20, 20) and cfg.mrope_interleaved
    # Older configs: rope_scaling with type "mrope", rope_theta at the top level.
    old = text_dict(rope_theta=1e6)
    old.pop("rope_parameters")
    old["rope_scaling"] = {"type": "mrope", "mrope_section": [11, 11, 10]}
    cfg = Qwen35Config.from_hf_dict(old)
    assert cfg.rope_theta == 1e6 and cfg.partial_rotary_factor == 0.25 and cfg.rotary_dim == 64
    with pytest.raises(ConfigError, match="mrope_section"):
        Qwen35Config.from_hf_dict(text_dict(rope_parameters=dict(rope, partial_rotary_factor=0.25)))


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("nesting", ["qwen3_5_moe", "qwen3_5_moe_text"])
@pytest.mark.parametrize("fp8", [False, True])
def test_round_trip(name: str, nesting: str, fp8: bool) -> None:
    cfg = preset(name, model_type=nesting, fp8=FP8Config(modules_to_not_convert=("lm_head",)) if fp8 else None)
    d = cfg.to_hf_dict()
    assert ("text_config" in d) == (nesting == "qwen3_5_moe")
    assert ("quantization_config" in d) == fp8
    assert Qwen35Config.from_hf_dict(d) == cfg


@pytest.mark.parametrize("name,H,L,heads,kv,hk,hv,E,k,I", [
    ("397b-a17b", 4096, 60, 32, 2, 16, 64, 512, 10, 1024),
    ("122b-a10b", 3072, 48, 32, 2, 16, 64, 256, 8, 1024),
    ("35b-a3b", 2048, 40, 16, 2, 16, 32, 256, 8, 512),
])
def test_presets_match_the_spec_table(name, H, L, heads, kv, hk, hv, E, k, I) -> None:
    c = preset(name)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (H, L, heads, kv)
    assert (c.linear_num_key_heads, c.linear_num_value_heads, c.num_experts, c.num_experts_per_tok) == (hk, hv, E, k)
    assert c.moe_intermediate_size == c.shared_expert_intermediate_size == I
    assert (c.head_dim, c.linear_key_head_dim, c.linear_value_head_dim, c.linear_conv_kernel_dim) == (256, 128, 128, 4)
    assert (c.vocab_size, c.rope_theta, c.rotary_dim, c.mrope_section) == (248320, 1e7, 64, (11, 11, 10))
    assert c.layer_types == tuple(A if (i + 1) % 4 == 0 else G for i in range(L))
    assert c.mtp_num_hidden_layers == 1 and not c.tie_word_embeddings


def test_tiny_preset_has_the_real_structure() -> None:
    c = preset("tiny")
    assert c.num_hidden_layers >= 8 and c.layer_types[:4] == (G, G, G, A) and c.layer_types[4:8] == (G, G, G, A)
    assert c.linear_num_value_heads // c.linear_num_key_heads == 2
    assert c.num_attention_heads // c.num_key_value_heads > 1
    assert c.partial_rotary_factor < 1 and c.mrope_section == (11, 11, 10)
    assert c.num_experts >= 16 and c.num_experts_per_tok == 4 and c.shared_expert_intermediate_size > 0
    assert (c.head_dim, c.linear_key_head_dim, c.linear_value_head_dim) == (256, 128, 128)


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'qwen4'"):
        preset("qwen4")


def _transformers_meta_param_count(cfg: Qwen35Config) -> int:
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    d = {k: v for k, v in cfg.text_config_dict().items() if k != "model_type"}
    with torch.device("meta"):
        model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**d))
    return sum(p.numel() for p in model.parameters())


def test_397b_parameter_counts() -> None:
    """Text model (no MTP, no vision): total in [395 B, 398 B], active per token (top-10 routed + shared +
    mixers + embedding + lm_head) in [16.5 B, 18 B]; and our shape table counts exactly what transformers'
    own module tree holds, built on the meta device."""
    cfg = preset("397b-a17b")
    pc = param_counts(cfg)
    assert 395e9 <= pc.total <= 398e9, pc
    assert 16.5e9 <= pc.active <= 18e9, pc
    assert pc.routed_experts == 60 * 512 * 3 * 4096 * 1024
    assert pc.total == _transformers_meta_param_count(cfg)


@pytest.mark.parametrize("name", ["35b-a3b", "tiny"])
def test_parameter_counts_match_transformers(name: str) -> None:
    cfg = preset(name)
    assert param_counts(cfg).total == _transformers_meta_param_count(cfg)


def test_written_config_is_accepted_by_transformers(tiny_ckpt_fp32, tiny_ckpt_fp32_text_only, tiny_ckpt_fp8,
                                                    tiny_config) -> None:
    from transformers import AutoConfig, Qwen3_5MoeConfig, Qwen3_5MoeTextConfig

    for ckpt in (tiny_ckpt_fp32, tiny_ckpt_fp8):
        hf = Qwen3_5MoeConfig.from_pretrained(ckpt)
        assert type(AutoConfig.from_pretrained(ckpt)) is Qwen3_5MoeConfig
        _assert_same_text_config(hf.text_config, tiny_config)
        # ForCausalLM reads the text part out of the nested file.
        _assert_same_text_config(Qwen3_5MoeTextConfig.from_pretrained(ckpt), tiny_config)
    assert Qwen3_5MoeConfig.from_pretrained(tiny_ckpt_fp8).quantization_config["weight_block_size"] == [128, 128]
    hf = Qwen3_5MoeTextConfig.from_pretrained(tiny_ckpt_fp32_text_only)
    assert type(AutoConfig.from_pretrained(tiny_ckpt_fp32_text_only)) is Qwen3_5MoeTextConfig
    _assert_same_text_config(hf, tiny_config)


def _assert_same_text_config(hf, cfg: Qwen35Config) -> None:
    assert tuple(hf.layer_types) == cfg.layer_types
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                 "linear_value_head_dim", "linear_conv_kernel_dim", "num_experts", "num_experts_per_tok",
                 "moe_intermediate_size", "shared_expert_intermediate_size", "rms_norm_eps",
                 "tie_word_embeddings"):
        assert getattr(hf, name) == getattr(cfg, name), name
    rope = hf.rope_parameters
    assert rope["rope_theta"] == cfg.rope_theta and rope["partial_rotary_factor"] == cfg.partial_rotary_factor
    assert tuple(rope["mrope_section"]) == cfg.mrope_section


def test_layer_types_from_interval_agree_with_transformers() -> None:
    from transformers import Qwen3_5MoeTextConfig

    for n, interval in ((8, 4), (7, 3), (5, 1)):
        d = text_dict(num_hidden_layers=n)
        del d["layer_types"]
        d["full_attention_interval"] = interval
        ours = Qwen35Config.from_hf_dict(d)
        theirs = Qwen3_5MoeTextConfig(**{k: v for k, v in d.items() if k != "model_type"})
        assert tuple(theirs.layer_types) == ours.layer_types
