"""Model configuration: the `Qwen35Config` dataclass, presets, and reading/writing HF `config.json`.

The text part of a Qwen3.5 MoE checkpoint is described by HF's `qwen3_5_moe_text` config, either nested
under `text_config` of a `qwen3_5_moe` (multimodal) config or at the top level of a text-only one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"

SUPPORTED_MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")


@dataclass(frozen=True)
class FP8Config:
    """The `quantization_config` of a shipped FP8 checkpoint (block-quantised e4m3 weights)."""

    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"
    modules_to_not_convert: tuple[str, ...] = ()

    def to_hf(self) -> dict[str, Any]:
        return {
            "quant_method": "fp8",
            "activation_scheme": self.activation_scheme,
            "weight_per_tensor": False,
            "act_per_tensor": False,
            "weight_block_size": list(self.weight_block_size),
            "modules_to_not_convert": list(self.modules_to_not_convert),
        }


@dataclass(frozen=True)
class Qwen35Config:
    """Text-model geometry of a Qwen3.5 MoE checkpoint. Field names follow HF's config.json."""

    vocab_size: int = 248320
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    num_experts: int = 256
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e7
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] = (11, 11, 10)
    mrope_interleaved: bool = True
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    layer_types: tuple[str, ...] = ()
    eos_token_id: int | None = 248044
    mtp_num_hidden_layers: int = 0
    fp8: FP8Config | None = None
    # The nesting the checkpoint used: "qwen3_5_moe" (multimodal, `model.language_model.`) or
    # "qwen3_5_moe_text" (text-only, `model.`).
    model_type: str = "qwen3_5_moe"

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.num_hidden_layers, 4))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        self.validate()

    # -- derived geometry ------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the GDN causal conv: q, k, v concatenated."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def gdn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR_ATTENTION]

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL_ATTENTION]

    def validate(self) -> None:
        def need(cond: bool, fieldname: str, expected: str, found: Any) -> None:
            if not cond:
                raise ConfigError(f"config field '{fieldname}': expected {expected}, found {found!r}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "linear_num_key_heads", "linear_num_value_heads",
                     "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "num_experts",
                     "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "a positive integer", v)
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"a divisor of num_attention_heads={self.num_attention_heads}", self.num_key_value_heads)
        need(self.linear_num_value_heads % self.linear_num_key_heads == 0, "linear_num_key_heads",
             f"a divisor of linear_num_value_heads={self.linear_num_value_heads}", self.linear_num_key_heads)
        need(self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
             f"<= num_experts={self.num_experts}", self.num_experts_per_tok)
        need(len(self.layer_types) == self.num_hidden_layers, "layer_types",
             f"{self.num_hidden_layers} entries (num_hidden_layers)", len(self.layer_types))
        bad = [t for t in self.layer_types if t not in (FULL_ATTENTION, LINEAR_ATTENTION)]
        need(not bad, "layer_types", f"only '{FULL_ATTENTION}'/'{LINEAR_ATTENTION}'", bad[:3])
        need(0 < self.partial_rotary_factor <= 1, "partial_rotary_factor", "in (0, 1]",
             self.partial_rotary_factor)
        need(self.rotary_dim % 2 == 0, "partial_rotary_factor", "an even rotary dim", self.rotary_dim)
        need(sum(self.mrope_section) == self.rotary_dim // 2, "rope_parameters.mrope_section",
             f"sections summing to rotary_dim/2 = {self.rotary_dim // 2}", list(self.mrope_section))
        need(self.rms_norm_eps > 0, "rms_norm_eps", "> 0", self.rms_norm_eps)
        need(self.model_type in SUPPORTED_MODEL_TYPES, "model_type", f"one of {SUPPORTED_MODEL_TYPES}",
             self.model_type)

    def replace(self, **changes: Any) -> "Qwen35Config":
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)

    # -- HF config.json ----------------------------------------------------------------------------
    def text_config_dict(self) -> dict[str, Any]:
        return {
            "model_type": "qwen3_5_moe_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads,
            "linear_key_head_dim": self.linear_key_head_dim,
            "linear_value_head_dim": self.linear_value_head_dim,
            "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "shared_expert_intermediate_size": self.shared_expert_intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "layer_types": list(self.layer_types),
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
                "mrope_section": list(self.mrope_section),
                "mrope_interleaved": self.mrope_interleaved,
            },
            "eos_token_id": self.eos_token_id,
            "mtp_num_hidden_layers": self.mtp_num_hidden_layers,
            "mtp_use_dedicated_embeddings": False,
            "dtype": "bfloat16",
            "mamba_ssm_dtype": "float32",
            "attention_bias": False,
            "router_aux_loss_coef": 0.001,
        }

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json a shipped checkpoint of this nesting would carry."""
        text = self.text_config_dict()
        if self.model_type == "qwen3_5_moe_text":
            out = dict(text, architectures=["Qwen3_5MoeForCausalLM"])
        else:
            out = {
                "model_type": "qwen3_5_moe",
                "architectures": ["Qwen3_5MoeForConditionalGeneration"],
                "text_config": text,
                "tie_word_embeddings": self.tie_word_embeddings,
            }
        if self.fp8 is not None:
            out["quantization_config"] = self.fp8.to_hf()
        return out

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "Qwen35Config":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: field 'model_type': expected one of {SUPPORTED_MODEL_TYPES}, "
                              f"found {model_type!r}")
        if model_type == "qwen3_5_moe":
            text = d.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{source}: field 'text_config': expected an object for model_type "
                                  f"'qwen3_5_moe', found {type(text).__name__}")
        else:
            text = d
        kwargs: dict[str, Any] = {"model_type": model_type}
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "linear_num_key_heads", "linear_num_value_heads", "num_experts",
                    "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")
        for name in required:
            if name not in text:
                raise ConfigError(f"{source}: missing required field '{name}' in the text config")
            kwargs[name] = text[name]
        for name in ("head_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim",
                     "rms_norm_eps", "max_position_embeddings", "eos_token_id"):
            if text.get(name) is not None:
                kwargs[name] = text[name]
        kwargs["mtp_num_hidden_layers"] = int(text.get("mtp_num_hidden_layers", 0) or 0)
        kwargs["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
        if kwargs["tie_word_embeddings"]:
            raise ConfigError(f"{source}: field 'tie_word_embeddings': expected false (Qwen3.5 MoE has an "
                              "untied lm_head), found true")
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]

        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: field 'rope_parameters': expected an object, found {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ConfigError(f"{source}: field 'rope_parameters.rope_type': expected 'default', found "
                              f"{rope_type!r}")
        kwargs["rope_theta"] = float(rope.get("rope_theta", text.get("rope_theta", 1e7)))
        kwargs["partial_rotary_factor"] = float(
            rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25)))
        if "mrope_section" in rope:
            kwargs["mrope_section"] = tuple(rope["mrope_section"])
        kwargs["mrope_interleaved"] = bool(rope.get("mrope_interleaved", True))

        n_layers = text["num_hidden_layers"]
        if text.get("layer_types"):
            kwargs["layer_types"] = tuple(text["layer_types"])
        else:
            interval = text.get("full_attention_interval", 4)
            if not isinstance(interval, int) or interval <= 0:
                raise ConfigError(f"{source}: field 'full_attention_interval': expected a positive integer, "
                                  f"found {interval!r}")
            kwargs["layer_types"] = default_layer_types(n_layers, interval)

        q = d.get("quantization_config") or text.get("quantization_config")
        if q is not None:
            kwargs["fp8"] = _parse_fp8(q, source)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> "Qwen35Config":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))


def _parse_fp8(q: Any, source: str) -> FP8Config:
    if not isinstance(q, dict):
        raise ConfigError(f"{source}: field 'quantization_config': expected an object, found {q!r}")
    if q.get("quant_method") != "fp8":
        raise ConfigError(f"{source}: field 'quantization_config.quant_method': expected 'fp8', found "
                          f"{q.get('quant_method')!r}")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"{source}: field 'quantization_config.fmt': expected 'e4m3', found {fmt!r}")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"{source}: field 'quantization_config.weight_block_size': expected [128, 128], "
                          f"found {block!r}")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError(f"{source}: field 'quantization_config.activation_scheme': expected 'dynamic', "
                          f"found {q.get('activation_scheme')!r}")
    return FP8Config(weight_block_size=(block[0], block[1]),
                     modules_to_not_convert=tuple(q.get("modules_to_not_convert") or ()))


def default_layer_types(n_layers: int, interval: int) -> tuple[str, ...]:
    """Layer i is full attention iff (i + 1) % interval == 0 (HF's `full_attention_interval`)."""
    return tuple(FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(n_layers))


# -- presets: true geometry of the releases, and a toy model of the same structure ----------------
_PRESETS: dict[str, dict[str, Any]] = {
    "397b-a17b": dict(hidden_size=4096, num_hidden_layers=60, num_attention_heads=32, num_key_value_heads=2,
                      linear_num_key_heads=16, linear_num_value_heads=64, num_experts=512,
                      num_experts_per_tok=10, moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
                      mtp_num_hidden_layers=1),
    "122b-a10b": dict(hidden_size=3072, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=2,
                      linear_num_key_heads=16, linear_num_value_heads=64, num_experts=256,
                      num_experts_per_tok=8, moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
                      mtp_num_hidden_layers=1),
    "35b-a3b": dict(hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2,
                    linear_num_key_heads=16, linear_num_value_heads=32, num_experts=256, num_experts_per_tok=8,
                    moe_intermediate_size=512, shared_expert_intermediate_size=512, mtp_num_hidden_layers=1),
    # Same structure at toy size: two full 4-layer blocks, Hv/Hk = 2, GQA groups of 2, partial rotary
    # with the real mrope sections, 16 experts top-4 + shared expert, real head dims (128 / 256).
    "tiny": dict(vocab_size=1024, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, linear_num_key_heads=2, linear_num_value_heads=4, num_experts=16,
                 num_experts_per_tok=4, moe_intermediate_size=128, shared_expert_intermediate_size=128,
                 max_position_embeddings=4096, eos_token_id=1023),
}
PRESETS = tuple(_PRESETS)


def preset(name: str, **overrides: Any) -> Qwen35Config:
    """A named geometry (`397b-a17b`, `122b-a10b`, `35b-a3b`, `tiny`) with optional field overrides."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}: expected one of {PRESETS}")
    kw = dict(_PRESETS[name])
    kw.update(overrides)
    return Qwen35Config(**kw)


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int
    routed_experts: int


def param_counts(cfg: Qwen35Config) -> ParamCounts:
    """Parameter counts from the shapes alone (text model, no MTP, no vision)."""
    from .model.weights import layer_weight_shapes, global_weight_shapes  # shapes live with the model

    total = sum(math.prod(s) for s in global_weight_shapes(cfg).values())
    active = total
    routed = 0
    for i in range(cfg.num_hidden_layers):
        for name, shape in layer_weight_shapes(cfg, i).items():
            n = math.prod(shape)
            total += n
            if name.startswith("mlp.experts."):
                routed += n
                active += n * cfg.num_experts_per_tok // cfg.num_experts
            else:
                active += n
    return ParamCounts(total=total, active=active, routed_experts=routed)


__all__ = ["Qwen35Config", "FP8Config", "preset", "PRESETS", "param_counts", "ParamCounts",
           "FULL_ATTENTION", "LINEAR_ATTENTION", "default_layer_types"]
