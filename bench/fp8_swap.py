"""FP8 at decode: the swapped-operand w8a8 kernels (e4m3 weights straight to the tensor cores, tokens on the
narrow MMA side) against the shipped decode paths, dense linears and the MoE experts, on the GPU.

    PYTHONPATH=. python3 bench/fp8_swap.py --out DIR [--budget SECONDS] [--only dense|moe]

Dense: each engine FP8 linear (projections fused as graph/fuse_weights.py builds them) at M = 1, 8, 64 rows,
with the token tile an engine's decode graph uses (64: its batch may reach 64) and, at M <= 16, the 16-row
tile; a sweep of swap tiles against the shipped default (`gemm.default_config`) and cuBLAS on the BF16
weight. Weight sets rotate past the L2 (decode_kernels.rotating_weights); each config's output is checked
against the quantisation-simulated reference first (a wrong one is reported, never ranked).
MoE: one decode call of the experts op (align path, BLOCK_M 16, as an engine's decode graph runs it) at
T = 1, 8, 64 for the 35B-A3B and 397B layers (shared expert as expert E), routings rotated so each replay
touches other routed experts (past the L2 at T = 1 too; the shared expert is in every routing and may stay in
the L2, yet its bytes are counted: the % HBM at T = 1 is up to 1/11 high), swap configs against the stored
tables (FP8 and BF16).
Writes DIR/fp8_swap.{json,md,png} as it goes (a cut run keeps its rows).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decode_kernels import ENGINE_LINEARS, graph_us, rotating_weights, time_linear  # noqa: E402
from qwen35_export.checkpoint.fp8 import quantize_fp8_block  # noqa: E402
from qwen35_export.kernels.fp8_linear import fp8_linear_reference  # noqa: E402
from qwen35_export.kernels.fp8_linear.gemm import default_config, swap_config  # noqa: E402
from qwen35_export.kernels.moe import moe_experts_triton  # noqa: E402
from qwen35_export.kernels.moe.configs import get_config  # noqa: E402
from qwen35_export.kernels.moe.reference import moe_experts_fp8_reference  # noqa: E402
from qwen35_export.runtime.bench import hbm_bandwidth  # noqa: E402

ENGINE_LINEARS = dict(ENGINE_LINEARS, **{"35b attn o_proj": (2048, 4096), "397b attn o_proj": (4096, 8192)})
MAX_ERR = 1e-2  # vs the quantisation-simulated reference: bf16 output rounding is ~2e-3; a wrong config is far off
MOE_GEOMS = {"35b-a3b": (2048, 512, 256, 8), "397b-a17b": (4096, 1024, 512, 10)}  # H, I, E, k


def swap_candidates(bt: int, K: int) -> list[dict]:
    """Swap tiles: 64 / 128 weight rows per program, K splits, pipeline depths; x quantised in the kernel with
    the software rounding (the hardware cast and a separate quantisation launch are tried on the best)."""
    steps = triton.cdiv(K, 128)
    return [dict(SWAP=True, QX=True, HW_CVT=False, BLOCK_N=bn, BLOCK_T=bt, SPLIT_K=sk, num_warps=4, num_stages=st)
            for bn, sk, st in itertools.product((64, 128), (1, 2, 4, 8), (3, 5)) if sk <= steps]


def desc(c: dict) -> str:
    keys = ("BLOCK_N", "BLOCK_T", "SPLIT_K", "num_warps", "num_stages", "QX", "HW_CVT", "BLOCK_M", "WO", "DEQUANT")
    return ",".join(f"{k}={int(c[k])}" for k in keys if k in c)


def bf16_cublas_us(x: torch.Tensor, ws: list) -> float:
    """us per call of cuBLAS on the weights in BF16 (twice the bytes: half the sets keep it past the L2)."""
    wb = [w.to(torch.bfloat16) for w in ws[:max(1, len(ws) // 2)]]

    def run():
        for w in wb:
            torch.nn.functional.linear(x, w)
    return graph_us(run, 4) / len(wb)


def ranked(cfgs: list[dict], time_cfg, label: str, describe) -> list[tuple[float, float, dict]]:
    """(us, rel err, config) of the configs that compiled and agree with the reference, fastest first."""
    res = []
    for cfg in cfgs:
        us, err = time_cfg(cfg)
        if us is None:
            continue
        if err > MAX_ERR:
            print(f"WRONG {label} {describe(cfg)}: rel err {err:.1e}", flush=True)
            continue
        res.append((us, err, cfg))
    return sorted(res, key=lambda r: r[0])


def dense_case(N: int, K: int, M: int) -> tuple[list, list, torch.Tensor, torch.Tensor, int]:
    """(weights and scales rotated past the L2, x [M, K], its quantisation-simulated fp32 reference, the bytes
    one call reads) for one linear at M rows."""
    ws, ss = rotating_weights(N, K)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    sim = fp8_linear_reference(x, ws[0], ss[0], quant_act=True, dtype=torch.float32)
    return ws, ss, x, sim, N * K + ss[0].numel() * 4


def bench_dense(bw: float, rows: list, save, deadline: float) -> None:
    for (name, (N, K)), M in itertools.product(ENGINE_LINEARS.items(), (1, 8, 64)):
        if time.time() > deadline:
            print("dense: out of time", flush=True)
            return
        ws, ss, x, sim, nbytes = dense_case(N, K, M)
        ref = fp8_linear_reference(x, ws[0], ss[0], dtype=torch.float32)

        def time_cfg(cfg, against=sim):  # (us, rel err); (None, None) for a tile the compiler rejects
            return time_linear(x, ws, ss, cfg, against, name) or (None, None)

        row = dict(name=name, N=N, K=K, M=M, bytes=nbytes, by_bt={})
        for bt, graph_rows in ((16, 16), (64, 64)) if M <= 16 else ((64, 64),):
            dflt = default_config(graph_rows, N, K)
            d_us, d_err = time_cfg(dflt, ref)
            res = ranked(swap_candidates(bt, K), time_cfg, f"{name} M={M}", desc)
            for _, _, cfg in res[:3]:  # the hardware e4m3 cast on the three best
                us, err = time_cfg(dict(cfg, HW_CVT=True))
                if us is not None and err <= MAX_ERR:
                    res.append((us, err, dict(cfg, HW_CVT=True)))
            res.sort(key=lambda r: r[0])
            best = res[0] if res else (None, None, None)
            prequant = None
            if best[2] is not None:  # the best tile with x quantised by its own launch instead
                prequant = time_cfg(dict(best[2], QX=False))[0]
            row["by_bt"][bt] = dict(default=dflt, default_us=d_us, default_err=d_err, best=best[2], best_us=best[0],
                                    best_err=best[1], prequant_us=prequant,
                                    best_pct=None if best[0] is None else nbytes / bw / (best[0] * 1e-6) * 100,
                                    all=[(u, e, desc(c)) for u, e, c in res])
            print(f"dense {name:18s} M={M:3d} BT={bt:2d}: swap best {best[0]} us ({desc(best[2] or {})}) "
                  f"prequant {prequant}; default {d_us} ({desc(dflt)})", flush=True)
        row["bf16_cublas_us"] = bf16_cublas_us(x, ws)
        rows.append(row)
        save()


def bench_dense_bt16(bw: float, rows: list, save, deadline: float) -> None:
    """The 16-token swap tile in a graph of up to 64 rows: cdiv(M, 16) token tiles, those of one weight tile
    adjacent in launch order (they share its HBM reads through the L2), against the shipped default of a
    64-row decode graph and cuBLAS BF16."""
    for (name, (N, K)), M in itertools.product(ENGINE_LINEARS.items(), (1, 8, 17, 64)):
        if time.time() > deadline:
            print("dense bt16: out of time", flush=True)
            return
        ws, ss, x, sim, nbytes = dense_case(N, K, M)
        row = dict(name=name, N=N, K=K, M=M, bytes=nbytes)

        def t(cfg):  # a tile the compiler rejects is recorded as missing (nan) and the run goes on
            return time_linear(x, ws, ss, cfg, sim, name) or (float("nan"), float("nan"))
        base = swap_config(16, N, K)
        for key, cfg in (("default64", default_config(64, N, K)), ("bt16_qx_hw", dict(base, QX=True, HW_CVT=True)),
                         ("bt16_qx_sw", dict(base, QX=True, HW_CVT=False)), ("bt16_prequant", dict(base, QX=False)),
                         ("bt64_prequant", swap_config(64, N, K))):
            row[key] = t(cfg)
        row["bf16_cublas_us"] = bf16_cublas_us(x, ws)
        rows.append(row)
        print("dense bt16", name, M, {k: (round(v[0], 1), f"{v[1]:.1e}") if isinstance(v, tuple) else v
                                       for k, v in row.items() if k not in ("name", "N", "K", "M", "bytes")},
              flush=True)
        save()


def swap_moe_cfg(gbn: int, dbn: int, st: int, qx: int = 1, o8: int = 0, hw: int = 0, split: int = 1) -> dict:
    return {"BLOCK_M": 16, "SWAP": 1, "HW_CVT": hw,
            "gate_up": dict(BLOCK_N=gbn, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=st, QX=qx, OUT_FP8=o8,
                            SPLIT_K=split),
            "down": dict(BLOCK_N=dbn, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=st)}


def moe_candidates(short: bool = False) -> list[dict]:
    """Swap configs: gate_up / down weight rows per program and pipeline depth with x and h quantised in the
    kernels (h through fp32), then h quantised in gate_up's epilogue (OUT_FP8, BLOCK_N 128), x quantised by
    its own launch (QX 0), the hardware e4m3 cast (HW_CVT), gate_up split over H (SPLIT_K: partial sums, the
    SiLU in down). `short`: the first sweep's leaders (bench/results/fp8_swap_h200/) and the splits only."""
    c = swap_moe_cfg
    splits = [c(64, 128, 3, split=2), c(64, 128, 3, split=4), c(128, 64, 3, split=2), c(128, 128, 3, split=2),
              c(64, 64, 3, split=4), c(64, 128, 3, qx=0, split=4)]
    if short:
        return [c(64, 128, 3), c(128, 64, 3, o8=1), c(128, 128, 3, o8=1), c(64, 64, 3)] + splits
    out = [c(g, d, st) for g, d, st in itertools.product((64, 128), (64, 128), (3, 5))]
    out += [c(128, d, st, o8=1) for d, st in itertools.product((64, 128), (3, 5))]
    out += [c(g, 64, 5, qx=0) for g in (64, 128)]
    out += [c(g, d, 5, hw=1) for g, d in ((64, 64), (128, 64), (64, 128))] + [c(128, 64, 5, o8=1, hw=1)]
    return out + splits


