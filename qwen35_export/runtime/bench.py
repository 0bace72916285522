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
                # a shared expert folded in as expert E (graph/fuse_weights.py) is read at every step; a
                # rank of an expert-parallel engine holds E / ep rows and reads its share of `touched`
                rows = t.shape[0]
                experts += b * (touched + 1) / rows if rows == E + 1 else b * touched / E
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


@dataclass
class LayerTime:
    """One graph called alone: `phase` decode (one token per row, `context` cached) or prefill (`tokens` per row)."""

    graph: str  # gdn / attn / embed / final
    phase: str
    batch: int
    tokens: int
    context: int
    us: float
    cuda_graph: bool


def _replay_us(fn, device: torch.device, use_graph: bool, iters: int, repeats: int = 5) -> float:
    """Median microseconds of one `fn()`: CUDA-graph replays of `iters` calls when `use_graph` (what the
    engine's graphed decode step sees: no launch or Python overhead), else eager calls timed back to back."""
    fn()  # warm-up: lazy init, first-call allocations
    if use_graph:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        run = graph.replay
    else:
        def run():
            for _ in range(iters):
                fn()
    run()
    ts = []
    for _ in range(repeats):
        with _Timer(device) as t:
            run()
        ts.append(t.ms * 1e3 / iters)
    return statistics.median(ts)


@torch.no_grad()
def layer_times(eng: Engine, batches: list[int], prompt_lens: list[int], context: int = 512,
                seed: int = 0) -> list[LayerTime]:
    """Time each graph of the engine alone (the first GDN and the first attention layer's weights): decode at
    every batch with `context` tokens already cached, prefill of one row of each prompt length.

    Per-layer numbers make a deep model's step time explainable (and projectable: 60 layers = 45 GDN + 15
    attention) without building all of it. Decode uses CUDA graphs where the engine does."""
    cfg, dev, act = eng.cfg, eng.device, eng.act_dtype
    g = torch.Generator(device="cpu").manual_seed(seed)
    kinds = {}
    for i, t in enumerate(cfg.layer_types):
        kinds.setdefault("gdn" if t == LINEAR_ATTENTION else "attn", i)
    graphed = eng.use_cuda_graphs and dev.type == "cuda"
    rows: list[LayerTime] = []

    def x_of(B: int, T: int) -> torch.Tensor:
        return (torch.randn(B, T, cfg.hidden_size, generator=g) * 0.5).to(dev, act)

    context = min(context, eng.max_seq_len - 1)  # a short engine times decode at its own last position
    for phase, shapes in (("decode", [(B, 1) for B in batches]), ("prefill", [(1, L) for L in prompt_lens])):
        for B, T in shapes:
            if B > eng.max_batch or T > eng.max_seq_len:
                continue
            s = eng.reset(B)
            ctx = context if phase == "decode" else 0
            s.lengths.fill_(ctx)
            lengths = torch.full((B,), T, dtype=torch.int64, device=dev)
            x = x_of(B, T)
            use_graph = graphed and phase == "decode"
            iters = 20 if phase == "decode" else 1
            for kind, i in kinds.items():
                graph, w = eng.layer_graph(kind, phase, B), eng.layer_weights[i]
                if kind == "gdn":
                    j = cfg.gdn_layers.index(i)
                    fn = lambda: graph(x, lengths, s.conv[j], s.rec[j], *w)  # noqa: E731
                else:
                    j = cfg.attention_layers.index(i)
                    fn = lambda: graph(x, s.lengths, lengths, s.k[j], s.v[j], *w)  # noqa: E731
                us = _replay_us(fn, dev, use_graph, iters)
                rows.append(LayerTime(kind, phase, B, T, ctx, us, use_graph))
            ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(dev)
            emb = lambda: eng.graphs["embed"](ids, eng.globals["embed_tokens.weight"])  # noqa: E731
            rows.append(LayerTime("embed", phase, B, T, ctx, _replay_us(emb, dev, use_graph, iters), use_graph))
            xl = x[:, -1:]  # the engine runs the head on each row's last token only
            fin = lambda: eng._final(xl)  # noqa: E731
            rows.append(LayerTime("final", phase, B, T, ctx, _replay_us(fin, dev, use_graph, iters), use_graph))
    eng.reset(max(batches))
    return rows


def project_step_us(rows: list[LayerTime], cfg, phase: str, batch: int, tokens: int = 1) -> float | None:
    """Step time of the whole model from per-graph times: embed + n_gdn * gdn + n_attn * attn + final."""
    t = {r.graph: r.us for r in rows if r.phase == phase and r.batch == batch and r.tokens == tokens}
    if not {"gdn", "attn", "embed", "final"} <= t.keys():
        return None
    n_gdn = len(cfg.gdn_layers)
    return t["embed"] + n_gdn * t["gdn"] + (cfg.num_hidden_layers - n_gdn) * t["attn"] + t["final"]


