"""Bad checkpoints fail with a package error whose message names the file/tensor/field, what was expected
and what was found; the CLI prints it as `error: ...` and exits 2, with no traceback.

Each broken checkpoint is a copy of a good session checkpoint edited with safetensors (never pickle).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen35_export.checkpoint.reader import CheckpointReader, load_model_weights
from qwen35_export.cli import main
from qwen35_export.config import Qwen35Config
from qwen35_export.errors import CheckpointError, ConfigError, Qwen35Error

P = "model.language_model."


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_of(ckpt: Path, key: str) -> Path:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        return ckpt / json.loads(index.read_text())["weight_map"][key]
    return ckpt / "model.safetensors"


def edit_tensors(ckpt: Path, key: str, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite the safetensors file holding `key` after `fn` edits its tensor dict in place."""
    f = shard_of(ckpt, key)
    with safe_open(str(f), framework="pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def edit_config(ckpt: Path, fn: Callable[[dict], None]) -> None:
    d = json.loads((ckpt / "config.json").read_text())
    fn(d)
    (ckpt / "config.json").write_text(json.dumps(d))


def load(ckpt: Path) -> None:
    load_model_weights(ckpt, progress=False)


def assert_error(exc_type: type[Qwen35Error], action: Callable[[], object], *parts: str) -> str:
    with pytest.raises(exc_type) as e:
        action()
    msg = str(e.value)
    for p in parts:
        assert p in msg, f"{p!r} not in message: {msg}"
    return msg


def assert_cli_error(capsys, argv: list[str], *parts: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out, out.err
    last = out.err.replace("\r", "\n").strip().splitlines()[-1]  # after any progress-bar residue
    assert last.startswith("error: "), out.err
    for p in parts:
        assert p in last, f"{p!r} not in: {last}"


# -- files and shards ------------------------------------------------------------------------------------
def test_missing_shard_listed_in_index(tmp_path, tiny_ckpt_fp32_sharded, capsys) -> None:
    ckpt = copy_ckpt(tiny_ckpt_fp32_sharded, tmp_path / "c")
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_error(CheckpointError, lambda: CheckpointReader(ckpt), "model.safetensors.index.json", shard.name,
                 "listed but missing")
    assert_cli_error(capsys, ["info", str(ckpt)], shard.name, "missing")


def test_index_maps_tensor_to_shard_that_lacks_it(tmp_path, tiny_ckpt_fp32_sharded) -> None:
    ckpt = copy_ckpt(tiny_ckpt_fp32_sharded, tmp_path / "c")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    key = P + "layers.0.linear_attn.in_proj_a.weight"
    right = index["weight_map"][key]
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != right)
    index["weight_map"][key] = wrong
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_error(CheckpointError, lambda: CheckpointReader(ckpt), key, wrong, "do not hold")


def test_truncated_safetensors_file(tmp_path, tiny_ckpt_bf16, capsys) -> None:
    ckpt = copy_ckpt(tiny_ckpt_bf16, tmp_path / "c")
    f = ckpt / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as h:
        h.truncate(size - 1000)
    msg = assert_error(CheckpointError, lambda: CheckpointReader(ckpt), str(f), "truncated", str(size - 1000))
    assert "ends at byte" in msg  # what the header expected vs the file size found
    assert_cli_error(capsys, ["info", str(ckpt)], "truncated")
    with open(f, "r+b") as h:
        h.truncate(5)
    assert_error(CheckpointError, lambda: CheckpointReader(ckpt), str(f), "truncated", "5 bytes")


@pytest.mark.parametrize("damage", ["garbage-json", "huge-length", "not-an-object"])
def test_corrupt_safetensors_header(tmp_path, tiny_ckpt_bf16, capsys, damage: str) -> None:
    ckpt = copy_ckpt(tiny_ckpt_bf16, tmp_path / "c")
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    if damage == "garbage-json":
        data[8 + n // 2: 8 + n // 2 + 16] = b"\x00\xff{{{{not json}}"
    elif damage == "huge-length":
        data[:8] = (len(data) * 4).to_bytes(8, "little")
    else:
        data[8:8 + n] = b"[" + b" " * (n - 2) + b"]"
    f.write_bytes(bytes(data))
    assert_error(CheckpointError, lambda: CheckpointReader(ckpt), str(f), "corrupt safetensors header")
    assert_cli_error(capsys, ["info", str(ckpt)], "corrupt safetensors header")


# -- tensors ---------------------------------------------------------------------------------------------
def test_tensor_missing_names_it_and_its_shape(tmp_path, tiny_ckpt_bf16, capsys) -> None:
    ckpt = copy_ckpt(tiny_ckpt_bf16, tmp_path / "c")
    key = P + "layers.5.linear_attn.in_proj_z.weight"
    edit_tensors(ckpt, key, lambda t: t.pop(key))
    assert_error(CheckpointError, lambda: load(ckpt), key, "missing", "expected shape [512, 256]")
    assert_cli_error(capsys, ["generate", str(ckpt), "--max-new-tokens", "1"], key, "[512, 256]")


@pytest.mark.parametrize("ckpt_fixture,key,change,expected", [
    ("tiny_ckpt_bf16", P + "layers.3.self_attn.k_proj.weight", lambda t: t[:256].clone(),
     ("expected shape [512, 256]", "found [256, 256]")),
    ("tiny_ckpt_bf16", P + "layers.0.mlp.gate.weight", lambda t: t.to(torch.int32),
     ("expected a float dtype", "found torch.int32")),
    # A weight with a block scale beside it must be float8_e4m3fn; reading a BF16 one there as a plain
    # weight would silently drop its scale.
    ("tiny_ckpt_fp8", P + "layers.1.linear_attn.out_proj.weight", lambda t: t.to(torch.bfloat16),
     ("expected dtype float8_e4m3fn", "found torch.bfloat16")),
], ids=["shape", "int-dtype", "bf16-where-fp8"])
def test_tensor_shape_or_dtype_mismatch(tmp_path, request, capsys, ckpt_fixture, key, change, expected) -> None:
    ckpt = copy_ckpt(request.getfixturevalue(ckpt_fixture), tmp_path / "c")

    def edit(t):
        t[key] = change(t[key])

    edit_tensors(ckpt, key, edit)
    assert_error(CheckpointError, lambda: load(ckpt), key, *expected)
    assert_cli_error(capsys, ["generate", str(ckpt), "--max-new-tokens", "1"], key, *expected)


def test_fp8_tensor_in_a_checkpoint_without_quantization_config(tmp_path, tiny_ckpt_fp8) -> None:
    ckpt = copy_ckpt(tiny_ckpt_fp8, tmp_path / "c")
    edit_config(ckpt, lambda d: d.pop("quantization_config"))
    assert_error(CheckpointError, lambda: load(ckpt), "in_proj_qkv.weight", "expected a float dtype",
                 "found torch.float8_e4m3fn")


@pytest.mark.parametrize("what", ["wrong-shape", "missing", "wrong-dtype"])
def test_fp8_scale_wrong(tmp_path, tiny_ckpt_fp8, capsys, what: str) -> None:
    ckpt = copy_ckpt(tiny_ckpt_fp8, tmp_path / "c")
    key = P + "layers.2.mlp.experts.7.down_proj.weight_scale_inv"  # weight [256, 128] -> scale [2, 1]

    def damage(t):
        if what == "wrong-shape":
            t[key] = torch.ones(1, 2)
        elif what == "missing":
            t.pop(key)
        else:
            t[key] = t[key].bfloat16()

    edit_tensors(ckpt, key, damage)
    expected = {"wrong-shape": ("expected shape [2, 1]", "found [1, 2]"),
                "missing": ("missing", "expected shape [2, 1]"),
                "wrong-dtype": ("expected dtype float32", "found torch.bfloat16")}[what]
    assert_error(CheckpointError, lambda: load(ckpt), key, *expected)
    assert_cli_error(capsys, ["generate", str(ckpt), "--max-new-tokens", "1"], key)


# -- config ----------------------------------------------------------------------------------------------
def test_unsupported_model_type(tmp_path, tiny_ckpt_bf16, capsys) -> None:
    ckpt = copy_ckpt(tiny_ckpt_bf16, tmp_path / "c")
    edit_config(ckpt, lambda d: d.update(model_type="qwen3_next"))
    assert_error(ConfigError, lambda: CheckpointReader(ckpt), "config.json", "model_type", "qwen3_5_moe",
                 "found 'qwen3_next'")
    assert_cli_error(capsys, ["info", str(ckpt)], "model_type", "'qwen3_next'")


def test_missing_config_field(tmp_path, tiny_ckpt_bf16, capsys) -> None:
    ckpt = copy_ckpt(tiny_ckpt_bf16, tmp_path / "c")
    edit_config(ckpt, lambda d: d["text_config"].pop("num_experts"))
    assert_error(ConfigError, lambda: CheckpointReader(ckpt), str(ckpt / "config.json"), "missing",
                 "'num_experts'")
    assert_cli_error(capsys, ["info", str(ckpt)], "num_experts")


@pytest.mark.parametrize("field,value,expected", [
    ("hidden_size", -256, "a positive integer"),
    ("num_experts", "16", "a positive integer"),
    ("num_key_value_heads", 3, "a divisor of num_attention_heads=4"),
    ("num_experts_per_tok", 32, "<= num_experts=16"),
    ("layer_types", ["linear_attention"] * 7, "8 entries"),
    ("layer_types", ["linear_attention"] * 7 + ["sliding_attention"], "only 'full_attention'"),
    ("rope_parameters", {"rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 11]},
     "sections summing to rotary_dim/2 = 32"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e7}, "expected 'default'"),
    ("full_attention_interval", 0, "a positive integer"),
], ids=["negative", "string", "kv-heads", "top-k", "layer-count", "layer-kind", "mrope", "rope-type",
        "interval"])
def test_invalid_config_field(tmp_path, tiny_ckpt_bf16, capsys, field, value, expected) -> None:
    ckpt = copy_ckpt(tiny_ckpt_bf16, tmp_path / "c")

    def edit(d):
        if field == "full_attention_interval":
            d["text_config"].pop("layer_types")
        d["text_config"][field] = value

    edit_config(ckpt, edit)
    name = field.split(".")[0]
    msg = assert_error(ConfigError, lambda: CheckpointReader(ckpt), str(ckpt / "config.json"), expected)
    assert name in msg or "mrope_section" in msg
    assert_cli_error(capsys, ["info", str(ckpt)], expected)


def test_fp8_quantization_config_invalid(tmp_path, tiny_ckpt_fp8) -> None:
    ckpt = copy_ckpt(tiny_ckpt_fp8, tmp_path / "c")
    edit_config(ckpt, lambda d: d["quantization_config"].update(fmt="e5m2"))
    assert_error(ConfigError, lambda: CheckpointReader(ckpt), "quantization_config.fmt", "'e4m3'", "'e5m2'")


def test_config_json_not_json(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{ nope")
    assert_error(ConfigError, lambda: Qwen35Config.from_json_file(tmp_path / "config.json"), "config.json",
                 "not valid JSON")