T1_SLACK = 1.05  # pick_tables keeps configs within 5% of the best at one token (the latency case)


def pick_tables(rows: list[dict]) -> dict[str, dict]:
    """Per geometry, the config with the least sum over T of (its us / the best us at T), among those measured
    at every T and within T1_SLACK of the best at T = 1: an engine's decode graph runs one config at every
    batch (the table entry nearest 64), and batch 1 must not pay for the larger ones. (35B, H200: the best
    sum, BLOCK_N 128 gate_up tiles, took 24.0 us per gate_up call in the engine's batch-1 step against 15.7
    for 64-column tiles, 1.025 -> 1.068 ms per step; bench/results/fp8_swap_h200/README.md.)"""
    out = {}
    for geom in {r["geom"] for r in rows}:
        rs = [r for r in rows if r["geom"] == geom]
        by_cfg: dict[str, list] = {}
        t1_ok = set()
        for r in rs:
            best = r["best_us"]
            for us, _, d, cfg in r["all"]:
                key = json.dumps(cfg, sort_keys=True)
                by_cfg.setdefault(key, []).append(us / best)
                if r["T"] == 1 and us <= T1_SLACK * best:
                    t1_ok.add(key)
        full = {k: sum(v) for k, v in by_cfg.items() if len(v) == len(rs) and (k in t1_ok or not t1_ok)}
        if full:
            out[geom] = json.loads(min(full, key=full.get))
        else:
            print(f"pick_tables: {geom}: no config measured at every T within {T1_SLACK} of the best at T = 1; "
                  "its tables are left as they are", flush=True)
    return out


