"""Dense w8a8 block-scaled FP8 GEMM: `y = x @ dequant(w, w_scale).T` with `x` quantised per token per 128.

`x` [R, K] e4m3 with scales [R, ceil(K/128)]; `w` [N, K] e4m3 with 128x128 block scales
[ceil(N/128), ceil(K/128)] (the checkpoint's `weight_scale_inv`, used exactly). Each K step runs
`tl.dot` on fp8 operands (fp8 tensor cores on sm_90) and applies both scales to the fp32 partial sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.library import wrap_triton

from .quant import INTERPRET, cast_out, dot, quantize_act


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), GROUP_M row tiles at a time so a weight tile is reused from L2."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _w8a8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                      stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
                      UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]  # [BK, BN]
    as_ptrs = as_ptr + offs_m * stride_asm
    bs_ptrs = bs_ptr + (offs_n // 128) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        kg = (kb * BLOCK_K) // 128
        sa = tl.load(as_ptrs + kg, mask=m_ok, other=0.0)
        sb = tl.load(bs_ptrs + kg, mask=n_ok, other=0.0)
        acc += dot(a, b, UPCAST) * (sa[:, None] * sb[None, :])
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, cast_out(acc, c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def default_config(R: int) -> dict:
    """Tiles by token count: small R is memory bound (thin M tiles, many N tiles), large R compute bound."""
    # R is symbolic under export: the thin tiles only when every admitted R is small (no guard on R).
    small = R <= 64 if isinstance(R, int) else statically_known_true(R <= 64)
    if small:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)


def fp8_linear_triton(x: Tensor, w: Tensor, w_scale: Tensor, config: dict | None = None) -> Tensor:
    """`x` [..., K] (bf16/fp16/fp32) times block-scaled e4m3 `w` [N, K]^T -> [..., N] in x's dtype."""
    *lead, K = x.shape
    N = w.shape[0]
    x2 = x.reshape(-1, K)  # [R, K]
    R = x2.shape[0]
    out = torch.empty(R, N, dtype=x.dtype, device=x.device)
    if R == 0:
        return out.reshape(*lead, N)
    cfg = dict(config or default_config(R))
    if 128 % cfg["BLOCK_K"]:
        raise ValueError(f"fp8_linear: BLOCK_K must divide the 128-column scale group, got {cfg}")
    w, w_scale = w.contiguous(), w_scale.contiguous()
    xq, xs = quantize_act(x2)
    grid = (triton.cdiv(R, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    wrap_triton(_w8a8_gemm_kernel)[grid](
        xq, xs, w, w_scale, out, R, N, K,
        xq.stride(0), xs.stride(0), w.stride(0), w_scale.stride(0), out.stride(0),
        UPCAST=INTERPRET, **cfg)
    return out.reshape(*lead, N)
