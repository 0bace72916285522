"""Compile the exported ONNX graphs into TensorRT engines: one strongly typed network per graph, one
builder config per target (h100, h200: sm_90) with a timing cache shared by the graphs of a build.

Written to the public TensorRT >= 10 Python API; it has never run here (the builder cannot be installed
on our machines), so everything past `require_tensorrt()` is unverified.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import onnx

from ...config import Qwen35Config
from ...errors import BuildError
from ...exporter.build import BuildSettings, check_target
from ...exporter.manifest import TARGET_SM, GraphEntry
from ..onnx.export import save_model
from .onnx_prep import prepare_for_tensorrt

MIN_MAJOR = 10


def require_tensorrt(backend: str = "tensorrt") -> Any:
    """The `tensorrt` module, or a BuildError naming it (`backend`: the --backend that needs it)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BuildError(f"--backend {backend}: the `tensorrt` Python module (TensorRT >= {MIN_MAJOR}) cannot be "
                         f"imported here ({e}). Install TensorRT on a machine with an sm_90 GPU, or build with "
                         "--backend onnxruntime / aoti.") from None
    if int(trt.__version__.split(".")[0]) < MIN_MAJOR:
        raise BuildError(f"--backend {backend}: TensorRT >= {MIN_MAJOR} needed (tensorrt.plugin), found "
                         f"{trt.__version__}")
    return trt


@dataclass(frozen=True)
class TargetConfig:
    """Builder settings of one target. Both targets are sm_90; they differ in memory, which sets the
    workspace (H200 has 141 GB of HBM3e, H100 80 GB)."""

    sm: tuple[int, int]
    workspace_gib: int
    optimization_level: int = 3


TARGET_CONFIGS = {"h100": TargetConfig(TARGET_SM["h100"], 8), "h200": TargetConfig(TARGET_SM["h200"], 16)}


def builder_config(trt: Any, builder: Any, target: str, timing_cache: bytes) -> Any:
    """IBuilderConfig for `target`: workspace, optimisation level, timing cache (strong typing is a
    network flag, so no precision flags here: the ONNX graph's dtypes and Q/DQ nodes decide), and aliased
    plug-in I/O (the GDN and conv plug-ins update their state inputs in place: specs.py `alias`)."""
    t = TARGET_CONFIGS[target]
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, t.workspace_gib << 30)
    config.builder_optimization_level = t.optimization_level
    config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.NONE  # sm_90 only, fastest kernels
    # without it the build refuses plug-ins that declare `aliased()` outputs (a preview feature since 10.3)
    config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return config


def profile_shapes(dims: tuple[int, ...], max_batch: int, max_seq_len: int) -> tuple[tuple, tuple, tuple]:
    """(min, opt, max) of one network input. Dynamic dims are the batch (axis 0) and the tokens (axis 1,
    only on `x`/`ids` of prefill graphs): every other dim of our graphs is fixed by the config."""
    lo, opt, hi = [], [], []
    for axis, d in enumerate(dims):
        if d >= 0:
            lo.append(d), opt.append(d), hi.append(d)
        elif axis == 0:
            lo.append(1), opt.append(max(1, max_batch // 2)), hi.append(max_batch)
        else:
            lo.append(1), opt.append(min(128, max_seq_len)), hi.append(max_seq_len)
    return tuple(lo), tuple(opt), tuple(hi)


def _build_one(trt: Any, builder: Any, logger: Any, onnx_path: Path, settings: BuildSettings,
               timing_cache: bytes) -> tuple[bytes, bytes]:
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: external data resolves beside it
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{onnx_path}: TensorRT's ONNX parser failed: {errs}")
    config = builder_config(trt, builder, settings.target, timing_cache)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        if any(d < 0 for d in inp.shape):
            profile.set_shape(inp.name, *profile_shapes(tuple(inp.shape), settings.max_batch, settings.max_seq_len))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BuildError(f"{onnx_path}: TensorRT could not build an engine (see the log above)")
    return bytes(engine), bytes(config.get_timing_cache().serialize())


def compile_graphs(tmp: Path, graphs_dir: Path, entries: dict[str, GraphEntry], cfg: Qwen35Config,
                   settings: BuildSettings, capture: Callable | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """Build `graphs/<name>.engine` from each `graphs/<name>.onnx` (plugins/build.py's Compiler; `capture` is
    unused: the parser reads the ONNX files)."""
    trt = require_tensorrt(settings.backend)
    check_target(settings.target)  # the builder tunes kernels on the GPU it runs on
    from .plugins import register_plugins

    register_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_file = graphs_dir / "timing_cache.bin"
    cache = cache_file.read_bytes() if cache_file.is_file() else b""
    files: dict[str, str] = {}
    for name in entries:
        src = graphs_dir / f"{name}.trt.onnx"
        save_model(prepare_for_tensorrt(onnx.load(str(graphs_dir / f"{name}.onnx"))), src)
        engine, cache = _build_one(trt, builder, logger, src, settings, cache)
        (graphs_dir / f"{name}.engine").write_bytes(engine)
        files[name] = f"graphs/{name}.engine"
    cache_file.write_bytes(cache)
    return files, {"tensorrt": trt.__version__}
