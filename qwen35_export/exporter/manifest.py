"""The engine directory's `manifest.json`: what was built, for which target, and how to check it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EngineError

FORMAT_VERSION = 1

# Compute capability each GPU target is compiled for.
TARGET_SM = {"h100": (9, 0), "h200": (9, 0)}


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@dataclass
class GraphEntry:
    """One compiled graph: its package file and the order of its weight inputs."""

    file: str
    kind: str  # embed | gdn | attn | final
    phase: str  # prefill | decode | any
    weight_names: list[str] = field(default_factory=list)
    substitutions: dict[str, int] = field(default_factory=dict)


@dataclass
class Manifest:
    format_version: int
    versions: dict[str, str]
    target: str
    sm: list[int] | None
    backend: str
    dtype: str  # weights: fp32 | bf16 | fp8
    act_dtype: str  # activations: float32 | bfloat16
    model_config: dict[str, Any]
    max_batch: int
    max_seq_len: int
    graphs: dict[str, GraphEntry]
    layer_files: list[str]
    globals_file: str
    passes: list[str]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # relpath -> {sha256, bytes}
    build_seconds: dict[str, float] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    tokenizer_files: list[str] = field(default_factory=list)
    # A sharded engine's plan (parallel/capture.py manifest_entry): tp, ep, world_size, per-rank layer_files.
    parallel: dict[str, Any] | None = None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=False))

    @staticmethod
    def load(engine_dir: Path) -> "Manifest":
        p = Path(engine_dir) / "manifest.json"
        if not p.is_file():
            raise EngineError(f"{engine_dir}: not an engine directory (no manifest.json)")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise EngineError(f"{p}: not valid JSON ({e})") from None
        fv = d.get("format_version")
        if fv != FORMAT_VERSION:
            raise EngineError(f"{p}: format_version: expected {FORMAT_VERSION}, found {fv!r}; rebuild the engine "
                              "with this version of qwen35-export")
        try:
            d["graphs"] = {k: GraphEntry(**v) for k, v in d["graphs"].items()}
            return Manifest(**d)
        except (TypeError, KeyError) as e:
            raise EngineError(f"{p}: malformed manifest ({e})") from None

    def verify_files(self, engine_dir: Path, hashes: bool = True) -> None:
        """Every listed file exists with its size (and sha256 when `hashes`)."""
        for rel, meta in self.files.items():
            f = Path(engine_dir) / rel
            if not f.is_file():
                raise EngineError(f"{engine_dir}: file '{rel}' listed in the manifest is missing")
            if f.stat().st_size != meta["bytes"]:
                raise EngineError(f"{f}: expected {meta['bytes']} bytes (manifest), found {f.stat().st_size}")
            if hashes and sha256_file(f) != meta["sha256"]:
                raise EngineError(f"{f}: sha256 does not match the manifest (file changed or corrupt)")
