"""The CLI's checkpoint commands, run in-process through `qwen35_export.cli.main`."""

from __future__ import annotations

import re

import pytest
import torch

from qwen35_export.checkpoint.reader import load_model_weights
from qwen35_export.cli import main
from qwen35_export.model.model import Qwen35Model


def run_cli(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_init_checkpoint_info_generate(tmp_path, capsys) -> None:
    out = tmp_path / "tiny-bf16"
    assert "wrote random tiny checkpoint (bf16)" in run_cli(capsys, "init-checkpoint", "--preset", "tiny",
                                                            "--dtype", "bf16", "--out", str(out))
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()

    info = run_cli(capsys, "info", str(out))
    assert "model_type   qwen3_5_moe (prefix 'model.language_model.'), 1 safetensors file(s)" in info
    assert "geometry     H=256 layers=8 vocab=1024" in info
    assert "layers       gggAgggA" in info
    assert "experts stored fused" in info
    assert re.search(r"dtypes\s+BF16: \d+, F32: 6", info)  # A_log of the 6 GDN layers stays fp32
    assert "fp8          no" in info
    assert "not used" not in info  # the tiny preset has no MTP layer

    gen = run_cli(capsys, "generate", str(out), "--token-ids", "5,6,7", "--max-new-tokens", "6")
    m = re.fullmatch(r"reference greedy tokens: ([\d,]+)\n", gen)
    assert m, gen
    tokens = [int(t) for t in m.group(1).split(",")]
    assert len(tokens) == 6 and all(0 <= t < 1024 for t in tokens)
    model = Qwen35Model(load_model_weights(out, torch.float32, progress=False))
    assert tokens == model.generate_greedy([[5, 6, 7]], 6)[0]


def test_info_fp8_and_text_only(tmp_path, capsys, tiny_ckpt_fp8) -> None:
    info = run_cli(capsys, "info", str(tiny_ckpt_fp8))
    assert "experts stored per_expert" in info
    m = re.search(r"fp8          yes: (\d+) tensors float8_e4m3fn with 128x128 block scales", info)
    assert m and int(m.group(1)) > 8 * 16 * 3
    assert re.search(r"not used     \d+ tensors under 'mtp\.' \(MTP head; not used yet\)", info)

    out = tmp_path / "text"
    run_cli(capsys, "init-checkpoint", "--dtype", "fp8", "--text-only", "--expert-layout", "fused", "--out",
            str(out))
    info = run_cli(capsys, "info", str(out))
    assert "model_type   qwen3_5_moe_text (prefix 'model.')" in info
    assert "experts stored fused" in info and "fp8          yes" in info


def test_init_checkpoint_refuses_to_overwrite(tmp_path, capsys) -> None:
    out = tmp_path / "x"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    capsys.readouterr()
    assert main(["init-checkpoint", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not empty" in err
    assert (out / "mine.txt").read_text() == "keep"


def test_generate_bad_input_is_a_clean_error(capsys, tiny_ckpt_fp32) -> None:
    for argv, msg in ((["--token-ids", "5,5000"], "token id 5000 out of range"),
                      (["--token-ids", ""], "empty"),
                      (["--token-ids", "5", "--max-new-tokens", "0"], "max_new_tokens")):
        capsys.readouterr()
        assert main(["generate", str(tiny_ckpt_fp32), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err, (argv, err[-300:])


def test_init_checkpoint_layers_keeps_geometry_at_reduced_depth(tmp_path) -> None:
    import json

    from qwen35_export.cli import main as cli_main
    from qwen35_export.config import preset

    assert cli_main(["init-checkpoint", "--preset", "tiny", "--layers", "5", "--out", str(tmp_path / "c")]) == 0
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    full = preset("tiny")
    assert cfg["num_hidden_layers"] == 5 and cfg["hidden_size"] == full.hidden_size
    assert cfg["layer_types"] == ["linear_attention"] * 3 + ["full_attention", "linear_attention"]
    assert cli_main(["init-checkpoint", "--preset", "tiny", "--layers", "-2", "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("argv,b1,jobs", [([], None, 0), (["--batch1-decode"], True, 0),
                                          (["--no-batch1-decode", "--jobs", "3"], False, 3)])
def test_build_flags_reach_the_settings(argv, b1, jobs, monkeypatch, tmp_path) -> None:
    """`build --batch1-decode / --no-batch1-decode / --jobs` become BuildSettings fields (None: the target's
    default, exporter/build.py layer_phases)."""
    from qwen35_export.exporter import build

    seen = {}
    monkeypatch.setattr(build, "build_engine", lambda ckpt, out, settings: seen.setdefault("s", settings))
    assert main(["build", str(tmp_path), "--target", "cpu", "--out", str(tmp_path / "e"), *argv]) == 0
    assert seen["s"].batch1_decode is b1 and seen["s"].jobs == jobs
