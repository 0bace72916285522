"""End-to-end comparison on one GPU (run on the device): our engine (FP8, BF16) vs transformers eager
(with fla's GDN kernels when carried) vs torch.compile of the transformers model, same random checkpoint.

    python bench/e2e.py --out $OUT --preset 35b-a3b --layers 8 --target h200 --work DIR \
        --systems ours-fp8,ours-bf16,hf-eager,hf-compile \
        [--hf-batches 1,8,64] [--hf-prefill 512,8192] [--hf-compile-mode MODE] [--hf-wait FILE]

DIR holds the BF16 checkpoint (`ckpt/`) and our engines (`eng_bf16/`, `eng_fp8/`: FP8 = the BF16 weights
quantised at build); what is there already is reused (bench/device_35b.sh builds and validates them).

Each system runs in its own process (memory, and one crash must not take the run down). Decode ms/step at
batch 1/8/64 after a 512-token prompt, prefill of 512 and 8192 tokens at batch 1. Results: e2e.json. Every
measurement is printed as it is taken; a child that times out keeps what it printed (parse_progress).

hf-compile first runs everything it will time once (the compiles: prefill, then decode recompiling as the KV
length changes; per-shape wall seconds in `warmup_s`), then times it. With --hf-wait FILE it writes
FILE.ready after that warm-up and waits for FILE before timing, so the compiles can overlap other work (our
engine builds, bench/device_measure.sh HF_COMPILE=1) while the timing runs on an idle GPU.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
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


HF_WAIT_POLL_S = 0.5
# One printed measurement: "<system> decode B=8: 1.234 ms/step", "<system> prefill T=512: 5.67 ms", and the
# warm-up (compile) walls "<system> warm-up decode B=8: 93.1 s" / "<system> warm-up prefill T=512: 40.2 s".
_LINE = re.compile(r"^\S+ (?P<warm>warm-up )?(?P<kind>decode B|prefill T)=(?P<n>\d+): (?P<v>[0-9.]+) "
                   r"(?P<unit>ms/step|ms|s)$")


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def _time(fn, repeats: int = 3, device: str = "cuda") -> float:
    """Median ms of `repeats` calls of fn after one untimed call (CUDA events; wall clock off CUDA)."""
    cuda = torch.device(device).type == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        if not cuda:
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
            continue
        a, b = _events()
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def parse_progress(text: str) -> dict:
    """The measurements a child printed so far (what survives a timeout): decode {B: {ms_per_step,
    tokens_per_s}}, prefill {T: {ms, tokens_per_s}}, and warmup_s {"decode": {B: s}, "prefill": {T: s}} where
    warm-up lines were printed. The last line of a shape wins."""
    res: dict = {"decode": {}, "prefill": {}}
    warm: dict = {"decode": {}, "prefill": {}}
    for ln in text.splitlines():
        m = _LINE.match(ln.strip())
        if m is None:
            continue
        n, v, kind = int(m["n"]), float(m["v"]), "decode" if m["kind"] == "decode B" else "prefill"
        if m["warm"]:
            if m["unit"] == "s":
                warm[kind][n] = v
        elif kind == "decode" and m["unit"] == "ms/step":
            res["decode"][n] = {"ms_per_step": v, "tokens_per_s": n * 1e3 / v if v else None}
        elif kind == "prefill" and m["unit"] == "ms":
            res["prefill"][n] = {"ms": v, "tokens_per_s": n * 1e3 / v if v else None}
    if warm["decode"] or warm["prefill"]:
        res["warmup_s"] = warm
    return res


VALIDATE_WIDE = 40  # prompts of the second validate run (--checks): one batch past every small bucket


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
        # one row: the static batch-1 decode graphs (exporter/capture.py DECODE1), which engines use at batch 1
        if any(g.phase == "decode1" for g in eng.manifest.graphs.values()):
            r = validate(eng, ckpt, reference="ours", random_n=1, gen=32, report_dir=checks / f"{dtype}_b1",
                         progress=False)
            res["validate_b1"] = {"batch": 1, "passed": r.passed, "headline": r.headline(), "seconds": r.seconds}
            print(f"ours-{dtype} validate at batch 1: {r.headline()}", flush=True)
        # 40 rows: the batch-64 bucket's graphs (a decode graph traced for too few rows shows here, not at 2)
        r = validate(eng, ckpt, reference="ours", random_n=VALIDATE_WIDE, gen=8, report_dir=checks / f"{dtype}_b40",
                     progress=False)
        res["validate_wide"] = {"batch": VALIDATE_WIDE, "passed": r.passed, "headline": r.headline(),
                                "seconds": r.seconds}
        print(f"ours-{dtype} validate at batch {VALIDATE_WIDE}: {r.headline()}", flush=True)
    return res


def _hf_cache_kwarg(model) -> str:
    """The forward's cache argument: `past_key_values` in transformers 5.17 (the device's); later releases
    rename it `cache` (the old name still accepted, with a deprecation warning on every step)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _hf_cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def hf_decode(fwd, cache_kw: str, vocab: int, B: int, g: torch.Generator, device: str) -> float:
    """ms per decode step at batch B: a fresh PROMPT-token prefill, STEPS untimed greedy steps, then STEPS
    timed ones continuing from there (the KV cache grows from PROMPT + STEPS to PROMPT + 2 STEPS)."""
    ids = torch.randint(0, vocab, (B, PROMPT), generator=g).to(device)
    out = fwd(input_ids=ids, use_cache=True)
    pkv, tok = _hf_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)

    def step():
        nonlocal pkv, tok
        for _ in range(STEPS):
            o = fwd(input_ids=tok, use_cache=True, **{cache_kw: pkv})
            pkv, tok = _hf_cache(o), o.logits[:, -1].argmax(-1, keepdim=True)

    return _time(step, 1, device) / STEPS


