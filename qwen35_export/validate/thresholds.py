"""The one table of pass/fail bounds, per engine precision (the manifest's `dtype`: fp32, bf16, fp8).

Every engine is compared with an fp32 reference, so a bound is the error the engine's own precision is
expected to add, with headroom; it is never widened to make an engine pass. The bf16 and fp8 numbers are
derived from the formats' rounding (not fitted to any run): bf16 keeps 8 significant bits (eps 2^-8 = 0.39%),
e4m3 keeps 4 (eps 2^-4 = 6.25%, per-128-block scales).

What the bounds can see (tests/validate/test_validate_mutations.py, tiny model, one broken layer): a swapped
norm flavour or a dropped conv state moves the layer's output by ~10%, wrong experts by ~4%, an unnormalised
router by ~2%, a bf16-kept GDN state moves the state by ~2e-3 but the layer's output by only ~1e-5. The fp32
bounds catch all five; the bf16/fp8 hidden-state bounds would not see the 2-4% ones in a single layer (the
residual stream dilutes one layer's error), so for those precisions such bugs rest on the end-to-end checks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import InputError


@dataclass(frozen=True)
class Thresholds:
    hidden_rel_l2: float  # max ||engine - ref|| / ||ref|| of a decoder layer's output (per row, per phase)
    hidden_cos: float  # min cosine similarity of the same
    state_rel_l2: float  # max relative L2 of the GDN conv and recurrent state after prefill
    routing: float  # min fraction of top-k expert picks that agree, per layer
    kl_mean: float  # max mean KL(ref || engine) of the next-token distributions (nats)
    top1: float  # min fraction of positions whose argmax agrees
    top5: float  # min mean overlap of the top-5 sets
    greedy: float  # min fraction of teacher-forced greedy tokens equal to the reference's

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


THRESHOLDS: dict[str, Thresholds] = {
    # fp32 engine vs fp32 reference: same formulas, only summation order differs (Inductor fusion, kernel
    # tiling). fp32 eps is 1.2e-7 and a dot product of K terms errs ~sqrt(K)*eps ~ 1e-5 at most: 1e-4 per
    # layer is the bound the engine and transformers-parity tests already use. A bf16-kept GDN state, the
    # subtlest bug we must catch, moves the state by ~2e-3: state_rel_l2 is what catches it.
    "fp32": Thresholds(
        hidden_rel_l2=1e-4,
        hidden_cos=1 - 1e-6,  # cos ~ 1 - rel^2/2: any error the rel bound allows keeps cos far above this
        state_rel_l2=1e-4,  # the state is fp32 on both sides; same argument as the hidden states
        routing=0.99,  # a pick flips only where two router probabilities tie to ~1e-6: <1% of picks
        kl_mean=1e-6,  # KL ~ var(dlogit)/2 with dlogit ~1e-4 -> 1e-8; 100x headroom
        top1=0.99,  # flips within the logit noise count as ties (metrics.TIE_SIGMAS); 1% slack for
        top5=0.99,  #   ties just outside 3 sigma; top-5 has no tie excuse, but fp32 noise is 1e-5 of a logit
        greedy=0.98,  # the same tie rule over the gen steps; one undecided flip in 50 tolerated
    ),
    # bf16 weights and activations: each layer rounds ~10 times in sequence (norms, projections, conv, GDN
    # output, experts): ~1% per layer in quadrature; the residual stream carries it through 40-60 layers
    # to ~2-3%. 5% leaves headroom; a wrong formula moves a layer by >10%.
    "bf16": Thresholds(
        hidden_rel_l2=0.05,
        hidden_cos=0.998,  # 1 - 0.05^2/2 = 0.99875: consistent with the rel bound
        state_rel_l2=0.05,  # recurrent state is fp32 but fed bf16 k/v; conv state is stored in bf16
        routing=0.90,  # bf16 router logits flip near-ties among top-k; >10% flips means drift, not ties
        kl_mean=1e-2,  # dlogit ~1-2% of a logit of ~10: KL ~ 0.5 * 0.1^2 = 5e-3
        top1=0.90,  # ties are excused; the rest allows for noise that is not Gaussian across the vocab
        top5=0.90,  # no tie excuse here: the 5th/6th pair of a flat distribution swaps at bf16 resolution
        greedy=0.90,  # teacher forcing keeps every step independent: same argument as top-1
    ),
    # fp8 (e4m3, 128x128 weight blocks, dynamic per-token-group activations): a block-quantised GEMM errs
    # ~2-4% relative; about half the layer's projections are fp8, so ~5% per layer and ~10% after depth.
    "fp8": Thresholds(
        hidden_rel_l2=0.15,
        hidden_cos=0.985,  # 1 - 0.15^2/2 = 0.989, rounded down
        state_rel_l2=0.15,  # k/v come from the fp8 in_proj_qkv
        routing=0.80,  # router stays bf16 but its input carries the fp8 drift
        kl_mean=5e-2,  # dlogit ~5% of a logit of ~10: KL ~ 0.5 * 0.3^2 = 0.05 at the bound
        top1=0.80,
        top5=0.85,
        greedy=0.80,
    ),
}


def thresholds_for(precision: str) -> Thresholds:
    """The bounds for an engine whose manifest says `dtype: precision`."""
    if precision not in THRESHOLDS:
        raise InputError(f"no validation thresholds for precision {precision!r}: expected one of "
                         f"{sorted(THRESHOLDS)}")
    return THRESHOLDS[precision]
