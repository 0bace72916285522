"""MoE kernels against the fp64 loop reference: router (ties included), tile map, BF16 and FP8 experts.

Runs on CPU through Triton's interpreter (conftest.py), or compiled on the GPU with QWEN35_TRITON_GPU=1 (inputs
made on the kernels' device, DEVICE); the real-size cases need CUDA. Comparisons go
through the kernel tests' one helper (gdn_compare.assert_close: relative RMS bound, NaN fails, max abs
reported); the bounds are derived from the roundings each path makes (see `bf16_bound`, `FP8_U`).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from qwen35_export.checkpoint.fp8 import quantize_fp8_block
from qwen35_export.kernels.moe import (DECODE_MAX_TOKENS, align_block_size, moe_experts, moe_experts_fp8,
                                       moe_experts_fp8_reference, moe_experts_reference, moe_experts_triton,
                                       moe_router, moe_router_reference)
import qwen35_export.model.ops  # noqa: F401  (registers the qwen35:: reference ops)
from gdn_compare import DEVICE, assert_close  # the kernel tests' one comparison helper
from qwen35_export.kernels.moe import align
from qwen35_export.kernels.moe.configs import get_config

BF16_U = 2.0 ** -8  # unit roundoff of bf16 (8 significant bits): one RNE rounding errs by at most this, relative
FP8_U = 2.0 ** -4  # unit roundoff of e4m3 (4 significant bits)
FP32_BOUND = 1e-5  # fp32 math in another order (exp, sums): ~100 ulps of fp32 is already generous
# Compiled, an fp8 tl.dot on Hopper (wgmma) accumulates its products with ~14 significant bits (DeepSeek-V3
# report, sec. 3.3.2), so the kernels' fp32 h differs from the reference's by ~2^-13 relative; where that moves
# h across an e4m3 rounding midpoint (probability ~2^-13 / s for the e4m3 spacing s <= 2^-3) the quantised h is
# one step s off: an RMS term sqrt(2^-13 * 2^-3) = 2^-8, one more bf16-sized rounding against the
# quantisation-simulated reference (an order-of-magnitude estimate, applied to the decode checks: one token
# at 397B failed bf16_bound(2) once on the H200, with random x; prefill checks, averaging over thousands of
# tokens, passed at bf16_bound(2) there and keep it). The interpreter accumulates in fp32: no term on CPU.
SIM_BOUND = math.sqrt(2 + (0 if DEVICE == "cpu" else 1)) * 2.0 ** -8


def bf16_bound(roundings: int) -> float:
    """Independent roundings add in quadrature; each is at most u relative (its RMS is ~u/sqrt(3))."""
    return math.sqrt(roundings) * BF16_U


@pytest.fixture
def nan_empty(monkeypatch):
    """Fresh float buffers (torch.empty / empty_like) come filled with NaN, so unwritten outputs fail."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


def make_experts(E: int, H: int, I: int, seed: int, dev: str = DEVICE):
    """BF16 expert weights scaled so activations stay O(1), and their block-quantised e4m3 form."""
    g = torch.Generator(device=dev).manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=g, device=dev) * H ** -0.5).bfloat16()  # [E, 2I, H]
    w2 = (torch.randn(E, H, I, generator=g, device=dev) * I ** -0.5).bfloat16()  # [E, H, I]
    # In chunks of experts: quantising all 512 real-size experts at once would need ~50 GB of fp32 temporaries.
    q13, s13 = (torch.cat(t) for t in zip(*(quantize_fp8_block(c) for c in w13.split(64))))
    q2, s2 = (torch.cat(t) for t in zip(*(quantize_fp8_block(c) for c in w2.split(64))))
    return w13, w2, q13, s13, q2, s2