def hf_prefill(fwd, vocab: int, L: int, g: torch.Generator, device: str) -> float:
    """ms of one L-token prefill at batch 1 (median of 2 after one untimed call)."""
    ids = torch.randint(0, vocab, (1, L), generator=g).to(device)
    return _time(lambda: fwd(input_ids=ids, use_cache=True), 2, device)


def _graphs() -> int:
    """Graphs dynamo has compiled in this process (a count that moves while timing means a recompile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def hf_pass(fwd, cache_kw: str, vocab: int, batches, prefill_lens, device: str, tag: str, res: dict,
            warm: bool) -> None:
    """Every shape timed, in order, with the generator seeded as every pass seeds it (a warm-up pass and the
    timed pass see the same ids and shapes). warm: the walls go to res["warmup_s"] and are printed as
    warm-up lines (which parse_progress keeps apart from timings); else the timings go to res (a decode's
    wall_s: its prompt's prefill and both step runs)."""
    g = torch.Generator().manual_seed(0)
    for B in batches:
        t0 = time.time()
        ms = hf_decode(fwd, cache_kw, vocab, B, g, device)
        wall = time.time() - t0
        if warm:
            res["warmup_s"]["decode"][B] = wall
            print(f"{tag} warm-up decode B={B}: {wall:.1f} s", flush=True)
        else:
            res["decode"][B] = {"ms_per_step": ms, "tokens_per_s": B * 1e3 / ms, "wall_s": wall}
            print(f"{tag} decode B={B}: {ms:.3f} ms/step", flush=True)
    for L in prefill_lens:
        t0 = time.time()
        ms = hf_prefill(fwd, vocab, L, g, device)
        wall = time.time() - t0
        if warm:
            res["warmup_s"]["prefill"][L] = wall
            print(f"{tag} warm-up prefill T={L}: {wall:.1f} s", flush=True)
        else:
            res["prefill"][L] = {"ms": ms, "tokens_per_s": L * 1e3 / ms}
            print(f"{tag} prefill T={L}: {ms:.2f} ms", flush=True)


def _wait_for(go: Path, timeout_s: float) -> tuple[bool, float]:
    """Poll until `go` exists (True) or timeout_s passed (False); returns (seen, seconds waited)."""
    t0 = time.time()
    while not go.exists():
        if time.time() - t0 > timeout_s:
            return False, time.time() - t0
        time.sleep(HF_WAIT_POLL_S)
    return True, time.time() - t0


def run_hf(ckpt: Path, compile_: bool, batches=DECODE_BATCHES, prefill_lens=PREFILL_LENS, mode: str | None = None,
           wait: Path | None = None, wait_timeout_s: float = 600.0, device: str = "cuda") -> dict:
    """Time transformers' model (eager, or torch.compile with `mode`; None = torch.compile's default).
    Compiled (or with `wait`): one warm-up pass of everything first; with `wait`, then FILE.ready is written
    and the timing starts once FILE exists (or after wait_timeout_s, marked `go: false`)."""
    from transformers import Qwen3_5MoeForCausalLM

    try:
        import fla  # noqa: F401
        have_fla = True
    except ImportError:
        have_fla = False
    t0 = time.time()
    model = Qwen3_5MoeForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).to(device).eval()
    tag = "hf-compile" if compile_ else "hf"
    res: dict = {"fla": have_fla, "decode": {}, "prefill": {}, "load_s": time.time() - t0,
                 "asked": {"batches": list(batches), "prefill": list(prefill_lens), "mode": mode or "default"}}
    print(f"{tag} asked: decode batches {list(batches)}, prefill {list(prefill_lens)}, mode {mode or 'default'}",
          flush=True)
    print(f"{tag} load: {res['load_s']:.1f} s", flush=True)
    if compile_:
        import torch._dynamo as dynamo

        # every decode shape and cache flag is one more entry per frame; past the limit (8 by default) a frame
        # falls back to eager (with only a warning) and "hf-compile" would time eager code
        dynamo.config.recompile_limit = 64
        res["mode"] = mode or "default"
        fwd = torch.compile(model, mode=mode)
    else:
        fwd = model
    cache_kw = _hf_cache_kwarg(model)
    V = model.config.vocab_size
    with torch.no_grad():
        if compile_ or wait is not None:
            res["warmup_s"] = {"decode": {}, "prefill": {}}
            t0 = time.time()
            hf_pass(fwd, cache_kw, V, batches, prefill_lens, device, tag, res, warm=True)
            res["warmup_total_s"] = time.time() - t0
        if wait is not None:
            Path(str(wait) + ".ready").touch()
            res["go"], res["waited_s"] = _wait_for(wait, wait_timeout_s)
            print(f"{tag} go: {res['go']} after {res['waited_s']:.1f} s", flush=True)
        graphs = _graphs() if compile_ else 0
        hf_pass(fwd, cache_kw, V, batches, prefill_lens, device, tag, res, warm=False)
        if compile_:
            res["graphs_compiled"] = _graphs()
            res["graphs_while_timing"] = res["graphs_compiled"] - graphs  # 0 unless a timed shape recompiled
    if torch.device(device).type == "cuda":
        res["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def _ints(csv: str) -> tuple[int, ...]:
    return tuple(int(x) for x in csv.split(",") if x.strip())


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
    ap.add_argument("--hf-batches", default=",".join(map(str, DECODE_BATCHES)), help="hf-*: decode batches")
    ap.add_argument("--hf-prefill", default=",".join(map(str, PREFILL_LENS)),
                    help='hf-*: prefill lengths ("" = none)')
    ap.add_argument("--hf-compile-mode", default=None,
                    help="hf-compile: torch.compile mode (default, reduce-overhead, max-autotune-no-cudagraphs, ...)")
    ap.add_argument("--hf-wait", type=Path, default=None,
                    help="hf-*: after the warm-up write FILE.ready, then time once FILE exists")
    ap.add_argument("--hf-wait-timeout", type=float, default=600.0,
                    help="hf-*: seconds to wait for the --hf-wait file before timing anyway (go: false)")
    a = ap.parse_args()
    ckpt_bf16 = a.work / "ckpt"
    if a.one:
        if a.one.startswith("ours"):
            dtype = a.one.split("-")[1]
            r = run_ours(ckpt_bf16, a.work, dtype, profile=True, target=a.target, checks=a.checks)
        else:
            r = run_hf(ckpt_bf16, a.one == "hf-compile", _ints(a.hf_batches), _ints(a.hf_prefill),
                       a.hf_compile_mode, a.hf_wait, a.hf_wait_timeout)
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
    hf_args = ["--hf-batches", a.hf_batches, "--hf-prefill", a.hf_prefill,
               "--hf-wait-timeout", str(a.hf_wait_timeout)]
    hf_args += ["--hf-compile-mode", a.hf_compile_mode] if a.hf_compile_mode else []
    for sysname in filter(None, a.systems.split(",")):  # --systems "": write the checkpoint only
        t = time.time()
        try:
            p = subprocess.run([sys.executable, __file__, "--out", str(a.out), "--work", str(a.work), "--preset",
                                a.preset, "--layers", str(a.layers), "--target", a.target, "--one", sysname]
                               # the wait hand-off belongs to hf-compile (an eager run beside it would take it)
                               + (["--hf-wait", str(a.hf_wait)] if a.hf_wait and sysname == "hf-compile" else [])
                               + (["--checks", str(a.checks)] if a.checks else [])
                               + (hf_args if sysname.startswith("hf") else []),
                               capture_output=True, text=True, timeout=a.timeout)
            stdout = p.stdout
            line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
            # a crash keeps what was measured before it
            results[sysname] = json.loads(line[-1][7:]) if line else {**parse_progress(stdout),
                                                                       "error": p.stderr[-3000:]}
        except subprocess.TimeoutExpired as e:
            # run() hands the output read before the kill as bytes (text=True or not)
            out = e.stdout or b""
            stdout = out.decode(errors="replace") if isinstance(out, bytes) else out
            results[sysname] = {**parse_progress(stdout), "error": f"timeout after {a.timeout} s",
                                "stdout": stdout[-2000:]}
        results[sysname]["wall_s"] = time.time() - t
        for ln in stdout.splitlines():  # the child's measurement lines into this log as well
            if _LINE.match(ln.strip()):
                print(ln, flush=True)
        print(sysname, json.dumps(results[sysname])[:1500], flush=True)
        (a.out / "e2e.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
