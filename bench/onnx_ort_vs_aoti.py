"""ONNX Runtime (CPU) engine vs the AOTInductor cpu engine on the tiny checkpoint: prefill time and
greedy decode tokens/s, same checkpoint, same prompts, runs interleaved so machine load hits both alike.

    python bench/onnx_ort_vs_aoti.py [--out bench/results] [--work /tmp/ortbench] [--repeats 5]

Writes <out>/onnx_ort_vs_aoti.json and .md. Builds both engines first (minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from qwen35_export.checkpoint.writer import write_random_checkpoint
from qwen35_export.config import preset
from qwen35_export.exporter.build import BuildSettings, build_engine
from qwen35_export.plugins.build import build_backend_engine
from qwen35_export.runtime.engine import Engine

PROMPTS = {1: [[5, 6, 7, 8, 9, 10, 11, 12]], 3: [[5, 6, 7, 8, 9, 10, 11, 12], [3], [100, 200, 300, 400]]}
GEN = 32


def run_once(eng: Engine, prompts: list[list[int]]) -> tuple[float, float, list[list[int]]]:
    """(prefill seconds, decode seconds for GEN-1 steps, greedy tokens)."""
    B, T = len(prompts), max(map(len, prompts))
    ids = torch.zeros(B, T, dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    s = eng.reset(B)
    t0 = time.perf_counter()
    logits = eng.prefill(ids, lengths, s)
    t1 = time.perf_counter()
    tok = logits.argmax(-1)
    out = [tok.tolist()]
    for _ in range(GEN - 1):
        tok = eng.decode(tok, s).argmax(-1)
        out.append(tok.tolist())
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, [list(r) for r in zip(*out)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/ortbench"))
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    ckpt = a.work / "ckpt"
    if not (ckpt / "config.json").is_file():
        write_random_checkpoint(preset("tiny"), ckpt, dtype="fp32", seed=1, progress=False)
    build_s = {}
    engines = {}
    for name, fn, backend in [("aoti", build_engine, "aoti"), ("onnxruntime", build_backend_engine, "onnxruntime")]:
        d = a.work / name
        if not (d / "manifest.json").is_file():
            t0 = time.time()
            fn(ckpt, d, BuildSettings(target="cpu", backend=backend, max_batch=4, max_seq_len=64, progress=False))
            build_s[name] = time.time() - t0
        engines[name] = Engine.load(d)
    results: dict[str, dict] = {n: {} for n in engines}
    for B, prompts in PROMPTS.items():
        times = {n: ([], []) for n in engines}
        tokens = {}
        for _ in range(a.repeats):
            for n, eng in engines.items():
                pf, dec, toks = run_once(eng, prompts)
                times[n][0].append(pf)
                times[n][1].append(dec)
                tokens[n] = toks
        assert tokens["aoti"] == tokens["onnxruntime"], "the two engines disagree on greedy tokens"
        for n in engines:
            dec = statistics.median(times[n][1])
            results[n][f"batch{B}"] = {"prefill_ms": 1e3 * statistics.median(times[n][0]),
                                       "decode_ms_per_step": 1e3 * dec / (GEN - 1),
                                       "decode_tokens_per_s": B * (GEN - 1) / dec}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "loadavg_1m": os.getloadavg()[0], "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "ort_threads": os.environ.get("QWEN35_ORT_THREADS", "1"),
            "onnxruntime": __import__("onnxruntime").__version__, "model": "tiny fp32 (8 layers, H=256, 16 experts)",
            "gen": GEN, "repeats": a.repeats, "build_seconds": build_s, "greedy_tokens_identical": True}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "onnx_ort_vs_aoti.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = ["# ONNX Runtime vs AOTInductor, cpu target, tiny checkpoint", "",
             f"{meta['date']}; {meta['cores']} cores ({meta['cpu']}), load average {meta['loadavg_1m']:.1f} at the end "
             f"(other jobs share the machine); torch {meta['torch']} ({meta['torch_threads']} threads), onnxruntime "
             f"{meta['onnxruntime']} ({meta['ort_threads']} intra-op thread per session). Median of {a.repeats} runs, "
             f"{GEN} greedy tokens; both engines produced identical tokens.", "",
             "| engine | batch | prefill ms | decode ms/step | decode tokens/s |", "|---|---|---|---|---|"]
    for B in PROMPTS:
        for n in engines:
            r = results[n][f"batch{B}"]
            lines.append(f"| {n} | {B} | {r['prefill_ms']:.1f} | {r['decode_ms_per_step']:.1f} | "
                         f"{r['decode_tokens_per_s']:.1f} |")
    (a.out / "onnx_ort_vs_aoti.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
