"""Two gloo processes: the TP/EP reference model and a compiled sharded engine (tp2 ep2) give the greedy
tokens of one process; the engine directory holds each rank's own files; misuse is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_fixtures import ENGINE_BATCH, ENGINE_SEQ
from parallel_helpers import free_port, random_weights, run_ranks
from qwen35_export.config import preset
from qwen35_export.errors import EngineError
from qwen35_export.exporter.build import BuildSettings, build_engine
from qwen35_export.model.model import Qwen35Model
from qwen35_export.parallel.model import ShardedModel, shard_weights
from qwen35_export.parallel.plan import ParallelPlan
from qwen35_export.runtime.engine import Engine
from qwen35_export.runtime.sampling import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3], [100, 200, 300, 400]]  # unequal lengths, one of 1 token
GEN = 24


# -- functions run on each rank (module level: the spawned processes import them by name) -------------
PLANS = [(2, 2), (2, 1), (1, 2)]  # tp2-ep2, tp2 only, ep2 only (the unsplit part replicated)
IDS = torch.tensor([[5, 6, 7, 8, 9], [3, 0, 0, 0, 0]])
IDS_LEN = torch.tensor([5, 1])


def reference_rank(rank: int) -> list[dict]:
    """Each plan in turn, in one process pair (spawning costs more than the tiny model)."""
    full = random_weights(preset("tiny"), seed=7)
    out = []
    for tp, ep in PLANS:
        plan = ParallelPlan(tp, ep)
        model = ShardedModel(shard_weights(full, plan, rank), plan)
        logits, _ = model.prefill(IDS, IDS_LEN, model.init_state(2, 64))
        out.append({"tokens": model.generate_greedy(PROMPTS, GEN), "logits": logits[0, :5].tolist()})
    return out


CFG4 = dict(num_attention_heads=8, linear_num_key_heads=4, linear_num_value_heads=8)  # tp4 fits; 2 KV heads


def reference_rank_4(rank: int) -> list[list[int]]:
    """tp4 ep4: every rank one KV head of two (duplicated), one GDN key head, 4 experts."""
    cfg, plan = preset("tiny", **CFG4), ParallelPlan(4, 4)
    model = ShardedModel(shard_weights(random_weights(cfg, seed=9), plan, rank), plan)
    return model.generate_greedy(PROMPTS, 8)


def engine_rank(rank: int, engine_dir: str) -> dict:
    eng = Engine.load(engine_dir)  # a sharded manifest: the rank's ShardedEngine
    logits = eng.prefill(IDS, IDS_LEN, eng.reset(2), all_logits=True)
    return {"kind": type(eng).__name__, "rank": eng.rank,
            "tokens": eng.generate(PROMPTS, SamplingParams(max_new_tokens=GEN)),
            "logits": logits[0, :5].tolist(), "conv_channels": eng.pool_conv[0].shape[1],
            "kv_heads": eng.pool_k[0].shape[1],
            "sampled": eng.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, temperature=1.0, seed=3))}


# -- reference model -------------------------------------------------------------------------------
def test_two_rank_reference_equals_one_process(assert_logits_close) -> None:
    single = Qwen35Model(random_weights(preset("tiny"), seed=7))
    want = single.generate_greedy(PROMPTS, GEN)
    ref_logits, _ = single.prefill(IDS, IDS_LEN, single.init_state(2, 64))
    for rank, results in enumerate(run_ranks(reference_rank, 2)):
        for (tp, ep), r in zip(PLANS, results):
            assert r["tokens"] == want, f"rank {rank} tp{tp} ep{ep}"
            assert_logits_close(torch.tensor(r["logits"]), ref_logits[0, :5], 1e-5,
                                f"rank {rank} tp{tp} ep{ep} prefill logits")


def test_four_rank_reference_equals_one_process() -> None:
    want = Qwen35Model(random_weights(preset("tiny", **CFG4), seed=9)).generate_greedy(PROMPTS, 8)
    assert run_ranks(reference_rank_4, 4) == [want] * 4


# -- compiled sharded engine -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_engine(engine_root: Path, engine_ckpt_fp32: Path) -> Path:
    """The checkpoint of the 1-rank `cpu_engine_fp32`, built sharded: --tp 2 --ep 2."""
    return build_engine(engine_ckpt_fp32, engine_root / "cpu_fp32_tp2_ep2",
                        BuildSettings(target="cpu", max_batch=ENGINE_BATCH, max_seq_len=ENGINE_SEQ, tp=2, ep=2,
                                      progress=False))


def test_two_rank_engine_equals_one_rank_engine(sharded_engine: Path, cpu_engine_fp32: Path,
                                                assert_logits_close) -> None:
    one = Engine.load(cpu_engine_fp32)
    want = one.generate(PROMPTS, SamplingParams(max_new_tokens=GEN))
    want_sampled = one.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, temperature=1.0, seed=3))
    want_logits = one.prefill(IDS, IDS_LEN, one.reset(2), all_logits=True)[0, :5]
    ranks = run_ranks(engine_rank, 2, str(sharded_engine))
    assert [r["rank"] for r in ranks] == [0, 1] and {r["kind"] for r in ranks} == {"ShardedEngine"}
    for r in ranks:
        assert r["tokens"] == want
        assert r["sampled"] == want_sampled  # same seed on every rank: sampling agrees too
        assert_logits_close(torch.tensor(r["logits"]), want_logits, 1e-5, f"rank {r['rank']} prefill logits")
        # Each rank's state pools hold its heads only: half the GDN channels, one of the two KV heads.
        assert r["conv_channels"] == one.pool_conv[0].shape[1] // 2 and r["kv_heads"] == 1


def test_sharded_manifest_and_files(sharded_engine: Path) -> None:
    m = json.loads((sharded_engine / "manifest.json").read_text())
    par = m["parallel"]
    assert (par["tp"], par["ep"], par["world_size"]) == (2, 2, 2)
    assert m["layer_files"] == []
    for r in range(2):
        assert par["layer_files"][r] == [f"weights/rank{r}/layer_{i:03d}.safetensors" for i in range(8)]
        assert all(f in m["files"] for f in par["layer_files"][r])
    # One graph per (layer kind, phase) for every rank, with the all-reduces inside.
    assert set(m["graphs"]) == {"gdn_prefill", "gdn_decode", "attn_prefill", "attn_decode", "embed", "final"}
    assert "mlp.experts.expert_map" in m["graphs"]["gdn_decode"]["weight_names"]
    from safetensors.torch import load_file

    a = load_file(str(sharded_engine / "weights/rank0/layer_000.safetensors"))
    b = load_file(str(sharded_engine / "weights/rank1/layer_000.safetensors"))
    assert a["mlp.experts.gate_up_proj"].shape[0] == 8 and not torch.equal(a["mlp.experts.gate_up_proj"],
                                                                           b["mlp.experts.gate_up_proj"])
    assert a["mlp.experts.expert_map"][:8].tolist() == list(range(8)) and (a["mlp.experts.expert_map"][8:] == -1).all()


def load_error_rank(rank: int, engine_dir: str) -> str:
    try:
        Engine.load(engine_dir)
    except EngineError as e:
        return str(e)
    return "loaded"


def test_sharded_engine_needs_its_world_size(sharded_engine: Path) -> None:
    # A process group of the wrong size...
    msg = run_ranks(load_error_rank, 1, str(sharded_engine))[0]
    assert "sharded for 2 ranks (tp 2, ep 2); the process group has 1: launch with torchrun --nproc-per-node 2" in msg
    # ...and a plain process (no group, no torchrun environment).
    code = f"from qwen35_export.runtime.engine import Engine; Engine.load({str(sharded_engine)!r})"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode != 0 and "launch with `torchrun --nproc-per-node 2" in p.stderr


def test_cli_run_under_torchrun(sharded_engine: Path, cpu_engine_fp32: Path) -> None:
    """`torchrun --nproc-per-node 2 -m qwen35_export.cli run`: rank 0 prints the 1-rank engine's tokens."""
    want = Engine.load(cpu_engine_fp32).generate([[5, 6, 7]], SamplingParams(max_new_tokens=6))[0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "qwen35_export.cli", "run", str(sharded_engine), "--token-ids", "5,6,7", "--max-new-tokens", "6"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == [str(t) for t in want]  # rank 1 prints nothing


def test_cli_validate_under_torchrun(sharded_engine: Path, engine_ckpt_fp32: Path, tmp_path: Path) -> None:
    """`torchrun -m qwen35_export.cli validate` on a sharded engine goes to the sharded comparisons."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "qwen35_export.cli", "validate", str(sharded_engine), "--checkpoint", str(engine_ckpt_fp32),
           "--random", "2", "--gen", "4", "--report", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.loads((tmp_path / "validation_sharded.json").read_text())
    assert r["passed"] and r["vs_fp32_reference"]["tokens_equal"] and r["vs_sharded_reference"]["tokens_equal"]


def test_validate_under_torchrun(sharded_engine: Path, cpu_engine_fp32: Path, engine_ckpt_fp32: Path,
                                 tmp_path: Path) -> None:
    """`torchrun -m qwen35_export.parallel.validate`: the 2-rank engine vs the eager sharded reference, the
    1-rank engine and the fp32 reference, all within the fp32 bound and with equal greedy tokens."""
    report = tmp_path / "validate.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "qwen35_export.parallel.validate", str(sharded_engine), "--single", str(cpu_engine_fp32),
           "--checkpoint", str(engine_ckpt_fp32), "--gen", "8", "--report", str(report)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["passed"] and r["ranks_agree"] and r["plan"] == {"tp": 2, "ep": 2, "world_size": 2}
    for k in ("vs_sharded_reference", "vs_single_engine", "vs_fp32_reference"):
        assert r[k]["tokens_equal"] and r[k]["logit_rel_err"] <= 1e-4, (k, r[k])