def write_tables(choice: dict[str, dict]) -> list[str]:
    """Put each geometry's chosen config in the decode entries (token counts <= DECODE_MAX_TOKENS) of the FP8
    tables this GPU looks up (its own, else its same-SM twin's), with and without the shared expert."""
    from qwen35_export.kernels.moe.configs import (DECODE_MAX_TOKENS, SAME_SM_TABLES, config_file, device_tag,
                                                   load_table)
    tag = device_tag(torch.device("cuda"))
    written = []
    for geom, cfg in choice.items():
        _, I, E, _ = MOE_GEOMS[geom]
        for e in (E, E + 1):
            twin = SAME_SM_TABLES.get(tag, tag)
            dev = twin if load_table(e, I, tag, "fp8") is None and load_table(e, I, twin, "fp8") is not None else tag
            path = config_file(e, I, dev, "fp8")
            table = json.loads(path.read_text()) if path.exists() else {}
            for t in [t for t in table if int(t) <= DECODE_MAX_TOKENS] or ["1", "8", "64"]:
                table[t] = cfg
            path.write_text(json.dumps(table, indent=1) + "\n")
            written.append(path.name)
    load_table.cache_clear()
    return written


def moe_desc(c: dict) -> str:
    if not c.get("SWAP"):
        return "stored table"
    g, d = c["gate_up"], c["down"]
    return (f"gu BN={g['BLOCK_N']} QX={g['QX']} OUT_FP8={g['OUT_FP8']} split={g.get('SPLIT_K', 1)} | "
            f"dn BN={d['BLOCK_N']} | stages={g['num_stages']} HW_CVT={c['HW_CVT']}")


