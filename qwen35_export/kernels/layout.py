"""Which [B, T, heads, D] layouts the kernels read in place.

In the model q, k and v are column slices of the causal conv's [B, T, C] output (and z one of the GDN input
projection's), so their token stride is the row width, not heads x D. The kernels take that token stride as
an argument; a `.contiguous()` copy would cost a pass over the tensor per layer (q, k, v at 8K tokens: ~80 us
of the 35B GDN layer on an H200).
"""

from __future__ import annotations

from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true


def token_rows(x: Tensor) -> tuple[Tensor, int]:
    """x [B, T, heads, D] -> (x, its token stride) when the kernels can read it in place: D contiguous, the
    heads of a token adjacent, and tokens of all sequences one stride apart (batch stride = T x token
    stride, or B == 1); else a contiguous copy and heads x D.

    Decided with `statically_known_true`: under AOTInductor the sizes and strides may be symbolic, and a
    plain comparison would put a guard on them; an undecidable layout takes the copy."""
    B, T, Hx, D = x.shape
    s_b, s_t, s_h, s_d = x.stride()
    if statically_known_true(T == 1):  # a size-1 dim's stride is arbitrary: token n sits at n x the batch stride
        s_t = s_b
    if statically_known_true(Hx == 1):  # one head (e.g. a key head per tensor-parallel rank): its stride is moot
        s_h = D
    in_place = (statically_known_true(s_d == 1) and statically_known_true(s_h == D)
                and (statically_known_true(B == 1) or statically_known_true(s_b == T * s_t)))
    if in_place:
        return x, s_t
    return x.contiguous(), Hx * D
