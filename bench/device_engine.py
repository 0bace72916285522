"""Engine path on the GPU (run on the device): build tiny engines for h100 in BF16 and FP8, load each in a
fresh process (the way users will), compare greedy tokens with the reference, time decode; optionally a
35b-a3b FP8 build (random checkpoint written on the GPU).

    python bench/device_engine.py --out $OUT [--big 35b-a3b --big-layers 40]

Writes engine_results.json under --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, time
t = time.time()
import torch
torch.cuda.init()
t_torch = time.time() - t
t = time.time()
import onnxruntime
t_ort = time.time() - t
sys.path.insert(0, {root!r})
from qwen35_export.runtime.engine import Engine
from qwen35_export.runtime.sampling import SamplingParams
t = time.time()
e = Engine.load({engine!r}, verify_hashes={verify})
load_s = time.time() - t
prompts = {prompts!r}
res = {{"load_s": load_s, "load_parts": e.load_seconds, "import_torch_cuda_s": t_torch, "import_ort_s": t_ort}}
try:
    t = time.time()
    out = e.generate(prompts, SamplingParams(max_new_tokens={gen}))
    res["generate_s"] = time.time() - t
    res["tokens"] = out
    res["cuda_graph_error_generate"] = e.cuda_graph_error
    # The same prompts decoded eagerly (no CUDA graphs): graph replay must not change a token.
    e.use_cuda_graphs = False
    res["tokens_eager"] = e.generate(prompts, SamplingParams(max_new_tokens={gen}))
    e.use_cuda_graphs = e.cuda_graph_error is None
except Exception as ex:
    import traceback
    res["error"] = traceback.format_exc()[-3000:]
    print(json.dumps(res)); sys.exit(0)
# decode speed with CUDA graphs at batch 1 and 8
speeds = {{}}
for B in {batches!r}:
    if B > e.max_batch: continue
    s = e.reset(B)
    ids = torch.randint(0, e.cfg.vocab_size, (B, 16))
    logits = e.prefill(ids, torch.full((B,), 16), s)
    tok = logits.argmax(-1)
    for _ in range(3): tok = e.decode(tok, s).argmax(-1)
    torch.cuda.synchronize()
    n = {steps}
    t0 = torch.cuda.Event(enable_timing=True); t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(n): tok = e.decode(tok, s).argmax(-1)
    t1.record(); torch.cuda.synchronize()
    ms = t0.elapsed_time(t1) / n
    speeds[B] = {{"ms_per_step": ms, "tokens_per_s": B * 1e3 / ms}}
res["decode"] = speeds
res["cuda_graph_error"] = e.cuda_graph_error
if e.cuda_graph_error:
    # Which graph breaks the capture: capture each graph's decode call on its own.
    probe = {{}}
    orig = dict(e.graphs)
    def wrap(name, fn):
        def run(*args):
            if name in probe:
                return fn(*args)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(g):
                    fn(*args)
                probe[name] = "ok"
            except Exception as ex:
                probe[name] = repr(ex)[:400]
            torch.cuda.synchronize()
            return fn(*args)
        return run
    for name, fn in orig.items():
        e.graphs[name] = wrap(name, fn)
    s = e.reset(1)
    try:
        e._decode_eager(torch.zeros(1, dtype=torch.int64, device="cuda"), s)
    except Exception as ex:
        probe["_decode"] = repr(ex)[:400]
    e.graphs.update(orig)
    res["capture_probe"] = probe
# per-layer diagnosis of the prefill: engine hidden states vs the reference (bf16 and fp32) per row
if {diag}:
    from qwen35_export.checkpoint.reader import load_model_weights
    from qwen35_export.model.model import Qwen35Model
    B = len(prompts); T = max(map(len, prompts))
    ids = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts): ids[b, :len(p)] = torch.tensor(p)
    lens = torch.tensor([len(p) for p in prompts])
    hs = {{}}
    def hook(i, x): hs[i] = x.float().clone()
    lg = e.prefill(ids, lens, e.reset(B), all_logits=True, hook=hook)
    diag = {{}}
    for rd in (torch.float32, torch.bfloat16):
        m = Qwen35Model(load_model_weights({ckpt!r}, rd, device="cuda", progress=False))
        rs = {{}}
        def rhook(i, x): rs[i] = x.float().clone()
        rl, _ = m.prefill(ids.cuda(), lens.cuda(), m.init_state(B, 64), hook=rhook)
        rows = []
        for b in range(B):
            n = int(lens[b])
            rows.append([float((hs[i][b, :n] - rs[i][b, :n]).norm() / rs[i][b, :n].norm()) for i in sorted(hs)]
                        + [float((lg[b, :n].float() - rl[b, :n].float()).abs().max())])
        diag[str(rd)] = rows
    res["diag"] = diag
res["cuda_graphs"] = e.use_cuda_graphs
res["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
print(json.dumps(res))
"""


