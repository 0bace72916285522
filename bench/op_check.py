"""Eager check of every Triton op against its qwen35:: reference at the tiny engine's shapes (run on the
device): isolates a kernel when an engine disagrees with the reference model.

    python bench/op_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qwen35_export.model.ops  # noqa: E402,F401
from qwen35_export.graph.substitute_custom_ops import triton_implementations  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor | None = None) -> list[float]:
    a, b = a.float(), b.float()
    if rows is None:
        return [float((a - b).norm() / b.norm().clamp_min(1e-12))]
    return [float((a[r] - b[r]).norm() / b[r].norm().clamp_min(1e-12)) for r in rows]


def main() -> None:
    impl = triton_implementations()
    dev = "cuda"
    torch.manual_seed(0)
    B, T, HK, HV, K, V, H, E, k, I = 3, 7, 2, 4, 128, 128, 256, 16, 4, 128
    lengths = torch.tensor([7, 1, 5], device=dev)
    valid = (torch.arange(T, device=dev)[None, :] < lengths[:, None])[:, :, None]
    C = 2 * HK * K + HV * V
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(B, T, C, device=dev).to(dt)
        w = torch.randn(C, 4, device=dev).to(dt)
        cs = torch.randn(B, C, 3, device=dev).to(dt)
        y1, f1 = torch.ops.qwen35.causal_conv1d(x, w, cs, lengths)
        y2, f2 = impl["causal_conv1d"](x, w, cs, lengths)
        print(dt, "conv y per row", [rel(y2[b, :n], y1[b, :n])[0] for b, n in enumerate(lengths.tolist())],
              "state", rel(f2, f1))
        q, kk, v = torch.split(y1, [HK * K, HK * K, HV * V], dim=-1)
        q, kk, v = q.reshape(B, T, HK, K), kk.reshape(B, T, HK, K), v.reshape(B, T, HV, V)
        g = torch.where(valid, -torch.rand(B, T, HV, device=dev), 0.)
        beta = torch.where(valid, torch.rand(B, T, HV, device=dev), 0.)
        h0 = torch.randn(B, HV, K, V, device=dev)
        for TT in (T, 70):
            if TT != T:
                q, kk, v = [t.repeat(1, 10, 1, 1)[:, :TT] for t in (q, kk, v)]
                g, beta = g.repeat(1, 10, 1)[:, :TT], beta.repeat(1, 10, 1)[:, :TT]
            o1, h1 = torch.ops.qwen35.gated_delta_rule(q, kk, v, g, beta, h0)
            o2, h2 = impl["gated_delta_rule"](q, kk, v, g, beta, h0)
            print(dt, f"gdn T={TT} o per row", [rel(o2[b, :n], o1[b, :n])[0] for b, n in enumerate(lengths.tolist())],
                  "state per row", rel(h2, h1, range(B)))
        for N in (3, 16, 17, 21, 40, 200):
            xm = torch.randn(N, H, device=dev).to(dt)
            logits = torch.randn(N, E, device=dev).to(dt)
            w1, i1 = torch.ops.qwen35.moe_router(logits, k)
            w2, i2 = impl["moe_router"](logits, k)
            wg = (torch.randn(E, 2 * I, H, device=dev) / 16).to(dt)
            wd = (torch.randn(E, H, I, device=dev) / 11).to(dt)
            r1 = torch.ops.qwen35.moe_experts(xm, w1.to(dt), i1, wg, wd)
            r2 = impl["moe_experts"](xm, w1.to(dt), i1, wg, wd)
            err = ((r2.float() - r1.float()).norm(dim=-1) / r1.float().norm(dim=-1)).cpu()
            print(dt, f"moe N={N} ids differ {(i1 != i2).sum().item()} max row rel {err.max():.2e} "
                      f"bad rows {(err > 0.02).nonzero().flatten().tolist()[:12]}")


if __name__ == "__main__":
    main()
