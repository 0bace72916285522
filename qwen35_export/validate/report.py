"""Write a validation result as `validation.json`, `validation.md` and `validation.png` into one folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .result import ValidationResult, _fmt
from .thresholds import Thresholds

KIND_STYLE = {"gdn": ("o", "GDN layer"), "attn": ("s", "attention layer")}


def _clean(x):
    """JSON has no inf/NaN: write them as strings so the file stays standard JSON."""
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def markdown(result: ValidationResult) -> str:
    lines = [f"# Validation: {'PASS' if result.passed else 'FAIL'}", "", "```", result.summary(), "```", "",
             "## Per layer (worst over prompts)", "",
             "| layer | kind | prefill cos | prefill rel L2 | prefill max abs | prefill update rel L2 | decode cos "
             "| decode rel L2 | decode max abs | decode update rel L2 | conv state rel L2 | rec state rel L2 "
             "| routing |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def m(d: dict, key: str, metric: str) -> str:
        return _fmt(d[key][metric]) if key in d else "-"

    def v(d: dict, key: str) -> str:
        return _fmt(d[key]) if key in d else "-"

    for d in result.layers:
        lines.append(f"| {d['layer']} | {d['kind']} | {m(d, 'prefill', 'cos')} | {m(d, 'prefill', 'rel_l2')} | "
                     f"{m(d, 'prefill', 'max_abs')} | {v(d, 'prefill_update_rel_l2')} | {m(d, 'decode', 'cos')} | "
                     f"{m(d, 'decode', 'rel_l2')} | {m(d, 'decode', 'max_abs')} | {v(d, 'decode_update_rel_l2')} | "
                     f"{m(d, 'conv_state', 'rel_l2')} | {m(d, 'rec_state', 'rel_l2')} | {v(d, 'routing')} |")
    lines += ["", "rel L2 is of the layer's output (the residual stream, gated by the bounds); *update* rel L2 is of "
              "the layer's own update (output - input), a diagnostic that one layer's error does not dilute.",
              "", "![per-layer error](validation.png)", ""]
    return "\n".join(lines)


def plot(result: ValidationResult, th: Thresholds, path: Path) -> None:
    """Relative L2 error of each layer's output (and of its update, dotted), prefill and decode, log scale,
    markers by layer kind."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    phases = [p for p in ("prefill", "decode") if any(p in d for d in result.layers)]
    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4), squeeze=False)
    bad = result.first_bad_layer
    for ax, ph in zip(axes[0], phases):
        xs = [d["layer"] for d in result.layers if ph in d]
        # log scale: a zero error (bit-identical layer) is drawn at the floor instead of vanishing
        ys = [max(d[ph]["rel_l2"], 1e-12) if math.isfinite(d[ph]["rel_l2"]) else 1e3 for d in result.layers if ph in d]
        ax.plot(xs, ys, "-", color="0.6", zorder=1)
        for kind, (marker, label) in KIND_STYLE.items():
            pts = [(x, y) for x, y, d in zip(xs, ys, result.layers) if d["kind"] == kind]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=label, zorder=2)
        upd = [(d["layer"], max(d[f"{ph}_update_rel_l2"], 1e-12) if math.isfinite(d[f"{ph}_update_rel_l2"])
                else 1e3) for d in result.layers if f"{ph}_update_rel_l2" in d]
        if upd:
            ax.plot(*zip(*upd), ":", color="tab:purple", marker="x", label="layer update (diagnostic)", zorder=1)
        ax.axhline(th.hidden_rel_l2, color="red", ls="--", label=f"bound on layer output ({result.precision})")
        if bad is not None:
            ax.axvline(bad, color="black", ls=":", label=f"first bad layer {bad}")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("relative L2 error of layer output")
        ax.set_title(f"{ph} ({result.reference} reference)")
        ax.legend(fontsize=8)
    fig.suptitle(result.headline()[:120], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: ValidationResult, out_dir: str | Path, th: Thresholds) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = result.to_dict()
    d["thresholds"] = th.to_dict()
    (out / "validation.json").write_text(json.dumps(_clean(d), indent=2))
    (out / "validation.md").write_text(markdown(result))
    plot(result, th, out / "validation.png")
    return out