def child(engine: Path, prompts, gen: int, batches, steps: int, verify: bool = True, ckpt: Path | None = None) -> dict:
    code = CHILD.format(root=str(ROOT), engine=str(engine), prompts=prompts, gen=gen, batches=batches,
                        steps=steps, verify=verify, diag=ckpt is not None, ckpt=str(ckpt))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    last = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not last:
        return {"error": f"rc={p.returncode}", "stderr": p.stderr[-3000:]}
    return json.loads(last[-1])


def agree(a: list[list[int]], b: list[list[int]]) -> float:
    n = sum(len(x) for x in a)
    return sum(int(p == q) for x, y in zip(a, b) for p, q in zip(x, y)) / max(n, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/q35"))
    ap.add_argument("--big", default=None)
    ap.add_argument("--big-layers", type=int, default=40)
    ap.add_argument("--big-work", type=Path, default=Path("/dev/shm/q35big"))
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--dtypes", default="bf16,fp8")
    ap.add_argument("--target", default="h100", choices=["h100", "h200"])
    ap.add_argument("--tag", default="", help="suffix of the results file (engine_results{tag}.json)")
    a = ap.parse_args()
    from qwen35_export.checkpoint.reader import load_model_weights
    from qwen35_export.checkpoint.writer import write_random_checkpoint
    from qwen35_export.config import preset
    from qwen35_export.exporter.build import BuildSettings, build_engine
    from qwen35_export.model.model import Qwen35Model

    a.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [100, 200, 300, 400, 17]]
    gen = 64
    if not a.skip_tiny:
        for dtype in a.dtypes.split(","):
            ck = a.work / f"tiny_{dtype}"
            write_random_checkpoint(preset("tiny"), ck, dtype=dtype, progress=False)
            eng = a.work / f"eng_{dtype}"
            t = time.time()
            try:
                build_engine(ck, eng, BuildSettings(target=a.target, dtype=dtype, max_batch=8, max_seq_len=256, jobs=6,
                                                        kernels=a.kernels))
            except Exception as ex:
                results[f"tiny_{dtype}"] = {"build_error": repr(ex)[-6000:]}
                print("BUILD FAILED", dtype, repr(ex)[-6000:], flush=True)
                continue
            build_s = time.time() - t
            r = child(eng, prompts, gen, [1, 8], 50, ckpt=ck)
            r["build_s"] = build_s
            # references: our model in fp32 (dequantised FP8 for fp8) and in bf16, on the GPU
            for rd, name in ((torch.float32, "ref_fp32"), (torch.bfloat16, "ref_bf16")):
                m = Qwen35Model(load_model_weights(ck, rd, keep_fp8=False, device="cuda", progress=False))
                ref = m.generate_greedy(prompts, gen)
                if "tokens" in r:
                    r[f"agree_{name}"] = agree(r["tokens"], ref)
                    r[f"first_diff_{name}"] = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
                                               for x, y in zip(r["tokens"], ref)]
            if "tokens" in r:
                r["agree_graph_vs_eager"] = agree(r["tokens"], r["tokens_eager"])
            results[f"tiny_{dtype}"] = r
            print(dtype, json.dumps({k: v for k, v in r.items() if not k.startswith("tokens")}), flush=True)
    if a.big:
        shutil.rmtree(a.big_work, ignore_errors=True)
        cfg = preset(a.big)
        if a.big_layers != cfg.num_hidden_layers:
            cfg = cfg.replace(num_hidden_layers=a.big_layers)
        t = time.time()
        ck = a.big_work / "ckpt"
        write_random_checkpoint(cfg, ck, dtype="fp8", device="cuda", progress=False)
        write_s = time.time() - t
        eng = a.work / "eng_big"
        t = time.time()
        try:
            build_engine(ck, eng, BuildSettings(target=a.target, dtype="fp8", max_batch=8, max_seq_len=1024, jobs=6,
                                                      kernels=a.kernels))
            build_s = time.time() - t
            size = sum(p.stat().st_size for p in eng.rglob("*") if p.is_file())
            r = child(eng, [[1, 2, 3, 4, 5, 6, 7, 8]], 16, [1, 8], 20, verify=False)
            r.update(build_s=build_s, write_s=write_s, engine_gib=size / 2**30, layers=cfg.num_hidden_layers,
                     peak_host_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                     build_gpu_mem_gib=torch.cuda.max_memory_allocated() / 2**30)
        except Exception as ex:
            r = {"build_error": repr(ex)[:3000], "write_s": write_s}
        results["big"] = r
        print("big", json.dumps({k: v for k, v in r.items() if k != "tokens"}), flush=True)
        shutil.rmtree(a.big_work, ignore_errors=True)
    (a.out / f"engine_results{a.tag}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
