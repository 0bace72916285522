"""`qwen35-export build`: checkpoint -> engine directory (weights + compiled graphs + manifest).

Weights stream from the checkpoint one layer at a time; one graph per (layer kind, phase) is captured with
the first layer of that kind as example and compiled with AOTInductor. The directory is built in a temp
dir beside the destination and renamed at the end, so a failed build leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .. import __version__
from ..checkpoint.reader import CheckpointReader
from ..config import LINEAR_ATTENTION
from ..errors import BuildError
from ..graph.pipeline import run_passes
from ..graph.fuse_weights import fuse_layer_weights
from ..graph.quantize_fp8 import dequantize_all, quantize_layer_fp8
from ..graph.substitute_custom_ops import triton_implementations
from . import capture as C
from ..parallel.capture import manifest_entry, save_layer_shards, sharded_capture
from ..parallel.plan import ParallelPlan
from .engine_dir import check_out, file_table, staging_dir, swap_into_place
from .manifest import FORMAT_VERSION, TARGET_SM, GraphEntry, Manifest

TARGETS = ("h100", "h200", "cpu")
# passes whose per-op counts the manifest records as a graph's substitutions
_COUNTED_PASSES = ("substitute_custom_ops", "reinplace_state")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class BuildSettings:
    target: str = "cpu"
    dtype: str | None = None  # fp32 | bf16 | fp8; None: fp32 on cpu, else bf16 (fp8 for FP8 checkpoints)
    max_batch: int = 8
    max_seq_len: int = 512
    dump_graphs: bool = False
    force: bool = False
    backend: str = "aoti"
    # Which implementation replaces the qwen35:: reference ops: "auto" (Triton on GPU targets, reference on
    # cpu), "triton" (fail if a kernel is missing), "reference" (keep the torch references everywhere).
    kernels: str = "auto"
    # Graphs compiled at once, each in its own process (0: one per 4 CPU cores, at most one per graph).
    jobs: int = 0
    progress: bool = True
    # Ranks of a sharded engine (parallel/plan.py): attention/GDN heads split over tp, experts over ep.
    tp: int = 1
    ep: int = 1
    # Fuse projections that read the same input, and the shared expert into the routed MoE op
    # (graph/fuse_weights.py); single-rank AOTI builds only.
    fuse_projections: bool = True
    # Capture the MoE routing of the decode graphs as one `qwen35::moe_route` node (layers.moe_block), run as
    # two Triton kernels (qwen35_triton::moe_route: gate logits + route) instead of ~6 ops. H200, 35B-A3B at 8
    # layers (bench/results/e2e_h200_session9/): BF16 decode 0.979 / 1.787 ms at batch 1 / 8 (op-by-op, sixth
    # session: 1.01 / 1.79, within that code's run-to-run spread: no engine speed-up claimed); validate PASS at
    # batch 2 and 40 and padded buckets bit-identical for BF16 and FP8. Prefill keeps the
    # op-by-op routing (launch count is what the fused op saves; prefill does not feel it), as do targets
    # without the Triton op (cpu, ONNX, TensorRT) and sharded builds.
    fused_route: bool = True
    # Also capture each layer kind's decode graph at a static batch of 1 (capture.DECODE1), which the runtime
    # uses for batch-1 steps. None: on for GPU targets (where kernels pick tiles from the row count), off on
    # cpu (reference ops: nothing to pick; one more compile per layer kind). Single-rank AOTI builds only.
    batch1_decode: bool | None = None


def check_target(target: str) -> torch.device:
    """Fail at once, before anything is written, when this machine cannot build for `target`."""
    if target not in TARGETS:
        raise BuildError(f"--target: expected one of {TARGETS}, found {target!r}")
    if target == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BuildError(f"--target {target} needs an NVIDIA GPU of compute capability "
                         f"{'.'.join(map(str, TARGET_SM[target]))} on this machine; found no CUDA device "
                         f"(torch {torch.__version__}). Build with --target cpu, or on the GPU machine.")
    cc = torch.cuda.get_device_capability()
    if cc != TARGET_SM[target]:
        raise BuildError(f"--target {target} is sm_{''.join(map(str, TARGET_SM[target]))}, but the GPU here "
                         f"({torch.cuda.get_device_name()}) is sm_{cc[0]}{cc[1]}")
    return torch.device("cuda")


def _resolve_dtype(settings: BuildSettings, ckpt_fp8: bool) -> tuple[str, torch.dtype]:
    d = settings.dtype or ("fp8" if ckpt_fp8 and settings.target != "cpu" else
                           ("fp32" if settings.target == "cpu" else "bf16"))
    if d not in ("fp32", "bf16", "fp8"):
        raise BuildError(f"--dtype: expected fp32, bf16 or fp8, found {d!r}")
    act = torch.float32 if (settings.target == "cpu" and d != "bf16") or d == "fp32" else torch.bfloat16
    return d, act


def _prepare_layer(w: dict[str, torch.Tensor], dtype: str, act: torch.dtype) -> dict[str, torch.Tensor]:
    if dtype == "fp8":
        w, _ = quantize_layer_fp8(w)
    else:
        w = dequantize_all(w, act)
    # Keep A_log in fp32 (the decay needs an fp32 exp); everything else not FP8 in the activation dtype.
    return {k: (v if v.dtype in (torch.float8_e4m3fn,) or k.endswith("_scale_inv") or k.endswith("A_log")
                else v.to(act)).contiguous() for k, v in w.items()}


def write_weights(reader: CheckpointReader, tmp: Path, dtype: str, act: torch.dtype, device: torch.device,
                  progress: bool, plan: ParallelPlan | None = None, rank_files: list[list[str]] | None = None,
                  fused: list[str] | None = None
                  ) -> tuple[dict[str, torch.Tensor], list[str], dict[str, dict[str, torch.Tensor]]]:
    """Stream the weights into `tmp/weights/`, one layer at a time (per-rank shards when `plan` is set).
    With a `fused` list (single rank only), each layer's projections are fused and the groups fused are
    appended to it once.

    Returns (globals, layer files, the first layer of each kind on `device` as the capture example)."""
    cfg = reader.config
    (tmp / "weights").mkdir()
    glob = {k: v.to(act) for k, v in reader.load_globals(act).items()}
    save_file(glob, str(tmp / "weights" / "globals.safetensors"))
    layer_files: list[str] = []
    examples: dict[str, dict[str, torch.Tensor]] = {}
    for i in tqdm(range(cfg.num_hidden_layers), desc="weights", disable=not progress):
        w = _prepare_layer(reader.load_layer(i, act, keep_fp8=(dtype == "fp8")), dtype, act)
        if fused is not None and plan is None:
            w, groups = fuse_layer_weights(w)
            fused.extend(g for g in groups if g not in fused)
        if plan is not None:  # every rank's file written; rank 0's shard is the capture example
            w = save_layer_shards(w, cfg, plan, i, tmp, rank_files)
        else:
            rel = f"weights/layer_{i:03d}.safetensors"
            save_file(w, str(tmp / rel))
            layer_files.append(rel)
        kind = C.GDN if cfg.layer_types[i] == LINEAR_ATTENTION else C.ATTN
        if kind not in examples:
            examples[kind] = {k: v.to(device) for k, v in w.items()}
        del w
    return glob, layer_files, examples


def capture_flags(settings: BuildSettings, kind: str, phase: str, impls: dict[str, object], device: torch.device,
                  sharded: bool) -> dict[str, bool]:
    """The capture options of one layer graph (only those that are on; the sharded layers take neither)."""
    kw = {}
    # GPU builds substituting the Triton attention op prefill through it (flash kernel over the cache)
    # (single-rank builds only: the sharded attention layer keeps SDPA for prefill)
    if kind == C.ATTN and not sharded and device.type == "cuda" and "decode_attention" in impls:
        kw["cache_op"] = True
    if (settings.fused_route and not sharded and phase in C.DECODE_PHASES and device.type == "cuda"
            and "moe_route" in impls):
        kw["fused_route"] = True
    return kw


def layer_phases(settings: BuildSettings, sharded: bool) -> tuple[str, ...]:
    """The phases each layer kind is captured for: prefill, decode, and decode1 (see BuildSettings)."""
    if settings.batch1_decode and sharded:
        raise BuildError("--batch1-decode: batch-1 decode graphs are built for single-rank engines only "
                         f"(found --tp {settings.tp} --ep {settings.ep})")
    b1 = settings.batch1_decode if settings.batch1_decode is not None else settings.target != "cpu"
    return (C.PREFILL, C.DECODE) + ((C.DECODE1,) if b1 and not sharded else ())


def _select_kernels(settings: BuildSettings, dtype: str) -> dict[str, object]:
    """The op implementations a build substitutes; `dtype` is the resolved weight dtype (fp32 | bf16 | fp8)."""
    if settings.kernels not in ("auto", "triton", "reference"):
        raise BuildError(f"--kernels: expected auto, triton or reference, found {settings.kernels!r}")
    if settings.kernels == "reference" or (settings.kernels == "auto" and settings.target == "cpu"):
        return {}
    impls = triton_implementations()
    if settings.kernels == "triton":
        need = {"causal_conv1d", "gated_delta_rule", "moe_router", "moe_experts"}
        need |= {"moe_route"} if settings.fused_route and settings.tp == settings.ep == 1 else set()
        need |= {"moe_experts_fp8", "fp8_linear"} if dtype == "fp8" else set()
        missing = sorted(need - set(impls))
        if missing:
            raise BuildError(f"--kernels triton: no Triton implementation registered for {missing}")
    return impls


def _compile_all(eps: dict[str, tuple], tmp: Path, settings: BuildSettings, kernels: bool) -> None:
    """AOTInductor-compile every graph; in parallel worker processes when jobs > 1 (C++ and Triton
    compiles are single-threaded per graph, and a GPU build machine has the cores to spare)."""
    jobs = settings.jobs or max(1, min(len(eps), (os.cpu_count() or 1) // 4))
    bar = tqdm(total=len(eps), desc="compile (AOTInductor)", disable=not settings.progress)
    if jobs <= 1:
        for ep, entry in eps.values():
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp / entry.file))
            bar.update()
        bar.close()
        return
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    saved = tmp / "exported"
    saved.mkdir()

    for name, (ep, _) in eps.items():  # torch.export.save is not thread-safe: save first, one by one
        torch.export.save(ep, str(saved / f"{name}.pt2"))

    def one(name: str, alone: bool = False) -> tuple[str, int] | None:
        """Compile graph `name` in a worker. When the worker is killed by a signal while others run beside it,
        returns (name, exit status) instead of failing: it is retried alone below."""
        src = saved / f"{name}.pt2"
        cmd = [sys.executable, "-m", "qwen35_export.exporter.compile_worker", str(src), str(tmp / eps[name][1].file)]
        p = subprocess.run(cmd + (["--kernels"] if kernels else []), capture_output=True, text=True)
        if p.returncode < 0 and not alone:
            return name, p.returncode
        if p.returncode != 0:
            raise BuildError(f"compiling graph '{name}' failed ({_exit_reason(p.returncode, alone)}):\n"
                             f"{p.stderr[-4000:]}")
        bar.update()
        return None

    with ThreadPoolExecutor(jobs) as pool:
        killed = [k for k in pool.map(one, eps) if k is not None]
    # A worker killed by a signal leaves no traceback: with several large compiles at once that is most often
    # the host's OOM killer (a 397B build on an H200, 2026-12-02, lost `gdn_decode1` this way beside five other
    # compiles; the OOM killer was the likely cause, not confirmed). Those graphs get a second try one at a
    # time, with the machine to themselves.
    for name, rc in killed:
        bar.write(f"compile worker for graph '{name}' was {_exit_reason(rc)}; retrying it alone")
        one(name, alone=True)
    bar.close()
    shutil.rmtree(saved)


def _exit_reason(returncode: int, alone: bool = False) -> str:
    """A compile worker's exit status in words: the signal that killed it, or its exit code (`alone`: it was
    the only compile running)."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        sig = signal.Signals(-returncode).name
    except ValueError:
        sig = f"signal {-returncode}"
    hint = ""
    if sig == "SIGKILL":
        hint = (" (most often the out-of-memory killer: this graph alone needs more host memory than is free)"
                if alone else " (most often the out-of-memory killer: build with fewer --jobs)")
    return f"killed by {sig}{hint}"


