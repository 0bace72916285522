"""One MoE layer at 397B geometry (H 4096, I 1024, E 512, top-10 + gated shared expert) on the GPU.

Side by side, on the same routing: transformers' loop over experts (eager), `torch._grouped_mm` (BF16),
`torch._scaled_grouped_mm` (FP8, row-wise scales, weights re-quantised row-wise for it), and our Triton
experts in BF16 and in FP8 with the checkpoint's 128x128 block scales. The shared expert rides along as
expert 512 with weight sigmoid(x @ w_sg.T) (k = 11 slots per token) for every method.

    PYTHONPATH=. python3 bench/moe.py --out DIR [--tokens 1,8,64,512,4096,16384] [--tune] [--no-loop]

Reports us, TFLOPS, % of the HBM roofline on the bytes of the touched experts (decode) and % of dense peak
(prefill) into DIR/moe.{json,md,png}. `--tune` times a few tile configs of our kernels per token count
first and writes the winners as config tables (DIR/E=...json) to commit into kernels/moe/configs/.
`ours_*` rows are the align path (expert-sorted tiles); `ours_*_pairs` rows, at token counts whose slots fit
PAIRS mode, skip the align kernel (experts.py) with the same tiles, and the phase table has both.
Quick look at decode only (well under 2 minutes): `--tokens 1,8,64 --no-loop`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from qwen35_export.checkpoint.fp8 import quantize_fp8_block
from qwen35_export.kernels.fp8_linear import quantize_act
from qwen35_export.kernels.moe import align_block_size, moe_experts_reference, moe_experts_triton, moe_router_triton
from qwen35_export.kernels.moe.configs import DECODE_MAX_TOKENS, default_config, device_tag, get_config
from qwen35_export.kernels.moe.experts import PAIRS_MAX_SLOTS, combine, down, gate_up

H, I, E, K = 4096, 1024, 512, 10
# --geometry: (H, I, E, k) of each preset's MoE layer; the module constants above are the default's
GEOMETRIES = {"397b-a17b": (4096, 1024, 512, 10), "35b-a3b": (2048, 512, 256, 8)}
HBM_TBS = 3.35  # H100 SXM datasheet; main() takes the detected GPU's figure (runtime.bench.hbm_bandwidth)
PEAK = {"bf16": 989.0, "fp8": 1979.0}  # dense TFLOPS, H100 SXM


def make_layer(dev: str = "cuda") -> dict:
    """Random bf16 experts (+ the shared expert as expert E), their block-fp8 and row-wise-fp8 forms."""
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(E + 1, 2 * I, H, generator=g, device=dev, dtype=torch.bfloat16) * H ** -0.5
    w2 = torch.randn(E + 1, H, I, generator=g, device=dev, dtype=torch.bfloat16) * I ** -0.5
    q13, s13 = (torch.cat(t) for t in zip(*(quantize_fp8_block(c) for c in w13.split(64))))
    q2, s2 = (torch.cat(t) for t in zip(*(quantize_fp8_block(c) for c in w2.split(64))))

    def rowwise(w):  # [E, N, K] -> fp8 [E, N, K], scale [E, N] (one per output column of x @ w.T)
        qs, ss = [], []
        for c in w.split(64):  # chunks: fp32 temporaries of all experts would take 17 GB
            s = (c.float().abs().amax(-1) / 448.0).clamp(min=1e-12)
            qs.append((c.float() / s[..., None]).to(torch.float8_e4m3fn))
            ss.append(s)
        return torch.cat(qs), torch.cat(ss)

    r13, rs13 = rowwise(w13)
    r2, rs2 = rowwise(w2)
    gate = torch.randn(E, H, generator=g, device=dev, dtype=torch.bfloat16) * H ** -0.5
    shared_gate = torch.randn(1, H, generator=g, device=dev, dtype=torch.bfloat16) * H ** -0.5
    return dict(w13=w13, w2=w2, q13=q13, s13=s13, q2=q2, s2=s2, r13=r13, rs13=rs13, r2=r2, rs2=rs2,
                gate=gate, shared_gate=shared_gate)


def route(L: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Router (our kernel) + the shared expert as slot k: (weights [T, K+1] fp32, ids [T, K+1])."""
    w, ids = moe_router_triton(x @ L["gate"].T, K)
    ws = torch.sigmoid((x @ L["shared_gate"].T).float())  # [T, 1]
    return torch.cat([w, ws], 1), torch.cat([ids, torch.full_like(ids[:, :1], E)], 1)


