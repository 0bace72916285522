"""`qwen35-export inspect`: what an engine directory holds."""

from __future__ import annotations

from pathlib import Path

from ..exporter.manifest import Manifest


def inspect_engine(engine_dir: str | Path) -> str:
    d = Path(engine_dir)
    m = Manifest.load(d)
    cfg = m.model_config
    total = sum(f["bytes"] for f in m.files.values())
    graphs = sum(f["bytes"] for k, f in m.files.items() if k.startswith("graphs/"))
    plan = "".join("A" if t == "full_attention" else "g" for t in cfg["layer_types"])
    lines = [
        f"engine       {d}",
        f"format       v{m.format_version}; built with " + ", ".join(f"{k} {v}" for k, v in m.versions.items()),
        f"target       {m.target}" + (f" (sm_{''.join(map(str, m.sm))})" if m.sm else "") + f", backend {m.backend}",
        f"precision    weights {m.dtype}, activations {m.act_dtype}",
        f"limits       max batch {m.max_batch}, max sequence {m.max_seq_len}",
        f"layer plan   {plan}  (g = GDN+MoE graph, A = attention+MoE graph)",
        f"passes       {', '.join(m.passes)}",
        f"size         {total / 2**20:.1f} MiB ({graphs / 2**20:.1f} MiB compiled graphs)",
        "graphs:",
    ]
    for name, g in m.graphs.items():
        subs = ", ".join(f"{k} x{v}" for k, v in g.substitutions.items()) or "reference ops"
        lines.append(f"  {name:<13} {g.file:<24} {len(g.weight_names):>3} weight inputs; {subs}")
    if m.validation is not None:
        lines.append(f"validation   {'PASS' if m.validation.get('passed') else 'FAIL'}: {m.validation.get('summary', '')}")
    lines.append("build time   " + ", ".join(f"{k} {v:.1f}s" for k, v in m.build_seconds.items()))
    return "\n".join(lines)