def _parallel_plan(settings: BuildSettings, cfg) -> "ParallelPlan | None":
    """The plan of a sharded build (None for one rank), checked against the model geometry."""
    if settings.tp == 1 and settings.ep == 1:
        return None
    plan = ParallelPlan(settings.tp, settings.ep)
    plan.check(cfg)
    return plan


def build_engine(checkpoint: str | Path, out: str | Path, settings: BuildSettings) -> Path:
    """Build an engine directory at `out` from the checkpoint directory `checkpoint`."""
    out = Path(out)
    t_all = time.time()
    device = check_target(settings.target)
    if settings.backend != "aoti":
        raise BuildError(f"--backend {settings.backend}: build_engine compiles AOTInductor engines; other "
                         "backends are built by their plugin package")
    check_out(out, settings.force)
    if settings.jobs < 0:
        raise BuildError(f"--jobs: expected >= 0 (0: one per 4 CPU cores), found {settings.jobs}")
    if settings.max_batch < 1 or settings.max_seq_len < 2:
        raise BuildError(f"--max-batch >= 1 and --max-seq-len >= 2 expected, found {settings.max_batch}, "
                         f"{settings.max_seq_len}")
    reader = CheckpointReader(checkpoint)
    cfg = reader.config
    if settings.max_seq_len > cfg.max_position_embeddings:
        raise BuildError(f"--max-seq-len {settings.max_seq_len} exceeds max_position_embeddings "
                         f"{cfg.max_position_embeddings} of {checkpoint}/config.json")
    dtype, act = _resolve_dtype(settings, cfg.fp8 is not None)
    if dtype == "fp8" and cfg.moe_intermediate_size % 128:
        raise BuildError(f"--dtype fp8 needs moe_intermediate_size to be a multiple of 128, found "
                         f"{cfg.moe_intermediate_size}")
    impls = _select_kernels(settings, dtype)
    plan = _parallel_plan(settings, cfg)
    if plan is not None:  # compile workers hold no process group, which graphs with collectives need
        settings = replace(settings, jobs=1)
    rank_files: list[list[str]] = [[] for _ in range(plan.world_size if plan else 0)]
    shapes = C.CaptureShapes(settings.max_batch, settings.max_seq_len)
    tmp = staging_dir(out)
    times: dict[str, float] = {}
    try:
        # 1. weights, one layer at a time
        t0 = time.time()
        fused: list[str] | None = [] if settings.fuse_projections and plan is None else None
        glob, layer_files, examples = write_weights(reader, tmp, dtype, act, device, settings.progress, plan,
                                                    rank_files, fused)
        reader.close()
        times["weights"] = time.time() - t0

        # 2. capture + passes
        t0 = time.time()
        dump = tmp / "graphs_dump" if settings.dump_graphs else None
        eps: dict[str, tuple] = {}
        phases = layer_phases(settings, sharded=plan is not None)
        jobs = [(f"{k}_{p}", k, p) for k in (C.GDN, C.ATTN) if k in examples for p in phases]
        capture = {C.GDN: C.capture_gdn, C.ATTN: C.capture_attention} if plan is None else sharded_capture(plan)
        for name, kind, phase in tqdm(jobs, desc="capture", disable=not settings.progress):
            kw = capture_flags(settings, kind, phase, impls, device, sharded=plan is not None)
            ep, names = capture[kind](cfg, examples[kind], phase, shapes, act, device, **kw)
            ep, recs = run_passes(ep, name, impls, dump)
            eps[name] = (ep, GraphEntry(f"graphs/{name}.pt2", kind, phase, names,
                                        {k: v for r in recs if r.name in _COUNTED_PASSES
                                         for k, v in r.changes.items()}))
        gdev = {k: v.to(device) for k, v in glob.items()}
        eps["embed"] = (C.capture_embed(cfg, gdev["embed_tokens.weight"], shapes, device),
                        GraphEntry("graphs/embed.pt2", C.EMBED, "any", ["embed_tokens.weight"]))
        eps["final"] = (C.capture_final(cfg, gdev["norm.weight"], gdev["lm_head.weight"], shapes, act, device),
                        GraphEntry("graphs/final.pt2", C.FINAL, "any", ["norm.weight", "lm_head.weight"]))
        times["capture"] = time.time() - t0

        # 3. compile
        t0 = time.time()
        (tmp / "graphs").mkdir()
        _compile_all(eps, tmp, settings, bool(impls))
        times["compile"] = time.time() - t0

        # 4. tokenizer files, manifest
        tok = []
        for f in _TOKENIZER_FILES:
            src = Path(checkpoint) / f
            if src.is_file():
                shutil.copy2(src, tmp / f)
                tok.append(f)
        files = file_table(tmp)
        try:
            import triton
            tv = triton.__version__
        except ImportError:
            tv = "none"
        man = Manifest(
            format_version=FORMAT_VERSION,
            versions={"qwen35_export": __version__, "torch": torch.__version__, "triton": tv,
                      "python": sys.version.split()[0]},
            target=settings.target, sm=list(TARGET_SM[settings.target]) if settings.target in TARGET_SM else None,
            backend=settings.backend, dtype=dtype, act_dtype=str(act).replace("torch.", ""),
            model_config=json.loads(json.dumps(asdict(cfg))), max_batch=settings.max_batch,
            max_seq_len=settings.max_seq_len, graphs={k: e for k, (_, e) in eps.items()},
            layer_files=layer_files, globals_file="weights/globals.safetensors",
            passes=(["quantize_fp8 (weights, before capture)"] if dtype == "fp8" else [])
            + ([f"fuse_weights (weights, before capture): {', '.join(fused)}"] if fused else [])
            + ["inline_ops", "substitute_custom_ops", "reinplace_state"],
            files=files, build_seconds=times, tokenizer_files=tok,
            parallel=manifest_entry(plan, rank_files) if plan is not None else None)
        times["total"] = time.time() - t_all
        man.save(tmp / "manifest.json")

        # 5. swap into place; an old engine is removed only once the new one is complete
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    if settings.progress:
        print(f"built {out}: target {settings.target}, weights {dtype}, {len(eps)} graphs, "
              f"{size / 2**20:.1f} MiB; " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    return out
