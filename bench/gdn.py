"""Gated DeltaNet kernels on the device: correctness at real sizes, then timings against fla-core and torch.

397B geometry: HK 16, HV 64, K = V = 128. Usage (on a CUDA machine, fla-core importable for the peer):
    python bench/gdn.py --out DIR            # check, tune, bench; writes gdn.json, gdn.md, gdn.png into DIR
    python bench/gdn.py --check-only
fla runs in its own subprocesses (`--peer prefill|decode`): it once crashed the process on a first call.
Decode is timed as CUDA-graph replays (what the runtime does), prefill both as eager calls and as CUDA-graph
replays (the eager call includes our wrapper's host time when it exceeds the GPU time); medians of
triton.testing.do_bench. HBM roofline: 3.35 TB/s (H100 SXM datasheet).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen35_export.kernels.causal_conv1d import (  # noqa: E402
    causal_conv1d_update, causal_conv1d_varlen, naive_causal_conv1d)
from qwen35_export.kernels.gated_delta_rule import (  # noqa: E402
    chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, naive_gated_delta_rule)
from qwen35_export.kernels.gdn_gating import (  # noqa: E402
    gated_rms_norm_fwd, gdn_gating_fwd, naive_gated_rms_norm, naive_gdn_gating)

HK, HV, K, V = 16, 64, 128, 128
HBM = 3.35e12
PREFILL_T = [2048, 8192, 32768, 65536]
DECODE_B = [1, 8, 64, 256]
VARLEN = [4096] * 8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(T: int, B: int = 1, dtype=torch.bfloat16, seed: int = 0, dev: str = "cuda"):
    """Random GDN inputs of the 397B layer (random gates in the model's range)."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(B, T, HK, K, dtype=dtype, device=dev, generator=gen)
    k = torch.randn(B, T, HK, K, dtype=dtype, device=dev, generator=gen)
    v = torch.randn(B, T, HV, V, dtype=dtype, device=dev, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, HV, device=dev, generator=gen) + 2.0)  # decay mostly near 1
    beta = torch.rand(B, T, HV, device=dev, generator=gen)
    return q, k, v, g, beta


def bench(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median ms of fn (events)."""
    import triton
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def bench_graph(fn, n_inner: int = 20) -> float:
    """Median ms per call of fn replayed from a CUDA graph holding n_inner calls (launch gaps removed)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n_inner):
            fn()
    return bench(graph.replay) / n_inner


def prefill_flops(T: int) -> float:
    """FLOPs of the chunked form (BT = 64) per layer: 2 * T * HV * (3 K V + BT (3 K + 2 V))."""
    return 2.0 * T * HV * (3 * K * V + 64 * (3 * K + 2 * V))


