"""`qwen35-export bench` on the cpu engine: the command runs, writes its JSON and plot, and the roofline
byte count follows the engine's weights."""

from __future__ import annotations

import json
from pathlib import Path

from qwen35_export.cli import main as cli_main
from qwen35_export.runtime.bench import decode_step_bytes
from qwen35_export.runtime.engine import Engine


def test_bench_cli_writes_json_and_plot(cpu_engine_fp32: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = cli_main(["bench", str(cpu_engine_fp32), "--batch", "1,2", "--prompt-len", "4", "--gen", "5",
                   "--json", str(out), "--plot", str(png)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert [row["batch"] for row in r["rows"]] == [1, 2]
    for row in r["rows"]:
        assert row["decode_ms_per_step"] > 0 and row["ttft_ms"] > 0
        assert row["hbm_roofline_pct"] is None  # no GPU: no bandwidth to compare with
    assert png.stat().st_size > 1000
    assert r["env"]["device"] == "cpu"


def test_decode_step_bytes_counts_touched_experts(cpu_engine_fp32: Path) -> None:
    eng = Engine.load(cpu_engine_fp32, verify_hashes=False)
    cfg = eng.cfg
    one = decode_step_bytes(eng, 1, 8)
    many = decode_step_bytes(eng, 4096, 8)
    # batch 1 reads top-k of E experts per layer; a huge batch touches (nearly) all of them. The build folds
    # the shared expert in as expert E (graph/fuse_weights.py), which every step reads.
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    folded = eng.layer_weights[0][eng.layer_weight_names[0].index("mlp.experts.down_proj")].shape[0] == E + 1
    assert folded
    assert abs(one["expert_weights"] / many["expert_weights"] - (k + 1) / (E + 1)) < 1e-3
    assert one["dense_weights"] == many["dense_weights"] > 0
    assert many["kv"] == 4096 * one["kv"]


def test_bench_per_layer_times_every_graph_and_leaves_engine_usable(cpu_engine_fp32: Path, tmp_path: Path) -> None:
    from qwen35_export.runtime.bench import layer_times, project_step_us
    from qwen35_export.runtime.sampling import SamplingParams

    out = tmp_path / "b.json"
    rc = cli_main(["bench", str(cpu_engine_fp32), "--batch", "1,2", "--prompt-len", "4", "--gen", "4",
                   "--json", str(out), "--per-layer"])
    assert rc == 0
    got = {(r["graph"], r["phase"], r["batch"], r["tokens"]) for r in json.loads(out.read_text())["layers"]}
    want = {(g, "decode", b, 1) for g in ("gdn", "attn", "embed", "final") for b in (1, 2)}
    want |= {(g, "prefill", 1, 4) for g in ("gdn", "attn", "embed", "final")}
    assert got == want

    eng = Engine.load(cpu_engine_fp32, verify_hashes=False)
    prompts, sp = [[3, 1, 4, 1, 5], [9]], SamplingParams(max_new_tokens=4)
    before = eng.generate(prompts, sp)
    rows = layer_times(eng, [1, 2], [4], context=3)
    assert all(r.us > 0 for r in rows)
    # timing feeds the layers random activations into the state pools: generate must not see any of it
    assert eng.generate(prompts, sp) == before
    t = {r.graph: r.us for r in rows if r.phase == "decode" and r.batch == 2}
    n_gdn = len(eng.cfg.gdn_layers)
    assert project_step_us(rows, eng.cfg, "decode", 2) == \
        t["embed"] + n_gdn * t["gdn"] + (eng.cfg.num_hidden_layers - n_gdn) * t["attn"] + t["final"]


def test_bench_profile_lists_the_decode_step_ops(cpu_engine_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    assert cli_main(["bench", str(cpu_engine_fp32), "--batch", "2", "--prompt-len", "4", "--gen", "4",
                     "--json", str(out), "--profile"]) == 0
    prof = json.loads(out.read_text())["profile"]
    assert prof["batch"] == 2 and prof["top"] and prof["total_us"] > 0
    names = " ".join(r[0] for r in prof["top"])
    # the cpu engine runs its graphs through AOTInductor with the reference custom ops behind them
    assert "qwen35" in names or "aten::" in names, names
    assert all(r[1] > 0 for r in prof["top"]) and prof["top"] == sorted(prof["top"], key=lambda r: -r[1])
    pp = json.loads(out.read_text())["profile_prefill"]
    assert pp["tokens"] == 4 and pp["top"] and pp["total_us"] > 0
    assert pp["top"] == sorted(pp["top"], key=lambda r: -r[1])


def test_decode_step_bytes_of_an_expert_parallel_shard() -> None:
    """A rank of an EP engine holds E / ep experts (not E + 1): it reads touched / ep of them, never a
    negative count (the folded-shared-expert formula applied to a shard's row count went below zero)."""
    from types import SimpleNamespace

    import torch

    from qwen35_export.config import preset

    cfg = preset("tiny")
    E, k, ep = cfg.num_experts, cfg.num_experts_per_tok, 4
    per_expert = 3 * 8 * 2  # bytes of one expert's slice of the fake tensor below
    names = ["mlp.experts.down_proj", "input_layernorm.weight"]

    def eng(rows: int):
        t = torch.zeros(rows, 8, 3, dtype=torch.bfloat16)
        return SimpleNamespace(cfg=cfg, act_dtype=torch.bfloat16, layer_weight_names=[names],
                               layer_weights=[[t, torch.zeros(4, dtype=torch.bfloat16)]])

    touched = E * (1 - (1 - k / E) ** 1)
    got = decode_step_bytes(eng(E // ep), 1, 8)["expert_weights"]
    assert abs(got - per_expert * touched / ep) < 1e-6
    assert abs(decode_step_bytes(eng(E), 1, 8)["expert_weights"] - per_expert * touched) < 1e-6
    assert abs(decode_step_bytes(eng(E + 1), 1, 8)["expert_weights"] - per_expert * (touched + 1)) < 1e-6


def _e2e():
    """bench/e2e.py as a module (bench/ is scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "e2e.py"
    spec = importlib.util.spec_from_file_location("bench_e2e", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_e2e_parse_progress_keeps_what_a_timed_out_child_printed() -> None:
    """A child killed mid-run leaves only its stdout: its timings come back as the full result's keys, its
    warm-up (compile) walls apart from them, and every other line (logs, warnings) is ignored."""
    text = "\n".join([
        "hf-compile load: 41.0 s",
        "hf-compile warm-up decode B=1: 93.5 s",
        "hf-compile warm-up decode B=8: 20.0 s",
        "W1201 torch/_dynamo: recompiling forward: decode B=8: 2 ms",  # not a measurement line
        "hf-compile go: True after 12.0 s",
        "hf-compile decode B=1: 20.000 ms/step",
        "  hf-compile prefill T=512: 31.25 ms  ",
        "hf-compile decode B=8: 25.5",  # cut off mid-line by the kill
        "ours-fp8 decode B=64: 3.712 ms/step",
    ])
    r = _e2e().parse_progress(text)
    assert r["decode"] == {1: {"ms_per_step": 20.0, "tokens_per_s": 50.0},
                           64: {"ms_per_step": 3.712, "tokens_per_s": 64e3 / 3.712}}
    assert r["prefill"] == {512: {"ms": 31.25, "tokens_per_s": 512e3 / 31.25}}
    assert r["warmup_s"] == {"decode": {1: 93.5, 8: 20.0}, "prefill": {}}
    assert _e2e().parse_progress("") == {"decode": {}, "prefill": {}}
