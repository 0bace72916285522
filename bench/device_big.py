"""A full-geometry engine on the GPU (run on the device): random checkpoint written there, engine built,
loaded in a fresh process, generated with, benchmarked and its decode step profiled.

    python3 bench/device_big.py --out $OUT --preset 35b-a3b --dtype fp8 --target h200

Build numbers (time per stage, engine size, peak host RSS of the build process, peak GPU memory seen by
nvidia-smi while it ran) and the run numbers go to big_<preset>_<dtype>.json under --out, with the bench
plot beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUILD = r"""
import sys, time, json, torch
sys.path.insert(0, {root!r})
from qwen35_export.exporter.build import BuildSettings, build_engine
t = time.time()
build_engine({ckpt!r}, {eng!r}, BuildSettings(target={target!r}, dtype={dtype!r}, max_batch={max_batch},
             max_seq_len={max_seq_len}, jobs=6, progress=False))
print(json.dumps({{"build_s": time.time() - t,
                  "build_torch_gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30}}))
"""

RUN = r"""
import cProfile, io, json, pstats, sys, time, torch
sys.path.insert(0, {root!r})
from dataclasses import asdict
from qwen35_export.runtime.engine import Engine
from qwen35_export.runtime.sampling import SamplingParams
from qwen35_export.runtime.bench import (bench_engine, decode_step_bytes, environment, hbm_bandwidth, layer_times,
                                         plot_rows, profile_decode)
res = {{}}
prof = cProfile.Profile()
t = time.time()
prof.enable()
e = Engine.load({eng!r}, verify_hashes=False)
prof.disable()
res["load_s"] = time.time() - t
res["load_parts"] = e.load_seconds
s = io.StringIO()
pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
res["load_profile"] = s.getvalue()[-6000:]
t = time.time()
out = e.generate([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11]], SamplingParams(max_new_tokens=16))
res["generate_s"] = time.time() - t
res["tokens"] = out
res["cuda_graph_error"] = e.cuda_graph_error
res["layers"] = [asdict(r) for r in layer_times(e, {batches!r}, [2048, 8192])]
if {quick!r}:
    print("RESULT " + json.dumps(res))
    sys.exit(0)
rows = bench_engine(e, {batches!r}, [512], 128)
rows += bench_engine(e, [1], [8192], 128)
res["bench"] = [asdict(r) for r in rows]
res["env"] = environment(e.device)
res["step_bytes_b1_ctx576"] = decode_step_bytes(e, 1, 576)
plot_rows(rows, __import__("pathlib").Path({plot!r}), "{preset} {dtype} on " + res["env"]["gpu"])
# Kernels of eager decode steps at batch 1 (a CUDA-graph replay hides them from the profiler).
res["decode_profile"] = profile_decode(e, batch=1, context=512)
res["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
print("RESULT " + json.dumps(res))
"""


def poll_gpu_mem(stop: threading.Event, seen: list[int]) -> None:
    while not stop.is_set():
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=5).stdout.split()
            seen.append(int(q[0]))
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
        stop.wait(1.0)


def child(code: str, timeout: int) -> tuple[dict, str]:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{") or ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return {"error": f"rc={p.returncode}", "stderr": p.stderr[-4000:]}, p.stdout
    return json.loads(lines[-1].removeprefix("RESULT ")), p.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="35b-a3b")
    ap.add_argument("--layers", type=int, default=0, help="0: the preset's own layer count")
    ap.add_argument("--dtype", default="fp8")
    ap.add_argument("--target", default="h200")
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/q35big_ckpt"))
    ap.add_argument("--engine", type=Path, default=Path("/dev/shm/q35big_engine"))
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=8448)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--layer-types", default="", help="comma list, e.g. linear_attention,full_attention")
    ap.add_argument("--set", default="", help="config overrides k=v,k=v (ints), e.g. one rank's shard shape")
    ap.add_argument("--tag", default="")
    ap.add_argument("--quick", action="store_true", help="after loading, per-layer times only (no bench/profile)")
    ap.add_argument("--run-after", type=Path, help="build at once, but time only once this file exists (two "
                    "device_big runs built side by side must not time at the same moment)")
    ap.add_argument("--done-flag", type=Path, help="touched when this run is over, whatever happened")
    a = ap.parse_args()
    try:
        run(a)
    finally:
        if a.done_flag:
            a.done_flag.touch()


def run(a: argparse.Namespace) -> None:
    import torch

    from qwen35_export.checkpoint.writer import write_random_checkpoint
    from qwen35_export.config import param_counts, preset

    a.out.mkdir(parents=True, exist_ok=True)
    cfg = preset(a.preset)
    if a.layers:
        cfg = cfg.replace(num_hidden_layers=a.layers)
    if a.layer_types:
        cfg = cfg.replace(layer_types=tuple(a.layer_types.split(",")))
    if a.set:
        cfg = cfg.replace(**{k: int(v) for k, v in (kv.split("=") for kv in a.set.split(","))})
    cfg.validate()
    res: dict = {"preset": a.preset, "layers": cfg.num_hidden_layers, "dtype": a.dtype, "target": a.target,
                 "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "params": param_counts(cfg).__dict__, "layer_types": list(cfg.layer_types),
                 "overrides": a.set}
    tag = f"big_{a.preset}_{a.dtype}{a.tag}"
    shutil.rmtree(a.ckpt, ignore_errors=True)
    shutil.rmtree(a.engine, ignore_errors=True)
    t = time.time()
    write_random_checkpoint(cfg, a.ckpt, dtype=a.dtype, device="cuda", progress=False)
    res["write_ckpt_s"] = time.time() - t
    res["ckpt_gib"] = sum(p.stat().st_size for p in a.ckpt.rglob("*") if p.is_file()) / 2**30
    torch.cuda.empty_cache()
    print("checkpoint", res["write_ckpt_s"], res["ckpt_gib"], flush=True)
    save = lambda: (a.out / f"{tag}.json").write_text(json.dumps(res, indent=1))  # noqa: E731
    save()

    stop, seen = threading.Event(), []
    th = threading.Thread(target=poll_gpu_mem, args=(stop, seen), daemon=True)
    th.start()
    code = BUILD.format(root=str(ROOT), ckpt=str(a.ckpt), eng=str(a.engine), target=a.target, dtype=a.dtype,
                        max_batch=a.max_batch, max_seq_len=a.max_seq_len)
    r, log = child(code, 420)
    stop.set()
    res.update(r)
    res["build_log_tail"] = log[-3000:]
    res["build_peak_host_rss_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    res["build_peak_gpu_used_gib_nvidia_smi"] = max(seen, default=0) / 1024
    if a.engine.exists():
        res["engine_gib"] = sum(p.stat().st_size for p in a.engine.rglob("*") if p.is_file()) / 2**30
    print("build", json.dumps({k: v for k, v in res.items() if k != "build_log_tail"}), flush=True)
    shutil.rmtree(a.ckpt, ignore_errors=True)
    save()
    t = time.time()
    while a.run_after and not a.run_after.exists() and time.time() - t < 480:
        time.sleep(1)
    if "error" not in r:
        code = RUN.format(root=str(ROOT), eng=str(a.engine), batches=[int(b) for b in a.batches.split(",")],
                          plot=str(a.out / f"{tag}.png"), preset=a.preset, dtype=a.dtype,
                          quick=a.quick)
        r, log = child(code, 480)
        res["run"] = r
        print(log[-6000:])
    save()


if __name__ == "__main__":
    main()
