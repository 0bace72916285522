"""`qwen35-export validate` on the good engine (exit 0, report files) and `build --validate` recording
into the manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qwen35_export.cli import main as cli_main
from qwen35_export.runtime.engine import Engine


def test_cli_validate_writes_report(cpu_engine_fp32: Path, engine_ckpt_fp32: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("5,6,7,8,9,10\n\n300, 2, 99\n")
    rc = cli_main(["validate", str(cpu_engine_fp32), "--checkpoint", str(engine_ckpt_fp32), "--prompts",
                   str(prompts), "--gen", "3", "--report", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS" in out and "prefill hidden rel_l2" in out
    d = json.loads((tmp_path / "rep" / "validation.json").read_text())
    assert d["passed"] is True and d["prompt_lengths"] == [6, 3] and len(d["layers"]) == 8
    assert d["thresholds"]["hidden_rel_l2"] == 1e-4
    assert "| 3 | attn |" in (tmp_path / "rep" / "validation.md").read_text()
    assert (tmp_path / "rep" / "validation.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_validate_reference_mode_stream(cpu_engine_fp32: Path, engine_ckpt_fp32: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    """`--reference-mode stream` runs the layer-streaming reference, says so, and records it in the report."""
    rc = cli_main(["validate", str(cpu_engine_fp32), "--checkpoint", str(engine_ckpt_fp32), "--random", "2",
                   "--gen", "3", "--reference-mode", "stream", "--report", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "fp32 layer streaming" in out and "reference ours (stream)" in out and "PASS" in out
    d = json.loads((tmp_path / "rep" / "validation.json").read_text())
    assert d["passed"] is True and d["reference_mode"] == "stream"
    # transformers' model cannot be streamed: a clean error, before the engine is even loaded
    assert cli_main(["validate", str(cpu_engine_fp32), "--checkpoint", str(engine_ckpt_fp32), "--reference",
                     "transformers", "--reference-mode", "stream"]) == 2
    assert "only our reference" in capsys.readouterr().err


def test_cli_validate_bad_prompts_file(cpu_engine_fp32: Path, engine_ckpt_fp32: Path, tmp_path: Path) -> None:
    bad = tmp_path / "p.txt"
    bad.write_text("1,2,x\n")
    assert cli_main(["validate", str(cpu_engine_fp32), "--checkpoint", str(engine_ckpt_fp32),
                     "--prompts", str(bad)]) == 2


def test_build_validate_records_in_manifest(cpu_engine_fp32: Path, engine_ckpt_fp32: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`build --validate` -> validate_after_build records into manifest.json, without a second one-minute
    compile: the build is a copy of the fixture engine."""
    import qwen35_export.exporter.build as build

    monkeypatch.setattr(build, "build_engine", lambda ckpt, out, settings: shutil.copytree(cpu_engine_fp32, out))
    eng = tmp_path / "built"
    assert cli_main(["build", str(engine_ckpt_fp32), "--target", "cpu", "--out", str(eng), "--validate"]) == 0
    v = json.loads((eng / "manifest.json").read_text())["validation"]
    assert v["passed"] is True and v["precision"] == "fp32" and v["first_bad_layer"] is None
    assert v["summary"].startswith("PASS") and v["checks"]["prefill hidden rel_l2 (max)"]["passed"]
    assert not list(eng.glob(".manifest.json.*")), "temp file of the atomic rewrite left behind"
    Engine.load(eng)  # still loads: the manifest is not among the hashed files


def test_validate_batches_past_max_batch(cpu_engine_fp32: Path, engine_ckpt_fp32: Path) -> None:
    """More prompts than the engine's max batch (4) run as several batches; all rows are compared."""
    from qwen35_export.validate.run import validate

    prompts = [[7 + i, 3 * i + 1, 2][: 1 + i % 3] for i in range(5)]
    r = validate(cpu_engine_fp32, engine_ckpt_fp32, prompts=prompts, gen=2, progress=False)
    assert r.passed, r.summary()
    assert r.prompt_lengths == [len(p) for p in prompts]


def test_validate_rejects_bad_input(cpu_engine_fp32: Path, engine_ckpt_fp32: Path) -> None:
    from qwen35_export.errors import InputError
    from qwen35_export.validate.run import validate

    with pytest.raises(InputError, match="--gen 64"):
        validate(cpu_engine_fp32, engine_ckpt_fp32, gen=64)
    with pytest.raises(InputError, match="--reference"):
        validate(cpu_engine_fp32, engine_ckpt_fp32, reference="onnx")
    with pytest.raises(InputError, match="out of range"):
        validate(cpu_engine_fp32, engine_ckpt_fp32, prompts=[[5, 99999]], gen=2)
