"""Command line: argument parsing only; each command calls one function of the package."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import InputError, Qwen35Error


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, found {s!r}") from None


def cmd_init_checkpoint(a: argparse.Namespace) -> int:
    from .checkpoint.writer import write_random_checkpoint
    from .config import preset

    cfg = preset(a.preset)
    if a.layers:
        if a.layers < 1:
            raise InputError(f"--layers: expected a positive layer count, found {a.layers}")
        # the preset's full geometry at a reduced depth (the layer pattern restarts: 3 GDN + 1 attention)
        cfg = cfg.replace(num_hidden_layers=a.layers)
    if a.text_only:
        cfg = cfg.replace(model_type="qwen3_5_moe_text")
    out = write_random_checkpoint(cfg, a.out, dtype=a.dtype, seed=a.seed, max_shard_size=a.max_shard_mb << 20,
                                  expert_layout=a.expert_layout, device=a.device)
    print(f"wrote random {a.preset} checkpoint ({a.dtype}) to {out}")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from .checkpoint.info import checkpoint_summary

    print(checkpoint_summary(a.checkpoint))
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from .checkpoint.reader import CheckpointReader, load_model_weights
    from .model.model import Qwen35Model

    import torch

    vocab = CheckpointReader(a.checkpoint).config.vocab_size  # headers only: check the input before loading
    if not a.token_ids:
        raise InputError("--token-ids: the prompt is empty")
    bad = [t for t in a.token_ids if not 0 <= t < vocab]
    if bad:
        raise InputError(f"--token-ids: token id {bad[0]} out of range [0, {vocab})")
    if a.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens: max_new_tokens expected >= 1, found {a.max_new_tokens}")
    m = Qwen35Model(load_model_weights(a.checkpoint, torch.float32))
    out = m.generate_greedy([a.token_ids], a.max_new_tokens)[0]
    print("reference greedy tokens:", ",".join(map(str, out)))
    return 0


def cmd_build(a: argparse.Namespace) -> int:
    from .exporter.build import BuildSettings, build_engine

    settings = BuildSettings(target=a.target, dtype=a.dtype, max_batch=a.max_batch, max_seq_len=a.max_seq_len,
                             dump_graphs=a.dump_graphs, force=a.force, backend=a.backend,
                             kernels=a.kernels, tp=a.tp, ep=a.ep, fuse_projections=not a.no_fuse_projections,
                             fused_route=a.fused_route, batch1_decode=a.batch1_decode, jobs=a.jobs)
    if a.backend == "aoti":
        build_engine(a.checkpoint, a.out, settings)
    else:
        from .plugins.build import build_backend_engine

        build_backend_engine(a.checkpoint, a.out, settings)
    if a.validate:
        from .validate.run import validate_after_build

        return validate_after_build(a.out, a.checkpoint)
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .runtime.inspect import inspect_engine

    print(inspect_engine(a.engine))
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from .runtime.cli_run import run_prompt

    return run_prompt(a.engine, prompt=a.prompt, token_ids=a.token_ids, max_new_tokens=a.max_new_tokens,
                      temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, device=a.device)


def cmd_validate(a: argparse.Namespace) -> int:
    from .exporter.manifest import Manifest

    if Manifest.load(a.engine).parallel is not None:  # sharded: one process per rank, under torchrun
        from .parallel.validate import validate_cli as validate_sharded_cli

        return validate_sharded_cli(a)
    from .validate.run import validate_cli

    return validate_cli(a)


def cmd_bench(a: argparse.Namespace) -> int:
    from .runtime.bench import bench_cli

    return bench_cli(a)


def cmd_quickstart(a: argparse.Namespace) -> int:
    from .quickstart import quickstart

    return quickstart(a.workdir, a.target)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen35-export", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("quickstart", help="the main job on the built-in tiny checkpoint: write, build, run, validate")
    s.add_argument("--workdir", type=Path, default=Path("qwen35-quickstart"))
    s.add_argument("--target", default="cpu", choices=["cpu", "h100", "h200"])
    s.set_defaults(fn=cmd_quickstart)

    s = sub.add_parser("init-checkpoint", help="write a random checkpoint in the shipped HF layout")
    s.add_argument("--preset", default="tiny", choices=["tiny", "35b-a3b", "122b-a10b", "397b-a17b"])
    s.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8"])
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--expert-layout", choices=["fused", "per_expert"], default=None)
    s.add_argument("--max-shard-mb", type=int, default=5120)
    s.add_argument("--layers", type=int, default=0, help="depth (default: the preset's); full geometry otherwise")
    s.add_argument("--text-only", action="store_true", help="flat qwen3_5_moe_text config, `model.` prefix")
    s.add_argument("--device", default="cpu", help="where random values are drawn (cuda is faster at size)")
    s.set_defaults(fn=cmd_init_checkpoint)

    s = sub.add_parser("info", help="summarise a checkpoint: config, parameter counts, layer pattern, dtypes")
    s.add_argument("checkpoint", type=Path)
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("generate", help="greedy generation with the PyTorch reference model (fp32, CPU)")
    s.add_argument("checkpoint", type=Path)
    s.add_argument("--token-ids", type=_int_list, default=[1, 2, 3])
    s.add_argument("--max-new-tokens", type=int, default=8)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("build", help="export + compile an engine directory")
    s.add_argument("checkpoint", type=Path)
    s.add_argument("--target", required=True, choices=["h100", "h200", "cpu"])
    s.add_argument("--backend", default="aoti", choices=["aoti", "onnxruntime", "tensorrt", "torch-tensorrt"])
    s.add_argument("--dtype", default=None, choices=["fp8", "bf16", "fp32"],
                   help="default: fp32 on cpu, bf16 on GPU targets (fp8 when the checkpoint is FP8)")
    s.add_argument("--max-batch", type=int, default=8)
    s.add_argument("--max-seq-len", type=int, default=512)
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--kernels", default="auto", choices=["auto", "triton", "reference"],
                   help="implementations of the custom ops (auto: Triton on GPU targets, references on cpu)")
    s.add_argument("--dump-graphs", action="store_true")
    s.add_argument("--force", action="store_true", help="replace an existing engine directory")
    s.add_argument("--validate", action="store_true", help="run a short validate and record it in the manifest")
    s.add_argument("--no-fuse-projections", action="store_true",
                   help="keep every projection its own GEMM and the shared expert outside the MoE op")
    s.add_argument("--no-fused-route", dest="fused_route", action="store_false",
                   help="GPU targets: keep the decode graphs' MoE routing op by op instead of the two fused "
                   "Triton kernels (the default)")
    s.add_argument("--batch1-decode", dest="batch1_decode", action=argparse.BooleanOptionalAction, default=None,
                   help="also compile each layer's decode graph for a static batch of 1, used for batch-1 steps "
                   "(default: on for GPU targets, off for cpu)")
    s.add_argument("--jobs", type=int, default=0, help="graphs compiled at once, each in its own process (0: one "
                   "per 4 CPU cores, at most one per graph)")
    s.add_argument("--tp", type=int, default=1, help="ranks the attention/GDN heads are split over (1 or N)")
    s.add_argument("--ep", type=int, default=1, help="ranks the routed experts are split over (1 or N); a "
                   "sharded engine runs under `torchrun --nproc-per-node N`")
    s.set_defaults(fn=cmd_build)

    s = sub.add_parser("inspect", help="show an engine's manifest, layer plan and op substitutions")
    s.add_argument("engine", type=Path)
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("run", help="generate with a compiled engine")
    s.add_argument("engine", type=Path)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--token-ids", type=_int_list)
    s.add_argument("--max-new-tokens", type=int, default=16)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("validate", help="compare an engine with the PyTorch reference")
    s.add_argument("engine", type=Path)
    s.add_argument("--checkpoint", required=True, type=Path)
    s.add_argument("--reference", default="ours", choices=["ours", "transformers"])
    s.add_argument("--reference-mode", default="auto", choices=["auto", "whole", "stream"],
                   help="auto: the whole fp32 reference when it fits on the engine's device, else one layer "
                   "at a time (stream; --reference ours only)")
    s.add_argument("--prompts", type=Path)
    s.add_argument("--random", type=int, default=3)
    s.add_argument("--gen", type=int, default=16)
    s.add_argument("--report", type=Path)
    s.add_argument("--device", default=None)
    s.set_defaults(fn=cmd_validate)

    s = sub.add_parser("bench", help="time prefill and decode of an engine")
    s.add_argument("engine", type=Path)
    s.add_argument("--batch", type=_int_list, default=[1, 8, 64])
    s.add_argument("--prompt-len", type=_int_list, default=[512])
    s.add_argument("--gen", type=int, default=128)
    s.add_argument("--json", type=Path)
    s.add_argument("--plot", type=Path)
    s.add_argument("--profile", action="store_true",
                   help="also profile eager decode steps at the first --batch and one prefill of the longest "
                        "--prompt-len (batch 1): top kernels, time, launches")
    s.add_argument("--per-layer", action="store_true",
                   help="also time each graph alone (GDN, attention, embed, head) per batch and prompt length")
    s.add_argument("--device", default=None)
    s.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun every rank runs the command; rank 0 prints
        sys.stdout = open(os.devnull, "w")
    try:
        return int(args.fn(args) or 0)
    except Qwen35Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
