"""Fused GDN gating (g, beta) and gated RMSNorm: elementwise / per-row, memory-bound."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ..layout import token_rows


@triton.jit
def _softplus(x):
    """torch's softplus (threshold 20), with log1p(u) = log(1+u) * u / ((1+u) - 1) accurate for small u."""
    u = tl.exp(-tl.abs(x))
    w1 = 1.0 + u
    lp = tl.where(w1 == 1.0, u, tl.log(w1) * u / (w1 - 1.0))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + lp)


@triton.jit
def gdn_gating_kernel(A_log, a, dt_bias, b, g, beta, n, HV: tl.constexpr, BLOCK: tl.constexpr):
    """g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b); a, b flattened [n] with HV innermost."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    h = offs % HV
    b_a = tl.load(a + offs, mask=m, other=0.).to(tl.float32)
    b_b = tl.load(b + offs, mask=m, other=0.).to(tl.float32)
    b_A = tl.load(A_log + h, mask=m, other=0.).to(tl.float32)
    b_dt = tl.load(dt_bias + h, mask=m, other=0.).to(tl.float32)
    tl.store(g + offs, -tl.exp(b_A) * _softplus(b_a + b_dt), mask=m)
    tl.store(beta + offs, tl.sigmoid(b_b), mask=m)


@triton.jit
def gated_rms_norm_kernel(o, z, w, y, n_rows, eps, ZS, V: tl.constexpr, ZH: tl.constexpr, BR: tl.constexpr,
                          BV: tl.constexpr, ROUND_W: tl.constexpr):
    """BR rows of V: y = (round(norm(o)) * w [rounded to o's dtype if ROUND_W]) * silu(z), to o's dtype.
    o and y are contiguous rows; z's row r is head r % ZH of token r // ZH, tokens ZS elements apart (a
    column slice of the input projection's output, read in place)."""
    eps = (tl.zeros([], tl.float32) + eps).to(tl.float32)  # AOTI passes Python floats as fp64 scalars
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BV)
    m = (rows[:, None] < n_rows) & (cols[None, :] < V)
    off = rows[:, None] * V + cols[None, :]
    z_off = ((rows // ZH) * ZS + (rows % ZH) * V)[:, None] + cols[None, :]
    DT = o.dtype.element_ty
    b_o = tl.load(o + off, mask=m, other=0.).to(tl.float32)
    b_z = tl.load(z + z_off, mask=m, other=0.).to(tl.float32)
    b_w = tl.load(w + cols, mask=cols < V, other=0.).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(b_o * b_o, axis=1) / V + eps)
    h = (b_o * rstd[:, None]).to(DT).to(tl.float32) * b_w[None, :]
    if ROUND_W:
        h = h.to(DT).to(tl.float32)  # weight in o's dtype: torch multiplies and rounds in that dtype
    h = h * (b_z * tl.sigmoid(b_z))
    tl.store(y + off, h.to(DT), mask=m)


def gdn_gating_fwd(A_log: Tensor, a: Tensor, dt_bias: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """A_log, dt_bias [HV]; a, b [..., HV] -> g, beta [..., HV] fp32."""
    HV = a.shape[-1]
    a, b = a.contiguous(), b.contiguous()
    g = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    beta = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    n = a.numel()
    BLOCK = 1024
    wrap_triton(gdn_gating_kernel)[(triton.cdiv(n, BLOCK),)](
        A_log.contiguous(), a, dt_bias.contiguous(), b, g, beta, n, HV=HV, BLOCK=BLOCK, num_warps=4)
    return g, beta


def gated_rms_norm_fwd(o: Tensor, z: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """o, z [..., V]; weight [V] -> y [..., V] in o's dtype (see reference.naive_gated_rms_norm).
    A 4-d z ([B, T, heads, V]) is read at its token stride when layout.token_rows allows it."""
    V = o.shape[-1]
    o = o.contiguous()
    if z.dim() == 4:
        z, zs = token_rows(z)
        zh = z.shape[2]
    else:
        z, zs, zh = z.contiguous(), V, 1
    y = torch.empty(o.shape, dtype=o.dtype, device=o.device)
    n_rows = o.numel() // V
    BV = triton.next_power_of_2(V)
    BR = max(1, 4096 // BV)
    round_w = weight.dtype == o.dtype and o.dtype != torch.float32
    wrap_triton(gated_rms_norm_kernel)[(triton.cdiv(n_rows, BR),)](
        o, z, weight.contiguous(), y, n_rows, eps, zs, V=V, ZH=zh, BR=BR, BV=BV, ROUND_W=round_w, num_warps=4)
    return y
