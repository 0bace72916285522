"""Validate a sharded engine, one process per rank:

    torchrun --nproc-per-node N -m qwen35_export.parallel.validate ENGINE [--single ENGINE_1RANK]
        [--checkpoint CKPT] [--prompts FILE | --random 3] [--gen 16] [--report out.json]
    torchrun --nproc-per-node N -m qwen35_export.cli validate ENGINE --checkpoint CKPT [--report DIR]

Compares, on the same prompts, the engine's prefill logits and greedy tokens with:
- the eager sharded reference over the very weight tensors this rank's engine holds (always; no extra
  memory): checks the compiled graphs and the collectives inside them;
- the 1-rank engine `--single` (rank 0 loads it after the sharded run; it must fit one device);
- the fp32 single-device reference from `--checkpoint` (every rank loads it; small models only).
Also checks that every rank produced the same tokens. Rank 0 prints the report and writes `--report`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import LINEAR_ATTENTION
from ..model.model import Qwen35Model
from ..model.weights import ModelWeights
from ..runtime.engine import Engine
from ..runtime.sampling import SamplingParams
from .engine import ShardedEngine
from .model import ShardedModel

# max |dlogit| / max |logit| of a prefill, per engine precision: fp32 differs only in summation order
# (~1e-5); bf16 rounds ~10 times per layer (~1-3% over the stack); fp8 adds e4m3's 6% per weight block.
LOGIT_REL_BOUND = {"fp32": 1e-4, "bf16": 5e-2, "fp8": 1e-1}


def rank_reference(eng: ShardedEngine) -> ShardedModel:
    """The eager TP/EP reference over this rank's engine weights (the same tensors, not copies)."""
    layers = []
    for i, w in enumerate(eng.layer_weights):
        kind = "gdn" if eng.cfg.layer_types[i] == LINEAR_ATTENTION else "attn"
        layers.append(dict(zip(eng.manifest.graphs[f"{kind}_prefill"].weight_names, w)))
    return ShardedModel(ModelWeights(eng.local_cfg, dict(eng.globals), layers), eng.plan)


