"""BF16 decode linears: the small-M swapped-operand kernel (kernels/linear) against cuBLAS (F.linear) on the
dense projections a BF16 engine's decode graphs run, on the GPU.

    PYTHONPATH=. python3 bench/linear_decode.py --out DIR [--budget SECONDS]

Per linear (projections fused as graph/fuse_weights.py builds them for BF16) and M = 1, 8, 64 rows: cuBLAS,
our untuned default for a graph of up to 64 rows (`small_m_config(64, ...)`, what one decode graph would
take) and, at M <= 16, for a graph of up to 16, then a tile sweep (BLOCK_N, BLOCK_K, K splits, pipeline
depth; the token tile of each kind of graph). Weight sets rotate past the L2 (each replay reads HBM); a
config's output is checked against fp32 F.linear first (a wrong one is reported, never ranked). Times: medians
of CUDA-graph replays (decode_kernels.graph_us). % HBM: weight bytes / time / the GPU's bandwidth.
Writes DIR/linear_decode.{json,md,png} as it goes (a cut run keeps its rows).
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

from decode_kernels import graph_us  # noqa: E402
from qwen35_export.kernels.linear import linear_small_m, small_m_config  # noqa: E402
from qwen35_export.runtime.bench import hbm_bandwidth  # noqa: E402

# BF16 engine decode linears (N, K): GDN in_proj (qkv, z, b, a fused), out_proj, attention qkv (q with its
# gate, k, v fused), o_proj
LINEARS = {
    "35b in_proj_qkvzba": (12352, 2048), "35b out_proj": (2048, 4096), "35b attn qkv": (9216, 2048),
    "35b attn o_proj": (2048, 4096),
    "397b in_proj_qkvzba": (20608, 4096), "397b out_proj": (4096, 8192), "397b attn qkv": (17408, 4096),
    "397b attn o_proj": (4096, 8192),
}
MS = (1, 8, 64)
MAX_ERR = 1e-2  # vs fp32: bf16 output rounding is ~2e-3 relative RMS; a wrong config is far off


def rotating(N: int, K: int) -> list[torch.Tensor]:
    """BF16 weight sets enough to rotate past the 60 MB L2 when replayed in turn."""
    n = max(2, int(4 * 60e6 // (N * K * 2)) + 1)
    return [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for _ in range(n)]


def candidates(bt: int, K: int) -> list[dict]:
    steps = triton.cdiv(K, 128)
    # few distinct kernels (each BLOCK_N / BLOCK_T / stages set compiles once, twice with M = 1's
    # specialisation): the compiles, not the timings, are most of a sweep's time
    return [dict(BLOCK_N=bn, BLOCK_T=bt, BLOCK_K=128, SPLIT_K=sk, num_warps=4, num_stages=st)
            for bn, sk, st in itertools.product((64, 128), (1, 2, 4, 8), (3, 4)) if sk <= steps]


def desc(c: dict | None) -> str:
    return "-" if not c else ",".join(f"{k}={c[k]}" for k in ("BLOCK_N", "BLOCK_T", "BLOCK_K", "SPLIT_K",
                                                               "num_stages"))


def time_fn(fn, ws: list) -> float:
    def run():
        for w in ws:
            fn(w)
    return graph_us(run, 4) / len(ws)


def bench(bw: float, rows: list, save, deadline: float) -> None:
    for (name, (N, K)), M in itertools.product(LINEARS.items(), MS):
        if time.time() > deadline:
            print("out of time", flush=True)
            return
        ws = rotating(N, K)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x.float(), ws[0].float())
        nbytes = N * K * 2

        def ours(cfg):  # (us, rel err) or None when the compiler rejects the tile
            try:
                err = float((linear_small_m(x, ws[0], cfg).float() - ref).norm() / ref.norm())
                return time_fn(lambda w: linear_small_m(x, w, cfg), ws), err
            except Exception as e:  # noqa: BLE001  (a tile past the shared memory: skip it, say so)
                print("skip", name, desc(cfg), str(e)[:80], flush=True)
                return None

        row = dict(name=name, N=N, K=K, M=M, bytes=nbytes,
                   cublas_us=time_fn(lambda w: torch.nn.functional.linear(x, w), ws), by_graph={})
        for graph_rows in ((16, 64) if M <= 16 else (64,)):
            dflt = small_m_config(graph_rows, N, K)
            d = ours(dict(dflt))
            res = []
            for cfg in candidates(dflt["BLOCK_T"], K):
                if time.time() > deadline:
                    break
                r = ours(cfg)
                if r is None:
                    continue
                if r[1] > MAX_ERR:
                    print(f"WRONG {name} M={M} {desc(cfg)}: rel err {r[1]:.1e}", flush=True)
                    continue
                res.append((r[0], r[1], cfg))
            res.sort(key=lambda t: t[0])
            best = res[0] if res else (None, None, None)
            row["by_graph"][graph_rows] = dict(
                default=dflt, default_us=d and d[0], default_err=d and d[1], best=best[2], best_us=best[0],
                best_err=best[1], top=[(u, e, desc(c)) for u, e, c in res[:8]])
            print(f"{name:20s} M={M:3d} graph<={graph_rows:2d}: cuBLAS {row['cublas_us']:.1f} us, default "
                  f"{d and round(d[0], 1)} ({desc(dflt)}), best {best[0] and round(best[0], 1)} ({desc(best[2])})",
                  flush=True)
        row["cublas_pct"] = nbytes / bw / (row["cublas_us"] * 1e-6) * 100
        rows.append(row)
        save()


def report(res: dict, out: Path) -> None:
    bw = res["hbm_bytes_per_s"]
    pct = lambda r, us: "-" if not us else f"{r['bytes'] / bw / (us * 1e-6) * 100:.0f}"  # noqa: E731
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [f"# BF16 decode linears: small-M Triton kernel vs cuBLAS, {res['gpu']}", "",
             f"torch {res['torch']}, triton {res['triton']}; CUDA-graph replays, weights rotated past the L2; "
             "`python3 bench/linear_decode.py` (see its docstring). us per call; % of HBM on the weight bytes.", "",
             "| linear (N x K) | M | graph rows | cuBLAS | % | ours default | % | ours best | % | best tile | "
             "best / cuBLAS |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        for g, b in r["by_graph"].items():
            ratio = "-" if not b["best_us"] else f"{r['cublas_us'] / b['best_us']:.2f}x"
            lines.append(f"| {r['name']} ({r['N']}x{r['K']}) | {r['M']} | {g} | {f(r['cublas_us'])} | "
                         f"{pct(r, r['cublas_us'])} | {f(b['default_us'])} | {pct(r, b['default_us'])} | "
                         f"{f(b['best_us'])} | {pct(r, b['best_us'])} | {desc(b['best'])} | {ratio} |")
    (out / "linear_decode.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [(f"{r['name']} M{r['M']}", r, r["by_graph"].get(64) or r["by_graph"].get("64")) for r in res["rows"]]
    rows = [t for t in rows if t[2]]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(12, 5))
    xs = range(len(rows))
    for off, lab, get in ((-0.27, "cuBLAS", lambda r, b: r["cublas_us"]),
                          (0.0, "ours default (64-row graph)", lambda r, b: b["default_us"]),
                          (0.27, "ours best (64-row graph)", lambda r, b: b["best_us"])):
        ax.bar([i + off for i in xs], [100 * r["bytes"] / bw / ((get(r, b) or float("inf")) * 1e-6)
                                       for _, r, b in rows], 0.27, label=lab)
    ax.set_xticks(list(xs), [n for n, _, _ in rows], rotation=75, fontsize=7)
    ax.set_ylabel("% of HBM roofline (weight bytes)")
    ax.set_title(f"BF16 decode linears, {res['gpu']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "linear_decode.png", dpi=120)
    plt.close(fig)  # the report is rewritten after every row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds; no new rows or configs after it")
    ap.add_argument("--report", action="store_true", help="only rewrite the markdown + plot of DIR/linear_decode.json")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.report:
        report(json.loads((a.out / "linear_decode.json").read_text()), a.out)
        return
    bw = hbm_bandwidth(torch.device("cuda")) or 3.35e12
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "hbm_bytes_per_s": bw, "rows": []}

    def save():
        (a.out / "linear_decode.json").write_text(json.dumps(res, indent=1, default=str))
        report(res, a.out)

    bench(bw, res["rows"], save, time.time() + a.budget)
    save()


if __name__ == "__main__":
    main()
