"""Lazy reader of HF Qwen3.5 MoE checkpoints (config.json + safetensors, single file or sharded).

Tensors are read one at a time through safetensors' mmap; nothing is ever unpickled. Accepts both text
prefixes (`model.language_model.`, `model.`), fused and per-expert routed experts, BF16/FP16/FP32 and
block-FP8 files; returns weights in the model's internal layout (fused experts, suffix names).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from ..config import Qwen35Config
from ..errors import CheckpointError, ConfigError
from ..model.weights import (ModelWeights, global_weight_shapes, is_fp8_quantized, layer_weight_shapes,
                             scale_name)
from .fp8 import BLOCK, FP8_DTYPE, dequantize_fp8_block, scale_shape

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass
class CheckpointInfo:
    """What a checkpoint directory holds, discovered from its headers alone."""

    path: Path
    config: Qwen35Config
    prefix: str  # "model.language_model." or "model."
    expert_layout: str  # "fused" or "per_expert"
    is_fp8: bool
    files: list[str]
    unused_prefixes: dict[str, int] = field(default_factory=dict)  # e.g. {"mtp.": 123} -> tensor count
    fp8_tensors: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)


def _read_header(path: Path) -> dict:
    """Parse a safetensors header ourselves first so a truncated/corrupt file gets a clear message."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: corrupt safetensors header: header length {n} but the file has "
                                      f"{size} bytes")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = 8 + n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        if end + hi > size:
            raise CheckpointError(f"{path}: truncated: tensor '{name}' ends at byte {end + hi} but the file has "
                                  f"{size} bytes")
    return header


