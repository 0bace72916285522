"""Issue 9 on several GPUs of one host: sharded engines (tensor + expert parallel over NCCL), launched with
torchrun. Written for `nvidia-h200-x2` (35B-A3B on 2 GPUs) and `nvidia-h200-x4` (397B-A17B FP8 on 4 x H200).
NOT RUN YET: no multi-GPU kind was lent when it was written (see issue 9); `smoke` runs on one GPU.

Disk and the lease's 10-minute command limit shape it: a random FP8 checkpoint of one 4-layer block of the
true geometry (3 GDN + 1 attention layers; ~27 GB at 397B, ~3.5 GB at 35B) is built into engines, and
`--layers L` loads that engine with its 4 layer files repeated to L layers. Every layer still gets its own
tensors in GPU memory (the files are read again per layer), so memory and HBM traffic per decode step are
those of the full model; only the values repeat. (A 60-layer 397B engine on disk is ~400 GB, more than the
x4 machine's 235 GB disk.) One step per command:

    python bench/multigpu.py checkpoint --preset 397b-a17b --work /tmp/mg
    python bench/multigpu.py build      --preset 397b-a17b --work /tmp/mg --gpus 4 [--engines sharded,single]
    python bench/multigpu.py run        --preset 397b-a17b --work /tmp/mg --gpus 4 --out $OUT
    python bench/multigpu.py smoke      --work /tmp/mg --out $OUT     # tiny, 2 ranks on ONE GPU over gloo

`run` launches torchrun (one process per GPU) on this file's `rank` entry, which per rank: loads the shard at
the built depth, validates it (greedy tokens and prefill logits vs the 1-rank engine, on rank 0, and vs the
eager sharded reference over the same weights), then reloads at --layers depth (default: the preset's),
validates against the eager sharded reference again, and times decode at batch 1 and 64 (CUDA graphs with
the NCCL all-reduces captured inside). On the H100/one-GPU kinds: `smoke --target h100`. Rank 0 writes multigpu_<preset>.json and .md beside the public
anchor: SGLang, 8 x H100, 165.7 tokens/s per user at batch 1.
"""

from __future__ import annotations

import os

# NVLink multicast stays off (device README / KINDS.md: a program that uses it can take the host's shared
# GPUs out of service). Set before torch/NCCL load, and inherited by every process torchrun starts.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ANCHOR = {"system": "SGLang", "hardware": "8 x H100", "batch": 1, "tokens_per_s_per_user": 165.7}
BLOCK = 4  # layers in the built checkpoint: one full block (g g g A) of the true layer pattern
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3], [100, 200, 300, 400, 17]]


def _paths(a: argparse.Namespace) -> dict[str, Path]:
    w = a.work / a.preset
    return {"ckpt": w / "ckpt", "single": w / "eng_1rank", "sharded": w / f"eng_tp{a.gpus}_ep{a.gpus}"}


# -- stages run as plain processes -------------------------------------------------------------------
def cmd_checkpoint(a: argparse.Namespace) -> None:
    from qwen35_export.checkpoint.writer import write_random_checkpoint
    from qwen35_export.config import preset

    cfg = preset(a.preset, num_hidden_layers=BLOCK, mtp_num_hidden_layers=0)
    t = time.time()
    write_random_checkpoint(cfg, _paths(a)["ckpt"], dtype="fp8", seed=0, device="cuda")
    print(f"checkpoint {a.preset} x {BLOCK} layers, fp8: {time.time() - t:.0f}s", flush=True)


def cmd_build(a: argparse.Namespace) -> None:
    from qwen35_export.exporter.build import BuildSettings, build_engine

    p = _paths(a)
    base = BuildSettings(target=a.target, dtype="fp8", max_batch=64, max_seq_len=a.max_seq_len, force=True)
    for which in a.engines.split(","):
        t = time.time()
        if which == "sharded":
            build_engine(p["ckpt"], p["sharded"], replace(base, tp=a.gpus, ep=a.gpus))
        else:
            build_engine(p["ckpt"], p["single"], base)
        print(f"{which} build (tp = ep = {a.gpus if which == 'sharded' else 1}): {time.time() - t:.0f}s", flush=True)


def _torchrun(nproc: int, args: list[str]) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}",
           str(Path(__file__).resolve()), *args]
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd, env={**os.environ, **NO_MULTICAST}).returncode


def cmd_run(a: argparse.Namespace) -> None:
    p = _paths(a)
    args = ["rank", "--engine", str(p["sharded"]), "--layers", str(a.layers or _full_layers(a.preset)),
            "--batch", a.batch, "--steps", str(a.steps), "--out", str(a.out), "--name", a.preset]
    if p["single"].is_dir():
        args += ["--single", str(p["single"])]
    sys.exit(_torchrun(a.gpus, args))


