"""Dense FP8 linears at prefill sizes (issue 5): which GEMM should a block-scaled e4m3 projection use?

Per engine linear (35B-A3B and 397B shapes) and row count, every path of `fp8_linear_triton`:
- `bf16`: cuBLAS on the BF16 weight (the BF16 engine's GEMM; not an FP8 path, the bar to beat);
- `dequant`: the weight dequantised to bf16 each call, then cuBLAS (the FP8 engine's prefill default until
  now; under AOTInductor the dequantisation is one fused pass, here eager: `dequant_gemm` is the GEMM alone);
- `scaled_mm`: x quantised per token per 128 (`quantize_act`) and cuBLASLt's block-scaled FP8 GEMM
  (`torch._scaled_mm`, 1x128 activation and the checkpoint's 128x128 weight scales); `scaled_mm_gemm` alone;
- `w8a8`: `quantize_act` and this repo's Triton w8a8 kernel with its prefill tiles.
Each output is checked against the fp64 reference of the contract it computes (x quantised or not) before
it is timed; TFLOPS count 2*M*N*K. Also records whether `torch._scaled_grouped_mm` takes block scales here.

    python3 bench/fp8_prefill_gemm.py --out DIR     (device; JSON + markdown + plot)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdn import bench_graph  # noqa: E402
from qwen35_export.checkpoint.fp8 import dequantize_fp8_block, quantize_fp8_block  # noqa: E402
from qwen35_export.kernels.fp8_linear import fp8_linear_reference, quantize_act  # noqa: E402
from qwen35_export.kernels.fp8_linear.gemm import fp8_linear_triton, two_kernel_config  # noqa: E402

# (name, N, K): the FP8 engine's dense projections (GDN in_proj_qkvz / out_proj, attention qkv / o_proj)
SHAPES = {
    "35b": [("in_proj_qkvz", 12288, 2048), ("out_proj", 2048, 4096), ("qkv_proj", 17408, 2048),
            ("o_proj", 2048, 8192)],
    "397b": [("in_proj_qkvz", 20480, 4096), ("out_proj", 4096, 8192), ("qkv_proj", 17408, 4096),
             ("o_proj", 4096, 8192)],
}
MS = (1, 8, 64, 512, 2048, 8192)
FP8_PEAK_TFLOPS = 1979.0  # H100/H200 SXM dense FP8
MAX_ERR = 2e-2  # bf16 output rounding is ~3e-3 relative RMS; a wrong layout is off by O(1)


def _us(fn) -> float:
    return bench_graph(fn, 10) * 1e3


def _err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def run_shape(geom: str, name: str, N: int, K: int, M: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(N * 7 + K + M)
    w_bf = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).to(torch.bfloat16)
    w, s = quantize_fp8_block(w_bf)
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    ref_q = fp8_linear_reference(x, w, s, quant_act=True, dtype=torch.float64)
    ref = fp8_linear_reference(x, w, s, quant_act=False, dtype=torch.float64)
    wd = dequantize_fp8_block(w, s, torch.bfloat16)
    row = dict(geom=geom, linear=name, N=N, K=K, M=M)
    paths = {
        "bf16": (lambda: torch.mm(x, wd.t()), ref),
        "dequant": (lambda: fp8_linear_triton(x, w, s, dict(DEQUANT=True)), ref),
        "dequant_gemm": (lambda: torch.mm(x, wd.t()), ref),
        "scaled_mm": (lambda: fp8_linear_triton(x, w, s, dict(SCALED_MM=True)), ref_q),
        "w8a8": (lambda: fp8_linear_triton(x, w, s, two_kernel_config(M, N)), ref_q),
    }
    xq, xs = quantize_act(x, hw_cvt=True, pad_rows=4, scales_by_column=True)
    paths["scaled_mm_gemm"] = (lambda: torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s.t(),
                                                         out_dtype=torch.bfloat16)[:M], ref_q)
    for p, (fn, r) in paths.items():
        try:
            err = _err(fn(), r)
            if err > MAX_ERR:
                row[p + "_error"] = f"rel err {err:.2e} > {MAX_ERR}"
                continue
            us = _us(fn)
        except Exception as e:  # an unsupported path on this torch / GPU: recorded, not fatal
            row[p + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        row[p + "_us"] = us
        row[p + "_err"] = err
        row[p + "_tflops"] = 2 * M * N * K / us * 1e-6
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def grouped_probe() -> dict:
    """Does `torch._scaled_grouped_mm` take 1x128 / 128x128 block scales on this GPU? (the MoE's shape)"""
    G, M, N, K = 4, 256, 1024, 2048
    a = torch.randn(G * M, K, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(G, N, K, device="cuda").to(torch.float8_e4m3fn).transpose(1, 2)  # [G, K, N] col-major
    sa = torch.ones(K // 128, G * M, device="cuda").t()
    sb = torch.ones(G, N // 128, K // 128, device="cuda").transpose(1, 2)
    offs = torch.arange(1, G + 1, device="cuda", dtype=torch.int32) * M
    try:
        y = torch._scaled_grouped_mm(a, b, sa, sb, offs=offs, out_dtype=torch.bfloat16)
        return dict(supported=True, shape=list(y.shape))
    except Exception as e:
        return dict(supported=False, error=f"{type(e).__name__}: {str(e)[:300]}")


def report(rows: list[dict], meta: dict, out: Path) -> None:
    lines = [f"# Dense FP8 linears at prefill sizes, {meta['gpu']} (torch {meta['torch']})", "",
             "us per call (CUDA-graph replays), TFLOPS = 2MNK / time; `dequant` eager (the engine fuses it), "
             "`*_gemm` = the GEMM alone. % of FP8 peak for scaled_mm.", "",
             "| geom | linear | M | bf16 | dequant_gemm | scaled_mm | scaled_mm_gemm | w8a8 | scaled_mm TFLOPS | % FP8 peak | "
             "scaled_mm / dequant_gemm |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(p):
            return f"{r[p + '_us']:.1f}" if p + "_us" in r else "err"
        t = r.get("scaled_mm_tflops")
        ratio = (f"{r['dequant_gemm_us'] / r['scaled_mm_us']:.2f}x"
                 if "scaled_mm_us" in r and "dequant_gemm_us" in r else "-")
        lines.append(f"| {r['geom']} | {r['linear']} | {r['M']} | {f('bf16')} | {f('dequant_gemm')} | {f('scaled_mm')} | "
                     f"{f('scaled_mm_gemm')} | {f('w8a8')} | {t:.0f} | {t / FP8_PEAK_TFLOPS * 100:.0f}% | {ratio} |"
                     if t else f"| {r['geom']} | {r['linear']} | {r['M']} | {f('bf16')} | {f('dequant_gemm')} | "
                     f"{f('scaled_mm')} | {f('scaled_mm_gemm')} | {f('w8a8')} | - | - | - |")
    lines += ["", f"`torch._scaled_grouped_mm` with block scales: {meta['grouped']}", ""]
    errs = sorted({(k, v) for r in rows for k, v in r.items() if k.endswith("_error")})
    if errs:
        lines += ["Errors:", ""] + [f"- {k}: {v}" for k, v in errs[:12]]
    (out / "fp8_prefill_gemm.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), sharex=True)
    for ax, (geom, name) in zip(axes.flat, [(g, n) for g in SHAPES for n, _, _ in SHAPES[g]]):
        sel = [r for r in rows if r["geom"] == geom and r["linear"] == name]
        for p in ("bf16", "dequant_gemm", "scaled_mm", "w8a8"):
            pts = [(r["M"], r[p + "_tflops"]) for r in sel if p + "_tflops" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{geom} {name}")
        ax.set_ylabel("TFLOPS")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(out / "fp8_prefill_gemm.png", dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, grouped=grouped_probe())
    print("grouped:", meta["grouped"], flush=True)
    rows = []
    for geom, shapes in SHAPES.items():
        for name, N, K in shapes:
            for M in map(int, a.ms.split(",")):
                rows.append(run_shape(geom, name, N, K, M))
                (a.out / "fp8_prefill_gemm.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    report(rows, meta, a.out)


if __name__ == "__main__":
    main()
