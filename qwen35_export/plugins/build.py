"""`build --backend onnxruntime|tensorrt|torch-tensorrt`: checkpoint -> engine directory, the same layout
as the AOTI build.

Weights stream one layer at a time into `weights/` exactly as exporter/build.py writes them (so the
runtime binds them the same way), one ONNX graph per (layer kind, phase) plus embed/final goes to
`graphs/*.onnx`, and for TensorRT each graph is then compiled to `graphs/*.engine`; torch-tensorrt
compiles the graphs it takes (tensorrt/torch_trt.py) from their ExportedPrograms to `graphs/*.ep`
instead. The directory is built in a temp dir beside `out` and renamed into place at the end, so a
failed build leaves nothing.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch.export import ExportedProgram
from tqdm import tqdm

from .. import __version__
from ..checkpoint.reader import CheckpointReader
from ..config import Qwen35Config
from ..errors import BuildError
from ..exporter import capture as C
from ..exporter.build import (_TOKENIZER_FILES, TARGETS, BuildSettings, _resolve_dtype, check_target,
                               write_weights)
from ..exporter.engine_dir import check_out, file_table, staging_dir, swap_into_place
from ..exporter.manifest import FORMAT_VERSION, TARGET_SM, GraphEntry, Manifest
from .onnx import export as X

BACKENDS = ("onnxruntime", "tensorrt", "torch-tensorrt")
TRT_BACKENDS = ("tensorrt", "torch-tensorrt")

# Graph entry -> the functional ExportedProgram its ONNX file was exported from, captured again.
Capture = Callable[[GraphEntry], ExportedProgram]
# Compiles the graphs in `graphs_dir` (their ONNX files are there) in place for a backend; returns {graph
# name: file relative to the engine dir} for graphs it replaced, and extra version strings for the manifest.
Compiler = Callable[[Path, Path, dict[str, GraphEntry], Qwen35Config, BuildSettings, Capture],
                    tuple[dict[str, str], dict[str, str]]]


def _check(checkpoint: str | Path, out: Path, settings: BuildSettings) -> CheckpointReader:
    """Every check that can fail before anything is written."""
    if settings.backend not in BACKENDS:
        raise BuildError(f"--backend: build_backend_engine builds {BACKENDS}, found {settings.backend!r}")
    if settings.target not in TARGETS:
        raise BuildError(f"--target: expected one of {TARGETS}, found {settings.target!r}")
    if settings.batch1_decode:
        raise BuildError(f"--batch1-decode: batch-1 decode graphs are built for AOTInductor engines only "
                         f"(--backend aoti), found --backend {settings.backend}")
    if settings.backend in TRT_BACKENDS and settings.target == "cpu":
        raise BuildError(f"--backend {settings.backend}: TensorRT engines run on NVIDIA GPUs; use --target h100 "
                         "or h200")
    check_out(out, settings.force)
    if settings.max_batch < 1 or settings.max_seq_len < 2:
        raise BuildError(f"--max-batch >= 1 and --max-seq-len >= 2 expected, found {settings.max_batch}, "
                         f"{settings.max_seq_len}")
    reader = CheckpointReader(checkpoint)
    if settings.max_seq_len > reader.config.max_position_embeddings:
        raise BuildError(f"--max-seq-len {settings.max_seq_len} exceeds max_position_embeddings "
                         f"{reader.config.max_position_embeddings} of {checkpoint}/config.json")
    return reader


def _export_graphs(cfg: Qwen35Config, glob: dict[str, torch.Tensor], examples: dict[str, dict[str, torch.Tensor]],
                   shapes: C.CaptureShapes, act: torch.dtype, graphs_dir: Path,
                   progress: bool) -> dict[str, GraphEntry]:
    """One ONNX file per graph in `graphs_dir`; returns the manifest entries (weight input order)."""
    graphs_dir.mkdir()
    entries: dict[str, GraphEntry] = {}
    jobs = [(k, p) for k in (C.GDN, C.ATTN) if k in examples for p in (C.PREFILL, C.DECODE)]
    for kind, phase in tqdm(jobs, desc="export (ONNX)", disable=not progress):
        name = f"{kind}_{phase}"
        model, names = X.export_layer(cfg, kind, phase, examples[kind], shapes, act)
        X.save_model(model, graphs_dir / f"{name}.onnx")
        subs = {n.op_type: 0 for n in model.graph.node if n.domain == "qwen35"}
        for n in model.graph.node:
            if n.domain == "qwen35":
                subs[n.op_type] += 1
        entries[name] = GraphEntry(f"graphs/{name}.onnx", kind, phase, names, subs)
    X.save_model(X.export_embed(cfg, glob["embed_tokens.weight"], shapes), graphs_dir / "embed.onnx")
    entries["embed"] = GraphEntry("graphs/embed.onnx", C.EMBED, "any", ["embed_tokens.weight"])
    X.save_model(X.export_final(cfg, glob["norm.weight"], glob["lm_head.weight"], shapes, act),
                 graphs_dir / "final.onnx")
    entries["final"] = GraphEntry("graphs/final.onnx", C.FINAL, "any", ["norm.weight", "lm_head.weight"])
    return entries


def functional_capture(cfg: Qwen35Config, glob: dict[str, torch.Tensor],
                       examples: dict[str, dict[str, torch.Tensor]], shapes: C.CaptureShapes, act: torch.dtype,
                       device: torch.device) -> Capture:
    """`capture(entry)`: graph `entry` captured on `device` as the ONNX export captured it (functional layer
    modules: the new states are outputs), from the same globals and example layers."""

    def capture(e: GraphEntry) -> ExportedProgram:
        if e.kind == C.EMBED:
            return C.capture_embed(cfg, glob["embed_tokens.weight"].to(device), shapes, device)
        if e.kind == C.FINAL:
            return C.capture_final(cfg, glob["norm.weight"].to(device), glob["lm_head.weight"].to(device), shapes,
                                   act, device)
        w = {k: v.to(device) for k, v in examples[e.kind].items()}
        if e.kind == C.GDN:
            return C.capture_gdn(cfg, w, e.phase, shapes, act, device, layer=X.GDNLayerFn)[0]
        return C.capture_attention(cfg, w, e.phase, shapes, act, device, layer=X.AttentionLayerFn)[0]

    return capture


def _finish(tmp: Path, out: Path, checkpoint: str | Path, man: Manifest) -> None:
    """Tokenizer files, file hashes, manifest; then swap `tmp` into `out` (an old engine goes last)."""
    for f in _TOKENIZER_FILES:
        src = Path(checkpoint) / f
        if src.is_file():
            shutil.copy2(src, tmp / f)
            man.tokenizer_files.append(f)
    man.files = file_table(tmp)
    man.save(tmp / "manifest.json")
    swap_into_place(tmp, out)


def build_backend_engine(checkpoint: str | Path, out: str | Path, settings: BuildSettings) -> Path:
    """Build an engine directory at `out` with the ONNX Runtime, TensorRT or torch-tensorrt backend."""
    out = Path(out)
    t_all = time.time()
    reader = _check(checkpoint, out, settings)
    compiler: Compiler | None = None
    device = torch.device("cpu")
    if settings.backend in TRT_BACKENDS:  # fail before any work when a module or the GPU is missing
        from .tensorrt import build as trt_build

        compiler = trt_build.compile_graphs
        if settings.backend == "torch-tensorrt":
            from .tensorrt import torch_trt

            torch_trt.require_torch_tensorrt()
            compiler = torch_trt.compile_graphs
        trt_build.require_tensorrt(settings.backend)
        device = check_target(settings.target)
    cfg = reader.config
    dtype, act = _resolve_dtype(settings, cfg.fp8 is not None)
    if settings.backend == "onnxruntime" and settings.target == "cpu" and act == torch.bfloat16:
        raise BuildError("--backend onnxruntime --target cpu --dtype bf16: ONNX Runtime's CPU kernels have no "
                         "bfloat16 MatMul (onnxruntime 1.32); use --dtype fp32 or fp8 (fp8 weights, fp32 "
                         "activations) on cpu")
    shapes = C.CaptureShapes(settings.max_batch, settings.max_seq_len)
    tmp = staging_dir(out)
    times: dict[str, float] = {}
    try:
        t0 = time.time()
        glob, layer_files, examples = write_weights(reader, tmp, dtype, act, torch.device("cpu"),
                                                    settings.progress)
        reader.close()
        times["weights"] = time.time() - t0
        t0 = time.time()
        entries = _export_graphs(cfg, glob, examples, shapes, act, tmp / "graphs", settings.progress)
        times["export"] = time.time() - t0
        versions = {"qwen35_export": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
                    "onnx": onnx.__version__}
        if compiler is not None:
            t0 = time.time()
            files, extra = compiler(tmp, tmp / "graphs", entries, cfg, settings,
                                    functional_capture(cfg, glob, examples, shapes, act, device))
            for name, rel in files.items():
                entries[name].file = rel
            versions.update(extra)
            times["compile"] = time.time() - t0
        else:
            import onnxruntime

            versions["onnxruntime"] = onnxruntime.__version__
        times["total"] = time.time() - t_all
        man = Manifest(
            format_version=FORMAT_VERSION, versions=versions, target=settings.target,
            sm=list(TARGET_SM[settings.target]) if settings.target in TARGET_SM else None,
            backend=settings.backend, dtype=dtype, act_dtype=str(act).replace("torch.", ""),
            model_config=json.loads(json.dumps(asdict(cfg))), max_batch=settings.max_batch,
            max_seq_len=settings.max_seq_len, graphs=entries, layer_files=layer_files,
            globals_file="weights/globals.safetensors",
            passes=(["quantize_fp8 (weights, before export)"] if dtype == "fp8" else [])
            + ["onnx export (qwen35:: custom nodes with function bodies)"],
            build_seconds=times)
        _finish(tmp, out, checkpoint, man)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if settings.progress:
        print(f"built {out}: backend {settings.backend}, target {settings.target}, weights {dtype}, "
              f"{len(entries)} graphs; " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    return out
