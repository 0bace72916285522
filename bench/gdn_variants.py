"""Variants of the chunked Gated DeltaNet prefill (issue 4): correctness against the default path, then times.

The variants are chunk.py's module-level switches (WY_FORM, WY_MERGE, PRENORM, H_DECAY_V); each of the
three kernels' launch configs (BV, num_warps, num_stages) is swept on its own (a kernel's time does not
depend on the other kernels' configs), timed per kernel with the torch profiler at 397B heads, T = 8192;
the best config per kernel and variant is then checked and timed whole (do_bench median) at 397B T = 8192,
32768 and 35B heads (HV 32) T = 8192. Single sequence, bf16, bench/gdn.py's random inputs.
    python3 bench/gdn_variants.py --out DIR        # on the GPU: DIR/gdn_variants.json + a table
    python3 bench/gdn_variants.py --ptx            # no GPU needed: registers, spills, shared memory and
                                                   # instruction counts of each kernel/variant for sm_90
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen35_export.kernels.gated_delta_rule import chunk as cm  # noqa: E402
from qwen35_export.kernels.gated_delta_rule import chunk_gated_delta_rule  # noqa: E402

HK, K, V = 16, 128, 128
# most promising first (a sweep past its share of --budget keeps the default configs); "wyfull" (ieee merge)
# is left out: its fp32 [64, 64] products run on FMA units (sm_90 SASS: ~8000 FFMA, 4.8 KB of spills)
def _switches(form: str = "blocks", merge: str = "ieee", prenorm: bool = False, decay_v: bool = False) -> dict:
    """All four of chunk.py's switches (a variant never inherits the module's current defaults)."""
    return dict(WY_FORM=form, WY_MERGE=merge, PRENORM=prenorm, H_DECAY_V=decay_v)


VARIANTS = {
    "default": {},  # chunk.py as committed: full + tf32 + prenorm + decay_v since 2026-12-01
    "blocks": _switches(),  # the earlier default
    "prenorm+decayv": _switches(prenorm=True, decay_v=True),
    "wyfull-tf32x3+prenorm+decayv": _switches("full", "tf32x3", True, True),
    "prenorm": _switches(prenorm=True),
    "wyfull-tf32x3": _switches("full", "tf32x3"),
    "wyfull-tf32+prenorm+decayv": _switches("full", "tf32", True, True),
}
# launch configs (BV, num_warps, num_stages) per kernel; the first is the default in chunk.py
SWEEP = {
    "WY_CONFIG": [cm.WY_CONFIG, (64, 4, 1), (128, 8, 1)],
    "H_CONFIG": [cm.H_CONFIG, (64, 8, 2), (32, 8, 2), (64, 8, 1), (32, 4, 2)],
    "O_CONFIG": [cm.O_CONFIG, (64, 8, 2), (128, 8, 2), (128, 4, 2)],
}
KERNEL_OF = {"WY_CONFIG": "chunk_gdn_wy_kernel", "H_CONFIG": "chunk_gdn_h_kernel", "O_CONFIG": "chunk_gdn_o_kernel"}
# the switches each kernel's code depends on (configs found for one are reused by variants that agree)
DEPENDS = {"WY_CONFIG": ("WY_FORM", "WY_MERGE", "PRENORM"), "H_CONFIG": ("PRENORM", "H_DECAY_V"),
           "O_CONFIG": ("PRENORM",)}
SWITCHES = ("WY_FORM", "WY_MERGE", "PRENORM", "H_DECAY_V", "WY_CONFIG", "H_CONFIG", "O_CONFIG")


def inputs(T: int, HV: int, seed: int = 0):
    """bench/gdn.py's inputs (raw q/k: the kernels normalise), for HV value heads."""
    import torch.nn.functional as F
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, T, HK, K, dtype=torch.bfloat16, device="cuda", generator=gen)
    k = torch.randn(1, T, HK, K, dtype=torch.bfloat16, device="cuda", generator=gen)
    v = torch.randn(1, T, HV, V, dtype=torch.bfloat16, device="cuda", generator=gen)
    g = F.logsigmoid(torch.randn(1, T, HV, device="cuda", generator=gen) + 2.0)  # decay mostly near 1
    beta = torch.rand(1, T, HV, device="cuda", generator=gen)
    return q, k, v, g, beta


