"""Run an engine or the reference on the same prompts and keep what validate compares: each layer's output
(prefill and every decode step), the logits, the GDN state after prefill, and the MoE router picks.

Decode is teacher-forced: both sides are fed the reference's greedy tokens, so one early flip cannot hide
every later step. Everything kept is fp32 on CPU, per row and unpadded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from ..config import LINEAR_ATTENTION, Qwen35Config
from ..model import layers
from ..model.model import LayerHook, Qwen35Model, State
from ..runtime.engine import Engine


@dataclass
class RowTrace:
    """One prompt of T tokens and S = gen - 1 teacher-forced decode steps; L layers."""

    prompt: list[int]
    # gen tokens; teacher[0] follows the prompt, teacher[:-1] are the decode inputs (stream.py's reference rows:
    # the reference's own greedy pick at each generated position, the inputs having been the engine's)
    teacher: list[int]
    prefill_hidden: Tensor  # [L, T, H] output of each decoder layer
    prefill_logits: Tensor  # [T, V]
    decode_hidden: Tensor  # [L, S, H]
    decode_logits: Tensor  # [S, V]
    conv: list[Tensor] = field(default_factory=list)  # per GDN layer [C, W-1], after prefill
    rec: list[Tensor] = field(default_factory=list)  # per GDN layer [HV, K, V], after prefill
    router_ids: list[Tensor] = field(default_factory=list)  # per layer [T, k], prefill


class Runner(Protocol):
    """What `trace` needs of an engine or a reference: a batched prefill, one decode step, the GDN state."""

    def start(self, ids: Tensor, lengths: Tensor, hook: LayerHook) -> Tensor: ...  # -> [B, T, V]
    def step(self, tokens: Tensor, hook: LayerHook) -> Tensor: ...  # tokens [B] -> [B, V]
    def gdn_state(self) -> tuple[list[Tensor], list[Tensor]]: ...  # conv, rec lists of [B, ...]


class EngineRunner:
    def __init__(self, engine: Engine):
        self.engine = engine

    def start(self, ids: Tensor, lengths: Tensor, hook: LayerHook) -> Tensor:
        self.slots = self.engine.reset(ids.shape[0])
        return self.engine.prefill(ids, lengths, self.slots, all_logits=True, hook=hook)

    def step(self, tokens: Tensor, hook: LayerHook) -> Tensor:
        return self.engine.decode(tokens, self.slots, hook=hook)

    def gdn_state(self) -> tuple[list[Tensor], list[Tensor]]:
        return self.slots.conv, self.slots.rec


class ModelRunner:
    def __init__(self, model: Qwen35Model, max_seq_len: int):
        self.model, self.max_seq_len = model, max_seq_len

    def start(self, ids: Tensor, lengths: Tensor, hook: LayerHook) -> Tensor:
        dev = self.model.device
        self.state = self.model.init_state(ids.shape[0], self.max_seq_len)
        logits, self.state = self.model.prefill(ids.to(dev), lengths.to(dev), self.state, hook)
        return logits

    def step(self, tokens: Tensor, hook: LayerHook) -> Tensor:
        logits, self.state = self.model.decode(tokens.to(self.model.device)[:, None], self.state, hook)
        return logits[:, 0]

    def gdn_state(self) -> tuple[list[Tensor], list[Tensor]]:
        return self.state.conv, self.state.recurrent


@contextlib.contextmanager
def record_router() -> Iterator[list[Tensor]]:
    """Record the ids [N, k] of every `qwen35::moe_router` call made from Python (the reference layers)."""
    calls: list[Tensor] = []
    ns = torch.ops.qwen35
    orig = ns.moe_router

    def recording(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
        w, ids = orig(logits, top_k)
        calls.append(ids.detach().cpu())
        return w, ids

    setattr(ns, "moe_router", recording)
    try:
        yield calls
    finally:
        setattr(ns, "moe_router", orig)


def pad_batch(prompts: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Right-padded ids [B, T] (pad id 0) and lengths [B]."""
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p, dtype=torch.int64)
    return ids, torch.tensor([len(p) for p in prompts], dtype=torch.int64)


def cpu_copy(x: Tensor) -> Tensor:
    # A copy always: engine slots and graph outputs are buffers the next call overwrites in place.
    return x.detach().to("cpu", torch.float32, copy=True)


