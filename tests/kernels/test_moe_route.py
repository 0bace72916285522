"""`qwen35::moe_route` (the whole routing of a layer whose shared expert is expert E) and its Triton form:
the gate-logits kernel against an fp64 matmul, the route kernel against the op's math on the same logits,
both together against the op, and the MoE layer on the op against the op-by-op path it replaced.

Runs on CPU through Triton's interpreter (conftest.py), or compiled on the GPU with QWEN35_TRITON_GPU=1.
"""

from __future__ import annotations

import pytest
import torch

from qwen35_export.checkpoint.writer import random_tensor
from qwen35_export.config import preset
from qwen35_export.graph.fuse_weights import fuse_layer_weights
from qwen35_export.kernels.moe import (gate_logit_partials, gate_logits_triton, moe_route_triton,
                                       route_from_logits_triton)
from qwen35_export.kernels.moe import router
from qwen35_export.model import layers
from qwen35_export.model.ops import moe_route_math, route_from_logits_math
from qwen35_export.model.weights import layer_weight_shapes
from gdn_compare import DEVICE
from test_moe import FP32_BOUND, lowest_index_topk

# Router weights and the shared gate's sigmoid are fp32 math in another order (softmax sums, exp and sigmoid
# implementations) than torch's: a few fp32 ulps, FP32_BOUND relative as the router tests. Each is rounded
# once to x's dtype, so a kernel weight must be that dtype's rounding of a value within FP32_BOUND of the
# reference's fp32 one: in bf16 the reference's own value except within FP32_BOUND of a rounding midpoint.
REAL_MODES = ("none-given", "all", "first-1", "first-n-2", "no-row")


def real_mask(mode: str, N: int) -> torch.Tensor | None:
    """The `real` argument: None, or real rows first (n of N), n = 0 meaning the kernel clamps n_real to 1."""
    if mode == "none-given":
        return None
    n = {"all": N, "first-1": 1, "first-n-2": max(N - 2, 0), "no-row": 0}[mode]
    return (torch.arange(N) < n).to(DEVICE)


def make_logits(N: int, L: int, dtype: torch.dtype, seed: int, ties: bool) -> torch.Tensor:
    """Logits [N, L]: random, or (ties) drawn from 5 values so that many experts tie across the top-k."""
    g = torch.Generator().manual_seed(seed)
    lg = torch.randint(-2, 3, (N, L), generator=g).float() if ties else torch.randn(N, L, generator=g) * 2
    return lg.to(dtype).to(DEVICE)


def check_route(rw: torch.Tensor, ids: torch.Tensor, lg: torch.Tensor, E: int, k: int,
                real: torch.Tensor | None) -> None:
    """(rw, ids) of a kernel from logits lg against `route_from_logits_math` on the same logits."""
    N = lg.shape[0]
    rw_ref, ids_ref = route_from_logits_math(lg, E, k, real)
    assert rw.dtype == lg.dtype and ids.dtype == torch.int64 and rw.shape == ids.shape == (N, k + 1)
    n_real = max(int(real.sum()), 1) if real is not None else N
    keep = real if real is not None else torch.ones(N, dtype=torch.bool, device=lg.device)
    src = torch.where(keep, torch.arange(N, device=lg.device), torch.arange(N, device=lg.device) % n_real)
    probs = torch.softmax(lg[:, :E].float(), dim=-1)[src]  # [N, E] of the row each row routes as
    # ids: the lowest-index top-k of the source row, best first (torch.topk on CPU picks among boundary ties
    # in no fixed order: where no tie straddles the k-th place its set is the same, checked below), then E.
    assert torch.equal(ids[:, :k], lowest_index_topk(probs, k)), "routed ids"
    assert torch.equal(ids[:, k], torch.full_like(ids[:, k], E)), "shared slot id"
    kth = probs.sort(-1, descending=True).values
    clear = kth[:, k - 1] > kth[:, k] if k < E else torch.ones(N, dtype=torch.bool, device=lg.device)
    for r in torch.nonzero(clear).flatten().tolist():
        assert set(ids[r].tolist()) == set(ids_ref[r].tolist()), f"row {r}: ids differ from the reference's"
    # weights: both lists are in descending order, so ties in any order give the same values position-wise
    w32, _ = torch.ops.qwen35.moe_router(lg[:, :E], k)  # the reference's fp32 weights before rounding
    w32 = torch.cat([w32, torch.sigmoid(lg[:, E:E + 1].float())], 1)
    lo, hi = ((w32 * (1 + s * FP32_BOUND)).to(lg.dtype) for s in (-1, 1))
    ok = (rw >= lo) & (rw <= hi)
    assert ok[keep].all(), (f"weights outside the reference's rounding: {rw[keep][~ok[keep]].tolist()[:8]} vs "
                            f"{rw_ref[keep][~ok[keep]].tolist()[:8]}")
    assert (rw[~keep] == 0).all(), "padding rows must carry weight 0"
    if lg.dtype == torch.bfloat16:  # the reference's own bf16 value except near midpoints: nearly everywhere
        assert (rw == rw_ref).float().mean() > 0.99, "bf16 weights should equal the reference's nearly always"


