"""FP8 MoE prefill tiles, phase by phase: gate_up and down over a grid of tile configs on the GPU.

The prefill product is e4m3 x e4m3 with a promotion per 128-column K step (the checkpoint's 128x128 weight
scales times the per-row activation scales); this sweep times that product's tilings (BLOCK_M, BLOCK_N,
num_warps, num_stages, FUSED gate_up) per geometry and token count, each checked against the stored
config's output first.

    PYTHONPATH=. python3 bench/moe_prefill_sweep.py --out DIR [--cases 397b-a17b:4096,397b-a17b:16384,35b-a3b:8192]
        [--workers 6]

Kernels are compiled first by `--workers` processes in parallel (Triton's disk cache keeps them), then one
process times every config with CUDA-graph medians. Writes DIR/moe_prefill_sweep.{json,md}: per case the
stored config's phases, every config's us and TFLOPS, the best gate_up and down per BLOCK_M (one BLOCK_M
serves both kernels: it is the tile map's) and the best pair, whose config is what a table entry takes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import time
from pathlib import Path

import torch

GEOMETRIES = {"397b-a17b": (4096, 1024, 512, 10), "35b-a3b": (2048, 512, 256, 8)}  # H, I, routed E, k
PEAK_FP8 = 1979.0  # dense TFLOPS, H100 / H200 SXM


def gate_up_configs() -> list[dict]:
    """(BLOCK_M, gate_up tile) pairs: BLOCK_N 128 (one h scale group per program), BLOCK_K 128 (one scale step)."""
    out = []
    for bm, w, s, fused in itertools.product((64, 128), (4, 8), (3, 4), (0, 1)):
        if bm == 128 and w == 4:
            continue  # [128, 128] accumulators in 4 warps spill (bench/results/moe_notes.md)
        out.append((bm, dict(BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=w, num_stages=s, FUSED=fused)))
    return out


def down_configs() -> list[dict]:
    out = []
    for bm, bn, w, s in itertools.product((64, 128), (128, 256), (4, 8), (3, 4)):
        if (bm == 128 and bn == 256) or (bm == 128 and w == 4) or (bn == 256 and w == 4):
            continue  # accumulator past the register file
        out.append((bm, dict(BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, num_warps=w, num_stages=s)))
    return out


def make_case(geometry: str, T: int, seed: int = 0) -> dict:
    """Random e4m3 experts (+ the shared expert as expert E) with block scales, x, routing ids and weights."""
    from qwen35_export.kernels.moe import moe_router_triton

    H, I, E, K = GEOMETRIES[geometry]
    g = torch.Generator(device="cuda").manual_seed(seed)

    def fp8(shape):  # normal values within e4m3's range, cast in chunks of experts (fp32 temporaries)
        return torch.cat([(torch.randn((min(32, shape[0] - i),) + shape[1:], generator=g, device="cuda") * 64).clamp(-448, 448)
                          .to(torch.float8_e4m3fn) for i in range(0, shape[0], 32)])

    q13, q2 = fp8((E + 1, 2 * I, H)), fp8((E + 1, H, I))
    s13 = torch.rand(E + 1, 2 * I // 128, H // 128, generator=g, device="cuda") * 1e-3 / H ** 0.5 + 1e-5
    s2 = torch.rand(E + 1, H // 128, I // 128, generator=g, device="cuda") * 1e-3 / I ** 0.5 + 1e-5
    x = torch.randn(T, H, generator=g, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(E, H, generator=g, device="cuda", dtype=torch.bfloat16) * H ** -0.5
    w, ids = moe_router_triton(x @ gate.T, K)
    ws = torch.sigmoid(torch.randn(T, 1, generator=g, device="cuda"))
    w, ids = torch.cat([w, ws], 1), torch.cat([ids, torch.full_like(ids[:, :1], E)], 1)
    return dict(H=H, I=I, E=E, K=K, T=T, q13=q13, q2=q2, s13=s13, s2=s2, x=x, w=w, ids=ids)


def full_cfg(bm: int, gu: dict | None = None, dn: dict | None = None, base: dict | None = None) -> dict:
    c = {"BLOCK_M": bm, "gate_up": dict((base or {}).get("gate_up", {})), "down": dict((base or {}).get("down", {}))}
    if gu:
        c["gate_up"] = dict(gu)
    if dn:
        c["down"] = dict(dn)
    return c


def run_phase(case: dict, phase: str, cfg: dict, tiles, h=None, hs=None):
    from qwen35_export.kernels.moe.experts import down, gate_up

    if phase == "gate_up":
        return gate_up(case["x"], tiles, case["K"] + 1, case["q13"], case["s13"], cfg, True)
    return down(h, hs, case["w"], tiles, case["q2"], case["s2"], cfg, True, torch.bfloat16)


def stored_config(case: dict) -> dict:
    from qwen35_export.kernels.moe.configs import get_config

    return get_config(case["E"] + 1, case["I"], case["T"], torch.device("cuda"), "fp8", case["K"] + 1, False)


def _warm(job: tuple[str, int, list[tuple[str, int, dict]]]) -> list[str]:
    """Worker: compile (run once) each (phase, BLOCK_M, tile) of one case; the disk cache keeps the binaries."""
    from qwen35_export.kernels.moe import align_block_size

    geometry, T, items = job
    case = make_case(geometry, T)
    base = stored_config(case)
    errors = []
    for phase, bm, tile in items:
        try:
            cfg = full_cfg(bm, base=base)
            cfg["gate_up"] = dict(base["gate_up"], FUSED=0)
            tiles = align_block_size(case["ids"], case["E"] + 1, bm)
            h, hs = run_phase(case, "gate_up", full_cfg(bm, gu=tile if phase == "gate_up" else None, base=cfg), tiles)
            if phase == "down":
                run_phase(case, "down", full_cfg(bm, dn=tile, base=cfg), tiles, h, hs)
            torch.cuda.synchronize()
        except Exception as exc:
            errors.append(f"{geometry}:{T} {phase} BM {bm} {tile}: {type(exc).__name__}: {str(exc)[:160]}")
    return errors


def bench_us(fn) -> float:
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def sweep_case(geometry: str, T: int) -> dict:
    from qwen35_export.kernels.moe import align_block_size
    from qwen35_export.kernels.moe.experts import combine

    case = make_case(geometry, T)
    H, I, K = case["H"], case["I"], case["K"] + 1
    M = T * K
    flops = {"gate_up": 2 * M * H * 2 * I, "down": 2 * M * I * H}
    base = stored_config(case)
    tiles0 = align_block_size(case["ids"], case["E"] + 1, base["BLOCK_M"])
    h0, hs0 = run_phase(case, "gate_up", base, tiles0)
    y0 = run_phase(case, "down", base, tiles0, h0, hs0)
    # h rows are padded positions that depend on BLOCK_M: compare h through y (down at the stored tiles),
    # and y itself (slot rows: independent of the tiling)
    stored = {"config": base, "gate_up_us": bench_us(lambda: run_phase(case, "gate_up", base, tiles0)),
              "down_us": bench_us(lambda: run_phase(case, "down", base, tiles0, h0, hs0)),
              "combine_us": bench_us(lambda: combine(y0, T, K)),
              "align_us": bench_us(lambda: align_block_size(case["ids"], case["E"] + 1, base["BLOCK_M"]))}
    rows = []
    for bm in (64, 128):
        tiles = align_block_size(case["ids"], case["E"] + 1, bm)
        ref_cfg = full_cfg(bm, base=base)
        ref_cfg["gate_up"] = dict(base["gate_up"], FUSED=0)
        h_ref, hs_ref = run_phase(case, "gate_up", ref_cfg, tiles)  # this BLOCK_M's h rows for the down sweep
        for phase, items in (("gate_up", gate_up_configs()), ("down", down_configs())):
            for b, tile in items:
                if b != bm:
                    continue
                cfg = full_cfg(bm, gu=tile if phase == "gate_up" else None,
                               dn=tile if phase == "down" else None, base=ref_cfg)
                try:
                    if phase == "gate_up":
                        h, hs = run_phase(case, phase, cfg, tiles)
                        err = rel(run_phase(case, "down", ref_cfg, tiles, h, hs), y0)
                        us = bench_us(lambda: run_phase(case, phase, cfg, tiles))
                    else:
                        err = rel(run_phase(case, phase, cfg, tiles, h_ref, hs_ref), y0)
                        us = bench_us(lambda: run_phase(case, phase, cfg, tiles, h_ref, hs_ref))
                except Exception as exc:
                    print(f"  {geometry}:{T} {phase} BM {bm} {tile}: {type(exc).__name__}: {str(exc)[:160]}",
                          flush=True)
                    continue
                ok = err < 2e-2  # a few e4m3 code flips of h at most; a wrong tiling is O(1) off
                rows.append(dict(phase=phase, BLOCK_M=bm, tile=tile, us=us, tflops=flops[phase] / us / 1e6,
                                 err_vs_stored=err, ok=ok))
                r = rows[-1]
                print(f"  {geometry}:{T} {phase:7s} BM {bm:3d} {json.dumps(tile)}: {us:8.1f} us "
                      f"{r['tflops']:6.1f} TF  err {err:.1e}{'' if ok else ' WRONG'}", flush=True)
    best = {}
    for bm in (64, 128):
        pick = {}
        for phase in ("gate_up", "down"):
            cands = [r for r in rows if r["phase"] == phase and r["BLOCK_M"] == bm and r["ok"]]
            if cands:
                pick[phase] = min(cands, key=lambda r: r["us"])
        if len(pick) == 2:
            best[bm] = pick
    pair = min(best.items(), key=lambda kv: kv[1]["gate_up"]["us"] + kv[1]["down"]["us"]) if best else None
    entry = None
    if pair:
        bm, pick = pair
        entry = {"BLOCK_M": bm, "gate_up": pick["gate_up"]["tile"], "down": pick["down"]["tile"]}
    return dict(geometry=geometry, T=T, flops=flops, stored=stored, rows=rows,
                best={str(k): v for k, v in best.items()}, entry=entry)


def write(out: Path, meta: dict, cases: list[dict]) -> None:
    (out / "moe_prefill_sweep.json").write_text(json.dumps(dict(meta=meta, cases=cases), indent=1))
    lines = [f"# FP8 MoE prefill tiles, {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}; CUDA-graph medians per phase; TFLOPS of the "
             f"phase's GEMM (% of {PEAK_FP8:.0f} FP8 dense peak)", "",
             "| case | stored gate_up us (TF) | stored down us (TF) | best gate_up us (TF) | best down us (TF) | "
             "best entry |", "|---|---|---|---|---|---|"]
    for c in cases:
        s, f = c["stored"], c["flops"]
        e = c["entry"]
        if e:
            p = c["best"][str(e["BLOCK_M"])]
            bg, bd = p["gate_up"], p["down"]
            best = (f"{bg['us']:.0f} ({bg['tflops']:.0f}, {100 * bg['tflops'] / PEAK_FP8:.0f}%) | "
                    f"{bd['us']:.0f} ({bd['tflops']:.0f}, {100 * bd['tflops'] / PEAK_FP8:.0f}%) | `{json.dumps(e)}`")
        else:
            best = "- | - | -"
        lines.append(f"| {c['geometry']} T={c['T']} | {s['gate_up_us']:.0f} ({f['gate_up'] / s['gate_up_us'] / 1e6:.0f}) | "
                     f"{s['down_us']:.0f} ({f['down'] / s['down_us'] / 1e6:.0f}) | {best} |")
    (out / "moe_prefill_sweep.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    import triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default="397b-a17b:16384,397b-a17b:4096,35b-a3b:8192")
    ap.add_argument("--workers", type=int, default=6, help="parallel compile processes (0: compile inline)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    t0 = time.time()
    if args.workers:
        # Compile keys depend on the int arguments' divisibility, not their values: warm each config once on
        # the first case; later cases reuse the binaries where their sizes specialise the same.
        items = [("gate_up", bm, t) for bm, t in gate_up_configs()] + [("down", bm, t) for bm, t in down_configs()]
        jobs = [(cases[0][0], cases[0][1], items[i::args.workers]) for i in range(args.workers)]
        with mp.get_context("spawn").Pool(args.workers) as pool:
            for errs in pool.imap_unordered(_warm, jobs):
                for e in errs:
                    print("  warm:", e, flush=True)
        print(f"compiled in {time.time() - t0:.0f}s", flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d"))
    results = []
    for geometry, T in cases:
        results.append(sweep_case(geometry, T))
        write(args.out, meta, results)
        print(f"{geometry}:{T} done at {time.time() - t0:.0f}s; entry {json.dumps(results[-1]['entry'])}", flush=True)


if __name__ == "__main__":
    main()
