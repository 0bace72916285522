"""The fp32 reference one decoder layer at a time, for models whose fp32 weights fit neither on the GPU nor
in host memory (35B-A3B: 140 GB).

Teacher forcing makes this possible. The engine runs first and gives each row's tokens; the reference then
needs, per row, one causal pass over prompt + teacher[:-1], and a causal pass can go layer by layer: layer
i's weights are read from the checkpoint in fp32 (onto the GPU when they fit, else kept on the CPU), run over
every row, and dropped before layer i + 1 is read. Per layer and engine batch, two calls on the layer's own
explicit state: the prompts from a zero state (the very call the whole-model prefill makes; the GDN state
after it is the one compared), then the S = gen - 1 teacher tokens in one call (by causality the S decode
steps, up to fp32 summation order). Hidden states, logits, state and router picks come out as `trace`
shapes them, so checks.py cannot tell the two references apart.

The reference rows' `teacher` holds the reference's own greedy pick at each generated position, which is
what the greedy-match check compares the engine's pick with; the tokens both sides were fed are the engine's.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from ..checkpoint.reader import CheckpointReader
from ..config import LINEAR_ATTENTION, Qwen35Config
from ..model import layers
from ..model.weights import global_weight_shapes, layer_weight_shapes
from .trace import (RowTrace, cpu_copy, engine_input_picks, engine_layer_input, fresh_layer_state, pad_batch,
                    record_router, run_layer)

# Room left beside the weights for what the computation allocates, as run.reference_device has always allowed.
HEADROOM = 1.25


def host_available_bytes() -> int:
    """Host memory available to a new allocation (Linux MemAvailable: free plus reclaimable page cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: assume it fits, as validate did before it looked


def fits(device: torch.device, weight_bytes: int, activation_bytes: int = 0) -> bool:
    """Whether weights (plus HEADROOM) and activations fit in the free memory of `device` (a GPU) or of the
    host (`cpu`). On a GPU, blocks torch's caching allocator holds but does not use (a dropped layer's
    weights) count as free: the driver's count alone misses them."""
    if device.type == "cuda":
        free = (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                - torch.cuda.memory_allocated(device))
    else:
        free = host_available_bytes()
    return weight_bytes * HEADROOM + activation_bytes < free


def fp32_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    return 4 * sum(math.prod(s) for s in shapes.values())


def _activation_bytes(cfg: Qwen35Config, batches: list[list[RowTrace]], max_seq_len: int) -> int:
    """Rough bound on one batch's largest fp32 temporaries: the logits [B, T, V] and the attention scores
    [B, NH, T, T_max], with T the prompt plus the teacher-forced tokens."""
    n = max(len(rows) * (max(len(r.prompt) for r in rows) + len(rows[0].teacher)) for rows in batches)
    return 4 * n * (cfg.vocab_size + cfg.num_attention_heads * max_seq_len + 16 * cfg.hidden_size)


def _read_global(reader: CheckpointReader, name: str) -> Tensor:
    # One tensor at a time: `load_globals` would hold embed_tokens and lm_head together (2 x 2 GB at 35B).
    return reader.load_global(name, torch.float32)


@dataclass
class _Batch:
    """One engine batch on its way through the layers: activations fp32 on CPU, padded as the engine's."""

    rows: list[RowTrace]  # the engine's: prompts, the tokens fed, its layer outputs (for the routing check)
    lengths: Tensor  # [B] prompt lengths
    x: Tensor  # [B, T, H] input to the next layer at the prompt positions
    xd: Tensor  # [B, S, H] the same at the S teacher-forced positions
    hid: list[Tensor] = field(default_factory=list)  # per layer done [B, T, H]
    hid_d: list[Tensor] = field(default_factory=list)  # per layer done [B, S, H]
    conv: list[Tensor] = field(default_factory=list)  # per GDN layer done [B, C, W-1], after the prompt
    rec: list[Tensor] = field(default_factory=list)  # per GDN layer done [B, HV, K, V]
    picks: list[Tensor] = field(default_factory=list)  # per layer [B, T, k], the reference's own
    engine_picks: list[Tensor] = field(default_factory=list)  # per layer [B, T, k], from the engine's input

    @staticmethod
    def embed(rows: list[RowTrace], embed_w: Tensor) -> "_Batch":
        ids, lengths = pad_batch([r.prompt for r in rows])  # [B, T], [B]
        fed = torch.tensor([r.teacher[:-1] for r in rows], dtype=torch.int64)  # [B, S]
        return _Batch(rows, lengths, layers.embed(ids, embed_w), layers.embed(fed, embed_w))


def _layer_on_batch(cfg: Qwen35Config, i: int, w: dict[str, Tensor], wb: _Batch, max_seq_len: int,
                    dev: torch.device) -> None:
    B, T, _ = wb.x.shape
    S = wb.xd.shape[1]
    lengths = wb.lengths.to(dev)
    x = wb.x.to(dev)
    # The engine's picks first: at layer 0 its input is this very x.
    wb.engine_picks.append(engine_input_picks(cfg, i, w, engine_layer_input(wb.rows, i, x), lengths))
    state = fresh_layer_state(cfg, i, B, max_seq_len, dev)
    with record_router() as calls:
        x = run_layer(cfg, i, w, x, state, torch.zeros_like(lengths), lengths)  # [B, T, H]
    wb.picks.append(calls[0].view(B, T, -1))
    if cfg.layer_types[i] == LINEAR_ATTENTION:
        wb.conv.append(cpu_copy(state[0]))
        wb.rec.append(cpu_copy(state[1]))
    if S:
        wb.xd = cpu_copy(run_layer(cfg, i, w, wb.xd.to(dev), state, lengths, torch.full_like(lengths, S)))
    wb.x = cpu_copy(x)
    wb.hid.append(wb.x)
    wb.hid_d.append(wb.xd)


def _rows(cfg: Qwen35Config, wb: _Batch, norm_w: Tensor, head_w: Tensor,
          dev: torch.device) -> tuple[list[RowTrace], list[list[Tensor]]]:
    """The finished batch as `trace` returns it, and the routing picks from the engine's inputs per row."""
    eps = cfg.rms_norm_eps
    logits = cpu_copy(layers.final_logits(wb.x.to(dev), norm_w, head_w, eps))  # [B, T, V]
    dlogits = cpu_copy(layers.final_logits(wb.xd.to(dev), norm_w, head_w, eps))  # [B, S, V]
    hid, hid_d = torch.stack(wb.hid), torch.stack(wb.hid_d)  # [L, B, T, H], [L, B, S, H]
    rows, routing = [], []
    for b, er in enumerate(wb.rows):
        n = len(er.prompt)
        pl, dl = logits[b, :n].clone(), dlogits[b].clone()
        greedy = torch.cat([pl[-1:], dl]).argmax(-1).tolist()  # the reference's pick at each generated position
        rows.append(RowTrace(er.prompt, greedy, hid[:, b, :n].clone(), pl, hid_d[:, b].clone(), dl,
                             [c[b].clone() for c in wb.conv], [r[b].clone() for r in wb.rec],
                             [p[b, :n] for p in wb.picks]))
        routing.append([p[b, :n] for p in wb.engine_picks])
    return rows, routing


@torch.no_grad()
def stream_trace(checkpoint: str | Path, batches: list[list[RowTrace]], max_seq_len: int,
                 gpu: torch.device | None = None,
                 progress: bool = True) -> tuple[list[RowTrace], list[list[Tensor]]]:
    """The fp32 reference of `checkpoint`, one layer's weights in memory at a time, teacher-forced on the
    tokens of each engine row (`batches`: the engine's rows, as it ran them batch by batch).

    Each layer goes to `gpu` when its fp32 weights and one batch's activations fit there, else runs on the
    CPU; `max_seq_len` sizes the attention cache as the engine's does. Returns the reference rows in order
    (`trace`'s RowTrace) and, per row and layer, the router picks [T, k] recomputed from the engine's input
    to that layer (as `routing_from_engine_inputs` gives them).
    """
    reader = CheckpointReader(checkpoint)
    cfg = reader.config
    act = _activation_bytes(cfg, batches, max_seq_len)

    def device_for(weight_bytes: int) -> torch.device:
        return gpu if gpu is not None and fits(gpu, weight_bytes, act) else torch.device("cpu")

    try:
        embed_w = _read_global(reader, "embed_tokens.weight")
        work = [_Batch.embed(rows, embed_w) for rows in batches]
        del embed_w
        for i in tqdm(range(cfg.num_hidden_layers), desc="reference layers (streamed)", disable=not progress):
            dev = device_for(fp32_bytes(layer_weight_shapes(cfg, i)))
            w = {k: v.to(dev) for k, v in reader.load_layer(i, torch.float32).items()}
            for wb in work:
                _layer_on_batch(cfg, i, w, wb, max_seq_len, dev)
            del w
        shapes = global_weight_shapes(cfg)
        dev = device_for(fp32_bytes({n: shapes[n] for n in ("norm.weight", "lm_head.weight")}))
        norm_w = _read_global(reader, "norm.weight").to(dev)
        head_w = _read_global(reader, "lm_head.weight").to(dev)
        rows: list[RowTrace] = []
        routing: list[list[Tensor]] = []
        for wb in work:
            r, p = _rows(cfg, wb, norm_w, head_w, dev)
            rows += r
            routing += p
    finally:
        reader.close()
    return rows, routing