def make_x(N: int, H: int, seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Activations [N, H] drawn on the CPU (same values wherever the test runs), on the kernels' device."""
    return torch.randn(N, H, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def make_routing(N: int, E: int, k: int, seed: int, pin: int | None = None, dev: str = DEVICE):
    """x [N, H-free], routing (weights, ids) from random logits; `pin` sends every token's slot 0 to it."""
    g = torch.Generator(device=dev).manual_seed(seed)
    logits = torch.randn(N, E, generator=g, device=dev)
    if pin is not None:
        logits[:, pin] = 50.0
    return moe_router_reference(logits, k)


# -- router ----------------------------------------------------------------------------------------
def lowest_index_topk(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k ids with ties broken towards the lower expert index (the kernel's rule)."""
    return torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]


@pytest.mark.parametrize("N,E,k,dtype", [
    pytest.param(1, 512, 10, torch.float32, id="T1-E512-k10"),
    pytest.param(37, 512, 10, torch.bfloat16, id="T37-E512-k10-bf16"),
    pytest.param(9, 8, 1, torch.float32, id="T9-E8-k1"),
    pytest.param(5, 200, 8, torch.float32, id="T5-E200-k8"),
])
def test_router_matches_topk(N, E, k, dtype, nan_empty):
    logits = torch.randn(N, E, generator=torch.Generator().manual_seed(N * E + k)).to(dtype).to(DEVICE)
    w, ids = moe_router(logits, k)
    w_ref, ids_ref = moe_router_reference(logits, k)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    # bf16 logits tie often; the kernel's picks follow the lowest-index rule exactly ...
    probs = torch.softmax(logits.float(), dim=-1)
    assert torch.equal(ids, lowest_index_topk(probs, k))
    # ... and carry torch.topk's values (any tie order gives the same values).
    assert_close("router weights", w, w_ref, FP32_BOUND)
    assert_close("router weights sum", w.sum(-1), torch.ones(N), FP32_BOUND)
    picked = torch.gather(probs, 1, ids)  # [N, k]
    assert_close("weights belong to the picked ids", w, picked / picked.sum(-1, keepdim=True), FP32_BOUND)


def test_router_ties(nan_empty):
    E, k = 64, 10
    logits = torch.randn(4, E, generator=torch.Generator().manual_seed(3))
    logits[0] = 0.0  # every expert ties: picks 0..9
    logits[1, 20:35] = 9.0  # 15 tied maxima across the top-k boundary: picks 20..29
    logits[2, [50, 7, 33]] = 9.0  # ties inside the top-k: all three, lowest index first
    logits[3, [60, 61]] = 9.0  # one tie pair, then distinct values
    w, ids = moe_router(logits.to(DEVICE), k)
    assert ids[0].tolist() == list(range(10))
    assert ids[1].tolist() == list(range(20, 30))
    assert ids[2, :3].tolist() == [7, 33, 50] and ids[3, :2].tolist() == [60, 61]
    w_ref, ids_ref = moe_router_reference(logits, k)
    assert_close("tied router weights", w, w_ref, FP32_BOUND)
    for r in (2, 3):  # no tie straddles the boundary here: the same set as torch.topk
        assert set(ids[r].tolist()) == set(ids_ref[r].tolist())
    assert torch.equal(ids.cpu(), lowest_index_topk(torch.softmax(logits, -1), k).cpu())


# -- tile map --------------------------------------------------------------------------------------
@pytest.mark.parametrize("E,large", [(8, True), (257, True), (320, True), (321, False), (513, False)])
def test_align_large_path_by_expert_count(E, large, monkeypatch):
    """Past SMALL_M slots the default (LARGE_TRITON None) takes the Triton kernels up to LARGE_TRITON_MAX_E
    experts and the torch ops above (align_h200: the kernels lose at 513 experts from 8K tokens)."""
    calls = []
    monkeypatch.setattr(align, "SMALL_M", 0)
    monkeypatch.setattr(align, "_align_large", lambda *a: calls.append(1) or (None, None, None))
    _, ids = make_routing(5, E, 2, seed=E)
    align_block_size(ids.to(DEVICE), E, 16)
    assert bool(calls) == large


@pytest.mark.parametrize("N,E,k,bm", [(1, 512, 10, 16), (65, 8, 2, 16), (40, 4, 3, 64), (7, 16, 1, 32),
                                    (6, 257, 11, 16)])  # M = 66: just past the small branch
def test_align_tile_map(N, E, k, bm, monkeypatch):
    _, ids = make_routing(N, E, k, seed=N + E, pin=1 if E == 4 else None)
    ids = ids.to(DEVICE)  # compiled on the GPU under QWEN35_TRITON_GPU=1
    slots, tile_e, num_padded = align_block_size(ids, E, bm)  # the one-program Triton path (small M)
    # the same kernel sized for a graph's largest M (its small-M branch when M <= ALIGN_SMALL_BLOCK)
    sized = align_block_size(ids, E, bm, m_max=1000)
    monkeypatch.setattr(align, "SMALL_M", 0)
    monkeypatch.setattr(align, "LARGE_TRITON", False)
    want_all = align_block_size(ids, E, bm)  # the torch-ops path
    monkeypatch.setattr(align, "LARGE_TRITON", True)
    monkeypatch.setattr(align, "LARGE_BLOCK", 32)  # several blocks, the last one partial
    large = align_block_size(ids, E, bm)
    for got, want, big, lg in zip((slots, tile_e, num_padded), want_all, sized, large):
        assert torch.equal(got, want), "the two tile-map paths disagree"
        assert torch.equal(big, want), "the kernel sized for 1000 slots disagrees"
        assert torch.equal(lg, want), "the large-M kernels disagree with the torch path"
    M = N * k
    n_pad = int(num_padded)
    assert n_pad % bm == 0 and slots.shape[0] % bm == 0 and n_pad <= slots.shape[0]
    used = slots[:n_pad]
    real = used[used < M].long()
    assert sorted(real.tolist()) == list(range(M)), "every slot exactly once"
    assert (slots[n_pad:] == M).all(), "nothing past num_padded"
    flat = ids.reshape(-1)
    for t in range(n_pad // bm):
        tile = used[t * bm:(t + 1) * bm].long()
        tile = tile[tile < M]
        assert len(tile) > 0 and (flat[tile] == tile_e[t]).all(), f"tile {t} mixes experts or is empty"
        assert torch.equal(tile, tile.sort().values), "slots keep their order inside an expert"
    assert (tile_e[n_pad // bm:] == E).all()


# -- experts ---------------------------------------------------------------------------------------
# (N, E, k, H, I, pin): T=1 decode, T=65 just past decode and not a tile multiple, one expert taking every
# token (pin), E=512 with most experts empty, k=1 and k=10.
EXPERT_CASES = [
    pytest.param(1, 16, 2, 128, 128, None, id="T1-E16-k2"),
    pytest.param(9, 8, 1, 256, 128, None, id="T9-E8-k1"),
    pytest.param(3, 512, 10, 128, 128, None, id="T3-E512-k10"),
    pytest.param(65, 8, 2, 128, 256, None, id="T65-E8-k2-prefill"),
    pytest.param(40, 4, 3, 192, 128, 2, id="T40-E4-k3-one-expert-all"),
    pytest.param(100, 32, 10, 128, 128, 5, id="T100-E32-k10-prefill-one-expert-all"),
]


@pytest.mark.parametrize("N,E,k,H,I,pin", EXPERT_CASES)
def test_experts_bf16(N, E, k, H, I, pin, nan_empty):
    w13, w2, *_ = make_experts(E, H, I, seed=E + H)
    w, ids = make_routing(N, E, k, seed=N, pin=pin)
    x = make_x(N, H, seed=7)
    out = moe_experts(x, w, ids, w13, w2)
    assert out.dtype == x.dtype
    # Three bf16 roundings: h, each weighted slot row, the output.
    assert_close("bf16 experts", out, moe_experts_reference(x, w, ids, w13, w2), bf16_bound(3))


@pytest.mark.parametrize("N", [3, 70], ids=["decode", "prefill"])
def test_experts_unmasked_k_loads_bit_identical(N, monkeypatch, nan_empty):
    """Without a K tail the BF16 kernels drop the K mask from their loads (experts.EVEN_K_LOADS): same loads,
    same products, so the output equals the always-masked kernels' bit for bit. FP8 weights stay masked."""
    from qwen35_export.kernels.moe import experts

    E, H, I, k = 8, 256, 128, 2
    w13, w2, *_ = make_experts(E, H, I, seed=5)
    w, ids = make_routing(N, E, k, seed=6)
    x = make_x(N, H, seed=8)
    launched = []  # the EVEN_K each launch got (None: a kernel without it, the combine)
    real_wrap = experts.wrap_triton

    def spy(kernel):
        launch = real_wrap(kernel)

        class Grid:
            def __getitem__(self, grid):
                def call(*args, **kw):
                    launched.append(kw.get("EVEN_K"))
                    return launch[grid](*args, **kw)
                return call
        return Grid()

    def run():
        launched.clear()
        return moe_experts(x, w, ids, w13, w2)

    monkeypatch.setattr(experts, "wrap_triton", spy)
    unmasked = run()
    assert [e for e in launched if e is not None] == [True, True], launched  # gate_up and down, as launched
    monkeypatch.setattr(experts, "EVEN_K_LOADS", False)
    assert torch.equal(unmasked, run())
    assert [e for e in launched if e is not None] == [False, False], launched
    assert not experts.even_k(H, 128, fp8_weights=True) and not experts.even_k(192, 128)  # FP8, a K tail


# Compiled, tl.dot on fp32 operands runs on the tensor cores in TF32 (10 explicit mantissa bits, unit roundoff
# 2^-11; the kernels' documented fp32 behaviour on the GPU). Per GEMM both operands are rounded: <= sqrt(2) u
# relative RMS on its output; h = silu(gate) * up carries gate's and up's (2 u), the down GEMM adds its own
# (sqrt(2) u): sqrt(4 + 2) u ~ 2.5 u of the MoE output, bounded here by 4 u. Under the interpreter the dots are
# exact fp32: only summation order differs (FP32_BOUND).
TF32_U = 2.0 ** -11
FP32_DOT_BOUND = FP32_BOUND if DEVICE == "cpu" else 4 * TF32_U


def test_experts_match_reference_op(nan_empty):
    """Same semantics as the op the graph pass swaps out (fp32 inputs: only summation order differs on CPU;
    TF32 products on the GPU, FP32_DOT_BOUND)."""
    E, H, I, N, k = 8, 128, 128, 70, 2
    w13, w2, q13, s13, q2, s2 = make_experts(E, H, I, seed=1)
    w, ids = make_routing(N, E, k, seed=2)
    x = make_x(N, H, seed=3, dtype=torch.float32)
    ref = torch.ops.qwen35.moe_experts(x, w, ids, w13.float(), w2.float())
    out = moe_experts(x, w, ids, w13.float(), w2.float())
    assert_close("vs qwen35::moe_experts", out, ref, FP32_DOT_BOUND)


@pytest.mark.parametrize("N,E,k,H,I,pin", EXPERT_CASES)
def test_experts_fp8(N, E, k, H, I, pin, nan_empty):
    _, _, q13, s13, q2, s2 = make_experts(E, H, I, seed=E + H)
    w, ids = make_routing(N, E, k, seed=N, pin=pin)
    x = make_x(N, H, seed=7)
    out = moe_experts_fp8(x, w, ids, q13, s13, q2, s2)
    ref = moe_experts_fp8_reference(x, w, ids, q13, s13, q2, s2)
    if N <= DECODE_MAX_TOKENS:
        # Decode keeps activations in bf16: only the three bf16 roundings of the BF16 path.
        assert_close("fp8 decode vs dequantised reference", out, ref, bf16_bound(3))
    else:
        # Prefill rounds x and h to e4m3 (each at most FP8_U relative), then y and out to bf16.
        bound = math.sqrt(2 * FP8_U ** 2 + 2 * BF16_U ** 2)
        assert_close("fp8 prefill vs dequantised reference", out, ref, bound)
        # With the same activation quantisation simulated, only the two bf16 roundings remain.
        sim = moe_experts_fp8_reference(x, w, ids, q13, s13, q2, s2, quant_act=True)
        assert_close("fp8 prefill vs quantisation-simulated reference", out, sim, bf16_bound(2))


def swap_cfg(gate_bn: int = 64, down_bn: int = 64, qx: int = 1, out_fp8: int = 0, hw_cvt: int = 0,
             split: int = 1) -> dict:
    """A decode config of the swapped-operand FP8 kernels (experts.py `_gate_up_swap_kernel`)."""
    tile = dict(BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=2)
    return {"BLOCK_M": 16, "SWAP": 1, "HW_CVT": hw_cvt,
            "gate_up": dict(tile, BLOCK_N=gate_bn, QX=qx, OUT_FP8=out_fp8, SPLIT_K=split),
            "down": dict(tile, BLOCK_N=down_bn)}


# Decode token counts with awkward routing (one expert taking every token over several 16-slot tiles, k = 1,
# E = 512), H 200 for a K tail in gate_up; configs: x and h quantised in the kernels (h through fp32), h
# quantised in gate_up's epilogue (OUT_FP8), x by its own launch, narrow / wide tiles, gate_up split over H
# (partial sums summed and put through the SiLU in down; split 3 of H's two 128-column groups leaves one split
# empty), the hardware cast (compiled only: the interpreter misrounds it).
_compiled_only = pytest.mark.skipif(DEVICE == "cpu", reason="interpreter misrounds fp32 -> e4m3 casts")
SWAP_CASES = [pytest.param(N, E, k, H, pin, cfg, id=f"T{N}-E{E}-k{k}-H{H}-{name}", marks=marks)
              for N, E, k, H, pin in [(1, 16, 2, 256, None), (9, 8, 1, 200, None), (3, 512, 10, 128, None),
                                      (40, 4, 3, 256, 2)]
              for name, cfg, marks in [("qx", swap_cfg(), ()), ("outfp8", swap_cfg(128, 32, out_fp8=1), ()),
                                       ("prequant", swap_cfg(16, 128, qx=0), ()),
                                       ("split2", swap_cfg(64, 128, split=2), ()),
                                       ("split3-prequant", swap_cfg(32, 64, qx=0, split=3), ()),
                                       ("hwcvt", swap_cfg(128, 64, out_fp8=1, hw_cvt=1), _compiled_only)]]


@pytest.mark.parametrize("N,E,k,H,pin,cfg", SWAP_CASES)
def test_experts_fp8_swap(N, E, k, H, pin, cfg, nan_empty):
    """The swapped-operand decode kernels quantise x and h per token per 128 columns as the prefill kernels
    do (h from fp32 either way): against the quantisation-simulated reference only the two bf16 roundings
    (slot rows, output) remain; against the dequantised one the two e4m3 roundings add. PAIRS mode gives
    the align path's output bit for bit (same slots per tile, same order)."""
    I = 256
    _, _, q13, s13, q2, s2 = make_experts(E, H, I, seed=E + H + 1)
    w, ids = make_routing(N, E, k, seed=N + 1, pin=pin)
    x = make_x(N, H, seed=11)
    out = moe_experts_triton(x, w, ids, q13, q2, s13, s2, config=cfg, decode=True, pairs=False)
    sim = moe_experts_fp8_reference(x, w, ids, q13, s13, q2, s2, quant_act=True)
    assert_close("fp8 swap vs quantisation-simulated reference", out, sim, SIM_BOUND)
    ref = moe_experts_fp8_reference(x, w, ids, q13, s13, q2, s2)
    assert_close("fp8 swap vs dequantised reference", out, ref, math.sqrt(2 * FP8_U ** 2 + 2 * BF16_U ** 2))
    if N * k <= 64:
        pairs = moe_experts_triton(x, w, ids, q13, q2, s13, s2, config=cfg, decode=True, pairs=True)
        assert torch.equal(pairs, out), "PAIRS and align paths differ"


def test_experts_swap_rejects_bad_configs():
    """SWAP is the FP8 decode path; OUT_FP8 needs one 128-column scale group per program."""
    E, H, I, N, k = 4, 128, 128, 2, 2
    w13, w2, q13, s13, q2, s2 = make_experts(E, H, I, seed=0)
    w, ids = make_routing(N, E, k, seed=0)
    x = make_x(N, H, seed=0)
    with pytest.raises(ValueError, match="FP8 decode path"):
        moe_experts_triton(x, w, ids, w13, w2, config=swap_cfg(), decode=True)
    with pytest.raises(ValueError, match="FP8 decode path"):
        moe_experts_triton(x, w, ids, q13, q2, s13, s2, config=swap_cfg(), decode=False)
    with pytest.raises(ValueError, match="BLOCK_N must be 128"):
        moe_experts_triton(x, w, ids, q13, q2, s13, s2, config=swap_cfg(64, 64, out_fp8=1), decode=True)
    with pytest.raises(ValueError, match="OUT_FP8 cannot be on"):
        moe_experts_triton(x, w, ids, q13, q2, s13, s2, config=swap_cfg(128, 64, out_fp8=1, split=2), decode=True)


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_experts_fp8_regimes_agree_with_op(decode, nan_empty):
    """Either regime on the same 20 tokens against `qwen35::moe_experts_fp8` itself."""
    E, H, I, N, k = 16, 256, 128, 20, 4
    _, _, q13, s13, q2, s2 = make_experts(E, H, I, seed=4)
    w, ids = make_routing(N, E, k, seed=5)
    x = make_x(N, H, seed=6)
    ref = torch.ops.qwen35.moe_experts_fp8(x.float(), w, ids, q13, s13, q2, s2)
    out = moe_experts_triton(x, w, ids, q13, q2, s13, s2, decode=decode)
    bound = bf16_bound(3) if decode else math.sqrt(2 * FP8_U ** 2 + 2 * BF16_U ** 2)
    assert_close(f"fp8 {'decode' if decode else 'prefill'} vs qwen35::moe_experts_fp8", out, ref, bound)


# -- export ----------------------------------------------------------------------------------------
def test_ops_trace_under_export():
    """One node per op, a dynamic token count, and the exported program runs at another size (the other
    regime) with the eager result."""
    class MoE(torch.nn.Module):
        def forward(self, x, logits, w13, w2, q13, s13, q2, s2):
            w, ids = torch.ops.qwen35_triton.moe_router(logits, 2)
            y = torch.ops.qwen35_triton.moe_experts(x, w, ids, w13, w2)
            return y + torch.ops.qwen35_triton.moe_experts_fp8(x, w, ids, q13, s13, q2, s2)

    E, H, I = 8, 128, 128
    weights = make_experts(E, H, I, seed=0)
    n = torch.export.Dim("N", min=2, max=4096)
    args = (torch.randn(4, H).bfloat16().to(DEVICE), torch.randn(4, E).to(DEVICE), *weights)
    ep = torch.export.export(MoE(), args, dynamic_shapes=({0: n}, {0: n}) + (None,) * 6)
    targets = [str(node.target) for node in ep.graph.nodes if node.op == "call_function"]
    for op in ("moe_router", "moe_experts", "moe_experts_fp8"):
        assert sum(t == f"qwen35_triton.{op}.default" for t in targets) == 1, (op, targets)
    args2 = (torch.randn(DECODE_MAX_TOKENS + 6, H).bfloat16().to(DEVICE), torch.randn(DECODE_MAX_TOKENS + 6, E).to(DEVICE),
             *weights)
    assert torch.equal(ep.module()(*args2), MoE()(*args2))


# -- real size (device) ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_experts():
    """397B geometry: E 512, H 4096, I 1024 (13 GB of bf16 weights, made once)."""
    return make_experts(512, 4096, 1024, seed=0, dev="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N", [1, 8, 64, 300, 2048])
def test_real_size_cuda(N, real_experts):
    E, H, I, k, dev = 512, 4096, 1024, 10, "cuda"
    w13, w2, q13, s13, q2, s2 = real_experts
    logits = torch.randn(N, E, device=dev, generator=torch.Generator(device=dev).manual_seed(N))
    w, ids = moe_router(logits, k)
    w_ref, _ = moe_router_reference(logits, k)
    assert torch.equal(ids.cpu(), lowest_index_topk(torch.softmax(logits, -1), k).cpu())
    assert_close("router weights", w, w_ref, FP32_BOUND)
    x = torch.randn(N, H, device=dev, generator=torch.Generator(device=dev).manual_seed(N + 1)).bfloat16()
    ref = moe_experts_reference(x, w, ids, w13, w2, dtype=torch.float32)
    assert_close("bf16 experts", moe_experts(x, w, ids, w13, w2), ref, bf16_bound(3))
    ref8 = moe_experts_fp8_reference(x, w, ids, q13, s13, q2, s2, dtype=torch.float32)
    out8 = moe_experts_fp8(x, w, ids, q13, s13, q2, s2)
    # Activations go through e4m3 at prefill and, with the stored swapped-operand decode tiles, at decode too.
    quantised = N > DECODE_MAX_TOKENS or get_config(E, I, N, x.device, "fp8", k, True).get("SWAP")
    bound = math.sqrt(2 * FP8_U ** 2 + 2 * BF16_U ** 2) if quantised else bf16_bound(3)
    assert_close("fp8 experts", out8, ref8, bound)
    if quantised:
        sim = moe_experts_fp8_reference(x, w, ids, q13, s13, q2, s2, dtype=torch.float32, quant_act=True)
        assert_close("fp8 experts vs quantisation-simulated reference", out8, sim,
                     SIM_BOUND if N <= DECODE_MAX_TOKENS else bf16_bound(2))
    if N <= DECODE_MAX_TOKENS:  # PAIRS mode compiled (the default up to PAIRS_MAX_TOKENS) = the align path
        for args in ((w13, w2), (q13, q2, s13, s2)):
            pairs = moe_experts_triton(x, w, ids, *args, pairs=True)
            assert torch.equal(pairs, moe_experts_triton(x, w, ids, *args, pairs=False)), "PAIRS vs align"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_router_ties_match_cuda_topk():
    logits = torch.zeros(3, 512, device="cuda")
    logits[1, 100:130] = 4.0
    logits[2, [400, 3, 200]] = 4.0
    _, ids = moe_router(logits, 10)
    _, ids_ref = torch.topk(torch.softmax(logits, -1), 10)
    assert torch.equal(ids.sort(-1).values, ids_ref.sort(-1).values), (ids, ids_ref)


@pytest.mark.parametrize("fp8,decode", [(False, False), (True, False), (True, True)],
                         ids=["bf16", "fp8-prefill", "fp8-decode"])
def test_fused_gate_up_variant(fp8, decode, nan_empty):
    """The FUSED gate_up tiling (one [BK, 2*BN] weight tile, one dot) computes what the split one does."""
    E, H, I, N, k = 8, 256, 256, 37, 3
    w13, w2, q13, s13, q2, s2 = make_experts(E, H, I, seed=8)
    w, ids = make_routing(N, E, k, seed=9)
    x = make_x(N, H, seed=10)
    tile = dict(BLOCK_N=128 if fp8 and not decode else 64, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=2)
    cfg = {"BLOCK_M": 16, "gate_up": dict(tile, FUSED=1), "down": dict(tile)}
    if fp8:
        out = moe_experts_triton(x, w, ids, q13, q2, s13, s2, config=cfg, decode=decode)
        ref = moe_experts_fp8_reference(x, w, ids, q13, s13, q2, s2, quant_act=not decode)
    else:
        out = moe_experts_triton(x, w, ids, w13, w2, config=cfg, decode=decode)
        ref = moe_experts_reference(x, w, ids, w13, w2)
    assert_close("fused gate_up", out, ref, bf16_bound(3))


def test_stored_config_tables():
    """Every stored table parses, keeps decode entries in the decode regime and passes the launcher's checks."""
    from qwen35_export.kernels.moe.configs import CONFIG_DIR, load_table
    from qwen35_export.kernels.moe.experts import check_config
    files = sorted(CONFIG_DIR.glob("E=*,N=*,device=*,dtype=*.json"))
    assert files, "no stored tables"
    for f in files:
        key = dict(kv.split("=") for kv in f.stem.split(","))
        table = load_table(int(key["E"]), int(key["N"]), key["device"], key["dtype"])
        for T, cfg in table.items():
            fp8 = key["dtype"] == "fp8"
            check_config(cfg, fp8, fp8 and T > DECODE_MAX_TOKENS, int(key["N"]))
            assert (cfg["BLOCK_M"] == 16) or T > DECODE_MAX_TOKENS, (f.name, T)


def test_h200_without_a_table_takes_the_h100_table(monkeypatch):
    """Same SM: an H200 uses the H100's tuned tiles for a geometry it has no table of; another GPU without a
    table gets the untuned defaults."""
    from qwen35_export.kernels.moe import configs as C

    dev = torch.device("cuda")
    for tag, want_table in (("H200", True), ("A100", False)):
        monkeypatch.setattr(C, "device_tag", lambda d, tag=tag: tag)
        got = C.get_config(513, 1024, 4096, dev, "fp8", 11, decode=False)
        h100 = C.load_table(513, 1024, "H100", "fp8")
        assert h100 is not None
        want = h100[min((t for t in h100 if t > C.DECODE_MAX_TOKENS), key=lambda t: abs(t - 4096))] if want_table \
            else C.default_config(4096, 513, 11, "fp8", decode=False)
        assert got == want, tag


# -- PAIRS mode (decode without the align kernel) --------------------------------------------------
# (N, E, k, pin, dtype): N in {1, 2, 3, 8}, k in {1, 3, 10}, a small E (many tokens share experts; k=10 of
# E=16 makes every expert take several slots) and E=512 (nearly every slot its own expert), `pin` sends
# every token's slot 0 to one expert. Both dtypes across the sweep; H=160 leaves K and column tails.
PAIRS_CASES = [
    pytest.param(1, 16, 1, None, "bf16", id="T1-E16-k1-bf16"),
    pytest.param(1, 512, 10, None, "fp8", id="T1-E512-k10-fp8"),
    pytest.param(2, 16, 3, 3, "bf16", id="T2-E16-k3-pin-bf16"),
    pytest.param(2, 16, 10, None, "fp8", id="T2-E16-k10-fp8"),
    pytest.param(3, 512, 1, 7, "fp8", id="T3-E512-k1-pin-fp8"),
    pytest.param(3, 512, 3, None, "bf16", id="T3-E512-k3-bf16"),
    pytest.param(8, 16, 1, None, "fp8", id="T8-E16-k1-fp8"),
    pytest.param(8, 512, 3, 5, "bf16", id="T8-E512-k3-pin-bf16"),
    pytest.param(8, 16, 10, None, "bf16", id="T8-E16-k10-bf16"),
    pytest.param(8, 512, 10, 1, "fp8", id="T8-E512-k10-pin-fp8"),
]
PAIRS_H, PAIRS_I = 160, 128
# Wide tiles keep the interpreter's program count small (2 per slot); GROUP_M 4 does not divide most M.
PAIRS_TILE = dict(BLOCK_N=128, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=2)
PAIRS_CFG = {"BLOCK_M": 16, "gate_up": dict(PAIRS_TILE), "down": dict(PAIRS_TILE, BLOCK_N=256)}


@functools.lru_cache(maxsize=None)
def pairs_experts(E: int):
    return make_experts(E, PAIRS_H, PAIRS_I, seed=E)


def _run_pairs(x, w, ids, E, dtype, pairs, decode=True):
    w13, w2, q13, s13, q2, s2 = pairs_experts(E)
    if dtype == "fp8":
        return moe_experts_triton(x, w, ids, q13, q2, s13, s2, config=PAIRS_CFG, decode=decode, pairs=pairs)
    return moe_experts_triton(x, w, ids, w13, w2, config=PAIRS_CFG, decode=decode, pairs=pairs)


def _reference(x, w, ids, E, dtype, quant_act=False):
    w13, w2, q13, s13, q2, s2 = pairs_experts(E)
    if dtype == "fp8":
        return moe_experts_fp8_reference(x, w, ids, q13, s13, q2, s2, quant_act=quant_act)
    return moe_experts_reference(x, w, ids, w13, w2)


@pytest.mark.parametrize("N,E,k,pin,dtype", PAIRS_CASES)
def test_pairs_mode(N, E, k, pin, dtype, nan_empty):
    """PAIRS mode gives the align path's output bit for bit (each tile holds the same slots in the same
    order, only the tile index differs) and the reference's within the decode bounds."""
    w, ids = make_routing(N, E, k, seed=100 + N * k, pin=pin)
    x = make_x(N, PAIRS_H, seed=N)
    out = _run_pairs(x, w, ids, E, dtype, pairs=True)
    assert torch.equal(out, _run_pairs(x, w, ids, E, dtype, pairs=False)), "PAIRS and align paths differ"
    # Decode keeps activations in bf16 for both dtypes: three bf16 roundings (h, slot rows, output).
    assert_close(f"{dtype} pairs vs reference", out, _reference(x, w, ids, E, dtype), bf16_bound(3))


def test_pairs_mode_more_slots_than_block_m(nan_empty):
    """An expert with more slots than BLOCK_M (20 tokens pinned to expert 2, and E=4 shares the rest)
    spreads over several live tiles, each taking the next BLOCK_M of its slots."""
    N, E, k = 20, 4, 2
    w, ids = make_routing(N, E, k, seed=11, pin=2)
    assert int((ids == 2).sum()) > PAIRS_CFG["BLOCK_M"]
    x = make_x(N, PAIRS_H, seed=12)
    out = _run_pairs(x, w, ids, E, "bf16", pairs=True)
    assert torch.equal(out, _run_pairs(x, w, ids, E, "bf16", pairs=False))
    assert_close("bf16 pairs, an expert over BLOCK_M slots", out, _reference(x, w, ids, E, "bf16"), bf16_bound(3))


def test_pairs_mode_fp32_and_fp8_prefill(nan_empty):
    """PAIRS mode with fp32 activations (equal to the align path at fp32 rounding) and with the prefill
    regime's e4m3 activations and h (h scales indexed by slot)."""
    N, E, k = 3, 16, 3
    w, ids = make_routing(N, E, k, seed=13, pin=4)
    x = make_x(N, PAIRS_H, seed=14, dtype=torch.float32)
    w13, w2, *_ = pairs_experts(E)
    out = moe_experts_triton(x, w, ids, w13.float(), w2.float(), config=PAIRS_CFG, pairs=True)
    ref = moe_experts_triton(x, w, ids, w13.float(), w2.float(), config=PAIRS_CFG, pairs=False)
    assert_close("fp32 pairs vs align", out, ref, FP32_BOUND)
    xb = x.bfloat16()
    out8 = _run_pairs(xb, w, ids, E, "fp8", pairs=True, decode=False)
    assert torch.equal(out8, _run_pairs(xb, w, ids, E, "fp8", pairs=False, decode=False))
    sim = _reference(xb, w, ids, E, "fp8", quant_act=True)
    assert_close("fp8 prefill pairs vs quantisation-simulated reference", out8, sim, bf16_bound(2))


def test_pairs_mode_decision(monkeypatch):
    """Concrete N up to PAIRS_MAX_TOKENS in decode takes PAIRS mode; a symbolic N only when its range
    proves the bound (a decode graph with Dim max 8), and deciding adds no guard on N."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    from qwen35_export.kernels.moe import experts
    from qwen35_export.kernels.moe.configs import PAIRS_MAX_TOKENS

    assert experts.use_pairs(1, True) and experts.use_pairs(PAIRS_MAX_TOKENS, True)
    assert not experts.use_pairs(PAIRS_MAX_TOKENS + 1, True) and not experts.use_pairs(1, False)
    # The symbolic decision at a threshold a 2-row example can sit under (the shipped one is 1 token).
    monkeypatch.setattr(experts, "PAIRS_MAX_TOKENS", 8)
    for bound, want in ((8, True), (64, False), (None, False)):
        env = ShapeEnv()
        x = FakeTensorMode(shape_env=env).from_tensor(torch.zeros(2, 4), symbolic_context=StatelessSymbolicContext(
            dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC]))
        n = x.shape[0]
        if bound is not None:
            torch._check(n <= bound)  # what the decode graph's Dim("B", max=bound) declares
        guards = len(env.guards)
        assert experts.use_pairs(n, True) == want, bound
        assert len(env.guards) == guards, "the decision guarded on N"
    # The default call at one token (the shipped threshold) never runs the align kernel.
    monkeypatch.setattr(experts, "PAIRS_MAX_TOKENS", PAIRS_MAX_TOKENS)
    monkeypatch.setattr(experts, "align_block_size", lambda *a: pytest.fail("align_block_size ran"))
    w, ids = make_routing(1, 16, 1, seed=15)
    w13, w2, *_ = pairs_experts(16)
    x = torch.randn(1, PAIRS_H).bfloat16().to(DEVICE)
    assert_close("default decode call", experts.moe_experts_triton(x, w, ids, w13, w2, config=PAIRS_CFG),
                 _reference(x, w, ids, 16, "bf16"), bf16_bound(3))