def loop_moe(L, x, w, ids):
    """transformers' form: a Python loop over the experts that got tokens, bf16 index_add."""
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        gu = F.linear(x[tok], L["w13"][e])
        h = F.silu(gu[:, :I]) * gu[:, I:]
        out.index_add_(0, tok, F.linear(h, L["w2"][e]) * w[tok, slot, None].to(x.dtype))
    return out


def _sorted(ids: torch.Tensor):
    flat = ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(E + 1, dtype=torch.int32, device=ids.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    return order, torch.cumsum(counts, 0, dtype=torch.int32)


def grouped_mm_moe(L, x, w, ids):
    order, offs = _sorted(ids)
    tok = order // ids.shape[1]
    gu = torch._grouped_mm(x[tok], L["w13"].transpose(1, 2), offs=offs)  # [M, 2I]
    h = F.silu(gu[:, :I]) * gu[:, I:]
    y = torch._grouped_mm(h, L["w2"].transpose(1, 2), offs=offs)  # [M, H]
    y = y.float() * w.reshape(-1)[order, None]
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tok, y).to(x.dtype)


def _q_rows(a):
    s = (a.float().abs().amax(-1) / 448.0).clamp(min=1e-12)
    return (a.float() / s[:, None]).to(torch.float8_e4m3fn), s


def scaled_grouped_mm_moe(L, x, w, ids):
    order, offs = _sorted(ids)
    tok = order // ids.shape[1]
    xq, xs = _q_rows(x[tok])
    gu = torch._scaled_grouped_mm(xq, L["r13"].transpose(1, 2), xs, L["rs13"], offs=offs, out_dtype=torch.bfloat16)
    hq, hs = _q_rows(F.silu(gu[:, :I]) * gu[:, I:])
    y = torch._scaled_grouped_mm(hq, L["r2"].transpose(1, 2), hs, L["rs2"], offs=offs, out_dtype=torch.bfloat16)
    y = y.float() * w.reshape(-1)[order, None]
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tok, y).to(x.dtype)


def ours_bf16(L, x, w, ids, config=None, pairs=False):
    return moe_experts_triton(x, w, ids, L["w13"], L["w2"], config=config, pairs=pairs)


def ours_fp8(L, x, w, ids, config=None, pairs=False):
    return moe_experts_triton(x, w, ids, L["q13"], L["q2"], L["s13"], L["s2"], config=config, pairs=pairs)


def ours_bf16_pairs(L, x, w, ids, config=None):
    return ours_bf16(L, x, w, ids, config, pairs=True)


def ours_fp8_pairs(L, x, w, ids, config=None):
    return ours_fp8(L, x, w, ids, config, pairs=True)


METHODS = {"loop_bf16": (loop_moe, "bf16"), "grouped_mm_bf16": (grouped_mm_moe, "bf16"),
           "scaled_grouped_mm_fp8": (scaled_grouped_mm_moe, "fp8"), "ours_bf16": (ours_bf16, "bf16"),
           "ours_fp8": (ours_fp8, "fp8"), "ours_bf16_pairs": (ours_bf16_pairs, "bf16"),
           "ours_fp8_pairs": (ours_fp8_pairs, "fp8")}


def pairs_fits(T: int) -> bool:
    """PAIRS mode runs (when asked) up to PAIRS_MAX_SLOTS slots; the default takes it up to PAIRS_MAX_TOKENS."""
    return T * (K + 1) <= PAIRS_MAX_SLOTS


def bench_ms(fn, graph: bool = True) -> float:
    """Median ms; CUDA-graph replays where the function captures (no host syncs), else eager."""
    fn()
    torch.cuda.synchronize()
    if graph:
        try:
            return do_bench_cudagraph(fn, rep=50, return_mode="median")
        except Exception:
            torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def _cfg(bm, gu, dn) -> dict:
    keys = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "FUSED")
    return {"BLOCK_M": bm, "gate_up": dict(zip(keys, gu)), "down": dict(zip(keys, dn))}


