"""Capture each layer kind as an `ExportedProgram` with weights and state as graph inputs.

One graph per (layer kind, phase) serves every layer of that kind: the runtime binds a layer's weights by
passing them as inputs, so 397B never needs to sit in one graph or in host RAM at once. State tensors
(conv/recurrent state, KV cache) are mutated in place by the graph; AOTInductor keeps the mutation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from ..config import Qwen35Config
from ..model import layers

# Graph names, in the order a step runs them.
EMBED, GDN, ATTN, FINAL = "embed", "gdn", "attn", "final"
PREFILL, DECODE = "prefill", "decode"
# Decode at batch 1 with the batch static: what the kernels choose from the row count (MoE PAIRS mode and
# one-token tiles, FP8 linear tiles for <= 16 rows) is then chosen for one row, where a graph serving every
# batch up to max_batch must take tiles good at its largest batch. The runtime uses it for batch-1 steps.
DECODE1 = "decode1"
DECODE_PHASES = (DECODE, DECODE1)


class GDNLayer(nn.Module):
    """Gated DeltaNet + MoE decoder layer: x, lengths, conv_state, rec_state, *weights -> x.
    `fused_route`: the MoE routes through `qwen35::moe_route` (layers.moe_block)."""

    def __init__(self, cfg: Qwen35Config, weight_names: list[str], fused_route: bool = False):
        super().__init__()
        self.cfg, self.weight_names, self.fused_route = cfg, list(weight_names), fused_route

    def forward(self, x: Tensor, lengths: Tensor, conv_state: Tensor, rec_state: Tensor, *weights: Tensor) -> Tensor:
        w = dict(zip(self.weight_names, weights))
        y, conv, rec = layers.gdn_layer(x, w, conv_state, rec_state, lengths, self.cfg, self.fused_route)
        conv_state.copy_(conv)
        rec_state.copy_(rec)
        return y


class AttentionLayer(nn.Module):
    """Gated attention + MoE decoder layer: x, start, lengths, k_cache, v_cache, *weights -> x.
    `cache_op`: prefill through `qwen35::decode_attention` too (layers.attention_mixer); `fused_route`: as
    GDNLayer's."""

    def __init__(self, cfg: Qwen35Config, weight_names: list[str], cache_op: bool = False,
                 fused_route: bool = False):
        super().__init__()
        self.cfg, self.weight_names, self.cache_op, self.fused_route = cfg, list(weight_names), cache_op, fused_route

    def forward(self, x: Tensor, start: Tensor, lengths: Tensor, k_cache: Tensor, v_cache: Tensor,
                *weights: Tensor) -> Tensor:
        w = dict(zip(self.weight_names, weights))
        y, kc, vc = layers.attention_layer(x, w, k_cache, v_cache, start, lengths, self.cfg, self.cache_op,
                                           self.fused_route)
        k_cache.copy_(kc)
        v_cache.copy_(vc)
        return y


class Embed(nn.Module):
    def forward(self, ids: Tensor, embed_w: Tensor) -> Tensor:
        return layers.embed(ids, embed_w)