def pad(prompts: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Right-padded ids [B, T] and lengths [B]."""
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    return ids, lengths


def compare(tokens: list[list[int]], logits: Tensor, ref_tokens: list[list[int]], ref_logits: Tensor,
            lengths: Tensor, bound: float) -> dict[str, Any]:
    """Prefill logits [B, T, V] over the real positions, and greedy tokens row by row."""
    err, scale = 0.0, 0.0
    for b, n in enumerate(lengths.tolist()):
        a, r = logits[b, :n].double().cpu(), ref_logits[b, :n].double().cpu()
        if not (torch.isfinite(a).all() and torch.isfinite(r).all()):
            return {"passed": False, "error": f"non-finite logits in row {b}"}
        err, scale = max(err, (a - r).abs().max().item()), max(scale, r.abs().max().item())
    first_diff = [next((i for i, (x, y) in enumerate(zip(t, rt)) if x != y), None) for t, rt in zip(tokens, ref_tokens)]
    rel = err / max(scale, 1e-30)
    return {"logit_rel_err": rel, "bound": bound, "tokens_equal": tokens == ref_tokens,
            "first_token_diff_per_row": first_diff, "passed": rel <= bound}


@torch.no_grad()
def prefill_and_generate(model: Engine | Qwen35Model, prompts: list[list[int]], gen: int,
                          max_seq_len: int) -> tuple[list[list[int]], Tensor]:
    ids, lengths = pad(prompts)
    if isinstance(model, Engine):
        logits = model.prefill(ids, lengths, model.reset(len(prompts)), all_logits=True)
        return model.generate(prompts, SamplingParams(max_new_tokens=gen)), logits.cpu()
    dev = model.device
    logits, _ = model.prefill(ids.to(dev), lengths.to(dev), model.init_state(len(prompts), max_seq_len))
    return model.generate_greedy(prompts, gen, max_seq_len), logits.cpu()


def validate_sharded(engine_dir: str | Path, prompts: list[list[int]], gen: int = 16,
                     single: str | Path | None = None, checkpoint: str | Path | None = None,
                     device: str | None = None) -> dict[str, Any]:
    """Run the comparisons above on this rank; every rank returns the report (rank 0's holds --single)."""
    eng = ShardedEngine.load(engine_dir, device)
    eng.check_prompts(prompts, gen)
    bound = LOGIT_REL_BOUND[eng.manifest.dtype]
    _, lengths = pad(prompts)
    tokens, logits = prefill_and_generate(eng, prompts, gen, eng.max_seq_len)
    report: dict[str, Any] = {"engine": str(engine_dir), "plan": eng.plan.to_dict(), "rank": eng.rank,
                              "dtype": eng.manifest.dtype, "tokens": tokens}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, tokens)
    report["ranks_agree"] = all(t == tokens for t in every)
    report["vs_sharded_reference"] = compare(tokens, logits, *prefill_and_generate(
        rank_reference(eng), prompts, gen, eng.max_seq_len), lengths, bound)
    if checkpoint is not None:
        from ..checkpoint.reader import load_model_weights

        ref = Qwen35Model(load_model_weights(checkpoint, torch.float32, device=eng.device, progress=False))
        report["vs_fp32_reference"] = compare(tokens, logits, *prefill_and_generate(
            ref, prompts, gen, eng.max_seq_len), lengths, LOGIT_REL_BOUND[eng.manifest.dtype])
        del ref
    if single is not None:
        if eng.rank == 0:
            one = Engine.load(single, device=str(eng.device))
            report["vs_single_engine"] = compare(tokens, logits, *prefill_and_generate(
                one, prompts, gen, one.max_seq_len), lengths, bound)
            del one
        dist.barrier()
    checks = [report["ranks_agree"]] + [report[k]["passed"] for k in report if k.startswith("vs_")]
    report["passed"] = all(checks)
    return report


def _prompts(engine_dir: Path, prompts_file: Path | None, n: int, gen: int, seed: int = 0) -> list[list[int]]:
    """From a prompts file, else n random prompts of unequal lengths (as `qwen35-export validate` draws them)."""
    from ..exporter.manifest import Manifest
    from ..validate.run import load_prompts, random_prompts

    if prompts_file is not None:
        return load_prompts(prompts_file)
    man = Manifest.load(engine_dir)
    return random_prompts(n, man.model_config["vocab_size"], max(1, min(man.max_seq_len - gen, 32)), seed)


def _finish(r: dict[str, Any], report: Path | None) -> int:
    """Rank 0 prints the report (and writes it); every rank leaves the group; exit status from `passed`."""
    if dist.get_rank() == 0:
        print(json.dumps({k: v for k, v in r.items() if k != "tokens"}, indent=1))
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps(r, indent=1))
    dist.destroy_process_group()
    return 0 if r["passed"] else 1


def validate_cli(a: argparse.Namespace) -> int:
    """`torchrun ... -m qwen35_export.cli validate SHARDED_ENGINE --checkpoint CKPT`: the comparisons above
    with the checkpoint's fp32 reference; `--report DIR` receives validation_sharded.json."""
    from ..errors import InputError

    if a.reference != "ours":
        raise InputError(f"--reference {a.reference}: a sharded engine is compared with our reference "
                         "(its sharded form and the fp32 model)")
    prompts = _prompts(a.engine, a.prompts, a.random, a.gen)
    r = validate_sharded(a.engine, prompts, a.gen, checkpoint=a.checkpoint, device=a.device)
    return _finish(r, a.report / "validation_sharded.json" if a.report else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qwen35_export.parallel.validate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", type=Path)
    p.add_argument("--single", type=Path, help="a 1-rank engine of the same checkpoint, loaded by rank 0")
    p.add_argument("--checkpoint", type=Path, help="also compare with the fp32 single-device reference")
    p.add_argument("--prompts", type=Path, help="one prompt per line, comma-separated token ids")
    p.add_argument("--random", type=int, default=3, help="random prompts of unequal lengths")
    p.add_argument("--gen", type=int, default=16)
    p.add_argument("--report", type=Path, help="JSON report file")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    prompts = _prompts(a.engine, a.prompts, a.random, a.gen)
    return _finish(validate_sharded(a.engine, prompts, a.gen, a.single, a.checkpoint, a.device), a.report)


if __name__ == "__main__":
    sys.exit(main())
