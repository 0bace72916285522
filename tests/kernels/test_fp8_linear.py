"""Dense block-scaled FP8 linear against the dequantised reference and `qwen35::fp8_linear`: the weight-only
decode path (x unquantised, the weight converted in registers), the two-kernel path (activation quantisation,
then the GEMM) and the fused small-R path (quantisation in the GEMM's registers), against the reference,
against each other, and which one an exported graph launches.

CPU through Triton's interpreter (conftest.py); the real-size case needs CUDA. Comparisons use the kernel
tests' one helper (gdn_compare.assert_close); the unit roundoffs behind the bounds are test_moe.py's.
"""

from __future__ import annotations

import math

import pytest
import torch

import qwen35_export.model.ops  # noqa: F401  (registers the qwen35:: reference ops)
from qwen35_export.checkpoint.fp8 import quantize_fp8_block
from qwen35_export.kernels.fp8_linear import (fp8_linear, fp8_linear_reference, quantize_act,
                                              quantize_act_reference)
from qwen35_export.kernels.fp8_linear import gemm, quant
from qwen35_export.kernels.fp8_linear.gemm import (WO_MAX_R, default_config, fp8_linear_triton, fused_config,
                                                    swap_config, two_kernel_config, wo_config)

from gdn_compare import DEVICE, assert_close  # the kernel tests' one comparison helper
from test_moe import BF16_U, FP8_U, FP32_BOUND, nan_empty  # noqa: F401  (fixture re-exported)


def assert_quant_match(q: torch.Tensor, s: torch.Tensor, q_ref: torch.Tensor, s_ref: torch.Tensor) -> None:
    """e4m3 codes and scales equal to the reference: bit for bit on CPU (the interpreter divides exactly);
    on the GPU Triton's fp32 `/` may be an ulp off IEEE, so scales may differ by 2 ulp and a code may sit
    one step from the reference's on at most 1 element in 1e4 (ties flipped by that ulp)."""
    if not q.is_cuda:
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
        return
    assert ((s - s_ref).abs() <= 2 * torch.finfo(torch.float32).eps * s_ref.abs()).all(), "scales"
    codes, codes_ref = q.view(torch.uint8).int(), q_ref.view(torch.uint8).int()
    diff = codes != codes_ref
    assert diff.float().mean().item() <= 1e-4, f"{int(diff.sum())} of {diff.numel()} codes differ"
    assert ((codes - codes_ref).abs()[diff] == 1).all(), "a code differs by more than one step"


def make_linear(N: int, K: int, seed: int, dev: str = "cpu"):
    g = torch.Generator(device=dev).manual_seed(seed)
    return quantize_fp8_block(torch.randn(N, K, generator=g, device=dev) * K ** -0.5)


