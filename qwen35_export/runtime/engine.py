"""`Engine`: load an engine directory and run prefill / decode / generate with it.

The runtime is thin: it owns the state pools (GDN conv + recurrent state, KV caches, lengths; one slot per
sequence), calls one compiled graph per layer with that layer's weights as inputs, captures the decode
step as a CUDA graph per batch bucket on GPUs, and samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..config import LINEAR_ATTENTION, Qwen35Config
from ..errors import EngineError, InputError
from ..exporter.manifest import TARGET_SM, Manifest
from ..plugins.tensorrt.runtime import load_trt_graph
from .aoti_loader import load_package
from .ort_session import load_onnx_graph
from .sampling import SamplingParams, sample

LayerHook = Callable[[int, Tensor], None]


def _config_from_manifest(d: dict) -> Qwen35Config:
    from ..config import FP8Config

    d = dict(d)
    if d.get("fp8"):
        f = d["fp8"]
        d["fp8"] = FP8Config(tuple(f["weight_block_size"]), f["activation_scheme"],
                             tuple(f["modules_to_not_convert"]))
    return Qwen35Config(**d)


def check_device(man: Manifest, device: torch.device, engine_dir: Path) -> None:
    if man.target == "cpu":
        if device.type != "cpu":
            raise EngineError(f"{engine_dir}: built for target cpu; cannot run on {device} (rebuild with "
                              "--target h100/h200)")
        return
    if device.type != "cuda" or not torch.cuda.is_available():
        raise EngineError(f"{engine_dir}: built for target {man.target} (sm_{''.join(map(str, man.sm))}); "
                          f"needs a CUDA GPU, found device {device} "
                          f"({'no CUDA' if not torch.cuda.is_available() else 'CUDA present'})")
    cc = torch.cuda.get_device_capability(device)
    if list(cc) != list(man.sm or TARGET_SM[man.target]):
        raise EngineError(f"{engine_dir}: built for sm_{''.join(map(str, man.sm))} ({man.target}); the GPU here "
                          f"({torch.cuda.get_device_name(device)}) is sm_{cc[0]}{cc[1]}")


@dataclass
class Slots:
    """Views into the state pools for the first `batch` slots (one row per sequence)."""

    batch: int
    conv: list[Tensor]
    rec: list[Tensor]
    k: list[Tensor]
    v: list[Tensor]
    lengths: Tensor

    def rows(self, lo: int, hi: int) -> "Slots":
        """Views of rows lo..hi-1 of these slots."""
        return Slots(hi - lo, [c[lo:hi] for c in self.conv], [r[lo:hi] for r in self.rec],
                     [k[lo:hi] for k in self.k], [v[lo:hi] for v in self.v], self.lengths[lo:hi])


def prefill_groups(lengths: list[int], max_padding: float) -> list[tuple[int, int]]:
    """Split rows into consecutive ranges [lo, hi) prefilled by one call each: a range grows while its padded
    tokens (rows x longest row) stay within (1 + max_padding) x its real tokens. Rows sorted by length
    make few ranges; max_padding 0 batches only equal lengths (no padding compute at all)."""
    groups, lo = [], 0
    while lo < len(lengths):
        hi, longest, real = lo + 1, lengths[lo], lengths[lo]
        while hi < len(lengths):
            m, r = max(longest, lengths[hi]), real + lengths[hi]
            if (hi + 1 - lo) * m > (1 + max_padding) * r:
                break
            hi, longest, real = hi + 1, m, r
        groups.append((lo, hi))
        lo = hi
    return groups


class Engine:
    """A loaded engine. `Engine.load(dir)` checks the manifest, hashes and target, then loads everything."""

    # generate()/stream() prefill prompts of different lengths in groups of similar length (prompts sorted
    # longest first), so that padding adds at most this fraction of compute (0: none, inf: one padded call).
    max_prefill_padding: float = 0.1

    def __init__(self, engine_dir: Path, man: Manifest, device: torch.device, use_cuda_graphs: bool = True):
        self.dir, self.manifest, self.device = engine_dir, man, device
        self.cfg = _config_from_manifest(man.model_config)
        self.act_dtype = getattr(torch, man.act_dtype)
        self.max_batch, self.max_seq_len = man.max_batch, man.max_seq_len
        self.load_seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        load_graph = {"onnxruntime": load_onnx_graph, "tensorrt": load_trt_graph,
                      "torch-tensorrt": load_trt_graph}.get(man.backend, load_package)
        self.graphs = {}
        for name, g in man.graphs.items():
            t1 = time.perf_counter()
            self.graphs[name] = load_graph(engine_dir / g.file, device)
            self.load_seconds[f"graph_{name}"] = time.perf_counter() - t1
        self.load_seconds["graphs"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        glob = load_file(str(engine_dir / man.globals_file), device=str(device))
        self.globals = glob
        self.layer_weights: list[list[Tensor]] = []
        self.layer_weight_names: list[list[str]] = []
        for i, rel in enumerate(man.layer_files):
            w = load_file(str(engine_dir / rel), device=str(device))
            kind = "gdn" if self.cfg.layer_types[i] == LINEAR_ATTENTION else "attn"
            names = man.graphs[f"{kind}_prefill"].weight_names
            missing = [n for n in names if n not in w]
            if missing:
                raise EngineError(f"{engine_dir / rel}: tensor '{missing[0]}' missing (the graph expects it)")
            self.layer_weights.append([w[n] for n in names])
            self.layer_weight_names.append(names)
        self.load_seconds["weights"] = time.perf_counter() - t0
        self._alloc_pools()
        self.tokenizer = self._load_tokenizer()
        self.use_cuda_graphs = use_cuda_graphs and device.type == "cuda"
        self._cuda_graphs: dict[int, tuple] = {}
        self._graph_rows: dict[int, int] = {}  # bucket -> the batch its step buffer is filled for
        self.cuda_graph_error: str | None = None

    @classmethod
    def load(cls, engine_dir: str | Path, device: str | torch.device | None = None, verify_hashes: bool = True,
             use_cuda_graphs: bool = True) -> "Engine":
        engine_dir = Path(engine_dir)
        man = Manifest.load(engine_dir)
        if man.parallel is not None:  # sharded over ranks: this process loads its rank's shard
            from ..parallel.engine import ShardedEngine

            return ShardedEngine.load(engine_dir, device, verify_hashes, use_cuda_graphs)
        if device is None:
            device = "cpu" if man.target == "cpu" else "cuda"
        try:
            device = torch.device(device)
        except RuntimeError:
            raise EngineError(f"device: expected a torch device such as 'cpu' or 'cuda:0', found {device!r}") \
                from None
        check_device(man, device, engine_dir)
        man.verify_files(engine_dir, hashes=verify_hashes)
        return cls(engine_dir, man, device, use_cuda_graphs)

    # -- state -----------------------------------------------------------------------------------------
    def _alloc_pools(self) -> None:
        cfg, B, dev, act = self.cfg, self.max_batch, self.device, self.act_dtype
        W = cfg.linear_conv_kernel_dim
        n_gdn, n_attn = len(cfg.gdn_layers), len(cfg.attention_layers)
        kv = (B, cfg.num_key_value_heads, self.max_seq_len, cfg.head_dim)
        self.pool_conv = [torch.zeros(B, cfg.conv_dim, W - 1, dtype=act, device=dev) for _ in range(n_gdn)]
        self.pool_rec = [torch.zeros(B, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                     cfg.linear_value_head_dim, dtype=torch.float32, device=dev)
                         for _ in range(n_gdn)]
        self.pool_k = [torch.zeros(kv, dtype=act, device=dev) for _ in range(n_attn)]
        self.pool_v = [torch.zeros(kv, dtype=act, device=dev) for _ in range(n_attn)]
        self.pool_len = torch.zeros(B, dtype=torch.int64, device=dev)

    def slots(self, batch: int) -> Slots:
        return Slots(batch, [c[:batch] for c in self.pool_conv], [r[:batch] for r in self.pool_rec],
                     [k[:batch] for k in self.pool_k], [v[:batch] for v in self.pool_v], self.pool_len[:batch])

    def reset(self, batch: int) -> Slots:
        """Clear the first `batch` slots for new sequences and return their views."""
        s = self.slots(batch)
        for t in (*s.conv, *s.rec, *s.k, *s.v, s.lengths):
            t.zero_()
        return s

    # -- forward ---------------------------------------------------------------------------------------
    def layer_graph(self, kind: str, phase: str, batch: int):
        """The compiled graph of layer `kind` ("gdn" | "attn") for `phase` at `batch` rows: a decode step of
        one row takes the static batch-1 graph when the engine has one (exporter/capture.py DECODE1)."""
        if phase == "decode" and batch == 1 and f"{kind}_decode1" in self.graphs:
            return self.graphs[f"{kind}_decode1"]
        return self.graphs[f"{kind}_{phase}"]

    def _layers(self, x: Tensor, s: Slots, lengths: Tensor, phase: str, hook: LayerHook | None) -> Tensor:
        g = a = 0
        gdn, attn = self.layer_graph("gdn", phase, x.shape[0]), self.layer_graph("attn", phase, x.shape[0])
        for i, w in enumerate(self.layer_weights):
            if self.cfg.layer_types[i] == LINEAR_ATTENTION:
                x = gdn(x, lengths, s.conv[g], s.rec[g], *w)
                g += 1
            else:
                x = attn(x, s.lengths, lengths, s.k[a], s.v[a], *w)
                a += 1
            if hook is not None:
                hook(i, x)
        return x

    def _final(self, x: Tensor) -> Tensor:
        return self.graphs["final"](x, self.globals["norm.weight"], self.globals["lm_head.weight"])

    @torch.no_grad()
    def prefill(self, ids: Tensor, lengths: Tensor, s: Slots, all_logits: bool = False,
                hook: LayerHook | None = None) -> Tensor:
        """ids [B, T] right-padded with per-row lengths [B] on top of slots `s`.

        Returns logits at each row's last real token [B, V] (or at every position [B, T, V])."""
        self._check_prefill(ids, lengths, s)
        ids, lengths = ids.to(self.device), lengths.to(self.device, torch.int64)
        x = self.graphs["embed"](ids, self.globals["embed_tokens.weight"])
        x = self._layers(x, s, lengths, "prefill", hook)
        if not all_logits:
            x = x[torch.arange(x.shape[0], device=self.device), lengths - 1][:, None]  # [B, 1, H]
        logits = self._final(x)
        s.lengths.add_(lengths)
        return logits if all_logits else logits[:, 0]

    def prefill_grouped(self, prompts: list[list[int]], s: Slots) -> Tensor:
        """Prefill each prompt into its slot of `s` (row b <- prompts[b]), one call per group of consecutive rows
        from `prefill_groups`; returns logits at each row's last token [B, V]."""
        lens = [len(p) for p in prompts]
        out = []
        for lo, hi in prefill_groups(lens, self.max_prefill_padding):
            T = max(lens[lo:hi])
            ids = torch.zeros(hi - lo, T, dtype=torch.int64)
            for b in range(lo, hi):
                ids[b - lo, : lens[b]] = torch.tensor(prompts[b], dtype=torch.int64)
            out.append(self.prefill(ids, torch.tensor(lens[lo:hi]), s.rows(lo, hi)))
        return torch.cat(out)

    def _check_prefill(self, ids: Tensor, lengths: Tensor, s: Slots) -> None:
        """Shapes and limits the graphs assume; past them positions would be clamped into wrong numbers."""
        if ids.dim() != 2 or lengths.shape != (ids.shape[0],) or ids.shape[0] != s.batch:
            raise InputError(f"prefill: expected ids [B, T] and lengths [B] for the {s.batch} slots given, found "
                             f"ids {tuple(ids.shape)} and lengths {tuple(lengths.shape)}")
        if s.batch > self.max_batch:
            raise InputError(f"prefill: batch {s.batch} exceeds the engine's max batch {self.max_batch}")
        lens = lengths.cpu()
        if int(lens.min()) < 1 or int(lens.max()) > ids.shape[1]:
            raise InputError(f"prefill: every length must be in [1, T={ids.shape[1]}], found {lens.tolist()}")
        total = int((s.lengths.cpu() + lens).max())
        if total > self.max_seq_len:
            raise InputError(f"prefill: a row would reach {total} tokens, past the engine's max sequence length "
                             f"{self.max_seq_len}")

    def _decode_eager(self, tokens: Tensor, s: Slots, hook: LayerHook | None = None,
                      step: Tensor | None = None) -> Tensor:
        """One decode step. `step` [B] (default all 1): 1 for a real row, 0 for a padding row, which leaves
        its slot's states and length alone and routes its MoE slots to real rows' experts (model/layers.py)."""
        step = torch.ones_like(s.lengths) if step is None else step
        x = self.graphs["embed"](tokens[:, None], self.globals["embed_tokens.weight"])
        x = self._layers(x, s, step, "decode", hook)
        logits = self._final(x)[:, 0]
        s.lengths.add_(step)
        return logits

    @torch.no_grad()
    def decode(self, tokens: Tensor, s: Slots, hook: LayerHook | None = None) -> Tensor:
        """One token per row, tokens [B] -> logits [B, V]; states in `s` advance in place."""
        tokens = tokens.to(self.device, torch.int64)
        if hook is not None or not self.use_cuda_graphs:
            return self._decode_eager(tokens, s, hook)
        return self._decode_graphed(tokens, s)

    def _bucket(self, b: int) -> int:
        n = 1
        while n < b:
            n *= 2
        return min(n, self.max_batch)

    def _decode_graphed(self, tokens: Tensor, s: Slots) -> Tensor:
        """Replay the CUDA graph of the smallest bucket >= B. Rows past B are padding (zero tokens, step 0, in
        spare slots): each row's compute is independent (per-row state, per-token MoE), so they never touch
        real rows, and their MoE slots reuse real rows' experts (no expert weights read for them)."""
        B = tokens.shape[0]
        nb = self._bucket(B)
        if nb not in self._cuda_graphs:
            try:
                self._capture(nb)
            except RuntimeError as e:
                # An op that syncs with the host (a reference op through the proxy executor) cannot be
                # captured: run this engine eagerly from now on, and say so once.
                import warnings

                self.cuda_graph_error = str(e)[:2000]
                warnings.warn(f"CUDA graph capture failed ({str(e).splitlines()[0][:200]}); decoding eagerly")
                torch.cuda.synchronize()
                self.use_cuda_graphs = False
                return self._decode_eager(tokens, s)
        graph, tok_buf, step_buf, out = self._cuda_graphs[nb]
        # Rows past B keep the tokens of an earlier step: any valid id will do, their step is 0. The step
        # mask changes only with B, so it is rewritten only then (two launches fewer per decode step).
        tok_buf[:B].copy_(tokens)
        if self._graph_rows[nb] != B:
            step_buf.zero_()
            step_buf[:B].fill_(1)
            self._graph_rows[nb] = B
        graph.replay()
        # A copy: the graph's output buffer is overwritten by the next replay, and callers keep logits.
        return out[:B].clone()

    def _capture(self, nb: int) -> None:
        tok = torch.zeros(nb, dtype=torch.int64, device=self.device)
        step = torch.ones(nb, dtype=torch.int64, device=self.device)  # 1 for real rows, 0 past the batch
        s = self.slots(nb)
        # Snapshot the slots: warm-up and capture run the step for real and would advance the state.
        state = (*s.conv, *s.rec, *s.k, *s.v, s.lengths)
        saved = [t.clone() for t in state]
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._decode_eager(tok, s, step=step)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._decode_eager(tok, s, step=step)
        finally:
            # Restore even when capture fails: the real sequences' states must not have moved.
            torch.cuda.synchronize()
            for t, v in zip(state, saved):
                t.copy_(v)
        self._cuda_graphs[nb] = (graph, tok, step, out)
        self._graph_rows[nb] = nb  # the rows `step` marks real (all of them, as captured)

    # -- generation ------------------------------------------------------------------------------------
    def check_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        if not prompts:
            raise InputError("no prompts given")
        if len(prompts) > self.max_batch:
            raise InputError(f"batch of {len(prompts)} prompts exceeds the engine's max batch {self.max_batch} "
                             f"(rebuild with --max-batch)")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise InputError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= int(t) < self.cfg.vocab_size]
            if bad:
                raise InputError(f"prompt {i}: token id {bad[0]} out of range [0, {self.cfg.vocab_size})")
            if len(p) + max_new_tokens > self.max_seq_len:
                raise InputError(f"prompt {i}: {len(p)} tokens + {max_new_tokens} new exceed the engine's "
                                 f"max sequence length {self.max_seq_len} (rebuild with --max-seq-len)")

    def stream(self, prompts: list[list[int]], params: SamplingParams = SamplingParams()) -> Iterator[list[int | None]]:
        """Yield, per step, the new token of each row (None once a row has stopped)."""
        params.validate()
        self.check_prompts(prompts, params.max_new_tokens)
        B = len(prompts)
        # Slots hold the prompts longest first, so that prefill groups of similar length are consecutive rows;
        # rows are reported in the caller's order.
        order = sorted(range(B), key=lambda b: -len(prompts[b]))
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed or 0)
        s = self.reset(B)
        logits = self.prefill_grouped([prompts[b] for b in order], s)
        done = [False] * B
        stop = set(params.stop_token_ids)
        for step in range(params.max_new_tokens):
            nxt = sample(logits, params, gen)
            toks = nxt.tolist()
            out: list[int | None] = [None] * B
            for row, b in enumerate(order):
                if not done[row]:
                    out[b] = toks[row]
                    done[row] = toks[row] in stop
            yield out
            if all(done) or step == params.max_new_tokens - 1:
                return
            logits = self.decode(nxt, s)

    def generate(self, prompts: list[list[int]], params: SamplingParams = SamplingParams()) -> list[list[int]]:
        """Token ids generated for each prompt (stop token included, nothing after it)."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, params):
            for b, t in enumerate(step):
                if t is not None:
                    out[b].append(t)
        return out

    # -- text ------------------------------------------------------------------------------------------
    def _load_tokenizer(self):
        f = self.dir / "tokenizer.json"
        if not f.is_file():
            return None
        try:
            from tokenizers import Tokenizer
        except ImportError:
            return None
        return Tokenizer.from_file(str(f))

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InputError(f"{self.dir}: the engine has no tokenizer.json (the checkpoint had none); "
                             "pass --token-ids instead of --prompt")
        return self.tokenizer.encode(text).ids

    def decode_text(self, ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids)