def cmd_smoke(a: argparse.Namespace) -> None:
    """Tiny engines on one GPU: two ranks share it over gloo (NCCL refuses two ranks on one GPU). Checks the
    CUDA build of graphs with collectives inside and the sharded runtime; CUDA graphs cannot capture gloo,
    so decode runs eagerly there."""
    from qwen35_export.checkpoint.writer import write_random_checkpoint
    from qwen35_export.config import preset
    from qwen35_export.exporter.build import BuildSettings, build_engine

    w = a.work / "tiny"
    ck = write_random_checkpoint(preset("tiny"), w / "ckpt", dtype="bf16", seed=1, progress=False)
    base = BuildSettings(target=a.target, dtype="bf16", max_batch=8, max_seq_len=128, force=True, progress=False)
    for name, s in (("eng_1rank", base), ("eng_tp2_ep2", replace(base, tp=2, ep=2))):
        t = time.time()
        build_engine(ck, w / name, s)
        print(f"smoke build {name}: {time.time() - t:.0f}s", flush=True)
    sys.exit(_torchrun(2, ["rank", "--engine", str(w / "eng_tp2_ep2"), "--single", str(w / "eng_1rank"),
                           "--layers", "16", "--batch", "1,8", "--steps", "20", "--out", str(a.out), "--name",
                           "smoke_tiny_1gpu", "--gloo"]))


def _full_layers(name: str) -> int:
    from qwen35_export.config import preset

    return preset(name).num_hidden_layers


# -- the per-rank entry, under torchrun -------------------------------------------------------------
def load_repeated(engine_dir: Path, layers: int, device: torch.device, cuda_graphs: bool = True):
    """The rank's ShardedEngine with the engine's BLOCK layer files repeated to `layers` layers (each a
    separate load, so separate memory); layers == the built depth loads the engine as built."""
    from qwen35_export.config import default_layer_types
    from qwen35_export.exporter.manifest import Manifest
    from qwen35_export.parallel.engine import ShardedEngine

    man = Manifest.load(engine_dir)
    built = man.model_config["num_hidden_layers"]
    man.verify_files(engine_dir, hashes=False)
    if layers != built:
        if layers % built:
            raise SystemExit(f"--layers {layers}: must be a multiple of the built depth {built}")
        reps = layers // built
        man = replace(man, model_config={**man.model_config, "num_hidden_layers": layers,
                                         "layer_types": list(default_layer_types(layers, 4))},
                      parallel={**man.parallel, "layer_files": [f * reps for f in man.parallel["layer_files"]]})
    return ShardedEngine(engine_dir, man, device, use_cuda_graphs=cuda_graphs)


def _validate(eng, single: Path | None) -> dict:
    """vs the eager sharded reference over the same tensors (every rank) and vs the 1-rank engine (rank 0)."""
    import torch.distributed as dist

    from qwen35_export.parallel.validate import (LOGIT_REL_BOUND, prefill_and_generate, compare, pad,
                                                 rank_reference)
    from qwen35_export.runtime.engine import Engine

    gen = 16
    _, lengths = pad(PROMPTS)
    tokens, logits = prefill_and_generate(eng, PROMPTS, gen, eng.max_seq_len)
    bound = LOGIT_REL_BOUND[eng.manifest.dtype]
    out = {"tokens": tokens}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, tokens)
    out["ranks_agree"] = all(t == tokens for t in every)
    out["vs_sharded_reference"] = compare(tokens, logits, *prefill_and_generate(
        rank_reference(eng), PROMPTS, gen, eng.max_seq_len), lengths, bound)
    if single is not None and eng.rank == 0:
        one = Engine.load(single, device=str(eng.device), verify_hashes=False)
        out["vs_single_engine"] = compare(tokens, logits, *prefill_and_generate(
            one, PROMPTS, gen, one.max_seq_len), lengths, bound)
        del one
        torch.cuda.empty_cache()
    dist.barrier()
    return out


def _bench_decode(eng, batch: int, steps: int, prompt_len: int = 16) -> dict:
    """Decode tokens/s at `batch` (all ranks in lockstep; CUDA graphs with the all-reduces inside, over NCCL)."""
    import torch.distributed as dist

    s = eng.reset(batch)
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, eng.cfg.vocab_size, (batch, prompt_len), generator=g)
    tok = eng.prefill(ids, torch.full((batch,), prompt_len), s).argmax(-1)
    for _ in range(3):  # warm-up; the first graphed call captures the CUDA graph of this bucket
        tok = eng.decode(tok, s).argmax(-1)
    torch.cuda.synchronize()
    dist.barrier()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(steps):
        tok = eng.decode(tok, s).argmax(-1)
    t1.record()
    torch.cuda.synchronize()
    ms = t0.elapsed_time(t1) / steps
    return {"batch": batch, "ms_per_step": ms, "tokens_per_s_per_user": 1e3 / ms,
            "tokens_per_s_total": batch * 1e3 / ms, "cuda_graphs": eng.use_cuda_graphs}