# -- correctness --------------------------------------------------------------------------------------
def check() -> dict:
    res: dict = {}
    # varlen batch mixing awkward lengths, random initial state, fp64 oracle
    lens = [1, 63, 64, 65, 200, 1000, 7]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda")
    q, k, v, g, beta = inputs(sum(lens), seed=1)
    h0 = torch.randn(len(lens), HV, K, V, device="cuda") * 0.1
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu)
    ro, rh = naive_gated_delta_rule(q, k, v, g, beta, h0, cu_seqlens=cu)
    res["varlen_bf16"] = {"o": rel(o, ro), "ht": rel(ht, rh)}
    qf, kf, vf = q.float(), k.float(), v.float()
    o, ht = chunk_gated_delta_rule(qf, kf, vf, g, beta, initial_state=h0, cu_seqlens=cu)
    res["varlen_fp32_tf32"] = {"o": rel(o, ro), "ht": rel(ht, rh)}
    # decode, B = 64 with pool and padding row
    B = 64
    q, k, v, g, beta = inputs(1, B, seed=2)
    pool = torch.randn(B + 5, HV, K, V, device="cuda") * 0.1
    slot = torch.randperm(B + 5, device="cuda")[:B]
    h0 = pool[slot].clone()
    o, _ = fused_recurrent_gated_delta_rule(q, k, v, g, beta, state_pool=pool, slot_idx=slot)
    ro, rh = naive_gated_delta_rule(q, k, v, g, beta, h0)
    res["decode_B64"] = {"o": rel(o, ro), "ht": rel(pool[slot], rh)}
    # T = 8192, one sequence: state error at growing T must not grow
    T = 8192
    q, k, v, g, beta = inputs(T, seed=3)
    marks = [512, 1024, 2048, 4096, 8192]
    h = torch.zeros(1, HV, K, V, dtype=torch.float64, device="cuda")
    prev, errs = 0, {}
    for m in marks:
        sl = slice(prev, m)
        ro, h = naive_gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], h)
        o, ht = chunk_gated_delta_rule(q[:, :m], k[:, :m], v[:, :m], g[:, :m], beta[:, :m])
        errs[m] = {"ht": rel(ht, h), "o_last_chunk": rel(o[:, prev:m], ro)}
        prev = m
    res["state_error_vs_T"] = errs
    # conv1d + gating
    C = 2 * HK * K + HV * V
    x = torch.randn(1, 3000, C, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(C, 4, dtype=torch.bfloat16, device="cuda")
    cu = torch.tensor([0, 1, 1000, 3000], device="cuda")
    st = torch.randn(3, C, 3, dtype=torch.bfloat16, device="cuda")
    ry, rs = naive_causal_conv1d(x, w, st, cu_seqlens=cu)
    y, _ = causal_conv1d_varlen(x[0], w, cu, st)
    res["conv1d_varlen"] = {"y": rel(y, ry[0]), "state": rel(st, rs)}
    A_log = torch.empty(HV, device="cuda").uniform_(0.01, 16).log()
    a, b = torch.randn(2, 4096, HV, device="cuda", dtype=torch.bfloat16).unbind(0)
    dt = torch.randn(HV, device="cuda")
    gg, bb = gdn_gating_fwd(A_log, a, dt, b)
    rg, rb = naive_gdn_gating(A_log.double(), a.double(), dt.double(), b.double())
    res["gating"] = {"g": rel(gg, rg), "beta": rel(bb, rb)}
    o = torch.randn(4096, HV, V, dtype=torch.bfloat16, device="cuda")
    z = torch.randn_like(o)
    wn = torch.randn(V, dtype=torch.bfloat16, device="cuda")
    mismatch = gated_rms_norm_fwd(o, z, wn) != naive_gated_rms_norm(o, z, wn)
    res["gated_rms_norm_mismatch_elems"] = int(mismatch.sum())
    return res


# -- timing --------------------------------------------------------------------------------------------
def host_overhead_us(n: int = 200) -> float:
    """CPU time of one eager prefill call at T = 64 (its GPU work is a few us): what a Python caller pays
    per call in launches and allocations, which do_bench's eager timings include when it exceeds the GPU
    time (an AOTI engine launches from C++ and does not pay it)."""
    q, k, v, g, beta = inputs(64)
    h0 = torch.zeros(1, HV, K, V, device="cuda")
    for _ in range(5):
        chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    cpu = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return cpu


def time_ours() -> dict:
    out: dict = {"prefill": {}, "decode": {}, "conv1d": {}, "gating": {}}
    for T in PREFILL_T:
        q, k, v, g, beta = inputs(T)
        h0 = torch.zeros(1, HV, K, V, device="cuda")
        f = lambda: chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0)  # noqa: E731
        out["prefill"][str(T)] = bench(f)
        out.setdefault("prefill_graph", {})[str(T)] = bench_graph(f, n_inner=4)
    q, k, v, g, beta = inputs(sum(VARLEN))
    cu = torch.tensor([0] + torch.tensor(VARLEN).cumsum(0).tolist(), device="cuda")
    from qwen35_export.kernels.gated_delta_rule import prepare_chunk_indices
    ci = prepare_chunk_indices(cu)
    h0 = torch.zeros(len(VARLEN), HV, K, V, device="cuda")
    f = lambda: chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu,  # noqa: E731
                                       chunk_indices=ci)
    out["prefill"]["8x4096"] = bench(f)
    out["prefill_graph"]["8x4096"] = bench_graph(f, n_inner=4)
    out["host_us_per_call_T64"] = host_overhead_us()
    for B in DECODE_B:
        q, k, v, g, beta = inputs(1, B)
        pool = torch.randn(B, HV, K, V, device="cuda") * 0.01
        slot = torch.arange(B, device="cuda")
        out["decode"][str(B)] = bench_graph(
            lambda: fused_recurrent_gated_delta_rule(q, k, v, g, beta, state_pool=pool, slot_idx=slot))
    C = 2 * HK * K + HV * V
    w = torch.randn(C, 4, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(8192, C, dtype=torch.bfloat16, device="cuda")
    cu = torch.tensor([0, 8192], device="cuda")
    st = torch.zeros(1, C, 3, dtype=torch.bfloat16, device="cuda")
    out["conv1d"]["prefill_8192"] = bench(lambda: causal_conv1d_varlen(x, w, cu, st, max_seqlen=8192))
    for B in (1, 64, 256):
        xd = torch.randn(B, C, dtype=torch.bfloat16, device="cuda")
        sp = torch.zeros(B, C, 3, dtype=torch.bfloat16, device="cuda")
        out["conv1d"][f"update_B{B}"] = bench_graph(lambda: causal_conv1d_update(xd, w, sp))
    A_log = torch.zeros(HV, device="cuda")
    dt = torch.zeros(HV, device="cuda")
    for n in (1, 256, 8192):
        a = torch.randn(n, HV, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(n, HV, dtype=torch.bfloat16, device="cuda")
        out["gating"][f"gate_N{n}"] = bench_graph(lambda: gdn_gating_fwd(A_log, a, dt, b))
        o = torch.randn(n, HV, V, dtype=torch.bfloat16, device="cuda")
        z = torch.randn(n, HV, V, dtype=torch.bfloat16, device="cuda")
        wn = torch.ones(V, dtype=torch.bfloat16, device="cuda")
        out["gating"][f"norm_N{n}"] = bench_graph(lambda: gated_rms_norm_fwd(o, z, wn))
    return out


def time_torch_reference() -> dict:
    """The plain-torch step loop (model/ops.py form) where it finishes in seconds."""
    from qwen35_export.model.ops import gated_delta_rule as ref_op  # noqa: F401  (registers the op)
    out: dict = {"prefill": {}, "decode": {}}
    q, k, v, g, beta = inputs(2048)
    h0 = torch.zeros(1, HV, K, V, device="cuda")
    out["prefill"]["2048"] = bench(lambda: torch.ops.qwen35.gated_delta_rule(q, k, v, g, beta, h0), 1, 3)
    for B in DECODE_B:
        q, k, v, g, beta = inputs(1, B)
        h0 = torch.zeros(B, HV, K, V, device="cuda")
        out["decode"][str(B)] = bench(lambda: torch.ops.qwen35.gated_delta_rule(q, k, v, g, beta, h0))
    return out


def time_fla(part: str) -> None:
    """Peer timings, printed one item a line (run in its own process, see the module docstring)."""
    import fla
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_rec

    def emit(sec: str, key: str, val) -> None:
        print("FLA_ITEM " + json.dumps([sec, key, val]), flush=True)

    emit("meta", "version", getattr(fla, "__version__", "?"))
    if part == "prefill":
        for T in PREFILL_T:
            q, k, v, g, beta = inputs(T)
            h0 = torch.zeros(1, HV, K, V, device="cuda")
            f = lambda: fla_chunk(q, k, v, g, beta, initial_state=h0, output_final_state=True,  # noqa: E731
                                  use_qk_l2norm_in_kernel=True)
            emit("prefill", str(T), bench(f))
            try:
                emit("prefill_graph", str(T), bench_graph(f, n_inner=4))
            except Exception as e:  # noqa: BLE001 - keep the eager number, say why the graph one is missing
                emit("graph_errors", f"prefill_{T}", repr(e)[:300])
            if T == 8192:
                o1, h1 = f()
                o2, h2 = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
                emit("agree", "prefill_8192", {"o": rel(o2, o1), "ht": rel(h2, h1)})
        q, k, v, g, beta = inputs(sum(VARLEN))
        cu = torch.tensor([0] + torch.tensor(VARLEN).cumsum(0).tolist(), device="cuda")
        h0 = torch.zeros(len(VARLEN), HV, K, V, device="cuda")
        f = lambda: fla_chunk(q, k, v, g, beta, initial_state=h0, output_final_state=True,  # noqa: E731
                              use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
        emit("prefill", "8x4096", bench(f))
        try:
            emit("prefill_graph", "8x4096", bench_graph(f, n_inner=4))
        except Exception as e:  # noqa: BLE001
            emit("graph_errors", "prefill_8x4096", repr(e)[:300])
        return
    for B in DECODE_B:
        q, k, v, g, beta = inputs(1, B)
        h0 = torch.randn(B, HV, K, V, device="cuda") * 0.01
        # keywords: fla's recurrent signature is (q, k, v, g, gk, gv, beta, ...), beta is not 5th
        f = lambda: fla_rec(q, k, v, g=g, beta=beta, initial_state=h0, output_final_state=True,  # noqa: E731
                            use_qk_l2norm_in_kernel=True)
        emit("decode_eager", str(B), bench(f))
        try:
            emit("decode", str(B), bench_graph(f))
        except Exception as e:  # noqa: BLE001 - keep the eager number, say why the graph one is missing
            emit("graph_errors", str(B), repr(e)[:300])
        if B == 64:
            o1, h1 = f()
            o2, h2 = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
            emit("agree", "decode_64", {"o": rel(o2, o1), "ht": rel(h2, h1)})


def tune() -> dict:
    """Try launch configs at T = 8192 (both second-stage modes) and for decode; apply the fastest."""
    from qwen35_export.kernels.gated_delta_rule import chunk as cm
    from qwen35_export.kernels.gated_delta_rule import recurrent as rm
    out: dict = {"prefill_8192": {}, "decode": {}}
    q, k, v, g, beta = inputs(8192)

    def try_cfg(name: str, **attrs) -> None:
        old = {a: getattr(cm, a) for a in attrs}
        for a, val in attrs.items():
            setattr(cm, a, val)
        try:
            out["prefill_8192"][name] = bench(lambda: chunk_gated_delta_rule(q, k, v, g, beta))
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: report and go on
            out["prefill_8192"][name] = repr(e)[:200]
        for a, val in old.items():
            setattr(cm, a, val)

    cands = [dict(FWD_MODE="fused", FWD_CONFIG=fw) for fw in [(64, 8, 3), (64, 8, 2), (64, 4, 2)]]
    cands += [dict(FWD_MODE="split", H_CONFIG=hc, O_CONFIG=oc)
              for hc in [(64, 4, 2), (64, 8, 2), (32, 4, 2)] for oc in [(64, 4, 2), (128, 8, 2), (128, 4, 2)]]
    for c in cands:
        try_cfg(json.dumps(c), **c)
    ok = {n: t for n, t in out["prefill_8192"].items() if isinstance(t, float)}
    best = json.loads(min(ok, key=ok.get))
    best_t = ok[json.dumps(best)]
    for a, val in best.items():
        setattr(cm, a, tuple(val) if isinstance(val, list) else val)
    c = dict(WY_CONFIG=(128, 4, 1))
    try_cfg(json.dumps(c), **c)
    t_wy = out["prefill_8192"][json.dumps(c)]
    if isinstance(t_wy, float) and t_wy < best_t:
        cm.WY_CONFIG = (128, 4, 1)
        best.update(c)
        best_t = t_wy
    for mode in ("subst", "joint", "power"):  # the blocks form's inverse (the full form has its own merge)
        c = dict(WY_FORM="blocks", WY_INV=mode)
        try_cfg(json.dumps(c), **c)
        t_inv = out["prefill_8192"][json.dumps(c)]
        if isinstance(t_inv, float) and t_inv < best_t:
            cm.WY_FORM, cm.WY_INV = "blocks", mode
            best.update(c)
            best_t = t_inv
    out["chosen_prefill"] = best
    chosen = {}
    for B in DECODE_B:
        q, k, v, g, beta = inputs(1, B)
        pool = torch.randn(B, HV, K, V, device="cuda") * 0.01
        slot = torch.arange(B, device="cuda")
        res = {}
        for cfg in [(16, 1), (16, 2), (32, 2), (32, 4), (64, 4)]:
            rm.RECURRENT_CONFIG = {0: cfg}
            res[cfg] = bench_graph(
                lambda: fused_recurrent_gated_delta_rule(q, k, v, g, beta, state_pool=pool, slot_idx=slot))
            out["decode"][f"B{B} {cfg}"] = res[cfg]
        chosen[B * HV] = min(res, key=res.get)
    chosen[0] = chosen[min(chosen)]
    rm.RECURRENT_CONFIG = chosen
    out["chosen_decode"] = {str(kk): vv for kk, vv in chosen.items()}
    out.update(tune_conv1d())
    return out


# conv1d prefill sweep: (C, width of the fused projection output x is a column slice of) for 397B, 35B
CONV_GEOMETRIES = [(2 * HK * K + HV * V, 2 * HK * K + 2 * HV * V), (8192, 8192 + 4096)]
CONV_CANDIDATES = (
    [("tile", bt, bc, nt, nw) for bt in (8, 16, 32) for bc in (256, 512) for nt in (4, 16) for nw in (4, 8)]
    + [("tile", 64, 128, 1, 4)]
    + [("window", bt, bc, nt, nw) for bt in (4, 8) for bc in (256, 512) for nt in (32, 64) for nw in (4, 8)])


def tune_conv1d(T: int = 8192) -> dict:
    """Sweep the conv1d prefill variants/tiles (conv.FWD_CONFIG) at T = 8192 on x that is a column slice of
    a fused projection output (as in the model), per geometry; us and % of the HBM roofline (x read once
    + y written once). Sets FWD_CONFIG to the best summed over geometries; checks it against fp64."""
    from qwen35_export.kernels.causal_conv1d import causal_conv1d_fwd
    from qwen35_export.kernels.causal_conv1d import conv as conv_mod
    hbm = 4.8e12 if "H200" in torch.cuda.get_device_name() else HBM
    old = conv_mod.FWD_CONFIG
    res: dict = {"conv1d_hbm_bytes_per_s": hbm, "conv1d_prefill_8192": {}}
    total: dict = {}
    ran = {cfg: 0 for cfg in CONV_CANDIDATES}
    for C, width in CONV_GEOMETRIES:
        w = torch.randn(C, 4, dtype=torch.bfloat16, device="cuda")
        x = torch.randn(1, T, width, dtype=torch.bfloat16, device="cuda")[..., :C]  # row stride `width`
        st = torch.randn(1, C, 3, dtype=torch.bfloat16, device="cuda")
        fin = torch.empty_like(st)
        lengths = torch.full((1,), T, dtype=torch.int64, device="cuda")
        byts = 2 * T * C * 2
        for cfg in CONV_CANDIDATES:
            conv_mod.FWD_CONFIG = cfg
            try:
                ms = bench(lambda: causal_conv1d_fwd(x, w, st, fin, lengths=lengths))
            except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
                res["conv1d_prefill_8192"][f"C{C} {cfg}"] = repr(e)[:200]
                continue
            pct = byts / (ms * 1e-3) / hbm * 100
            res["conv1d_prefill_8192"][f"C{C} {cfg}"] = {"us": round(ms * 1e3, 1), "hbm_pct": round(pct, 1)}
            total[cfg] = total.get(cfg, 0.0) + ms
            ran[cfg] += 1
            print(f"conv1d C={C} {cfg}: {ms * 1e3:.1f} us, {pct:.0f}% of HBM", flush=True)
    done = {c: t for c, t in total.items() if ran[c] == len(CONV_GEOMETRIES)}  # timed at every geometry
    conv_mod.FWD_CONFIG = min(done, key=done.get) if done else old
    res["chosen_conv1d"] = conv_mod.FWD_CONFIG
    # the chosen config against the fp64 reference at the real size, strided x, state in and out
    C, width = CONV_GEOMETRIES[0]
    x = torch.randn(2, 1000, width, dtype=torch.bfloat16, device="cuda")[..., :C]
    w = torch.randn(C, 4, dtype=torch.bfloat16, device="cuda")
    st = torch.randn(2, C, 3, dtype=torch.bfloat16, device="cuda")
    lengths = torch.tensor([1000, 517], device="cuda")
    fin = torch.empty_like(st)
    y = causal_conv1d_fwd(x, w, st, fin, lengths=lengths)
    ry, rs = naive_causal_conv1d(x, w, st, lengths=lengths)
    res["conv1d_chosen_check"] = {"y": rel(y, ry), "state_exact": bool(torch.equal(fin, rs.to(fin.dtype)))}
    return res


def breakdown(T: int = 8192) -> dict:
    """CUDA time per kernel of one prefill call (torch profiler), to see which stage to work on next."""
    from torch.profiler import ProfilerActivity, profile
    q, k, v, g, beta = inputs(T)
    for _ in range(3):
        chunk_gated_delta_rule(q, k, v, g, beta)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            chunk_gated_delta_rule(q, k, v, g, beta)
        torch.cuda.synchronize()
    return {e.key[:60]: e.device_time_total / 5 / 1e3 for e in prof.key_averages() if e.device_time_total > 0}


def run_peer(part: str, timeout: int = 240) -> dict:
    """fla in a fresh process; results stream back line by line so a crash keeps what was measured."""
    got: dict = {}
    err = None
    try:
        p = subprocess.run([sys.executable, __file__, "--peer", part], capture_output=True, text=True,
                           timeout=timeout)
        so, rc, se = p.stdout, p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        so, rc, se = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), -1, "timeout"
    for line in so.splitlines():
        if line.startswith("FLA_ITEM "):
            sec, key, val = json.loads(line[len("FLA_ITEM "):])
            got.setdefault(sec, {})[key] = val
    if rc != 0:
        err = f"fla {part} exited {rc}: {se[-800:]}"
        got.setdefault("errors", []).append(err)
    return got


def report(res: dict, out_dir: Path) -> str:
    ours, fla, ref = res["ours"], res.get("fla", {}), res.get("torch", {})
    hbm = 4.8e12 if "H200" in res["device"] else HBM  # the roofline of the GPU the run was on
    lines = ["# Gated DeltaNet kernels, 397B layer (HK 16, HV 64, K = V = 128), bf16 q/k/v, fp32 state", "",
             f"Device: {res['device']}; torch {res['torch_version']}; triton {res['triton_version']}; "
             f"fla-core {fla.get('version', 'n/a')}. Medians; decode = CUDA-graph replay per layer call.", "",
             *([res["notes"], ""] if "notes" in res else []),
             "## Prefill (chunked)", "",
             "Eager: one Python call per timing (do_bench); graphed: the calls replayed from a CUDA graph, which "
             "removes the host's launch work (what an AOTI engine sees). TFLOPS from the graphed time.", "",
             "| T | ours ms (eager) | fla ms (eager) | eager speed-up | ours ms (graphed) | fla ms (graphed) | "
             "graphed speed-up | tok/s (graphed) | TFLOPS | torch ref ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x, d=3: f"{x:.{d}f}" if x else "n/a"  # noqa: E731
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "n/a"  # noqa: E731
    for key, ms in ours["prefill"].items():
        T = sum(VARLEN) if key == "8x4096" else int(key)
        f = fla.get("prefill", {}).get(key)
        og, fg = ours.get("prefill_graph", {}).get(key), fla.get("prefill_graph", {}).get(key)
        r = ref.get("prefill", {}).get(key)
        best = og or ms
        lines.append(f"| {key} | {ms:.3f} | {fmt(f)} | {ratio(f, ms)} | {fmt(og)} | {fmt(fg)} | {ratio(fg, og)} | "
                     f"{T / best * 1e3:.3g} | {prefill_flops(T) / best / 1e9:.1f} | {f'{r:.1f}' if r else '-'} |")
    if "host_us_per_call_T64" in ours:
        lines += ["", f"Host time of one eager call of ours (T = 64, CPU side): {ours['host_us_per_call_T64']:.0f} us."]
    lines += ["", "## Decode (one token per sequence, state pool updated in place)", "",
              f"| B | ours us | HBM GB/s | % of {hbm / 1e12:.2f} TB/s | fla us (graph) | fla us (eager) | speed-up vs fla graph | torch ref us |",
              "|---|---|---|---|---|---|---|---|"]
    for key, ms in ours["decode"].items():
        B = int(key)
        byts = B * HV * K * V * 4 * 2
        f = fla.get("decode", {}).get(key)
        fe = fla.get("decode_eager", {}).get(key)
        r = ref.get("decode", {}).get(key)
        lines.append(f"| {B} | {ms * 1e3:.2f} | {byts / ms / 1e6:.0f} | {byts / (ms * 1e-3) / hbm * 100:.0f}% | "
                     f"{f'{f * 1e3:.2f}' if f else 'n/a'} | {f'{fe * 1e3:.1f}' if fe else 'n/a'} | "
                     f"{f'{f / ms:.2f}x' if f else 'n/a'} | {f'{r * 1e3:.0f}' if r else '-'} |")
    C = 2 * HK * K + HV * V
    lines += ["", "## Conv1d and gating", "", "| kernel | us | % of HBM roofline |", "|---|---|---|"]
    if "bytes_per_elem_note" in res:
        lines.insert(len(lines) - 2, res["bytes_per_elem_note"] + "\n")
    for key, ms in ours["conv1d"].items():
        n = 8192 if key.startswith("prefill") else int(key.split("B")[1])
        byts = n * C * 2 * 2 + (0 if key.startswith("prefill") else n * C * 3 * 2 * 2)
        lines.append(f"| conv1d {key} | {ms * 1e3:.1f} | {byts / (ms * 1e-3) / hbm * 100:.0f}% |")
    for key, ms in ours["gating"].items():
        n = int(key.split("N")[1])
        # bytes per element: a, b read (bf16), g, beta written (fp32); o, z read and y written (bf16)
        per = res.get("bytes_per_elem", {"gate": 12, "norm": 6})
        byts = n * HV * per["gate"] if key.startswith("gate") else n * HV * V * per["norm"]
        lines.append(f"| {key} | {ms * 1e3:.1f} | {byts / (ms * 1e-3) / hbm * 100:.0f}% |")
    tune_res = res.get("tune", {})
    lines += ["", "## Launch configs", "", f"Prefill (chosen at T = 8192 among {len(tune_res.get('prefill_8192', {}))} "
              f"tried, see gdn.json): `{json.dumps(tune_res.get('chosen_prefill'))}`; decode by N*HV: "
              f"`{json.dumps(tune_res.get('chosen_decode'))}`.", "",
              "CUDA time per kernel of one T = 8192 prefill (ms): `" + json.dumps(
                  {k_: round(v_, 3) if isinstance(v_, float) else v_
                   for k_, v_ in res.get("breakdown_8192", {}).items()}) + "`",
              "", "## Correctness on the device (relative RMS error vs fp64 step-by-step reference)", "",
              "```", json.dumps(res.get("check", {}), indent=1),
              "fla vs ours: " + json.dumps(fla.get("agree", {}), indent=1),
              "fla errors: " + json.dumps(fla.get("errors", [])), "```"]
    md = "\n".join(lines) + "\n"
    (out_dir / "gdn.md").write_text(md)
    return md


def plot(res: dict, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    sec = "prefill_graph" if res["ours"].get("prefill_graph") else "prefill"  # graphed when it was timed
    keys = list(res["ours"][sec])
    x = range(len(keys))
    ax[0].bar([i - 0.2 for i in x], [res["ours"][sec][k_] for k_ in keys], 0.4, label="ours")
    fla = res.get("fla", {}).get(sec, {})
    ax[0].bar([i + 0.2 for i in x], [fla.get(k_) or 0 for k_ in keys], 0.4, label="fla 0.6.0")
    ax[0].set_xticks(list(x), keys)
    ax[0].set_ylabel("ms per layer")
    ax[0].set_title(f"prefill (T){', CUDA graph' if sec == 'prefill_graph' else ''}")
    ax[0].legend()
    keys = list(res["ours"]["decode"])
    x = range(len(keys))
    ax[1].bar([i - 0.2 for i in x], [res["ours"]["decode"][k_] * 1e3 for k_ in keys], 0.4, label="ours")
    fla = res.get("fla", {}).get("decode", {})
    ax[1].bar([i + 0.2 for i in x], [(fla.get(k_) or 0) * 1e3 for k_ in keys], 0.4, label="fla 0.6.0 (graph)")
    ax[1].set_xticks(list(x), keys)
    ax[1].set_yscale("log")
    ax[1].set_ylabel("us per layer")
    ax[1].set_title("decode (B)")
    ax[1].legend()
    fig.suptitle(f"Gated DeltaNet, 397B layer, {res['device']}")
    fig.tight_layout()
    fig.savefig(out_dir / "gdn.png", dpi=110)


def save(res: dict, out_dir: Path) -> None:
    (out_dir / "gdn.json").write_text(json.dumps(res, indent=1, default=str))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--no-tune", action="store_true", help="keep the launch configs in the code")
    ap.add_argument("--conv1d-only", action="store_true",
                    help="only the conv1d prefill sweep (tune_conv1d); writes conv1d_tune.json into --out")
    ap.add_argument("--peer", choices=["prefill", "decode"], help="internal: time fla in this process")
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    if args.peer:
        time_fla(args.peer)
        return
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.conv1d_only:
        conv = {"device": torch.cuda.get_device_name(), "torch_version": torch.__version__, **tune_conv1d()}
        (out_dir / "conv1d_tune.json").write_text(json.dumps(conv, indent=1, default=str))
        print(json.dumps({k: conv[k] for k in ("chosen_conv1d", "conv1d_chosen_check")}))
        return
    import triton
    res = {"device": torch.cuda.get_device_name(), "torch_version": torch.__version__,
           "triton_version": triton.__version__, "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "python3 bench/gdn.py " + " ".join(sys.argv[1:])}
    t0 = time.time()
    try:
        res["check"] = check()
    except Exception as e:  # noqa: BLE001 - report it and still time the kernels
        res["check"] = {"error": repr(e)[:500]}
    print("check", json.dumps(res["check"]), f"({time.time() - t0:.0f} s)", flush=True)
    save(res, out_dir)
    if args.check_only:
        return
    if not args.no_tune:
        res["tune"] = tune()
        print("tune", json.dumps(res["tune"]), f"({time.time() - t0:.0f} s)", flush=True)
        save(res, out_dir)
    try:
        res["breakdown_8192"] = breakdown()
    except Exception as e:  # noqa: BLE001
        res["breakdown_8192"] = {"error": repr(e)[:300]}
    print("breakdown", json.dumps(res["breakdown_8192"]), flush=True)
    res["ours"] = time_ours()
    print("ours", json.dumps(res["ours"]), f"({time.time() - t0:.0f} s)", flush=True)
    save(res, out_dir)
    if not args.no_peer:
        fla: dict = {}
        for part in ("prefill", "decode"):
            got = run_peer(part)
            if part == "decode" and "errors" in got and not got.get("decode"):
                got = run_peer(part)  # fla's recurrent kernel has crashed on a first call before: retry once
            for sec, d in got.items():
                if isinstance(d, dict):
                    fla.setdefault(sec, {}).update(d)
                else:
                    fla.setdefault(sec, []).extend(d)
        fla["version"] = fla.get("meta", {}).get("version", "?")
        res["fla"] = fla
        print("fla", json.dumps(fla), f"({time.time() - t0:.0f} s)", flush=True)
        save(res, out_dir)
    try:
        res["torch"] = time_torch_reference()
    except Exception as e:  # noqa: BLE001
        res["torch"] = {"error": repr(e)[:300]}
    save(res, out_dir)
    print(report(res, out_dir))
    try:
        plot(res, out_dir)
    except Exception as e:  # noqa: BLE001 - the table and JSON matter more than the picture
        print("plot failed:", e)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "0")
    main()
