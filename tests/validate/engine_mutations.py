"""Deliberately broken engines for the mutation tests: one layer of a real compiled engine is replaced by
the reference layer function (exporter/capture.py's GDNLayer / AttentionLayer, same calling convention and
in-place state updates as the compiled graph) run with one known bug patched in.

Building a broken AOTInductor engine per bug would cost about a minute each on 2 cores; swapping one layer's
callable exercises the same validate path (the runtime calls `engine.graphs[...]` per layer).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

import torch
from torch import Tensor

from qwen35_export.config import LINEAR_ATTENTION
from qwen35_export.exporter.capture import AttentionLayer, GDNLayer
from qwen35_export.model import layers
from qwen35_export.runtime.engine import Engine

Mutation = Callable[[], ContextManager[None]]


@contextlib.contextmanager
def _patch_op(name: str, make: Callable[[Callable], Callable]) -> Iterator[None]:
    """Replace torch.ops.qwen35.<name> (as the reference layers call it) by make(original)."""
    ns = torch.ops.qwen35
    orig = getattr(ns, name)
    setattr(ns, name, make(orig))
    try:
        yield
    finally:
        setattr(ns, name, orig)


@contextlib.contextmanager
def rmsnorm_plain_weight() -> Iterator[None]:
    """(a) x / rms(x) * w instead of the zero-centred * (1 + w)."""
    def plain(x: Tensor, w: Tensor, eps: float) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)

    orig = layers.rms_norm
    layers.rms_norm = plain
    try:
        yield
    finally:
        layers.rms_norm = orig


def gdn_state_bf16() -> ContextManager[None]:
    """(b) the GDN recurrent state rounded to bf16 after every token (and when stored)."""
    def make(orig):
        def op(q, k, v, g, beta, h0):
            h, outs = h0.to(torch.bfloat16).float(), []
            for t in range(q.shape[1]):
                o, h = orig(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], beta[:, t:t + 1], h)
                h = h.to(torch.bfloat16).float()
                outs.append(o)
            return torch.cat(outs, 1), h
        return op
    return _patch_op("gated_delta_rule", make)


def router_no_renorm() -> ContextManager[None]:
    """(c) top-k softmax weights used as they are, not renormalised to sum 1."""
    def make(orig):
        def op(logits, top_k):
            w, ids = torch.topk(torch.softmax(logits.float(), -1), top_k, dim=-1)
            return w, ids.to(torch.int64)
        return op
    return _patch_op("moe_router", make)


def expert_permutation() -> ContextManager[None]:
    """(d) experts stored in the wrong order: router pick e runs expert (e + 1) % E."""
    def make(orig):
        def op(x, weights, ids, w_gate_up, w_down):
            return orig(x, weights, (ids + 1) % w_gate_up.shape[0], w_gate_up, w_down)
        return op
    return _patch_op("moe_experts", make)


def conv_state_dropped() -> ContextManager[None]:
    """(e) the causal conv starts from zeros each call: its state is not carried across decode steps."""
    def make(orig):
        def op(x, weight, conv_state, lengths):
            return orig(x, weight, torch.zeros_like(conv_state), lengths)
        return op
    return _patch_op("causal_conv1d", make)


MUTATIONS: dict[str, Mutation] = {
    "rmsnorm_plain_weight": rmsnorm_plain_weight,
    "gdn_state_bf16": gdn_state_bf16,
    "router_no_renorm": router_no_renorm,
    "expert_permutation": expert_permutation,
    "conv_state_dropped": conv_state_dropped,
}


@contextlib.contextmanager
def broken_layer(engine: Engine, layer: int, mutation: Mutation) -> Iterator[Engine]:
    """Within the block, layer `layer` of `engine` runs the reference layer with `mutation` applied; the
    other layers of that kind still run the compiled graph. The graphs are restored on exit."""
    gdn = engine.cfg.layer_types[layer] == LINEAR_ATTENTION
    kind = "gdn" if gdn else "attn"
    names = engine.manifest.graphs[f"{kind}_prefill"].weight_names
    module = (GDNLayer if gdn else AttentionLayer)(engine.cfg, names)
    first_weight = 4 if gdn else 5  # (x, lengths, conv, rec, *w) / (x, start, lengths, k, v, *w)
    marker = engine.layer_weights[layer][0]  # the runtime passes this very tensor only for this layer
    saved = dict(engine.graphs)

    def wrap(compiled):
        def call(*args):
            if args[first_weight] is marker:
                with mutation():
                    return module(*args)
            return compiled(*args)
        return call

    for name in saved:  # prefill, decode and, where built, the batch-1 decode graph
        if name.startswith(f"{kind}_"):
            engine.graphs[name] = wrap(saved[name])
    try:
        yield engine
    finally:
        engine.graphs.clear()
        engine.graphs.update(saved)