# (E, k): E + 1 logit columns padded to a multiple of 8 as graph/fuse_weights.py pads the fused gate
EK = [(8, 1), (8, 8), (257, 1), (257, 8), (257, 10)]
L_OF = {8: 16, 257: 264}


NS = (1, 3, 16, 17, 64, 100)
DTYPES = (torch.bfloat16, torch.float32)


def _cases():
    """N x (E, k), rotating the dtype, the real mode and the tie pattern so that every (E, k) meets each of
    them (the full product is ~10x slower under the interpreter and adds no kernel branch)."""
    out = []
    for a, N in enumerate(NS):
        for b, (E, k) in enumerate(EK):
            dtype, mode, ties = DTYPES[(a + b) % 2], REAL_MODES[(2 * a + b) % 5], (a + b) % 3 == 0
            name = f"N{N}-E{E}-k{k}-{str(dtype)[6:]}-{mode}" + ("-ties" if ties else "")
            out.append(pytest.param(N, E, k, dtype, mode, ties, id=name))
    return out


@pytest.mark.parametrize("N,E,k,dtype,mode,ties", _cases())
def test_route_kernel_same_logits(N, E, k, dtype, mode, ties, poison_empty):
    lg = make_logits(N, L_OF[E], dtype, seed=N * 1000 + E + k, ties=ties)
    real = real_mask(mode, N)
    rw, ids = route_from_logits_triton(lg, E, k, real)
    check_route(rw, ids, lg, E, k, real)


@pytest.mark.parametrize("mode", REAL_MODES)
@pytest.mark.parametrize("N", [1, 3, 17])
def test_route_kernel_real_modes(N, mode, poison_empty):
    """Every padding pattern at a few batch sizes (E 257, k 8, bf16 with ties)."""
    lg = make_logits(N, 264, torch.bfloat16, seed=N, ties=True)
    real = real_mask(mode, N)
    rw, ids = route_from_logits_triton(lg, 257, 8, real)
    check_route(rw, ids, lg, 257, 8, real)


def test_route_kernel_ties():
    """Exact ties in the logits: the lowest index wins, as in the router kernel."""
    E, k = 257, 10
    lg = torch.randn(3, 264, generator=torch.Generator().manual_seed(5))
    lg[0, :E] = 0.0  # every expert ties: 0..9
    lg[1, 20:35] = 9.0  # 15 tied maxima across the top-k boundary: 20..29
    lg[2, [250, 7, 33]] = 9.0  # ties inside the top-k, lowest index first
    rw, ids = route_from_logits_triton(lg.to(DEVICE), E, k, None)
    assert ids[0].tolist() == list(range(10)) + [E] and ids[1].tolist() == list(range(20, 30)) + [E]
    assert ids[2, :3].tolist() == [7, 33, 250]
    check_route(rw, ids, lg.to(DEVICE), E, k, None)