def candidates(T: int, dtype: str) -> list[dict]:
    """A few tile configs around the default (tuning is offline: the winners are stored, not searched).
    Tuples are (BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, FUSED gate_up])."""
    decode = T <= DECODE_MAX_TOKENS
    base = default_config(T, E + 1, K + 1, dtype, decode)
    if decode:  # thin weight slices: enough programs to fill 132 SMs even at T = 1 (11 experts)
        tiles = [(32, 32, 4, 6), (32, 64, 4, 6), (64, 32, 8, 4), (32, 32, 8, 4), (16, 32, 4, 6), (64, 64, 4, 4)]
        if dtype == "fp8":  # an e4m3 tile is half the bytes of a bf16 one: wider tiles, deeper pipelines
            tiles += [(64, 64, 4, 5), (64, 64, 4, 6), (64, 32, 4, 6), (128, 64, 8, 4), (128, 128, 8, 3),
                      (64, 64, 8, 6)]
        out = [_cfg(16, (g, 128, 1, w, s), (d, 128, 1, w, s)) for g, d, w, s in tiles]
    else:
        bm = base["BLOCK_M"]
        if dtype == "fp8":  # gate_up BLOCK_N is 128: one activation scale group per program
            bms = [bm, 32 if bm >= 64 else bm * 2]
            tiles = [((128, 128, 8, 8, 3, 1), (128, 128, 8, 8, 4)), ((128, 128, 8, 8, 4, 1), (128, 128, 8, 4, 4)),
                     ((128, 128, 8, 8, 3, 0), (128, 128, 8, 4, 5)), ((128, 128, 8, 8, 3, 0), (256, 128, 8, 8, 3))]
        else:
            bms = [bm, 128 if bm < 128 else 64]
            tiles = [((128, 64, 8, 8, 3, 1), (128, 64, 8, 8, 3)), ((64, 64, 8, 8, 4, 1), (128, 64, 8, 8, 4)),
                     ((128, 64, 8, 8, 3, 0), (256, 64, 8, 8, 3))]
        out = [_cfg(b, gu, dn) for b in bms for gu, dn in tiles]
    seen, uniq = set(), []
    for c in [base] + out:
        if json.dumps(c, sort_keys=True) not in seen:
            seen.add(json.dumps(c, sort_keys=True))
            uniq.append(c)
    return uniq


def breakdown(L: dict, x, w, ids, fp8: bool, cfg: dict, pairs: bool = False) -> dict:
    """us per phase of our experts op (align, gate_up incl. x quantisation, down, combine); `pairs`: PAIRS
    mode, which has no align phase (the kernels take ids.flatten() as their tiles)."""
    quant = fp8 and x.shape[0] > DECODE_MAX_TOKENS
    w13, w2 = (L["q13"], L["q2"]) if fp8 else (L["w13"], L["w2"])
    s13, s2 = (L["s13"], L["s2"]) if fp8 else (None, None)
    tiles = ids.reshape(-1) if pairs else align_block_size(ids, E + 1, cfg["BLOCK_M"])
    h, hs = gate_up(x, tiles, ids.shape[1], w13, s13, cfg, quant)
    y = down(h, hs, w, tiles, w2, s2, cfg, quant, x.dtype)
    t = {} if pairs else {"align": bench_ms(lambda: align_block_size(ids, E + 1, cfg["BLOCK_M"]))}
    t.update({"gate_up": bench_ms(lambda: gate_up(x, tiles, ids.shape[1], w13, s13, cfg, quant)),
              "down": bench_ms(lambda: down(h, hs, w, tiles, w2, s2, cfg, quant, x.dtype)),
              "combine": bench_ms(lambda: combine(y, x.shape[0], ids.shape[1]))})
    if quant:
        t["quant_x"] = bench_ms(lambda: quantize_act(x))
    return {k: v * 1e3 for k, v in t.items()}


