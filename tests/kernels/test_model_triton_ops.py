"""The whole model with every `qwen35::` op replaced by its Triton kernel (what a GPU build substitutes)
against the same model on the reference ops: prefill of a padded batch, then decode steps.

Each kernel has its own shape sweep; this checks their composition at the shapes the model hands them:
column slices of fused projections, the decode/prefill dispatch of the attention op (T <= 8 vs the flash
kernel, on top of cached tokens), the FP8 linear's dequantise path at >= 256 rows, folded shared expert.
Runs under the Triton interpreter here (tiny geometry, 4 layers), compiled with QWEN35_TRITON_GPU=1.

Bound (relative L2 of the logits, both models BF16 with the same weights): each kernel rounds its
intermediates to bf16 where the reference keeps fp32 (chunk-state w/u, attention probabilities, expert h),
~2^-8 relative each, independent across the ~6 ops of a layer and 4 layers: sqrt(24) * 2^-8 = 1.9e-2,
amplified through the final norm and head by at most their condition; 3e-2. The FP8 model also rounds
activations to e4m3 inside its FP8 ops; those errors are independent across the K terms of each dot product
and average out (measured here: logits 0.8-0.9% FP8, 0.4-0.5% BF16), so the same bound holds.
"""

from __future__ import annotations

import math

import pytest
import torch

from qwen35_export.checkpoint.reader import load_model_weights
from qwen35_export.checkpoint.writer import write_random_checkpoint
from qwen35_export.config import preset
from qwen35_export.graph.fuse_weights import fuse_layer_weights
from qwen35_export.graph.substitute_custom_ops import triton_implementations
from qwen35_export.kernels.fp8_linear import gemm
from qwen35_export.model.model import Qwen35Model
from gdn_compare import DEVICE
from test_moe import BF16_U, FP8_U