@torch.no_grad()
def trace(runner: Runner, prompts: list[list[int]], gen: int, teacher: list[list[int]] | None = None,
          routing: bool = False, desc: str = "trace", progress: bool = True) -> list[RowTrace]:
    """Prefill one batch of prompts, then gen - 1 decode steps fed `teacher` (default: own greedy tokens)."""
    ids, lengths = pad_batch(prompts)
    B = len(prompts)
    hid: dict[int, Tensor] = {}

    def hook(i: int, x: Tensor) -> None:
        hid[i] = cpu_copy(x)

    ctx = record_router() if routing else contextlib.nullcontext([])
    with ctx as calls:
        logits = cpu_copy(runner.start(ids, lengths, hook))  # [B, T, V]
    L = len(hid)
    pre_hidden = torch.stack([hid[i] for i in range(L)])  # [L, B, T, H]
    conv, rec = (list(map(cpu_copy, s)) for s in runner.gdn_state())
    last = logits[torch.arange(B), lengths - 1]  # [B, V]
    toks = torch.tensor([t[0] for t in teacher]) if teacher else last.argmax(-1)
    out_tok, dec_hidden, dec_logits = [toks], [], []
    for s in tqdm(range(gen - 1), desc=desc, leave=False, disable=not progress or gen < 8):
        hid.clear()
        step_logits = cpu_copy(runner.step(toks, hook))  # [B, V]
        dec_hidden.append(torch.stack([hid[i][:, 0] for i in range(L)]))  # [L, B, H]
        dec_logits.append(step_logits)
        toks = torch.tensor([t[s + 1] for t in teacher]) if teacher else step_logits.argmax(-1)
        out_tok.append(toks)
    H, V = pre_hidden.shape[-1], logits.shape[-1]
    dh = torch.stack(dec_hidden, 2) if dec_hidden else torch.zeros(L, B, 0, H)  # [L, B, S, H]
    dl = torch.stack(dec_logits, 1) if dec_logits else torch.zeros(B, 0, V)  # [B, S, V]
    tok = torch.stack(out_tok, 1)  # [B, gen]
    rows = []
    for b, p in enumerate(prompts):
        n = len(p)
        router = [c.view(B, -1, c.shape[-1])[b, :n] for c in calls] if calls else []
        rows.append(RowTrace(p, tok[b].tolist(), pre_hidden[:, b, :n].clone(), logits[b, :n].clone(),
                             dh[:, b].clone(), dl[b].clone(), [c[b].clone() for c in conv],
                             [r[b].clone() for r in rec], router))
    return rows


def fresh_layer_state(cfg: Qwen35Config, layer: int, batch: int, max_seq_len: int,
                      device: torch.device) -> list[Tensor]:
    """Zero state of decoder layer `layer` alone, fp32: [conv [B, C, W-1], rec [B, HV, K, V]] for a GDN layer,
    [k_cache, v_cache [B, KVH, T_max, D]] for attention. Shapes come from `State.zeros`, built on the meta
    device so that no other layer's state is allocated."""
    meta = State.zeros(cfg, batch, max_seq_len, torch.float32, "meta")
    if cfg.layer_types[layer] == LINEAR_ATTENTION:
        j = cfg.gdn_layers.index(layer)
        parts = [meta.conv[j], meta.recurrent[j]]
    else:
        j = cfg.attention_layers.index(layer)
        parts = [meta.k_cache[j], meta.v_cache[j]]
    return [torch.zeros(t.shape, dtype=t.dtype, device=device) for t in parts]


def run_layer(cfg: Qwen35Config, layer: int, w: dict[str, Tensor], x: Tensor, state: list[Tensor], start: Tensor,
              lengths: Tensor) -> Tensor:
    """Decoder layer `layer` over x [B, T, H] (row b: lengths[b] real tokens at positions start[b] + t) on top
    of `state` (as `fresh_layer_state` shapes it), which is replaced by the state after the call."""
    if cfg.layer_types[layer] == LINEAR_ATTENTION:
        x, state[0], state[1] = layers.gdn_layer(x, w, state[0], state[1], lengths, cfg)
    else:
        x, state[0], state[1] = layers.attention_layer(x, w, state[0], state[1], start, lengths, cfg)
    return x


def engine_layer_input(engine_rows: list[RowTrace], layer: int, x0: Tensor) -> Tensor:
    """The engine's input to `layer` at the prompt positions, right-padded like x0 [B, T, H] (the reference's
    embeddings, which are also the input to layer 0)."""
    if layer == 0:
        return x0
    x = torch.zeros_like(x0)
    for b, er in enumerate(engine_rows):
        x[b, : len(er.prompt)] = er.prefill_hidden[layer - 1].to(x0.device)
    return x


def engine_input_picks(cfg: Qwen35Config, layer: int, w: dict[str, Tensor], x: Tensor, lengths: Tensor) -> Tensor:
    """Router picks [B, T, k] of the reference layer (fresh state, as at prefill) run on x [B, T, H]."""
    B, T, _ = x.shape
    state = fresh_layer_state(cfg, layer, B, T, x.device)
    with record_router() as calls:
        run_layer(cfg, layer, w, x, state, torch.zeros_like(lengths), lengths)
    return calls[0].view(B, T, -1)


@torch.no_grad()
def routing_from_engine_inputs(model: Qwen35Model, rows: list[RowTrace], engine_rows: list[RowTrace]) -> list[list[Tensor]]:
    """Router picks [T, k] per row and layer, recomputed in fp32 from the *engine's* input to each layer.

    The compiled graphs do not expose their router's picks, so this runs the reference layer (fp32, fresh
    state, as at prefill) on the engine's layer input and records the router. It measures how many expert
    choices the engine's accumulated drift flips; a flip inside the layer's own mixer is not seen here
    (that shows in the layer's hidden-state error instead).
    """
    dev = model.device
    prompts = [r.prompt for r in rows]
    ids, lengths = pad_batch(prompts)
    lengths = lengths.to(dev)
    x0 = layers.embed(ids.to(dev), model.w.globals["embed_tokens.weight"]).float()  # [B, T, H]
    out: list[list[Tensor]] = [[] for _ in rows]
    for i, lw in enumerate(model.w.layers):
        picks = engine_input_picks(model.cfg, i, lw, engine_layer_input(engine_rows, i, x0), lengths)
        for b, p in enumerate(prompts):
            out[b].append(picks[b, : len(p)])
    return out