def bench_moe(bw: float, rows: list, save, deadline: float, short: bool = False) -> None:
    for geom, (H, I, E, k) in MOE_GEOMS.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        # built in chunks: fp32 temporaries of all 513 experts at once would not fit
        w13 = torch.cat([(torch.randn(64, 2 * I, H, generator=g, device="cuda") * H ** -0.5).bfloat16()
                         for _ in range(triton.cdiv(E + 1, 64))])[:E + 1]
        w2 = torch.cat([(torch.randn(64, H, I, generator=g, device="cuda") * I ** -0.5).bfloat16()
                        for _ in range(triton.cdiv(E + 1, 64))])[:E + 1]
        q13, s13 = (torch.cat(t) for t in zip(*(quantize_fp8_block(c) for c in w13.split(64))))
        q2, s2 = (torch.cat(t) for t in zip(*(quantize_fp8_block(c) for c in w2.split(64))))
        for T in (1, 8, 64):
            if time.time() > deadline:
                print("moe: out of time", flush=True)
                return
            nrot = {1: 8, 8: 4, 64: 2}[T]
            x = (torch.randn(T, H, generator=g, device="cuda")).bfloat16()
            routes = []
            for r in range(nrot):
                logits = torch.randn(T, E, generator=g, device="cuda")
                w, ids = torch.topk(torch.softmax(logits, -1), k, -1)
                w = w / w.sum(-1, keepdim=True)
                # the shared expert rides along as expert E with its sigmoid gate as the weight
                w = torch.cat([w, torch.sigmoid(torch.randn(T, 1, generator=g, device="cuda"))], 1)
                ids = torch.cat([ids, torch.full((T, 1), E, device="cuda", dtype=ids.dtype)], 1)
                routes.append((w, ids))
            touched = sum(int(torch.unique(ids).numel()) for _, ids in routes) / nrot
            fp8_bytes = touched * 3 * H * I
            w0, ids0 = routes[0]
            sim = moe_experts_fp8_reference(x, w0, ids0, q13, s13, q2, s2, dtype=torch.float32, quant_act=True)
            ref = moe_experts_fp8_reference(x, w0, ids0, q13, s13, q2, s2, dtype=torch.float32)

            def time_cfg(cfg, fp8=True, against=sim):
                args = (q13, q2, s13, s2) if fp8 else (w13, w2)

                def run():
                    for w, ids in routes:
                        moe_experts_triton(x, w, ids, *args, config=cfg, decode=True, pairs=False)
                try:
                    out = moe_experts_triton(x, w0, ids0, *args, config=cfg, decode=True, pairs=False).float()
                    err = float((out - against).norm() / against.norm())
                    return graph_us(run, 4) / nrot, err
                except Exception as e:
                    print("skip", geom, T, moe_desc(cfg or {}), str(e)[:100], flush=True)
                    return None, None

            # the stored tables' decode entry an engine's decode graph uses (nearest 64 tokens)
            stored8 = get_config(E + 1, I, 64, x.device, "fp8", k + 1, True)
            stored16 = get_config(E + 1, I, 64, x.device, "bf16", k + 1, True)
            s8_us, s8_err = time_cfg(stored8, True, ref)
            b16_us, _ = time_cfg(stored16, False, ref)
            res = ranked(moe_candidates(short), time_cfg, f"{geom} T={T}", moe_desc)
            best = res[0] if res else (None, None, None)
            row = dict(geom=geom, T=T, touched_experts=touched, fp8_bytes=fp8_bytes, stored_fp8_us=s8_us,
                       stored_fp8_err=s8_err, stored_bf16_us=b16_us, best=best[2], best_us=best[0], best_err=best[1],
                       best_pct=None if best[0] is None else fp8_bytes / bw / (best[0] * 1e-6) * 100,
                       stored_fp8_pct=None if s8_us is None else fp8_bytes / bw / (s8_us * 1e-6) * 100,
                       bf16_pct=None if b16_us is None else 2 * fp8_bytes / bw / (b16_us * 1e-6) * 100,
                       all=[(u, e, moe_desc(c), c) for u, e, c in res])
            rows.append(row)
            print(f"moe {geom} T={T}: swap best {best[0]} us ({row['best_pct']}% HBM; {moe_desc(best[2] or {})}); "
                  f"stored fp8 {s8_us} ({row['stored_fp8_pct']}%), bf16 {b16_us} ({row['bf16_pct']}%)", flush=True)
            save()