def make_rows(R: int, K: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """x [R, K] with zeros where a division by the scale could go wrong: the first 128-group of row 0 and,
    for R > 1, the whole last row (the reference gives those groups scale 1 and codes 0)."""
    x = torch.randn(R, K, generator=torch.Generator().manual_seed(seed)).to(dtype)
    x[0, :128] = 0.0
    if R > 1:
        x[-1] = 0.0
    return x.to(DEVICE)


@pytest.mark.parametrize("R,K", [(1, 128), (63, 300), (130, 256)], ids=["R1-K128", "R63-K300", "R130-K256"])
def test_quantize_act_exact(R, K, nan_empty):
    """Same e4m3 codes and scales as the torch reference (ties to even, zero groups scale 1)."""
    x = torch.randn(R, K, generator=torch.Generator().manual_seed(R)).bfloat16()
    x[0, :128] = 0.0
    # e4m3 subnormals and signed zeros (after scaling by 448/amax): -0 must stay -0 (code 0x80) as in torch
    x[-1, :8] = torch.tensor([-0.0, 0.0, -1e-6, 1e-6, -2e-3, 3e-3, -6e-3, 1e-2]) * x[-1].float().abs().max()
    x = x.to(DEVICE)  # compiled on the GPU under QWEN35_TRITON_GPU=1 (a CPU tensor failed the launch there)
    q, s = quantize_act(x)
    q_ref, s_ref = quantize_act_reference(x)
    assert_quant_match(q, s, q_ref, s_ref)


@pytest.mark.parametrize("shape,N,K", [
    pytest.param((1,), 256, 128, id="T1-N256-K128"),
    pytest.param((2, 33), 200, 384, id="B2-T33-N200-K384"),
    pytest.param((70,), 384, 300, id="T70-N384-K300"),
    pytest.param((130,), 128, 256, id="T130-N128-K256"),
])
def test_fp8_linear(shape, N, K, nan_empty):
    w, s = make_linear(N, K, seed=N + K, dev=DEVICE)
    x = torch.randn(*shape, K, generator=torch.Generator().manual_seed(K)).bfloat16().to(DEVICE)
    y = fp8_linear(x, w, s)
    assert y.shape == (*shape, N) and y.dtype == x.dtype
    ref = torch.ops.qwen35.fp8_linear(x.float(), w, s)
    # Same activation quantisation simulated: only the output's bf16 rounding remains.
    assert_close("fp8_linear vs simulated", y, fp8_linear_reference(x, w, s, quant_act=True), BF16_U)
    # The op contract (unquantised x): plus one e4m3 rounding of x (at most FP8_U relative).
    assert_close("fp8_linear vs qwen35::fp8_linear", y, ref, math.sqrt(FP8_U ** 2 + BF16_U ** 2))


@pytest.fixture
def fused_default(monkeypatch):
    """The fused small-R path as the default up to 16 rows (and the weight-only path, which precedes it, off).
    It is off in the shipped default (slower than the two-kernel path on the H200, gemm.FUSED_MAX_R); these
    tests keep it correct as the option it still is."""
    from qwen35_export.kernels.fp8_linear import gemm

    monkeypatch.setattr(gemm, "FUSED_MAX_R", 16)
    for name in ("WO_MAX_R", "SWAP_MAX_R", "SWAP_PREQUANT_MAX_R"):  # the paths that precede it
        monkeypatch.setattr(gemm, name, 0)


# Accumulation-only bound per output dtype: bf16 rounds the result once; fp32 sums in another order.
OUT_BOUND = {torch.bfloat16: BF16_U, torch.float32: FP32_BOUND}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("R,K,N", [pytest.param(R, K, N, id=f"R{R}-K{K}-N{N}")
                                   for R in (1, 2, 5, 16) for K in (128, 200, 384) for N in (16, 130, 256)])
def test_fused_default_vs_reference(R, K, N, dtype, nan_empty, fused_default):
    """The default path up to 16 rows is the fused one (per-row fp32 up to 8 rows, tensor cores beyond):
    with the activation quantisation simulated, only the output's rounding / fp32 order remains."""
    assert default_config(R, N, K)["FUSED"]
    w, s = make_linear(N, K, seed=N + K, dev=DEVICE)
    x = make_rows(R, K, dtype, seed=R + K)
    y = fp8_linear(x, w, s)
    assert y.shape == (R, N) and y.dtype == dtype
    assert_close(f"fused R={R} vs simulated", y, fp8_linear_reference(x, w, s, quant_act=True), OUT_BOUND[dtype])
    if R > 1:  # an all-zero row: scale 1, codes 0, output exactly 0 (no 0/0)
        assert torch.equal(y[-1], torch.zeros_like(y[-1]))


def fused(dot: bool, block_m: int, block_n: int, split_k: int = 1, hw_cvt: bool = False) -> dict:
    return dict(FUSED=True, DOT=dot, HW_CVT=hw_cvt, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split_k,
                num_warps=4, num_stages=2)


# The interpreter misrounds fp32 -> e4m3 casts (quant.round_e4m3), so the hardware-conversion variant is
# checked compiled only (QWEN35_TRITON_GPU=1).
compiled_only = pytest.mark.skipif(DEVICE == "cpu", reason="interpreter misrounds fp32 -> e4m3 casts")


@pytest.mark.parametrize("R", [1, 5, 16])
@pytest.mark.parametrize("cfg", [
    pytest.param(fused(True, 16, 32), id="dot-BN32"),
    pytest.param(fused(False, 2, 32), id="rows-BM2-BN32"),  # R = 5, 16: several row tiles, a partial one
    pytest.param(fused(False, 16, 64), id="rows-BM16-BN64"),
    pytest.param(fused(True, 16, 32, split_k=2), id="dot-BN32-split2"),  # K = 384: splits of 2 + 1 groups
    pytest.param(fused(False, 8, 16, split_k=5), id="rows-BM8-BN16-split5"),  # more splits than groups
    pytest.param(fused(False, 8, 16, hw_cvt=True), id="rows-BM8-BN16-hwcvt", marks=compiled_only),
    pytest.param(fused(True, 16, 32, hw_cvt=True), id="dot-BN32-hwcvt", marks=compiled_only),
])
def test_fused_equals_two_kernel(R, cfg, nan_empty):
    """Fused and two-kernel paths quantise x the same way, so in fp32 they differ by summation order
    only (one e4m3 code off would be ~1e-3 here); the tensor-core variant with the two-kernel path's tile
    does the same arithmetic, bit for bit under the interpreter."""
    K, N = 384, 130
    w, s = make_linear(N, K, seed=3, dev=DEVICE)
    x = make_rows(R, K, torch.float32, seed=R)
    y = fp8_linear_triton(x, w, s, cfg)
    two = dict(FUSED=False, **two_kernel_config(R, N))
    if cfg["DOT"]:
        two["BLOCK_N"] = cfg["BLOCK_N"]
    y2 = fp8_linear_triton(x, w, s, two)
    if cfg["DOT"] and cfg["SPLIT_K"] == 1 and not y.is_cuda:
        assert torch.equal(y, y2)
    assert_close(f"fused {cfg} vs two-kernel", y, y2, FP32_BOUND)


@pytest.mark.parametrize("R", [1, 5, 17])
@pytest.mark.parametrize("split,K", [(2, 384), (3, 640), (8, 384), (2, 200)])  # uneven, more splits than steps, K tail
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_two_kernel_split_k(R, split, K, dtype, nan_empty):
    """Split-K of the two-kernel GEMM: the same products summed per split in fp32, then the splits in order,
    so it equals the unsplit kernel up to fp32 summation order (bf16 output: one rounding of either sum)."""
    N = 130
    w, s = make_linear(N, K, seed=K + split, dev=DEVICE)
    x = make_rows(R, K, dtype, seed=R + 7)
    one = dict(FUSED=False, **two_kernel_config(R, N))
    y1 = fp8_linear_triton(x, w, s, one)
    ys = fp8_linear_triton(x, w, s, dict(one, SPLIT_K=split))
    assert ys.shape == (R, N) and ys.dtype == dtype
    assert_close(f"split {split} vs one split", ys, y1, OUT_BOUND[dtype])
    assert_close("split vs simulated reference", ys, fp8_linear_reference(x, w, s, quant_act=True), OUT_BOUND[dtype])


@pytest.mark.parametrize("fused_path", [True, False], ids=["fused", "two-kernel"])
def test_row_strided_x(fused_path, nan_empty, fused_default):
    """x a column slice of a wider tensor (a fused projection's output): rows strided, read in place."""
    R, K, N = 5, 200, 130
    w, s = make_linear(N, K, seed=1, dev=DEVICE)
    x = make_rows(R, K + 56, torch.bfloat16, seed=2)[:, 40:K + 40]
    cfg = default_config(R, N, K) if fused_path else dict(FUSED=False, **two_kernel_config(R, N))
    y = fp8_linear_triton(x, w, s, cfg)
    assert_close("row-strided x vs simulated", y, fp8_linear_reference(x, w, s, quant_act=True), BF16_U)


def wo(dot: bool, block_m: int, block_n: int, block_k: int = 128, split_k: int = 1) -> dict:
    return dict(WO=True, DOT=dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
                num_warps=4, num_stages=2)


# (id, config, row counts, dtypes): wo_config's (tensor cores on 16 or 64 rows, K split when the
# column tiles are few), per-row fp32 (several row tiles, a partial one; its unrolled rows are slow under the
# interpreter, so not at 64 rows), BLOCK_K 64 (two K steps per scale group, a split through a group), and more
# splits than K steps.
_BF16_FP32 = (torch.bfloat16, torch.float32)
WO_CASES = [pytest.param(cfg, R, dtype, id=f"{name}-R{R}-{str(dtype)[6:]}")
            for name, cfg, Rs, dtypes in [
                ("default", None, (1, 5, 17, 64), _BF16_FP32 + (torch.float16,)),
                ("rows-BM4-BN32", wo(False, 4, 32), (1, 5, 17), _BF16_FP32),
                ("dot-BK64-split3", wo(True, 16, 64, block_k=64, split_k=3), (1, 5, 17, 64), (torch.bfloat16,)),
                ("dot-BM32-split8", wo(True, 32, 16, split_k=8), (1, 5, 17, 64), (torch.bfloat16,))]
            for R in Rs for dtype in dtypes]


@pytest.mark.parametrize("K,N", [(128, 16), (200, 130), (640, 256), (1024, 16)],
                         ids=["K128-N16", "K200-N130", "K640-N256", "K1024-N16"])
@pytest.mark.parametrize("cfg,R,dtype", WO_CASES)
def test_weight_only_vs_reference(cfg, R, K, N, dtype, nan_empty):
    """The weight-only path multiplies x as given (the op contract: no activation quantisation) by the
    dequantised weight: e4m3 -> x's dtype is exact, so against the fp64 contract only the fp32 sums'
    order and the output's rounding remain (bf16: one rounding, BF16_U; fp16: 2^-11; fp32: FP32_BOUND; on the
    GPU each has its own dot: bf16 / fp16 operands, fp32 in IEEE precision). K = 200 has a tail
    (not a multiple of 128 or of BLOCK_K 64); K = 1024 over one column tile is where the default splits K;
    N = 130 leaves a tail in every BLOCK_N; R = 17 and 64 span several row tiles or the engine's 64-row one."""
    assert R <= WO_MAX_R
    cfg = cfg or wo_config(R, N, K)
    if (K, N) == (1024, 16) and cfg == wo_config(R, N, K):
        assert cfg["SPLIT_K"] > 1  # wo_config's own split, not only explicit ones
    w, s = make_linear(N, K, seed=N + K + 1, dev=DEVICE)
    x = make_rows(R, K, dtype, seed=R + K)
    y = fp8_linear_triton(x, w, s, cfg)
    assert y.shape == (R, N) and y.dtype == dtype
    assert_close(f"weight-only {cfg} vs reference", y, fp8_linear_reference(x, w, s),
                 {**OUT_BOUND, torch.float16: 2.0 ** -11}[dtype])
    if R > 1:  # an all-zero row gives exactly 0
        assert torch.equal(y[-1], torch.zeros_like(y[-1]))


def swap(block_n: int, block_t: int, split_k: int = 1, qx: bool = True, hw_cvt: bool = False) -> dict:
    return dict(SWAP=True, QX=qx, HW_CVT=hw_cvt, BLOCK_N=block_n, BLOCK_T=block_t, SPLIT_K=split_k, num_warps=4,
                num_stages=2)


# Compiled, the swapped path's weight tiles (64+ rows) run on Hopper's fp8 wgmma, which adds its products into an
# accumulator of ~14 significant bits rather than fp32 (DeepSeek-V3 report, sec. 3.3.2; it is why block-scaled
# FP8 GEMMs promote to fp32 at every 128-column group, as these kernels do): a 128-column group is four k32
# wgmma additions into that accumulator, ~2^-13 relative each, sqrt(4) * 2^-13 = 2^-12 in quadrature.
# bf16 / fp16 outputs round far coarser and do not see it; fp32 outputs get this bound (H200: 0.8-1.5e-4
# measured, bench/results/fp8_swap_h200/gpu_tests_call1.log). The interpreter multiplies in fp32 (FP32_BOUND).
FP8_MMA_BOUND = FP32_BOUND if DEVICE == "cpu" else 2.0 ** -12
SWAP_BOUND = {torch.bfloat16: BF16_U, torch.float16: 2.0 ** -11, torch.float32: FP8_MMA_BOUND}

# Swapped-operand w8a8 cases: the shipped tile (swap_config), a 16-column weight tile (N = 130: a tail in
# every tile width), x quantised by its own launch, K split unevenly / into more splits than 128-column
# steps, and the hardware e4m3 cast (compiled only, see compiled_only).
SWAP_CASES = [pytest.param(cfg, R, dtype, id=f"{name}-R{R}-{str(dtype)[6:]}")
              for name, cfg, Rs, dtypes in [
                  ("config", None, (1, 5, 17, 64), _BF16_FP32 + (torch.float16,)),
                  ("BN16-BT16", swap(16, 16), (1, 17), (torch.bfloat16,)),
                  ("BN64-BT32-prequant", swap(64, 32, qx=False), (1, 5, 64), _BF16_FP32),
                  ("BN32-BT16-split3", swap(32, 16, split_k=3), (1, 17), (torch.bfloat16,)),
                  ("BN64-BT64-split8", swap(64, 64, split_k=8), (5, 64), (torch.bfloat16,))]
              for R in Rs for dtype in dtypes] + [
    pytest.param(swap(64, 16, hw_cvt=True), R, torch.bfloat16, id=f"BN64-BT16-hwcvt-R{R}", marks=compiled_only)
    for R in (1, 17)]


@pytest.mark.parametrize("K,N", [(128, 16), (200, 130), (640, 256)], ids=["K128-N16", "K200-N130", "K640-N256"])
@pytest.mark.parametrize("cfg,R,dtype", SWAP_CASES)
def test_swap_vs_reference(cfg, R, K, N, dtype, nan_empty):
    """The swapped-operand path (weight tile on the MMA's M side, tokens on N) quantises x as quantize_act
    does, so against the simulated reference only the output's rounding / fp32 order remains, whichever
    side of the MMA the tokens sit on. R = 17 / 64 span several token tiles or the engine's 64-row one,
    K = 200 has a tail, N = 130 a column tail."""
    cfg = cfg or gemm.swap_config(R, N, K)
    w, s = make_linear(N, K, seed=N + K + 2, dev=DEVICE)
    x = make_rows(R, K, dtype, seed=R + K + 1)
    y = fp8_linear_triton(x, w, s, cfg)
    assert y.shape == (R, N) and y.dtype == dtype
    assert_close(f"swap {cfg} vs simulated", y, fp8_linear_reference(x, w, s, quant_act=True), SWAP_BOUND[dtype])
    if R > 1:  # an all-zero row: scale 1, codes 0, output exactly 0
        assert torch.equal(y[-1], torch.zeros_like(y[-1]))


@pytest.mark.parametrize("R", [1, 17])
def test_swap_equals_two_kernel(R, nan_empty):
    """Same quantised operands as the two-kernel path, multiplied with the operands' roles swapped: in fp32
    the two differ by summation order and, compiled, the wgmma accumulator's precision (FP8_MMA_BOUND; one
    e4m3 code off would be ~1e-3 here)."""
    K, N = 384, 130
    w, s = make_linear(N, K, seed=5, dev=DEVICE)
    x = make_rows(R, K, torch.float32, seed=R + 3)
    y = fp8_linear_triton(x, w, s, swap(64, 16, split_k=2))
    y2 = fp8_linear_triton(x, w, s, dict(FUSED=False, **two_kernel_config(R, N)))
    assert_close("swap vs two-kernel", y, y2, FP8_MMA_BOUND)


@pytest.mark.parametrize("qx", [True, False], ids=["qx", "prequant"])
def test_swap_row_strided_x(qx, nan_empty):
    """x a column slice of a wider tensor, read in place by the swapped path (and by quantize_act first)."""
    R, K, N = 5, 200, 130
    w, s = make_linear(N, K, seed=1, dev=DEVICE)
    x = make_rows(R, K + 56, torch.bfloat16, seed=2)[:, 40:K + 40]
    cfg = dict(swap(64, 16), QX=qx)
    y = fp8_linear_triton(x, w, s, cfg)
    assert torch.equal(y, fp8_linear_triton(x.contiguous(), w, s, cfg))
    assert_close("row-strided x vs simulated", y, fp8_linear_reference(x, w, s, quant_act=True), BF16_U)


@compiled_only
def test_hardware_cast_codes_match_reference():
    """The hardware fp32 -> e4m3 cast (HW_CVT, the 16-token swap default on the GPU) rounds to nearest even as
    the reference does: same codes and scales up to the GPU division's ulp (assert_quant_match)."""
    x = make_rows(64, 384, torch.bfloat16, seed=9)
    q, qs = quantize_act(x, hw_cvt=True)
    q_ref, qs_ref = quantize_act_reference(x)
    assert_quant_match(q, qs, q_ref, qs_ref)


def test_swap_config_and_rejects_small_tiles():
    """swap_config sizes the token tile for every R the graph admits and splits K for few columns; tiles
    below tl.dot's 16 are refused with the config named; SWAP_MAX_R makes it the default."""
    assert gemm.swap_config(1, 2048, 4096)["BLOCK_T"] == 16 and gemm.swap_config(64, 2048, 4096)["BLOCK_T"] == 64
    assert gemm.swap_config(1, 2048, 4096)["SPLIT_K"] == 8 and gemm.swap_config(1, 20480, 4096)["SPLIT_K"] < 8
    w, s = make_linear(16, 128, seed=0)
    with pytest.raises(ValueError, match="BLOCK_T >= 16"):
        fp8_linear_triton(torch.randn(1, 128), w, s, swap(16, 8))
    # the default: any width up to 16 rows, narrow GEMVs (N <= WO_MAX_N) up to 64, never past
    assert default_config(16, 12288, 2048).get("SWAP") and not default_config(17, 12288, 2048).get("SWAP")
    assert default_config(64, 2048, 4096).get("SWAP") and not default_config(65, 2048, 4096).get("SWAP")
    assert not default_config(64, 2048, 4096)["QX"] and default_config(16, 2048, 4096)["QX"]


def test_weight_only_row_strided_x(nan_empty):
    R, K, N = 5, 200, 130
    w, s = make_linear(N, K, seed=1, dev=DEVICE)
    x = make_rows(R, K + 56, torch.bfloat16, seed=2)[:, 40:K + 40]
    assert x.stride(0) != K
    cfg = wo_config(R, N, K)
    y = fp8_linear_triton(x, w, s, cfg)
    assert torch.equal(y, fp8_linear_triton(x.contiguous(), w, s, cfg))
    assert_close("row-strided x vs reference", y, fp8_linear_reference(x, w, s), BF16_U)


def test_weight_only_config_splits_few_columns():
    """A GEMV of few columns over a long K (out_proj) splits K so every SM streams; a wide one does not."""
    assert wo_config(1, 2048, 4096)["SPLIT_K"] > 1
    assert wo_config(1, 12288, 2048)["SPLIT_K"] == 1
    assert wo_config(1, 2048, 4096)["BLOCK_M"] == 16 and wo_config(64, 2048, 4096)["BLOCK_M"] == 64


def test_weight_only_rejects_dot_below_16_rows():
    w, s = make_linear(16, 128, seed=0)
    with pytest.raises(ValueError, match="BLOCK_M >= 16"):
        fp8_linear_triton(torch.randn(1, 128), w, s, wo(True, 8, 16))


def test_fused_rejects_dot_below_16_rows():
    w, s = make_linear(16, 128, seed=0)
    with pytest.raises(ValueError, match="BLOCK_M >= 16"):
        fp8_linear_triton(torch.randn(1, 128), w, s, fused(True, 8, 16))


def launched_kernels(monkeypatch, ep: torch.export.ExportedProgram) -> dict[str, dict]:
    """Kernel name -> launch keywords, for the launches the op's body makes when the exported program is
    lowered as AOTInductor lowers it (custom Triton ops decomposed, sizes as the graph admits them; the
    body may be traced more than once)."""
    launches = {}

    def record(kernel):
        name = getattr(kernel, "fn", kernel).__name__
        return _Grid(lambda *args, **kw: launches.setdefault(name, kw))

    monkeypatch.setattr(gemm, "wrap_triton", record)
    monkeypatch.setattr(quant, "wrap_triton", record)
    ep.run_decompositions(decompose_custom_triton_ops=True)
    return launches


class _Grid:
    def __init__(self, launch):
        self.launch = launch

    def __getitem__(self, grid):
        return self.launch


class _Lin(torch.nn.Module):
    def forward(self, x, w, s):
        return torch.ops.qwen35_triton.fp8_linear(x, w, s)


def test_export_static_one_row_launches_fused(monkeypatch, fused_default):
    w, s = make_linear(256, 128, seed=0)
    ep = torch.export.export(_Lin(), (torch.randn(1, 1, 128).bfloat16(), w, s))
    launches = launched_kernels(monkeypatch, ep)
    assert list(launches) == ["_fused_w8a8_gemm_kernel"], launches
    assert launches["_fused_w8a8_gemm_kernel"]["BLOCK_M"] == 1


def test_export_bounded_batch_launches_fused_without_guard(monkeypatch, fused_default):
    """A decode graph (batch Dim max 8, T = 1): R is symbolic and the fused kernel is sized for the 8 rows
    the graph admits, not for the example's 3 (a guarding `R <= 4` would pick BLOCK_M 4 and bake it in)."""
    w, s = make_linear(256, 128, seed=0)
    B = torch.export.Dim("B", min=1, max=8)
    ep = torch.export.export(_Lin(), (torch.randn(3, 1, 128).bfloat16(), w, s), dynamic_shapes=({0: B}, None, None))
    launches = launched_kernels(monkeypatch, ep)
    assert list(launches) == ["_fused_w8a8_gemm_kernel"], launches
    assert launches["_fused_w8a8_gemm_kernel"]["BLOCK_M"] == 8


def test_shipped_default_one_row_launches_swap(monkeypatch):
    """A one-row graph takes the swapped-operand kernel with a 16-token tile, x quantised inside it (no
    quantisation launch); the fused path stays off."""
    w, s = make_linear(256, 128, seed=0)
    ep = torch.export.export(_Lin(), (torch.randn(1, 1, 128).bfloat16(), w, s))
    launches = launched_kernels(monkeypatch, ep)
    assert list(launches) == ["_swap_w8a8_gemm_kernel"], launches
    assert launches["_swap_w8a8_gemm_kernel"]["BLOCK_T"] == 16 and launches["_swap_w8a8_gemm_kernel"]["QX"]


def test_export_unbounded_rows_dequantise(monkeypatch):
    """A prefill graph (rows may exceed DEQUANT_SYMBOLIC_MIN_BOUND) dequantises the weight and runs a dense
    GEMM: no Triton launch, an mm in the graph; a decode graph (rows up to max_batch) keeps the w8a8 kernels."""
    w, s = make_linear(256, 128, seed=0)
    T = torch.export.Dim("T", min=1, max=8256)  # a prefill graph's flattened rows (batch 1 x 8256 tokens)
    ep = torch.export.export(_Lin(), (torch.randn(40, 128).bfloat16(), w, s), dynamic_shapes=({0: T}, None, None))
    launches = launched_kernels(monkeypatch, ep)
    assert launches == {}, launches
    ep = torch.export.export(_Lin(), (torch.randn(40, 128).bfloat16(), w, s), dynamic_shapes=({0: T}, None, None))
    targets = [str(n.target) for n in ep.run_decompositions(decompose_custom_triton_ops=True).graph.nodes]
    assert any("mm" in t for t in targets), targets
    # decode graphs: up to SWAP_PREQUANT_MAX_R rows (a narrow GEMV) the swapped-operand kernel with its token
    # tile sized for the graph's max (not the example's 40 rows: no guard) after a quantisation launch, past
    # it quantise + GEMM
    for max_batch, want in ((64, ["_act_quant_kernel", "_swap_w8a8_gemm_kernel"]),
                            (512, ["_act_quant_kernel", "_w8a8_gemm_kernel"])):
        B = torch.export.Dim("B", min=1, max=max_batch)
        ep = torch.export.export(_Lin(), (torch.randn(40, 128).bfloat16(), w, s), dynamic_shapes=({0: B}, None, None))
        launches = launched_kernels(monkeypatch, ep)
        assert list(launches) == want, (max_batch, launches)
        if max_batch == 64:
            assert launches["_swap_w8a8_gemm_kernel"]["BLOCK_T"] == 64


@pytest.mark.parametrize("R,N,K", [(256, 200, 384), (300, 384, 300), (513, 128, 256)])
def test_dequant_path_many_rows(R, N, K):
    """From DEQUANT_MIN_R rows on: x unquantised times the weight rounded to x's dtype. Bound: the weight's
    bf16 rounding (<= BF16_U relative per element, independent across K, so <= BF16_U relative RMS on the
    output) plus the output's own rounding (BF16_U)."""
    from qwen35_export.kernels.fp8_linear.gemm import DEQUANT_MIN_R, default_config

    assert default_config(R, N, K) == {"DEQUANT": True} and R >= DEQUANT_MIN_R
    assert "DEQUANT" not in default_config(DEQUANT_MIN_R - 1, N, K)
    w, s = make_linear(N, K, seed=R)
    x = torch.randn(R, K, generator=torch.Generator().manual_seed(R)).bfloat16()
    y = fp8_linear(x, w, s)
    assert y.shape == (R, N) and y.dtype == x.dtype
    assert_close("fp8_linear dequant vs qwen35::fp8_linear", y, torch.ops.qwen35.fp8_linear(x.float(), w, s),
                 2 * BF16_U)


@pytest.mark.parametrize("R,K,pad", [(1, 128, 4), (5, 300, 4), (37, 256, 8), (16, 384, 1)])
def test_quantize_act_padded_column_scales(R, K, pad):
    """The layout cuBLASLt's block-scaled GEMM reads: rows padded to a multiple of `pad` (quantised from
    zeros: codes 0, scale 1) and the scales column-major; the real rows' codes and scales as the reference's."""
    x = torch.randn(R, K, generator=torch.Generator().manual_seed(R + K)).bfloat16().to(DEVICE)
    q, s = quantize_act(x, pad_rows=pad, scales_by_column=True)
    Rp = -(-R // pad) * pad
    G = -(-K // 128)
    assert q.shape == (Rp, K) and s.shape == (Rp, G) and s.stride() == (1, Rp)
    q_ref, s_ref = quantize_act_reference(x)
    assert_quant_match(q[:R], s[:R].contiguous(), q_ref, s_ref)
    assert (q[R:].view(torch.uint8) == 0).all() and (s[R:] == 1).all()


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and gemm.scaled_mm_supported(256, 512, torch.device("cuda"))),
                    reason="cuBLASLt's block-scaled FP8 GEMM needs an sm_90 GPU")
@pytest.mark.parametrize("R,N,K", [(1, 256, 512), (3, 384, 1024), (300, 128, 2048), (513, 2048, 512)])
def test_scaled_mm_path(R, N, K):
    """SCALED_MM (the sm_90 prefill default): x quantised per token per 128 and torch._scaled_mm with the
    checkpoint's scales, rows not a multiple of the 4 it pads to. Against the quantisation-simulated
    reference in fp32: what is left is the bf16 output rounding (BF16_U) and cuBLASLt's fp32 accumulation."""
    w, s = make_linear(N, K, seed=R, dev="cuda")
    x = torch.randn(R, K, device="cuda").bfloat16()
    y = fp8_linear_triton(x, w, s, dict(SCALED_MM=True))
    assert y.shape == (R, N) and y.dtype == x.dtype
    assert_close("scaled_mm vs simulated", y, fp8_linear_reference(x, w, s, quant_act=True, dtype=torch.float32),
                 BF16_U)
    assert default_config(8192, N, K, x.device) == {"SCALED_MM": True}


def test_fp8_linear_traces_under_export():
    w, s = make_linear(256, 128, seed=0)
    ep = torch.export.export(_Lin(), (torch.randn(3, 128).bfloat16(), w, s))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("qwen35_triton.fp8_linear.default") == 1, targets


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("R", [1, 16, 4096])
def test_fp8_linear_real_size_cuda(R):
    w, s = make_linear(16384, 4096, seed=0, dev="cuda")  # q_proj-sized at 397B geometry
    x = torch.randn(R, 4096, device="cuda").bfloat16()
    q, qs = quantize_act(x)
    q_ref, qs_ref = quantize_act_reference(x)
    assert_quant_match(q, qs, q_ref, qs_ref)
    y = fp8_linear(x, w, s)
    sim = fp8_linear_reference(x, w, s, quant_act=True, dtype=torch.float32)
    if R >= 256:
        if gemm.scaled_mm_supported(w.shape[0], 4096, x.device):  # cuBLASLt's block-scaled GEMM, x quantised
            assert_close("fp8_linear scaled_mm vs simulated", y, sim, BF16_U)
        else:  # dequantised weight, unquantised x (test_dequant_path_many_rows has the bound)
            assert_close("fp8_linear dequant vs op", y, torch.ops.qwen35.fp8_linear(x.float(), w, s), 2 * BF16_U)
        y = fp8_linear_triton(x, w, s, dict(FUSED=False, **two_kernel_config(R, w.shape[0])))
    assert_close("fp8_linear vs simulated", y, sim, BF16_U)
    if R <= 16:  # swap tiles: an engine's 64-row decode graph's, with x quantised in or before the kernel,
        # and the 16-token tile with the software rounding
        for cfg in (swap_config(64, w.shape[0], 4096), dict(swap_config(64, w.shape[0], 4096), QX=True),
                    dict(swap_config(R, w.shape[0], 4096), HW_CVT=False)):
            assert_close(f"{cfg} vs simulated", fp8_linear_triton(x, w, s, cfg), sim, BF16_U)
    if R <= 16:  # the weight-only tiles (off by default) against the contract (x unquantised)
        N = w.shape[0]
        op = torch.ops.qwen35.fp8_linear(x.float(), w, s)
        for cfg in (wo_config(R, N, 4096), wo_config(64, N, 4096), dict(wo_config(R, N, 4096), SPLIT_K=4),
                    dict(wo_config(R, N, 4096), DOT=False, BLOCK_M=R)):
            assert_close(f"{cfg} vs op", fp8_linear_triton(x, w, s, cfg), op, BF16_U)
    if R <= 16:  # the fused variants (off by default) and the two-kernel tiles
        for cfg in (dict(FUSED=False, **two_kernel_config(R, N)), dict(fused_config(R, N), SPLIT_K=4),
                    dict(fused_config(R, N), HW_CVT=True), fused(True, 16, 64)):
            assert_close(f"{cfg} vs simulated", fp8_linear_triton(x, w, s, cfg), sim, BF16_U)