BOUND = 3e-2
# Per op at its call site, one op's own rounding: bf16 intermediates 2e-2 (the kernel tests' bf16 bounds are
# 1e-2); the FP8 ops quantise their activations to e4m3 by design (decode rows of the FP8 linear, prefill rows
# of the FP8 experts), one e4m3 rounding plus one bf16: sqrt(FP8_U^2 + BF16_U^2) = 0.063, as their kernel
# tests bound them against the unquantised op.
OP_BOUND = 2e-2
OP_BOUNDS = {"fp8_linear": math.sqrt(FP8_U ** 2 + BF16_U ** 2), "moe_experts_fp8": math.sqrt(FP8_U ** 2 + BF16_U ** 2)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module", params=["bf16", "fp8"])
def models(request, tmp_path_factory):
    """(reference model, Triton-op model): the same tiny 4-layer checkpoint; the Triton one with the fused
    projections a build makes."""
    cfg = preset("tiny", num_hidden_layers=4)
    path = write_random_checkpoint(cfg, tmp_path_factory.mktemp(request.param) / "ckpt", dtype=request.param,
                                   progress=False)
    # on the kernels' device (compiled on the GPU under QWEN35_TRITON_GPU=1: CPU weights failed the launches)
    ref = load_model_weights(path, torch.bfloat16, keep_fp8=request.param == "fp8", device=DEVICE, progress=False)
    fused = load_model_weights(path, torch.bfloat16, keep_fp8=request.param == "fp8", device=DEVICE, progress=False)
    fused.layers = [fuse_layer_weights(w)[0] for w in fused.layers]
    return Qwen35Model(ref), Qwen35Model(fused, cache_op=True), request.param


@pytest.mark.parametrize("fused_route", [False, True], ids=["op-by-op-route", "fused-route"])
def test_prefill_and_decode_match_reference(models, fused_route, monkeypatch):
    """Both routings a build may capture: the op-by-op one (moe_router's kernel; prefill graphs and
    `--no-fused-route` builds) and qwen35::moe_route (decode graphs by default: its two kernels; moe_router
    then runs only inside its reference)."""
    ref, tri, dtype = models
    tri = Qwen35Model(tri.w, cache_op=True, fused_route=fused_route)
    impls = triton_implementations()
    if not impls:
        pytest.skip("triton is not importable: no Triton ops")
    g = torch.Generator().manual_seed(0)
    B, T = 2, 41  # rows of 41 and 28 tokens: several GDN chunks, flash attention past one key block
    # 82 prefill rows take the FP8 linear's dequantise path (from 256 rows in a build) as long prompts do
    monkeypatch.setattr(gemm, "DEQUANT_MIN_R", 64)
    ids = torch.randint(0, ref.cfg.vocab_size, (B, T), generator=g).to(DEVICE)
    lens = torch.tensor([T, T - 13], device=DEVICE)
    assert (gemm.default_config(B * T, 256, 128) == {"DEQUANT": True}
            and "DEQUANT" not in gemm.default_config(B, 256, 128))
    steps = torch.randint(0, ref.cfg.vocab_size, (2, B, 1), generator=g).to(DEVICE)  # the same decode inputs for both

    def run(model):
        s = model.init_state(B, T + 8)
        logits, s = model.prefill(ids, lens, s)
        # every real position (an error in one query's attention shows only there when the attention layer
        # is the last), padding positions left out
        out = [torch.cat([logits[b, : int(lens[b])] for b in range(B)])]
        for tok in steps:
            step, s = model.decode(tok, s)
            out.append(step[:, 0])
        return out

    want = run(ref)
    worst: dict[str, float] = {}
    router_ref = torch.ops.qwen35.moe_router  # before the loop patches it
    with monkeypatch.context() as m:
        for name in impls:
            m.setattr(torch.ops.qwen35, name, _checked(name, getattr(torch.ops.qwen35, name), router_ref,
                                                       getattr(torch.ops.qwen35_triton, name), worst))
        got = run(tri)
    assert set(worst) == set(impls) - {"moe_experts_fp8" if dtype == "bf16" else "moe_experts"} - \
        ({"fp8_linear"} if dtype == "bf16" else set()) - {"moe_router" if fused_route else "moe_route"}, worst
    for name, err in worst.items():
        bound = OP_BOUNDS.get(name, OP_BOUND)
        assert err < bound, f"{dtype}: {name} at the model's call site, rel. L2 {err:.3g} >= {bound:.3g}"
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel(a, b) < BOUND, f"{dtype} step {i}: logits rel. L2 {rel(a, b):.3g} >= {BOUND}"


def _checked(name, reference, router_ref, triton_op, worst: dict[str, float]):
    """`triton_op`, also running `reference` on the same inputs and keeping the worst relative L2 of each
    floating output. The router's picks may order (or, at the k-th place, choose) exactly tied logits
    differently from torch.topk on this device, as bf16 logits tie often: what must hold is that the
    picked logits are the top-k values, i.e. equal to the reference's picks' values, sorted. moe_route rounds
    its own gate logits, which may sit one bf16 ulp (2^-7 relative at most) off the reference's: a near tie at
    the k-th place may go either way there, so its picks' reference logits match to two ulps (one per logit).
    `router_ref`: the reference router, which moe_route's reference math looks up at call time (where the
    patched, checked Triton router would stand otherwise)."""
    def call(*args):
        out = triton_op(*args)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.ops.qwen35, "moe_router", router_ref)
            want = reference(*args)
        if name in ("moe_router", "moe_route"):
            route = name == "moe_route"
            logits = (torch.nn.functional.linear(args[0], args[1])[:, :args[2]] if route else args[0]).float()
            k = args[3] if route else args[1]
            picked = lambda ids: logits.gather(1, ids[:, :k]).sort(1, descending=True).values  # noqa: E731
            # a pick swapped by the op's own logits: each of the two logits may sit one bf16 ulp (2^-7
            # relative at most) off the reference's, in opposite directions: 2^-6
            tol = 2.0 ** -6 if route else 0.0
            assert torch.allclose(picked(out[1]), picked(want[1]), rtol=tol, atol=0), f"{name}: picks are not a top-k"
            worst[name] = max(worst.get(name, 0.0), rel(out[0].sort(1).values, want[0].sort(1).values))
            return out
        outs = out if isinstance(out, tuple) else (out,)
        wants = want if isinstance(want, tuple) else (want,)
        for o, w in zip(outs, wants):
            worst[name] = max(worst.get(name, 0.0), rel(o, w))
        return out
    return call
