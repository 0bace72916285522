"""Decode-regime kernels on the device: split-KV decode attention vs torch SDPA, a tile sweep of the dense
FP8 linear at decode token counts (the two largest items of the 35B-A3B decode profile, bench/results/), and
the conv1d op at T = 1 (update kernel, with the prefill kernel it launched before).

    python3 bench/decode_kernels.py --out $OUT [--conv1d-only | --route-only | ...]

Writes decode_kernels.json and prints two tables. Times: medians of CUDA-graph replays (gdn.bench_graph) over
rotating input sets larger than L2; roofline bytes: live KV read once (attention), weight + scales (linear).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from unittest import mock

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gdn import bench_graph, rel  # noqa: E402  (bench/ is on the path when this runs as a script)
from qwen35_export.kernels.attention import decode_attention_triton, naive_decode_attention  # noqa: E402
from qwen35_export.kernels.causal_conv1d import causal_conv1d, causal_conv1d_fwd, naive_causal_conv1d  # noqa: E402
from qwen35_export.kernels.causal_conv1d import conv as conv_mod  # noqa: E402
from qwen35_export.kernels.fp8_linear import fp8_linear_reference  # noqa: E402
from qwen35_export.kernels.fp8_linear.gemm import (fp8_linear_triton, fused_config,  # noqa: E402
                                                   two_kernel_config, wo_config)
from qwen35_export.kernels.moe import (gate_logits_triton, moe_route_triton, moe_router_triton,  # noqa: E402
                                       route_from_logits_triton)
from qwen35_export.kernels.moe.router import GATE_LOGITS_CONFIG  # noqa: E402
from qwen35_export.model.ops import moe_route_math  # noqa: E402
from qwen35_export.runtime.bench import hbm_bandwidth  # noqa: E402

GEOMS = {"35b-a3b": (16, 2), "397b-a17b": (32, 2)}  # (query heads, KV heads), head_dim 256
LINEARS = {  # name: (N, K) of the dense FP8 linears of a layer
    "35b in_proj_qkv": (8192, 2048), "35b in_proj_z": (4096, 2048), "35b out_proj": (2048, 4096),
    "35b q_proj": (8192, 2048), "35b k_proj": (512, 2048), "35b shared up": (512, 2048),
    "35b shared down": (2048, 512),
    "397b in_proj_qkv": (12288, 4096), "397b out_proj": (4096, 8192), "397b q_proj": (16384, 4096),
    "397b shared up": (1024, 4096), "397b shared down": (4096, 1024),
}


def graph_us(fn, n: int = 20) -> float:
    """us per call of `fn` replayed from a CUDA graph of n calls (gdn.py's timing): launch overhead, which the
    engine's graphed decode step does not pay, stays out of the number."""
    return bench_graph(fn, n) * 1e3


def bench_attention(bw: float) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    Tmax, D = 8448, 256
    for geom, (NH, KVH) in GEOMS.items():
        for B, ctx in itertools.product((1, 8, 64), (512, 8192)):
            q = torch.randn(B, 1, NH, D, device="cuda", dtype=torch.bfloat16)
            kc = torch.randn(B, KVH, Tmax, D, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            start = torch.full((B,), ctx - 1, device="cuda")
            lens = torch.ones(B, dtype=torch.int64, device="cuda")
            out = decode_attention_triton(q, kc, vc, start, lens, D ** -0.5)
            ref = naive_decode_attention(q, kc, vc, start, lens, D ** -0.5, torch.float32)
            err = float((out.float() - ref).norm() / ref.norm())
            us = graph_us(lambda: decode_attention_triton(q, kc, vc, start, lens, D ** -0.5))
            # what the graph did before: the cache repeated per query head, masked to T_max (default backend)
            mask = (torch.arange(Tmax, device="cuda") < ctx)[None, None, None, :].expand(B, 1, 1, Tmax)

            def sdpa():
                kf = kc.repeat_interleave(NH // KVH, 1)
                vf = vc.repeat_interleave(NH // KVH, 1)
                return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), kf, vf, attn_mask=mask)

            sdpa_us = graph_us(sdpa, 3)
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                eff_us = graph_us(sdpa, 3)
            live = B * KVH * ctx * D * 2 * 2  # K and V of the live positions, bf16
            rows.append(dict(geom=geom, B=B, ctx=ctx, rel_err=err, triton_us=us, sdpa_default_us=sdpa_us,
                             sdpa_efficient_us=eff_us, live_bytes=live,
                             roofline_pct=live / bw / (us * 1e-6) * 100))
            print(f"attn {geom:10s} B={B:3d} ctx={ctx:5d}: ours {us:8.1f} us ({rows[-1]['roofline_pct']:5.1f}% HBM, "
                  f"err {err:.1e})  sdpa default {sdpa_us:8.1f}  efficient {eff_us:8.1f}", flush=True)
    return rows


# The R <= 64 tile of `_w8a8_gemm_kernel` before the sweep below set two_kernel_config's small-R tiles.
PREV_SMALL_TILE = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)


def rotating_weights(N: int, K: int) -> tuple[list, list]:
    """Weight sets (e4m3 [N, K], block scales) enough to rotate past the 60 MB L2 when replayed in turn."""
    nbuf = max(1, int(4 * 60e6 // (N * K)) + 1)
    ws = [torch.randn(N, K, device="cuda").to(torch.float8_e4m3fn) for _ in range(nbuf)]
    ss = [torch.rand(triton.cdiv(N, 128), triton.cdiv(K, 128), device="cuda") + 0.5 for _ in range(nbuf)]
    return ws, ss


# The FP8 linears an engine's decode graph runs (projections fused at build, graph/fuse_weights.py)
ENGINE_LINEARS = {
    "35b in_proj_qkvz": (12288, 2048), "35b out_proj": (2048, 4096), "35b attn qkv": (9216, 2048),
    "397b in_proj_qkvz": (20480, 4096), "397b out_proj": (4096, 8192), "397b attn qkv": (17408, 4096),
}


def bench_fp8_linear(bw: float, Ms: tuple[int, ...] = (1, 64), splits: tuple[int, ...] = (1,),
                     rows: list | None = None, save=None) -> list[dict]:
    """Tile sweep of the two-kernel path (activation quantisation + GEMM [+ split-K sum], as the engine runs
    it), per linear and token count; with `splits` beyond (1,), the engine's fused linears over a narrower
    tile set, every tile with each K split. Times include the activation quantisation (the earlier
    decode_kernels_h200 rows timed the GEMM alone). `save` runs after each row (a cut run keeps them)."""
    rows = [] if rows is None else rows
    split_sweep = splits != (1,)
    bns, stages = ((16, 32, 64), (3, 5)) if split_sweep else ((16, 32, 64, 128), (3, 5))
    cands = [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, GROUP_M=1, num_warps=w, num_stages=s, SPLIT_K=sk)
             for bn, w, s, sk in itertools.product(bns, (2, 4), stages, splits)]
    cands += [dict(PREV_SMALL_TILE, SPLIT_K=1)]
    linears = ENGINE_LINEARS if split_sweep else LINEARS
    for (name, (N, K)), M in itertools.product(linears.items(), Ms):
        ws, ss = rotating_weights(N, K)
        nbuf = len(ws)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        nbytes = N * K + ss[0].numel() * 4
        res = []
        for cfg in cands:
            c = dict(FUSED=False, **cfg)

            def run():  # every weight set once: a graph replays them in turn, past the L2
                for i in range(nbuf):
                    fp8_linear_triton(x, ws[i], ss[i], c)
            try:
                us = graph_us(run, 4) / nbuf
            except Exception as e:  # a config the compiler rejects (shared memory): skip it
                print("skip", name, c, str(e)[:80])
                continue
            res.append((us, cfg))
        res.sort(key=lambda r: r[0])
        dflt = dict(two_kernel_config(M, N))
        dflt.setdefault("SPLIT_K", 1)
        d_us = next((us for us, c in res if c == dflt), None)
        best_us, best = res[0]
        rows.append(dict(name=name, N=N, K=K, M=M, best=best, best_us=best_us, default_us=d_us,
                         best_roofline_pct=nbytes / bw / (best_us * 1e-6) * 100, top5=[(u, c) for u, c in res[:5]]))
        print(f"fp8 {name:18s} M={M:3d}: best {best_us:7.1f} us ({rows[-1]['best_roofline_pct']:5.1f}% HBM) "
              f"BN={best['BLOCK_N']} w={best['num_warps']} s={best['num_stages']} split={best['SPLIT_K']}; "
              f"default {d_us}", flush=True)
        if save is not None:
            save()
    return rows


def time_linear(x: torch.Tensor, ws: list, ss: list, cfg: dict, ref: torch.Tensor,
                label: str) -> tuple[float, float] | None:
    """(us per call of the whole op with `cfg`, replayed over every weight set in turn: past the L2, its
    relative error against `ref` on set 0), or None for a config the compiler rejects (shared memory)."""
    def run():
        for w, s in zip(ws, ss):
            fp8_linear_triton(x, w, s, cfg)
    try:
        err = float((fp8_linear_triton(x, ws[0], ss[0], cfg).float() - ref).norm() / ref.norm())
        return graph_us(run, 4) / len(ws), err
    except Exception as e:
        print("skip", label, cfg, str(e)[:80], flush=True)
        return None


WO_MS = (1, 8, 64)  # decode token counts of the weight-only sweep
WO_MAX_ERR = 1e-2  # bf16 output rounding is ~2e-3 relative RMS; a wrong config is far off


def wo_candidates(bm: int) -> list[dict]:
    """Weight-only tiles: tensor cores on a BLOCK_M row tile (16: graphs of up to 16 rows, 64: an engine's
    decode graph, whose batch may reach 64), the weight stream shaped by BLOCK_N, stages and K splits."""
    return [dict(WO=True, DOT=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=sk, num_warps=w, num_stages=st)
            for bn, sk, w, st in itertools.product((16, 32, 64), (1, 2, 4, 8), (2, 4), (3, 5))]


def bench_fp8_wo(bw: float, Ms: tuple[int, ...] = WO_MS, rows: list | None = None, save=None) -> list[dict]:
    """The whole op at decode token counts, per engine linear: the weight-only path over its tile sweep
    (BLOCK_M 16 where M <= 16, and 64 as an engine's decode graph runs it) against the two-kernel default
    it replaces and cuBLAS on the BF16 weight (twice the bytes: the BF16 engine's GEMM). Every config's
    output is compared with the contract (unquantised x) before it is timed; one off by more than
    WO_MAX_ERR is reported and left out of the ranking."""
    rows = [] if rows is None else rows
    for (name, (N, K)), M in itertools.product(ENGINE_LINEARS.items(), Ms):
        ws, ss = rotating_weights(N, K)
        nbuf = len(ws)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ref = fp8_linear_reference(x, ws[0], ss[0], dtype=torch.float32)
        nbytes = N * K + ss[0].numel() * 4

        def time_cfg(cfg: dict) -> tuple[float | None, float | None]:
            return time_linear(x, ws, ss, cfg, ref, name) or (None, None)

        two_us, _ = time_cfg(dict(FUSED=False, **two_kernel_config(M, N)))
        wb = [w.to(torch.bfloat16) for w in ws[:max(1, nbuf // 2)]]  # twice the bytes: half the sets past L2

        def bf16():
            for w in wb:
                torch.nn.functional.linear(x, w)
        bf16_us = graph_us(bf16, 4) / len(wb)
        row = dict(name=name, N=N, K=K, M=M, two_kernel_us=two_us, bf16_cublas_us=bf16_us, by_bm={})
        for bm in ((16, 64) if M <= 16 else (64,)):
            res = []
            for cfg in wo_candidates(bm):
                us, err = time_cfg(cfg)
                if us is not None and err > WO_MAX_ERR:
                    print(f"WRONG {name} M={M} {cfg}: rel err {err:.1e}", flush=True)
                elif us is not None:
                    res.append((us, err, cfg))
            if not res:
                print(f"fp8 wo {name} M={M} BM={bm}: no config compiled and agreed", flush=True)
                continue
            res.sort(key=lambda r: r[0])
            dflt = wo_config(M if bm == 16 else 64, N, K)
            d_us = time_cfg(dflt)[0]
            best_us, best_err, best = res[0]
            row["by_bm"][bm] = dict(best=best, best_us=best_us, best_err=best_err, default=dflt, default_us=d_us,
                                   best_roofline_pct=nbytes / bw / (best_us * 1e-6) * 100,
                                   all=[(u, e, c) for u, e, c in res])
            print(f"fp8 wo {name:18s} M={M:3d} BM={bm:2d}: best {best_us:6.1f} us "
                  f"({row['by_bm'][bm]['best_roofline_pct']:5.1f}% HBM, err {best_err:.1e}) BN={best['BLOCK_N']} "
                  f"split={best['SPLIT_K']} w={best['num_warps']} s={best['num_stages']}; default {d_us}; "
                  f"two-kernel {two_us}; bf16 cuBLAS {bf16_us:.1f}", flush=True)
        rows.append(row)
        if save is not None:
            save()
    return rows


def bench_router_gemv(bw: float) -> list[dict]:
    """The router + shared-gate GEMM at decode (35B: [B, 2048] x [264, 2048]^T, 257 live rows padded to 264)
    took 5.3 us per layer at batch 1 in the engine profile, 0.2 TB/s: cuBLAS for other row paddings and
    for the transposed weight layout, to see whether a padding or layout choice at build is a cheap win."""
    rows = []
    for H, live in ((2048, 257), (4096, 513)):
        for B in (1, 8, 64):
            x = torch.randn(B, H, device="cuda", dtype=torch.bfloat16)
            for n in sorted({live, -(-live // 8) * 8, -(-live // 64) * 64, -(-live // 128) * 128}):
                nbuf = max(1, int(4 * 60e6 // (n * H * 2)) + 1)
                ws = [torch.randn(n, H, device="cuda", dtype=torch.bfloat16) for _ in range(nbuf)]
                wt = [w.t().contiguous() for w in ws]  # [H, n]: x @ wt

                def lin():
                    for w in ws:
                        torch.nn.functional.linear(x, w)

                def mm_t():
                    for w in wt:
                        torch.mm(x, w)
                us, us_t = graph_us(lin, 4) / nbuf, graph_us(mm_t, 4) / nbuf
                rows.append(dict(H=H, rows=n, live=live, B=B, linear_us=us, mm_transposed_us=us_t,
                                 hbm_pct=n * H * 2 / bw / (min(us, us_t) * 1e-6) * 100))
                print(f"router gemv H={H} rows={n} B={B}: linear {us:5.2f} us, x @ W^T stored transposed "
                      f"{us_t:5.2f} us", flush=True)
    return rows


ROUTE_GEOMS = {"35b": (2048, 257, 264, 8), "397b": (4096, 513, 520, 10)}  # H, E, L (gate rows, padded), k
# Gate-logits tiles timed beside the default (GATE_LOGITS_CONFIG, untuned; tl.dot needs 16-row tiles, so no
# fewer gate rows per program): other H steps, fewer / more warps, deeper pipelining, wider token tiles.
GATE_LOGITS_CANDIDATES = [dict(BLOCK_H=512), dict(BLOCK_H=128), dict(BLOCK_L=32), dict(num_warps=2),
                          dict(num_warps=8), dict(num_stages=4, BLOCK_H=512), dict(BLOCK_N=32), dict(BLOCK_N=64)]


def bench_moe_route(bw: float) -> list[dict]:
    """qwen35::moe_route at decode: the Triton op (gate-logits kernel + route kernel) against the sequence it
    replaced in the engine's decode graph (F.linear, the Triton router, cast, shared slot cat, padding
    redirect: moe_route_math with qwen35::moe_router patched to the Triton router), both replayed from a
    CUDA graph over gate weights rotated past L2 (`real` given, all rows real: the redirect's ops run as in
    the engine). Also each kernel alone, F.linear alone, and the gate-logits tile candidates."""
    rows = []
    for geom, (H, E, L, k) in ROUTE_GEOMS.items():
        nbuf = max(1, int(4 * 60e6 // (L * H * 2)) + 1)
        ws = [torch.randn(L, H, device="cuda", dtype=torch.bfloat16) * H ** -0.5 for _ in range(nbuf)]
        for B in (1, 8, 64):
            x = torch.randn(B, H, device="cuda", dtype=torch.bfloat16)
            real = torch.ones(B, dtype=torch.bool, device="cuda")
            lg = torch.nn.functional.linear(x, ws[0])

            def per_w(f):
                return graph_us(lambda: [f(w) for w in ws], 4) / nbuf

            with mock.patch.object(torch.ops.qwen35, "moe_router", moe_router_triton):
                old_us = per_w(lambda w: moe_route_math(x, w, E, k, real))
                rw_old, ids_old = moe_route_math(x, ws[0], E, k, real)
            new_us = per_w(lambda w: moe_route_triton(x, w, E, k, real))
            rw, ids = moe_route_triton(x, ws[0], E, k, real)
            same_ids = float((ids.sort(1).values == ids_old.sort(1).values).all(1).float().mean())
            rw_err = float((rw.float().sort(1).values - rw_old.float().sort(1).values).abs().max())
            linear_us = per_w(lambda w: torch.nn.functional.linear(x, w))
            logits_us = per_w(lambda w: gate_logits_triton(x, w))
            route_us = graph_us(lambda: route_from_logits_triton(lg, E, k, real))
            tiles = {}
            for c in GATE_LOGITS_CANDIDATES:
                try:
                    tiles[json.dumps(c, sort_keys=True)] = per_w(lambda w: gate_logits_triton(x, w, c))
                except Exception as e:  # a tile that does not compile (shared memory, registers): no time
                    print(f"  gate logits {c}: {type(e).__name__}", flush=True)
            best = min(tiles.items(), key=lambda t: t[1], default=(None, None))
            # the gate GEMV split over H (fp32 partials the route kernel sums): the whole op per split, its
            # picks against the unsplit op's
            split_us, split_same = {}, {}
            for sh in GATE_SPLITS:
                with mock.patch.dict(GATE_LOGITS_CONFIG, {"SPLIT_H": sh, "SPLIT_H_ONE_ROW": sh}):
                    split_us[sh] = per_w(lambda w: moe_route_triton(x, w, E, k, real))
                    split_same[sh] = float((moe_route_triton(x, ws[0], E, k, real)[1] == ids).all(1).float().mean())
            rows.append(dict(geom=geom, H=H, E=E, L=L, k=k, B=B, old_us=old_us, new_us=new_us,
                             split_h_us=split_us, split_h_rows_same_ids=split_same,
                             linear_us=linear_us, logits_us=logits_us, route_us=route_us,
                             logits_hbm_pct=L * H * 2 / bw / (logits_us * 1e-6) * 100,
                             logits_default=GATE_LOGITS_CONFIG, logits_candidates_us=tiles,
                             rows_same_ids=same_ids, rw_max_abs_diff=rw_err))
            print(f"moe_route {geom:4s} B={B:2d}: new {new_us:5.2f} us (logits {logits_us:5.2f} = "
                  f"{rows[-1]['logits_hbm_pct']:4.1f}% HBM, route {route_us:5.2f}) vs old {old_us:5.2f} us "
                  f"(F.linear alone {linear_us:5.2f}); best logits tile {best[0]} {best[1] or 0:5.2f} us; "
                  f"rows with the old ids {same_ids:.3f}, max |rw diff| {rw_err:.1e}; split H "
                  + ", ".join(f"{sh}: {u:5.2f} us ({split_same[sh]:.3f} same ids)" for sh, u in split_us.items()),
                  flush=True)
    return rows


GATE_SPLITS = (2, 4, 8)  # SPLIT_H values of the gate GEMV timed in bench_moe_route
FUSED_MS = (1, 8, 16)  # decode token counts of the fused-vs-two-kernel rows
FUSED_SPLITS = (2, 4, 8)


def fused_candidates(M: int) -> list[dict]:
    """Fused-path tiles to time at M rows: the per-row fp32 variant with BLOCK_M = M and 8 (an engine built
    for up to 8 sequences runs BLOCK_M 8 at any batch; 16 at M = 16), and the tensor-core variant."""
    bms = sorted({triton.next_power_of_2(M), 8 if M <= 8 else 16})
    rows = [dict(FUSED=True, DOT=False, HW_CVT=False, BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=1, num_warps=w, num_stages=s)
            for bm, bn, w, s in itertools.product(bms, (16, 32, 64), (2, 4), (3, 5))]
    dots = [dict(FUSED=True, DOT=True, HW_CVT=False, BLOCK_M=16, BLOCK_N=bn, SPLIT_K=1, num_warps=w, num_stages=s)
            for bn, w, s in itertools.product((32, 64, 128), (4, 8), (3, 5))]
    return rows + dots


def fused_desc(c: dict) -> str:
    return (f"{'dot' if c['DOT'] else 'rows'} BM{c['BLOCK_M']} BN{c['BLOCK_N']} w{c['num_warps']} "
            f"s{c['num_stages']} split{c['SPLIT_K']}" + (" hw-cvt" if c.get("HW_CVT") else ""))


def bench_fp8_fused(bw: float, Ms: tuple[int, ...] = FUSED_MS, rows: list | None = None, save=None) -> list[dict]:
    """The whole op (`fp8_linear_triton`: what the graph runs) at decode token counts: the two-kernel path
    (quantisation kernel + GEMM, current and previous tile) vs the fused path (defaults, a tile sweep, then
    on the best tile the hardware e4m3 conversion and split-K, both off by default). Every config's output
    is checked against the fp32 simulated reference. Rows go into `rows` as they come, and `save()` runs
    after each (a device call cut short keeps what it measured)."""
    rows = [] if rows is None else rows
    done = {}
    for (name, (N, K)), M in itertools.product(LINEARS.items(), Ms):
        if (N, K, M) in done:  # same shape as an earlier linear: same numbers
            rows.append(dict(done[(N, K, M)], name=name))
            print_fused_row(rows[-1])
            save and save()
            continue
        ws, ss = rotating_weights(N, K)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ref = fp8_linear_reference(x, ws[0], ss[0], quant_act=True, dtype=torch.float32)
        nbytes = N * K + ss[0].numel() * 4
        timed: dict[str, tuple[float, float]] = {}  # config as JSON -> (us, rel err)

        def time_cfg(cfg: dict) -> float | None:
            key = json.dumps(cfg, sort_keys=True)
            if key not in timed:
                r = time_linear(x, ws, ss, cfg, ref, name)
                if r is None:
                    return None
                timed[key] = r
            return timed[key][0]

        two_cfg = dict(FUSED=False, **two_kernel_config(M, N))
        two_us, prev_us = time_cfg(two_cfg), time_cfg(dict(FUSED=False, **PREV_SMALL_TILE))
        dflt = fused_config(M, N)
        d_us = time_cfg(dflt)
        engine8_us = time_cfg(fused_config(8, N)) if M <= 8 else None
        sweep = [(us, c) for c in fused_candidates(M) if (us := time_cfg(c)) is not None]
        sweep.sort(key=lambda r: r[0])
        if not sweep:
            print("fp8 fused", name, M, "no fused config compiled", flush=True)
            continue
        best_us, best = sweep[0]
        splits = [(us, c) for k in FUSED_SPLITS if (us := time_cfg(c := dict(best, SPLIT_K=k))) is not None]
        split_us, split = min(splits, key=lambda r: r[0]) if splits else (None, None)
        hw_us = time_cfg(dict(best, HW_CVT=True))
        row = dict(name=name, N=N, K=K, M=M, two_kernel=two_cfg, two_kernel_us=two_us, prev_tile_us=prev_us,
                   fused_default=dflt, fused_default_us=d_us, fused_bm8_us=engine8_us, best=best,
                   best_us=best_us, best_roofline_pct=nbytes / bw / (best_us * 1e-6) * 100, best_split=split,
                   best_split_us=split_us, best_hw_cvt_us=hw_us, max_rel_err=max(e for _, e in timed.values()),
                   top5=[(u, c) for u, c in sweep[:5]], all={k: v for k, v in timed.items()})
        done[(N, K, M)] = row
        rows.append(row)
        print_fused_row(row)
        save and save()
    return rows


def print_fused_row(r: dict) -> None:
    def us(k: str) -> str:  # a config that did not compile has no time
        return "-" if r[k] is None else f"{r[k]:6.1f}"

    split = f"{us('best_split_us')} us (split {r['best_split']['SPLIT_K']})" if r["best_split"] else "-"
    bm8 = f", BM8 {us('fused_bm8_us')}" if r["M"] <= 8 else ""
    print(f"fp8 fused {r['name']:18s} M={r['M']:3d}: two-kernel {us('two_kernel_us')} us (prev tile "
          f"{us('prev_tile_us')}); fused default {us('fused_default_us')}{bm8}; best {us('best_us')} us "
          f"({r['best_roofline_pct']:5.1f}% HBM) {fused_desc(r['best'])}; best + split-K {split}; best + hw cvt "
          f"{us('best_hw_cvt_us')} us; max rel err {r['max_rel_err']:.1e}", flush=True)


CONV_C, CONV_W = 8192, 4  # 35B-A3B conv_dim: q, k (2 x 16 x 128) and v (32 x 128); kernel width
CONV_TILES = [(64, 1), (128, 1), (128, 2), (256, 2), (256, 4), (512, 4)]  # (BC, num_warps) of the update kernel


def bench_conv1d(bw: float) -> list[dict]:
    """`qwen35_triton::causal_conv1d` at T = 1 (the decode graph's call, through the op) at 35B-A3B geometry:
    the default update tile and a sweep of others, and the prefill kernel the op launched at T = 1 before."""
    rows = []
    default = conv_mod.UPDATE_CONFIG
    for B in (1, 8, 64):
        nbytes = (2 * B * CONV_C + CONV_C * CONV_W + 2 * B * CONV_C * (CONV_W - 1)) * 2  # x, y, w, state in/out
        nbuf = max(1, int(2 * 60e6 // nbytes) + 1)  # input sets rotated past the 60 MB L2
        xs = torch.randn(nbuf, B, 1, CONV_C, device="cuda", dtype=torch.bfloat16)
        ws = torch.randn(nbuf, CONV_C, CONV_W, device="cuda", dtype=torch.bfloat16)
        ss = torch.randn(nbuf, B, CONV_C, CONV_W - 1, device="cuda", dtype=torch.bfloat16)
        lens = torch.ones(B, dtype=torch.int64, device="cuda")
        lens[1::2] = 0  # padded decode rows keep their state
        y, st = causal_conv1d(xs[0], ws[0], ss[0], lens)
        ry, rst = naive_causal_conv1d(xs[0], ws[0], ss[0], lengths=lens)
        err, state_exact = rel(y, ry), bool(torch.equal(st, rst.to(st.dtype)))

        def run():
            for i in range(nbuf):
                causal_conv1d(xs[i], ws[i], ss[i], lens)

        def run_fwd():
            for i in range(nbuf):
                causal_conv1d_fwd(xs[i], ws[i], ss[i], torch.empty_like(ss[i]), lengths=lens)

        sweep = {}
        try:
            for cfg in dict.fromkeys([default, *CONV_TILES]):
                conv_mod.UPDATE_CONFIG = cfg
                sweep[cfg] = graph_us(run, 2) / nbuf
        finally:
            conv_mod.UPDATE_CONFIG = default
        best = min(sweep, key=sweep.get)
        fwd_us = graph_us(run_fwd, 2) / nbuf
        rows.append(dict(C=CONV_C, B=B, rel_err=err, state_exact=state_exact, op_us=sweep[default],
                         default=list(default), best=list(best), best_us=sweep[best], fwd_kernel_us=fwd_us,
                         sweep={str(k): v for k, v in sweep.items()}, bytes=nbytes,
                         roofline_pct=nbytes / bw / (sweep[default] * 1e-6) * 100))
        print(f"conv1d op T=1 C={CONV_C} B={B:3d}: {sweep[default]:6.2f} us ({rows[-1]['roofline_pct']:5.1f}% HBM, "
              f"err {err:.1e}, state exact {state_exact}); best tile {best} {sweep[best]:6.2f} us; "
              f"prefill kernel at T=1 {fwd_us:6.2f} us", flush=True)
    return rows


def report(res: dict, md: Path, png: Path) -> None:
    """Markdown table and plot of a decode_kernels.json (run here, after the device run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"Device: {res['gpu']}, torch {res['torch']}, triton {res['triton']}; CUDA-graph replay medians.", "",
             "| geometry | batch | context | ours (us) | % HBM (live KV) | SDPA default (us) | SDPA efficient (us) "
             "| ours vs default | rel. error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["attention"]:
        lines.append(f"| {r['geom']} | {r['B']} | {r['ctx']} | {r['triton_us']:.1f} | {r['roofline_pct']:.1f} | "
                     f"{r['sdpa_default_us']:.1f} | {r['sdpa_efficient_us']:.1f} | "
                     f"{r['sdpa_default_us'] / r['triton_us']:.1f}x | {r['rel_err']:.1e} |")
    lines += ["", "| FP8 linear | M | best (us) | % HBM | best tile (BLOCK_N, warps, stages) | current default (us) |",
              "|---|---|---|---|---|---|"]
    for r in res.get("fp8_linear", []):
        b = r["best"]
        lines.append(f"| {r['name']} ({r['N']}x{r['K']}) | {r['M']} | {r['best_us']:.1f} | {r['best_roofline_pct']:.1f} | "
                     f"{b['BLOCK_N']}, {b['num_warps']}, {b['num_stages']} | {r['default_us']:.1f} |")
    if res.get("fp8_linear_fused"):
        lines += ["", "| FP8 linear, whole op | M | two-kernel (us) | previous tile (us) | fused default (us) "
                  "| fused BM 8 (us) | best fused (us) | % HBM | best fused config | + split-K (us) | + hw cvt (us) "
                  "| max rel. error |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["fp8_linear_fused"]:
            t = {k: "-" if r[k] is None else f"{r[k]:.1f}" for k in (
                "two_kernel_us", "prev_tile_us", "fused_default_us", "fused_bm8_us", "best_split_us", "best_hw_cvt_us")}
            split = f"{t['best_split_us']} (split {r['best_split']['SPLIT_K']})" if r["best_split"] else "-"
            lines.append(f"| {r['name']} ({r['N']}x{r['K']}) | {r['M']} | {t['two_kernel_us']} | {t['prev_tile_us']} | "
                         f"{t['fused_default_us']} | {t['fused_bm8_us']} | {r['best_us']:.1f} | "
                         f"{r['best_roofline_pct']:.1f} | {fused_desc(r['best'])} | {split} | {t['best_hw_cvt_us']} | "
                         f"{r['max_rel_err']:.1e} |")
    if res.get("conv1d"):
        lines += ["", "| conv1d op, T = 1 | batch | op (us) | % HBM | best tile (BC, warps) | best (us) "
                  "| prefill kernel at T = 1 (us) | rel. error | state exact |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["conv1d"]:
            lines.append(f"| C = {r['C']} | {r['B']} | {r['op_us']:.2f} | {r['roofline_pct']:.1f} | "
                         f"{tuple(r['best'])} | {r['best_us']:.2f} | {r['fwd_kernel_us']:.2f} | {r['rel_err']:.1e} "
                         f"| {r['state_exact']} |")
    md.write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for geom in GEOMS:
        for ctx in (512, 8192):
            rs = [r for r in res["attention"] if r["geom"] == geom and r["ctx"] == ctx]
            ax[0].plot([r["B"] for r in rs], [r["triton_us"] for r in rs], "o-", label=f"ours {geom} ctx {ctx}")
            ax[0].plot([r["B"] for r in rs], [r["sdpa_default_us"] for r in rs], "x--", label=f"SDPA {geom} ctx {ctx}")
            ax[1].plot([r["B"] for r in rs], [r["roofline_pct"] for r in rs], "o-", label=f"{geom} ctx {ctx}")
    ax[0].set(xscale="log", yscale="log", xlabel="batch", ylabel="us per layer", title="decode attention")
    ax[1].set(xscale="log", xlabel="batch", ylabel="% of HBM roofline (live KV bytes)", title="ours vs roofline")
    for x in ax:
        x.grid(alpha=0.3)
        x.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--report", type=Path, help="only write the markdown + plot of this decode_kernels.json")
    ap.add_argument("--fp8-fused-only", action="store_true",
                    help="only the FP8 linear fused-vs-two-kernel rows (they fill a device call on their own)")
    ap.add_argument("--fp8-fused-ms", default=",".join(map(str, FUSED_MS)),
                    help="token counts of those rows, e.g. 1 (one device call) then 8,16 (the next)")
    ap.add_argument("--conv1d-only", action="store_true", help="only the conv1d op rows (a short device call)")
    ap.add_argument("--router-only", action="store_true", help="only the router GEMM paddings / layouts")
    ap.add_argument("--route-only", action="store_true",
                    help="only qwen35::moe_route: Triton gate logits + route kernels vs the op sequence they replace")
    ap.add_argument("--route-quick", action="store_true",
                    help="with --route-only: skip the gate-logits tile candidates (the H splits stay)")
    ap.add_argument("--fp8-wo-only", action="store_true",
                    help="only the weight-only FP8 linear sweep (engine linears, M = 1, 8, 64)")
    ap.add_argument("--fp8-split-only", action="store_true",
                    help="only the two-kernel FP8 linear sweep with split-K (1, 2, 4, 8) at M = 1, 8, 64")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)  # every mode writes its JSON there: a fresh $OUT/sub lacks it
    if a.report:
        report(json.loads(a.report.read_text()), a.out / "decode_kernels_h200.md", a.out / "decode_kernels_h200.png")
        return
    bw = hbm_bandwidth(torch.device("cuda")) or 3.35e12
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "hbm_bytes_per_s": bw}
    fused_ms = tuple(int(m) for m in a.fp8_fused_ms.split(","))
    if a.fp8_fused_only:
        res["fp8_linear_fused"] = []
        bench_fp8_fused(bw, fused_ms, res["fp8_linear_fused"],
                        lambda: (a.out / "decode_kernels.json").write_text(json.dumps(res, indent=1)))
        return
    if a.router_only:
        res["router_gemv"] = bench_router_gemv(bw)
        (a.out / "decode_kernels.json").write_text(json.dumps(res, indent=1))
        return
    if a.route_only:
        if a.route_quick:
            GATE_LOGITS_CANDIDATES.clear()
        res["moe_route"] = bench_moe_route(bw)
        (a.out / "moe_route.json").write_text(json.dumps(res, indent=1))
        return
    if a.fp8_wo_only:
        res["fp8_linear_wo"] = []
        bench_fp8_wo(bw, WO_MS, res["fp8_linear_wo"],
                     lambda: (a.out / "decode_kernels.json").write_text(json.dumps(res, indent=1)))
        return
    if a.fp8_split_only:
        res["fp8_linear"] = []
        bench_fp8_linear(bw, (1, 8, 64), (1, 2, 4, 8), res["fp8_linear"],
                         lambda: (a.out / "decode_kernels.json").write_text(json.dumps(res, indent=1)))
        return
    if a.conv1d_only:
        res["conv1d"] = bench_conv1d(bw)
        (a.out / "decode_kernels.json").write_text(json.dumps(res, indent=1))
        return
    res["attention"] = bench_attention(bw)
    (a.out / "decode_kernels.json").write_text(json.dumps(res, indent=1))
    res["conv1d"] = bench_conv1d(bw)
    (a.out / "decode_kernels.json").write_text(json.dumps(res, indent=1))
    res["fp8_linear"] = bench_fp8_linear(bw)
    (a.out / "decode_kernels.json").write_text(json.dumps(res, indent=1))
    res["fp8_linear_fused"] = bench_fp8_fused(bw, fused_ms)
    (a.out / "decode_kernels.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
