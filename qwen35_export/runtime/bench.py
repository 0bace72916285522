"""`qwen35-export bench`: time to first token, prefill and decode throughput, memory, % of HBM roofline."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import LINEAR_ATTENTION
from .engine import Engine

# HBM bandwidth by GPU name (datasheet; bench/ records the measured copy bandwidth beside it).
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


def hbm_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for k, v in HBM_BYTES_PER_S.items():
        if k in name:
            return v
    return None


def decode_step_bytes(eng: Engine, batch: int, context: int) -> dict[str, float]:
    """Bytes one decode step must read at least: weights it touches once, plus state/KV traffic.

    Routed experts: the expected number of distinct experts that `batch` tokens pick when each picks k of E
    uniformly, E * (1 - (1 - k/E)^batch), each read once. GDN state is read and written (fp32); the KV
    cache is read up to `context` positions.
    """
    cfg = eng.cfg
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    touched = E * (1 - (1 - k / E) ** batch)
    dense = experts = 0.0
    for names, w in zip(eng.layer_weight_names, eng.layer_weights):
        for n, t in zip(names, w):
            b = t.numel() * t.element_size()
            if n.startswith("mlp.experts."):
                experts += b * touched / E
            else:
                dense += b
    act = torch.tensor([], dtype=eng.act_dtype).element_size()
    H = cfg.hidden_size
    head = (cfg.vocab_size * H + batch * H) * act  # lm_head + embedding rows
    n_gdn = sum(t == LINEAR_ATTENTION for t in cfg.layer_types)
    n_attn = cfg.num_hidden_layers - n_gdn
    state = n_gdn * batch * (2 * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
                             + 2 * cfg.conv_dim * (cfg.linear_conv_kernel_dim - 1) * act)
    kv = n_attn * batch * 2 * cfg.num_key_value_heads * context * cfg.head_dim * act
    return {"dense_weights": dense, "expert_weights": experts, "head": head, "state": state, "kv": kv,
            "total": dense + experts + head + state + kv}


@dataclass
class BenchRow:
    batch: int
    prompt_len: int
    ttft_ms: float
    prefill_tokens_per_s: float
    decode_ms_per_step: float
    decode_tokens_per_s: float
    step_bytes: float
    hbm_roofline_pct: float | None
    gpu_mem_gib: float | None


class _Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.b.record()
            torch.cuda.synchronize()
            self.ms = self.a.elapsed_time(self.b)
        else:
            self.ms = (time.perf_counter() - self.t) * 1e3


def bench_engine(eng: Engine, batches: list[int], prompt_lens: list[int], gen: int, repeats: int = 3,
                 seed: int = 0) -> list[BenchRow]:
    g = torch.Generator().manual_seed(seed)
    bw = hbm_bandwidth(eng.device)
    rows = []
    for L in prompt_lens:
        for B in batches:
            if B > eng.max_batch or L + gen > eng.max_seq_len:
                print(f"skip batch {B} prompt {L}: over the engine's limits ({eng.max_batch}, {eng.max_seq_len})")
                continue
            ids = torch.randint(0, eng.cfg.vocab_size, (B, L), generator=g)
            lens = torch.full((B,), L)
            if eng.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(eng.device)
            pre = []
            for r in range(repeats + 1):  # first run warms up
                s = eng.reset(B)
                with _Timer(eng.device) as t:
                    logits = eng.prefill(ids, lens, s)
                    tok = logits.argmax(-1)
                if r:
                    pre.append(t.ms)
            for _ in range(3):  # warm-up (and CUDA-graph capture) outside the timed loop
                tok = eng.decode(tok, s).argmax(-1)
            steps = max(gen - 3, 1)
            with _Timer(eng.device) as t:
                for _ in range(steps):
                    tok = eng.decode(tok, s).argmax(-1)
            step_ms = t.ms / steps
            ttft = statistics.median(pre)
            nbytes = decode_step_bytes(eng, B, L + gen // 2)["total"]
            rows.append(BenchRow(
                batch=B, prompt_len=L, ttft_ms=ttft, prefill_tokens_per_s=B * L / ttft * 1e3,
                decode_ms_per_step=step_ms, decode_tokens_per_s=B / step_ms * 1e3, step_bytes=nbytes,
                hbm_roofline_pct=(nbytes / bw / (step_ms / 1e3) * 100) if bw else None,
                gpu_mem_gib=(torch.cuda.max_memory_allocated(eng.device) / 2**30) if eng.device.type == "cuda" else None))
            r = rows[-1]
            print(f"batch {B:>3} prompt {L:>5}: TTFT {r.ttft_ms:8.2f} ms, prefill {r.prefill_tokens_per_s:10.0f} tok/s, "
                  f"decode {r.decode_ms_per_step:7.3f} ms/step = {r.decode_tokens_per_s:8.1f} tok/s"
                  + (f", {r.hbm_roofline_pct:5.1f}% of HBM roofline" if r.hbm_roofline_pct is not None else ""))
    return rows


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        try:
            import subprocess

            env["clocks"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["clocks"] = "unknown"
    return env


def plot_rows(rows: list[BenchRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for L in sorted({r.prompt_len for r in rows}):
        rs = [r for r in rows if r.prompt_len == L]
        ax[0].plot([r.batch for r in rs], [r.decode_tokens_per_s for r in rs], "o-", label=f"prompt {L}")
        if rs[0].hbm_roofline_pct is not None:
            ax[1].plot([r.batch for r in rs], [r.hbm_roofline_pct for r in rs], "o-", label=f"prompt {L}")
    ax[0].set(xscale="log", xlabel="batch", ylabel="decode tokens/s", title="decode throughput")
    ax[1].set(xscale="log", xlabel="batch", ylabel="% of HBM roofline", title="decode step vs roofline")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def bench_cli(a) -> int:
    eng = Engine.load(a.engine, device=a.device, verify_hashes=False)
    rows = bench_engine(eng, a.batch, a.prompt_len, a.gen)
    result = {"engine": str(a.engine), "target": eng.manifest.target, "dtype": eng.manifest.dtype,
              "env": environment(eng.device), "rows": [asdict(r) for r in rows]}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    if a.plot and rows:
        plot_rows(rows, Path(a.plot), f"{eng.manifest.target} {eng.manifest.dtype}")
    return 0