class CheckpointReader:
    """Opens a checkpoint directory, checks its structure, and reads weights one tensor at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: checkpoint directory not found")
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.path}: no config.json in the checkpoint directory")
        self.config = Qwen35Config.from_json_file(cfg_path)
        self.weight_map = self._discover_files()  # tensor name -> file name
        self._handles: dict[str, object] = {}
        self._dtypes: dict[str, str] = {}
        self._shapes: dict[str, list[int]] = {}
        held: dict[str, set[str]] = {}  # file -> tensor names its header lists
        for fname in sorted(set(self.weight_map.values())):
            header = _read_header(self.path / fname)
            held[fname] = set(header) - {"__metadata__"}
            for name, meta in header.items():
                if name != "__metadata__":
                    self._dtypes[name] = meta.get("dtype", "?")
                    self._shapes[name] = meta.get("shape", [])
        missing = [n for n, f in self.weight_map.items() if n not in held[f]]
        if missing:
            raise CheckpointError(f"{self.path}: the index maps {len(missing)} tensors to shards that do not hold "
                                  f"them, e.g. '{missing[0]}' -> {self.weight_map[missing[0]]}")
        self.info = self._inspect()

    # -- structure -----------------------------------------------------------------------------------
    def _discover_files(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: invalid index ({e!r}); expected a JSON object with 'weight_map'")
            for fname in sorted(set(wm.values())):
                if not (self.path / fname).is_file():
                    raise CheckpointError(f"{index}: shard '{fname}' is listed but missing from {self.path}")
            return dict(wm)
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no model.safetensors.index.json and no *.safetensors files")
        if len(files) > 1:
            raise CheckpointError(f"{self.path}: {len(files)} safetensors files but no model.safetensors.index.json "
                                  "to say which tensor is where")
        header = _read_header(self.path / files[0])
        return {n: files[0] for n in header if n != "__metadata__"}

    def _inspect(self) -> CheckpointInfo:
        names = list(self.weight_map)
        if any(n.startswith("model.language_model.") for n in names):
            prefix = "model.language_model."
        elif any(n.startswith("model.layers.") or n == "model.embed_tokens.weight" for n in names):
            prefix = "model."
        else:
            raise CheckpointError(f"{self.path}: found no text-model tensors (expected keys starting with "
                                  "'model.language_model.' or 'model.')")
        p0 = f"{prefix}layers.0.mlp.experts."
        if any(n.startswith(p0 + "gate_up_proj") for n in names):
            layout = "fused"
        elif any(n.startswith(p0 + "0.") for n in names):
            layout = "per_expert"
        else:
            raise CheckpointError(f"{self.path}: tensor '{p0}gate_up_proj' missing (and no per-expert "
                                  f"'{p0}0.gate_proj.weight'): cannot tell the routed-expert layout")
        unused: dict[str, int] = {}
        for n in names:
            for up in ("mtp.", "model.visual."):
                if n.startswith(up):
                    unused[up] = unused.get(up, 0) + 1
        dtypes: dict[str, int] = {}
        for n in names:
            dtypes[self._dtypes[n]] = dtypes.get(self._dtypes[n], 0) + 1
        return CheckpointInfo(self.path, self.config, prefix, layout, self.config.fp8 is not None,
                              sorted(set(self.weight_map.values())), unused,
                              sum(1 for n in names if self._dtypes[n] == "F8_E4M3"), dtypes)

    # -- tensors -------------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.weight_map

    def read(self, key: str) -> Tensor:
        """Read one tensor by its full checkpoint key (mmap; only this tensor is materialised)."""
        if key not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor '{key}' missing")
        fname = self.weight_map[key]
        h = self._handles.get(fname)
        if h is None:
            try:
                h = safe_open(str(self.path / fname), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{self.path / fname}: cannot open safetensors file ({e})") from None
            self._handles[fname] = h
        return h.get_tensor(key)

    def _read_checked(self, key: str, shape: tuple[int, ...], fp8: bool) -> Tensor:
        if key not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor '{key}' missing (expected shape {list(shape)})")
        found = tuple(self._shapes[key])
        if found != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor '{key}': expected shape {list(shape)}, found {list(found)}")
        t = self.read(key)
        if fp8 and t.dtype != FP8_DTYPE:
            raise CheckpointError(f"{self.path}: tensor '{key}': expected dtype float8_e4m3fn (FP8 checkpoint), "
                                  f"found {t.dtype}")
        if not fp8 and t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{self.path}: tensor '{key}': expected a float dtype (bf16/fp16/fp32), "
                                  f"found {t.dtype}")
        return t

    def _read_fp8_pair(self, key: str, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        w = self._read_checked(key, shape, fp8=True)
        skey = key + "_scale_inv"
        sshape = scale_shape(shape, BLOCK)
        if skey not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor '{skey}' missing (expected shape {list(sshape)})")
        if tuple(self._shapes[skey]) != sshape:
            raise CheckpointError(f"{self.path}: FP8 scale '{skey}': expected shape {list(sshape)} for weight "
                                  f"{list(shape)} with 128x128 blocks, found {self._shapes[skey]}")
        s = self.read(skey)
        if s.dtype != torch.float32:
            raise CheckpointError(f"{self.path}: FP8 scale '{skey}': expected dtype float32, found {s.dtype}")
        return w, s

    def _quantized_in_file(self, full_key: str) -> bool:
        """Whether the checkpoint stores this weight as FP8 (follows the file, not the spec's list).

        A weight with a `_scale_inv` beside it counts as FP8 whatever its dtype, so that a non-FP8 tensor
        there is reported as a dtype mismatch instead of being read with its scale silently dropped.
        """
        return self.config.fp8 is not None and (self._dtypes.get(full_key) == "F8_E4M3"
                                                or full_key + "_scale_inv" in self.weight_map)

    def _load_weight(self, key: str, shape: tuple[int, ...], dtype: torch.dtype,
                     keep_fp8: bool) -> dict[str, Tensor]:
        """One Linear-like weight; FP8 ones dequantised to `dtype` unless keep_fp8."""
        if self._quantized_in_file(key):
            w, s = self._read_fp8_pair(key, shape)
            if keep_fp8:
                return {"w": w, "s": s}
            return {"w": dequantize_fp8_block(w, s, dtype)}
        return {"w": self._read_checked(key, shape, fp8=False).to(dtype)}

    def load_globals(self, dtype: torch.dtype) -> dict[str, Tensor]:
        return {name: self.load_global(name, dtype) for name in global_weight_shapes(self.config)}

    def load_global(self, name: str, dtype: torch.dtype) -> Tensor:
        """One of `embed_tokens.weight`, `norm.weight`, `lm_head.weight`, shape- and dtype-checked."""
        key = name if name == "lm_head.weight" else self.info.prefix + name
        return self._read_checked(key, global_weight_shapes(self.config)[name], fp8=False).to(dtype)

    def load_layer(self, i: int, dtype: torch.dtype, keep_fp8: bool = False) -> dict[str, Tensor]:
        """Weights of decoder layer i in internal layout (fused experts), cast to `dtype`.

        With keep_fp8, weights stored FP8 stay FP8 with their `_scale_inv` beside them; norms, conv,
        A_log/dt_bias and gates always come back in `dtype` (A_log in fp32 regardless).
        """
        cfg = self.config
        base = f"{self.info.prefix}layers.{i}."
        out: dict[str, Tensor] = {}
        for name, shape in layer_weight_shapes(cfg, i).items():
            if name.startswith("mlp.experts."):
                continue
            # A_log is read straight to fp32 (the decay needs an fp32 exp(); a bf16 round trip loses it).
            r = self._load_weight(base + name, shape, torch.float32 if name == "linear_attn.A_log" else dtype,
                                  keep_fp8)
            out[name] = r["w"]
            if "s" in r:
                out[scale_name(name)] = r["s"]
        out.update(self._load_experts(i, dtype, keep_fp8))
        return out

    def _load_experts(self, i: int, dtype: torch.dtype, keep_fp8: bool) -> dict[str, Tensor]:
        cfg = self.config
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        base = f"{self.info.prefix}layers.{i}.mlp.experts."
        if self.info.expert_layout == "fused":
            out = {}
            for name, shape in (("gate_up_proj", (E, 2 * I, H)), ("down_proj", (E, H, I))):
                r = self._load_weight(base + name, shape, dtype, keep_fp8)
                out["mlp.experts." + name] = r["w"]
                if "s" in r:
                    out["mlp.experts." + name + "_scale_inv"] = r["s"]
            return out
        # Per expert: fuse gate and up (gate rows first) as the fused layout has them.
        shapes = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
        ws: dict[str, list[Tensor]] = {p: [] for p in _EXPERT_PROJ}
        ss: dict[str, list[Tensor]] = {p: [] for p in _EXPERT_PROJ}
        for e in range(E):
            for p in _EXPERT_PROJ:
                r = self._load_weight(f"{base}{e}.{p}.weight", shapes[p], dtype, keep_fp8)
                ws[p].append(r["w"])
                if "s" in r:
                    ss[p].append(r["s"])
        out = {"mlp.experts.gate_up_proj": torch.cat([torch.stack(ws["gate_proj"]), torch.stack(ws["up_proj"])], 1),
               "mlp.experts.down_proj": torch.stack(ws["down_proj"])}
        if ss["gate_proj"]:
            if I % BLOCK:
                raise CheckpointError(f"{self.path}: moe_intermediate_size {I} is not a multiple of {BLOCK}: "
                                      "per-expert FP8 gate/up scales cannot be fused; load with keep_fp8=False")
            out["mlp.experts.gate_up_proj_scale_inv"] = torch.cat(
                [torch.stack(ss["gate_proj"]), torch.stack(ss["up_proj"])], 1)
            out["mlp.experts.down_proj_scale_inv"] = torch.stack(ss["down_proj"])
        return out

    def close(self) -> None:
        self._handles.clear()


def load_model_weights(path: str | Path, dtype: torch.dtype = torch.float32, keep_fp8: bool = False,
                       device: str | torch.device = "cpu", progress: bool = True) -> ModelWeights:
    """Read a whole checkpoint into `ModelWeights` (layer by layer, with a progress bar)."""
    from tqdm import tqdm

    r = CheckpointReader(path)
    mw = ModelWeights(r.config)
    mw.globals = {k: v.to(device) for k, v in r.load_globals(dtype).items()}
    for i in tqdm(range(r.config.num_hidden_layers), desc="loading layers", disable=not progress, leave=False):
        mw.layers.append({k: v.to(device) for k, v in r.load_layer(i, dtype, keep_fp8).items()})
    r.close()
    return mw


__all__ = ["CheckpointReader", "CheckpointInfo", "load_model_weights", "ConfigError", "is_fp8_quantized"]
