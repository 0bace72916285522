"""Why the MoE op is slower inside an AOTI prefill graph than eager (H200, 35B-A3B engine, 8192-token
prefill: `_down_kernel` 2.8 ms / `_gate_up_kernel` 1.7 ms per layer in the engine against 0.45 / 0.71 ms
eager with the same tiles and grid). Times one MoE call at 35B geometry (E 256 + shared = 257, H 2048,
I 512, k 8 + 1) eager and as dynamic-N AOTI packages taking the weights as inputs (as the engine's graphs
do), with Inductor's assume_aligned_inputs off (its default) and on. A first run (weights as constants,
static and dynamic N) matched eager: 1.67 / 1.76 ms vs 2.15 ms eager, same kernel times.   python3 bench/moe_aoti_check.py --out $OUT/moe_aoti.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from profile_layers import time_call  # noqa: E402  (CUDA-event median, shared by the bench scripts)
from qwen35_export.runtime.aoti_loader import load_package  # noqa: E402
import qwen35_export.kernels.moe  # noqa: E402,F401  (registers qwen35_triton::moe_*)

E, H, I, K = 257, 2048, 512, 9


class MoeArgs(torch.nn.Module):
    """Weights as graph inputs, as the engine's layer graphs take them."""

    def forward(self, x, rw, ids, w13, w2):
        return torch.ops.qwen35_triton.moe_experts(x, rw, ids, w13, w2)


class Moe(torch.nn.Module):
    def __init__(self, w13, w2):
        super().__init__()
        self.w13, self.w2 = w13, w2

    def forward(self, x, rw, ids):
        return torch.ops.qwen35_triton.moe_experts(x, rw, ids, self.w13, self.w2)


def cuda_ms(fn) -> float:
    return time_call(fn) / 1e3


def kernels(fn) -> list:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [(e.key[:60], round(getattr(e, "device_time_total", 0), 1)) for e in prof.key_averages()]
    return sorted([r for r in rows if r[1] > 0], key=lambda r: -r[1])[:6]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--quick", action="store_true", help="only the 3-token-example case")
    a = ap.parse_args()
    torch.manual_seed(0)
    N = a.tokens
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * H ** -0.5
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * I ** -0.5
    x = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(N, E - 1, device="cuda")
    rw, ids = torch.topk(logits.softmax(-1), K - 1)
    ids = torch.cat([ids, torch.full_like(ids[:, :1], E - 1)], 1)
    rw = torch.cat([rw, torch.full_like(rw[:, :1], 0.5)], 1).to(torch.bfloat16)
    m = Moe(w13, w2)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "N": N}
    res["eager_ms"] = cuda_ms(lambda: m(x, rw, ids))
    res["eager_kernels"] = kernels(lambda: m(x, rw, ids))
    print("eager", res["eager_ms"], res["eager_kernels"], flush=True)
    tmp = Path(tempfile.mkdtemp())
    dyn_n = {0: torch.export.Dim("N", min=1, max=64 * 8256)}
    # The engine's prefill graphs are captured from 2 x 3 example tokens: 54 slots, fewer than E (the case
    # that made max_padded's min() guard on the example's side); 1000 tokens is the other side.
    cases = [("dynamic_weight_inputs_example3", False, 3)] if a.quick else [
        ("dynamic_weight_inputs", False, 1000), ("dynamic_weight_inputs_aligned", True, 1000),
        ("dynamic_weight_inputs_example3", False, 3)]
    for name, aligned, n_ex in cases:
        t = time.time()
        try:
            ex = (x[:n_ex], rw[:n_ex], ids[:n_ex], w13, w2)
            ep = torch.export.export(MoeArgs(), ex, dynamic_shapes=(dyn_n, dyn_n, dyn_n, None, None), strict=False)
            pkg = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp / f"{name}.pt2"),
                                                           inductor_configs={"assume_aligned_inputs": aligned})
            fn = load_package(pkg, torch.device("cuda"))
            res[f"aoti_{name}_ms"] = cuda_ms(lambda: fn(x, rw, ids, w13, w2))
            res[f"aoti_{name}_kernels"] = kernels(lambda: fn(x, rw, ids, w13, w2))
        except Exception as e:  # noqa: BLE001 - report, go on
            res[f"aoti_{name}_error"] = repr(e)[:1500]
        res[f"aoti_{name}_wall_s"] = time.time() - t
        print(name, {k: v for k, v in res.items() if k.startswith(f"aoti_{name}_")}, flush=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
