"""Writes checkpoints in the exact layout and key names of the shipped Qwen3.5 MoE releases.

`write_random_checkpoint` makes deterministic random weights (per seed, independent of sharding and
expert layout) scaled so a many-layer forward stays finite and position-dependent.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from ..config import FP8Config, Qwen35Config
from ..errors import CheckpointError
from ..model.weights import global_weight_shapes, is_fp8_quantized, layer_weight_shapes
from .fp8 import quantize_fp8_block

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _gen(seed: int, name: str, device: str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF)
    return g


def random_tensor(name: str, shape: tuple[int, ...], seed: int, device: str = "cpu") -> Tensor:
    """Deterministic fp32 values for the weight `name` (suffix or global name)."""
    g = _gen(seed, name, device)

    def normal(std: float) -> Tensor:
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std

    leaf = name.rsplit(".", 1)[0] if name.endswith(".weight") else name
    if name == "embed_tokens.weight":
        return normal(1.0)
    if name.endswith("norm.weight") and "linear_attn.norm" not in name:
        return normal(0.1)  # zero-centred norms: (1 + w)
    if "linear_attn.norm.weight" in name:
        return 1.0 + normal(0.1)  # plain-weight gated norm, stored around 1
    if name.endswith("A_log"):
        return torch.rand(shape, generator=g, device=device).mul(15.0).add(1.0).log()
    if name.endswith("dt_bias"):
        return 1.0 + normal(0.1)
    if name == "lm_head.weight":
        return normal(3.0 / math.sqrt(shape[-1]))  # peaked logits, as trained models have
    if "conv1d" in leaf:
        return normal(0.5)
    fan_in = shape[-1]
    return normal(0.5 / math.sqrt(fan_in))


def _layer_tensors(cfg: Qwen35Config, i: int, seed: int, device: str) -> Iterator[tuple[str, Tensor]]:
    for name, shape in layer_weight_shapes(cfg, i).items():
        yield name, random_tensor(f"layers.{i}.{name}", shape, seed, device)


def _mtp_tensors(cfg: Qwen35Config, seed: int, device: str) -> Iterator[tuple[str, Tensor]]:
    """The MTP head (unused by the engine today; written so loaders meet it as in the releases)."""
    H = cfg.hidden_size
    shapes = {"fc.weight": (H, 2 * H), "pre_fc_norm_embedding.weight": (H,), "pre_fc_norm_hidden.weight": (H,),
              "norm.weight": (H,)}
    attn_cfg = cfg.replace(num_hidden_layers=4)  # layer 3 of 4 is full attention
    for name, shape in layer_weight_shapes(attn_cfg, 3).items():
        shapes[f"layers.0.{name}"] = shape
    for name, shape in shapes.items():
        yield name, random_tensor(f"mtp.{name}", shape, seed, device)


def _emit(name: str, t: Tensor, dtype: str, layout: str) -> Iterator[tuple[str, Tensor]]:
    """Convert one internal (suffix, fp32) tensor into checkpoint tensors of this dtype and layout."""
    fp8 = dtype == "fp8" and is_fp8_quantized(name.split(".", 2)[-1] if name.startswith("layers.") else name)
    store = torch.bfloat16 if dtype == "fp8" else _DTYPES[dtype]
    if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
        base = name.rsplit(".", 1)[0]
        E = t.shape[0]
        if name.endswith("gate_up_proj"):
            I = t.shape[1] // 2
            parts = {"gate_proj": t[:, :I], "up_proj": t[:, I:]}
        else:
            parts = {"down_proj": t}
        if layout == "per_expert":
            for e in range(E):
                for p, w in parts.items():
                    yield from _emit_linear(f"{base}.{e}.{p}.weight", w[e], fp8, store)
            return
        if fp8:
            # Quantise gate and up separately (as per-expert files do), then fuse the blocks.
            qs = [quantize_fp8_block(w) for w in parts.values()]
            yield name, torch.cat([q for q, _ in qs], 1)
            yield name + "_scale_inv", torch.cat([s for _, s in qs], 1)
        else:
            yield name, t.to(store)
        return
    if name.endswith("A_log"):
        yield name, t.float()  # shipped files keep A_log in fp32
        return
    yield from _emit_linear(name, t, fp8, store)


def _emit_linear(key: str, w: Tensor, fp8: bool, store: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    if fp8:
        q, s = quantize_fp8_block(w)
        yield key, q
        yield key + "_scale_inv", s
    else:
        yield key, w.to(store).contiguous()


def _keep_bf16_modules(cfg: Qwen35Config, prefix: str) -> list[str]:
    mods = ["lm_head", f"{prefix}embed_tokens"]
    for i in range(cfg.num_hidden_layers):
        b = f"{prefix}layers.{i}."
        if i in cfg.gdn_layers:
            mods += [b + "linear_attn.conv1d", b + "linear_attn.in_proj_a", b + "linear_attn.in_proj_b"]
        mods += [b + "mlp.gate", b + "mlp.shared_expert_gate"]
    mods += ["model.visual", "mtp.fc"]
    return mods


class _ShardWriter:
    """Accumulates tensors and flushes a shard when `max_shard_size` bytes would be exceeded."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, Tensor] | str] = []
        self.weight_map: dict[str, int] = {}
        self.n = 0
        self.total = 0

    def add(self, key: str, t: Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[key] = t.detach().cpu().contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes
        self.weight_map[key] = self.n

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, str(self.out / f"shard-{self.n:05d}.safetensors"), metadata={"format": "pt"})
        self.n += 1
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        n = self.n
        names = {i: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)}
        if n == 1:
            names = {0: "model.safetensors"}
        for i, final in names.items():
            os.replace(self.out / f"shard-{i:05d}.safetensors", self.out / final)
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: names[i] for k, i in sorted(self.weight_map.items())}}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_random_checkpoint(cfg: Qwen35Config, out_dir: str | Path, dtype: str = "bf16", seed: int = 0,
                            max_shard_size: int = 5 << 30, expert_layout: str | None = None,
                            device: str = "cpu", progress: bool = True) -> Path:
    """Write a random checkpoint of geometry `cfg` in the shipped layout.

    dtype: "bf16" | "fp16" | "fp32" | "fp8" (block-quantised as the `-FP8` releases: e4m3 + 128x128 scales,
    keep-in-BF16 list honoured). expert_layout defaults to what releases use: fused for BF16, per expert
    for FP8. The directory is written atomically (temp dir, then rename).
    """
    if dtype not in (*_DTYPES, "fp8"):
        raise CheckpointError(f"dtype: expected one of bf16, fp16, fp32, fp8; found {dtype!r}")
    layout = expert_layout or ("per_expert" if dtype == "fp8" else "fused")
    if layout not in ("fused", "per_expert"):
        raise CheckpointError(f"expert_layout: expected 'fused' or 'per_expert', found {layout!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir}: exists and is not empty; refusing to overwrite")
    prefix = "model.language_model." if cfg.model_type == "qwen3_5_moe" else "model."
    if dtype == "fp8":
        cfg = cfg.replace(fp8=FP8Config(modules_to_not_convert=tuple(_keep_bf16_modules(cfg, prefix))))
    else:
        cfg = cfg.replace(fp8=None)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        sw = _ShardWriter(tmp, max_shard_size)
        for name, shape in global_weight_shapes(cfg).items():
            t = random_tensor(name, shape, seed, device)
            key = name if name == "lm_head.weight" else prefix + name
            sw.add(key, t.to(torch.bfloat16 if dtype == "fp8" else _DTYPES[dtype]))
        for i in tqdm(range(cfg.num_hidden_layers), desc="writing layers", disable=not progress, leave=False):
            for name, t in _layer_tensors(cfg, i, seed, device):
                for key, v in _emit(f"layers.{i}.{name}", t, dtype, layout):
                    sw.add(prefix + key, v)
        if cfg.mtp_num_hidden_layers:
            for name, t in _mtp_tensors(cfg, seed, device):
                for key, v in _emit(name, t, dtype, layout):
                    sw.add("mtp." + key, v)
        sw.finish()
        hf = cfg.to_hf_dict()
        text = hf.get("text_config", hf)
        text["dtype"] = {"fp32": "float32", "fp16": "float16"}.get(dtype, "bfloat16")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": cfg.eos_token_id}, indent=2))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
