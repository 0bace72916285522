"""Engines built once per test session (AOTInductor cpu builds take about a minute on 2 cores each).

Imported by tests/conftest.py so every test module shares the same session-scoped builds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen35_export.checkpoint.writer import write_random_checkpoint
from qwen35_export.config import preset
from qwen35_export.exporter.build import BuildSettings, build_engine

ENGINE_BATCH = 4
ENGINE_SEQ = 64


@pytest.fixture(scope="session")
def engine_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="session")
def engine_ckpt_fp32(engine_root: Path) -> Path:
    return write_random_checkpoint(preset("tiny"), engine_root / "ckpt_fp32", dtype="fp32", seed=1,
                                   progress=False)


@pytest.fixture(scope="session")
def cpu_engine_fp32(engine_root: Path, engine_ckpt_fp32: Path) -> Path:
    """tiny fp32 checkpoint -> `build --target cpu` (fp32, reference ops through the proxy executor), with the
    static batch-1 decode graphs GPU builds make by default, so that batch-1 steps run them here too."""
    return build_engine(engine_ckpt_fp32, engine_root / "cpu_fp32",
                        BuildSettings(target="cpu", max_batch=ENGINE_BATCH, max_seq_len=ENGINE_SEQ,
                                      dump_graphs=True, progress=False, batch1_decode=True))


@pytest.fixture(scope="session")
def ort_engine_fp32(engine_root: Path, engine_ckpt_fp32: Path) -> Path:
    """The same tiny fp32 checkpoint -> `build --backend onnxruntime --target cpu` (graphs/*.onnx)."""
    from qwen35_export.plugins.build import build_backend_engine

    return build_backend_engine(engine_ckpt_fp32, engine_root / "ort_fp32",
                                BuildSettings(target="cpu", backend="onnxruntime", max_batch=ENGINE_BATCH,
                                              max_seq_len=ENGINE_SEQ, progress=False))
