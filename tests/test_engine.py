"""The engine path on the cpu target: build -> load -> generate equals the reference; atomic builds;
manifest checks; bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen35_export.checkpoint.reader import load_model_weights
from qwen35_export.cli import main as cli_main
from qwen35_export.errors import BuildError, EngineError, InputError
from qwen35_export.exporter.build import BuildSettings, build_engine
from qwen35_export.model.model import Qwen35Model
from qwen35_export.runtime.engine import Engine, prefill_groups
from qwen35_export.runtime.sampling import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3], [100, 200, 300, 400]]  # unequal lengths, one of 1 token
GEN = 32


@pytest.fixture(scope="module")
def engine(cpu_engine_fp32: Path) -> Engine:
    return Engine.load(cpu_engine_fp32)


@pytest.fixture(scope="module")
def reference(engine_ckpt_fp32: Path) -> Qwen35Model:
    return Qwen35Model(load_model_weights(engine_ckpt_fp32, torch.float32, progress=False))


def test_greedy_tokens_identical_to_reference(engine: Engine, reference: Qwen35Model) -> None:
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=GEN))
    ref = reference.generate_greedy(PROMPTS, GEN)
    assert [len(o) for o in out] == [GEN] * 3
    assert out == ref


@pytest.mark.parametrize("max_padding", [0.0, 0.1, float("inf")])
def test_grouped_prefill_gives_the_same_tokens(engine: Engine, reference: Qwen35Model, monkeypatch,
                                               max_padding: float) -> None:
    """generate() prefills length groups into slots held longest first and reports rows in the caller's
    order: per-length calls (0), the default, and one padded call (inf) all give the reference's tokens."""
    prompts = [[3], [100, 200, 300, 400], [5, 6, 7, 8, 9, 10, 11, 12, 13], [7, 8, 9, 10]]  # max batch 4
    calls = []
    prefill = engine.prefill
    monkeypatch.setattr(engine, "prefill", lambda ids, *a, **k: calls.append(tuple(ids.shape)) or prefill(ids, *a, **k))
    monkeypatch.setattr(engine, "max_prefill_padding", max_padding)
    out = engine.generate(prompts, SamplingParams(max_new_tokens=6))
    assert out == reference.generate_greedy(prompts, 6)
    expect = {0.0: [(1, 9), (2, 4), (1, 1)], 0.1: [(1, 9), (2, 4), (1, 1)], float("inf"): [(4, 9)]}[max_padding]
    assert calls == expect


@pytest.mark.parametrize("lengths,max_padding,groups", [
    ([9, 4, 4, 1, 1], 0.0, [(0, 1), (1, 3), (3, 5)]),
    ([9, 4, 4, 1, 1], 1.0, [(0, 4), (4, 5)]),  # 4 rows x 9 = 36 <= 2 x 18 real tokens; a fifth row breaks it
    ([9, 4, 4, 1, 1], float("inf"), [(0, 5)]),
    ([5], 0.0, [(0, 1)]),
    ([1, 8], 0.0, [(0, 1), (1, 2)]),  # unsorted rows still work, only consecutive rows are grouped
])
def test_prefill_groups(lengths, max_padding, groups) -> None:
    assert prefill_groups(lengths, max_padding) == groups


def test_prefill_groups_bound_padding() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = sorted(torch.randint(1, 300, (64,), generator=g).tolist(), reverse=True)
    for frac in (0.0, 0.1, 0.5):
        groups = prefill_groups(lengths, frac)
        assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
        for lo, hi in groups:
            assert (hi - lo) * max(lengths[lo:hi]) <= (1 + frac) * sum(lengths[lo:hi])