def print_layer_times(rows: list[LayerTime], cfg) -> None:
    print(f"{'graph':>6} {'phase':>8} {'batch':>5} {'tokens':>6} {'us':>10}")
    for r in rows:
        print(f"{r.graph:>6} {r.phase:>8} {r.batch:>5} {r.tokens:>6} {r.us:10.1f}")
    for B in sorted({r.batch for r in rows if r.phase == "decode"}):
        us = project_step_us(rows, cfg, "decode", B)
        if us:
            print(f"decode step from per-layer times, batch {B}, {cfg.num_hidden_layers} layers: {us / 1e3:.3f} ms")


@torch.no_grad()
def profile_decode(eng: Engine, batch: int = 1, context: int = 512, steps: int = 5, top: int = 25) -> dict:
    """Kernels of one decode step (torch profiler over `steps` eager steps: a CUDA-graph replay hides them),
    averaged per step: [(name, us, calls)], sorted by time, plus their total and the number of launches.

    On the CPU the rows are the ops the engine ran, with their CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = eng.device.type == "cuda"
    from ..errors import InputError

    if eng.max_seq_len < steps + 3:
        raise InputError(f"bench --profile: the engine's max sequence length {eng.max_seq_len} leaves no room for a "
                         f"prompt and {steps + 2} decode steps")
    context = max(1, min(context, eng.max_seq_len - steps - 2))  # prompt + 2 warm-up + `steps` tokens fit
    s = eng.reset(batch)
    ids = torch.randint(0, eng.cfg.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
    tok = eng.prefill(ids, torch.full((batch,), context), s).argmax(-1)
    for _ in range(2):  # warm-up
        tok = eng._decode_eager(tok, s).argmax(-1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            tok = eng._decode_eager(tok, s).argmax(-1)
        if cuda:
            torch.cuda.synchronize(eng.device)
    rows = _kernel_rows(prof, steps, cuda)
    eng.reset(batch)
    return {"batch": batch, "context": context, "device": str(eng.device), "top": rows[:top],
            "total_us": sum(r[1] for r in rows), "launches_per_step": sum(r[2] for r in rows) if cuda else None}


def _kernel_rows(prof, per: int, cuda: bool) -> list[tuple[str, float, float]]:
    """(name, us, calls) per one of `per` repeats, slowest first: GPU kernels on CUDA (the aten:: rows are the
    host-side ops that launched them), ops with their CPU time elsewhere."""
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) if cuda else e.self_cpu_time_total
        if us > 0 and e.key and "ProfilerStep" not in e.key and (not cuda or not e.key.startswith("aten::")):
            rows.append((e.key[:100], us / per, e.count / per))
    rows.sort(key=lambda r: -r[1])
    return rows


@torch.no_grad()
def profile_prefill(eng: Engine, length: int, top: int = 25) -> dict:
    """Kernels of one prefill of `length` tokens at batch 1 (torch profiler, after one warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    from ..errors import InputError

    if length > eng.max_seq_len:
        raise InputError(f"bench --profile: prefill of {length} tokens exceeds the engine's max sequence length "
                         f"{eng.max_seq_len}")
    cuda = eng.device.type == "cuda"
    ids = torch.randint(0, eng.cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    lens = torch.full((1,), length)
    eng.prefill(ids, lens, eng.reset(1))  # warm-up (first-call kernel selection, allocator)
    s = eng.reset(1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        eng.prefill(ids, lens, s)
        if cuda:
            torch.cuda.synchronize(eng.device)
    rows = _kernel_rows(prof, 1, cuda)
    eng.reset(1)
    return {"tokens": length, "device": str(eng.device), "top": rows[:top], "total_us": sum(r[1] for r in rows),
            "launches": sum(r[2] for r in rows) if cuda else None}


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
    if getattr(a, "profile", False):
        prof = profile_decode(eng, batch=a.batch[0])
        print(f"decode step profile, batch {prof['batch']} (eager; per step):")
        for name, us, calls in prof["top"]:
            print(f"  {us:9.1f} us  {calls:5.1f} x  {name}")
        result["profile"] = prof
        L = min(max(a.prompt_len), eng.max_seq_len)
        pp = profile_prefill(eng, L)
        print(f"prefill profile, one row of {L} tokens: {pp['total_us'] / 1e3:.2f} ms of kernels")
        for name, us, calls in pp["top"]:
            print(f"  {us:9.1f} us  {calls:5.1f} x  {name}")
        result["profile_prefill"] = pp
    if getattr(a, "per_layer", False):
        lt = layer_times(eng, a.batch, a.prompt_len)
        print_layer_times(lt, eng.cfg)
        result["layers"] = [asdict(r) for r in lt]
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    if a.plot and rows:
        plot_rows(rows, Path(a.plot), f"{eng.manifest.target} {eng.manifest.dtype}")
    return 0
