"""Where a layer's time goes, without building an engine: one GDN and one attention layer at full geometry
(random weights, fused and optionally FP8-quantised the way `build` does it), compiled with Inductor (the
compiler AOTInductor runs), the `qwen35::*` ops dispatched to their Triton kernels. Prefill is timed per call
(CUDA events), decode as CUDA-graph replays; each shape also gets a torch-profiler kernel table.

    python3 bench/profile_layers.py --out $OUT/profile.json [--preset 35b-a3b] [--dtype bf16,fp8]
        [--prefill 512,8192] [--decode 1,8,64] [--context 512]

Minutes instead of a 4-minute engine build per variant: the device call that uses this can try kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gdn import bench_graph  # noqa: E402  (CUDA-graph replay timing shared by the bench scripts)
from qwen35_export.config import LINEAR_ATTENTION, preset  # noqa: E402
from qwen35_export.graph.fuse_weights import fuse_layer_weights  # noqa: E402
from qwen35_export.graph.quantize_fp8 import quantize_layer_fp8  # noqa: E402
from qwen35_export.graph.substitute_custom_ops import triton_implementations  # noqa: E402
from qwen35_export.model import layers  # noqa: E402
from qwen35_export.model.weights import layer_weight_shapes  # noqa: E402

DEV = "cuda"


def route_ops_to_triton() -> list[str]:
    """Make eager / torch.compile calls of `qwen35::<op>` on CUDA tensors run the Triton op (what the
    substitute_custom_ops pass does to an exported graph)."""
    done = []
    for name, impl in triton_implementations().items():
        torch.library.register_kernel(f"qwen35::{name}", "cuda", lambda *a, _impl=impl: _impl(*a))
        done.append(name)
    return done


def random_layer(cfg, layer: int, dtype: str, seed: int = 0, writer: bool = False) -> dict[str, torch.Tensor]:
    """Layer weights: this script's own random values, or (`writer`) the ones `init-checkpoint` /
    bench/e2e.py write (checkpoint.writer.random_tensor), so a profile sees an engine's routing."""
    from qwen35_export.checkpoint.writer import random_tensor

    g = torch.Generator(device=DEV).manual_seed(seed + layer)
    w = {}
    for name, shape in layer_weight_shapes(cfg, layer).items():
        if writer:
            t = random_tensor(f"layers.{layer}.{name}", shape, seed, DEV)
            w[name] = t if name.endswith(("A_log", "dt_bias")) else t.to(torch.bfloat16)
            continue
        t = torch.randn(shape, generator=g, device=DEV, dtype=torch.bfloat16)
        if name.endswith("A_log"):
            t = t.float().abs().log()
        elif name.endswith("dt_bias"):
            t = t.float()
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t = t * 0.1
        else:
            t = t * (shape[-1] ** -0.5)
        w[name] = t
    if dtype == "fp8":
        w, _ = quantize_layer_fp8(w)
    w, _ = fuse_layer_weights(w)
    return w


def time_call(fn, iters: int = 5) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return sorted(ts)[len(ts) // 2]


def kernel_table(fn, calls: int = 3, top: int = 20) -> dict:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
        if us > 0 and e.key and not e.key.startswith("aten::") and "ProfilerStep" not in e.key:
            rows.append((e.key[:90], round(us / calls, 1), e.count / calls))
    rows.sort(key=lambda r: -r[1])
    return {"total_us": round(sum(r[1] for r in rows), 1), "launches": sum(r[2] for r in rows), "top": rows[:top]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="35b-a3b")
    ap.add_argument("--dtype", default="bf16,fp8")
    ap.add_argument("--prefill", default="512,8192")
    ap.add_argument("--decode", default="1,8,64")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--max-seq", type=int, default=8448)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--writer-weights", action="store_true", help="the checkpoint writer's random values")
    ap.add_argument("--eager", action="store_true", help="no torch.compile: unfused elementwise ops, no compile time")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    routed = route_ops_to_triton()
    cfg = preset(a.preset, num_hidden_layers=4)
    i_gdn = next(i for i, t in enumerate(cfg.layer_types) if t == LINEAR_ATTENTION)
    i_att = next(i for i, t in enumerate(cfg.layer_types) if t != LINEAR_ATTENTION)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": a.preset, "eager": a.eager,
           "routed_ops": routed, "rows": []}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    H, W = cfg.hidden_size, cfg.linear_conv_kernel_dim
    HV, K, V = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    for dtype in a.dtype.split(","):
        wg = random_layer(cfg, i_gdn, dtype, writer=a.writer_weights)
        wa = random_layer(cfg, i_att, dtype, writer=a.writer_weights)
        wrap = (lambda f: f) if a.eager else (lambda f: torch.compile(f, dynamic=False))
        gdn = wrap(lambda x, cs, rs, ln: layers.gdn_layer(x, wg, cs, rs, ln, cfg))
        # cache_op: prefill through the flash kernel, as single-GPU builds capture it
        att = wrap(lambda x, kc, vc, st, ln: layers.attention_layer(x, wa, kc, vc, st, ln, cfg, cache_op=True))
        shapes = [("prefill", 1, int(t)) for t in a.prefill.split(",") if t] + \
                 [("decode", int(b), 1) for b in a.decode.split(",") if b]
        for phase, B, T in shapes:
            x = torch.randn(B, T, H, device=DEV, dtype=torch.bfloat16) * 0.5
            ln = torch.full((B,), T, dtype=torch.int64, device=DEV)
            ctx = a.context if phase == "decode" else 0
            st = torch.full((B,), ctx, dtype=torch.int64, device=DEV)
            cs = torch.randn(B, cfg.conv_dim, W - 1, device=DEV, dtype=torch.bfloat16)
            rs = torch.randn(B, HV, K, V, device=DEV) * 0.01
            kv = (B, cfg.num_key_value_heads, a.max_seq, cfg.head_dim)
            kc = torch.randn(kv, device=DEV, dtype=torch.bfloat16)
            vc = torch.randn(kv, device=DEV, dtype=torch.bfloat16)
            for kind, fn in (("gdn", lambda: gdn(x, cs, rs, ln)), ("attn", lambda: att(x, kc, vc, st, ln))):
                t0 = time.time()
                try:
                    fn()
                    torch.cuda.synchronize()
                    us = bench_graph(fn, 10) * 1e3 if phase == "decode" else time_call(fn)
                    row = {"dtype": dtype, "kind": kind, "phase": phase, "batch": B, "tokens": T, "context": ctx,
                           "us": round(us, 1), "graphed": phase == "decode"}
                    if not a.no_profile:
                        row["kernels"] = kernel_table(fn)
                except Exception as e:  # noqa: BLE001 - report, go on with the next shape
                    row = {"dtype": dtype, "kind": kind, "phase": phase, "batch": B, "tokens": T,
                           "error": repr(e)[:400]}
                row["wall_s"] = round(time.time() - t0, 1)
                res["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
                if "kernels" in row:
                    for r in row["kernels"]["top"][:12]:
                        print(f"    {r[1]:9.1f} us  x{r[2]:<4g} {r[0]}", flush=True)
                out.write_text(json.dumps(res, indent=1))
        del wg, wa, gdn, att
        torch._dynamo.reset()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