def cmd_rank(a: argparse.Namespace) -> None:
    import torch.distributed as dist

    from qwen35_export.exporter.manifest import Manifest

    local = int(os.environ.get("LOCAL_RANK", "0"))
    # smoke: every rank on GPU 0 over gloo; else one GPU per rank over NCCL
    device = torch.device("cuda", 0 if a.gloo else local)
    torch.cuda.set_device(device)
    dist.init_process_group("gloo" if a.gloo else "nccl")
    rank = dist.get_rank()
    built = Manifest.load(a.engine).model_config["num_hidden_layers"]
    res: dict = {"name": a.name, "gpus": torch.cuda.device_count(), "gpu": torch.cuda.get_device_name(device),
                 "world_size": dist.get_world_size(), "torch": torch.__version__, "anchor": ANCHOR,
                 "env": {k: os.environ.get(k) for k in NO_MULTICAST}}

    t = time.time()
    # gloo collectives sync with the host and cannot be captured: CUDA graphs only over NCCL.
    eng = load_repeated(a.engine, built, device, cuda_graphs=not a.gloo)
    res["validate_built_depth"] = {"layers": built, "load_s": time.time() - t, **_validate(eng, a.single)}
    del eng
    torch.cuda.empty_cache()

    t = time.time()
    eng = load_repeated(a.engine, a.layers, device, cuda_graphs=not a.gloo)
    res["load_full_depth"] = {"layers": a.layers, "load_s": time.time() - t,
                              "gpu_mem_gib": torch.cuda.memory_allocated(device) / 2**30}
    res["validate_full_depth"] = _validate(eng, None)
    res["decode"] = [_bench_decode(eng, b, a.steps) for b in map(int, a.batch.split(","))
                     if b <= eng.max_batch]
    res["max_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, {"rank": rank, "max_gpu_mem_gib": res["max_gpu_mem_gib"]})
    if rank == 0:
        res["per_rank_mem"] = every
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"multigpu_{a.name}.json").write_text(json.dumps(res, indent=1))
        (a.out / f"multigpu_{a.name}.md").write_text(markdown(res))
        print(markdown(res), flush=True)
    dist.destroy_process_group()


def markdown(r: dict) -> str:
    v1, vf = r["validate_built_depth"], r["validate_full_depth"]

    def ok(v: dict) -> str:
        parts = [f"ranks agree {v['ranks_agree']}"]
        for k in ("vs_single_engine", "vs_sharded_reference"):
            if k in v:
                parts.append(f"{k}: tokens equal {v[k].get('tokens_equal')}, logit rel err "
                             f"{v[k].get('logit_rel_err', float('nan')):.2e} (bound {v[k].get('bound')})")
        return "; ".join(parts)

    lines = [f"# {r['name']}: {r['world_size']} ranks on {r['gpu']} (torch {r['torch']})", "",
             f"- validate at the built depth ({v1['layers']} layers): {ok(v1)}",
             f"- validate at {r['load_full_depth']['layers']} layers: {ok(vf)}",
             f"- load {r['load_full_depth']['load_s']:.0f}s; max GPU memory {r['max_gpu_mem_gib']:.1f} GiB per rank", "",
             "| batch | ms/step | tokens/s per user | tokens/s total | CUDA graphs |", "|---|---|---|---|---|"]
    for d in r["decode"]:
        lines.append(f"| {d['batch']} | {d['ms_per_step']:.2f} | {d['tokens_per_s_per_user']:.1f} | "
                     f"{d['tokens_per_s_total']:.0f} | {d['cuda_graphs']} |")
    an = r["anchor"]
    lines += ["", f"Anchor: {an['system']} on {an['hardware']}, batch {an['batch']}: "
              f"{an['tokens_per_s_per_user']} tokens/s per user."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("checkpoint", "build", "run", "smoke"):
        s = sub.add_parser(name)
        s.add_argument("--preset", default="35b-a3b", choices=["35b-a3b", "122b-a10b", "397b-a17b"])
        s.add_argument("--work", type=Path, default=Path("/tmp/mg"))
        s.add_argument("--gpus", type=int, default=2)
        s.add_argument("--target", default="h200", choices=["h100", "h200"])
        s.add_argument("--max-seq-len", type=int, default=512)
        s.add_argument("--engines", default="sharded,single",
                       help="build: which engines, in order (the 1-rank one serves validation; one per command "
                            "if both do not fit the 10-minute limit)")
        s.add_argument("--layers", type=int, default=0, help="run: depth to repeat the block to (0: preset's)")
        s.add_argument("--batch", default="1,64")
        s.add_argument("--steps", type=int, default=50)
        s.add_argument("--out", type=Path, default=Path("bench/results"))
    r = sub.add_parser("rank")
    r.add_argument("--engine", type=Path, required=True)
    r.add_argument("--single", type=Path)
    r.add_argument("--layers", type=int, required=True)
    r.add_argument("--batch", default="1,64")
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--gloo", action="store_true", help="all ranks on GPU 0 over gloo (the one-GPU smoke test)")
    a = ap.parse_args()
    {"checkpoint": cmd_checkpoint, "build": cmd_build, "run": cmd_run, "smoke": cmd_smoke, "rank": cmd_rank}[a.cmd](a)


if __name__ == "__main__":
    main()
