"""Markdown + plot of the end-to-end comparison (bench/e2e.py's JSON) and the per-layer times of the 397B
engine (bench/device_big.py --quick), with the whole-model projections they support. Runs anywhere.

    python bench/report_perf.py --e2e bench/results/e2e_35b_8layers_h200.json \
        --big397 bench/results/big_397b_fp8_2layers_h200.json --out bench/results/perf_h200

The projections are arithmetic on measured numbers, written out in the markdown with every assumption.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# 8 x H100 assumptions for the 397B projection (stated in the output).
H100_BW, H200_BW = 3.35e12, 4.8e12
ALLREDUCE_US = 10.0  # one NCCL all-reduce of a [B, 4096] bf16 row block over NVLink, 8 GPUs, small message
SGLANG_397B_8XH100_MS = 1e3 / 165.7  # public anchor: SGLang, Qwen3.5-397B-FP8, 8 x H100, batch 1


def per_layer(rows: list[dict]) -> dict[tuple[str, str, int, int], float]:
    return {(r["graph"], r["phase"], r["batch"], r["tokens"]): r["us"] for r in rows}


def step_ms(t: dict, batch: int, n_gdn: int, n_attn: int) -> float:
    k = lambda g: t[(g, "decode", batch, 1)]  # noqa: E731
    return (k("embed") + n_gdn * k("gdn") + n_attn * k("attn") + k("final")) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--e2e", type=Path, required=True)
    ap.add_argument("--big397", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="prefix: writes OUT.md and OUT.png")
    a = ap.parse_args()
    e = json.loads(a.e2e.read_text())
    b = json.loads(a.big397.read_text())
    L, L_full = e["layers"], e["of_layers"]
    systems = [s for s in ("ours-bf16", "ours-fp8", "hf-eager", "hf-compile") if s in e]
    lines = [f"# Performance on {e['gpu']} (torch {e['torch']}), {e.get('date', '2026-12-01')}", "",
             f"## 35B-A3B full geometry, {L} of its {L_full} layers, one random BF16 checkpoint", "",
             "Decode: ms per step after a 512-token prompt (CUDA events over 24 steps; ours CUDA-graphed). "
             "Prefill: one sequence. `hf-*` = transformers `Qwen3_5MoeForCausalLM`, BF16, with fla-core 0.6.0 "
             "for its GDN kernels.", "",
             "| system | decode B=1 | B=8 | B=64 | tok/s B=1 | prefill 512 (ms) | prefill 8192 (ms) | % HBM B=1 |",
             "|---|---|---|---|---|---|---|---|"]
    for s in systems:
        r = e[s]
        if "error" in r:
            lines.append(f"| {s} | {r['error']} | | | | | | |")
            continue
        d, p = r["decode"], r["prefill"]
        hbm = d.get("1", {}).get("hbm_pct")
        dec = [f"{d[B]['ms_per_step']:.2f}" if B in d else "-" for B in ("1", "8", "64")]  # hf-compile: B=1 only
        pre = [f"{p[T]['ms']:.1f}" if T in p else "-" for T in ("512", "8192")]
        tok1 = f"{d['1']['tokens_per_s']:.0f}" if "1" in d else "-"
        lines.append(f"| {s} | {' | '.join(dec)} | {tok1} | {' | '.join(pre)} | "
                     f"{'' if hbm is None else f'{hbm:.0f}%'} |")
    hf = e["hf-eager"]
    src = e.get("sources")
    lines += ["", "Ratios (transformers eager / ours" + (", systems from the runs listed under `sources` in the JSON, "
              "same checkpoint writer and seed" if src else ", same run conditions") + "):", ""]
    for s in ("ours-bf16", "ours-fp8"):
        r = e[s]
        # a batch without a valid measurement (dropped from the JSON) reads "-"
        dec = {B: (f"{hf['decode'][B]['ms_per_step'] / r['decode'][B]['ms_per_step']:.0f}x" if B in r["decode"]
                   else "-") for B in ("1", "8", "64")}
        pre = (f"{hf['prefill']['8192']['ms'] / r['prefill']['8192']['ms']:.2f}x"
               if "8192" in r.get("prefill", {}) and "8192" in hf.get("prefill", {}) else "-")
        lines.append(f"- {s}: decode {dec['1']} / {dec['8']} / {dec['64']} at batch 1 / 8 / 64; "
                     f"prefill 8192 {pre}.")
    hc = e.get("hf-compile", {})
    if "1" in hc.get("decode", {}):
        ms = hc["decode"]["1"]["ms_per_step"]
        fla = "fla kernels" if hc.get("fla") else "no fla"
        cut = f" (run ended early: {hc['error']})" if "error" in hc else ""
        lines += ["", f"torch.compile of the transformers model{cut} ({hc.get('mode', 'default')} mode, {fla}, "
                  f"{hc.get('graphs_compiled', '?')} graphs, {hc.get('graphs_while_timing', '?')} compiled while "
                  f"timing, warm-up {hc.get('warmup_total_s', 0):.0f} s) at batch 1 decode: {ms:.2f} ms per step, "
                  f"{hf['decode']['1']['ms_per_step'] / ms:.1f}x faster than eager; ours "
                  + " / ".join(f"{ms / e[s]['decode']['1']['ms_per_step']:.1f}x" if "1" in e[s]["decode"] else "-"
                               for s in ("ours-bf16", "ours-fp8"))
                  + " faster than it (BF16 / FP8)."]
    # 40-layer projection from our per-layer times (30 GDN + 10 attention)
    n_gdn, n_attn = L_full * 3 // 4, L_full // 4
    lines += ["", f"### Whole model ({L_full} layers) from the per-layer times of the same engines", "",
              "| system | B=1 ms/step | tok/s | B=8 | B=64 |", "|---|---|---|---|---|"]
    proj = {}
    for s in ("ours-bf16", "ours-fp8"):
        t = per_layer(e[s]["layers"])
        proj[s] = {B: step_ms(t, B, n_gdn, n_attn) for B in (1, 8, 64) if ("gdn", "decode", B, 1) in t}
        cell = {B: f"{proj[s][B]:.2f}" if B in proj[s] else "-" for B in (1, 8, 64)}
        tok = f"{1e3 / proj[s][1]:.0f}" if 1 in proj[s] else "-"
        lines.append(f"| {s} | {cell[1]} | {tok} | {cell[8]} | {cell[64]} |")
    hf40 = hf["decode"]["1"]["ms_per_step"] * L_full / L
    lines.append(f"| hf-eager (x {L_full}/{L}) | {hf40:.0f} | {1e3 / hf40:.1f} | | |")
    lines += ["", "Per-layer decode (us, CUDA graph of one layer call, 512 cached tokens):", "",
              "| system | GDN B=1 | attn B=1 | GDN B=8 | attn B=8 | GDN B=64 | attn B=64 | head B=1 |",
              "|---|---|---|---|---|---|---|---|"]
    for s in ("ours-bf16", "ours-fp8"):
        t = per_layer(e[s]["layers"])
        lines.append(f"| {s} | " + " | ".join(f"{t[(g, 'decode', B, 1)]:.0f}" if (g, "decode", B, 1) in t else "-"
                                               for B in (1, 8, 64) for g in ("gdn", "attn"))
                     + (f" | {t[('final', 'decode', 1, 1)]:.0f} |" if ("final", "decode", 1, 1) in t else " | - |"))

    # 397B
    t = per_layer(b["run"]["layers"])
    lines += ["", "## 397B-A17B full geometry, one layer of each kind, FP8, one H200", "",
              f"Engine: {b['engine_gib']:.1f} GiB, build {b['build_s']:.0f} s. Times in us; decode CUDA-graphed "
              "with 512 cached tokens, prefill one sequence, eager.", "",
              "| graph | decode B=1 | B=8 | B=64 | prefill 2048 | prefill 8192 |", "|---|---|---|---|---|---|"]
    for g in ("gdn", "attn", "embed", "final"):
        lines.append(f"| {g} | " + " | ".join(f"{t[(g, 'decode', B, 1)]:.0f}" for B in (1, 8, 64)) + " | "
                     + " | ".join(f"{t[(g, 'prefill', 1, T)]:.0f}" for T in (2048, 8192)) + " |")
    one_gpu = step_ms(t, 1, 45, 15)
    lines += ["", f"60 layers (45 GDN + 15 attention) on one GPU, if it fit: {one_gpu:.1f} ms per decode step at "
              f"batch 1 (it does not fit: ~400 GB of FP8 weights).", ""]
    # 8 x H100 projection: each rank runs a 1/8 shard of every layer; we have no measured shard, so the
    # 35B-A3B layer stands in for it (it moves about the bytes a 397B rank shard moves at batch 1, with the same
    # kernels): GDN/attention per-layer times of ours-fp8, scaled from H200 to H100 bandwidth.
    t35 = per_layer(e["ours-fp8"]["layers"])
    scale = H200_BW / H100_BW
    layer_us = {g: t35[(g, "decode", 1, 1)] * scale for g in ("gdn", "attn")}
    head_us = t[("final", "decode", 1, 1)] * scale / 8  # vocab-parallel lm_head: 1/8 of the rows per rank
    proj_ms = (45 * (layer_us["gdn"] + 2 * ALLREDUCE_US) + 15 * (layer_us["attn"] + 2 * ALLREDUCE_US)
               + head_us + ALLREDUCE_US) / 1e3
    # Lower bound: most of a batch-1 layer is launch and latency, which does not grow with lower bandwidth.
    low_ms = (45 * (t35[("gdn", "decode", 1, 1)] + 2 * ALLREDUCE_US) + 15 * (t35[("attn", "decode", 1, 1)]
              + 2 * ALLREDUCE_US) + t[("final", "decode", 1, 1)] / 8 + ALLREDUCE_US) / 1e3
    lines += ["### Projected decode step on 8 x H100 (batch 1)", "",
              "Split: tensor parallel 8 for attention and GDN heads (4 q heads / rank, KV heads replicated; "
              "GDN 2 key + 8 value heads / rank), expert parallel 8 (64 experts / rank; at batch 1 the busiest "
              "rank holds ~3 of the 10 picks), shared expert split by rows, lm_head split by vocabulary. Per "
              "layer two all-reduces of the [1, 4096] hidden state (after the mixer and after the MoE), "
              f"{ALLREDUCE_US:.0f} us each (NCCL small-message latency on NVLink), plus one for the logits.",
              "",
              "No rank shard was measured (no multi-GPU machine, no device time left for a shard-shaped "
              "engine): the 35B-A3B FP8 layer stands in for one (per rank it moves ~60 MB at batch 1, "
              f"the 35B layer ~65 MB, through the same kernels), its H200 time scaled by {scale:.2f} to H100 "
              "bandwidth.", "",
              f"- per layer: GDN {layer_us['gdn']:.0f} us, attention {layer_us['attn']:.0f} us, + "
              f"{2 * ALLREDUCE_US:.0f} us all-reduce",
              f"- lm_head / 8: {head_us:.0f} us",
              f"- **projected: {low_ms:.1f} to {proj_ms:.1f} ms per token ({1e3 / proj_ms:.0f} to "
              f"{1e3 / low_ms:.0f} tokens/s per user)** (low: the stand-in's H200 time unscaled, as its launch- "
              f"and latency-bound part would be; high: all of it scaled to H100 bandwidth) vs SGLang's "
              f"{SGLANG_397B_8XH100_MS:.1f} ms (165.7 tokens/s): {SGLANG_397B_8XH100_MS / low_ms:.2f}x to "
              f"{SGLANG_397B_8XH100_MS / proj_ms:.2f}x of its speed."]
    out_md = a.out.with_suffix(".md")
    out_md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    Bs = [1, 8, 64]
    for s in systems:
        if "error" in e[s]:
            continue
        got = [B for B in Bs if str(B) in e[s]["decode"]]
        ax[0].plot(got, [e[s]["decode"][str(B)]["ms_per_step"] for B in got], "o-", label=s)
    ax[0].set(xscale="log", yscale="log", xlabel="batch", ylabel="ms per decode step",
              title=f"35B-A3B, {L} layers: decode step")
    for s, m in (("ours-bf16", "o-"), ("ours-fp8", "s-")):
        tt = per_layer(e[s]["layers"])
        for g in ("gdn", "attn"):
            got = [B for B in Bs if (g, "decode", B, 1) in tt]
            ax[1].plot(got, [tt[(g, "decode", B, 1)] for B in got], m, label=f"35B {s} {g}")
    for g in ("gdn", "attn"):
        ax[1].plot(Bs, [t[(g, "decode", B, 1)] for B in Bs], "^--", label=f"397B fp8 {g}")
    ax[1].set(xscale="log", yscale="log", xlabel="batch", ylabel="us per layer", title="decode per layer")
    for x in ax:
        x.grid(alpha=0.3)
        x.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
