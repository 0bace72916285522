"""MoE align past SMALL_M slots (every prefill graph), on the device: the torch-op path against the three Triton
kernels (kernels/moe/align.py LARGE_TRITON). Checks the two maps are equal, times both from CUDA graphs.

    python3 bench/align_paths.py --out DIR     -> DIR/align_paths.{json,md,png}
    python3 bench/align_paths.py --out DIR --replot   (redraw the plot from the JSON, no GPU needed)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gdn import bench_graph  # noqa: E402  (bench/ is on sys.path when this script runs)
from qwen35_export.kernels.moe import align  # noqa: E402

# (experts incl. the shared one, slots per token, BLOCK_M of the prefill tables)
GEOMETRIES = {"35b-a3b": (257, 9, 64), "397b-a17b": (513, 11, 64)}
TOKENS = (512, 2048, 8192, 16384)


def graph_us(fn) -> float:
    """Median us per call from CUDA-graph replays (gdn.py's bench_graph)."""
    return bench_graph(fn, n_inner=10) * 1e3


def run_one(E: int, k: int, block_m: int, T: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(T)
    # routed picks without repeats per token, the shared expert (E - 1) last, as the MoE op builds them
    ids = torch.rand(T, E - 1, device="cuda", generator=gen).topk(k - 1, dim=-1).indices
    ids = torch.cat([ids, torch.full((T, 1), E - 1, device="cuda")], -1)
    out = {}
    maps = {}
    default = align.LARGE_TRITON
    for name, large in (("torch", False), ("triton", True)):
        align.LARGE_TRITON = large
        maps[name] = align.align_block_size(ids, E, block_m)
        out[f"{name}_us"] = graph_us(lambda: align.align_block_size(ids, E, block_m))
    align.LARGE_TRITON = default
    out["identical"] = all(torch.equal(a, b) for a, b in zip(maps["torch"], maps["triton"]))
    out["speedup"] = out["torch_us"] / out["triton_us"]
    return out


def plot(res: dict, path: Path) -> None:
    """us per call against tokens, both paths, one panel per geometry."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    geos = sorted({r["geometry"] for r in res["rows"] if "error" not in r})
    fig, axes = plt.subplots(1, len(geos), figsize=(5 * len(geos), 3.6), squeeze=False)
    for ax, geo in zip(axes[0], geos):
        rows = [r for r in res["rows"] if r["geometry"] == geo and "error" not in r]
        t = [r["tokens"] for r in rows]
        ax.plot(t, [r["torch_us"] for r in rows], "o-", label="torch ops")
        ax.plot(t, [r["triton_us"] for r in rows], "s-", label="Triton kernels")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens in the call")
        ax.set_ylabel("us per align (CUDA graph)")
        ax.set_title(f"{geo} ({res['gpu']})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--replot", action="store_true", help="only redraw OUT/align_paths.png from its JSON")
    a = ap.parse_args()
    if a.replot:
        plot(json.loads((a.out / "align_paths.json").read_text()), a.out / "align_paths.png")
        return
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for geo, (E, k, bm) in GEOMETRIES.items():
        for T in TOKENS:
            try:
                r = {"geometry": geo, "tokens": T, "slots": T * k, **run_one(E, k, bm, T)}
            except Exception as e:  # noqa: BLE001 - one failing size must not lose the others
                r = {"geometry": geo, "tokens": T, "error": repr(e)[:400]}
            res["rows"].append(r)
            print(json.dumps(r), flush=True)
    (a.out / "align_paths.json").write_text(json.dumps(res, indent=1))
    lines = [f"# MoE align past SMALL_M slots: torch ops vs three Triton kernels ({res['gpu']}, torch {res['torch']})",
             "", "CUDA-graph medians, us per call; `identical`: the two tile maps are equal element for element.", "",
             "| geometry | tokens | slots | torch path us | Triton path us | speed-up | identical |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['geometry']} | {r['tokens']} | {r['slots']} | {r['torch_us']:.1f} | {r['triton_us']:.1f} | "
              f"{r['speedup']:.2f}x | {r['identical']} |" for r in res["rows"] if "error" not in r]
    lines += [f"\n{r['geometry']} T={r['tokens']}: {r['error']}" for r in res["rows"] if "error" in r]
    (a.out / "align_paths.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(res, a.out / "align_paths.png")


if __name__ == "__main__":
    main()
