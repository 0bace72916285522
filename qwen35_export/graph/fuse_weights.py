"""Horizontal fusion of a layer's projections, on its weight dict before capture (like `quantize_fp8`).

A decode step is a chain of small launches: at batch 1 each projection is a GEMV of a few MB whose fixed
cost (launch, activation quantisation, pipeline fill) is as large as its bytes' time. Projections that read
the same input become one GEMM over their concatenated rows, and the shared expert, when it has the routed
experts' size and format, becomes expert E of the routed MoE op (one more slot per token, weighted by its
sigmoid gate) instead of three linears, a gate and an add:

- GDN:        in_proj_qkv + z + b + a -> in_proj_qkvzba when all four share a format (BF16 builds), else
              (FP8 keeps b/a in BF16) in_proj_qkv + in_proj_z -> in_proj_qkvz;  in_proj_b + in_proj_a -> in_proj_ba
- attention:  q_proj + k_proj + v_proj -> qkv_proj
- router:     mlp.gate + mlp.shared_expert_gate -> mlp.gate_shared (E + 1 rows, zero rows up to a multiple
              of 8; both stay BF16 in FP8 checkpoints): at batch 1 the one-row shared gate alone was a
              cuBLAS dot + reduce, ~4 us
- MoE:        shared_expert.{gate,up,down}_proj -> row E of mlp.experts.{gate_up,down}_proj
              (else shared_expert.gate_proj + up_proj -> shared_expert.gate_up_proj)

Concatenating rows is exact, for FP8 too: a part's 128x128 block scales stay its own as long as every part
has a multiple of 128 rows (checked; otherwise that group is left alone). `model/layers.py` picks the
fused names up where present. Not applied to sharded builds, whose shard maps name the unfused weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.weights import scale_name

FP8_BLOCK = 128

# fused name -> its parts, rows in this order
ROW_GROUPS: dict[str, tuple[str, ...]] = {
    # first (dict order): all four GDN input projections when they share a format (BF16: the [HV + HV]-row
    # b/a GEMM was its own ~5 us launch at batch 1); else, as in FP8 builds, qkv+z and b+a below
    "linear_attn.in_proj_qkvzba.weight": tuple(f"linear_attn.in_proj_{n}.weight" for n in ("qkv", "z", "b", "a")),
    "linear_attn.in_proj_qkvz.weight": ("linear_attn.in_proj_qkv.weight", "linear_attn.in_proj_z.weight"),
    "linear_attn.in_proj_ba.weight": ("linear_attn.in_proj_b.weight", "linear_attn.in_proj_a.weight"),
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_shared.weight": ("mlp.gate.weight", "mlp.shared_expert_gate.weight"),
}
# fused name -> row multiple it is zero-padded to (only unquantised groups: FP8 rows come in 128s)
ROW_ALIGN = {"mlp.gate_shared.weight": 8}
SHARED = "mlp.shared_expert."
SHARED_GATE_UP = SHARED + "gate_up_proj.weight"
EXPERTS_GATE_UP, EXPERTS_DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"


def _fuse_rows(w: dict[str, Tensor], fused: str, parts: tuple[str, ...]) -> bool:
    """Replace `parts` in `w` by their rows stacked under `fused` (block scales too), when that is exact."""
    if not all(p in w for p in parts):
        return False
    ts = [w[p] for p in parts]
    if len({t.dtype for t in ts}) != 1 or len({t.shape[1:] for t in ts}) != 1:
        return False
    fp8 = [scale_name(p) in w for p in parts]
    if any(fp8) != all(fp8):  # one part FP8, another not: different kernels
        return False
    if fp8[0] and any(t.shape[0] % FP8_BLOCK for t in ts):  # a part's last scale row would cover the next part
        return False
    pad = 0 if fp8[0] else -sum(t.shape[0] for t in ts) % ROW_ALIGN.get(fused, 1)
    if pad:  # zero rows: the GEMM's output rows keep 16-byte aligned strides (E + 1 = 257 or 513 did not)
        ts.append(ts[0].new_zeros(pad, *ts[0].shape[1:]))
    w[fused] = torch.cat(ts, 0)
    if fp8[0]:
        w[scale_name(fused)] = torch.cat([w[scale_name(p)] for p in parts], 0)
    for p in parts:
        w.pop(p)
        w.pop(scale_name(p), None)
    return True


def _fold_shared_expert(out: dict[str, Tensor]) -> bool:
    """Append the shared expert as expert E of the routed expert tensors, when sizes and formats match."""
    g, u, d = (SHARED + n + "_proj.weight" for n in ("gate", "up", "down"))
    if not all(n in out for n in (g, u, d, EXPERTS_GATE_UP, EXPERTS_DOWN)):
        return False
    egu, edn = out[EXPERTS_GATE_UP], out[EXPERTS_DOWN]  # [E, 2I, H], [E, H, I]
    if tuple(out[g].shape) != (egu.shape[1] // 2, egu.shape[2]) or out[u].shape != out[g].shape \
            or tuple(out[d].shape) != tuple(edn.shape[1:]):
        return False
    if len({out[n].dtype for n in (g, u, d, EXPERTS_GATE_UP, EXPERTS_DOWN)}) != 1:
        return False
    scaled = [scale_name(n) in out for n in (g, u, d, EXPERTS_GATE_UP, EXPERTS_DOWN)]
    if any(scaled) != all(scaled):
        return False
    if scaled[0] and (egu.shape[1] // 2) % FP8_BLOCK:  # gate/up scale rows per half: the MoE ops read r // 128
        return False
    new = {EXPERTS_GATE_UP: torch.cat([egu, torch.cat([out[g], out[u]], 0)[None]], 0),  # [E+1, 2I, H]
           EXPERTS_DOWN: torch.cat([edn, out[d][None]], 0)}  # [E+1, H, I]
    if scaled[0]:
        sgu = torch.cat([out[scale_name(g)], out[scale_name(u)]], 0)[None]  # [1, 2I/128, H/128]
        new[scale_name(EXPERTS_GATE_UP)] = torch.cat([out[scale_name(EXPERTS_GATE_UP)], sgu], 0)
        new[scale_name(EXPERTS_DOWN)] = torch.cat([out[scale_name(EXPERTS_DOWN)], out[scale_name(d)][None]], 0)
    for n in (g, u, d):
        out.pop(n)
        out.pop(scale_name(n), None)
    out.update(new)
    return True


def fuse_layer_weights(w: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Return (weights with every fusable group fused, the fused names created)."""
    out = dict(w)
    done = [fused for fused, parts in ROW_GROUPS.items() if _fuse_rows(out, fused, parts)]
    if _fold_shared_expert(out):
        done.append("mlp.experts (+ shared expert as expert E)")
    elif _fuse_rows(out, SHARED_GATE_UP, (SHARED + "gate_proj.weight", SHARED + "up_proj.weight")):
        done.append(SHARED_GATE_UP)
    return out, done