def report(res: dict, out: Path) -> None:
    lines = [f"# FP8 at decode: swapped-operand w8a8 kernels, {res['gpu']}", "",
             f"torch {res['torch']}, triton {res['triton']}; CUDA-graph replays, weights / routings rotated past "
             "the L2; `python3 bench/fp8_swap.py` (see its docstring).", "",
             "## Dense FP8 linears (us per call, whole op)", "",
             "| linear (N x K) | M | token tile | swap best | % HBM | best tile | x pre-quantised | shipped default | "
             "BF16 cuBLAS |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("dense", []):
        for bt, b in r["by_bt"].items():
            pct = "-" if b["best_pct"] is None else f"{b['best_pct']:.0f}"
            lines.append(f"| {r['name']} ({r['N']}x{r['K']}) | {r['M']} | {bt} | {b['best_us'] and round(b['best_us'], 1)} "
                         f"| {pct} | {desc(b['best'] or {})} | {b['prequant_us'] and round(b['prequant_us'], 1)} | "
                         f"{b['default_us'] and round(b['default_us'], 1)} ({desc(b['default'])}) | "
                         f"{r['bf16_cublas_us']:.1f} |")
    lines += ["", "## MoE experts at decode (us per call, align path, BLOCK_M 16)", "",
              "| layer | T | experts touched | swap best | % HBM | stored FP8 | % HBM | stored BF16 | % HBM | best config |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("moe", []):
        f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| {r['geom']} | {r['T']} | {r['touched_experts']:.1f} | {f(r['best_us'])} | {f(r['best_pct'])} | "
                     f"{f(r['stored_fp8_us'])} | {f(r['stored_fp8_pct'])} | {f(r['stored_bf16_us'])} | "
                     f"{f(r['bf16_pct'])} | {moe_desc(r['best'] or {})} |")
    if res.get("dense_bt16"):
        keys = ("default64", "bt16_qx_hw", "bt16_qx_sw", "bt16_prequant", "bt64_prequant")
        lines += ["", "## 16-token swap tiles in a 64-row decode graph (us per call; token tiles of one weight tile "
                  "adjacent)", "", "| linear (N x K) | M | " + " | ".join(keys) + " | BF16 cuBLAS |",
                  "|---|---|" + "---|" * (len(keys) + 1)]
        for r in res["dense_bt16"]:
            lines.append(f"| {r['name']} ({r['N']}x{r['K']}) | {r['M']} | "
                         + " | ".join(f"{r[k][0]:.1f}" for k in keys) + f" | {r['bf16_cublas_us']:.1f} |")
    (out / "fp8_swap.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    dense = [(f"{r['name']} M{r['M']}", r["by_bt"].get(64) or r["by_bt"].get("64")) for r in res.get("dense", [])]
    dense = [(n, b) for n, b in dense if b and b["best_us"]]
    if dense:
        xs = range(len(dense))
        axes[0].bar([i - 0.2 for i in xs], [b["default_us"] or 0 for _, b in dense], 0.4, label="shipped default")
        axes[0].bar([i + 0.2 for i in xs], [b["best_us"] for _, b in dense], 0.4, label="swap best")
        axes[0].set_xticks(list(xs), [n for n, _ in dense], rotation=75, fontsize=7)
        axes[0].set_ylabel("us (token tile 64)")
        axes[0].legend()
        axes[0].set_title("dense FP8 linears")
    moe = [r for r in res.get("moe", []) if r["best_us"]]
    if moe:
        xs = range(len(moe))
        axes[1].bar([i - 0.27 for i in xs], [r["stored_bf16_pct"] if "stored_bf16_pct" in r else r["bf16_pct"] or 0
                                             for r in moe], 0.27, label="BF16 stored")
        axes[1].bar(list(xs), [r["stored_fp8_pct"] or 0 for r in moe], 0.27, label="FP8 stored")
        axes[1].bar([i + 0.27 for i in xs], [r["best_pct"] for r in moe], 0.27, label="FP8 swap best")
        axes[1].set_xticks(list(xs), [f"{r['geom']} T{r['T']}" for r in moe], rotation=30, fontsize=8)
        axes[1].set_ylabel("% of HBM roofline (touched expert bytes)")
        axes[1].legend()
        axes[1].set_title("MoE experts at decode")
    fig.tight_layout()
    fig.savefig(out / "fp8_swap.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=300.0, help="seconds; each part stops starting rows after it")
    ap.add_argument("--only", choices=("dense", "moe", "dense-bt16"))
    ap.add_argument("--short", action="store_true", help="MoE: the first sweep's leaders and the gate_up splits")
    ap.add_argument("--write-tables", action="store_true",
                    help="MoE: write each geometry's pick (pick_tables) into the stored FP8 decode tables")
    ap.add_argument("--report", action="store_true", help="only rewrite the markdown + plot of DIR/fp8_swap.json")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.report:
        report(json.loads((a.out / "fp8_swap.json").read_text()), a.out)
        return
    bw = hbm_bandwidth(torch.device("cuda")) or 3.35e12
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "hbm_bytes_per_s": bw, "dense": [], "moe": []}

    def save():
        (a.out / "fp8_swap.json").write_text(json.dumps(res, indent=1, default=str))
        report(res, a.out)

    t0 = time.time()
    if a.only == "dense-bt16":
        res["dense_bt16"] = []
        bench_dense_bt16(bw, res["dense_bt16"], save, t0 + a.budget)
        save()
        return
    if a.only not in ("dense",):  # MoE first: the experts are most of a decode step's bytes
        bench_moe(bw, res["moe"], save, t0 + (a.budget if a.only else a.budget * 0.5), a.short)
        if a.write_tables:
            res["tables_picked"] = pick_tables(res["moe"])
            res["tables_written"] = write_tables(res["tables_picked"])
            print("tables:", json.dumps(res["tables_picked"]), res["tables_written"], flush=True)
    if a.only != "moe":
        bench_dense(bw, res["dense"], save, t0 + a.budget)
    save()


if __name__ == "__main__":
    main()