def test_prefill_logits_match_reference(engine: Engine, reference: Qwen35Model) -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9], [3, 0, 0, 0, 0]])
    lengths = torch.tensor([5, 1])
    logits = engine.prefill(ids, lengths, engine.reset(2), all_logits=True)
    ref, _ = reference.prefill(ids, lengths, reference.init_state(2, engine.max_seq_len))
    for b, n in enumerate(lengths.tolist()):
        err = (logits[b, :n] - ref[b, :n]).abs().max().item()
        assert err <= 1e-4 * ref[b, :n].abs().max().item(), f"row {b}: max |dlogit| {err}"


def test_load_in_fresh_process(cpu_engine_fp32: Path, reference: Qwen35Model) -> None:
    """Users load engines in a new process: no state from the build may be needed."""
    code = ("import json,sys; from qwen35_export.runtime.engine import Engine;"
            "from qwen35_export.runtime.sampling import SamplingParams;"
            f"e=Engine.load({str(cpu_engine_fp32)!r});"
            f"print(json.dumps(e.generate({PROMPTS[:2]!r}, SamplingParams(max_new_tokens=4))))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out == reference.generate_greedy(PROMPTS[:2], 4)


def test_sampling_modes(engine: Engine, reference: Qwen35Model) -> None:
    greedy = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=6))
    assert engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=6, temperature=1.0, top_k=1)) == greedy
    assert engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1e-6)) == greedy
    a = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, temperature=1.5, seed=7))
    b = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, temperature=1.5, seed=7))
    c = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, temperature=1.5, seed=8))
    assert a == b and a != c


def test_tiny_temperature_samples_the_argmax() -> None:
    """logits / 1e-40 overflows fp32 to inf, and softmax of inf is NaN: sampling must still pick the top."""
    from qwen35_export.runtime.sampling import sample

    logits = torch.tensor([[1.0, 3.0, -2.0, 2.5], [-1.0, -3.0, 0.5, 0.0]])
    for kw in ({}, {"top_k": 2}, {"top_p": 0.9}):
        got = sample(logits, SamplingParams(temperature=1e-40, **kw), torch.Generator().manual_seed(0))
        assert got.tolist() == [1, 2], kw


def test_stop_tokens(engine: Engine) -> None:
    greedy = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8))[0]
    stop = greedy[3]
    out = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, stop_token_ids=(stop,)))[0]
    assert out == greedy[: greedy.index(stop) + 1]


@pytest.mark.parametrize("prompts,new,match", [
    ([[]], 4, "empty"),
    ([[1, 2, 5000]], 4, "out of range"),
    ([[1] * 60], 8, "max sequence length"),
    ([[1]] * 5, 4, "max batch"),
])
def test_bad_input(engine: Engine, prompts, new, match) -> None:
    with pytest.raises(InputError, match=match):
        engine.generate(prompts, SamplingParams(max_new_tokens=new))


