"""The layer-streaming fp32 reference (validate/stream.py): the same RowTrace numbers as the whole-model
reference, one layer's weights alive at a time, and the automatic choice between the two."""

from __future__ import annotations

import re
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qwen35_export.checkpoint.reader import CheckpointReader, load_model_weights
from qwen35_export.config import param_counts, preset
from qwen35_export.errors import InputError
from qwen35_export.model.model import Qwen35Model
from qwen35_export.validate import run as validate_run
from qwen35_export.validate import stream
from qwen35_export.validate.metrics import compare
from qwen35_export.validate.stream import stream_trace
from qwen35_export.validate.trace import ModelRunner, RowTrace, routing_from_engine_inputs, trace

# Two batches (the first with right padding), as validate splits prompts past the engine's max batch.
BATCHES = [[[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [300, 2, 99, 7, 41, 8, 800]], [[3, 1, 4, 1, 5]]]
MAX_SEQ = 64

# The prompt positions run the very layer calls the whole model's prefill makes (same inputs, same padding,
# same cache size), so they agree to the bit on one machine; the bound is for safety, not slack. The
# teacher-forced positions run as one call of S tokens instead of S decode steps: the same formulas in
# another summation order (attention over S queries at once, GEMMs of S rows instead of 1), measured at
# ~1.5e-7 per layer and 3e-7 for the logits on the tiny model, i.e. a few fp32 eps (1.2e-7). 2e-6 is 16 eps
# and 50x below the fp32 engine bound (1e-4), so the streamed reference can never move a validate check.
REL_BOUND = 2e-6


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    m = compare(a, b)
    assert m.rel_l2 <= REL_BOUND, f"{what}: rel_l2 {m.rel_l2:.3e} > {REL_BOUND:g} (max abs {m.max_abs:.3e})"


@pytest.mark.parametrize("gen", [pytest.param(1, id="gen1-no-decode"), pytest.param(5, id="gen5")])
def test_stream_matches_whole_model(engine_ckpt_fp32: Path, gen: int) -> None:
    """Fed the whole reference's own rows as the "engine" (its greedy tokens, its layer outputs), the streamed
    reference gives every RowTrace field and the routing picks of the whole reference."""
    model = Qwen35Model(load_model_weights(engine_ckpt_fp32, torch.float32, progress=False))
    whole = [trace(ModelRunner(model, MAX_SEQ), b, gen, routing=True, progress=False) for b in BATCHES]
    whole_routing = [p for rows in whole for p in routing_from_engine_inputs(model, rows, rows)]
    rows, routing = stream_trace(engine_ckpt_fp32, whole, MAX_SEQ, progress=False)
    flat = [r for b in whole for r in b]
    assert len(rows) == len(flat) == 3
    for n, (s, w) in enumerate(zip(rows, flat)):
        assert s.prompt == w.prompt and s.teacher == w.teacher, f"row {n}: greedy picks differ"
        for f in ("prefill_hidden", "prefill_logits", "decode_hidden", "decode_logits"):
            assert getattr(s, f).shape == getattr(w, f).shape, f"row {n} {f}"
            _close(getattr(s, f), getattr(w, f), f"row {n} {f}")
        assert len(s.conv) == len(w.conv) == len(model.cfg.gdn_layers)
        for j, (a, b) in enumerate(zip(s.conv + s.rec, w.conv + w.rec)):
            _close(a, b, f"row {n} GDN state {j}")
        assert all(torch.equal(a, b) for a, b in zip(s.router_ids, w.router_ids)), f"row {n}: router picks"
        assert all(torch.equal(a, b) for a, b in zip(routing[n], whole_routing[n])), f"row {n}: engine-input picks"


def _row(prompt: list[int], teacher: list[int]) -> RowTrace:
    """A stand-in engine row: the prompt and the tokens fed; its layer outputs (for the routing picks) zero."""
    cfg = preset("tiny")
    L, T, S, H, V = cfg.num_hidden_layers, len(prompt), len(teacher) - 1, cfg.hidden_size, cfg.vocab_size
    return RowTrace(prompt, teacher, torch.zeros(L, T, H), torch.zeros(T, V), torch.zeros(L, S, H), torch.zeros(S, V))


def test_stream_holds_one_layer_at_a_time(engine_ckpt_fp32: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor read from the checkpoint is dead before the next group's first read: embeddings, then
    layer 0, 1, ..., then the final norm and lm_head."""
    L = preset("tiny").num_hidden_layers
    alive: list[tuple[int, weakref.ref]] = []
    groups_seen: list[int] = []
    orig = CheckpointReader.read

    def group(key: str) -> int:
        m = re.search(r"layers\.(\d+)\.", key)
        return 1 + int(m.group(1)) if m else (0 if "embed_tokens" in key else L + 1)

    def read(self: CheckpointReader, key: str) -> torch.Tensor:
        g = group(key)
        held = sorted({h for h, ref in alive if h < g and ref() is not None})
        assert not held, f"reading '{key}' while tensors of groups {held} are still alive"
        t = orig(self, key)
        alive.append((g, weakref.ref(t)))
        if not groups_seen or groups_seen[-1] != g:
            groups_seen.append(g)
        return t

    monkeypatch.setattr(CheckpointReader, "read", read)
    stream_trace(engine_ckpt_fp32, [[_row([5, 6, 7], [9, 9, 9])]], MAX_SEQ, progress=False)
    assert groups_seen == list(range(L + 2)), "each group read once, in order"


def test_reference_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: whole while the fp32 model fits in host memory (cpu engine), else streamed; the flag forces
    either; transformers cannot stream."""
    cfg = preset("tiny")
    eng = SimpleNamespace(device=torch.device("cpu"), cfg=cfg)
    need = param_counts(cfg).total * 4
    monkeypatch.setattr(stream, "host_available_bytes", lambda: 2 * need)
    assert validate_run.reference_plan(eng).mode == "whole"
    assert validate_run.reference_plan(eng, mode="stream").mode == "stream"
    monkeypatch.setattr(stream, "host_available_bytes", lambda: need)  # no room for the 25% headroom
    plan = validate_run.reference_plan(eng)
    assert (plan.mode, plan.device.type) == ("stream", "cpu") and "layer streaming" in plan.describe()
    assert validate_run.reference_plan(eng, mode="whole").mode == "whole"
    assert validate_run.reference_plan(eng, "transformers").mode == "whole"
    with pytest.raises(InputError, match="only our reference"):
        validate_run.reference_plan(eng, "transformers", "stream")
    with pytest.raises(InputError, match="--reference-mode"):
        validate_run.reference_plan(eng, mode="layers")


def test_fits_counts_memory_cached_by_torch_as_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a streamed layer ran on the GPU and was dropped, its blocks stay reserved by torch's caching
    allocator, which the driver's free count (mem_get_info) no longer shows; the next layer reuses them."""
    gib = 1 << 30
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (10 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 9 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 1 * gib)
    assert stream.fits(dev, 12 * gib)  # 12 GiB x 1.25 = 15 GiB < 10 free + 8 cached
    assert not stream.fits(dev, 15 * gib)  # 18.75 GiB > 18


def test_stream_rejects_a_global_stored_fp8(engine_ckpt_fp32: Path, tmp_path: Path) -> None:
    """embed_tokens / norm / lm_head are never block-quantised; one stored as e4m3 is refused naming the
    tensor and dtype (as the whole-model load refuses it), not read as e4m3 values without their scales."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qwen35_export.errors import CheckpointError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(engine_ckpt_fp32, ckpt)
    [f] = [p for p in ckpt.glob("*.safetensors")]
    t = load_file(f)
    t["lm_head.weight"] = t["lm_head.weight"].to(torch.float8_e4m3fn)
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight.*float dtype"):
        load_model_weights(ckpt, torch.float32, progress=False)
    with pytest.raises(CheckpointError, match="lm_head.weight.*float dtype"):
        stream_trace(ckpt, [[_row([5, 6, 7], [9, 9])]], MAX_SEQ, progress=False)