class Switches:
    """Set chunk.py's switches for a block, restore them after."""

    def __init__(self, **kw):
        self.kw = kw

    def __enter__(self):
        self.old = {a: getattr(cm, a) for a in SWITCHES}
        for a, val in self.kw.items():
            setattr(cm, a, val)

    def __exit__(self, *exc):
        for a, val in self.old.items():
            setattr(cm, a, val)


def per_kernel_ms(fn, n: int = 10) -> dict:
    """CUDA time per kernel name of one fn() call (torch profiler, mean of n calls)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / n / 1e3 for e in prof.key_averages() if e.device_time_total > 0}


def bench(fn) -> float:
    import triton
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def run_gpu(out_dir: Path, budget_s: float) -> None:
    t0 = time.time()
    el = lambda: f"{time.time() - t0:5.0f} s"  # noqa: E731
    import triton
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                 "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "command": "python3 bench/gdn_variants.py " + " ".join(sys.argv[1:]),
                 "variants": VARIANTS, "sweep": {}, "best_configs": {}, "check": {}, "times_ms": {}, "errors": {}}

    def save():
        (out_dir / "gdn_variants.json").write_text(json.dumps(res, indent=1, default=str))

    # -- 1. per-kernel config sweep at 397B heads, T = 8192 ------------------------------------------
    q, k, v, g, beta = inputs(8192, 64)
    h0 = torch.zeros(1, 64, K, V, device="cuda")
    call = lambda: chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0)  # noqa: E731
    seen: dict = {}  # (kernel, its switches, config) -> ms
    for name, sw in VARIANTS.items():
        base = {a: getattr(cm, a) for a in SWITCHES}
        base.update(sw)
        best = {}
        for knob, cfgs in SWEEP.items():
            key_sw = tuple(base[a] for a in DEPENDS[knob])
            timed = {}
            for cfg in cfgs:
                key = (knob, key_sw, cfg)
                if key not in seen:
                    if time.time() - t0 > budget_s * 0.6 and cfg != cfgs[0]:
                        continue  # out of sweep time: keep the default config
                    try:
                        with Switches(**{**sw, knob: cfg}):
                            seen[key] = per_kernel_ms(call)[KERNEL_OF[knob]]
                    except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: record, go on
                        seen[key] = repr(e)[:300]
                        print(f"{el()} {name} {knob} {cfg}: ERROR {seen[key][:160]}", flush=True)
                    res["sweep"][f"{KERNEL_OF[knob]} {dict(zip(DEPENDS[knob], key_sw))} {cfg}"] = seen[key]
                    if isinstance(seen[key], float):
                        print(f"{el()} {name:30s} {knob} {cfg}: {seen[key] * 1e3:7.1f} us", flush=True)
                if isinstance(seen.get(key), float):
                    timed[cfg] = seen[key]
            if timed:
                best[knob] = min(timed, key=timed.get)
        res["best_configs"][name] = {kn: list(c) for kn, c in best.items()}
        save()

    # -- 2. each variant (best configs) against the fp64 step-by-step reference at T = 1024, then against
    # the default path at the timed sizes (max abs differences), and whole-call times -------------------
    from qwen35_export.kernels.gated_delta_rule import naive_gated_delta_rule
    q, k, v, g, beta = inputs(1024, 64, seed=2)
    h0 = torch.randn(1, 64, K, V, device="cuda") * 0.1
    ro, rh = naive_gated_delta_rule(q, k, v, g, beta, h0)
    for name, sw in VARIANTS.items():
        cfg = {kn: tuple(c) for kn, c in res["best_configs"].get(name, {}).items()}
        try:
            with Switches(**sw, **cfg):
                o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
            res["check"][f"fp64-T1024 {name}"] = {"o_rel_rms": ((o.double() - ro).norm() / ro.norm()).item(),
                                                  "ht_rel_rms": ((ht.double() - rh).norm() / rh.norm()).item()}
        except Exception as e:  # noqa: BLE001
            res["check"][f"fp64-T1024 {name}"] = repr(e)[:300]
        print(f"{el()} vs fp64 at T=1024 {name:30s} {res['check'][f'fp64-T1024 {name}']}", flush=True)
    save()
    ref: dict = {}
    cases = [("397B-T8192", 8192, 64), ("397B-T32768", 32768, 64), ("35B-T8192", 8192, 32)]  # 35B last: recompiles
    for case, T, HV in cases:
        q, k, v, g, beta = inputs(T, HV, seed=1)
        h0 = torch.randn(1, HV, K, V, device="cuda") * 0.1
        for name, sw in VARIANTS.items():
            if time.time() - t0 > budget_s:
                res["errors"][f"{case} {name}"] = "skipped: out of time"
                continue
            cfg = {kn: tuple(c) for kn, c in res["best_configs"].get(name, {}).items()}
            try:
                with Switches(**sw, **cfg):
                    call = lambda: chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0)  # noqa: E731
                    o, ht = call()
                    torch.cuda.synchronize()
                    if name == "default":
                        ref[case] = (o.float(), ht)
                    ro, rh = ref[case]
                    good = bool(torch.isfinite(o).all() and torch.isfinite(ht).all())
                    chk = {"finite": good, "o_max_abs": (o.float() - ro).abs().max().item(),
                           "ht_max_abs": (ht - rh).abs().max().item(),
                           "o_rel_rms": ((o.float() - ro).norm() / ro.norm()).item(),
                           "ht_rel_rms": ((ht - rh).norm() / rh.norm()).item()}
                    res["check"][f"{case} {name}"] = chk
                    ms = bench(call)
                    res["times_ms"][f"{case} {name}"] = ms
                    kern = per_kernel_ms(call, 5) if T == 8192 else {}
                    res["times_ms"][f"{case} {name} per kernel"] = {kk[10:]: round(vv, 4) for kk, vv in kern.items()
                                                                     if kk.startswith("chunk_gdn_")}
                print(f"{el()} {case} {name:30s} {ms:.3f} ms  o max|d| {chk['o_max_abs']:.2e} "
                      f"ht max|d| {chk['ht_max_abs']:.2e}  {res['times_ms'][f'{case} {name} per kernel']}", flush=True)
            except Exception as e:  # noqa: BLE001
                res["errors"][f"{case} {name}"] = repr(e)[:500]
                print(f"{el()} {case} {name}: ERROR {repr(e)[:200]}", flush=True)
            save()
        ref.pop(case, None)
        torch.cuda.empty_cache()
    # -- 3. table --------------------------------------------------------------------------------------
    print("\n| case | variant | ms | vs default | o rel rms vs default | ht rel rms | configs |")
    print("|---|---|---|---|---|---|---|")
    for case, _, _ in cases:
        rows = [(n, res["times_ms"][f"{case} {n}"]) for n in VARIANTS if f"{case} {n}" in res["times_ms"]]
        d = res["times_ms"].get(f"{case} default")
        for n, ms in sorted(rows, key=lambda r: r[1]):
            c = res["check"][f"{case} {n}"]
            print(f"| {case} | {n} | {ms:.3f} | {f'{d / ms:.2f}x' if d else '-'} | {c['o_rel_rms']:.1e} | "
                  f"{c['ht_rel_rms']:.1e} | {res['best_configs'].get(n)} |")
    save()
    print(f"total {time.time() - t0:.0f} s; wrote {out_dir / 'gdn_variants.json'}")


# -- sm_90 compile statistics without a GPU ------------------------------------------------------------
def _sass_stats(compiled) -> dict:
    """Registers/stack from cuobjdump, spills from ptxas -v, instruction counts from the SASS."""
    import os
    import triton
    b = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = subprocess.run([f"{b}/cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([f"{b}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
    n = lambda p: len(re.findall(p, sass))  # noqa: E731
    return {"regs": int(re.search(r"REG:(\d+)", res).group(1)), "stack": int(re.search(r"STACK:(\d+)", res).group(1)),
            "smem": compiled.metadata.shared, "STL": n(r"\bSTL\b"), "LDL": n(r"\bLDL\b"), "LDS": n(r"\bLDS"),
            "STS": n(r"\bSTS"), "BAR": n(r"\bBAR\.SYNC"), "HMMA": n(r"\bHMMA"), "HGMMA": n(r"\bHGMMA"),
            "FFMA": n(r"\bFFMA\b"), "SHFL": n(r"\bSHFL"), "instrs": n(r"/\*[0-9a-f]{4,}\*/\s+[A-Z@]")}


def ptx_stats() -> dict:
    """Compile each kernel x variant x launch config for sm_90 (works on a CPU machine) and count."""
    import triton
    from triton.backends.compiler import GPUTarget

    from qwen35_export.kernels.gated_delta_rule import wy
    HV = 64
    bf, f32 = "*bf16", "*fp32"
    common = dict(H=HK, HV=HV, K=K, V=V, BT=64, BK=K, IS_VARLEN=False)
    wy_sig = dict(k=bf, v=bf, g=f32, beta=f32, w=bf, u=bf, gc=f32, q=bf, qn=bf, kn=bf, T="i32", SQ="i32", SK="i32",
                  SV="i32")
    h_sig = dict(k=bf, w=bf, u=bf, gc=f32, h=bf, vn=bf, h0=f32, ht=f32, T="i32")
    o_sig = dict(q=bf, k=bf, vn=bf, h=bf, gc=f32, o=bf, scale="fp32", T="i32")
    jobs = []
    for form, merge, pre in [("blocks", "ieee", False), ("blocks", "ieee", True), ("full", "ieee", False),
                             ("full", "tf32x3", False), ("full", "ieee", True)]:
        for bv, nw, ns in SWEEP["WY_CONFIG"][:3]:
            c = dict(common, cu_seqlens=None, chunk_indices=None, BC=16, BV=bv, INV=cm._WY_INV_CODE[cm.WY_INV],
                     FORM=cm._WY_FORM_CODE[form], PRENORM=pre,
                     MERGE=cm._WY_MERGE_CODE[merge])
            jobs.append((f"wy {form} {merge} prenorm={pre} {(bv, nw, ns)}", wy.chunk_gdn_wy_kernel, wy_sig, c, nw, ns))
    for norm, dv in [(True, False), (False, False), (False, True)]:
        for bv, nw, ns in SWEEP["H_CONFIG"]:
            c = dict(common, cu_seqlens=None, chunk_offsets=None, BV=bv, USE_H0=True, STORE_HT=True, NORM=norm,
                     DECAY_V=dv)
            jobs.append((f"h norm={norm} decay_v={dv} {(bv, nw, ns)}", cm.chunk_gdn_h_kernel, h_sig, c, nw, ns))
    for norm in (True, False):
        for bv, nw, ns in SWEEP["O_CONFIG"]:
            c = dict(common, cu_seqlens=None, chunk_indices=None, BV=bv, NORM=norm)
            jobs.append((f"o norm={norm} {(bv, nw, ns)}", cm.chunk_gdn_o_kernel, o_sig, c, nw, ns))
    out = {"triton": triton.__version__}
    for name, fn, sig, const, nw, ns in jobs:
        full = dict(sig, **{kk: "constexpr" for kk in const})
        try:
            src = triton.compiler.ASTSource(fn=fn, signature=full, constexprs=const)
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": nw, "num_stages": ns})
            out[name] = _sass_stats(compiled)
        except Exception as e:  # noqa: BLE001 - report and go on
            out[name] = repr(e)[:300]
        print(name, out[name], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/gdn_variants")
    ap.add_argument("--budget", type=float, default=175.0, help="seconds; later sweeps/cases are skipped past it")
    ap.add_argument("--ptx", action="store_true", help="sm_90 compile statistics only (no GPU needed)")
    args = ap.parse_args()
    if args.ptx:
        stats = ptx_stats()
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gdn_variants_ptx.json").write_text(json.dumps(stats, indent=1))
        return
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_gpu(out_dir, args.budget)


if __name__ == "__main__":
    main()