# -- gate logits kernel --------------------------------------------------------------------------------------
def logits_bound(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Elementwise worst-case error of fp32-accumulated x @ w.T rounded once to out_dtype, against the exact
    product (Higham, Accuracy and Stability, sec. 3.1): products of bf16 inputs are exact in fp32 (8 + 8 <= 24
    bits), those of fp32 inputs err by u each; a sum of H terms in any order errs by at most
    gamma_n = n u / (1 - n u) times sum_h |x_h w_h| (n = H + 1 covers the products too). u = 2^-23, not the
    2^-24 of round-to-nearest, covers tensor-core accumulation that truncates. The final rounding to
    out_dtype adds u_out |acc| <= u_out (|exact| + gamma_n S) (u_out 2^-8 for bf16, none for fp32)."""
    H = x.shape[1]
    u = 2.0 ** -23
    gamma = (H + 1) * u / (1 - (H + 1) * u)
    S = x.double().abs() @ w.double().abs().T
    exact = x.double() @ w.double().T
    u_out = 2.0 ** -8 if out_dtype == torch.bfloat16 else 0.0
    return u_out * exact.abs() + (1 + u_out) * gamma * S


@pytest.mark.parametrize("N,L,H", [(1, 16, 64), (3, 264, 256), (17, 264, 64), (64, 16, 256), (100, 264, 200),
                                   (16, 520, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gate_logits_kernel_vs_fp64(N, L, H, dtype, poison_empty):
    g = torch.Generator().manual_seed(N + L + H)
    x = torch.randn(N, H, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(L, H, generator=g) * H ** -0.5).to(dtype).to(DEVICE)
    bound = logits_bound(x, w, dtype)
    exact = x.double() @ w.double().T
    # the default tile (BLOCK_H 512 > every H here: one step) and 64-column steps (several, the last partial
    # where H is not a multiple of 64), as the 2048 / 4096-column gates of real models take
    for cfg in (None, dict(BLOCK_H=64)):
        out = gate_logits_triton(x, w, cfg)
        assert out.dtype == dtype and out.shape == (N, L)
        err = (out.double() - exact).abs()
        assert torch.isfinite(out).all() and (err <= bound).all(), f"{cfg}: max err {err.max():.3g}, worst " \
            f"err/bound {(err / bound).max():.3g}"


@pytest.mark.parametrize("H,splits", [(256, 2), (256, 3), (200, 4), (64, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gate_logit_partials_sum_to_the_product(H, splits, dtype, poison_empty):
    """H split over programs (64-column steps): fp32 partials, whole steps per split, none empty (H = 64 is
    one step: one split), whose sum is the fp32-accumulated product before any rounding (fp32 bound)."""
    N, L = 3, 264
    g = torch.Generator().manual_seed(H + splits)
    x = torch.randn(N, H, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(L, H, generator=g) * H ** -0.5).to(dtype).to(DEVICE)
    parts = gate_logit_partials(x, w, splits, dict(BLOCK_H=64))
    steps = -(-H // 64)
    want = -(-steps // -(-steps // splits))  # splits of whole steps, none empty
    assert parts.dtype == torch.float32 and parts.shape == (want, N, L)
    err = (parts.double().sum(0) - x.double() @ w.double().T).abs()
    # one more fp32 rounding per partial sum than one accumulation: S - 1 more terms in the gamma of the bound
    bound = logits_bound(x, w, torch.float32) * (H + want) / (H + 1)
    assert torch.isfinite(parts).all() and (err <= bound).all(), f"worst err/bound {(err / bound).max():.3g}"


# -- the op: logits kernel + route kernel --------------------------------------------------------------------
def exact_inputs(N: int, H: int, L: int, dtype: torch.dtype, seed: int, device: str = DEVICE
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H], w [L, H] on coarse power-of-two grids (multiples of 2^-3 and 2^-4, |.| <= 1): every
    product is a multiple of 2^-7 and every partial sum below 2^17 of those, exact in fp32 in any order, so
    the kernel and F.linear round the same exact logit once and agree bit for bit; the route kernel then
    sees the reference's logits (a one-ulp logit difference could legitimately move a near-tie pick)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-8, 9, (N, H), generator=g) / 8
    w = torch.randint(-4, 5, (L, H), generator=g) / 16
    return x.to(dtype).to(device), w.to(dtype).to(device)


def _op_cases():
    """Each N with two (E, k) pairs (all five over the sweep), both dtypes, both H, every real mode."""
    out = []
    for a, N in enumerate(NS):
        for j in range(2):
            E, k = EK[(a + 2 * j) % 5]
            dtype, mode, H = DTYPES[(a + j) % 2], REAL_MODES[(a + 3 * j) % 5], (64, 256)[a % 2]
            out.append(pytest.param(N, E, k, H, dtype, mode, id=f"N{N}-E{E}-k{k}-H{H}-{str(dtype)[6:]}-{mode}"))
    return out


@pytest.mark.parametrize("N,E,k,H,dtype,mode", _op_cases())
def test_moe_route_op(N, E, k, H, dtype, mode, poison_empty):
    """The Triton op (gate logits kernel up to DECODE_MAX_TOKENS rows, F.linear past it) against the op."""
    x, w = exact_inputs(N, H, L_OF[E], dtype, seed=N + E + k)
    real = real_mask(mode, N)
    lg = torch.nn.functional.linear(x, w)
    rw, ids = moe_route_triton(x, w, E, k, real)
    assert torch.equal(gate_logits_triton(x, w), lg), "exact inputs: the logits kernel must equal F.linear"
    check_route(rw, ids, lg, E, k, real)
    # exact inputs: the reference op sees the same logits, so the picks are the same sets (ties: lowest index
    # first in the kernel, torch.topk's order in the reference; check_route above covers the tie rule)
    rw_ref, ids_ref = torch.ops.qwen35.moe_route(x, w, E, k, real)
    assert rw_ref.shape == rw.shape and ids_ref.dtype == ids.dtype == torch.int64
    assert (ids[:, k] == E).all() and torch.equal(ids_ref[:, k], ids[:, k])


@pytest.mark.parametrize("N,E,k,H,dtype,mode", _op_cases()[::2])
def test_moe_route_op_split_gate(N, E, k, H, dtype, mode, poison_empty, monkeypatch):
    """With the gate GEMV split over H (GATE_LOGITS_CONFIG SPLIT_H 3, 64-column steps) the op routes exactly
    as the unsplit one: on exact inputs the partials sum to the exact logit, rounded once as F.linear's."""
    x, w = exact_inputs(N, H, L_OF[E], dtype, seed=N + E + k)
    real = real_mask(mode, N)
    with monkeypatch.context() as m:  # the unsplit op, at one row too
        m.setitem(router.GATE_LOGITS_CONFIG, "SPLIT_H", 1)
        m.setitem(router.GATE_LOGITS_CONFIG, "SPLIT_H_ONE_ROW", 1)
        want = moe_route_triton(x, w, E, k, real)
    monkeypatch.setitem(router.GATE_LOGITS_CONFIG, "SPLIT_H", 3)
    monkeypatch.setitem(router.GATE_LOGITS_CONFIG, "SPLIT_H_ONE_ROW", 3)
    monkeypatch.setitem(router.GATE_LOGITS_CONFIG, "BLOCK_H", 64)
    got = moe_route_triton(x, w, E, k, real)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    if N <= 64:  # the decode path took the partials: 3 splits of whole 64-column steps, none empty
        parts = gate_logit_partials(x, w, 3)
        steps = -(-H // 64)
        assert parts.shape[0] == -(-steps // -(-steps // 3))
        assert torch.equal(parts.sum(0).to(dtype), torch.nn.functional.linear(x, w))


def test_route_partials_need_the_logit_dtype():
    parts = torch.zeros(2, 3, 20, device=DEVICE)
    with pytest.raises(ValueError, match="partials .* need the logits' dtype"):
        route_from_logits_triton(parts, 16, 4, None)


# -- the MoE layer on the op against the op-by-op path it replaced ---------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("real", [None, [True, True, True, False, False]], ids=["prefill", "decode-padded"])
def test_moe_block_route_op_equals_old_path(dtype, real):
    """moe_block with the fused gate (qwen35::moe_route) gives bit for bit what the unfused gate rows give
    through the old sequence (F.linear, moe_router, cast, shared slot, padding redirect) with the same
    folded experts; the tiny preset folds its shared expert."""
    cfg = preset("tiny", num_hidden_layers=1)
    w = {n: random_tensor(f"layers.0.{n}", s, seed=0).to(dtype) for n, s in layer_weight_shapes(cfg, 0).items()}
    fused, _ = fuse_layer_weights(w)
    assert fused["mlp.experts.down_proj"].shape[0] == cfg.num_experts + 1 and "mlp.gate_shared.weight" in fused
    E, H = cfg.num_experts, cfg.hidden_size
    # Gate and x on exact grids (exact_inputs): F.linear over the E router rows and over all gate rows then
    # give the same logits (CPU GEMMs block fp32 sums by the output's shape otherwise)
    x, gate = exact_inputs(5, H, E + 1, dtype, seed=2, device="cpu")  # the model's torch ops, with its weights
    fused["mlp.gate_shared.weight"] = torch.cat([gate, fused["mlp.gate_shared.weight"][E + 1:]])
    old = dict(fused)
    gs = old.pop("mlp.gate_shared.weight")
    old["mlp.gate.weight"], old["mlp.shared_expert_gate.weight"] = gs[:E], gs[E:E + 1]
    x = x[:, None, :]  # [B 5, T 1, H]
    r = torch.tensor(real) if real is not None else None
    calls = []
    route = torch.ops.qwen35.moe_route
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.ops.qwen35, "moe_route", lambda *a: calls.append(1) or route(*a))
        new_out = layers.moe_block(x, fused, cfg, real=r, fused_route=True)
        assert calls == [1], "the fused, folded layer must route through qwen35::moe_route"
        old_out = layers.moe_block(x, old, cfg, real=r)
        assert calls == [1], "the unfused gate takes the op-by-op path"
        default_out = layers.moe_block(x, fused, cfg, real=r)
        assert calls == [1], "without fused_route the fused gate takes the op-by-op path too"
    assert torch.equal(default_out, old_out)
    assert torch.equal(new_out, old_out)


def test_route_op_picks_are_recorded():
    """validate/trace.py records the router picks by patching qwen35::moe_router: the route op's math looks
    it up at call time, so a fused, folded layer's picks are recorded too."""
    from qwen35_export.validate.trace import record_router

    cfg = preset("tiny", num_hidden_layers=1)
    w = {n: random_tensor(f"layers.0.{n}", s, seed=0) for n, s in layer_weight_shapes(cfg, 0).items()}
    fused, _ = fuse_layer_weights(w)
    x = torch.randn(3, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with record_router() as calls:
        layers.moe_block(x, fused, cfg, fused_route=True)
    _, ids = moe_route_math(x.reshape(6, -1), fused["mlp.gate_shared.weight"], cfg.num_experts,
                            cfg.num_experts_per_tok, None)
    assert len(calls) == 1 and torch.equal(calls[0], ids[:, :cfg.num_experts_per_tok])


@pytest.mark.parametrize("N", [1, 2])
def test_one_row_takes_its_own_gate_split(N, poison_empty, monkeypatch):
    """A call of one row (known statically, as in an engine's batch-1 decode graph) splits the gate GEMV
    GATE_LOGITS_CONFIG["SPLIT_H_ONE_ROW"] ways; two rows keep its SPLIT_H. Routing is the same either way."""
    E, k, H = 257, 8, 256
    x, w = exact_inputs(N, H, L_OF[E], torch.bfloat16, seed=7)
    asked = []
    real_partials = router.gate_logit_partials
    monkeypatch.setattr(router, "gate_logit_partials", lambda x, w, s, *a: asked.append(s) or real_partials(x, w, s, *a))
    monkeypatch.setitem(router.GATE_LOGITS_CONFIG, "BLOCK_H", 64)  # 4 whole steps: 4 splits stay 4
    rw, ids = moe_route_triton(x, w, E, k, None)
    assert asked == ([router.GATE_LOGITS_CONFIG["SPLIT_H_ONE_ROW"]] if N == 1 else [])
    check_route(rw, ids, torch.nn.functional.linear(x, w), E, k, None)