def main() -> None:
    global HBM_TBS
    from qwen35_export.runtime.bench import hbm_bandwidth

    if torch.cuda.is_available() and hbm_bandwidth(torch.device("cuda")):
        HBM_TBS = hbm_bandwidth(torch.device("cuda")) / 1e12
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", nargs="+", default=["1,8,64,512,4096,16384"],
                    help="token counts, comma- or space-separated")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--loop-max", type=int, default=512, help="skip the eager loop above this many tokens")
    ap.add_argument("--no-loop", action="store_true", help="skip the eager loop (transformers' form) entirely")
    ap.add_argument("--tune-budget-s", type=float, default=1e9, help="stop tuning (use stored tables) after this")
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="397b-a17b",
                    help="the MoE layer's shapes (35b-a3b: H 2048, I 512, E 256, top-8 + shared)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of METHODS to run")
    ap.add_argument("--masked-k", action="store_true",
                    help="our kernels mask their K loads even without a K tail (experts.EVEN_K_LOADS = False)")
    ap.add_argument("--align-large", action="store_true",
                    help="past SMALL_M slots, force the three-kernel align path (align.LARGE_TRITON = True)")
    ap.add_argument("--align-torch", action="store_true",
                    help="past SMALL_M slots, force the torch-op align path (align.LARGE_TRITON = False)")
    args = ap.parse_args()
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        ap.error(f"--methods: unknown {sorted(unknown)}; known: {', '.join(METHODS)}")
    if args.masked_k:
        from qwen35_export.kernels.moe import experts
        experts.EVEN_K_LOADS = False
    if args.align_large or args.align_torch:
        from qwen35_export.kernels.moe import align
        align.LARGE_TRITON = bool(args.align_large)
    global H, I, E, K
    H, I, E, K = GEOMETRIES[args.geometry]
    tokens = [int(t) for arg in args.tokens for t in arg.split(",") if t]
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name()
    t0 = time.time()
    L = make_layer()
    print(f"{dev}: layer made in {time.time() - t0:.0f}s", flush=True)
    rows, tables, breakdowns = [], {"bf16": {}, "fp8": {}}, []
    for T in tokens:
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        w, ids = route(L, x)
        n_exp = int(torch.unique(ids).numel())
        M = T * (K + 1)
        flops = 2 * M * 3 * H * I
        ref = moe_experts_reference(x, w, ids, L["w13"], L["w2"], dtype=torch.float32)
        router_ms = bench_ms(lambda: moe_router_triton(x @ L["gate"].T, K))
        for name, (fn, dtype) in METHODS.items():
            if name not in args.methods.split(","):
                continue
            if name == "loop_bf16" and (args.no_loop or T > args.loop_max):
                continue
            if name.endswith("_pairs") and not pairs_fits(T):
                continue
            # PAIRS rows take the align rows' tuned tiles (METHODS lists them after): the same tiles, so
            # the two differ only by the align kernel and the tile map.
            kw = {"config": tables[dtype][T]} if name.endswith("_pairs") and T in tables[dtype] else {}
            if (args.tune and name.startswith("ours") and not name.endswith("_pairs")
                    and time.time() - t0 < args.tune_budget_s):
                best, out0 = None, fn(L, x, w, ids)  # the default config's output: candidates must agree
                for cfg in candidates(T, dtype):
                    try:
                        o = fn(L, x, w, ids, config=cfg)
                        diff = ((o.float() - out0.float()).norm() / out0.float().norm()).item()
                        ms = bench_ms(lambda: fn(L, x, w, ids, config=cfg))
                    except Exception as exc:  # a config that does not compile (shared memory) is skipped
                        print(f"  T={T} {name} {cfg}: {type(exc).__name__}", flush=True)
                        continue
                    ok = diff < 1e-2  # accumulation order only; a wrong variant is far off
                    print(f"  tune T={T} {name}: {ms * 1e3:9.1f} us  diff {diff:.1e}{'' if ok else ' WRONG'}  "
                          f"{json.dumps(cfg)}", flush=True)
                    if ok and (best is None or ms < best[0]):
                        best = (ms, cfg)
                tables[dtype][T] = best[1]
                kw = {"config": best[1]}
            try:
                out = fn(L, x, w, ids, **kw)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                ms = bench_ms(lambda: fn(L, x, w, ids, **kw), graph=name != "loop_bf16")
            except Exception as exc:
                print(f"T={T} {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            wbytes = n_exp * 3 * H * I * (1 if dtype == "fp8" else 2)
            tflops = flops / ms / 1e9
            rows.append(dict(T=T, method=name, us=ms * 1e3, tflops=tflops, experts_touched=n_exp,
                             weight_bytes=wbytes, hbm_pct=100 * wbytes / (ms * 1e-3) / (HBM_TBS * 1e12),
                             peak_pct=100 * tflops / PEAK[dtype], rel_err_vs_fp32=err, router_us=router_ms * 1e3))
            r = rows[-1]
            print(f"T={T:6d} {name:22s} {r['us']:10.1f} us {tflops:7.1f} TFLOPS  HBM {r['hbm_pct']:5.1f}%  "
                  f"peak {r['peak_pct']:5.1f}%  err {err:.2e}", flush=True)
        del ref
        for dtype in ("bf16", "fp8"):
            cfg = tables[dtype].get(T) or get_config(E + 1, I, T, x.device, dtype, K + 1, T <= DECODE_MAX_TOKENS)
            for mode in ("align", "pairs") if pairs_fits(T) else ("align",):
                try:
                    phases = breakdown(L, x, w, ids, dtype == "fp8", cfg, pairs=mode == "pairs")
                except Exception as exc:
                    print(f"T={T} ours_{dtype} {mode} phases: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                breakdowns.append(dict(T=T, dtype=dtype, mode=mode, config=cfg, us=phases))
                print(f"T={T:6d} ours_{dtype} {mode} phases (us): "
                      + ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
                      + f", sum {sum(v for k, v in phases.items() if k != 'quant_x'):.1f}", flush=True)
        write(args.out, make_meta(dev), rows, tables if args.tune else None, breakdowns)  # after each T: a cut run keeps data


def make_meta(dev: str) -> dict:
    from qwen35_export.kernels.moe import align, experts

    return dict(device=dev, torch=torch.__version__, triton=triton.__version__, H=H, I=I, E=E, k=K,
                shared_expert=True, hbm_tbs=HBM_TBS, peak_tflops=PEAK,
                even_k_loads=experts.EVEN_K_LOADS, align_large_triton=align.LARGE_TRITON,
                note=f"weights random; shared expert = expert {E} ({K + 1} slots/token); CUDA-graph medians "
                     "except loop_bf16 (eager); hbm_pct counts touched experts' weight bytes only")


def write(out: Path, meta: dict, rows: list[dict], tables: dict | None, breakdowns: list[dict]) -> None:
    dev = meta["device"]
    (out / "moe.json").write_text(json.dumps(dict(meta=meta, rows=rows, phases=breakdowns), indent=1))
    lines = [f"# MoE layer, H {meta['H']}, I {meta['I']}, E {meta['E']}, top-{meta['k']} + shared, {dev}", "", f"torch {meta['torch']}, triton {meta['triton']}; "
             + meta["note"], "", "| T | method | us | TFLOPS | experts | % HBM roofline | % dense peak | rel err |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['method']} | {r['us']:.1f} | {r['tflops']:.1f} | {r['experts_touched']} | "
                     f"{r['hbm_pct']:.1f} | {r['peak_pct']:.1f} | {r['rel_err_vs_fp32']:.1e} |")
    lines += ["", "Our kernels by phase (us, CUDA-graph medians, each phase alone):", "",
              "| T | dtype | mode | BLOCK_M | align | quant x | gate_up (incl. quant x) | down | combine | sum |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for b in breakdowns:
        u = b["us"]
        align = f"{u['align']:.1f}" if "align" in u else "-"  # PAIRS mode has no align phase
        lines.append(f"| {b['T']} | {b['dtype']} | {b.get('mode', 'align')} | {b['config']['BLOCK_M']} | {align} | "
                     f"{u.get('quant_x', 0):.1f} | {u['gate_up']:.1f} | {u['down']:.1f} | {u['combine']:.1f} | "
                     f"{sum(v for k, v in u.items() if k != 'quant_x'):.1f} |")
    (out / "moe.md").write_text("\n".join(lines) + "\n")
    if tables:
        for dtype, tab in tables.items():
            for e in (E, E + 1):  # routed experts alone, and with the shared expert appended
                (out / f"E={e},N={I},device={device_tag(torch.device('cuda'))},dtype={dtype}.json").write_text(
                    json.dumps({str(t): c for t, c in tab.items()}, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
        for m in METHODS:
            rs = [r for r in rows if r["method"] == m]
            if rs:
                ax[0].loglog([r["T"] for r in rs], [r["us"] for r in rs], "o-", label=m)
                ax[1].semilogx([r["T"] for r in rs], [max(r["hbm_pct"], r["peak_pct"]) for r in rs], "o-", label=m)
        ax[0].set(xlabel="tokens", ylabel="us per layer", title=f"MoE layer, {dev}")
        ax[1].set(xlabel="tokens", ylabel="% of the binding roofline",
                  title="max(% HBM on touched weights, % dense peak)")
        ax[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "moe.png", dpi=110)
    except ImportError:
        pass


def replot(result_dir: Path) -> None:
    """Rewrite moe.md / moe.png from a run's moe.json (no GPU needed)."""
    d = json.loads((result_dir / "moe.json").read_text())
    write(result_dir, d["meta"], d["rows"], None, d["phases"])


if __name__ == "__main__":
    main()
