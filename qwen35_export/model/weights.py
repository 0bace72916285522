"""Weight names and shapes of the text model, in the checkpoint's own key names (without the prefix).

Layer weights are keyed by their suffix after `layers.{i}.`; routed experts use the fused layout
(`mlp.experts.gate_up_proj [E, 2I, H]`, gate rows first, and `mlp.experts.down_proj [E, H, I]`).
An FP8-kept weight `X` carries `X_scale_inv` beside it (for experts: `mlp.experts.gate_up_proj_scale_inv`,
for Linears: `...weight_scale_inv`, as the checkpoint names them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ..config import LINEAR_ATTENTION, Qwen35Config

GLOBAL_NAMES = ("embed_tokens.weight", "norm.weight", "lm_head.weight")


def global_weight_shapes(cfg: Qwen35Config) -> dict[str, tuple[int, ...]]:
    return {
        "embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
        "norm.weight": (cfg.hidden_size,),
        "lm_head.weight": (cfg.vocab_size, cfg.hidden_size),
    }


def mixer_weight_shapes(cfg: Qwen35Config, layer_type: str) -> dict[str, tuple[int, ...]]:
    H = cfg.hidden_size
    if layer_type == LINEAR_ATTENTION:
        HV, V = cfg.linear_num_value_heads, cfg.linear_value_head_dim
        return {
            "linear_attn.in_proj_qkv.weight": (cfg.conv_dim, H),
            "linear_attn.in_proj_z.weight": (HV * V, H),
            "linear_attn.in_proj_b.weight": (HV, H),
            "linear_attn.in_proj_a.weight": (HV, H),
            "linear_attn.conv1d.weight": (cfg.conv_dim, 1, cfg.linear_conv_kernel_dim),
            "linear_attn.A_log": (HV,),
            "linear_attn.dt_bias": (HV,),
            "linear_attn.norm.weight": (V,),
            "linear_attn.out_proj.weight": (H, HV * V),
        }
    D = cfg.head_dim
    return {
        "self_attn.q_proj.weight": (cfg.num_attention_heads * D * 2, H),
        "self_attn.k_proj.weight": (cfg.num_key_value_heads * D, H),
        "self_attn.v_proj.weight": (cfg.num_key_value_heads * D, H),
        "self_attn.o_proj.weight": (H, cfg.num_attention_heads * D),
        "self_attn.q_norm.weight": (D,),
        "self_attn.k_norm.weight": (D,),
    }


def moe_weight_shapes(cfg: Qwen35Config) -> dict[str, tuple[int, ...]]:
    H, E, I, S = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    return {
        "mlp.gate.weight": (E, H),
        "mlp.experts.gate_up_proj": (E, 2 * I, H),
        "mlp.experts.down_proj": (E, H, I),
        "mlp.shared_expert.gate_proj.weight": (S, H),
        "mlp.shared_expert.up_proj.weight": (S, H),
        "mlp.shared_expert.down_proj.weight": (H, S),
        "mlp.shared_expert_gate.weight": (1, H),
    }


def layer_weight_shapes(cfg: Qwen35Config, layer: int) -> dict[str, tuple[int, ...]]:
    """All weights of decoder layer `layer`, fused-expert layout, names relative to `layers.{layer}.`."""
    shapes = {
        "input_layernorm.weight": (cfg.hidden_size,),
        "post_attention_layernorm.weight": (cfg.hidden_size,),
    }
    shapes.update(mixer_weight_shapes(cfg, cfg.layer_types[layer]))
    shapes.update(moe_weight_shapes(cfg))
    return shapes


# The spec's keep-in-BF16 list, inverted: these are the weights shipped FP8 releases quantise.
_FP8_SUFFIXES = (
    "linear_attn.in_proj_qkv.weight", "linear_attn.in_proj_z.weight", "linear_attn.out_proj.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight",
    "mlp.shared_expert.down_proj.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj",
)


def is_fp8_quantized(name: str) -> bool:
    """Whether a layer weight (suffix name, fused experts) is stored FP8 in a shipped FP8 checkpoint."""
    return name in _FP8_SUFFIXES


def scale_name(name: str) -> str:
    """Name of the block-scale tensor that goes with FP8 weight `name`."""
    return name + "_scale_inv"


@dataclass
class ModelWeights:
    """Weights of the text model held in memory: globals plus one dict per layer (suffix names).

    A layer dict holds FP8 weights with their `_scale_inv` companions when kept quantised.
    """

    cfg: Qwen35Config
    globals: dict[str, Tensor] = field(default_factory=dict)
    layers: list[dict[str, Tensor]] = field(default_factory=list)
