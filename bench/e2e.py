"""End-to-end comparison on one GPU (run on the device): our engine (FP8, BF16) vs transformers eager
(with fla's GDN kernels when carried) vs torch.compile of the transformers model, same random checkpoint.

    python bench/e2e.py --out $OUT --preset 35b-a3b --layers 8 --target h200 --work DIR \
        --systems ours-fp8,ours-bf16,hf-eager,hf-compile

DIR holds the BF16 checkpoint (`ckpt/`) and our engines (`eng_bf16/`, `eng_fp8/`: FP8 = the BF16 weights
quantised at build); what is there already is reused (bench/device_35b.sh builds and validates them).

Each system runs in its own process (memory, and one crash must not take the run down). Decode ms/step at
batch 1/8/64 after a 512-token prompt, prefill of 512 and 8192 tokens at batch 1. Results: e2e.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DECODE_BATCHES = (1, 8, 64)
PROMPT = 512
PREFILL_LENS = (512, 8192)
STEPS = 24


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def _time(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        a, b = _events()
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def run_ours(ckpt: Path, work: Path, dtype: str, profile: bool, target: str, checks: Path | None = None) -> dict:
    """Time our engine; with `checks`, the same loaded engine then goes through the padded-bucket CUDA-graph
    check (check_graph_padding.py) and `validate` against our fp32 reference (report under `checks`): one
    engine load (~1 min for 8 layers of 35B) instead of three."""
    from qwen35_export.exporter.build import BuildSettings, build_engine
    from dataclasses import asdict

    from qwen35_export.runtime.bench import (decode_step_bytes, hbm_bandwidth, layer_times, profile_decode,
                                             profile_prefill)
    from qwen35_export.runtime.engine import Engine

    eng_dir = work / f"eng_{dtype}"
    t = time.time()
    if not (eng_dir / "manifest.json").exists():
        build_engine(ckpt, eng_dir, BuildSettings(target=target, dtype=dtype, max_batch=max(DECODE_BATCHES),
                                                  max_seq_len=max(PREFILL_LENS) + 64, progress=False, jobs=6))
    build_s = time.time() - t
    t = time.time()
    eng = Engine.load(eng_dir, verify_hashes=False)
    res: dict = {"build_s": build_s, "load_s": time.time() - t, "decode": {}, "prefill": {},
                 "substitutions": {k: g.substitutions for k, g in eng.manifest.graphs.items()}}
    bw = hbm_bandwidth(eng.device)
    g = torch.Generator().manual_seed(0)
    for B in DECODE_BATCHES:
        ids = torch.randint(0, eng.cfg.vocab_size, (B, PROMPT), generator=g)
        s = eng.reset(B)
        tok = eng.prefill(ids, torch.full((B,), PROMPT), s).argmax(-1)

        def step():
            nonlocal tok
            for _ in range(STEPS):
                tok = eng.decode(tok, s).argmax(-1)

        ms = _time(step, 1) / STEPS
        nbytes = decode_step_bytes(eng, B, PROMPT + STEPS)["total"]
        res["decode"][B] = {"ms_per_step": ms, "tokens_per_s": B * 1e3 / ms, "step_bytes": nbytes,
                            "hbm_pct": nbytes / bw / (ms / 1e3) * 100 if bw else None}
        print(f"ours-{dtype} decode B={B}: {ms:.3f} ms/step", flush=True)
    res["cuda_graphs"] = eng.use_cuda_graphs
    for L in PREFILL_LENS:
        ids = torch.randint(0, eng.cfg.vocab_size, (1, L), generator=g)
        ms = _time(lambda: eng.prefill(ids, torch.tensor([L]), eng.reset(1)))
        res["prefill"][L] = {"ms": ms, "tokens_per_s": L * 1e3 / ms}
        print(f"ours-{dtype} prefill T={L}: {ms:.2f} ms", flush=True)
    res["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    res["layers"] = [asdict(r) for r in layer_times(eng, list(DECODE_BATCHES), list(PREFILL_LENS), PROMPT)]
    if profile:  # kernels of an eager decode step (a CUDA-graph replay hides them from the profiler)
        prof = profile_decode(eng, batch=1, context=16)
        res["profile_top"], res["profile_total_us"] = prof["top"], prof["total_us"]
        pp = profile_prefill(eng, max(PREFILL_LENS))
        res["profile_prefill_top"], res["profile_prefill_total_us"] = pp["top"], pp["total_us"]
    if checks is not None:
        from check_graph_padding import check_padding
        from qwen35_export.validate.run import validate

        checks.mkdir(parents=True, exist_ok=True)
        res["padding"] = check_padding(eng)
        print(f"ours-{dtype} padded buckets: {'PASS' if res['padding']['pass'] else 'FAIL'}", flush=True)
        eng.use_cuda_graphs = True
        r = validate(eng, ckpt, reference="ours", random_n=2, gen=32, report_dir=checks / dtype, progress=False)
        res["validate"] = {"passed": r.passed, "headline": r.headline(), "seconds": r.seconds}
        print(f"ours-{dtype} validate: {r.headline()}", flush=True)
    return res


def run_hf(ckpt: Path, compile_: bool) -> dict:
    from transformers import Qwen3_5MoeForCausalLM

    try:
        import fla  # noqa: F401
        have_fla = True
    except ImportError:
        have_fla = False
    model = Qwen3_5MoeForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
    fwd = torch.compile(model) if compile_ else model
    res: dict = {"fla": have_fla, "decode": {}, "prefill": {}}
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    with torch.no_grad():
        for B in DECODE_BATCHES:
            ids = torch.randint(0, V, (B, PROMPT), generator=g).cuda()
            out = fwd(input_ids=ids, use_cache=True)
            pkv, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

            def step():
                nonlocal pkv, tok
                for _ in range(STEPS):
                    o = fwd(input_ids=tok, past_key_values=pkv, use_cache=True)
                    pkv, tok = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)

            t0 = time.time()
            ms = _time(step, 1) / STEPS
            res["decode"][B] = {"ms_per_step": ms, "tokens_per_s": B * 1e3 / ms, "wall_s": time.time() - t0}
            print(f"hf{'-compile' if compile_ else ''} decode B={B}: {ms:.3f} ms/step", flush=True)
        for L in PREFILL_LENS:
            ids = torch.randint(0, V, (1, L), generator=g).cuda()
            ms = _time(lambda: fwd(input_ids=ids, use_cache=True), 2)
            res["prefill"][L] = {"ms": ms, "tokens_per_s": L * 1e3 / ms}
            print(f"hf{'-compile' if compile_ else ''} prefill T={L}: {ms:.2f} ms", flush=True)
    res["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="35b-a3b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--systems", default="ours-fp8,ours-bf16,hf-eager,hf-compile")
    ap.add_argument("--work", type=Path, default=Path("/dev/shm/q35e2e"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--target", default="h100", choices=["h100", "h200"])
    ap.add_argument("--checks", type=Path, default=None,
                    help="after timing ours: padded-bucket CUDA-graph check + validate, reports under this dir")
    a = ap.parse_args()
    ckpt_bf16 = a.work / "ckpt"
    if a.one:
        if a.one.startswith("ours"):
            dtype = a.one.split("-")[1]
            r = run_ours(ckpt_bf16, a.work, dtype, profile=True, target=a.target, checks=a.checks)
        else:
            r = run_hf(ckpt_bf16, a.one == "hf-compile")
        print("RESULT " + json.dumps(r))
        return
    from qwen35_export.checkpoint.writer import write_random_checkpoint
    from qwen35_export.config import preset

    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    cfg = preset(a.preset)
    if a.layers != cfg.num_hidden_layers:
        cfg = cfg.replace(num_hidden_layers=a.layers)
    cfg = cfg.replace(mtp_num_hidden_layers=0)
    t = time.time()
    if not (ckpt_bf16 / "config.json").exists():
        write_random_checkpoint(cfg, ckpt_bf16, dtype="bf16", device="cuda", progress=False)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": a.preset,
               "layers": a.layers, "of_layers": preset(a.preset).num_hidden_layers, "write_s": time.time() - t,
               "steps": STEPS, "prompt": PROMPT}
    for sysname in filter(None, a.systems.split(",")):  # --systems "": write the checkpoint only
        t = time.time()
        try:
            p = subprocess.run([sys.executable, __file__, "--out", str(a.out), "--work", str(a.work), "--preset",
                                a.preset, "--layers", str(a.layers), "--target", a.target, "--one", sysname]
                               + (["--checks", str(a.checks)] if a.checks else []),
                               capture_output=True, text=True, timeout=a.timeout)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            results[sysname] = json.loads(line[-1][7:]) if line else {"error": p.stderr[-3000:]}
        except subprocess.TimeoutExpired as e:
            results[sysname] = {"error": f"timeout after {a.timeout}s", "stdout": (e.stdout or b"")[-2000:].decode()
                                if isinstance(e.stdout, bytes) else str(e.stdout)[-2000:]}
        results[sysname]["wall_s"] = time.time() - t
        print(sysname, json.dumps(results[sysname])[:1500], flush=True)
        (a.out / "e2e.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
