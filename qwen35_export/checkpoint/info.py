"""`qwen35-export info`: a human-readable summary of a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

from ..config import FULL_ATTENTION, param_counts
from .reader import CheckpointReader


def _b(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def checkpoint_summary(path: str | Path) -> str:
    r = CheckpointReader(path)
    cfg, info = r.config, r.info
    pc = param_counts(cfg)
    pattern = "".join("A" if t == FULL_ATTENTION else "g" for t in cfg.layer_types)
    lines = [
        f"checkpoint   {info.path}",
        f"model_type   {cfg.model_type} (prefix '{info.prefix}'), {len(info.files)} safetensors file(s)",
        f"geometry     H={cfg.hidden_size} layers={cfg.num_hidden_layers} vocab={cfg.vocab_size}",
        f"attention    {cfg.num_attention_heads} q / {cfg.num_key_value_heads} kv heads x {cfg.head_dim}, "
        f"rotary {cfg.rotary_dim} dims, theta {cfg.rope_theta:g}, mrope {list(cfg.mrope_section)}",
        f"deltanet     {cfg.linear_num_key_heads} k / {cfg.linear_num_value_heads} v heads, "
        f"K={cfg.linear_key_head_dim} V={cfg.linear_value_head_dim}, conv {cfg.linear_conv_kernel_dim}",
        f"moe          {cfg.num_experts} experts top-{cfg.num_experts_per_tok}, I={cfg.moe_intermediate_size}, "
        f"shared I={cfg.shared_expert_intermediate_size}; experts stored {info.expert_layout}",
        f"layers       {pattern}  (g = Gated DeltaNet, A = gated attention)",
        f"parameters   total {_b(pc.total)}, active per token {_b(pc.active)}, routed experts "
        f"{_b(pc.routed_experts)}",
        "dtypes       " + ", ".join(f"{k}: {v}" for k, v in sorted(info.dtypes.items())),
        "fp8          " + (f"yes: {info.fp8_tensors} tensors float8_e4m3fn with 128x128 block scales"
                            if info.is_fp8 else "no"),
    ]
    for pfx, n in info.unused_prefixes.items():
        lines.append(f"not used     {n} tensors under '{pfx}' ({'MTP head' if pfx == 'mtp.' else 'vision tower'}; "
                     "not used yet)")
    return "\n".join(lines)
