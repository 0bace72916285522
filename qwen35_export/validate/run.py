"""`qwen35-export validate`: run an engine and an fp32 reference on the same prompts and check them
layer by layer and end to end against the precision's bounds (thresholds.py)."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint.reader import load_model_weights
from ..config import LINEAR_ATTENTION, param_counts
from ..errors import InputError
from ..exporter.manifest import Manifest
from ..model.model import Qwen35Model
from ..runtime.engine import Engine
from .checks import largest_jumps, layer_checks, layer_metrics, logit_checks
from .result import ValidationResult
from .stream import fits, stream_trace
from .thresholds import thresholds_for
from .trace import EngineRunner, ModelRunner, RowTrace, routing_from_engine_inputs, trace

REFERENCES = ("ours", "transformers")
REFERENCE_MODES = ("auto", "whole", "stream")


def load_prompts(path: str | Path) -> list[list[int]]:
    """One prompt per non-empty line, comma-separated token ids."""
    prompts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompts.append([int(t) for t in line.split(",") if t.strip()])
        except ValueError:
            raise InputError(f"{path}:{n}: expected comma-separated token ids, found {line[:60]!r}") from None
    if not prompts:
        raise InputError(f"{path}: no prompts (one per line, comma-separated token ids)")
    return prompts


def random_prompts(n: int, vocab: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """n prompts of unequal lengths up to max_len (so batches carry right padding)."""
    if n < 1 or max_len < 1:
        raise InputError(f"--random {n}: need at least one prompt of at least one token (max length {max_len})")
    g = torch.Generator().manual_seed(seed)
    lengths = [max(1, round(max_len * (n - k) / n)) for k in range(n)]
    return [torch.randint(0, vocab, (t,), generator=g).tolist() for t in lengths]


def reference_device(engine: Engine) -> torch.device:
    """The engine's GPU when the fp32 reference weights fit in its free memory (with 25% for activations),
    else the CPU."""
    if engine.device.type != "cuda":
        return torch.device("cpu")
    return engine.device if fits(engine.device, param_counts(engine.cfg).total * 4) else torch.device("cpu")


@dataclass(frozen=True)
class ReferencePlan:
    """How the reference runs: the whole fp32 model on `device`, or streamed one layer at a time (each
    layer on `device` when it fits there, else on the CPU)."""

    mode: str  # "whole" or "stream"
    device: torch.device

    def describe(self) -> str:
        if self.mode == "whole":
            return f"whole fp32 model on {self.device}"
        where = "the CPU" if self.device.type == "cpu" else f"{self.device} when it fits, else the CPU"
        return f"fp32 layer streaming (one layer's weights at a time, on {where})"


def _check_mode(reference: str, mode: str) -> None:
    if mode not in REFERENCE_MODES:
        raise InputError(f"--reference-mode: expected one of {REFERENCE_MODES}, found {mode!r}")
    if mode == "stream" and reference != "ours":
        raise InputError(f"--reference-mode stream: only our reference runs layer by layer; --reference "
                         f"{reference} loads the whole model (use --reference ours)")


def reference_plan(engine: Engine, reference: str = "ours", mode: str = "auto") -> ReferencePlan:
    """auto: the whole fp32 model on the engine's device when it fits there (GPU memory, or host memory for
    a cpu engine), else layer streaming, its layers on the engine's GPU when they fit. whole: the whole
    model, on the engine's GPU when it fits, else the CPU. stream: layer streaming whatever fits.
    transformers' model cannot be streamed: it always runs whole."""
    _check_mode(reference, mode)
    if reference != "ours" or mode == "whole":
        return ReferencePlan("whole", reference_device(engine))
    if mode == "auto" and fits(engine.device, param_counts(engine.cfg).total * 4):
        return ReferencePlan("whole", engine.device)
    return ReferencePlan("stream", engine.device)


def _collect(eng: Engine, checkpoint: str | Path, reference: str, plan: ReferencePlan,
             batches: list[list[list[int]]], gen: int,
             progress: bool) -> tuple[list[RowTrace], list[RowTrace], list[list[torch.Tensor]] | None]:
    """Trace both sides batch by batch: whole, the reference first and the engine fed its tokens; streamed,
    the engine first (own greedy tokens) and the reference fed those. Returns engine rows, reference rows,
    and (our reference only) router picks from the engine's inputs."""
    if plan.mode == "stream":
        eng_batches = [trace(EngineRunner(eng), batch, gen, desc="engine decode", progress=progress)
                       for batch in tqdm(batches, desc="engine batches", disable=not progress or len(batches) < 2)]
        gpu = plan.device if plan.device.type == "cuda" else None
        ref_rows, routing = stream_trace(checkpoint, eng_batches, eng.max_seq_len, gpu, progress)
        return [r for rows in eng_batches for r in rows], ref_rows, routing
    if reference == "ours":
        model = Qwen35Model(load_model_weights(checkpoint, torch.float32, device=plan.device, progress=progress))
    else:
        from .hf_reference import hf_trace, load_hf

        hf = load_hf(checkpoint, plan.device)
    eng_rows: list[RowTrace] = []
    ref_rows: list[RowTrace] = []
    routing: list[list[torch.Tensor]] = []
    for batch in tqdm(batches, desc="validate batches", disable=not progress or len(batches) < 2):
        if reference == "ours":
            ref = trace(ModelRunner(model, eng.max_seq_len), batch, gen, routing=True, desc="reference decode",
                        progress=progress)
        else:
            ref = hf_trace(hf, batch, gen, eng.cfg.num_hidden_layers, progress)
        got = trace(EngineRunner(eng), batch, gen, teacher=[r.teacher for r in ref], desc="engine decode",
                    progress=progress)
        if reference == "ours":
            routing += routing_from_engine_inputs(model, ref, got)
        ref_rows += ref
        eng_rows += got
    return eng_rows, ref_rows, (routing if reference == "ours" else None)