def test_manifest_records_build(cpu_engine_fp32: Path) -> None:
    m = json.loads((cpu_engine_fp32 / "manifest.json").read_text())
    assert m["target"] == "cpu" and m["dtype"] == "fp32" and m["format_version"] == 1
    # the fixture asks for the batch-1 decode graphs (off by default on cpu: test_layer_phases)
    assert set(m["graphs"]) == {"gdn_prefill", "gdn_decode", "gdn_decode1", "attn_prefill", "attn_decode",
                                "attn_decode1", "embed", "final"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert "torch" in m["versions"] and m["model_config"]["num_hidden_layers"] == 8
    # --dump-graphs wrote each graph before and after each pass
    assert (cpu_engine_fp32 / "graphs_dump" / "gdn_prefill.0.inline_ops.after.txt").is_file()
    assert (cpu_engine_fp32 / "graphs_dump" / "gdn_prefill.1.substitute_custom_ops.before.txt").is_file()
    assert m["passes"][-3:] == ["inline_ops", "substitute_custom_ops", "reinplace_state"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_manifest_version_mismatch(cpu_engine_fp32: Path, tmp_path: Path) -> None:
    d = _copy(cpu_engine_fp32, tmp_path / "e")
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="format_version: expected 1, found 99"):
        Engine.load(d)


def test_corrupt_weight_file_detected(cpu_engine_fp32: Path, tmp_path: Path) -> None:
    d = _copy(cpu_engine_fp32, tmp_path / "e")
    f = d / "weights" / "layer_002.safetensors"
    b = bytearray(f.read_bytes())
    b[-1] ^= 0xFF
    f.write_bytes(bytes(b))
    with pytest.raises(EngineError, match="layer_002.safetensors: sha256 does not match"):
        Engine.load(d)


def test_missing_file_detected(cpu_engine_fp32: Path, tmp_path: Path) -> None:
    d = _copy(cpu_engine_fp32, tmp_path / "e")
    (d / "graphs" / "attn_decode.pt2").unlink()
    with pytest.raises(EngineError, match="graphs/attn_decode.pt2' listed in the manifest is missing"):
        Engine.load(d)


def test_target_mismatch_named(cpu_engine_fp32: Path) -> None:
    with pytest.raises(EngineError, match="built for target cpu; cannot run on cuda"):
        Engine.load(cpu_engine_fp32, device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_target_without_gpu_fails_before_writing(engine_ckpt_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "eng"
    with pytest.raises(BuildError, match="--target h100 needs an NVIDIA GPU"):
        build_engine(engine_ckpt_fp32, out, BuildSettings(target="h100", progress=False))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_engine_never_replaced_without_force(cpu_engine_fp32: Path, engine_ckpt_fp32: Path) -> None:
    before = (cpu_engine_fp32 / "manifest.json").read_bytes()
    with pytest.raises(BuildError, match="already exists; pass --force"):
        build_engine(engine_ckpt_fp32, cpu_engine_fp32, BuildSettings(target="cpu", progress=False))
    assert (cpu_engine_fp32 / "manifest.json").read_bytes() == before


def test_failed_build_leaves_nothing(engine_ckpt_fp32: Path, tmp_path: Path, monkeypatch) -> None:
    """A build interrupted in the compile stage removes its temp dir, and an existing engine survives."""
    out = tmp_path / "eng"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # stands for a previous engine the user has

    def boom(*a, **k):
        raise KeyboardInterrupt("interrupted during compile")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", boom)
    with pytest.raises(KeyboardInterrupt):
        build_engine(engine_ckpt_fp32, out, BuildSettings(target="cpu", force=True, progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]
    assert (out / "manifest.json").read_text() == "{}"


def test_cli_run_and_inspect(cpu_engine_fp32: Path, capsys) -> None:
    assert cli_main(["run", str(cpu_engine_fp32), "--token-ids", "5,6,7", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert len(out.out.split()) == 4 and "tokens/s" in out.err
    assert cli_main(["inspect", str(cpu_engine_fp32)]) == 0
    text = capsys.readouterr().out
    assert "gggAgggA" in text and "gdn_prefill" in text and "reference ops" in text
    assert cli_main(["run", str(cpu_engine_fp32), "--prompt", "hello"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_run_stops_at_every_generation_config_eos(cpu_engine_fp32: Path, tmp_path: Path, capsys) -> None:
    """Chat checkpoints list several eos ids in generation_config.json (end of turn and end of text);
    `run` must stop at any of them, not only at config.json's single eos_token_id."""
    from qwen35_export.exporter.manifest import sha256_file

    argv = ["--token-ids", "5,6,7", "--max-new-tokens", "4"]
    capsys.readouterr()
    assert cli_main(["run", str(cpu_engine_fp32), *argv]) == 0
    toks = [int(t) for t in capsys.readouterr().out.split()]
    eng = tmp_path / "eng"
    shutil.copytree(cpu_engine_fp32, eng)
    gc = eng / "generation_config.json"
    gc.write_text(json.dumps({"eos_token_id": [toks[1], 1023]}))
    man = json.loads((eng / "manifest.json").read_text())
    man["files"]["generation_config.json"] = {"sha256": sha256_file(gc), "bytes": gc.stat().st_size}
    (eng / "manifest.json").write_text(json.dumps(man))
    assert cli_main(["run", str(eng), *argv]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == toks[: toks.index(toks[1]) + 1]


def test_file_table_skips_dumps_only_inside_the_engine(tmp_path: Path) -> None:
    """Only a `graphs_dump` folder inside the engine is left out, never one among the engine's parents."""
    from qwen35_export.exporter.engine_dir import file_table

    root = tmp_path / "graphs_dump" / "eng"
    (root / "graphs_dump").mkdir(parents=True)
    (root / "manifest.json").write_text("{}")
    (root / "graphs_dump" / "gdn.txt").write_text("dump")
    assert sorted(file_table(root)) == ["manifest.json"]


def test_bad_device_string_is_a_clean_error(cpu_engine_fp32: Path, capsys) -> None:
    capsys.readouterr()
    assert cli_main(["run", str(cpu_engine_fp32), "--token-ids", "5", "--device", "gpu0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'gpu0'" in err


def test_force_never_replaces_a_directory_that_is_not_an_engine(engine_ckpt_fp32: Path, tmp_path: Path) -> None:
    """`--force` replaces an engine; pointed by mistake at another folder (the checkpoint, a home dir) it
    must refuse before anything is written, not move the folder away and delete it."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(BuildError, match="not an engine directory"):
        build_engine(engine_ckpt_fp32, out, BuildSettings(target="cpu", force=True, progress=False))
    assert (out / "notes.txt").read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_kernels_triton_needs_fp8_kernels_for_an_fp8_checkpoint(monkeypatch) -> None:
    """No --dtype on an FP8 checkpoint resolves to fp8: `--kernels triton` must then require the FP8 kernels."""
    from qwen35_export.exporter import build as B

    monkeypatch.setattr(B, "triton_implementations", lambda: dict.fromkeys(
        ("causal_conv1d", "gated_delta_rule", "moe_router", "moe_experts"), object()))
    with pytest.raises(BuildError, match="fp8_linear"):
        B._select_kernels(BuildSettings(target="h100", kernels="triton"), "fp8")


def test_prefill_checks_its_limits(engine: Engine) -> None:
    s = engine.reset(2)
    ids = torch.ones(2, 5, dtype=torch.int64)
    with pytest.raises(InputError, match="every length must be in"):
        engine.prefill(ids, torch.tensor([5, 0]), s)
    with pytest.raises(InputError, match="expected ids"):
        engine.prefill(ids, torch.tensor([5, 5, 5]), s)
    engine.prefill(ids, torch.tensor([5, 3]), s)
    long = torch.ones(2, engine.max_seq_len - 4, dtype=torch.int64)
    with pytest.raises(InputError, match="past the engine's max sequence length"):
        engine.prefill(long, torch.full((2,), engine.max_seq_len - 4), s)


def test_decode_bucket_padding_rows(engine: Engine) -> None:
    """A CUDA-graph bucket's step (runtime/engine.py): rows past the batch decode with step 0. The real rows'
    logits and states equal a step of the real rows alone; the padding rows' slots do not move. Run through
    the eager step that the GPU graph captures (CUDA graphs themselves need a GPU)."""
    s = engine.reset(4)
    engine.prefill_grouped(PROMPTS + [[42, 43]], s)
    pools = (*s.conv, *s.rec, *s.k, *s.v, s.lengths)
    before = [t.clone() for t in pools]
    tok = torch.tensor([7, 8, 9, 0])
    padded = engine._decode_eager(tok, s, step=torch.tensor([1, 1, 1, 0]))
    after_padded = [t.clone() for t in pools]
    for t, b in zip(pools, before):
        t.copy_(b)
    alone = engine._decode_eager(tok[:3], engine.slots(3))
    torch.testing.assert_close(padded[:3], alone, rtol=1e-5, atol=1e-5)  # fp32; batch 4 vs 3 GEMM order only
    for p, a, b in zip(after_padded, pools, before):
        torch.testing.assert_close(p[:3], a[:3], rtol=1e-5, atol=1e-5)
        assert torch.equal(p[3], b[3]), "a padding row moved its slot's state"


@pytest.mark.parametrize("target,flag,sharded,has_b1", [
    ("cpu", None, False, False), ("h100", None, False, True), ("h200", None, False, True),
    ("cpu", True, False, True), ("h100", False, False, False), ("h100", None, True, False)])
def test_layer_phases(target: str, flag: bool | None, sharded: bool, has_b1: bool) -> None:
    from qwen35_export.exporter.build import layer_phases

    phases = layer_phases(BuildSettings(target=target, batch1_decode=flag), sharded)
    assert phases[:2] == ("prefill", "decode") and ("decode1" in phases) == has_b1


def test_batch1_decode_asked_where_it_cannot_apply() -> None:
    from qwen35_export.exporter.build import layer_phases

    with pytest.raises(BuildError, match="--batch1-decode: .* single-rank engines only .* --tp 2 --ep 1"):
        layer_phases(BuildSettings(target="h100", batch1_decode=True, tp=2), sharded=True)


def test_batch1_decode_graph(engine: Engine, reference: Qwen35Model, cpu_engine_fp32: Path, monkeypatch) -> None:
    """The static batch-1 decode graphs (exporter/capture.py DECODE1): built, used for one-row decode steps
    only, and equal to the dynamic decode graph there; one-prompt generation still gives the reference's
    tokens."""
    graphs = json.loads((cpu_engine_fp32 / "manifest.json").read_text())["graphs"]
    for kind in ("gdn", "attn"):
        assert graphs[f"{kind}_decode1"]["phase"] == "decode1"
        assert graphs[f"{kind}_decode1"]["weight_names"] == graphs[f"{kind}_decode"]["weight_names"]
        assert engine.layer_graph(kind, "decode", 1) is engine.graphs[f"{kind}_decode1"]
        assert engine.layer_graph(kind, "decode", 2) is engine.graphs[f"{kind}_decode"]
        assert engine.layer_graph(kind, "prefill", 1) is engine.graphs[f"{kind}_prefill"]
    calls = {"gdn_decode1": 0, "attn_decode1": 0}
    def counted(name: str, g):
        def call(*a):
            calls[name] += 1
            return g(*a)
        return call

    for name in calls:
        monkeypatch.setitem(engine.graphs, name, counted(name, engine.graphs[name]))
    prompt = [[11, 12, 13, 14, 15]]
    assert engine.generate(prompt, SamplingParams(max_new_tokens=GEN)) == reference.generate_greedy(prompt, GEN)
    n_gdn, n_attn = len(engine.cfg.gdn_layers), len(engine.cfg.attention_layers)
    assert calls == {"gdn_decode1": (GEN - 1) * n_gdn, "attn_decode1": (GEN - 1) * n_attn}

    # One step from the same slot state through each graph: same logits and states.
    s = engine.reset(1)
    engine.prefill(torch.tensor(prompt), torch.tensor([5]), s)
    pools = (*s.conv, *s.rec, *s.k, *s.v, s.lengths)
    before = [t.clone() for t in pools]
    static = engine.decode(torch.tensor([9]), s)
    after_static = [t.clone() for t in pools]
    for t, b in zip(pools, before):
        t.copy_(b)
    for kind in ("gdn", "attn"):
        monkeypatch.delitem(engine.graphs, f"{kind}_decode1")
    dynamic = engine.decode(torch.tensor([9]), s)
    torch.testing.assert_close(static, dynamic, rtol=1e-5, atol=1e-5)  # fp32, same ops: compile order only
    for a, b in zip(after_static, pools):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
