"""x @ w.T for a decode step's few rows (1-64) on swapped operands, K split over programs.

At decode a linear is a weight stream: M = 1-64 rows of x against N x K weights read once. cuBLAS picks
tiles for that at run time from the row count, which one AOTInductor graph serving every batch up to 64
cannot give a Triton GEMM; this kernel is the alternative measured against it (bench/linear_decode.py).
The weight tile takes the tensor-core instruction's M side (BLOCK_N weight rows, at least 16), the tokens its
narrow N side (BLOCK_T >= 16, masked rows move no bytes), as the FP8 swapped kernels do
(kernels/fp8_linear/gemm.py); the K loop is split over programs (fp32 partials summed in split order, as
there) so that a few hundred programs stream the weights.

Measured against cuBLAS on an H200 (bench/results/linear_decode_h200/): up to 1.15x faster on the 2048-wide
out_proj / o_proj, slower on the wide projections in a 64-row graph (35B attention qkv 13.4 vs 12.1 us at one
row). Engines keep F.linear (cuBLAS) for BF16; this kernel is not substituted anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..fp8_linear.gemm import at_most, launch_split_k
from ..fp8_linear.quant import cast_out, dot


@triton.jit
def _swap_gemm_kernel(x_ptr, w_ptr, c_ptr, M, N, K, steps_per_split,
                      stride_xm, stride_wn, stride_cm, stride_cs,
                      UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (column tile, row tile, K split): c^T [BLOCK_N, BLOCK_T] = w [BLOCK_N, K-split] @ x^T over the
    split's BLOCK_K steps, stored at `c_ptr + split * stride_cs` (the output itself with one split)."""
    num_t = tl.cdiv(M, BLOCK_T)
    pid_t = tl.program_id(0) % num_t  # token tiles fastest: those of one weight tile share its reads in the L2
    pid_n = tl.program_id(0) // num_t
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    t_ok = offs_t < M
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BN, BK], K contiguous
    x_ptrs = x_ptr + offs_t[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # [BT, BK]
    kb0 = pid_k * steps_per_split
    kb1 = tl.minimum(kb0 + steps_per_split, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for kb in range(kb0, kb1):
        k = kb * BLOCK_K
        k_ok = offs_k < K - k
        w = tl.load(w_ptrs + k, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptrs + k, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        acc = acc + dot(w, tl.trans(x.to(w.dtype)), UPCAST)
    c_ptrs = c_ptr + pid_k.to(tl.int64) * stride_cs + offs_t[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
    tl.store(c_ptrs, cast_out(acc, c_ptr.dtype.element_ty), mask=n_ok[:, None] & t_ok[None, :])


def small_m_config(R: int | torch.SymInt, N: int, K: int) -> dict:
    """Tiles for R rows (a symbolic R: every value its graph admits): a token tile covering R up to 64; outputs
    up to 4096 wide take 64 weight rows per program with K split in 4 (fewer for short K, each split >= 4
    steps), wider ones 128 rows unsplit. From the H200 sweep (bench/results/linear_decode_h200/, 64-row
    graphs): the 35B / 397B out_proj and o_proj's best at M = 1 and 8 (4 / 3 stages for K 4096 / 8192; at M =
    64 the 397B one's best split 2, 1% faster); the wide tile is the 35B wide projections' best, not among the
    397B ones' best eight (all lose to cuBLAS there)."""
    bt = next((b for b in (16, 32, 64) if at_most(R, b)), 64)
    if N <= 4096:
        return dict(BLOCK_N=64, BLOCK_T=bt, BLOCK_K=128, SPLIT_K=min(4, max(1, triton.cdiv(K, 128) // 4)),
                    num_warps=4, num_stages=4 if K <= 4096 else 3)
    return dict(BLOCK_N=128, BLOCK_T=bt, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=4)


def linear_small_m(x: Tensor, w: Tensor, config: dict | None = None) -> Tensor:
    """x [..., K] @ w [N, K].T in fp32 accumulation (x taken in w's dtype; fp32 operands multiply in TF32 on
    the GPU, as tl.dot's default), output in x's dtype; meant for up to 64 rows.
    `config`: the launch tiles (`small_m_config` when None): BLOCK_N, BLOCK_T, BLOCK_K (>= 16 each, tl.dot's
    smallest tile), SPLIT_K, num_warps, num_stages."""
    if x.shape[-1] != w.shape[1] or w.dim() != 2:
        raise ValueError(f"linear_small_m: x {tuple(x.shape)} and w {tuple(w.shape)}: expected x [..., K] and "
                         f"w [N, K] with the same K")
    K, N = w.shape[1], w.shape[0]
    x2 = x.reshape(-1, K)  # [R, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    R = x2.shape[0]
    cfg = dict(config) if config is not None else small_m_config(R, N, K)
    if min(cfg["BLOCK_N"], cfg["BLOCK_T"], cfg["BLOCK_K"]) < 16:
        raise ValueError(f"linear_small_m: BLOCK_N, BLOCK_T and BLOCK_K must be >= 16 (tl.dot's smallest "
                         f"tile), got {cfg}")
    out = torch.empty(R, N, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(R, cfg["BLOCK_T"])
    launch_split_k(_swap_gemm_kernel, (x2, w), triton.cdiv(K, cfg["BLOCK_K"]), tiles, out, cfg)
    return out.reshape(*x.shape[:-1], N)

