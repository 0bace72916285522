"""`build --backend onnxruntime --target cpu` end to end: tiny checkpoint -> ONNX engine -> greedy tokens
identical to the fp32 reference; the graphs are valid ONNX with `qwen35::` nodes carrying function bodies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from qwen35_export.checkpoint.reader import load_model_weights
from qwen35_export.cli import main as cli_main
from qwen35_export.errors import BuildError
from qwen35_export.exporter.build import BuildSettings
from qwen35_export.model.model import Qwen35Model
from qwen35_export.plugins import build as B
from qwen35_export.plugins.onnx.schemas import DOMAIN, SCHEMAS
from qwen35_export.runtime.engine import Engine
from qwen35_export.runtime.ort_session import OrtGraph
from qwen35_export.runtime.sampling import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3], [100, 200, 300, 400]]  # unequal lengths, one of 1 token
GEN = 32
GRAPHS = {"gdn_prefill", "gdn_decode", "attn_prefill", "attn_decode", "embed", "final"}


@pytest.fixture(scope="module")
def engine(ort_engine_fp32: Path) -> Engine:
    return Engine.load(ort_engine_fp32)


@pytest.fixture(scope="module")
def reference(engine_ckpt_fp32: Path) -> Qwen35Model:
    return Qwen35Model(load_model_weights(engine_ckpt_fp32, torch.float32, progress=False))


def test_greedy_tokens_identical_to_reference(engine: Engine, reference: Qwen35Model) -> None:
    assert all(isinstance(g, OrtGraph) for g in engine.graphs.values())  # the dispatch took the ORT path
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=GEN))
    ref = reference.generate_greedy(PROMPTS, GEN)
    assert [len(o) for o in out] == [GEN] * 3
    assert out == ref


def test_prefill_logits_and_states_match_reference(engine: Engine, reference: Qwen35Model) -> None:
    """Logits at every real position, and the state each graph wrote back into the engine's pools."""
    ids = torch.tensor([[5, 6, 7, 8, 9], [3, 0, 0, 0, 0]])
    lengths = torch.tensor([5, 1])
    s = engine.reset(2)
    logits = engine.prefill(ids, lengths, s, all_logits=True)
    ref, rs = reference.prefill(ids, lengths, reference.init_state(2, engine.max_seq_len))
    for b, n in enumerate(lengths.tolist()):
        err = (logits[b, :n] - ref[b, :n]).abs().max().item()
        assert err <= 1e-4 * ref[b, :n].abs().max().item(), f"row {b}: max |dlogit| {err}"
    for name, mine, theirs in [("conv", s.conv, rs.conv), ("recurrent", s.rec, rs.recurrent)]:
        for j, (a, r) in enumerate(zip(mine, theirs)):
            assert (a - r).abs().max().item() <= 1e-4 * r.abs().max().item(), f"{name}[{j}]"
    for j, (a, r) in enumerate(zip(s.k, rs.k_cache)):  # positions past each row's length hold padding
        for b, n in enumerate(lengths.tolist()):
            assert (a[b, :, :n] - r[b, :, :n]).abs().max().item() <= 1e-4 * r.abs().max().item(), f"k[{j}]"
    assert s.lengths.tolist() == [5, 1]


def test_per_layer_validate_passes(engine: Engine, engine_ckpt_fp32: Path) -> None:
    """validate/ on the ORT engine: every layer's hidden state, the GDN states, routing and logits within
    the fp32 bounds of the reference."""
    from qwen35_export.validate.run import validate

    result = validate(engine, engine_ckpt_fp32, random_n=2, gen=6, progress=False)
    assert result.passed, [c for c in result.checks if not c.passed]
    names = {c.name for c in result.checks}
    assert any("GDN recurrent state" in n for n in names) and any("routing" in n for n in names)