def validate(engine: str | Path | Engine, checkpoint: str | Path, reference: str = "ours",
             prompts: list[list[int]] | None = None, random_n: int = 3, gen: int = 16,
             report_dir: str | Path | None = None, device: str | None = None,
             progress: bool = True, reference_mode: str = "auto") -> ValidationResult:
    """Compare `engine` (a directory or a loaded Engine) with the fp32 reference built from `checkpoint`,
    run whole or streamed layer by layer as `reference_plan` decides for `reference_mode`."""
    t0 = time.perf_counter()
    if reference not in REFERENCES:
        raise InputError(f"--reference: expected one of {REFERENCES}, found {reference!r}")
    _check_mode(reference, reference_mode)
    if gen < 1:
        raise InputError(f"--gen: expected >= 1, found {gen}")
    eng = engine if isinstance(engine, Engine) else Engine.load(engine, device)
    cfg = eng.cfg
    th = thresholds_for(eng.manifest.dtype)
    if gen >= eng.max_seq_len:
        raise InputError(f"--gen {gen}: leaves no room for a prompt in the engine's max sequence length "
                         f"{eng.max_seq_len}")
    if prompts is None:
        prompts = random_prompts(random_n, cfg.vocab_size, min(eng.max_seq_len - gen, 32))
    batches = [prompts[i:i + eng.max_batch] for i in range(0, max(len(prompts), 1), eng.max_batch)]
    for batch in batches:
        eng.check_prompts(batch, gen)
    kinds = ["gdn" if t == LINEAR_ATTENTION else "attn" for t in cfg.layer_types]
    plan = reference_plan(eng, reference, reference_mode)
    if progress:
        print(f"reference {reference}: {plan.describe()}")

    eng_rows, ref_rows, routing = _collect(eng, checkpoint, reference, plan, batches, gen, progress)
    skipped = [] if routing is not None else [
        "GDN state and routing checks (they need our reference's explicit state and router; use --reference ours)"]

    layers = layer_metrics(eng_rows, ref_rows, kinds, cfg.gdn_layers, routing)
    checks = layer_checks(layers, th)
    lchecks, e2e = logit_checks(eng_rows, ref_rows, th)
    result = ValidationResult(engine=str(eng.dir), precision=eng.manifest.dtype, reference=reference,
                              prompt_lengths=[len(p) for p in prompts], gen=gen, checks=checks + lchecks,
                              layers=layers, largest_jump=largest_jumps(layers), skipped=skipped,
                              end_to_end=e2e, reference_mode=plan.mode)
    result.seconds = time.perf_counter() - t0
    if report_dir is not None:
        from .report import write_report

        write_report(result, report_dir, th)
    return result


def validate_cli(args: argparse.Namespace) -> int:
    """`qwen35-export validate`: print the summary table; exit 0 only when every check passes."""
    prompts = load_prompts(args.prompts) if args.prompts else None
    r = validate(args.engine, args.checkpoint, reference=args.reference, prompts=prompts, random_n=args.random,
                 gen=args.gen, report_dir=args.report, device=args.device, reference_mode=args.reference_mode)
    print(r.summary())
    if args.report:
        print(f"report: {args.report}/validation.{{json,md,png}}")
    return 0 if r.passed else 1


def record_in_manifest(engine_dir: str | Path, result: ValidationResult) -> None:
    """Write the result into manifest.json's `validation` field, atomically (temp file + rename).
    manifest.json is not among the hashed `files`, so recording leaves the engine loadable."""
    engine_dir = Path(engine_dir)
    man = Manifest.load(engine_dir)
    man.validation = {
        "passed": result.passed, "summary": result.headline(), "precision": result.precision,
        "reference": result.reference, "reference_mode": result.reference_mode,
        "first_bad_layer": result.first_bad_layer,
        "prompt_lengths": result.prompt_lengths, "gen": result.gen, "seconds": round(result.seconds, 1),
        "checks": {c.name: {"value": c.value, "op": c.op, "bound": c.bound, "passed": c.passed,
                            "layer": c.layer} for c in result.checks},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = engine_dir / f".manifest.json.{os.getpid()}.tmp"
    man.save(tmp)
    os.replace(tmp, engine_dir / "manifest.json")


def validate_after_build(engine_dir: str | Path, checkpoint: str | Path) -> int:
    """`build --validate`: a short validate (2 prompts, 8 tokens), recorded in the manifest; exit code."""
    r = validate(engine_dir, checkpoint, random_n=2, gen=8, progress=False)
    record_in_manifest(engine_dir, r)
    print(r.summary())
    return 0 if r.passed else 1