class Final(nn.Module):
    """Final norm + lm_head on the hidden states the runtime picked (e.g. each row's last token)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor, norm_w: Tensor, lm_head_w: Tensor) -> Tensor:
        return layers.final_logits(x, norm_w, lm_head_w, self.eps)


@dataclass(frozen=True)
class CaptureShapes:
    max_batch: int
    max_seq_len: int


def _dims(phase: str, shapes: CaptureShapes) -> tuple[Dim | None, Dim | None]:
    """(batch Dim, length Dim) of a layer graph; None where the size is static (decode's T = 1, DECODE1's
    batch of 1)."""
    if phase not in (PREFILL, *DECODE_PHASES):
        raise ValueError(f"phase: expected one of {(PREFILL, *DECODE_PHASES)}, found {phase!r}")
    # Example sizes must be >= 2, or export specialises the dim to 1 (toolchain-notes): DECODE1 wants that.
    B = None if phase == DECODE1 else Dim("B", min=1, max=max(shapes.max_batch, 2))
    T = Dim("T", min=1, max=max(shapes.max_seq_len, 2)) if phase == PREFILL else None
    return B, T


def example_T(phase: str) -> int:
    return 3 if phase == PREFILL else 1


def example_B(phase: str) -> int:
    return 1 if phase == DECODE1 else 2


def _batch_dims(B: Dim | None, T: Dim | None, n_state: int, n_weights: int) -> tuple:
    """dynamic_shapes of (x, n_state batch-leading inputs, weights): x [B, T, H] and the states [B, ...]."""
    x = {k: d for k, d in ((0, B), (1, T)) if d is not None} or None
    row = {0: B} if B is not None else None
    return (x, *(row,) * n_state, (None,) * n_weights)


def capture_gdn(cfg: Qwen35Config, weights: dict[str, Tensor], phase: str, shapes: CaptureShapes,
                act_dtype: torch.dtype, device: torch.device,
                layer: Callable[[Qwen35Config, list[str]], nn.Module] = GDNLayer, fused_route: bool = False
                ) -> tuple[ExportedProgram, list[str]]:
    """`layer` builds the module to capture (parallel/capture.py passes its sharded variant); `fused_route`:
    see GDNLayer."""
    names = sorted(weights)
    B, T = _dims(phase, shapes)
    b, t = example_B(phase), example_T(phase)
    x = torch.randn(b, t, cfg.hidden_size, dtype=act_dtype, device=device)
    lengths = torch.full((b,), t, dtype=torch.int64, device=device)
    conv = torch.zeros(b, cfg.conv_dim, cfg.linear_conv_kernel_dim - 1, dtype=act_dtype, device=device)
    rec = torch.zeros(b, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim,
                      dtype=torch.float32, device=device)
    args = (x, lengths, conv, rec, *[weights[n] for n in names])
    dyn = _batch_dims(B, T, 3, len(names))  # lengths, conv, rec
    # only flags that are on: the sharded layers (parallel/capture.py) take no fused_route
    ep = torch.export.export(layer(cfg, names, **({"fused_route": True} if fused_route else {})), args,
                             dynamic_shapes=dyn, strict=False)
    return ep, names


def capture_attention(cfg: Qwen35Config, weights: dict[str, Tensor], phase: str, shapes: CaptureShapes,
                      act_dtype: torch.dtype, device: torch.device,
                      layer: Callable[[Qwen35Config, list[str]], nn.Module] = AttentionLayer,
                      cache_op: bool = False, fused_route: bool = False) -> tuple[ExportedProgram, list[str]]:
    """`cache_op`: the prefill graph attends through `qwen35::decode_attention` (builds that substitute its
    flash kernel); else through SDPA. `fused_route`: see GDNLayer."""
    names = sorted(weights)
    B, T = _dims(phase, shapes)
    b, t = example_B(phase), example_T(phase)
    x = torch.randn(b, t, cfg.hidden_size, dtype=act_dtype, device=device)
    start = torch.zeros(b, dtype=torch.int64, device=device)
    lengths = torch.full((b,), t, dtype=torch.int64, device=device)
    kv = (b, cfg.num_key_value_heads, shapes.max_seq_len, cfg.head_dim)
    kc = torch.zeros(kv, dtype=act_dtype, device=device)
    vc = torch.zeros(kv, dtype=act_dtype, device=device)
    args = (x, start, lengths, kc, vc, *[weights[n] for n in names])
    dyn = _batch_dims(B, T, 4, len(names))  # start, lengths, k cache, v cache
    with _attention_backends(device):
        kw = {k: True for k, on in (("cache_op", cache_op), ("fused_route", fused_route)) if on}
        module = layer(cfg, names, **kw)
        ep = torch.export.export(module, args, dynamic_shapes=dyn, strict=False)
    return ep, names


def _attention_backends(device: torch.device):
    """SDPA backends the captured graph may use (prefill graphs without `cache_op`: decode calls
    qwen35::decode_attention).
    Export bakes the backend chosen while tracing; on CUDA it picked cuDNN attention, whose call failed in an
    AOTI decode graph with our boolean mask (H100, torch 2.11, 2026-11-24). Memory-efficient attention takes
    arbitrary masks; math is the fallback for shapes it rejects. On the H200 (2026-12-01) the profile still
    showed cuDNN attention in a decode graph built with this pin, so AOTInductor may choose again when it
    compiles; the prefill graphs ran correctly there either way."""
    from contextlib import nullcontext

    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def capture_embed(cfg: Qwen35Config, embed_w: Tensor, shapes: CaptureShapes,
                  device: torch.device) -> ExportedProgram:
    B = Dim("B", min=1, max=max(shapes.max_batch, 2))
    T = Dim("T", min=1, max=max(shapes.max_seq_len, 2))
    ids = torch.zeros(2, 3, dtype=torch.int64, device=device)
    return torch.export.export(Embed(), (ids, embed_w), dynamic_shapes=({0: B, 1: T}, None), strict=False)


def capture_final(cfg: Qwen35Config, norm_w: Tensor, lm_head_w: Tensor, shapes: CaptureShapes,
                  act_dtype: torch.dtype, device: torch.device) -> ExportedProgram:
    B = Dim("B", min=1, max=max(shapes.max_batch, 2))
    T = Dim("T", min=1, max=max(shapes.max_seq_len, 2))
    x = torch.randn(2, 3, cfg.hidden_size, dtype=act_dtype, device=device)
    return torch.export.export(Final(cfg.rms_norm_eps), (x, norm_w, lm_head_w),
                               dynamic_shapes=({0: B, 1: T}, None, None), strict=False)