def test_load_in_fresh_process(ort_engine_fp32: Path, reference: Qwen35Model) -> None:
    code = ("import json; from qwen35_export.runtime.engine import Engine;"
            "from qwen35_export.runtime.sampling import SamplingParams;"
            f"e=Engine.load({str(ort_engine_fp32)!r});"
            f"print(json.dumps(e.generate({PROMPTS[:2]!r}, SamplingParams(max_new_tokens=4))))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == reference.generate_greedy(PROMPTS[:2], 4)


def test_manifest_and_layout(ort_engine_fp32: Path) -> None:
    m = json.loads((ort_engine_fp32 / "manifest.json").read_text())
    assert m["backend"] == "onnxruntime" and m["target"] == "cpu" and m["dtype"] == "fp32"
    assert set(m["graphs"]) == GRAPHS
    assert all(g["file"] == f"graphs/{n}.onnx" for n, g in m["graphs"].items())
    assert "onnxruntime" in m["versions"] and "onnx" in m["versions"]
    assert m["graphs"]["gdn_decode"]["substitutions"] == {"CausalConv1d": 1, "GatedDeltaRule": 1,
                                                          "MoERouter": 1, "MoE": 1}
    assert m["graphs"]["attn_prefill"]["substitutions"] == {"MoERouter": 1, "MoE": 1}
    # one weight file per layer, as the AOTI engine writes them
    assert m["layer_files"] == [f"weights/layer_{i:03d}.safetensors" for i in range(8)]
    assert not list(ort_engine_fp32.parent.glob(".ort_fp32.building-*"))


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_graph_is_valid_onnx_with_function_bodies(ort_engine_fp32: Path, name: str) -> None:
    path = ort_engine_fp32 / "graphs" / f"{name}.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    assert {o.domain: o.version for o in m.opset_import}[""] >= 23
    custom = [n for n in m.graph.node if n.domain == DOMAIN]
    bodies = {f.name: f for f in m.functions if f.domain == DOMAIN}
    expect = {"gdn": {"CausalConv1d", "GatedDeltaRule", "MoERouter", "MoE"}, "attn": {"MoERouter", "MoE"}}
    assert {n.op_type for n in custom} == expect.get(name.split("_")[0], set())
    for n in custom:
        f = bodies[n.op_type]
        assert len(f.node) > 0
        assert list(n.input) and len(n.input) == len(f.input) == len(SCHEMAS[n.op_type].inputs)
        assert len(n.output) == len(f.output) == len(SCHEMAS[n.op_type].outputs)
    if name.startswith("gdn"):
        gdr = bodies["GatedDeltaRule"]
        assert "Scan" in {x.op_type for x in gdr.node}, "the recurrence is a Scan"
    ops = {x.op_type for x in m.graph.node}
    if name == "attn_prefill":
        assert "Attention" in ops  # opset-23 Attention for the SDPA
    if name == "attn_decode":  # qwen35::decode_attention written in standard ops
        assert "Softmax" in ops and "Attention" not in ops
    if custom:
        router = next(n for n in custom if n.op_type == "MoERouter")
        assert [(a.name, a.i) for a in router.attribute] == [("top_k", 4)]


def test_state_outputs_named_for_their_inputs(ort_engine_fp32: Path) -> None:
    m = onnx.load(str(ort_engine_fp32 / "graphs" / "gdn_decode.onnx"))
    assert [o.name for o in m.graph.output] == ["y", "conv_state.next", "rec_state.next"]
    assert [i.name for i in m.graph.input][:4] == ["x", "lengths", "conv_state", "rec_state"]


def test_tensorrt_backend_names_missing_module(engine_ckpt_fp32: Path, tmp_path: Path, capsys) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is importable here: the missing-module message cannot be produced")
    out = tmp_path / "trt"
    with pytest.raises(BuildError, match="`tensorrt` Python module"):
        B.build_backend_engine(engine_ckpt_fp32, out, BuildSettings(target="h100", backend="tensorrt",
                                                                    progress=False))
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert cli_main(["build", str(engine_ckpt_fp32), "--target", "h100", "--backend", "tensorrt",
                     "--out", str(out)]) == 2
    assert "tensorrt" in capsys.readouterr().err


def test_failed_build_leaves_nothing(engine_ckpt_fp32: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "eng"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # a previous engine the user has

    def boom(*a, **k):
        raise KeyboardInterrupt("interrupted during export")

    monkeypatch.setattr(B.X, "export_layer", boom)
    with pytest.raises(KeyboardInterrupt):
        B.build_backend_engine(engine_ckpt_fp32, out, BuildSettings(target="cpu", backend="onnxruntime",
                                                                    force=True, progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]
    assert (out / "manifest.json").read_text() == "{}"


def test_existing_engine_needs_force(ort_engine_fp32: Path, engine_ckpt_fp32: Path) -> None:
    with pytest.raises(BuildError, match="already exists; pass --force"):
        B.build_backend_engine(engine_ckpt_fp32, ort_engine_fp32, BuildSettings(target="cpu", backend="onnxruntime",
                                                                                progress=False))


def test_batch1_decode_is_an_aoti_option(engine_ckpt_fp32: Path, tmp_path: Path) -> None:
    """Asking an ONNX build for batch-1 decode graphs fails by name before anything is written."""
    out = tmp_path / "eng"
    with pytest.raises(BuildError, match="--batch1-decode: .* AOTInductor engines only .* --backend onnxruntime"):
        B.build_backend_engine(engine_ckpt_fp32, out, BuildSettings(target="cpu", backend="onnxruntime",
                                                                    batch1_decode=True, progress=False))
    assert not out.exists()
